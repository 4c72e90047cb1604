//! Enrollment and device credentials.
//!
//! A credential is a JWT (`EdDSA`, with the signing key's `kid`) signed by a key of the
//! gateways' [`KeyRing`], so any replica, or anyone holding the published key set, verifies
//! any device with no shared state. It binds the device id (itself derived from the
//! device's public key) and carries the server-side labels from the bootstrap token's
//! binding; self-reported labels travel separately under the `self.` prefix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ed25519_dalek::{Signature, VerifyingKey};
use edgewise_proto::convert::{bounded, required};
use edgewise_proto::fleet::{EnrollRequest, EnrollResponse};
use edgewise_proto::identity::{device_id_for, enroll_proof_message};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::keys::KeyRing;

/// Enroll proofs older or newer than this are refused (replay window).
const PROOF_WINDOW_MS: i64 = 10 * 60 * 1000;
/// Most self-reported labels a device may send.
const MAX_SELF_LABELS: usize = 32;
/// Enrolment proofs remembered at once (64 bytes and a time each: ~10 MiB at most); past
/// it, enrolments wait for the window to pass.
const MAX_REMEMBERED_PROOFS: usize = 100_000;
/// Shortest bootstrap token accepted: 16 bytes. A shorter one (an empty Secret key, a
/// typo'd password) is guessable, so it enrols nobody.
pub const MIN_BOOTSTRAP_TOKEN_BYTES: usize = 16;
/// Prefix that marks self-reported labels in selectors.
pub const SELF_LABEL_PREFIX: &str = "self.";

/// A bootstrap token and the server-side labels its devices get.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapToken {
    /// Name, recorded in credentials so a token can be revoked with all its devices.
    pub name: String,
    /// The secret devices present.
    pub token: String,
    /// Labels every device enrolled with this token gets.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// After this moment the token enrols nobody (devices it enrolled keep their
    /// credentials). `None`: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<jiff::Timestamp>,
    /// At most this many devices enrol with it, counted across replicas and restarts by the
    /// gateway's [`super::enrolled::EnrolmentLedger`]; a device enrolling again counts
    /// once. `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
}

/// An enrolment whose token, proof and facts checked out, not yet signed.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// The token it used.
    pub token: BootstrapToken,
    claims: DeviceClaims,
}

impl Admitted {
    /// The enrolling device.
    #[must_use]
    pub fn device_id(&self) -> &str {
        &self.claims.sub
    }
}

/// What a verified credential says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClaims {
    /// Device id.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Bootstrap token name.
    pub tok: String,
    /// Server-side labels.
    #[serde(default)]
    pub lbl: BTreeMap<String, String>,
    /// Self-reported labels (already prefixed with `self.`).
    #[serde(default)]
    pub slf: BTreeMap<String, String>,
}

impl DeviceClaims {
    /// Labels selectors match against: server-side labels and `self.`-prefixed ones.
    #[must_use]
    pub fn targeting_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.lbl.clone();
        labels.extend(self.slf.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels
    }
}

/// Issues and verifies credentials.
pub struct Authority {
    keys: ArcSwap<KeyRing>,
    validation: Validation,
    ttl: Duration,
    tokens: RwLock<Vec<([u8; 32], BootstrapToken)>>,
    revoked_devices: RwLock<HashSet<String>>,
    revoked_tokens: RwLock<HashSet<String>>,
    /// Enrolment proofs seen within their window, with their times.
    seen_proofs: std::sync::Mutex<HashMap<[u8; 64], i64>>,
    /// Bumped when keys or revocations change: open streams re-check their device.
    changes: tokio::sync::watch::Sender<u64>,
}

