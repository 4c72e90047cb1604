//! Many virtual devices in one process, over the real protocol: each has its own key,
//! credential, Sync stream, model state and policy; they share one content store (so a
//! digest is downloaded once per process, still over real HTTP from real presigned URLs)
//! and multiplex their streams over a pool of HTTP/2 connections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use edgewise_core::variant::DeviceFacts;
use edgewise_core::version::Version;
use edgewise_proto::fleet::ModelState as WireState;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::StartError;
use crate::config::{AGENT_VERSION, Backoff};
use crate::device::{Connection, Device, DeviceParts};
use crate::identity::Identity;
use crate::policy::PolicyStore;
use crate::store::{ContentStore, ModelState};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of devices.
    pub devices: usize,
    /// Gateway URL.
    pub gateway: String,
    /// Bootstrap token.
    pub bootstrap_token: String,
    /// Where the shared content store lives.
    pub data_dir: PathBuf,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Devices sharing one HTTP/2 connection to the gateway.
    pub devices_per_connection: usize,
}

/// Deterministic, varied hardware: 30 % Android phones with an NPU, 60 % Linux gateways on
/// CPU, 10 % small devices with 1 GiB of memory (which most variants will not fit).
#[must_use]
pub fn facts_for(index: usize) -> DeviceFacts {
    let agent_version = Version::parse(AGENT_VERSION).unwrap_or_else(|_| Version::new(0, 0, 0));
    match index % 10 {
        0..=2 => DeviceFacts {
            os: "android".into(),
            arch: "arm64".into(),
            memory_mib: 8192,
            accelerators: vec!["npu".into()],
            agent_version,
        },
        9 => DeviceFacts {
            os: "linux".into(),
            arch: "arm64".into(),
            memory_mib: 1024,
            accelerators: Vec::new(),
            agent_version,
        },
        _ => DeviceFacts {
            os: "linux".into(),
            arch: "x86_64".into(),
            memory_mib: 4096,
            accelerators: Vec::new(),
            agent_version,
        },
    }
}

/// Self-reported labels of a simulated device.
#[must_use]
pub fn labels_for(index: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("fleet".to_owned(), "simulated".to_owned()),
        (
            "region".to_owned(),
            ["eu", "us", "apac"][index % 3].to_owned(),
        ),
    ])
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct SimFleet {
    devices: Vec<Arc<Device>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

/// Counts over the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Devices with an open Sync stream.
    pub connected: usize,
    /// `(model, version)` → devices running it.
    pub active: BTreeMap<(String, String), usize>,
    /// Policy version → devices running it.
    pub policies: BTreeMap<String, usize>,
    /// Devices with a download in progress.
    pub downloading: usize,
    /// Devices with a failed install.
    pub failed: usize,
    /// Devices no variant fits.
    pub unsupported: usize,
}

impl SimFleet {
    /// Starts `config.devices` devices.
    ///
    /// # Errors
    /// [`StartError`] when the store or the gateway URL is unusable.
    pub fn start(config: &SimConfig) -> Result<Self, StartError> {
        let content = Arc::new(
            ContentStore::open(&config.data_dir.join("store"), false).map_err(|source| {
                StartError::State {
                    dir: config.data_dir.clone(),
                    source,
                }
            })?,
        );
        let http = crate::artifact_client()?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut devices = Vec::with_capacity(config.devices);
        let mut channel = None;
        for i in 0..config.devices {
            if i % config.devices_per_connection.max(1) == 0 {
                channel = Some(crate::gateway_channel(&config.gateway)?);
            }
            let Some(channel) = channel.clone() else {
                continue;
            };
            let device = Device::new(DeviceParts {
                identity: Identity::ephemeral(),
                content: content.clone(),
                state: ModelState::ephemeral(),
                policy: Arc::new(PolicyStore::ephemeral()),
                facts: facts_for(i),
                labels: labels_for(i),
                publisher: None,
                bootstrap_token: config.bootstrap_token.clone(),
                backoff: config.backoff,
                collect_garbage: false,
            });
            tasks.spawn(crate::installer::run(
                device.clone(),
                http.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(crate::sync::run(device.clone(), channel, shutdown.clone()));
            devices.push(device);
        }
        Ok(SimFleet {
            devices,
            shutdown,
            tasks,
        })
    }

    /// The devices.
    #[must_use]
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Counts over the fleet.
    #[must_use]
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for d in &self.devices {
            if *d.connection.borrow() == Connection::Connected {
                s.connected += 1;
            }
            for (model, slots) in d.state.snapshot().models {
                *s.active.entry((model, slots.active.version)).or_default() += 1;
            }
            if let Some(v) = d.policy.version() {
                *s.policies.entry(v).or_default() += 1;
            }
            let board = d.board.all();
            let has = |state: WireState| board.values().any(|m| m.state == state as i32);
            s.downloading += usize::from(has(WireState::Downloading));
            s.failed += usize::from(has(WireState::Failed));
            s.unsupported += usize::from(has(WireState::Unsupported));
        }
        s
    }

    /// Stops every device.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
