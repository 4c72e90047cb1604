//! Harness for the end-to-end tests: a real S3-compatible server, a real gateway and real
//! agents, all on loopback, with artifacts made by the tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use edgewise_agent::config::{AGENT_VERSION, Backoff};
use edgewise_agent::device::{Device, DeviceParts};
use edgewise_agent::identity::Identity;
use edgewise_agent::policy::PolicyStore;
use edgewise_agent::store::{ContentStore, ModelState};
use edgewise_core::rollout::{Phase, RolloutState, RolloutStrategy, Step};
use edgewise_core::selector::DeviceSelector;
use edgewise_core::variant::{Artifact, DeviceFacts, ModelFormat, Requirements, Variant};
use edgewise_core::version::Version;
use edgewise_dev::s3_server::EmbeddedS3;
use edgewise_operator::crd::{
    ModelRollout, ModelRolloutSpec, ModelRolloutStatus, ModelVersion, ModelVersionPhase,
    ModelVersionSpec, ModelVersionStatus, RoutingPolicy, RoutingPolicySpec,
};
use edgewise_operator::gateway::{BootstrapToken, Change, Gateway, GatewayConfig};
use edgewise_operator::telemetry::ingest::{SinkConfig, TelemetrySink};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod conformance;

/// Namespace of every test object.
pub const NS: &str = "fleet";
/// Bucket holding test artifacts.
pub const BUCKET: &str = "models";
/// The bootstrap token the harness accepts.
pub const TOKEN: &str = "test-bootstrap-token";
/// Seed of the gateway's credential signing key (Ed25519).
pub const CREDENTIAL_SEED: [u8; 32] = *b"edgewise-test-credential-key-32b";

/// The tests' PKI, made once per test process the way the dev stack makes its own: a CA and
/// the certificate it signs for the gateways the tests start (127.0.0.1, localhost).
#[must_use]
pub fn test_pki() -> &'static edgewise_dev::pki::DevPki {
    static PKI: std::sync::OnceLock<(tempfile::TempDir, edgewise_dev::pki::DevPki)> =
        std::sync::OnceLock::new();
    &PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = edgewise_dev::pki::DevPki::ensure(dir.path()).expect("test CA");
        (dir, pki)
    })
    .1
}

/// The gateway TLS files of [`test_pki`].
#[must_use]
pub fn gateway_tls_files() -> edgewise_operator::gateway::tls::TlsFiles {
    let pki = test_pki();
    edgewise_operator::gateway::tls::TlsFiles {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        reload_every: Duration::from_secs(10),
    }
}

/// How a device trusts a test gateway at `url`: the tests' CA for `https://`, cleartext
/// allowed for the few `http://` ones (a bare fleet-scale gateway, a proxy).
#[must_use]
pub fn tls_for(url: &str) -> edgewise_agent::GatewayTls {
    if url.starts_with("https://") {
        edgewise_agent::GatewayTls {
            insecure: false,
            ca_pem: Some(std::fs::read(&test_pki().ca).expect("test CA")),
            pins: Vec::new(),
        }
    } else {
        edgewise_agent::GatewayTls::insecure()
    }
}

/// A channel to the gateway at `url`, trusting it as [`tls_for`] says.
#[must_use]
pub fn fleet_channel(url: &str) -> tonic::transport::Channel {
    edgewise_agent::gateway_channel(url, &tls_for(url)).expect("channel")
}

/// The harness gateway's credential key ring: [`CREDENTIAL_SEED`] alone.
#[must_use]
pub fn credential_keys() -> edgewise_operator::gateway::keys::KeyRing {
    edgewise_operator::gateway::keys::KeyRing::new(&CREDENTIAL_SEED, &[])
}

/// A bench binary's arguments (without the `--bench` cargo adds) and a runtime to run it on.
///
/// # Panics
/// When the runtime cannot start.
pub fn bench_main<F: Future<Output = ()>>(run: impl FnOnce(Vec<String>) -> F) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // `cargo bench` builds this package, not the binaries it starts: without this, a
    // bench measures whatever agent was last built in release (it once did, for hours).
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = std::process::Command::new(cargo);
        // What cargo sets for the bench it runs, not for a build: ring's build script reruns
        // when CARGO_MANIFEST_DIR changes, so with them every bench rebuilt the TLS stack
        // twice (here, and again in the next `cargo bench`).
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&key.as_ref())
            {
                build.env_remove(key.as_ref());
            }
        }
        let built = build
            // The bench profile (output in target/release like `--release`): building with
            // `--release` here made every following `cargo bench` rebuild the shared
            // dependencies, the two profiles differing in their settings.
            .args([
                "build",
                "--profile",
                "bench",
                "-p",
                "edgewise-agent",
                "--bin",
                "edgewise-agent",
            ])
            .status()
            .expect("cargo runs");
        assert!(built.success(), "building the agent for the bench failed");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run(args));
}

