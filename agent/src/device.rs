//! One device's moving parts, shared by the real agent and each simulated device: identity,
//! stores, policy, router, the latest model statuses, and the desired assignments the sync
//! client receives and the installer works through.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use ed25519_dalek::VerifyingKey;
use edgewise_core::variant::DeviceFacts;
use edgewise_proto::fleet::{
    InstalledModel, ModelAssignment, ModelEvent, ModelEventKind, ModelState as WireState,
    ModelStatus,
};
use tokio::sync::{Notify, watch};

use crate::config::{Backoff, TokenSource};
use crate::identity::Identity;
use crate::policy::PolicyStore;
use crate::router::{LocalRouter, ModelsView};
use crate::store::{ContentStore, ModelState};
use crate::telemetry::{Event, TelemetryBuffer, new_event_id, now_unix_ms};

/// Connection state, for `edgewise-agent status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Connection {
    /// Not connected yet, or between attempts.
    Connecting,
    /// A Sync stream is open.
    Connected,
    /// The gateway could not be reached; routing goes on with the last good policy.
    Offline,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Connecting => "connecting",
            Connection::Connected => "connected",
            Connection::Offline => "gateway unreachable",
        })
    }
}

/// A rejected update, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nack {
    /// `policy` or `assignment`.
    pub kind: String,
    /// The version refused.
    pub version: String,
    /// Why (what the NACK said).
    pub reason: String,
    /// When, Unix ms.
    pub at_unix_ms: i64,
}

/// When things last happened on the Sync stream, for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activity {
    /// Since when the connection state has been what it is, Unix ms.
    #[serde(default)]
    pub connection_since_unix_ms: Option<i64>,
    /// The last message from the gateway, Unix ms.
    #[serde(default)]
    pub last_sync_unix_ms: Option<i64>,
    /// The last update this agent refused.
    #[serde(default)]
    pub last_nack: Option<Nack>,
    /// When the policy in force was applied, Unix ms.
    #[serde(default)]
    pub policy_applied_unix_ms: Option<i64>,
}

/// Latest status per model, and which changed since the gateway last heard.
#[derive(Debug)]
pub struct StatusBoard {
    inner: Mutex<(BTreeMap<String, ModelStatus>, BTreeSet<String>)>,
    changes: watch::Sender<u64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            inner: Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }
}

impl StatusBoard {
    /// Records a status; the sync client sends it when it can.
    pub fn set(&self, status: ModelStatus) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.0.get(&status.model) == Some(&status) {
            return;
        }
        g.1.insert(status.model.clone());
        g.0.insert(status.model.clone(), status);
        drop(g);
        self.changes.send_modify(|v| *v += 1);
    }

    /// Statuses changed since the last call.
    pub fn take_changed(&self) -> Vec<ModelStatus> {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dirty = std::mem::take(&mut g.1);
        dirty.iter().filter_map(|m| g.0.get(m).cloned()).collect()
    }

    /// Marks every status as changed (after a reconnect).
    pub fn mark_all_changed(&self) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all: BTreeSet<String> = g.0.keys().cloned().collect();
        g.1 = all;
        drop(g);
        self.changes.send_modify(|v| *v += 1);
    }

    /// A receiver that wakes on every change.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// All statuses.
    #[must_use]
    pub fn all(&self) -> BTreeMap<String, ModelStatus> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }
}

/// Counters for tests, benchmarks and `status`.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Sync attempts (each may dial the gateway).
    pub sync_attempts: AtomicU64,
    /// Bytes received from the artifact store.
    pub artifact_bytes: AtomicU64,
    /// Policy updates applied.
    pub policies_applied: AtomicU64,
    /// Policy updates rejected.
    pub policies_rejected: AtomicU64,
    /// Sampled requests not shadowed because too many shadows were in flight.
    pub shadows_skipped: AtomicU64,
}

/// A device.
#[derive(Debug)]
pub struct Device {
    /// Key, id, credential.
    pub identity: Mutex<Identity>,
    /// Device id (fixed for the identity's lifetime).
    pub device_id: String,
    /// Artifacts.
    pub content: Arc<ContentStore>,
    /// Installed models.
    pub state: ModelState,
    /// Routing policy.
    pub policy: Arc<PolicyStore>,
    /// Routing answers.
    pub router: Arc<LocalRouter>,
    /// Hardware facts.
    pub facts: DeviceFacts,
    /// Self-reported labels.
    pub labels: BTreeMap<String, String>,
    /// Publisher key for artifact signatures.
    pub publisher: Option<VerifyingKey>,
    /// Where the bootstrap token comes from (read again at every enrolment).
    pub bootstrap_token: TokenSource,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Latest model statuses.
    pub board: StatusBoard,
    /// Assignments received, by model.
    pub desired: watch::Sender<BTreeMap<String, ModelAssignment>>,
    /// Connection state.
    pub connection: watch::Sender<Connection>,
    /// Connection times and the last NACK.
    pub activity: watch::Sender<Activity>,
    /// Asks the sync client to reconnect for fresh assignments (an expired URL, say).
    pub refresh: Notify,
    /// Remove unreferenced artifacts after activation (only when the store is private).
    pub collect_garbage: bool,
    /// Counters.
    pub stats: DeviceStats,
    /// Durable telemetry buffer, if this device reports telemetry.
    pub telemetry: Option<Arc<TelemetryBuffer>>,
    /// The on-device runtime, if this device serves models (simulated devices do not).
    pub runtime: Option<Arc<crate::runtime::Runtime>>,
}

