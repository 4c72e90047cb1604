//! What the gateway knows about each device it has seen: connection, facts, installed
//! models, download and install progress, policy acks. The controllers turn this into
//! rollout and policy status; per-device history lives in ClickHouse, not here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

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

/// How long a device that has disconnected is remembered: its credential's default
/// lifetime, after which it must re-enrol anyway. Bounds the registry by the devices seen
/// in that window rather than every device ever seen.
pub const FORGET_DISCONNECTED_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Every device this replica has seen lately.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Mutex<HashMap<String, DeviceRecord>>,
    /// When disconnected devices were last forgotten (`None`: not yet).
    swept: Mutex<Option<SystemTime>>,
}

impl Registry {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, DeviceRecord>) -> R) -> R {
        f(&mut self
            .devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Forgets devices disconnected for longer than `after`; how many.
    pub fn forget_disconnected(&self, after: Duration) -> usize {
        let now = SystemTime::now();
        self.with(|d| {
            let before = d.len();
            d.retain(|_, r| {
                r.connected
                    || now
                        .duration_since(r.last_seen)
                        .map_or(true, |age| age < after)
            });
            before - d.len()
        })
    }

    /// [`Registry::forget_disconnected`] at most once a minute, from the connect path (so an
    /// idle replica does no work for it).
    fn sweep(&self) {
        let now = SystemTime::now();
        {
            let mut swept = self
                .swept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if swept.is_some_and(|t| {
                now.duration_since(t)
                    .is_ok_and(|d| d < Duration::from_secs(60))
            }) {
                return;
            }
            *swept = Some(now);
        }
        let forgotten = self.forget_disconnected(FORGET_DISCONNECTED_AFTER);
        if forgotten > 0 {
            tracing::info!(forgotten, "forgot devices disconnected for over 7 days");
        }
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
        self.sweep();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnected_devices_are_forgotten_after_a_while_connected_ones_never() {
        let r = Registry::default();
        let facts = DeviceFacts {
            os: "linux".into(),
            arch: "arm64".into(),
            memory_mib: 1024,
            accelerators: Vec::new(),
            agent_version: "1.0.0".parse().expect("semver"),
        };
        for id in ["gone", "here"] {
            r.connected(id, BTreeMap::new(), facts.clone(), Vec::new(), None);
        }
        r.disconnected("gone");
        assert_eq!(
            r.forget_disconnected(Duration::from_secs(3600)),
            0,
            "not yet"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.forget_disconnected(Duration::from_millis(10)), 1);
        assert!(r.device("gone").is_none());
        assert!(r.device("here").is_some(), "a connected device stays");
    }
}