/// A `/proc/<pid>/status` memory field in KiB (`"VmRSS:"`, `"VmHWM:"`); 0 when absent.
///
/// # Panics
/// When the process is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process is running")
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time the process has used, all threads, in ns (from each thread's `schedstat`:
/// finer than the clock ticks of `/proc/<pid>/stat`).
///
/// # Panics
/// When the process is gone.
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process is running")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `cmd`, which must succeed: its stdout.
///
/// # Panics
/// When it cannot start or fails (with its stderr).
pub fn stdout_of(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl --kubeconfig kubeconfig args…` (kubectl 1.32 is on the machine), which must
/// succeed: its stdout.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    stdout_of(
        std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args),
    )
}

/// The rollout's last analysis compared p95 latency with the baseline and found it more
/// than 1.5× worse.
///
/// # Panics
/// When there was no analysis, no latency gate, or it was within bounds.
pub fn assert_latency_gate_breached(state: &RolloutState) {
    let analysis = state.last_analysis.as_ref().expect("an analysis ran");
    let latency = analysis
        .gates
        .iter()
        .find(|g| g.metric.as_str() == "latency_p95_ms")
        .expect("a latency gate");
    assert!(latency.compared.unwrap_or(0.0) > 1.5, "{latency:?}");
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// S3 + gateway on loopback.
pub struct Harness {
    /// Scratch directory (S3 data, agent data).
    pub dir: tempfile::TempDir,
    /// The S3 server.
    pub s3: EmbeddedS3,
    /// An S3 client for the tests.
    pub s3_client: aws_sdk_s3::Client,
    /// The gateway.
    pub gateway: Gateway,
    /// Its address.
    pub gateway_addr: SocketAddr,
    gateway_stop: CancellationToken,
    gateway_task: Option<JoinHandle<()>>,
}

impl Harness {
    /// Starts S3 (with the test bucket) and a gateway.
    pub async fn start() -> Self {
        Self::start_with(GatewayConfig::default()).await
    }

    /// Starts S3 and a gateway with `config` (the signing key is the harness's).
    pub async fn start_with(config: GatewayConfig) -> Self {
        Self::start_full(config, None).await
    }

    /// Starts S3 and a gateway that writes telemetry into ClickHouse at `clickhouse`.
    pub async fn start_with_telemetry(clickhouse: &str, sink: SinkConfig) -> Self {
        Self::start_full(
            GatewayConfig::default(),
            Some((clickhouse.to_owned(), sink)),
        )
        .await
    }

    async fn start_full(
        mut config: GatewayConfig,
        telemetry: Option<(String, SinkConfig)>,
    ) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let s3 = EmbeddedS3::start(
            &dir.path().join("s3"),
            loopback(),
            "test-access",
            "test-secret-key",
        )
        .await
        .expect("S3 starts");
        let s3_client = s3.settings().client();
        s3_client
            .create_bucket()
            .bucket(BUCKET)
            .send()
            .await
            .expect("bucket");
        config.credential_keys = credential_keys();
        config.tls.get_or_insert_with(gateway_tls_files);
        let mut gateway = Gateway::new(config, s3_client.clone());
        if let Some((url, sink)) = telemetry {
            gateway = gateway.with_telemetry(TelemetrySink::start(
                edgewise_operator::telemetry::client(&url),
                sink,
            ));
        }
        gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
            name: "test".into(),
            token: TOKEN.into(),
            labels: BTreeMap::from([("tier".to_owned(), "test".to_owned())]),
            expires_at: None,
            max_devices: None,
        }]);
        let stop = CancellationToken::new();
        let (addr, task) = gateway
            .spawn(loopback(), stop.clone())
            .await
            .expect("gateway binds");
        Harness {
            dir,
            s3,
            s3_client,
            gateway,
            gateway_addr: addr,
            gateway_stop: stop,
            gateway_task: Some(task),
        }
    }

    /// `https://addr` of the gateway (its certificate is [`test_pki`]'s).
    pub fn gateway_url(&self) -> String {
        format!("https://{}", self.gateway_addr)
    }

    /// Stops the gateway (its streams end at once).
    pub async fn stop_gateway(&mut self) {
        self.gateway_stop.cancel();
        if let Some(task) = self.gateway_task.take() {
            let _ = task.await;
        }
    }

    /// Replaces the gateway with a new one on the same address: a control plane that lost
    /// its signing key and knows only `tokens`.
    pub async fn replace_gateway(
        &mut self,
        keys: edgewise_operator::gateway::keys::KeyRing,
        tokens: Vec<BootstrapToken>,
    ) {
        self.stop_gateway().await;
        let config = GatewayConfig {
            credential_keys: keys,
            tls: Some(gateway_tls_files()),
            ..GatewayConfig::default()
        };
        self.gateway = Gateway::new(config, self.s3_client.clone());
        self.gateway.auth().set_bootstrap_tokens(tokens);
        self.restart_gateway().await;
    }

    /// Starts the gateway again on the same address, with the same state.
    pub async fn restart_gateway(&mut self) {
        self.stop_gateway().await;
        let stop = CancellationToken::new();
        // The old listener is closed; rebinding the same port may need a moment.
        let mut tries = 0;
        let (addr, task) = loop {
            match self.gateway.spawn(self.gateway_addr, stop.clone()).await {
                Ok(bound) => break bound,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "rebinding gateway");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("gateway rebind: {e}"),
            }
        };
        self.gateway_addr = addr;
        self.gateway_stop = stop;
        self.gateway_task = Some(task);
    }

    /// Uploads bytes and returns the artifact describing them.
    pub async fn put_artifact(&self, key: &str, bytes: Vec<u8>) -> Artifact {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size_bytes = bytes.len() as u64;
        self.s3_client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .expect("put object");
        Artifact {
            uri: format!("s3://{BUCKET}/{key}"),
            sha256,
            size_bytes,
            signature: None,
        }
    }

    /// Applies desired-state changes to the gateway.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) {
        self.gateway.snapshots().apply(changes);
    }

    /// Writes a tiny GGUF model (`seed`), uploads it as the one `cpu` variant of `model`
    /// `version`, and publishes that version; returns the model file.
    pub async fn publish_tiny(&self, model: &str, version: &str, seed: u64) -> PathBuf {
        let file = tiny_model(
            &self.dir.path().join(format!("{model}-{version}.gguf")),
            seed,
            false,
        );
        let artifact = self
            .put_artifact(
                &format!("{model}/{version}/cpu.gguf"),
                std::fs::read(&file).expect("the model file"),
            )
            .await;
        self.apply([Change::ApplyVersion(model_version(
            model,
            version,
            vec![Variant {
                name: "cpu".into(),
                artifact,
                format: ModelFormat::Gguf,
                requires: Requirements::default(),
            }],
        ))]);
        file
    }
}

