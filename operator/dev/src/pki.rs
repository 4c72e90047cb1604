//! The dev stack's own PKI, so its gateway speaks TLS like a production one: a CA made on
//! first start and a gateway certificate it signs for `127.0.0.1` and `localhost`, kept in
//! the data dir (agents configured with its `ca.pem` keep trusting it across restarts).
//! Tests make theirs the same way.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// Where the PKI's files are.
#[derive(Clone, Debug)]
pub struct DevPki {
    /// The CA certificate agents trust (`[tls] ca_file`).
    pub ca: PathBuf,
    /// The gateway's certificate chain.
    pub cert: PathBuf,
    /// The gateway's private key (0600).
    pub key: PathBuf,
}

/// Why the PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing.
    #[error("making the dev CA: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing the files.
    #[error("{0}: {1}")]
    Write(PathBuf, std::io::Error),
}

impl DevPki {
    /// The PKI in `dir`, made if any of its files is missing.
    ///
    /// # Errors
    /// [`PkiError`].
    pub fn ensure(dir: &Path) -> Result<Self, PkiError> {
        let pki = DevPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("gateway.pem"),
            key: dir.join("gateway-key.pem"),
        };
        if [&pki.ca, &pki.cert, &pki.key].iter().all(|p| p.exists()) {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).map_err(|e| PkiError::Write(dir.to_owned(), e))?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Edgewise dev CA");
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
            .signed_by(&key, &issuer)?;
        write(&pki.key, key.serialize_pem().as_bytes(), true)?;
        write(&pki.cert, cert.pem().as_bytes(), false)?;
        write(&pki.ca, issuer.pem().as_bytes(), false)?;
        Ok(pki)
    }
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write as _;
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| PkiError::Write(path.to_owned(), e))
}
