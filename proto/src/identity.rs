//! Device identity rules both ends of `Enroll` must agree on bit for bit.
//!
//! A device id is derived from the device's ed25519 public key, and enrollment carries a
//! signature over [`enroll_proof_message`]; together they stop a device from claiming
//! another device's id, with no per-device state on the gateway.

use sha2::{Digest, Sha256};

/// `dev-` followed by the first 16 bytes of SHA-256(public key) in lowercase hex.
#[must_use]
pub fn device_id_for(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    format!("dev-{}", hex::encode(&digest[..16]))
}

/// The bytes a device signs to enroll:
/// `edgewise-enroll-v1\n<device id>\n<proof time ms>\n<hex SHA-256 of the bootstrap token>`.
///
/// Binding the token's hash means a proof made for one fleet's token cannot be replayed
/// against another's, and the timestamp bounds replay in time.
#[must_use]
pub fn enroll_proof_message(
    device_id: &str,
    proof_time_unix_ms: i64,
    bootstrap_token: &str,
) -> Vec<u8> {
    let token_hash = hex::encode(Sha256::digest(bootstrap_token.as_bytes()));
    format!("edgewise-enroll-v1\n{device_id}\n{proof_time_unix_ms}\n{token_hash}").into_bytes()
}

/// The bytes a publisher signs for one artifact:
/// `edgewise-artifact-v1\n<model>\n<version>\n<variant>\n<lowercase hex SHA-256>`.
///
/// Binding the model, version and variant means a signed artifact cannot be replayed as
/// another version (an old, vulnerable build presented as the new one) or another model.
#[must_use]
pub fn artifact_signing_message(
    model: &str,
    version: &str,
    variant: &str,
    sha256: &str,
) -> Vec<u8> {
    format!(
        "edgewise-artifact-v1\n{model}\n{version}\n{variant}\n{}",
        sha256.to_ascii_lowercase()
    )
    .into_bytes()
}

/// Whether `signature` (base64) is `key`'s signature of this artifact as this model,
/// version and variant ([`artifact_signing_message`]). Used by agents before they store an
/// artifact and by the controller when it verifies a ModelVersion.
#[must_use]
pub fn artifact_signature_valid(
    key: &ed25519_dalek::VerifyingKey,
    (model, version, variant): (&str, &str, &str),
    sha256: &str,
    signature: &str,
) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .ok()
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
        .is_some_and(|sig| {
            let message = artifact_signing_message(model, version, variant, sha256);
            key.verify_strict(&message, &sig).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_stable_and_key_dependent() {
        let a = device_id_for(&[1; 32]);
        assert_eq!(a, device_id_for(&[1; 32]));
        assert_ne!(a, device_id_for(&[2; 32]));
        assert_eq!(a.len(), 4 + 32);
        assert!(a.starts_with("dev-"));
    }

    #[test]
    fn proof_message_binds_id_time_and_token() {
        let m = enroll_proof_message("dev-1", 42, "secret");
        assert!(m.starts_with(b"edgewise-enroll-v1\ndev-1\n42\n"));
        assert_ne!(m, enroll_proof_message("dev-1", 42, "other"));
        assert!(!String::from_utf8(m).expect("utf-8").contains("secret"));
    }
}
