//! TLS for the gateway: certificate chain and key from PEM files (a cert-manager or
//! Kubernetes Secret mount), re-read when their bytes change, so a rotated certificate
//! serves new connections without a restart. Connections already open keep the one they
//! began with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest a client may take over its handshake; a slow or silent one holds nothing
/// else up (handshakes run apart from the accept loop).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the gateway's certificate and key are, and how often they are checked.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are re-read for a change.
    pub reload_every: Duration,
}

/// Why the certificate or key cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key is not the certificate's, or of a kind the provider cannot sign with.
    #[error("{0}")]
    Key(String),
}

/// The certificate in force, swapped when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// Digest of the files' bytes behind `current` (or of the last bad ones, so a bad
    /// write is reported once, not every poll).
    seen: Mutex<[u8; 32]>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCert {
    /// Loads the files now.
    ///
    /// # Errors
    /// [`TlsError`] naming the file or the mismatch.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (cert, key) = read_both(&files)?;
        let certified = certified_key(&provider, &files, &cert, &key)?;
        Ok(Arc::new(ReloadingCert {
            seen: Mutex::new(digest(&cert, &key)),
            current: ArcSwap::from_pointee(certified),
            files,
            provider,
        }))
    }

    /// The leaf certificate now served (DER).
    #[must_use]
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().cert.first().cloned()
    }

    /// Re-reads the files; swaps in a changed, valid pair. A bad pair (half-written, key
    /// not matching) is logged and the certificate in force stays.
    pub fn reload(&self) {
        let Ok((cert, key)) = read_both(&self.files) else {
            return;
        };
        let d = digest(&cert, &key);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == d {
            return;
        }
        *seen = d;
        match certified_key(&self.provider, &self.files, &cert, &key) {
            Ok(certified) => {
                self.current.store(Arc::new(certified));
                info!(cert = %self.files.cert.display(), "gateway certificate reloaded");
            }
            Err(e) => {
                warn!(error = %e, "new gateway certificate not usable; the current one stays");
            }
        }
    }

    /// Polls the files every `reload_every` until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.files.reload_every) => self.reload(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// A rustls server configuration over this certificate, speaking HTTP/2 (gRPC).
    ///
    /// # Errors
    /// When the provider offers no safe protocol version.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Key(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn read_both(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })
    };
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(cert);
    h.update([0]);
    h.update(key);
    h.finalize().into()
}

fn certified_key(
    provider: &CryptoProvider,
    files: &TlsFiles,
    cert: &[u8],
    key: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let bad = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.cert, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(bad(&files.cert, "holds no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| bad(&files.key, format!("no private key: {e}")))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| TlsError::Key(format!("the key does not serve the certificate: {e}")))?;
    Ok(certified)
}

/// Accepts TCP connections on `listener` (with `TCP_NODELAY`) and yields those whose TLS
/// handshake succeeds; handshakes run concurrently, each bounded. Ends at `shutdown`.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(error = %e, "setting TCP_NODELAY");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
