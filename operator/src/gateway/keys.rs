//! The keys that sign and verify device credentials: Ed25519 (JWT `EdDSA`), each named by
//! its RFC 7638 thumbprint (`kid`), published as a JWK set so any replica, and a company's
//! own cloud inference gateway, can verify a device with the public half alone.
//!
//! A ring has one signing key and any number of keys that only verify, which is what a
//! rotation needs: a new key is first added (every replica verifies it), then made the
//! signer, and the old one removed once the credentials it signed have expired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{DecodingKey, EncodingKey};
use tokio_util::sync::CancellationToken;

/// The entry of a key Secret (or directory) that names the signing key.
pub const ACTIVE_ENTRY: &str = "active";
/// How the entries holding keys end: `<name>.key`, base64 of a 32-byte Ed25519 seed.
pub const KEY_SUFFIX: &str = ".key";

/// What is wrong with a key set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// An entry is not a key.
    #[error("{entry}: {problem}")]
    Entry {
        /// The entry (file or Secret key).
        entry: String,
        /// What is wrong.
        problem: String,
    },
    /// No key, or no way to tell which one signs.
    #[error("{0}")]
    Signer(String),
}

/// One key of the ring.
#[derive(Clone)]
struct RingKey {
    kid: String,
    /// Present on the signing key only.
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    jwk: Jwk,
}

/// The keys a gateway signs with and accepts.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<RingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("signing", &self.signing_kid())
            .field("kids", &self.kids())
            .finish()
    }
}

/// The public JWK of an Ed25519 key, its `kid` the key's RFC 7638 SHA-256 thumbprint.
fn public_jwk(key: &SigningKey) -> Jwk {
    let mut jwk = Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::EdDSA),
            ..CommonParameters::default()
        },
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        }),
    };
    jwk.common.key_id = Some(jwk.thumbprint(ThumbprintHash::SHA256));
    jwk
}

fn ring_key(seed: &[u8; 32], signs: bool) -> RingKey {
    let key = SigningKey::from_bytes(seed);
    let jwk = public_jwk(&key);
    let encoding = signs.then(|| {
        // jsonwebtoken's EdDSA signer takes PKCS#8; a seed always encodes.
        let der = key
            .to_pkcs8_der()
            .expect("an ed25519 seed encodes as PKCS#8");
        EncodingKey::from_ed_der(der.as_bytes())
    });
    RingKey {
        kid: jwk.common.key_id.clone().unwrap_or_default(),
        encoding,
        decoding: DecodingKey::from_ed_der(key.verifying_key().as_bytes()),
        jwk,
    }
}

/// Reads a key entry: base64 of a 32-byte seed (`head -c 32 /dev/urandom | base64`).
///
/// # Errors
/// [`KeyError::Entry`] naming `entry`.
pub fn parse_seed(entry: &str, text: &[u8]) -> Result<[u8; 32], KeyError> {
    let problem = |problem: String| KeyError::Entry {
        entry: entry.to_owned(),
        problem,
    };
    let text = std::str::from_utf8(text).map_err(|_| problem("not text".into()))?;
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| problem(format!("not base64: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| problem(format!("{} bytes; an Ed25519 seed has 32", b.len())))
}

impl KeyRing {
    /// A ring signing with `signing` and also accepting `also`.
    #[must_use]
    pub fn new(signing: &[u8; 32], also: &[[u8; 32]]) -> Self {
        let mut keys = vec![ring_key(signing, true)];
        for seed in also {
            let k = ring_key(seed, false);
            if keys.iter().all(|have| have.kid != k.kid) {
                keys.push(k);
            }
        }
        KeyRing { keys }
    }

    /// The ring a key Secret (or a directory of its files) holds: `<name>.key` entries, and
    /// `active` naming the one that signs (`<name>`); with a single key, `active` may be left
    /// out. Other entries are ignored.
    ///
    /// # Errors
    /// [`KeyError`] naming the entry at fault; a ring is all good or not taken at all.
    pub fn from_entries(entries: &BTreeMap<String, Vec<u8>>) -> Result<Self, KeyError> {
        let mut seeds = BTreeMap::new();
        for (name, value) in entries {
            if let Some(stem) = name.strip_suffix(KEY_SUFFIX) {
                seeds.insert(stem.to_owned(), parse_seed(name, value)?);
            }
        }
        let active = match entries.get(ACTIVE_ENTRY) {
            Some(v) => {
                let name = String::from_utf8_lossy(v).trim().to_owned();
                let name = name.strip_suffix(KEY_SUFFIX).unwrap_or(&name).to_owned();
                if !seeds.contains_key(&name) {
                    return Err(KeyError::Signer(format!(
                        "`{ACTIVE_ENTRY}` names {name:?}, but there is no {name}{KEY_SUFFIX}"
                    )));
                }
                name
            }
            None if seeds.len() == 1 => seeds.keys().next().cloned().unwrap_or_default(),
            None if seeds.is_empty() => {
                return Err(KeyError::Signer(format!(
                    "no <name>{KEY_SUFFIX} entry: there is no key to sign credentials with"
                )));
            }
            None => {
                return Err(KeyError::Signer(format!(
                    "{} keys and no `{ACTIVE_ENTRY}` entry naming the one that signs",
                    seeds.len()
                )));
            }
        };
        let signing = seeds.remove(&active).unwrap_or_default();
        let others: Vec<[u8; 32]> = seeds.into_values().collect();
        Ok(KeyRing::new(&signing, &others))
    }

    /// The `kid` credentials are signed with now.
    #[must_use]
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].kid
    }

    /// Every `kid` accepted, the signing one first.
    #[must_use]
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// The signing key and its `kid`.
    pub(crate) fn signer(&self) -> (&str, &EncodingKey) {
        let k = &self.keys[0];
        (
            &k.kid,
            k.encoding.as_ref().expect("the first key of a ring signs"),
        )
    }

    /// The key named `kid`, if the ring accepts it.
    pub(crate) fn verifier(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.iter().find(|k| k.kid == kid).map(|k| &k.decoding)
    }

    /// The public keys, as served at `/.well-known/jwks.json`.
    #[must_use]
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys.iter().map(|k| k.jwk.clone()).collect(),
        }
    }
}