/// A dev API endpoint (the tests' cluster) with namespace `edgewise`, its kubeconfig
/// written to `dir/kubeconfig`, and a client of it.
///
/// # Panics
/// When the endpoint cannot start.
pub async fn dev_api_cluster(
    dir: &std::path::Path,
) -> (edgewise_dev::devapi::DevApi, kube::Client) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let api =
        edgewise_dev::devapi::DevApi::start_with(dir, loopback(), Duration::from_millis(200), 50)
            .await
            .expect("dev API");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("test setup"),
    )
    .expect("test setup");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "edgewise"}}))
                .expect("JSON"),
        )
        .await
        .expect("namespace");
    (api, client)
}

/// `127.0.0.1:0`.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// One of `examples/*.yaml`, as JSON.
pub fn example(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .expect("example");
    serde_yaml_ng::from_str(&text).expect("yaml")
}

/// Creates `object` through `api` and asserts the API server rejects it as invalid (422)
/// with a message containing `needle`.
pub async fn assert_create_rejected<K>(api: &kube::Api<K>, object: serde_json::Value, needle: &str)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object).expect("typed");
    let err = api
        .create(&kube::api::PostParams::default(), &typed)
        .await
        .expect_err("rejected");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains(needle)),
        "{err:?}"
    );
}

/// Dev-stack options on loopback ports with `devices` simulated devices, state under `dir`,
/// against `kubeconfig`'s cluster if given, else the embedded API.
pub fn dev_options(
    dir: &Path,
    devices: usize,
    exit_after_demo: bool,
    kubeconfig: Option<PathBuf>,
) -> edgewise_dev::DevOptions {
    edgewise_dev::DevOptions {
        devices,
        data_dir: dir.to_owned(),
        exit_after_demo,
        api_addr: loopback(),
        allow_remote_api: false,
        s3_addr: loopback(),
        gateway_addr: loopback(),
        cloud_addr: loopback(),
        clickhouse_url: None,
        traffic_rps: None,
        kubeconfig,
    }
}

/// Deterministic pseudo-random bytes.
pub fn artifact_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut block = Sha256::digest([seed]);
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(len);
    out
}

