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
use crate::telemetry::{BufferConfig, TelemetryBuffer};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of devices.
    pub devices: usize,
    /// Gateway URL.
    pub gateway: String,
    /// How the devices trust the gateway (a private CA for the dev stack's `https://`).
    pub tls: crate::GatewayTls,
    /// Bootstrap tokens: device `i` enrols with `bootstrap_tokens[i % len]`, so a fleet can
    /// span segments (each token carries its own server-side labels).
    pub bootstrap_tokens: Vec<String>,
    /// Where the shared content store lives.
    pub data_dir: PathBuf,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Devices sharing one HTTP/2 connection to the gateway.
    pub devices_per_connection: usize,
    /// Give each device a telemetry buffer and uploader.
    pub telemetry: bool,
    /// Synthetic inference traffic (needs `telemetry`).
    pub traffic: Option<Traffic>,
    /// Serve installed GGUF models with the embedded runtime (weights shared across the
    /// fleet) and send each device's traffic through its data plane, so what telemetry
    /// reports was executed. Devices whose model no runtime serves keep synthetic outcomes.
    pub runtime: bool,
}

/// Synthetic inference traffic: each device asks its router and reports an outcome.
#[derive(Clone, Debug)]
pub struct Traffic {
    /// Requests per second per device.
    pub requests_per_sec: f64,
    /// Median on-device latency, ms.
    pub device_latency_ms: f64,
    /// Median cloud latency, ms.
    pub cloud_latency_ms: f64,
    /// Per model version: latency multiplier (a slow canary, say).
    pub slow_versions: BTreeMap<String, f64>,
    /// Per model version: error rate (default 0.5 %).
    pub error_rates: BTreeMap<String, f64>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            requests_per_sec: 2.0,
            device_latency_ms: 40.0,
            cloud_latency_ms: 250.0,
            slow_versions: BTreeMap::new(),
            error_rates: BTreeMap::new(),
        }
    }
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
        // One pool for every simulated device's cloud calls, as one host would have.
        let cloud = crate::dataplane::http::CloudHttp::new()?;
        let engines = Arc::new(crate::runtime::SharedEngines::default());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut devices = Vec::with_capacity(config.devices);
        let mut channel = None;
        for i in 0..config.devices {
            if i % config.devices_per_connection.max(1) == 0 {
                channel = Some(crate::gateway_channel(&config.gateway, &config.tls)?);
            }
            let Some(channel) = channel.clone() else {
                continue;
            };
            let device_dir = config.data_dir.join("devices").join(i.to_string());
            let telemetry = if config.telemetry {
                Some(
                    TelemetryBuffer::open(
                        &device_dir.join("telemetry"),
                        BufferConfig {
                            max_bytes: 16 << 20,
                            segment_bytes: 1 << 20,
                            durable: false,
                            ..BufferConfig::default()
                        },
                    )
                    .map_err(|e| StartError::State {
                        dir: config.data_dir.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })?,
                )
            } else {
                None
            };
            let facts = facts_for(i);
            let runtime = config.runtime.then(|| {
                Arc::new(crate::runtime::Runtime::sharing(
                    Some(facts.memory_mib << 20),
                    engines.clone(),
                ))
            });
            let device = Device::new(DeviceParts {
                identity: Identity::ephemeral(),
                content: content.clone(),
                state: ModelState::ephemeral(),
                policy: Arc::new(PolicyStore::ephemeral()),
                facts,
                labels: labels_for(i),
                publisher: None,
                bootstrap_token: config
                    .bootstrap_tokens
                    .get(i % config.bootstrap_tokens.len().max(1))
                    .cloned()
                    .unwrap_or_default()
                    .into(),
                backoff: config.backoff,
                collect_garbage: false,
                telemetry: telemetry.clone(),
                runtime,
            });
            if let Some(buffer) = telemetry {
                tasks.spawn(crate::telemetry::uploader::run(
                    device.clone(),
                    buffer,
                    channel.clone(),
                    shutdown.clone(),
                ));
                if let Some(traffic) = config.traffic.clone() {
                    let plane = config.runtime.then(|| {
                        crate::dataplane::DataPlane::with_parts(
                            device.clone(),
                            cloud.clone(),
                            Vec::new(),
                            &device_dir,
                        )
                    });
                    tasks.spawn(generate(device.clone(), traffic, plane, shutdown.clone()));
                }
            }
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

const TASKS: [&str; 6] = [
    "chat",
    "autocomplete",
    "summarize",
    "translate",
    "reasoning",
    "caption",
];

/// Prompts of the executed traffic: short chat turns and long documents, so input tokens
/// (counted by the model's tokenizer) vary as an app's do.
const PROMPTS: [&str; 6] = [
    "what is the weather today",
    "summarize my notes from the meeting about the network and the battery",
    "translate this to french: the device is fast and the cloud is slow",
    "why does the model answer on the device and not in the cloud when the network is metered and the battery is low",
    "caption the photo",
    "reason step by step: the cost of the cloud, the latency of the network, the battery of the device, and the answer today",
];

/// One request through the device's data plane, as an app's would go (same routing,
/// execution, fallback, shadows and measurement; no HTTP).
async fn execute(device: &Device, plane: &crate::dataplane::DataPlane, model: &str, n: u64) {
    let prompt = PROMPTS[rand::random_range(0..PROMPTS.len())];
    let body = serde_json::json!({
        "model": model,
        "max_tokens": rand::random_range(2..8),
        "messages": [{"role": "user", "content": prompt}],
        "edgewise": {
            "requestId": format!("{}-{n}", device.device_id),
            "task": TASKS[rand::random_range(0..TASKS.len())],
            "dataClass": if rand::random::<f64>() < 0.1 { "private" } else { "public" },
        },
    });
    let request = match crate::openai::wire::parse(
        crate::openai::Endpoint::Chat,
        body.to_string().as_bytes(),
    ) {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e.message, "a simulated request does not parse"),
    };
    // Failures are measured by the data plane itself; nothing more to do with them here.
    if let Err(e) = crate::openai::respond(plane, request, &http::HeaderMap::new()).await {
        tracing::debug!(error = %e.message, "simulated request failed");
    }
}

