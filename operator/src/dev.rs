//! `edgewise-operator dev`: the whole system on one machine — the dev Kubernetes API, an
//! embedded S3 server, ClickHouse (a child process, or `--clickhouse-url`), migrations, the
//! controllers, the gateway and a simulated fleet — and, with `--exit-after-demo`, a demo
//! that publishes a model, rolls a new version out in steps gated on telemetry, pushes a
//! routing policy and reports the outcome.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use edgewise_agent::simulate::{SimConfig, SimFleet, Traffic};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clickhouse_server::ClickHouseServer;
use crate::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use crate::devapi::DevApi;
use crate::gateway::{BootstrapToken, Gateway, GatewayConfig};
use crate::s3_server::EmbeddedS3;
use crate::telemetry::ingest::{SinkConfig, TelemetrySink};

/// `edgewise-operator dev` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct DevOptions {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Where everything keeps its state (kubeconfig, S3 objects, ClickHouse data…).
    #[arg(long, default_value = "edgewise-dev")]
    pub data_dir: PathBuf,
    /// Run the demo and exit 0 only if every step succeeded.
    #[arg(long)]
    pub exit_after_demo: bool,
    /// Kubernetes-compatible API listen address.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub api_addr: SocketAddr,
    /// Embedded S3 listen address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub s3_addr: SocketAddr,
    /// Gateway listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub gateway_addr: SocketAddr,
    /// Use this ClickHouse instead of starting `clickhouse-server`.
    #[arg(long, env = "EDGEWISE_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,
    /// Synthetic requests per second per simulated device (0: none). Default: 2, more in a
    /// small fleet so its canaries gather samples quickly.
    #[arg(long)]
    pub traffic_rps: Option<f64>,
    /// Run against the cluster in this kubeconfig (its current context) instead of the
    /// embedded API; the CRDs are applied to it first. For kind, k3d and the like.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// Why the dev stack failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component did not start.
    #[error("{0}")]
    Start(String),
    /// A demo step failed.
    #[error("demo step failed: {0}")]
    Demo(String),
}

fn start<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Start(format!("{what}: {e}"))
}

fn step(n: usize, text: &str) {
    println!("[{n}] {text}");
}

/// The running parts of the dev stack.
pub struct DevStack {
    /// The embedded Kubernetes-compatible API, unless `--kubeconfig` named a cluster.
    pub api: Option<DevApi>,
    /// The S3 server.
    pub s3: EmbeddedS3,
    /// An S3 client.
    pub s3_client: aws_sdk_s3::Client,
    /// The ClickHouse child process, unless `--clickhouse-url` was given.
    pub clickhouse_server: Option<ClickHouseServer>,
    /// A ClickHouse client.
    pub clickhouse: clickhouse::Client,
    /// The gateway.
    pub gateway: Gateway,
    /// A Kubernetes client for the dev API.
    pub client: Client,
    /// The simulated fleet.
    pub fleet: SimFleet,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for DevStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevStack")
            .field("api", &self.api.as_ref().map(DevApi::url))
            .finish_non_exhaustive()
    }
}