/// Uploads a `size`-byte CPU (ONNX) artifact of model `assistant` version `v` to the dev
/// stack's bucket and applies its one-variant ModelVersion `assistant-{v}`; `corrupt`
/// declares a wrong SHA-256, so verification fails.
pub async fn publish_cpu_version(
    s3: &aws_sdk_s3::Client,
    mvs: &kube::Api<ModelVersion>,
    v: &str,
    seed: u8,
    size: usize,
    corrupt: bool,
) {
    let mut artifact = edgewise_dev::publish(
        s3,
        &format!("assistant/{v}/cpu.onnx"),
        artifact_bytes(size, seed),
    )
    .await
    .expect("uploads");
    if corrupt {
        artifact["sha256"] = serde_json::json!("0".repeat(64));
    }
    let mv = serde_json::json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "metadata": {"name": format!("assistant-{v}")},
        "spec": {"model": "assistant", "version": v, "variants": [{"name": "cpu", "format": "onnx", "artifact": artifact, "requires": {"minMemoryMiB": 2048}}]}
    });
    mvs.patch(
        &format!("assistant-{v}"),
        &kube::api::PatchParams::apply("test").force(),
        &kube::api::Patch::Apply(&mv),
    )
    .await
    .expect("applies");
}

/// Signs an artifact as `model` `version` `variant` with a publisher key, as the publishing
/// pipeline would.
pub fn sign_artifact(
    key: &SigningKey,
    (model, version, variant): (&str, &str, &str),
    artifact: &mut Artifact,
) {
    let message = edgewise_proto::identity::artifact_signing_message(
        model,
        version,
        variant,
        &artifact.sha256,
    );
    artifact.signature =
        Some(base64::engine::general_purpose::STANDARD.encode(key.sign(&message).to_bytes()));
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..ObjectMeta::default()
    }
}

/// A variant with requirements.
pub fn variant(name: &str, artifact: Artifact, requires: Requirements) -> Variant {
    Variant {
        name: name.into(),
        artifact,
        format: ModelFormat::Onnx,
        requires,
    }
}

/// A verified (Ready) ModelVersion.
pub fn model_version(model: &str, version: &str, variants: Vec<Variant>) -> ModelVersion {
    let mut mv = ModelVersion::new(
        &format!("{model}-{version}"),
        ModelVersionSpec {
            model: model.into(),
            version: version.into(),
            variants,
            deprecated: None,
        },
    );
    mv.metadata = meta(&format!("{model}-{version}"));
    mv.status = Some(ModelVersionStatus {
        phase: Some(ModelVersionPhase::Ready),
        ..ModelVersionStatus::default()
    });
    mv
}

/// A rollout of `model` (named after it) as the gateway's snapshots see it: built with
/// [`RolloutFixture`]'s setters, then [`RolloutFixture::build`].
pub fn rollout(model: &str) -> RolloutFixture {
    RolloutFixture {
        name: model.into(),
        model: model.into(),
        selector: DeviceSelector::default(),
        stable: "1.0.0".into(),
        canary: None,
    }
}

/// A [`ModelRollout`] whose status says `stable`, and `canary` at a percent when set.
#[derive(Debug, Clone)]
pub struct RolloutFixture {
    name: String,
    model: String,
    selector: DeviceSelector,
    stable: String,
    canary: Option<(String, u32)>,
}

impl RolloutFixture {
    /// The object's name (default: the model's).
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// Which devices it targets (default: all).
    #[must_use]
    pub fn selector(mut self, selector: DeviceSelector) -> Self {
        self.selector = selector;
        self
    }

    /// The version everyone runs (default `1.0.0`).
    #[must_use]
    pub fn stable(mut self, version: &str) -> Self {
        self.stable = version.into();
        self
    }

    /// A canary at `percent` of the devices.
    #[must_use]
    pub fn canary(mut self, version: &str, percent: u32) -> Self {
        self.canary = Some((version.into(), percent));
        self
    }

    /// The object.
    #[must_use]
    pub fn build(self) -> ModelRollout {
        let canary = self.canary.clone();
        let mut r = ModelRollout::new(
            &self.name,
            ModelRolloutSpec {
                model: self.model,
                selector: self.selector,
                strategy: RolloutStrategy {
                    version: canary
                        .as_ref()
                        .map_or_else(|| self.stable.clone(), |(v, _)| v.clone()),
                    steps: vec![Step {
                        set_percent: Some(100),
                        ..Step::default()
                    }],
                    ..RolloutStrategy::default()
                },
            },
        );
        r.metadata = meta(&self.name);
        r.status = Some(ModelRolloutStatus {
            state: RolloutState {
                phase: Some(if canary.is_some() {
                    Phase::Progressing
                } else {
                    Phase::Succeeded
                }),
                stable_version: Some(self.stable),
                percent: canary.as_ref().map_or(100, |(_, p)| *p),
                canary_version: canary.map(|(v, _)| v),
                ..RolloutState::default()
            },
            ..ModelRolloutStatus::default()
        });
        r
    }
}

/// The `assistant` rollout as a user applies it to the dev stack: `version` through
/// `steps`, gated (by default) on relative p95 latency and error rate, rolling back on
/// failure.
pub fn rollout_manifest(version: &str) -> RolloutManifest {
    RolloutManifest {
        version: version.into(),
        steps: serde_json::json!([{"setPercent": 100}]),
        interval: "4s".into(),
        min_samples: 30,
        gates: serde_json::json!([
            {"metric": "latency_p95_ms", "max": 1.5, "relativeToBaseline": true},
            {"metric": "error_rate", "max": 0.05}
        ]),
    }
}

