//! What the gateway knows about each device it has seen: connection, facts, installed
//! models, download and install progress, policy acks. The controllers turn this into
//! rollout and policy status; per-device history lives in ClickHouse, not here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use edgewise_core::variant::DeviceFacts;
use edgewise_proto::fleet::{InstalledModel, ModelState, ModelStatus};

/// The last policy answer of a device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyAck {
    /// Version the device runs (acked, or reported in Hello).
    pub running: Option<String>,
    /// Last rejected version and why.
    pub rejected: Option<(String, String)>,
}

/// One device.
#[derive(Clone, Debug)]
pub struct DeviceRecord {
    /// Device id.
    pub device_id: String,
    /// Targeting labels.
    pub labels: BTreeMap<String, String>,
    /// Facts from the last Hello.
    pub facts: Option<DeviceFacts>,
    /// Whether a Sync stream is open now.
    pub connected: bool,
    /// Sync streams opened so far.
    pub connects: u64,
    /// Models on disk per the last Hello.
    pub installed: Vec<InstalledModel>,
    /// Latest status per model.
    pub models: BTreeMap<String, ModelStatus>,
    /// Routing-policy answers.
    pub policy: PolicyAck,
    /// Last message time.
    pub last_seen: SystemTime,
}

impl DeviceRecord {
    /// The active version of `model`: from the latest status report, else from Hello.
    #[must_use]
    pub fn active_version(&self, model: &str) -> Option<&str> {
        match self.models.get(model) {
            Some(s) if s.state() == ModelState::Active => Some(s.version.as_str()),
            _ => self
                .installed
                .iter()
                .find(|m| m.model == model && m.active)
                .map(|m| m.version.as_str()),
        }
    }
}

/// Every device this replica has seen.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Mutex<HashMap<String, DeviceRecord>>,
}

impl Registry {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, DeviceRecord>) -> R) -> R {
        f(&mut self
            .devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Records a new Sync stream.
    pub fn connected(
        &self,
        device_id: &str,
        labels: BTreeMap<String, String>,
        facts: DeviceFacts,
        installed: Vec<InstalledModel>,
        policy_version: Option<String>,
    ) {
        self.with(|d| {
            let r = d
                .entry(device_id.to_owned())
                .or_insert_with(|| DeviceRecord {
                    device_id: device_id.to_owned(),
                    labels: BTreeMap::new(),
                    facts: None,
                    connected: false,
                    connects: 0,
                    installed: Vec::new(),
                    models: BTreeMap::new(),
                    policy: PolicyAck::default(),
                    last_seen: SystemTime::now(),
                });
            r.labels = labels;
            r.facts = Some(facts);
            r.connected = true;
            r.connects += 1;
            r.installed = installed;
            r.models.clear();
            r.policy.running = policy_version;
            r.last_seen = SystemTime::now();
        });
    }

    /// Records the end of a Sync stream.
    pub fn disconnected(&self, device_id: &str) {
        self.with(|d| {
            if let Some(r) = d.get_mut(device_id) {
                r.connected = false;
                r.last_seen = SystemTime::now();
            }
        });
    }

    /// Records model progress.
    pub fn status(&self, device_id: &str, statuses: Vec<ModelStatus>) {
        self.with(|d| {
            if let Some(r) = d.get_mut(device_id) {
                for s in statuses {
                    r.models.insert(s.model.clone(), s);
                }
                r.last_seen = SystemTime::now();
            }
        });
    }

    /// Records a policy ACK (`error` empty) or NACK.
    pub fn policy_answer(
        &self,
        device_id: &str,
        version: &str,
        rejected: Option<(String, String)>,
    ) {
        self.with(|d| {
            if let Some(r) = d.get_mut(device_id) {
                if !version.is_empty() {
                    r.policy.running = Some(version.to_owned());
                }
                if rejected.is_some() {
                    r.policy.rejected = rejected;
                }
                r.last_seen = SystemTime::now();
            }
        });
    }

    /// A copy of every record.
    #[must_use]
    pub fn devices(&self) -> Vec<DeviceRecord> {
        self.with(|d| d.values().cloned().collect())
    }

    /// A copy of one record.
    #[must_use]
    pub fn device(&self, device_id: &str) -> Option<DeviceRecord> {
        self.with(|d| d.get(device_id).cloned())
    }

    /// Devices with an open stream.
    #[must_use]
    pub fn connected_count(&self) -> usize {
        self.with(|d| d.values().filter(|r| r.connected).count())
    }
}