/// The entries of a key directory (a mounted Secret): its regular files by name, skipping
/// the dot-entries Kubernetes keeps its atomic-update links in.
///
/// # Errors
/// The directory cannot be read.
pub fn read_dir_entries(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut entries = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // `metadata` follows the Secret mount's symlinks to the file.
        if name.starts_with('.') || !std::fs::metadata(entry.path())?.is_file() {
            continue;
        }
        entries.insert(name, std::fs::read(entry.path())?);
    }
    Ok(entries)
}

/// The ring in `dir`, or why not, naming the directory.
///
/// # Errors
/// A message saying what is wrong.
pub fn load_dir(dir: &Path) -> Result<KeyRing, String> {
    let entries = read_dir_entries(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    KeyRing::from_entries(&entries).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Re-reads `dir` every `every` until `shutdown`, handing each changed, valid ring to
/// `apply`; a ring that does not load is logged once and the one in force stays, as with
/// the TLS files (a Secret update lands file by file).
pub async fn watch_dir(
    dir: PathBuf,
    every: Duration,
    mut apply: impl FnMut(KeyRing) + Send,
    shutdown: CancellationToken,
) {
    let mut last: Option<Result<Vec<String>, String>> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let loaded = load_dir(&dir);
        let seen = loaded
            .as_ref()
            .map(|r| r.kids().into_iter().map(str::to_owned).collect())
            .map_err(Clone::clone);
        if last.as_ref() == Some(&seen) {
            continue;
        }
        match loaded {
            Ok(ring) => apply(ring),
            Err(e) => {
                tracing::warn!(error = %e, "credential keys did not load; the keys in force stay")
            }
        }
        last = Some(seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn seed_b64(b: u8) -> String {
        STANDARD.encode([b; 32])
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint_of_the_public_key() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .expect("test data")
            .try_into()
            .expect("test data");
        let ring = KeyRing::new(&seed, &[]);
        assert_eq!(
            ring.signing_kid(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        let jwks = serde_json::to_value(ring.jwks()).expect("test data");
        assert_eq!(jwks["keys"][0]["kty"], "OKP");
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
        assert_eq!(
            jwks["keys"][0]["x"],
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
        assert!(jwks["keys"][0].get("d").is_none(), "never the private half");
    }

    #[test]
    fn a_single_key_signs_and_several_need_active() {
        let one = KeyRing::from_entries(&entries(&[("a.key", &seed_b64(1))])).expect("test data");
        assert_eq!(one.kids().len(), 1);
        let two = entries(&[("a.key", &seed_b64(1)), ("b.key", &seed_b64(2))]);
        assert!(matches!(
            KeyRing::from_entries(&two),
            Err(KeyError::Signer(m)) if m.contains("active")
        ));
        let mut chosen = two.clone();
        chosen.insert("active".into(), b"b\n".to_vec());
        let ring = KeyRing::from_entries(&chosen).expect("test data");
        assert_eq!(
            ring.signing_kid(),
            KeyRing::new(&[2; 32], &[]).signing_kid()
        );
        assert_eq!(ring.kids().len(), 2);
        chosen.insert("active".into(), b"c".to_vec());
        assert!(matches!(
            KeyRing::from_entries(&chosen),
            Err(KeyError::Signer(m)) if m.contains("no c.key")
        ));
    }

    #[test]
    fn a_bad_entry_is_named_and_nothing_is_taken() {
        for bad in ["not base64!", &STANDARD.encode([1; 16])] {
            let e = KeyRing::from_entries(&entries(&[("a.key", &seed_b64(1)), ("b.key", bad)]))
                .expect_err("refused");
            assert!(
                matches!(&e, KeyError::Entry { entry, .. } if entry == "b.key"),
                "{e}"
            );
        }
        assert!(KeyRing::from_entries(&entries(&[("README", "x")])).is_err());
    }
}