/// A ModelRollout manifest for the dev stack, from [`rollout_manifest`].
#[derive(Debug, Clone)]
pub struct RolloutManifest {
    version: String,
    steps: serde_json::Value,
    interval: String,
    min_samples: u32,
    gates: serde_json::Value,
}

impl RolloutManifest {
    /// Its analysis gates (default: p95 latency ≤ 1.5× baseline, error rate ≤ 5 %).
    #[must_use]
    pub fn gates(mut self, gates: serde_json::Value) -> Self {
        self.gates = gates;
        self
    }

    /// Its steps (default: straight to 100 %).
    #[must_use]
    pub fn steps(mut self, steps: serde_json::Value) -> Self {
        self.steps = steps;
        self
    }

    /// How often analysis runs (default `4s`).
    #[must_use]
    pub fn every(mut self, interval: &str) -> Self {
        self.interval = interval.into();
        self
    }

    /// Samples an analysis needs before it is conclusive (default 30).
    #[must_use]
    pub fn min_samples(mut self, n: u32) -> Self {
        self.min_samples = n;
        self
    }

    /// The manifest, for `Patch::Apply`.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "assistant"},
            "spec": {
                "model": "assistant", "version": self.version, "steps": self.steps,
                "analysis": {"interval": self.interval, "window": "1m", "minDevices": 3, "minSamples": self.min_samples, "failureLimit": 0,
                    "gates": self.gates},
                "onFailure": "Rollback"
            }
        })
    }

    /// Server-side applies it as `field_manager` and waits for the answer.
    ///
    /// # Panics
    /// When the API refuses it.
    pub async fn apply(&self, mros: &kube::Api<ModelRollout>, field_manager: &str) -> ModelRollout {
        mros.patch(
            "assistant",
            &kube::api::PatchParams::apply(field_manager).force(),
            &kube::api::Patch::Apply(&self.json()),
        )
        .await
        .expect("applies the rollout")
    }
}

/// A RoutingPolicy from a JSON spec.
pub fn routing_policy(name: &str, spec: serde_json::Value) -> RoutingPolicy {
    let policy = serde_json::from_value(spec).expect("policy spec");
    let mut rp = RoutingPolicy::new(name, RoutingPolicySpec { policy });
    rp.metadata = meta(name);
    rp
}

/// Facts of a device.
pub fn facts(os: &str, arch: &str, memory_mib: u64, accelerators: &[&str]) -> DeviceFacts {
    DeviceFacts {
        os: os.into(),
        arch: arch.into(),
        memory_mib,
        accelerators: accelerators.iter().map(|s| (*s).to_owned()).collect(),
        agent_version: Version::parse(AGENT_VERSION).expect("semver"),
    }
}

/// A fast backoff for tests.
pub fn quick_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    }
}

/// An in-process agent with its state under `dir`.
pub struct TestAgent {
    /// The device.
    pub device: Arc<Device>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl TestAgent {
    /// Starts an agent against `gateway_url`.
    pub fn start(
        dir: &Path,
        gateway_url: &str,
        facts: DeviceFacts,
        publisher: Option<ed25519_dalek::VerifyingKey>,
    ) -> Self {
        Self::start_with_token(dir, gateway_url, facts, publisher, TOKEN.into())
    }

    /// As [`TestAgent::start`], enrolling with `token` (a file, to rotate it).
    pub fn start_with_token(
        dir: &Path,
        gateway_url: &str,
        facts: DeviceFacts,
        publisher: Option<ed25519_dalek::VerifyingKey>,
        token: edgewise_agent::config::TokenSource,
    ) -> Self {
        Self::launch(
            dir,
            gateway_url,
            &tls_for(gateway_url),
            facts,
            publisher,
            token,
        )
    }

    /// As [`TestAgent::start`], trusting the gateway as `tls` says.
    pub fn start_with_tls(
        dir: &Path,
        gateway_url: &str,
        tls: &edgewise_agent::GatewayTls,
        facts: DeviceFacts,
    ) -> Self {
        Self::launch(dir, gateway_url, tls, facts, None, TOKEN.into())
    }

    fn launch(
        dir: &Path,
        gateway_url: &str,
        tls: &edgewise_agent::GatewayTls,
        facts: DeviceFacts,
        publisher: Option<ed25519_dalek::VerifyingKey>,
        token: edgewise_agent::config::TokenSource,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("agent dir");
        let device = Device::new(DeviceParts {
            identity: Identity::load_or_create(dir, true).expect("identity"),
            content: Arc::new(ContentStore::open(&dir.join("store"), true).expect("store")),
            state: ModelState::load(&dir.join("models.json"), true).expect("state"),
            policy: Arc::new(PolicyStore::load(&dir.join("policy.json"), true).expect("policy")),
            facts,
            labels: BTreeMap::new(),
            publisher,
            bootstrap_token: token,
            backoff: quick_backoff(),
            collect_garbage: true,
            telemetry: None,
            runtime: None,
        });
        let stop = CancellationToken::new();
        let channel = edgewise_agent::gateway_channel(gateway_url, tls).expect("channel");
        let http = edgewise_agent::artifact_client().expect("http");
        let tasks = vec![
            tokio::spawn(edgewise_agent::installer::run(
                device.clone(),
                http,
                stop.clone(),
            )),
            tokio::spawn(edgewise_agent::sync::run(
                device.clone(),
                channel,
                stop.clone(),
            )),
        ];
        TestAgent {
            device,
            stop,
            tasks,
        }
    }

    /// Stops it.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of a workspace binary built next to the test executables.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built; run `cargo build -p edgewise-agent` (the test command builds it)",
        path.display()
    );
    path
}

