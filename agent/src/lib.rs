//! The Edgewise on-device agent.
//!
//! It keeps a device's models and routing policy in line with the control plane over the
//! `edgewise.v1.Fleet` protocol and answers routing questions locally through
//! `edgewise.agent.v1.Router` (a Unix socket) or in-process ([`router::LocalRouter`]),
//! offline too.
//!
//! - [`config`]: the TOML configuration, loaded then built;
//! - [`identity`]: device key, id and credential;
//! - [`store`] and [`download`]: the content-addressed store and resumable, verifying
//!   downloads; [`installer`] activates what the gateway assigns;
//! - [`policy`] and [`router`]: the last good policy and the local routing API;
//! - [`sync`]: the Sync client with backoff;
//! - [`agent`]: one real agent; [`simulate`]: many virtual devices in one process;
//! - [`status`]: what `edgewise-agent status` prints.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod device;
pub mod direct_io;
pub mod download;
pub mod fsutil;
pub mod identity;
pub mod installer;
pub mod local_socket;
pub mod network;
pub mod openai;
pub mod pinning;
pub mod policy;
pub mod power;
pub mod router;
pub mod runtime;
pub mod simulate;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;

/// How the agent trusts its gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayTls {
    /// Accept an `http://` (cleartext) gateway URL: only on a network the operator trusts
    /// (the dev stack, tests). An `https://` URL is verified whatever this says.
    pub insecure: bool,
    /// PEM CA certificates to verify the gateway with, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// When not empty, a key of the gateway's verified chain must be one of these
    /// ([`pinning`]).
    pub pins: Vec<pinning::Pin>,
}

impl GatewayTls {
    /// Cleartext allowed, system roots for `https://`: the dev stack's and tests' setting.
    #[must_use]
    pub fn insecure() -> Self {
        GatewayTls {
            insecure: true,
            ..GatewayTls::default()
        }
    }
}

/// Why there is no channel to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// An `http://` URL without `insecure`.
    #[error(
        "{0} is cleartext: the bootstrap token, credentials and policy would travel unencrypted; use https://, or set insecure = true on a network you trust"
    )]
    Cleartext(String),
    /// Neither `http://` nor `https://`.
    #[error("{0:?} is not an http(s) URL")]
    Scheme(String),
    /// Not a URI, or the TLS settings are unusable.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// Pinning asked for, but its roots or TLS settings are unusable.
    #[error("tls.pins: {0}")]
    Pinning(String),
}

/// A channel to the gateway that dials lazily and redials on demand; TLS for `https://`
/// (system roots, or `tls.ca_pem`), cleartext for `http://` only when `tls.insecure`.
///
/// # Errors
/// [`ChannelError`].
pub fn gateway_channel(
    url: &str,
    tls: &GatewayTls,
) -> Result<tonic::transport::Channel, ChannelError> {
    if url.starts_with("https://") && !tls.pins.is_empty() {
        return pinned_channel(url, tls);
    }
    let endpoint = endpoint(url.to_owned())?;
    let endpoint = if url.starts_with("https://") {
        let config = tonic::transport::ClientTlsConfig::new();
        endpoint.tls_config(match &tls.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        })?
    } else if url.starts_with("http://") {
        if !tls.insecure {
            return Err(ChannelError::Cleartext(url.to_owned()));
        }
        endpoint
    } else {
        return Err(ChannelError::Scheme(url.to_owned()));
    };
    Ok(endpoint.connect_lazy())
}

/// A channel whose TLS is ours, not tonic's, so that [`pinning::PinnedVerifier`] checks
/// the gateway: the endpoint dials `http://` (tonic adds no TLS of its own) with the
/// `https://` origin in requests, and the connector speaks TLS on every connection.
fn pinned_channel(url: &str, tls: &GatewayTls) -> Result<tonic::transport::Channel, ChannelError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let pinning = |e: &dyn std::fmt::Display| ChannelError::Pinning(e.to_string());
    let roots: Vec<CertificateDer<'static>> = match &tls.ca_pem {
        Some(pem) => CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| pinning(&e))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let verifier =
        pinning::PinnedVerifier::new(&roots, tls.pins.clone()).map_err(|e| pinning(&e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| pinning(&e))?
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let origin: http::Uri = url.parse().map_err(|e| pinning(&e))?;
    let host = origin
        .host()
        .ok_or_else(|| ChannelError::Scheme(url.to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = origin.port_u16().unwrap_or(443);
    let name = ServerName::try_from(host.clone()).map_err(|e| pinning(&e))?;
    let dial = tower::service_fn(move |_: http::Uri| {
        let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(name, tcp).await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(std::io::Error::other(
                    "the gateway did not agree to HTTP/2 (ALPN h2)",
                ));
            }
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The endpoint's own URI only says where tonic thinks it dials; `dial` ignores it.
    let endpoint = endpoint(url.replacen("https://", "http://", 1))?.origin(origin);
    Ok(endpoint.connect_with_connector_lazy(dial))
}

/// The gateway endpoint's connection settings.
fn endpoint(uri: String) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// An HTTP client for artifact downloads.
///
/// # Errors
/// When the TLS backend cannot be initialised.
pub fn artifact_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        // No overall timeout (artifacts are large); a stalled body fails on read timeout.
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
}