/// Parts to build a [`Device`] from.
#[derive(Debug)]
pub struct DeviceParts {
    /// Identity.
    pub identity: Identity,
    /// Artifacts.
    pub content: Arc<ContentStore>,
    /// Installed models.
    pub state: ModelState,
    /// Routing policy.
    pub policy: Arc<PolicyStore>,
    /// Facts.
    pub facts: DeviceFacts,
    /// Self-reported labels.
    pub labels: BTreeMap<String, String>,
    /// Publisher key.
    pub publisher: Option<VerifyingKey>,
    /// Bootstrap token.
    pub bootstrap_token: TokenSource,
    /// Backoff.
    pub backoff: Backoff,
    /// Collect garbage after activation.
    pub collect_garbage: bool,
    /// Telemetry buffer.
    pub telemetry: Option<Arc<TelemetryBuffer>>,
    /// On-device runtime.
    pub runtime: Option<Arc<crate::runtime::Runtime>>,
}

impl Device {
    /// Assembles a device.
    #[must_use]
    pub fn new(parts: DeviceParts) -> Arc<Self> {
        let router = Arc::new(LocalRouter::new(
            parts.policy.clone(),
            parts.telemetry.clone(),
        ));
        router.set_models(ModelsView::from_state(&parts.state.snapshot()));
        let device_id = parts.identity.device_id().to_owned();
        Arc::new(Device {
            identity: Mutex::new(parts.identity),
            device_id,
            content: parts.content,
            state: parts.state,
            policy: parts.policy,
            router,
            facts: parts.facts,
            labels: parts.labels,
            publisher: parts.publisher,
            bootstrap_token: parts.bootstrap_token,
            backoff: parts.backoff,
            board: StatusBoard::default(),
            desired: watch::Sender::new(BTreeMap::new()),
            connection: watch::Sender::new(Connection::Connecting),
            activity: watch::Sender::new(Activity::default()),
            refresh: Notify::new(),
            collect_garbage: parts.collect_garbage,
            stats: DeviceStats::default(),
            telemetry: parts.telemetry,
            runtime: parts.runtime,
        })
    }

    /// Moves the connection to `state`, noting when (only when it changes).
    pub fn set_connection(&self, state: Connection) {
        let changed = self.connection.send_if_modified(|c| {
            let changed = *c != state;
            *c = state;
            changed
        });
        if changed {
            let now = crate::telemetry::clock::now_unix_ms();
            self.activity
                .send_modify(|a| a.connection_since_unix_ms = Some(now));
        }
    }

    /// What the device has on disk, for Hello.
    #[must_use]
    pub fn installed(&self) -> Vec<InstalledModel> {
        let mut out = Vec::new();
        for (model, slots) in self.state.snapshot().models {
            for (install, active) in std::iter::once((&slots.active, true))
                .chain(slots.previous.iter().map(|p| (p, false)))
            {
                out.push(InstalledModel {
                    model: model.clone(),
                    version: install.version.clone(),
                    variant: install.variant.clone(),
                    sha256: install.sha256.clone(),
                    active,
                });
            }
        }
        out
    }

    /// The active version of a model.
    #[must_use]
    pub fn active_version(&self, model: &str) -> Option<String> {
        self.state.active(model).map(|i| i.version)
    }

    /// Buffers a model life-cycle event for upload.
    pub async fn record_model_event(
        &self,
        kind: ModelEventKind,
        model: &str,
        a: &ModelAssignment,
        duration_ms: u64,
        bytes: u64,
        error: String,
    ) {
        let Some(buffer) = &self.telemetry else {
            return;
        };
        let event = ModelEvent {
            event_id: new_event_id(),
            time_unix_ms: now_unix_ms(),
            kind: kind as i32,
            model: model.to_owned(),
            version: a.version.clone(),
            variant: a.variant.clone(),
            duration_ms,
            bytes,
            error,
            rollout: a.rollout.clone(),
        };
        if let Err(e) = buffer.append(vec![Event::Model(event)]).await {
            tracing::warn!(error = %e, "buffering a model event");
        }
    }

    /// Records a status for a model.
    pub fn report(
        &self,
        model: &str,
        a: &ModelAssignment,
        state: WireState,
        done: u64,
        error: String,
    ) {
        self.board.set(ModelStatus {
            model: model.to_owned(),
            version: a.version.clone(),
            variant: a.variant.clone(),
            state: state as i32,
            bytes_done: done,
            bytes_total: a.size_bytes,
            error,
        });
    }
}