/// A TCP proxy on loopback that can cut connections, throttle them and count what passes.
pub mod proxy {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    /// How the proxy treats connections.
    #[derive(Clone, Debug, Default)]
    pub struct Behaviour {
        /// Cut each of the first `cuts` connections after this many downstream bytes.
        pub cut_after: Option<u64>,
        /// How many connections to cut.
        pub cuts: usize,
        /// Downstream bytes per second per connection, if throttled.
        pub bytes_per_sec: Option<u64>,
    }

    /// What the proxy saw.
    #[derive(Debug, Default)]
    pub struct Counters {
        /// Bytes sent from upstream to clients.
        pub downstream_bytes: AtomicU64,
        /// Connections accepted.
        pub connections: AtomicUsize,
        /// Accept times since the proxy started.
        pub accepted_at: Mutex<Vec<Duration>>,
    }

    /// A running proxy.
    pub struct Proxy {
        /// Where clients connect.
        pub addr: SocketAddr,
        /// What it saw.
        pub counters: Arc<Counters>,
        task: JoinHandle<()>,
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Proxy {
        /// Proxies to `upstream`.
        pub async fn start(upstream: SocketAddr, behaviour: Behaviour) -> Self {
            let listener = TcpListener::bind(super::loopback())
                .await
                .expect("proxy binds");
            let addr = listener.local_addr().expect("addr");
            let counters = Arc::new(Counters::default());
            let c = counters.clone();
            let started = Instant::now();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let n = c.connections.fetch_add(1, Ordering::SeqCst);
                    c.accepted_at.lock().expect("lock").push(started.elapsed());
                    let cut = (n < behaviour.cuts)
                        .then_some(behaviour.cut_after)
                        .flatten();
                    let rate = behaviour.bytes_per_sec;
                    let c = c.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        let up = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut cr, &mut sw).await;
                            let _ = sw.shutdown().await;
                        });
                        let mut sent = 0u64;
                        let mut buf = vec![0u8; 16 * 1024];
                        let begun = Instant::now();
                        loop {
                            let want = match cut {
                                Some(limit) if sent >= limit => break,
                                Some(limit) => buf
                                    .len()
                                    .min(usize::try_from(limit - sent).unwrap_or(usize::MAX)),
                                None => buf.len(),
                            };
                            let Ok(n) = sr.read(&mut buf[..want]).await else {
                                break;
                            };
                            if n == 0 {
                                break;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            sent += n as u64;
                            c.downstream_bytes.fetch_add(n as u64, Ordering::SeqCst);
                            if let Some(rate) = rate {
                                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                                if let Some(wait) = due.checked_sub(begun.elapsed()) {
                                    tokio::time::sleep(wait).await;
                                }
                            }
                        }
                        up.abort();
                    });
                }
            });
            Proxy {
                addr,
                counters,
                task,
            }
        }

        /// `http://addr`.
        pub fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        /// Accept times so far.
        pub fn accepted_at(&self) -> Vec<Duration> {
            self.counters.accepted_at.lock().expect("lock").clone()
        }
    }
}

impl Harness {
    /// A second gateway on the same S3 data whose presigned URLs point at `s3_endpoint`
    /// (a proxy in front of the S3 server, say). Returns its URL and a stop token.
    pub async fn extra_gateway(&self, s3_endpoint: &str) -> (Gateway, String, CancellationToken) {
        let mut settings = self.s3.settings();
        settings.endpoint = Some(s3_endpoint.to_owned());
        let gateway = Gateway::new(
            GatewayConfig {
                credential_keys: credential_keys(),
                tls: Some(gateway_tls_files()),
                ..GatewayConfig::default()
            },
            settings.client(),
        );
        gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
            name: "test".into(),
            token: TOKEN.into(),
            labels: BTreeMap::new(),
            expires_at: None,
            max_devices: None,
        }]);
        let stop = CancellationToken::new();
        let (addr, _task) = gateway
            .spawn(loopback(), stop.clone())
            .await
            .expect("binds");
        (gateway, format!("https://{addr}"), stop)
    }
}

