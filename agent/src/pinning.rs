//! Public-key pinning of the gateway: on top of the usual chain verification, one
//! certificate of the chain the gateway presents must carry a pinned public key. Pins are
//! `sha256//<base64>` of a certificate's SubjectPublicKeyInfo, the form `curl
//! --pinnedpubkey` takes; pinning the issuing CA's key (not the leaf's) survives
//! cert-manager renewals, which make a new leaf key each time.
//!
//! tonic does not take a custom certificate verifier, so a pinned channel brings its own
//! connector: TCP, then rustls with [`PinnedVerifier`], ALPN `h2`.

use std::sync::Arc;

use base64::Engine;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// A pin: SHA-256 of a SubjectPublicKeyInfo.
pub type Pin = [u8; 32];

/// Parses `sha256//<base64 of 32 bytes>`.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_pin(text: &str) -> Result<Pin, String> {
    let b64 = text.strip_prefix("sha256//").ok_or_else(|| {
        format!("{text:?} does not start with sha256// (the form curl --pinnedpubkey takes)")
    })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("{text:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{text:?} is not 32 bytes (a SHA-256)"))
}

/// The pin of a DER certificate's public key; `None` when it does not parse.
#[must_use]
pub fn pin_of(cert: &[u8]) -> Option<Pin> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(Sha256::digest(parsed.public_key().raw).into())
}

/// Verifies the chain as usual, then requires a pinned key in it.
#[derive(Debug)]
pub struct PinnedVerifier {
    chain: Arc<WebPkiServerVerifier>,
    pins: Vec<Pin>,
    /// Each root's subject (DER) and key pin: servers seldom send the root, so a pinned
    /// root key is matched through the issuer of the chain's last certificate.
    root_keys: Vec<(Vec<u8>, Pin)>,
}

impl PinnedVerifier {
    /// Verifies against the `roots` certificates, requiring one of `pins`.
    ///
    /// # Errors
    /// When no root is usable.
    pub fn new(roots: &[CertificateDer<'static>], pins: Vec<Pin>) -> Result<Self, rustls::Error> {
        let mut store = RootCertStore::empty();
        let (_, unusable) = store.add_parsable_certificates(roots.iter().cloned());
        if unusable > 0 {
            tracing::debug!(unusable, "skipped root certificates that do not parse");
        }
        let root_keys = roots
            .iter()
            .filter_map(|c| {
                let (_, parsed) = x509_parser::parse_x509_certificate(c).ok()?;
                Some((parsed.subject().as_raw().to_vec(), pin_of(c)?))
            })
            .collect();
        let chain = WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(PinnedVerifier {
            chain,
            pins,
            root_keys,
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let pinned = std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(|c| pin_of(c))
            .any(|p| self.pins.contains(&p));
        if pinned || self.root_pinned(end_entity, intermediates) {
            Ok(verified)
        } else {
            Err(rustls::Error::General(
                "the gateway's certificate chain holds no pinned public key (tls.pins)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

impl PinnedVerifier {
    /// Whether the chain's last certificate was issued by a root whose key is pinned (the
    /// chain has verified, so that root is the one it ends at; two trusted roots with the
    /// same subject would both count, which only matters if one of them is not pinned).
    fn root_pinned(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> bool {
        let last = intermediates.last().unwrap_or(end_entity);
        let Ok((_, last)) = x509_parser::parse_x509_certificate(last) else {
            return false;
        };
        self.root_keys
            .iter()
            .any(|(subject, pin)| *subject == last.issuer().as_raw() && self.pins.contains(pin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_sha256_slash_slash_base64_of_32_bytes() {
        let pin = parse_pin("sha256//47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").expect("a pin");
        assert_eq!(hex::encode(pin), hex::encode(Sha256::digest(b"")));
        for bad in [
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha256//not base64!",
            "sha256//AAAA",
        ] {
            let e = parse_pin(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }
}