/// A verified credential: what it says, and the key that signed it.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Its claims.
    pub claims: DeviceClaims,
    /// The `kid` of its signing key.
    pub kid: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("ttl", &self.ttl)
            .field("keys", &self.keys.load())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Authority {
    /// An authority signing with `keys` (the same ring on every replica) and issuing
    /// credentials valid for `ttl`.
    #[must_use]
    pub fn new(keys: KeyRing, ttl: Duration) -> Self {
        // EdDSA only: a token naming another algorithm (`none`, HS256 with the public key
        // as secret) is refused before any key is tried.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authority {
            keys: ArcSwap::from_pointee(keys),
            validation,
            ttl,
            tokens: RwLock::new(Vec::new()),
            revoked_devices: RwLock::new(HashSet::new()),
            revoked_tokens: RwLock::new(HashSet::new()),
            seen_proofs: std::sync::Mutex::new(HashMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// How long credentials are issued for.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Notified when the keys or the revocations change.
    #[must_use]
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether credentials of `device_id` (enrolled through token `token_name`) are refused.
    #[must_use]
    pub fn is_revoked(&self, device_id: &str, token_name: &str) -> bool {
        self.revoked_devices
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(device_id)
            || self
                .revoked_tokens
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(token_name)
    }

    /// A fresh credential with the same device, token and labels as `claims`, valid for the
    /// ttl from now and signed with the current signing key.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the device or its token was revoked.
    pub fn reissue(&self, claims: &DeviceClaims) -> Result<(String, DeviceClaims), Status> {
        if self.is_revoked(&claims.sub, &claims.tok) {
            return Err(Status::unauthenticated("credential revoked"));
        }
        let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let fresh = DeviceClaims {
            iat: now,
            exp: now + self.ttl.as_secs(),
            ..claims.clone()
        };
        let credential = self
            .sign(&fresh)
            .map_err(|e| Status::internal(format!("signing credential: {e}")))?;
        Ok((credential, fresh))
    }

    /// Replaces the key ring (a rotation step): credentials are signed with its signing key
    /// from now on and verified by any of its keys.
    pub fn set_keys(&self, keys: KeyRing) {
        let (old, new) = (self.keys.load().kids().join(","), keys.kids().join(","));
        if old != new {
            tracing::info!(signing = keys.signing_kid(), accepted = %new, "credential keys changed");
        }
        self.keys.store(std::sync::Arc::new(keys));
        self.changed();
    }

    /// The ring in force: its public half is the published key set.
    #[must_use]
    pub fn keys(&self) -> std::sync::Arc<KeyRing> {
        self.keys.load_full()
    }

    /// Replaces the accepted bootstrap tokens.
    pub fn set_bootstrap_tokens(&self, tokens: Vec<BootstrapToken>) {
        let hashed = tokens
            .into_iter()
            .filter(|t| {
                let long_enough = t.token.len() >= MIN_BOOTSTRAP_TOKEN_BYTES;
                if !long_enough {
                    tracing::warn!(token = %t.name, bytes = t.token.len(), "bootstrap token shorter than {MIN_BOOTSTRAP_TOKEN_BYTES} bytes; it enrols nobody");
                }
                long_enough
            })
            .map(|t| (Sha256::digest(t.token.as_bytes()).into(), t))
            .collect();
        *self
            .tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hashed;
    }

    /// Replaces the revoked devices and tokens with the cluster's list of them.
    pub fn set_revocations(&self, devices: HashSet<String>, tokens: HashSet<String>) {
        let same = *self
            .revoked_devices
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == devices
            && *self
                .revoked_tokens
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                == tokens;
        if same {
            return;
        }
        *self
            .revoked_devices
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = devices;
        *self
            .revoked_tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokens;
        self.changed();
    }

    /// Revokes one device's credentials (it must not re-enroll either).
    pub fn revoke_device(&self, device_id: &str) {
        self.revoked_devices
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(device_id.to_owned());
        self.changed();
    }

    /// Revokes a bootstrap token and every credential issued through it.
    pub fn revoke_token(&self, name: &str) {
        self.revoked_tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned());
        self.changed();
    }

    /// Checks a bootstrap token, the device's proof of key possession and its facts, and
    /// issues a credential: [`Authority::admit`] then [`Authority::issue`], for callers with
    /// no device cap to check in between.
    ///
    /// # Errors
    /// As [`Authority::admit`].
    pub fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, Status> {
        self.issue(self.admit(req)?)
    }

    /// Checks a bootstrap token, the device's proof of key possession and its facts: the
    /// enrolment, not yet signed.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for an unknown or revoked token or a failed proof,
    /// `INVALID_ARGUMENT` naming the field for malformed input.
    pub fn admit(&self, req: &EnrollRequest) -> Result<Admitted, Status> {
        // An empty token is a malformed request, not an unknown token.
        required("bootstrap_token", &req.bootstrap_token).map_err(invalid)?;
        let token = self.match_token(&req.bootstrap_token)?;
        let device_id = required("device_id", &req.device_id).map_err(invalid)?;
        let public_key: [u8; 32] = req
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("public_key must be 32 bytes (ed25519)"))?;
        if device_id_for(&public_key) != device_id {
            return Err(Status::invalid_argument(
                "device_id must be derived from public_key (dev- + hex of the first 16 bytes of its SHA-256)",
            ));
        }
        // abs_diff: a proof time near i64::MIN must not overflow a subtraction.
        if now_ms().abs_diff(req.proof_time_unix_ms) > PROOF_WINDOW_MS.unsigned_abs() {
            return Err(Status::unauthenticated(
                "proof_time_unix_ms is more than 10 minutes from the gateway's clock",
            ));
        }
        let key = VerifyingKey::from_bytes(&public_key)
            .map_err(|_| Status::invalid_argument("public_key is not a valid ed25519 key"))?;
        let proof = Signature::from_slice(&req.proof)
            .map_err(|_| Status::invalid_argument("proof must be 64 bytes"))?;
        let message = enroll_proof_message(device_id, req.proof_time_unix_ms, &req.bootstrap_token);
        key.verify_strict(&message, &proof)
            .map_err(|_| Status::unauthenticated("proof of key possession failed"))?;
        // A proof is good once: replayed within its window (by whoever saw it), it is
        // refused, so a captured request cannot mint a second credential. Remembered by
        // this replica for the window; an agent's retry signs a new time.
        self.first_use(&proof.to_bytes(), req.proof_time_unix_ms)?;
        let facts = req
            .facts
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("facts is required"))?;
        edgewise_core::variant::DeviceFacts::try_from(facts).map_err(invalid)?;
        if self.is_revoked(device_id, &token.name) {
            return Err(Status::unauthenticated("device is revoked"));
        }
        if req.self_labels.len() > MAX_SELF_LABELS {
            return Err(Status::invalid_argument(format!(
                "self_labels has {} entries; at most {MAX_SELF_LABELS}",
                req.self_labels.len()
            )));
        }
        let mut slf = BTreeMap::new();
        for (k, v) in &req.self_labels {
            bounded("self_labels key", k).map_err(invalid)?;
            bounded("self_labels value", v).map_err(invalid)?;
            slf.insert(format!("{SELF_LABEL_PREFIX}{k}"), v.clone());
        }
        let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let claims = DeviceClaims {
            sub: device_id.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            tok: token.name.clone(),
            lbl: token.labels.clone(),
            slf,
        };
        Ok(Admitted { token, claims })
    }

    /// Signs an admitted enrolment's credential.
    ///
    /// # Errors
    /// `INTERNAL` when signing fails.
    pub fn issue(&self, admitted: Admitted) -> Result<EnrollResponse, Status> {
        let Admitted { claims, .. } = admitted;
        let device_id = claims.sub.as_str();
        let credential = self
            .sign(&claims)
            .map_err(|e| Status::internal(format!("signing credential: {e}")))?;
        Ok(EnrollResponse {
            device_id: device_id.to_owned(),
            credential,
            expires_at_unix_ms: i64::try_from(claims.exp)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000),
            labels: claims.lbl.into_iter().collect(),
        })
    }

    fn first_use(&self, proof: &[u8; 64], proof_time_ms: i64) -> Result<(), Status> {
        let now = now_ms();
        let mut seen = self
            .seen_proofs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= MAX_REMEMBERED_PROOFS {
            seen.retain(|_, t| now.abs_diff(*t) <= PROOF_WINDOW_MS.unsigned_abs());
        }
        if seen.len() >= MAX_REMEMBERED_PROOFS {
            return Err(Status::resource_exhausted(
                "too many enrolments in the proof window; retry later",
            ));
        }
        if seen.insert(*proof, proof_time_ms).is_some() {
            return Err(Status::unauthenticated(
                "this enrolment proof was already used: sign a new one",
            ));
        }
        Ok(())
    }

    fn match_token(&self, presented: &str) -> Result<BootstrapToken, Status> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let token = tokens
            .iter()
            .find(|(d, _)| *d == digest)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))?;
        drop(tokens);
        if self
            .revoked_tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&token.name)
        {
            return Err(Status::unauthenticated("bootstrap token is revoked"));
        }
        if let Some(at) = token.expires_at.filter(|at| *at <= jiff::Timestamp::now()) {
            return Err(Status::unauthenticated(format!(
                "bootstrap token {} expired at {at}",
                token.name
            )));
        }
        Ok(token)
    }

    /// Verifies the `authorization: Bearer <credential>` metadata.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` saying why: missing, malformed, forged, expired or revoked.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<DeviceClaims, Status> {
        self.verify_signed(metadata).map(|v| v.claims)
    }

    /// [`Authority::verify`], also naming the key that signed the credential.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` saying why.
    pub fn verify_signed(&self, metadata: &MetadataMap) -> Result<Verified, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated("missing authorization metadata (Bearer credential)")
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            Status::unauthenticated("authorization must be `Bearer <credential>`")
        })?;
        self.verify_token(token)
    }

    /// Verifies a credential string.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` saying why.
    pub fn verify_credential(&self, credential: &str) -> Result<DeviceClaims, Status> {
        self.verify_token(credential).map(|v| v.claims)
    }

    fn verify_token(&self, credential: &str) -> Result<Verified, Status> {
        let header = jsonwebtoken::decode_header(credential)
            .map_err(|e| Status::unauthenticated(format!("credential rejected: {e}")))?;
        let keys = self.keys.load();
        let kid = header.kid.unwrap_or_default();
        let key = keys.verifier(&kid).ok_or_else(|| {
            Status::unauthenticated(format!(
                "credential signed by a key this gateway does not hold (kid {kid:?}); re-enroll"
            ))
        })?;
        let data = jsonwebtoken::decode::<DeviceClaims>(credential, key, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    Status::unauthenticated("credential expired; re-enroll")
                }
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    Status::unauthenticated("credential signature is invalid")
                }
                _ => Status::unauthenticated(format!("credential rejected: {e}")),
            })?;
        if self.is_revoked(&data.claims.sub, &data.claims.tok) {
            return Err(Status::unauthenticated("credential revoked"));
        }
        Ok(Verified {
            claims: data.claims,
            kid,
        })
    }

    /// Signs claims with the ring's signing key, naming it in `kid` (also used by tests of
    /// expiry and forgery).
    ///
    /// # Errors
    /// Only if serialisation fails.
    pub fn sign(&self, claims: &DeviceClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let keys = self.keys.load();
        let (kid, key) = keys.signer();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, key)
    }
}