/// A real ClickHouse server (Debian's `clickhouse-server`) with the Edgewise schema.
pub struct ClickHouse {
    /// Its data lives here.
    pub dir: tempfile::TempDir,
    /// The server.
    pub server: edgewise_dev::clickhouse_server::ClickHouseServer,
    /// A client.
    pub client: clickhouse::Client,
}

impl ClickHouse {
    /// Starts a server and applies the migrations.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = edgewise_dev::clickhouse_server::ClickHouseServer::start(dir.path())
            .await
            .expect("clickhouse-server starts (the test command installs it)");
        let client = edgewise_operator::telemetry::client(&server.url());
        edgewise_operator::telemetry::schema::migrate(&client)
            .await
            .expect("migrates");
        ClickHouse {
            dir,
            server,
            client,
        }
    }

    /// `http://…` of the server.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A single `u64` from a query.
    pub async fn count(&self, sql: &str) -> u64 {
        self.client
            .query(sql)
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// A codec-agnostic gRPC client of the gateway at `url`, ready, for calls whose bytes the
/// test writes itself (see `edgewise_proto::codec::PreEncodedCodec`).
pub async fn raw_grpc(url: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let mut grpc = tonic::client::Grpc::new(fleet_channel(url));
    grpc.ready().await.expect("ready");
    grpc
}

/// `message` as a request carrying the device credential.
pub fn with_credential<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().expect("ascii"),
    );
    request
}

/// A client of the agent's `edgewise.agent.v1.Router` over its Unix socket, as an app uses it.
pub async fn router_client(
    socket: PathBuf,
) -> edgewise_proto::router::router_client::RouterClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connects to the router socket");
    edgewise_proto::router::router_client::RouterClient::new(channel)
}

/// A process serving an OpenAI-compatible API, stopped when dropped.
pub struct ServedModel {
    /// The server process (killed on drop).
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
}

/// Writes a tiny GGUF model to `path` (seeded; `damaged` perturbs every weight).
pub fn tiny_model(path: &Path, seed: u64, damaged: bool) -> PathBuf {
    use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
    let mut m = TinyModel::new(seed, GgmlDType::Q8_0);
    m.damaged = damaged;
    tiny::write(path, m).expect("write tiny model");
    path.to_owned()
}

/// Starts `edgewise-agent serve-model` on a free port and waits until it answers.
pub async fn serve_model(model: &Path, name: &str) -> ServedModel {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(workspace_binary("edgewise-agent"))
        .args([
            "serve-model",
            "--addr",
            "127.0.0.1:0",
            "--name",
            name,
            "--model",
        ])
        .arg(model)
        // As the README runs small models: candle's spin-waiting worker threads would
        // otherwise take both of a 2-core machine's cores from whatever is measured beside.
        .env("RAYON_NUM_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("serve-model starts");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let base_url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("stderr line") {
            if let Some(rest) = line.split("answers on ").nth(1) {
                return rest.split(' ').next().expect("url").to_owned();
            }
        }
        panic!("serve-model exited before listening");
    })
    .await
    .expect("serve-model listens within a minute");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    ServedModel { child, base_url }
}

/// Runs `tests/fixtures/openai_client.py` (the official SDK) against `base_url`.
pub async fn openai_sdk(
    base_url: &str,
    model: &str,
    extra_body: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut args = vec![base_url.to_owned(), model.to_owned()];
    args.extend(extra_body.map(ToString::to_string));
    python_fixture("openai_client.py", &args).await
}

/// The agent as its own process (`edgewise-agent run`), enrolled with `h`'s gateway, its
/// data in `h`'s dir under `name` and its data plane on a free loopback port; returns it
/// (killed on drop) and the data plane's base URL.
///
/// # Panics
/// When its files cannot be written or it cannot start.
pub fn agent_process(h: &Harness, name: &str) -> (tokio::process::Child, String) {
    let dir = h.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("agent dir");
    std::fs::write(dir.join("token"), TOKEN).expect("token");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "gateway = \"{}\"\nbootstrap_token_file = \"{}\"\ndata_dir = \"{}\"\nprobe_network = false\n[tls]\nca_file = \"{}\"\n[data_plane]\nlisten = \"{addr}\"\n",
            h.gateway_url(),
            dir.join("token").display(),
            dir.join("data").display(),
            test_pki().ca.display()
        ),
    )
    .expect("agent.toml");
    let agent = tokio::process::Command::new(workspace_binary("edgewise-agent"))
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .env("RUST_LOG", "warn")
        // The README's setting for small models, as serve-model has it.
        .env("RAYON_NUM_THREADS", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("the agent starts");
    (agent, format!("http://{addr}/v1"))
}

