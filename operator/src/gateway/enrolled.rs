//! Which devices each capped bootstrap token has enrolled, so a token's `maxDevices` holds
//! across replicas and restarts. In a cluster the record is one ConfigMap per capped token
//! (`edgewise-enrolled-<token>`, key `devices`: one id per line) updated with optimistic
//! concurrency: two replicas admitting the last slot at once conflict on the
//! `resourceVersion`, and the loser reads again and finds the token full. Uncapped tokens
//! cost nothing: no object, no write.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use sha2::Digest;
use tonic::Status;

/// What admitting a device to a capped token does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Enrolled before: it keeps its slot.
    Known,
    /// A free slot, now taken.
    Added,
    /// No slot left.
    Full,
}

/// Claims a slot for `device` in `devices` (a token's enrolled set) under `max`.
#[must_use]
pub fn claim(devices: &mut BTreeSet<String>, device: &str, max: u32) -> Claim {
    if devices.contains(device) {
        Claim::Known
    } else if devices.len() >= usize::try_from(max).unwrap_or(usize::MAX) {
        Claim::Full
    } else {
        devices.insert(device.to_owned());
        Claim::Added
    }
}

/// Where the enrolled sets live.
#[derive(Debug)]
pub enum EnrolmentLedger {
    /// In this process: one replica (tests, the dev stack without a cluster).
    Local(Mutex<HashMap<String, BTreeSet<String>>>),
    /// ConfigMaps in the gateway's namespace, shared by every replica.
    Cluster(Box<Api<ConfigMap>>),
}

impl Default for EnrolmentLedger {
    fn default() -> Self {
        EnrolmentLedger::Local(Mutex::default())
    }
}

/// Conflicts tolerated before giving up: each round at least one contender wins, so this
/// bounds the replicas enrolling one token's devices at the same instant.
const ATTEMPTS: usize = 16;

impl EnrolmentLedger {
    /// Admits `device` to `token`, which enrols at most `max` devices.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the token is full; `UNAVAILABLE` when the cluster cannot
    /// be read or written.
    pub async fn admit(&self, token: &str, device: &str, max: u32) -> Result<(), Status> {
        match self {
            EnrolmentLedger::Local(sets) => {
                let mut sets = sets
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                verdict(
                    token,
                    max,
                    claim(sets.entry(token.to_owned()).or_default(), device, max),
                )
            }
            EnrolmentLedger::Cluster(api) => admit_in_cluster(api, token, device, max).await,
        }
    }
}

fn verdict(token: &str, max: u32, claim: Claim) -> Result<(), Status> {
    match claim {
        Claim::Known | Claim::Added => Ok(()),
        Claim::Full => Err(Status::resource_exhausted(format!(
            "bootstrap token {token} has enrolled its {max} devices (maxDevices); raise the cap or use another token"
        ))),
    }
}

/// The ConfigMap holding `token`'s enrolled devices: named for it, or for its digest when
/// the name would pass the 253-character limit.
#[must_use]
pub fn object_name(token: &str) -> String {
    let name = format!("edgewise-enrolled-{token}");
    if name.len() <= 253 {
        return name;
    }
    let digest = sha2::Sha256::digest(token.as_bytes());
    format!("edgewise-enrolled-{}", hex::encode(&digest[..16]))
}

fn devices_of(map: &ConfigMap) -> BTreeSet<String> {
    map.data
        .as_ref()
        .and_then(|d| d.get("devices"))
        .map(|d| d.lines().map(str::trim).filter(|l| !l.is_empty()))
        .into_iter()
        .flatten()
        .map(str::to_owned)
        .collect()
}