impl DevStack {
    /// Starts every component, printing each endpoint as it comes up.
    ///
    /// # Errors
    /// [`Error::Start`] naming the component that failed, with the fix where there is one.
    pub async fn start(opts: &DevOptions, shutdown: CancellationToken) -> Result<Self, Error> {
        let dir = &opts.data_dir;
        std::fs::create_dir_all(dir).map_err(start("data dir"))?;
        let (api, client) = match &opts.kubeconfig {
            Some(path) => {
                let (client, url) = cluster_client(path).await?;
                install_crds(&client).await?;
                println!(
                    "Kubernetes API  {url}   (kubectl --kubeconfig {} get edgewise -A)",
                    path.display()
                );
                (None, client)
            }
            None => {
                let api = DevApi::start(&dir.join("api"), opts.api_addr)
                    .await
                    .map_err(start("Kubernetes API"))?;
                std::fs::write(dir.join("kubeconfig"), api.kubeconfig())
                    .map_err(start("kubeconfig"))?;
                println!(
                    "Kubernetes API  {}   (kubectl --kubeconfig {}/kubeconfig get edgewise -A)",
                    api.url(),
                    dir.display()
                );
                let client =
                    Client::try_from(Config::new(api.url().parse().map_err(start("API URL"))?))
                        .map_err(start("kube client"))?;
                (Some(api), client)
            }
        };
        let s3 = EmbeddedS3::start(
            &dir.join("s3"),
            opts.s3_addr,
            "edgewise",
            "edgewise-dev-secret",
        )
        .await
        .map_err(start("S3"))?;
        println!("S3              {}   (access key edgewise)", s3.endpoint());
        let mut clickhouse_server = None;
        let clickhouse_url = match &opts.clickhouse_url {
            Some(url) => url.clone(),
            None => {
                let server = ClickHouseServer::start(&dir.join("clickhouse"))
                    .await
                    .map_err(start("ClickHouse"))?;
                let url = server.url();
                clickhouse_server = Some(server);
                url
            }
        };
        let ch = crate::telemetry::client(&clickhouse_url);
        let report = crate::telemetry::schema::migrate(&ch)
            .await
            .map_err(start("migrations"))?;
        println!(
            "ClickHouse      {clickhouse_url}   ({}, schema applied {:?})",
            report.server, report.applied
        );

        let s3_client = s3.settings().client();
        let _ = s3_client.create_bucket().bucket("models").send().await;
        let token = format!("{:032x}", rand::random::<u128>());
        std::fs::write(dir.join("bootstrap-token"), &token).map_err(start("bootstrap token"))?;
        let sink = TelemetrySink::start(ch.clone(), SinkConfig::default());
        let gateway = Gateway::new(
            GatewayConfig {
                signing_key: rand::random::<[u8; 32]>().to_vec(),
                ..GatewayConfig::default()
            },
            s3_client.clone(),
        )
        .with_telemetry(sink);
        gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
            name: "dev".into(),
            token: token.clone(),
            labels: [("cluster".to_owned(), "dev".to_owned())].into(),
        }]);
        let (gw_addr, _gw) = gateway
            .spawn(opts.gateway_addr, shutdown.clone())
            .await
            .map_err(start("gateway"))?;
        println!(
            "Gateway         http://{gw_addr}   (bootstrap token in {}/bootstrap-token)",
            dir.display()
        );

        let namespaces: Api<Namespace> = Api::all(client.clone());
        if namespaces
            .get_opt("edgewise")
            .await
            .map_err(start("namespace"))?
            .is_none()
        {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "edgewise"}}))
                .map_err(start("namespace"))?;
            namespaces
                .create(&PostParams::default(), &ns)
                .await
                .map_err(start("namespace"))?;
        }
        let ctx = Arc::new(crate::controller::Context::new(
            client.clone(),
            s3_client.clone(),
            Some(ch.clone()),
            Some(gateway.clone()),
        ));
        tokio::spawn(crate::controller::feed_gateway(
            client.clone(),
            gateway.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(crate::controller::run(ctx, shutdown.clone()));
        println!("Controllers     ModelVersion, ModelRollout, RoutingPolicy");

        // Version 3.0.0 of the simulated model is slow: rolling it out shows an automatic
        // rollback on a latency gate.
        // A small fleet sends more per device, so even a canary of one or two devices reaches
        // the demo analysis's sample count within seconds.
        let rps = opts
            .traffic_rps
            .unwrap_or((DEMO_FLEET_REQUESTS_PER_SEC / opts.devices.max(1) as f64).max(2.0));
        let traffic = (rps > 0.0).then(|| Traffic {
            requests_per_sec: rps,
            slow_versions: [("3.0.0".to_owned(), 6.0)].into(),
            ..Traffic::default()
        });
        let fleet = SimFleet::start(&SimConfig {
            devices: opts.devices,
            gateway: format!("http://{gw_addr}"),
            bootstrap_token: token,
            data_dir: dir.join("sim"),
            backoff: edgewise_agent::config::Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
            },
            devices_per_connection: 100,
            telemetry: true,
            traffic,
        })
        .map_err(start("simulated fleet"))?;
        println!("Fleet           {} simulated devices", opts.devices);
        Ok(DevStack {
            api,
            s3,
            s3_client,
            clickhouse_server,
            clickhouse: ch,
            gateway,
            client,
            fleet,
            shutdown,
        })
    }

    /// Stops every component.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.fleet.stop().await;
        if let Some(api) = self.api {
            api.stop().await;
        }
        self.s3.stop().await;
        if let Some(mut server) = self.clickhouse_server {
            server.stop().await;
        }
    }
}

