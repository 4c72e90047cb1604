//! The routing policy the device runs: compiled on receipt, persisted when good, kept when
//! a new one is bad (the NACK carries the compiler's reasons).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use edgewise_core::policy::{CompiledPolicy, compile, policy_version, spec::RoutingPolicySpec};
use edgewise_proto::fleet::PolicyUpdate;
use serde::{Deserialize, Serialize};

use crate::fsutil::{atomic_write, read_json};

/// A policy in force.
#[derive(Debug)]
pub struct LoadedPolicy {
    /// Content hash.
    pub version: String,
    /// `namespace/name` of the RoutingPolicy.
    pub source: String,
    /// The compiled policy.
    pub compiled: CompiledPolicy,
}

#[derive(Serialize, Deserialize)]
struct PolicyFile {
    version: String,
    source: String,
    spec: RoutingPolicySpec,
}

/// The last good policy, shared by the sync client and the router.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    durable: bool,
    current: ArcSwapOption<LoadedPolicy>,
}

impl PolicyStore {
    /// In memory only.
    #[must_use]
    pub fn ephemeral() -> Self {
        PolicyStore {
            path: None,
            durable: false,
            current: ArcSwapOption::empty(),
        }
    }

    /// Loads the persisted policy, so an agent that starts offline routes at once.
    ///
    /// # Errors
    /// When the file is unreadable, or holds a policy that no longer compiles.
    pub fn load(path: &Path, durable: bool) -> std::io::Result<Self> {
        let store = PolicyStore {
            path: Some(path.to_owned()),
            durable,
            current: ArcSwapOption::empty(),
        };
        if let Some(file) = read_json::<PolicyFile>(path)? {
            let compiled = compile(&file.spec)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            store.current.store(Some(Arc::new(LoadedPolicy {
                version: file.version,
                source: file.source,
                compiled,
            })));
        }
        Ok(store)
    }

    /// The policy in force.
    #[must_use]
    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.current.load_full()
    }

    /// Its version.
    #[must_use]
    pub fn version(&self) -> Option<String> {
        self.current.load().as_ref().map(|p| p.version.clone())
    }

    /// Compiles, checks and installs an update.
    ///
    /// # Errors
    /// [`RejectedPolicy`], the NACK reason; the previous policy stays in force.
    pub fn apply(&self, update: &PolicyUpdate) -> Result<(), RejectedPolicy> {
        let spec: RoutingPolicySpec =
            serde_json::from_slice(&update.spec_json).map_err(RejectedPolicy::NotASpec)?;
        let compiled = compile(&spec)?;
        let computed = policy_version(&spec);
        if computed != update.version {
            return Err(RejectedPolicy::VersionMismatch {
                claimed: update.version.clone(),
                computed,
            });
        }
        if let Some(path) = &self.path {
            let file = PolicyFile {
                version: update.version.clone(),
                source: update.source.clone(),
                spec,
            };
            let bytes = serde_json::to_vec_pretty(&file).map_err(RejectedPolicy::NotASpec)?;
            atomic_write(path, &bytes, self.durable).map_err(RejectedPolicy::Persist)?;
        }
        self.current.store(Some(Arc::new(LoadedPolicy {
            version: update.version.clone(),
            source: update.source.clone(),
            compiled,
        })));
        Ok(())
    }
}

/// Why a policy update was NACKed; its text is the NACK reason the gateway records.
#[derive(Debug, thiserror::Error)]
pub enum RejectedPolicy {
    /// `spec_json` does not parse as a RoutingPolicy spec.
    #[error("spec_json is not a RoutingPolicy spec: {0}")]
    NotASpec(#[source] serde_json::Error),
    /// The spec parses but does not compile (the message names the field).
    #[error(transparent)]
    Invalid(#[from] edgewise_core::policy::PolicyError),
    /// The update's version is not the content hash of its spec.
    #[error("version {claimed:?} does not match the policy's content hash {computed:?}")]
    VersionMismatch {
        /// What the update said.
        claimed: String,
        /// The spec's content hash.
        computed: String,
    },
    /// The policy could not be kept on disk for the next start.
    #[error("persisting policy: {0}")]
    Persist(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(spec: serde_json::Value) -> PolicyUpdate {
        let parsed: RoutingPolicySpec = serde_json::from_value(spec.clone()).expect("spec");
        PolicyUpdate {
            nonce: "n".into(),
            version: policy_version(&parsed),
            source: "ns/p".into(),
            spec_json: serde_json::to_vec(&spec).expect("json"),
        }
    }

    fn good() -> serde_json::Value {
        serde_json::json!({"targets": [{"name": "dev", "device": {"model": "m"}}], "default": {"route": "dev"}})
    }

    #[test]
    fn a_bad_policy_is_refused_and_the_good_one_stays_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.json");
        let store = PolicyStore::load(&path, true).expect("loads");
        let first = update(good());
        store.apply(&first).expect("good policy applies");
        let mut bad = good();
        bad["default"]["route"] = "nowhere".into();
        let reason = store.apply(&update(bad)).expect_err("bad policy");
        assert!(
            reason
                .to_string()
                .contains("default.route: no target named \"nowhere\""),
            "{reason}"
        );
        assert_eq!(store.version(), Some(first.version.clone()));
        let reloaded = PolicyStore::load(&path, true).expect("reloads");
        assert_eq!(reloaded.version(), Some(first.version));
    }

    #[test]
    fn a_version_that_is_not_the_content_hash_is_refused() {
        let store = PolicyStore::ephemeral();
        let mut u = update(good());
        u.version = "0000".into();
        assert!(
            store
                .apply(&u)
                .expect_err("mismatch")
                .to_string()
                .contains("content hash")
        );
        assert!(store.current().is_none());
    }
}
