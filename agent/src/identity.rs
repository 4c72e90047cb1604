//! The device's identity: an ed25519 key made on first start, the device id derived from
//! it, and the credential the gateway issued. Persisted under the data dir so a restarted
//! agent is the same device.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use edgewise_core::variant::DeviceFacts;
use edgewise_proto::fleet::{EnrollRequest, EnrollResponse};
use edgewise_proto::identity::{device_id_for, enroll_proof_message};
use serde::{Deserialize, Serialize};

use crate::fsutil::{atomic_write, read_json};
use crate::telemetry::now_unix_ms;

/// A credential and its expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Bearer token.
    pub token: String,
    /// Expiry, Unix ms.
    pub expires_at_unix_ms: i64,
    /// Server-side labels it carries.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it was received, Unix ms (0 in files written before this was kept).
    #[serde(default)]
    pub received_at_unix_ms: i64,
}

impl Credential {
    /// Whether it is still good for a call made now: not within a minute (a tenth of its
    /// lifetime, for short-lived ones) of its expiry, so no call fails at the edge.
    fn usable(&self, now_unix_ms: i64) -> bool {
        let lifetime = self.expires_at_unix_ms - self.received_at_unix_ms;
        let margin = (lifetime / 10).clamp(0, 60_000);
        self.expires_at_unix_ms - now_unix_ms > margin
    }
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    secret_key: String,
    device_id: String,
    #[serde(default)]
    credential: Option<Credential>,
}

/// The device's key, id and credential.
pub struct Identity {
    key: SigningKey,
    device_id: String,
    credential: Option<Credential>,
    path: Option<PathBuf>,
    durable: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Why the identity file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// I/O on the identity file.
    #[error("identity file: {0}")]
    Io(#[from] std::io::Error),
    /// The stored key is unusable.
    #[error("identity file {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Identity {
    /// A fresh identity kept in memory only (the simulator's devices).
    #[must_use]
    pub fn ephemeral() -> Self {
        Identity::from_key(SigningKey::from_bytes(&rand::random()), None, false)
    }

    fn from_key(key: SigningKey, path: Option<PathBuf>, durable: bool) -> Self {
        let device_id = device_id_for(key.verifying_key().as_bytes());
        Identity {
            key,
            device_id,
            credential: None,
            path,
            durable,
        }
    }

    /// Loads `<dir>/identity.json`, creating a new key on first start.
    ///
    /// # Errors
    /// [`IdentityError`] when the file is unreadable or corrupt.
    pub fn load_or_create(dir: &Path, durable: bool) -> Result<Self, IdentityError> {
        let path = dir.join("identity.json");
        match read_json::<IdentityFile>(&path)? {
            Some(file) => {
                let corrupt = |message: String| IdentityError::Corrupt {
                    path: path.clone(),
                    message,
                };
                let bytes: [u8; 32] = STANDARD
                    .decode(&file.secret_key)
                    .map_err(|e| corrupt(e.to_string()))?
                    .try_into()
                    .map_err(|_| corrupt("secret key is not 32 bytes".into()))?;
                let mut id =
                    Identity::from_key(SigningKey::from_bytes(&bytes), Some(path.clone()), durable);
                if id.device_id != file.device_id {
                    return Err(corrupt("device id does not match the key".into()));
                }
                id.credential = file.credential;
                Ok(id)
            }
            None => {
                let id = Identity::from_key(
                    SigningKey::from_bytes(&rand::random()),
                    Some(path),
                    durable,
                );
                id.save()?;
                Ok(id)
            }
        }
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = IdentityFile {
            secret_key: STANDARD.encode(self.key.to_bytes()),
            device_id: self.device_id.clone(),
            credential: self.credential.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        atomic_write(path, &bytes, self.durable)
    }

    /// The device id.
    #[must_use]
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The credential, if one is held and not about to expire.
    #[must_use]
    pub fn credential(&self) -> Option<&Credential> {
        self.credential.as_ref().filter(|c| c.usable(now_unix_ms()))
    }

    /// Forgets the credential (after the gateway refused it).
    ///
    /// # Errors
    /// When the identity file cannot be written.
    pub fn clear_credential(&mut self) -> std::io::Result<()> {
        self.credential = None;
        self.save()
    }

    /// Builds a signed enrollment request.
    #[must_use]
    pub fn enroll_request(
        &self,
        bootstrap_token: &str,
        facts: &DeviceFacts,
        self_labels: &BTreeMap<String, String>,
    ) -> EnrollRequest {
        let now = now_unix_ms();
        let message = enroll_proof_message(&self.device_id, now, bootstrap_token);
        EnrollRequest {
            bootstrap_token: bootstrap_token.to_owned(),
            device_id: self.device_id.clone(),
            facts: Some(facts.into()),
            self_labels: self_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
            public_key: self.key.verifying_key().to_bytes().to_vec(),
            proof_time_unix_ms: now,
            proof: self.key.sign(&message).to_bytes().to_vec(),
        }
    }

    /// Stores the gateway's answer.
    ///
    /// # Errors
    /// When the identity file cannot be written.
    pub fn set_credential(&mut self, response: EnrollResponse) -> std::io::Result<()> {
        self.credential = Some(Credential {
            token: response.credential,
            expires_at_unix_ms: response.expires_at_unix_ms,
            labels: response.labels.into_iter().collect(),
            received_at_unix_ms: now_unix_ms(),
        });
        self.save()
    }

    /// Replaces the credential with the fresh one the gateway sent over Sync (same device,
    /// same labels).
    ///
    /// # Errors
    /// When the identity file cannot be written.
    pub fn refresh_credential(
        &mut self,
        token: String,
        expires_at_unix_ms: i64,
    ) -> std::io::Result<()> {
        let labels = self
            .credential
            .as_ref()
            .map(|c| c.labels.clone())
            .unwrap_or_default();
        self.credential = Some(Credential {
            token,
            expires_at_unix_ms,
            labels,
            received_at_unix_ms: now_unix_ms(),
        });
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_given_up_a_tenth_of_its_life_early_at_most_a_minute() {
        let c = |received, expires| Credential {
            token: String::new(),
            expires_at_unix_ms: expires,
            labels: BTreeMap::new(),
            received_at_unix_ms: received,
        };
        // Seven days: a minute early.
        let week = 7 * 24 * 3_600_000;
        assert!(c(0, week).usable(week - 60_001));
        assert!(!c(0, week).usable(week - 60_000));
        // Six seconds: 0.6 s early, not a minute (it would never be used).
        assert!(c(0, 6_000).usable(5_399));
        assert!(!c(0, 6_000).usable(5_400));
        // Written before `received_at` was kept: a minute.
        assert!(!c(0, 6_000_000).usable(6_000_000 - 59_000));
    }

    #[test]
    fn identity_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path(), true).expect("creates");
        let again = Identity::load_or_create(dir.path(), true).expect("loads");
        assert_eq!(first.device_id(), again.device_id());
        assert_ne!(Identity::ephemeral().device_id(), first.device_id());
    }

    #[test]
    fn a_tampered_identity_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path(), false).expect("creates");
        let path = dir.path().join("identity.json");
        let text = std::fs::read_to_string(&path)
            .expect("reads")
            .replace("\"dev-", "\"dev-x");
        std::fs::write(&path, text).expect("writes");
        let err = Identity::load_or_create(dir.path(), false).expect_err("tampered");
        assert!(err.to_string().contains("does not match the key"), "{err}");
    }
}