/// A client for the current context of `kubeconfig`.
async fn cluster_client(kubeconfig: &std::path::Path) -> Result<(Client, String), Error> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(start("kubeconfig"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(start("kubeconfig"))?;
    let url = config.cluster_url.to_string();
    Ok((Client::try_from(config).map_err(start("kube client"))?, url))
}

/// Applies the CRDs (server-side, so a re-run updates them) and waits until the API server
/// serves them.
async fn install_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("edgewise-dev").force();
    for crd in crate::crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(start("applying CRDs"))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| Error::Start(format!("CRD {name} not established within 30 s")))?
        .map_err(start("waiting for CRDs"))?;
    }
    Ok(())
}

/// Runs the dev stack until `shutdown` (or the demo's end).
///
/// # Errors
/// [`Error`] saying which component or demo step failed, and how to fix it.
pub async fn run(opts: DevOptions, shutdown: CancellationToken) -> Result<(), Error> {
    if opts.exit_after_demo {
        check_demo_fleet(opts.devices)?;
    }
    let stack = DevStack::start(&opts, shutdown.clone()).await?;
    let outcome = if opts.exit_after_demo {
        demo(&stack.client, &stack.s3_client, &stack.fleet).await
    } else {
        let kubeconfig = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| opts.data_dir.join("kubeconfig"));
        println!(
            "\nReady. Try: kubectl --kubeconfig {} apply -n edgewise -f examples/   (Ctrl-C to stop)",
            kubeconfig.display()
        );
        shutdown.cancelled().await;
        Ok(())
    };
    stack.stop().await;
    outcome
}

/// Uploads an artifact to the demo bucket; returns its `artifact` spec.
///
/// # Errors
/// [`Error::Demo`] when the upload fails.
pub async fn publish(
    s3: &aws_sdk_s3::Client,
    key: &str,
    bytes: Vec<u8>,
) -> Result<serde_json::Value, Error> {
    put(s3, key, bytes).await
}

