//! The desired state the gateway pushes: ModelVersions, ModelRollouts and RoutingPolicies
//! held in memory, fed by kube-rs reflectors in a cluster and set directly in tests.
//!
//! Every change bumps an epoch and records its scope (which selectors or which model it
//! touches) in a short change log, so each Sync session can tell in microseconds whether a
//! change affects its device and recompute only then.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use edgewise_core::policy::policy_version;
use edgewise_core::selector::DeviceSelector;
use kube::ResourceExt;
use tokio::sync::watch;

use crate::crd::{ModelRollout, ModelVersion, ModelVersionPhase, RoutingPolicy};

/// `(namespace, name)` of an object.
pub type ObjectKey = (String, String);

/// Changes kept for sessions that lag behind; older ones force a full recompute.
const CHANGE_LOG: usize = 1024;

/// What a change can affect.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    /// Devices matched by any of these selectors (a rollout's or a policy's, before and
    /// after the change).
    Selectors(Vec<DeviceSelector>),
    /// Devices with a rollout of this model.
    Model(String),
}

/// A RoutingPolicy with its wire form computed once.
#[derive(Clone, Debug)]
pub struct PolicyEntry {
    /// The object.
    pub object: Arc<RoutingPolicy>,
    /// Content hash of the spec (`status.version`).
    pub version: String,
    /// Canonical JSON of the spec: the `PolicyUpdate` payload.
    pub spec_json: bytes::Bytes,
}

/// One consistent view of the desired state.
#[derive(Clone, Debug, Default)]
pub struct FleetSnapshot {
    /// ModelVersions by key.
    pub model_versions: BTreeMap<ObjectKey, Arc<ModelVersion>>,
    /// ModelRollouts by key.
    pub rollouts: BTreeMap<ObjectKey, Arc<ModelRollout>>,
    /// RoutingPolicies by key.
    pub policies: BTreeMap<ObjectKey, PolicyEntry>,
    epoch: u64,
    changes: VecDeque<(u64, Scope)>,
}

impl FleetSnapshot {
    /// Monotonic change counter.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Scopes of the changes after `since`, or `None` when the log no longer reaches back
    /// that far (the caller must assume everything changed).
    #[must_use]
    pub fn changes_since(&self, since: u64) -> Option<impl Iterator<Item = &Scope>> {
        let oldest = self.changes.front().map_or(self.epoch + 1, |(e, _)| *e);
        (since >= self.epoch || since + 1 >= oldest).then(|| {
            self.changes
                .iter()
                .filter(move |(e, _)| *e > since)
                .map(|(_, s)| s)
        })
    }

    fn record(&mut self, scope: Scope) {
        self.epoch += 1;
        self.changes.push_back((self.epoch, scope));
        while self.changes.len() > CHANGE_LOG {
            self.changes.pop_front();
        }
    }

    /// Whether any rollout of `model` selects a device with `labels`.
    #[must_use]
    pub fn has_rollout_for(&self, model: &str, labels: &BTreeMap<String, String>) -> bool {
        self.rollouts
            .values()
            .any(|r| r.spec.model == model && r.spec.selector.matches(labels))
    }
}

/// A change to the desired state.
// Each change is moved once, into the snapshot's `Arc`; boxing the large variants would
// only add an allocation per change.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Change {
    /// A ModelVersion was created or updated.
    ApplyVersion(ModelVersion),
    /// A ModelVersion was deleted.
    DeleteVersion(ObjectKey),
    /// A ModelRollout was created or updated.
    ApplyRollout(ModelRollout),
    /// A ModelRollout was deleted.
    DeleteRollout(ObjectKey),
    /// A RoutingPolicy was created or updated.
    ApplyPolicy(RoutingPolicy),
    /// A RoutingPolicy was deleted.
    DeletePolicy(ObjectKey),
}

/// Publishes snapshots to every session.
#[derive(Debug)]
pub struct Snapshots {
    tx: watch::Sender<Arc<FleetSnapshot>>,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            tx: watch::Sender::new(Arc::new(FleetSnapshot::default())),
        }
    }
}