fn with_devices(mut map: ConfigMap, token: &str, devices: &BTreeSet<String>) -> ConfigMap {
    let data = map.data.get_or_insert_with(Default::default);
    data.insert("token".into(), token.to_owned());
    data.insert(
        "devices".into(),
        devices
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    map
}

fn unavailable(e: &kube::Error) -> Status {
    Status::unavailable(format!("enrolment record unavailable: {e}; retry"))
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

async fn admit_in_cluster(
    api: &Api<ConfigMap>,
    token: &str,
    device: &str,
    max: u32,
) -> Result<(), Status> {
    let name = object_name(token);
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(&name).await.map_err(|e| unavailable(&e))?;
        let (base, mut devices) = match existing {
            Some(map) => {
                let devices = devices_of(&map);
                (Some(map), devices)
            }
            None => (None, BTreeSet::new()),
        };
        let claimed = claim(&mut devices, device, max);
        if claimed != Claim::Added {
            return verdict(token, max, claimed);
        }
        let written = match base {
            // The object carries its resourceVersion: a concurrent write makes this a 409.
            Some(map) => {
                api.replace(
                    &name,
                    &PostParams::default(),
                    &with_devices(map, token, &devices),
                )
                .await
            }
            None => {
                let fresh = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..ObjectMeta::default()
                    },
                    ..ConfigMap::default()
                };
                api.create(
                    &PostParams::default(),
                    &with_devices(fresh, token, &devices),
                )
                .await
            }
        };
        match written {
            Ok(_) => return Ok(()),
            Err(e) if conflict(&e) => {}
            Err(e) => return Err(unavailable(&e)),
        }
    }
    Err(Status::unavailable(
        "enrolment record contended by other replicas; retry",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_admits_that_many_devices_and_the_same_device_again() {
        let mut set = BTreeSet::new();
        assert_eq!(claim(&mut set, "dev-a", 2), Claim::Added);
        assert_eq!(claim(&mut set, "dev-b", 2), Claim::Added);
        assert_eq!(claim(&mut set, "dev-c", 2), Claim::Full);
        assert_eq!(claim(&mut set, "dev-a", 2), Claim::Known, "re-enrolment");
        assert_eq!(claim(&mut BTreeSet::new(), "dev-a", 0), Claim::Full);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn long_token_names_still_make_valid_object_names() {
        assert_eq!(object_name("factory-eu"), "edgewise-enrolled-factory-eu");
        let long = "t".repeat(253);
        let name = object_name(&long);
        assert!(name.len() <= 253 && name.starts_with("edgewise-enrolled-"));
        assert_ne!(name, object_name(&"u".repeat(253)));
    }

    proptest::proptest! {
        /// Any sequence of enrolments against a model (a set per token): a device is
        /// admitted exactly when it was admitted before or its token has room, and no
        /// token ever holds more than its cap.
        #[test]
        fn any_sequence_of_enrolments_keeps_every_cap(
            cap in 0u32..5,
            attempts in proptest::collection::vec((0usize..3, 0usize..8), 0..60),
        ) {
            let mut sets: Vec<BTreeSet<String>> = vec![BTreeSet::new(); 3];
            let mut model: Vec<Vec<usize>> = vec![Vec::new(); 3];
            for (token, device) in attempts {
                let id = format!("dev-{device}");
                let known = model[token].contains(&device);
                let room = model[token].len() < cap as usize;
                let got = claim(&mut sets[token], &id, cap);
                let expected = if known {
                    Claim::Known
                } else if room {
                    model[token].push(device);
                    Claim::Added
                } else {
                    Claim::Full
                };
                proptest::prop_assert_eq!(got, expected);
                proptest::prop_assert!(sets[token].len() <= cap as usize);
                proptest::prop_assert_eq!(sets[token].len(), model[token].len());
            }
        }
    }

    #[tokio::test]
    async fn in_process_the_cap_holds_per_token() {
        let ledger = EnrolmentLedger::default();
        ledger.admit("a", "dev-1", 1).await.expect("first");
        ledger
            .admit("a", "dev-1", 1)
            .await
            .expect("same device again");
        let full = ledger.admit("a", "dev-2", 1).await.expect_err("full");
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(full.message().contains("maxDevices"), "{}", full.message());
        ledger.admit("b", "dev-2", 1).await.expect("another token");
    }
}