async fn put(
    s3: &aws_sdk_s3::Client,
    key: &str,
    bytes: Vec<u8>,
) -> Result<serde_json::Value, Error> {
    let sha = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len();
    s3.put_object()
        .bucket("models")
        .key(key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .map_err(|e| Error::Demo(format!("uploading {key}: {e}")))?;
    Ok(json!({"uri": format!("s3://models/{key}"), "sha256": sha, "sizeBytes": size}))
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check().await {
            None => return Ok(()),
            Some(progress) => {
                if progress != last {
                    println!("    {progress}");
                    last = progress;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Demo(format!(
                "{what} did not happen within {timeout:?} ({last})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn demo(client: &Client, s3: &aws_sdk_s3::Client, fleet: &SimFleet) -> Result<(), Error> {
    let ns = "edgewise";
    let supported = fleet
        .devices()
        .iter()
        .filter(|d| d.facts.memory_mib >= DEMO_MIN_MEMORY_MIB)
        .count();
    let salt = format!("{ns}/{DEMO_ROLLOUT}");
    let buckets: Vec<u16> = fleet
        .devices()
        .iter()
        .filter(|d| d.facts.memory_mib >= DEMO_MIN_MEMORY_MIB)
        .map(|d| edgewise_core::cohort::bucket(&salt, &d.device_id))
        .collect();
    let plan = DemoPlan::for_fleet(&buckets).map_err(Error::Demo)?;
    println!(
        "    sized for this fleet: {supported} of {} devices can run a variant; canary {}% ({} device(s)), analysis needs {} canary device(s) and {DEMO_MIN_SAMPLES} samples",
        fleet.devices().len(),
        plan.percent,
        plan.canary,
        plan.min_devices
    );
    let mvs: Api<ModelVersion> = Api::namespaced(client.clone(), ns);
    let mros: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    let rps: Api<RoutingPolicy> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply("edgewise-demo").force();

    println!("\nDemo");
    step(
        1,
        "publish assistant 1.0.0 and 2.0.0, each an NPU (GGUF) and a CPU (ONNX) variant, to S3",
    );
    for (version, seed) in [("1.0.0", 1u8), ("2.0.0", 2u8)] {
        let bytes = |n: usize, s: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(s))
                .collect::<Vec<u8>>()
        };
        let npu = put(
            s3,
            &format!("assistant/{version}/npu.gguf"),
            bytes(256 << 10, seed),
        )
        .await?;
        let cpu = put(
            s3,
            &format!("assistant/{version}/cpu.onnx"),
            bytes(128 << 10, seed + 100),
        )
        .await?;
        let mv = json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion",
            "metadata": {"name": format!("assistant-{version}")},
            "spec": {"model": "assistant", "version": version, "variants": [
                {"name": "npu-gguf", "format": "gguf", "artifact": npu, "requires": {"minMemoryMiB": 6144, "accelerators": ["npu"]}},
                {"name": "cpu-onnx", "format": "onnx", "artifact": cpu, "requires": {"minMemoryMiB": 2048}}
            ]}
        });
        mvs.patch(&format!("assistant-{version}"), &pp, &Patch::Apply(&mv))
            .await
            .map_err(|e| Error::Demo(e.to_string()))?;
    }
    wait(
        "both versions verified",
        Duration::from_secs(30),
        || async {
            let list = mvs.list(&Default::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|m| {
                    m.status.as_ref().and_then(|s| s.phase)
                        == Some(crate::crd::ModelVersionPhase::Ready)
                })
                .count();
            (ready < 2).then(|| format!("{ready}/2 ModelVersions Ready"))
        },
    )
    .await?;

    step(
        2,
        "push a routing policy: private data stays on device, long context goes to the cloud",
    );
    let rp = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "assistant"},
        "spec": {
            "targets": [
                {"name": "on-device", "device": {"model": "assistant"}},
                {"name": "cloud", "cloud": {"endpoint": "https://inference.example.com/v1", "model": "large", "costPer1kTokensUsd": 0.002}}
            ],
            "rules": [
                {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
                {"name": "long-context", "match": [{"attribute": "inputTokens", "gt": 8000}], "route": "cloud", "fallback": ["on-device"]}
            ],
            "default": {"route": "on-device", "fallback": ["cloud"]},
            "shadow": {"sampleRate": 0.1, "target": "cloud"}
        }
    });
    rps.patch("assistant", &pp, &Patch::Apply(&rp))
        .await
        .map_err(|e| Error::Demo(e.to_string()))?;
    let devices = fleet.devices().len();
    wait(
        "the policy acked by the fleet",
        Duration::from_secs(30),
        || async {
            let acked = rps
                .get("assistant")
                .await
                .ok()?
                .status
                .map_or(0, |s| s.devices.acked);
            (acked < devices as u64).then(|| format!("{acked}/{devices} devices acked the policy"))
        },
    )
    .await?;

    step(3, "roll assistant 1.0.0 out as the stable version");
    let rollout = |version: &str| {
        json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": DEMO_ROLLOUT},
            "spec": {
                "model": "assistant", "version": version,
                "steps": [{"setPercent": plan.percent}, {"analysis": {}}, {"setPercent": 100}],
                "analysis": {"interval": "5s", "window": "2m", "minDevices": plan.min_devices, "minSamples": DEMO_MIN_SAMPLES, "failureLimit": 0,
                    "gates": [
                        {"metric": "latency_p95_ms", "max": 1.5, "relativeToBaseline": true},
                        {"metric": "error_rate", "max": 0.05}
                    ]},
                "onFailure": "Rollback"
            }
        })
    };
    mros.patch(DEMO_ROLLOUT, &pp, &Patch::Apply(&rollout("1.0.0")))
        .await
        .map_err(|e| Error::Demo(e.to_string()))?;
    wait("1.0.0 installed", Duration::from_secs(30), || async {
        let on = fleet
            .summary()
            .active
            .get(&("assistant".to_owned(), "1.0.0".to_owned()))
            .copied()
            .unwrap_or(0);
        (on < supported).then(|| format!("{on}/{supported} devices run 1.0.0"))
    })
    .await?;

    step(
        4,
        &format!(
            "roll out 2.0.0: {}% ({} device(s)) → analysis on telemetry (p95 vs baseline, error rate) → 100 %",
            plan.percent, plan.canary
        ),
    );
    mros.patch(DEMO_ROLLOUT, &pp, &Patch::Apply(&rollout("2.0.0")))
        .await
        .map_err(|e| Error::Demo(e.to_string()))?;
    wait(
        "the 2.0.0 rollout to succeed",
        Duration::from_secs(40),
        || async {
            let s = mros.get(DEMO_ROLLOUT).await.ok()?.status?;
            let done = s.state.phase == Some(edgewise_core::rollout::Phase::Succeeded)
                && s.state.stable_version.as_deref() == Some("2.0.0");
            (!done).then(|| rollout_progress(&s, &plan))
        },
    )
    .await
    .map_err(|e| {
        let e = match e {
            Error::Demo(m) | Error::Start(m) => m,
        };
        Error::Demo(format!(
            "{e}. The canary never gathered what its analysis needs: run with more --devices, or see `kubectl describe mro {DEMO_ROLLOUT}` for the gate values"
        ))
    })?;
    wait("2.0.0 on the fleet", Duration::from_secs(30), || async {
        let on = fleet
            .summary()
            .active
            .get(&("assistant".to_owned(), "2.0.0".to_owned()))
            .copied()
            .unwrap_or(0);
        (on < supported).then(|| format!("{on}/{supported} devices run 2.0.0"))
    })
    .await?;

    step(5, "outcome");
    let summary = fleet.summary();
    println!(
        "    devices: {devices} ({} cannot run any variant and say why)",
        summary.unsupported
    );
    println!("    running: {:?}", summary.active);
    println!("    policy versions: {:?}", summary.policies);
    println!("\nDemo succeeded.");
    Ok(())
}