fn key_of<K: ResourceExt>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The parts of a rollout that change what devices get.
fn rollout_effect(r: &ModelRollout) -> impl PartialEq + '_ {
    let state = r.status.as_ref().map(|s| {
        (
            &s.state.stable_version,
            &s.state.canary_version,
            s.state.percent,
        )
    });
    (
        &r.spec.model,
        &r.spec.selector,
        state,
        r.metadata.creation_timestamp.as_ref(),
    )
}

/// The parts of a version that change what devices get.
fn version_effect(v: &ModelVersion) -> impl PartialEq + '_ {
    let ready = v.status.as_ref().and_then(|s| s.phase) == Some(ModelVersionPhase::Ready);
    (&v.spec, ready)
}

impl Snapshots {
    /// A receiver that sees every new snapshot (coalesced to the latest).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetSnapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    #[must_use]
    pub fn current(&self) -> Arc<FleetSnapshot> {
        self.tx.borrow().clone()
    }

    /// Applies changes as one new snapshot; changes with no effect on devices (status
    /// counters, annotations) publish nothing.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) {
        self.tx.send_if_modified(|current| {
            let mut next = FleetSnapshot::clone(current);
            let before = next.epoch;
            for change in changes {
                apply_one(&mut next, change);
            }
            let modified = next.epoch != before;
            if modified {
                *current = Arc::new(next);
            }
            modified
        });
    }
}

fn apply_one(s: &mut FleetSnapshot, change: Change) {
    match change {
        Change::ApplyVersion(v) => {
            let key = key_of(&v);
            let unchanged = s
                .model_versions
                .get(&key)
                .is_some_and(|old| version_effect(old) == version_effect(&v));
            let model = v.spec.model.clone();
            s.model_versions.insert(key, Arc::new(v));
            if !unchanged {
                s.record(Scope::Model(model));
            }
        }
        Change::DeleteVersion(key) => {
            if let Some(old) = s.model_versions.remove(&key) {
                s.record(Scope::Model(old.spec.model.clone()));
            }
        }
        Change::ApplyRollout(r) => {
            let key = key_of(&r);
            let old = s.rollouts.get(&key).cloned();
            if old
                .as_deref()
                .is_some_and(|o| rollout_effect(o) == rollout_effect(&r))
            {
                s.rollouts.insert(key, Arc::new(r));
                return;
            }
            let mut selectors = vec![r.spec.selector.clone()];
            selectors.extend(old.map(|o| o.spec.selector.clone()));
            s.rollouts.insert(key, Arc::new(r));
            s.record(Scope::Selectors(selectors));
        }
        Change::DeleteRollout(key) => {
            if let Some(old) = s.rollouts.remove(&key) {
                s.record(Scope::Selectors(vec![old.spec.selector.clone()]));
            }
        }
        Change::ApplyPolicy(p) => {
            let key = key_of(&p);
            // What the controller marks Accepted=False is never pushed: devices keep the
            // last accepted version of this policy (or whatever else selects them).
            if let Err(e) = edgewise_core::policy::compile(&p.spec.policy) {
                tracing::warn!(namespace = %key.0, policy = %key.1, reason = %e, "RoutingPolicy does not compile; devices keep its last accepted version");
                return;
            }
            let version = policy_version(&p.spec.policy);
            let old = s.policies.get(&key).cloned();
            let same = old.as_ref().is_some_and(|o| {
                o.version == version
                    && o.object.metadata.creation_timestamp == p.metadata.creation_timestamp
            });
            // Serialising a derived plain-data spec cannot fail.
            let spec_json = serde_json::to_vec(&p.spec.policy)
                .unwrap_or_default()
                .into();
            let mut selectors = vec![p.spec.policy.selector.clone()];
            selectors.extend(old.map(|o| o.object.spec.policy.selector.clone()));
            s.policies.insert(
                key,
                PolicyEntry {
                    object: Arc::new(p),
                    version,
                    spec_json,
                },
            );
            if !same {
                s.record(Scope::Selectors(selectors));
            }
        }
        Change::DeletePolicy(key) => {
            if let Some(old) = s.policies.remove(&key) {
                s.record(Scope::Selectors(vec![
                    old.object.spec.policy.selector.clone(),
                ]));
            }
        }
    }
}