/// The device model whose requests this device executes through its data plane: the
/// policy's first device model, unless its active install is a format no runtime here
/// serves (an external runtime this simulator does not run: its outcomes stay synthetic).
/// A device with nothing installed executes too: its data plane falls back as the
/// policy says, as a real one would.
fn executed_model(device: &Device) -> Option<String> {
    let runtime = device.runtime.as_ref()?;
    let policy = device.policy.current()?;
    let model = crate::dataplane::device_models(&policy.compiled)
        .into_iter()
        .next()?;
    if runtime.serving(&model).is_some() {
        return Some(model);
    }
    let installed = device
        .state
        .snapshot()
        .models
        .get(&model)
        .map(|s| s.active.format.clone());
    match installed {
        Some(format) if !runtime.serves(&format) => None,
        _ => Some(model),
    }
}

/// One device's traffic. Where the runtime serves the policy's device model, each request
/// is executed by the data plane; otherwise decide, "run" it with a latency drawn around
/// the target's median (slower for versions marked slow), report the outcome.
#[tracing::instrument(name = "traffic", skip_all, fields(device = %device.device_id))]
async fn generate(
    device: Arc<Device>,
    traffic: Traffic,
    plane: Option<crate::dataplane::DataPlane>,
    shutdown: CancellationToken,
) {
    use edgewise_proto::router::{DecideRequest, Outcome, target};
    let period = std::time::Duration::from_secs_f64(1.0 / traffic.requests_per_sec.max(0.001));
    // Spread devices over the first period so the fleet does not tick in lockstep.
    let offset = period.mul_f64(rand::random::<f64>());
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = tokio::time::sleep(offset) => {}
    }
    let mut tick = tokio::time::interval(period);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if let Some(plane) = &plane
            && let Some(model) = executed_model(&device)
        {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = execute(&device, plane, &model, n) => {}
            }
            continue;
        }
        let request = DecideRequest {
            request_id: format!("{}-{n}", device.device_id),
            task: Some(TASKS[rand::random_range(0..TASKS.len())].into()),
            data_class: Some(
                if rand::random::<f64>() < 0.1 {
                    "private"
                } else {
                    "public"
                }
                .into(),
            ),
            input_tokens: Some(rand::random_range(10..12_000)),
            complexity: Some(rand::random::<f32>()),
            ..DecideRequest::default()
        };
        let Ok(decision) = device.router.decide(&request) else {
            continue; // no policy yet
        };
        let Some(target) = decision.target else {
            continue;
        };
        let on_device = matches!(target.kind, Some(target::Kind::Device(_)));
        let version = match &target.kind {
            Some(target::Kind::Device(d)) => d.version.clone(),
            _ => String::new(),
        };
        let median = if on_device {
            traffic.device_latency_ms * traffic.slow_versions.get(&version).copied().unwrap_or(1.0)
        } else {
            traffic.cloud_latency_ms
        };
        // Spread around the median with a 2 % slow tail. The tail stays well under 5 %, so
        // p95 (a rollout gate) lies inside the body of the distribution; at 5 % it would sit
        // on the tail's edge and jump between samples of the same version.
        let latency = median
            * (0.6 + 0.8 * rand::random::<f64>())
            * if rand::random::<f64>() < 0.02 {
                2.5
            } else {
                1.0
            };
        let error_rate = traffic.error_rates.get(&version).copied().unwrap_or(0.005);
        let ok = rand::random::<f64>() >= error_rate;
        let shadow = if decision.shadow.is_some() {
            if rand::random::<f64>() < 0.93 { 1 } else { 2 }
        } else {
            0
        };
        let outcome = Outcome {
            request_id: request.request_id.clone(),
            target: target.name.clone(),
            rule: decision.rule.clone(),
            policy_version: decision.policy_version.clone(),
            latency_ms: latency,
            ok,
            fallback_used: !ok && !decision.fallback.is_empty(),
            error: if ok {
                String::new()
            } else {
                "inference failed".into()
            },
            input_tokens: request.input_tokens.unwrap_or(0),
            output_tokens: rand::random_range(5..400),
            shadow_agreement: shadow,
            task: request.task.clone().unwrap_or_default(),
            data_class: request.data_class.clone().unwrap_or_default(),
            router_version: String::new(),
            // Synthetic: nothing was streamed, so nothing to measure.
            first_token_ms: 0.0,
        };
        if let Err(e) = device.router.report(&outcome).await {
            tracing::warn!(error = %e, "buffering a synthetic outcome");
        }
    }
}