/// The demo's rollout (`edgewise/assistant`, which is also its cohort salt).
const DEMO_ROLLOUT: &str = "assistant";
/// Memory the demo's smallest variant needs (its CPU variant).
const DEMO_MIN_MEMORY_MIB: u64 = 2048;
/// Canary samples an analysis run needs: enough that p95 and a 0.5 % error rate are not noise.
const DEMO_MIN_SAMPLES: u64 = 150;
/// Requests per second the whole simulated fleet sends at least.
const DEMO_FLEET_REQUESTS_PER_SEC: f64 = 150.0;
/// The canary share the demo prefers when the fleet allows it.
const DEMO_PERCENT: u32 = 25;

/// The demo compares a canary with devices still on the stable version, so it needs two
/// devices that can run a variant. Refuses a smaller fleet before anything starts, naming
/// the smallest `--devices` that works.
fn check_demo_fleet(devices: usize) -> Result<(), Error> {
    let can_run = |n: usize| {
        (0..n)
            .filter(|i| edgewise_agent::simulate::facts_for(*i).memory_mib >= DEMO_MIN_MEMORY_MIB)
            .count()
    };
    if can_run(devices) >= 2 {
        return Ok(());
    }
    let smallest = (1..).find(|n| can_run(*n) >= 2).unwrap_or(2);
    Err(Error::Demo(format!(
        "the demo rolls 2.0.0 out to a canary and compares it with devices still on 1.0.0, so it needs at least 2 devices that can run a variant; --devices {devices} gives {}. Run with --devices {smallest} or more",
        can_run(devices)
    )))
}