/// Waits until the agent's data plane at `base` serves `version` of its first model.
pub async fn data_plane_serves(http: &reqwest::Client, base: &str, version: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("version {version} loaded"),
        || async {
            let v = get_json(http, &format!("{base}/models")).await?;
            (v["data"][0]["edgewise"]["loaded"] == version).then_some(())
        },
    )
    .await;
}

/// `GET url` as JSON; `None` on any failure (for polling with [`eventually`]).
pub async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// Runs the Python script `tests/fixtures/NAME` with `args`; what it printed, as JSON.
///
/// # Panics
/// When it fails (with its stderr) or prints something else.
pub async fn python_fixture(name: &str, args: &[String]) -> serde_json::Value {
    let out = tokio::process::Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(name),
        )
        .args(args)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// What a [`FaultProxy`] does with the next connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Accept and close at once (a reset upstream).
    Cut,
    /// Answer `HTTP 429` with `retry-after: 1`.
    TooMany,
    /// Answer `HTTP 500`.
    ServerError,
    /// Hold the connection open and say nothing.
    Silent,
    /// Forward, but the server's bytes at about 3 KB/s (a slow, long answer).
    Trickle,
    /// Forward what clients send, hold back every answer (also on connections already
    /// open): the server did the work, the client never hears of it.
    Deaf,
}

/// A TCP proxy in front of a real server that injects faults and counts the bytes clients
/// sent through it (so a test can prove nothing was sent).
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Bytes received from clients, faults included.
    pub bytes_in: Arc<std::sync::atomic::AtomicU64>,
    /// Forwarded connections that have ended (either side closed).
    pub closed: Arc<std::sync::atomic::AtomicU64>,
    mode: Arc<std::sync::Mutex<Fault>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bytes_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let closed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mode = Arc::new(std::sync::Mutex::new(Fault::Pass));
        let (count, current, ended) = (bytes_in.clone(), mode.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let fault = *current.lock().expect("mode");
                let count = count.clone();
                let ended = ended.clone();
                let current_mode = current.clone();
                tokio::spawn(async move {
                    let canned = |status: &str, extra: &str| {
                        let body = format!(
                            r#"{{"error":{{"message":"{status}","type":"server_error"}}}}"#
                        );
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let mut head = vec![0u8; 65536];
                    match fault {
                        Fault::Cut => {}
                        Fault::Silent => {
                            let n = client.read(&mut head).await.unwrap_or(0);
                            count.fetch_add(n as u64, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        Fault::TooMany | Fault::ServerError => {
                            let n = client.read(&mut head).await.unwrap_or(0);
                            count.fetch_add(n as u64, Ordering::Relaxed);
                            let reply = if fault == Fault::TooMany {
                                canned("429 Too Many Requests", "retry-after: 1\r\n")
                            } else {
                                canned("500 Internal Server Error", "")
                            };
                            let _ = client.write_all(reply.as_bytes()).await;
                        }
                        Fault::Pass | Fault::Trickle | Fault::Deaf => {
                            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await
                            else {
                                return;
                            };
                            let (mut cr, mut cw) = client.split();
                            let (mut sr, mut sw) = server.split();
                            let up = async {
                                let mut buf = vec![0u8; 16384];
                                loop {
                                    let n = cr.read(&mut buf).await.unwrap_or(0);
                                    // A fault set since this connection opened applies to it
                                    // too: pooled connections would otherwise dodge it.
                                    let still = matches!(
                                        *current_mode.lock().expect("mode"),
                                        Fault::Pass | Fault::Trickle | Fault::Deaf
                                    );
                                    if n == 0 || !still || sw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                    count.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            };
                            let down = async {
                                if fault == Fault::Trickle {
                                    let mut buf = [0u8; 64];
                                    loop {
                                        let n = sr.read(&mut buf).await.unwrap_or(0);
                                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                        tokio::time::sleep(Duration::from_millis(20)).await;
                                    }
                                } else {
                                    let mut buf = vec![0u8; 16384];
                                    loop {
                                        let n = sr.read(&mut buf).await.unwrap_or(0);
                                        if *current_mode.lock().expect("mode") == Fault::Deaf {
                                            std::future::pending::<()>().await;
                                        }
                                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            };
                            tokio::select! {
                                () = up => {}
                                () = down => {}
                            }
                            ended.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        FaultProxy {
            addr,
            bytes_in,
            closed,
            mode,
        }
    }

    /// Sets what new connections get.
    pub fn set(&self, fault: Fault) {
        *self.mode.lock().expect("mode") = fault;
    }

    /// Bytes clients have sent so far.
    pub fn bytes(&self) -> u64 {
        self.bytes_in.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forwarded connections that have ended so far.
    pub fn closed(&self) -> u64 {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }
}