fn invalid(e: edgewise_proto::convert::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A rotation schedule for keys 0 → 1 → 2, as the ring each step leaves: stage the new
    /// key (verify only), promote it (it signs, the old one verifies), retire the old one.
    fn schedule() -> Vec<KeyRing> {
        let k = |i: u8| [i + 1; 32];
        let mut rings = vec![KeyRing::new(&k(0), &[])];
        for (old, new) in [(0, 1), (1, 2)] {
            rings.push(KeyRing::new(&k(old), &[k(new)]));
            rings.push(KeyRing::new(&k(new), &[k(old)]));
            rings.push(KeyRing::new(&k(new), &[]));
        }
        rings
    }

    fn claims() -> DeviceClaims {
        DeviceClaims {
            sub: "dev-1".into(),
            iat: 0,
            exp: u64::MAX / 2,
            tok: "t".into(),
            lbl: BTreeMap::new(),
            slf: BTreeMap::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Replicas take the schedule's steps at their own moments, the operator taking a
        /// step only once every replica has the previous one (a Secret update reaching each
        /// pod): whatever the interleaving, a credential any replica issues verifies on every
        /// replica.
        #[test]
        fn every_replica_accepts_what_any_replica_issues_during_a_rotation(
            moves in proptest::collection::vec(0usize..3, 1..40)
        ) {
            let rings = schedule();
            let replicas: Vec<Authority> =
                (0..3).map(|_| Authority::new(rings[0].clone(), Duration::from_secs(60))).collect();
            let mut step = [0usize; 3];
            for r in moves {
                let slowest = *step.iter().min().unwrap_or(&0);
                if step[r] == slowest && step[r] + 1 < rings.len() {
                    step[r] += 1;
                    replicas[r].set_keys(rings[step[r]].clone());
                }
                for issuer in &replicas {
                    let token = issuer.sign(&claims()).expect("signs");
                    for verifier in &replicas {
                        prop_assert!(verifier.verify_credential(&token).is_ok(), "steps {step:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn promoting_a_key_no_replica_has_staged_cuts_devices_off() {
        let rings = schedule();
        let (a, b) = (
            Authority::new(rings[0].clone(), Duration::from_secs(60)),
            Authority::new(rings[0].clone(), Duration::from_secs(60)),
        );
        // Straight to "new key signs" on one replica, skipping the staging step.
        a.set_keys(rings[2].clone());
        let token = a.sign(&claims()).expect("signs");
        let refused = b.verify_credential(&token).expect_err("unknown key");
        assert!(refused.message().contains("does not hold"), "{refused:?}");
    }

    #[test]
    fn reissue_keeps_the_device_and_labels_and_refuses_the_revoked() {
        let auth = Authority::new(schedule()[0].clone(), Duration::from_secs(60));
        let mut old = claims();
        old.lbl.insert("tier".into(), "gold".into());
        let (token, fresh) = auth.reissue(&old).expect("reissued");
        assert_eq!(auth.verify_credential(&token).expect("valid"), fresh);
        assert_eq!((fresh.sub.as_str(), &fresh.lbl), ("dev-1", &old.lbl));
        assert_eq!(fresh.exp - fresh.iat, 60);
        let changes = auth.changes();
        auth.revoke_token("t");
        assert!(changes.has_changed().expect("open"), "streams are told");
        assert_eq!(
            auth.reissue(&old).expect_err("revoked").code(),
            tonic::Code::Unauthenticated
        );
    }
}