/// The demo's rollout, sized to the fleet it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DemoPlan {
    /// The canary step's percentage.
    percent: u32,
    /// `spec.analysis.minDevices`.
    min_devices: u32,
    /// Devices that can run a variant in the canary cohort at `percent`.
    canary: usize,
}

impl DemoPlan {
    /// From the cohort buckets of the devices that can run a variant: a canary of about a
    /// quarter of them (at most 3 needed for the analysis), with at least one device left on
    /// the stable version as the baseline.
    fn for_fleet(buckets: &[u16]) -> Result<DemoPlan, String> {
        let n = buckets.len();
        let min_devices = (n / 4).clamp(1, 3);
        let in_cohort = |p: u32| {
            buckets
                .iter()
                .filter(|b| edgewise_core::cohort::bucket_in_cohort(**b, p))
                .count()
        };
        let fits = |p: u32| in_cohort(p) >= min_devices && in_cohort(p) < n;
        let smallest = (1..100).find(|p| fits(*p)).ok_or_else(|| {
            format!(
                "no canary percentage of this fleet holds {min_devices} device(s) and leaves one on the stable version ({n} devices can run a variant); run with more --devices"
            )
        })?;
        let percent = if fits(DEMO_PERCENT) {
            smallest.max(DEMO_PERCENT)
        } else {
            smallest
        };
        Ok(DemoPlan {
            percent,
            min_devices: min_devices as u32,
            canary: in_cohort(percent),
        })
    }
}

/// One line of rollout progress: the phase and step, and while an analysis waits, how many
/// canary devices and samples it has against what it needs.
fn rollout_progress(s: &crate::crd::ModelRolloutStatus, plan: &DemoPlan) -> String {
    if s.state.canary_version.is_none() && s.state.phase.is_some_and(|p| !p.in_flight()) {
        return "waiting for the controller to start the rollout".into();
    }
    let phase = s
        .state
        .phase
        .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    let mut line = format!(
        "{phase} step {} at {}%",
        s.state.step_index, s.state.percent
    );
    if let Some(a) = &s.state.last_analysis {
        line.push_str(&format!(
            ": {}/{} canary devices, {}/{DEMO_MIN_SAMPLES} samples, analysis {:?}",
            a.canary_devices, plan.min_devices, a.canary_samples, a.verdict
        ));
        for g in &a.gates {
            line.push_str(&format!(
                " {}={:.3}",
                g.metric.as_str(),
                g.compared.unwrap_or(f64::NAN)
            ));
        }
    }
    if let Some(c) = s.conditions.iter().find(|c| {
        c.status == "False" && (c.type_ == "DevicesAvailable" || c.type_ == "VersionReady")
    }) {
        line.push_str(&format!(" ({})", c.message));
    } else if let Some(m) = &s.state.message {
        line.push_str(&format!(" ({m})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_too_small_for_a_canary_and_a_baseline_is_refused_with_the_size_it_needs() {
        let e = check_demo_fleet(1).expect_err("one device cannot be canary and baseline");
        assert!(e.to_string().contains("--devices 2"), "{e}");
        assert!(check_demo_fleet(2).is_ok());
    }

    #[test]
    fn the_plan_keeps_a_baseline_and_enough_canary_devices() {
        let two = DemoPlan::for_fleet(&[10, 9000]).expect("plan");
        assert_eq!((two.min_devices, two.canary), (1, 1));
        assert!(two.percent <= 90);
        let many: Vec<u16> = (0..90).map(|i| i * 111).collect();
        let plan = DemoPlan::for_fleet(&many).expect("plan");
        assert_eq!((plan.percent, plan.min_devices), (DEMO_PERCENT, 3));
        assert!(plan.canary >= 3);
        assert!(
            DemoPlan::for_fleet(&[5000, 5001]).is_err(),
            "no percent splits them"
        );
    }
}
