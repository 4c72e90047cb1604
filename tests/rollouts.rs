//! Rollout safety end to end on the dev stack, driven by kubectl and the kubectl plugin as a
//! platform engineer would: a rollout to a missing version waits and names it; promote skips
//! a pause and never the analysis after it, which rolls a slow version back; a full promotion
//! is explicit and recorded; and an idle stack writes nothing and uses almost no CPU.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgewise_core::rollout::Phase;
use edgewise_dev::DevStack;
use edgewise_operator::crd::{ModelRollout, ModelRolloutStatus, ModelVersion, RoutingPolicy};
use edgewise_tests::*;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NS: &str = "edgewise";

async fn status_where(
    mros: &Api<ModelRollout>,
    what: &str,
    check: impl Fn(&ModelRolloutStatus) -> bool,
) -> ModelRolloutStatus {
    eventually(Duration::from_secs(90), what, || async {
        mros.get("assistant")
            .await
            .ok()?
            .status
            .filter(|s| check(s))
    })
    .await
}

fn condition<'a>(
    s: &'a ModelRolloutStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", s.conditions))
}

/// The Events of `assistant` with `reason`, once at least one is listed: the controller
/// publishes them after the status that holds the transition, so a status seen does not
/// mean its event is listed yet.
async fn events_with_reason(client: &Client, reason: &str) -> usize {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    eventually(Duration::from_secs(10), reason, || async {
        let n = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("assistant")
            })
            .count();
        (n > 0).then_some(n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_versions_wait_promote_never_skips_analysis_and_full_promotion_is_explicit() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let stack = DevStack::start(
        &dev_options(dir.path(), 30, false, None),
        CancellationToken::new(),
    )
    .await
    .expect("starts");
    let kubeconfig = dir.path().join("kubeconfig");
    let client = stack.client.clone();
    let mvs: Api<ModelVersion> = Api::namespaced(client.clone(), NS);
    let mros: Api<ModelRollout> = Api::namespaced(client.clone(), NS);
    let rps: Api<RoutingPolicy> = Api::namespaced(client.clone(), NS);
    let apply = PatchParams::apply("test").force();
    let policy = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"targets": [{"name": "on-device", "device": {"model": "assistant"}}],
                 "default": {"route": "on-device"}}
    });
    rps.patch("p", &apply, &Patch::Apply(&policy))
        .await
        .expect("policy");
    publish_cpu_version(&stack.s3_client, &mvs, "1.0.0", 1, 32 << 10, false).await;
    let ramp = json!([{"setPercent": 50}, {"setPercent": 100}]);

    // The first version becomes stable once Ready and targeted.
    rollout_manifest("1.0.0")
        .steps(ramp.clone())
        .apply(&mros, "test")
        .await;
    status_where(&mros, "1.0.0 stable", |s| {
        s.state.stable_version.as_deref() == Some("1.0.0")
    })
    .await;

    // A version with no ModelVersion waits, names it, and assigns nothing.
    rollout_manifest("2.0.0")
        .steps(ramp.clone())
        .apply(&mros, "test")
        .await;
    let waiting = status_where(&mros, "waiting for 2.0.0", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "VersionReady" && c.status == "False")
    })
    .await;
    let ready = condition(&waiting, "VersionReady");
    assert_eq!(ready.reason, "ModelVersionMissing");
    assert!(
        ready.message.contains("2.0.0") && ready.message.contains("assistant"),
        "{ready:?}"
    );
    assert_eq!(waiting.state.canary_version, None);
    assert_eq!(waiting.state.stable_version.as_deref(), Some("1.0.0"));
    assert_eq!(waiting.state.phase, Some(Phase::Progressing));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = mros
        .get("assistant")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(
        still.state.stable_version.as_deref(),
        Some("1.0.0"),
        "never stable unverified"
    );
    assert!(
        still.skew.iter().all(|e| e.version != "2.0.0"),
        "{:?}",
        still.skew
    );

    // Published and verified: it proceeds on its own.
    publish_cpu_version(&stack.s3_client, &mvs, "2.0.0", 2, 32 << 10, false).await;
    status_where(&mros, "2.0.0 stable once published", |s| {
        s.state.stable_version.as_deref() == Some("2.0.0")
            && s.state.phase == Some(Phase::Succeeded)
    })
    .await;
    let done = mros
        .get("assistant")
        .await
        .expect("get")
        .status
        .expect("status");
    let on_stable = done
        .skew
        .iter()
        .find(|e| e.version == "2.0.0")
        .map_or(0, |e| e.devices);
    assert_eq!(
        done.devices.installed, on_stable,
        "INSTALLED and skew agree"
    );
    assert_eq!(
        done.state.message.as_deref(),
        Some("2.0.0 is stable on the whole segment")
    );

    // 3.0.0 is six times slower. Promote skips the manual pause, the analysis that follows
    // still runs (a second promote there is refused) and rolls it back.
    publish_cpu_version(&stack.s3_client, &mvs, "3.0.0", 3, 32 << 10, false).await;
    let gated = json!([{"setPercent": 50}, {"pause": {}}, {"analysis": {}}, {"setPercent": 100}]);
    rollout_manifest("3.0.0")
        .steps(gated)
        .apply(&mros, "test")
        .await;
    let paused = status_where(&mros, "paused at 50 %", |s| {
        s.state.phase == Some(Phase::Paused) && s.state.percent == 50
    })
    .await;
    assert_eq!(
        paused.state.message.as_deref(),
        Some("waiting for promotion (kubectl edgewise promote)")
    );
    assert_eq!(
        done.state.last_analysis, None,
        "a run without analysis has none"
    );
    let promote = |request: &str| {
        kubectl(
            &kubeconfig,
            &[
                "-n",
                NS,
                "annotate",
                "--overwrite",
                "mro",
                "assistant",
                &format!("edgewise.dev/promote={request}"),
            ],
        )
    };
    promote("first");
    let analyzing = status_where(&mros, "analysis after the pause", |s| {
        s.state.phase == Some(Phase::Analyzing) || s.state.phase == Some(Phase::RolledBack)
    })
    .await;
    assert_eq!(analyzing.state.step_index, 2, "{:?}", analyzing.state);
    promote("second");
    let refused = status_where(&mros, "second promote answered", |s| {
        s.state
            .last_command
            .as_ref()
            .is_some_and(|c| c.request == "second")
    })
    .await;
    let answer = refused.state.last_command.clone().expect("answer");
    assert!(
        !answer.applied,
        "promote must not skip an analysis: {answer:?}"
    );
    assert!(answer.message.contains("analysis"), "{answer:?}");
    assert_eq!(condition(&refused, "LastCommand").status, "False");
    let rolled_back = status_where(&mros, "rollback on latency", |s| {
        s.state.phase == Some(Phase::RolledBack)
    })
    .await;
    assert_eq!(rolled_back.state.stable_version.as_deref(), Some("2.0.0"));
    assert_latency_gate_breached(&rolled_back.state);
    assert_eq!(
        events_with_reason(&client, "Promoted").await,
        1,
        "one event per request"
    );
    assert_eq!(events_with_reason(&client, "CommandRefused").await, 1);

    // A full promotion skips the analysis, through the plugin, and says so.
    rollout_manifest("1.0.0")
        .steps(json!([{"setPercent": 10}, {"analysis": {}}, {"setPercent": 100}]))
        .apply(&mros, "test")
        .await;
    status_where(&mros, "analyzing 1.0.0", |s| {
        s.state.canary_version.as_deref() == Some("1.0.0")
    })
    .await;
    let plugin = tokio::process::Command::new(workspace_binary("kubectl-edgewise"))
        .env("KUBECONFIG", &kubeconfig)
        .args(["-n", NS, "promote", "--full", "assistant"])
        .output()
        .await
        .expect("plugin runs");
    let said = String::from_utf8_lossy(&plugin.stdout);
    assert!(
        plugin.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&plugin.stderr)
    );
    assert!(said.contains("promote-full applied"), "{said}");
    let full = status_where(&mros, "promoted in full", |s| {
        s.state.stable_version.as_deref() == Some("1.0.0")
    })
    .await;
    assert!(full.state.promoted_full_at.is_some(), "recorded in status");
    assert_eq!(events_with_reason(&client, "PromotedFull").await, 1);
    stack.stop().await;
}

/// A running `edgewise-dev` and its endpoints.
struct DevProcess {
    child: Child,
    kubeconfig: std::path::PathBuf,
    s3: String,
}

impl DevProcess {
    fn start(dir: &Path) -> DevProcess {
        let mut child = Command::new(workspace_binary("edgewise-dev"))
            .args(["--devices", "10", "--traffic-rps", "0"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--api-addr", "127.0.0.1:0", "--s3-addr", "127.0.0.1:0"])
            .args(["--gateway-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("edgewise-dev starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut s3 = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("reads");
            if let Some(rest) = line.strip_prefix("S3") {
                s3 = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if line.starts_with("Ready.") {
                break;
            }
        }
        assert!(s3.starts_with("http://"), "S3 endpoint printed: {s3:?}");
        DevProcess {
            child,
            kubeconfig: dir.join("kubeconfig"),
            s3,
        }
    }

    /// CPU seconds the process has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("proc stat");
        // Fields after the parenthesised command name; utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        ticks / 100.0 // USER_HZ is 100 on Linux
    }

    /// SIGTERM, as a service manager stops it: it exits 0 and its child processes (the
    /// ClickHouse server) go with it.
    fn stop(mut self) {
        let children = children_of(self.child.id());
        assert!(
            !children.is_empty(),
            "edgewise-dev runs ClickHouse as a child"
        );
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("exits");
        assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
        let left: Vec<u32> = children.into_iter().filter(|p| alive(*p)).collect();
        assert!(
            left.is_empty(),
            "child processes outlived edgewise-dev: {left:?}"
        );
    }
}

/// The direct children of a process, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether a process still runs (exited ones linger as zombies until reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_owned()))
        .is_some_and(|r| !r.starts_with('Z'))
}

async fn resource_versions(client: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mvs: Api<ModelVersion> = Api::namespaced(client.clone(), NS);
    let mros: Api<ModelRollout> = Api::namespaced(client.clone(), NS);
    let rps: Api<RoutingPolicy> = Api::namespaced(client.clone(), NS);
    for o in mvs.list(&ListParams::default()).await.expect("mv").items {
        out.insert(
            format!("mv/{}", o.name_any()),
            o.resource_version().unwrap_or_default(),
        );
    }
    for o in mros.list(&ListParams::default()).await.expect("mro").items {
        out.insert(
            format!("mro/{}", o.name_any()),
            o.resource_version().unwrap_or_default(),
        );
    }
    for o in rps.list(&ListParams::default()).await.expect("rp").items {
        out.insert(
            format!("rp/{}", o.name_any()),
            o.resource_version().unwrap_or_default(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_dev_stack_writes_no_status_and_stays_under_five_percent_of_a_core() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = DevProcess::start(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&dev.kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");
    let s3 = edgewise_operator::s3::S3Settings::with_endpoint(
        &dev.s3,
        "edgewise",
        "edgewise-dev-secret",
    )
    .client();
    let mvs: Api<ModelVersion> = Api::namespaced(client.clone(), NS);
    let mros: Api<ModelRollout> = Api::namespaced(client.clone(), NS);
    let rps: Api<RoutingPolicy> = Api::namespaced(client.clone(), NS);
    let apply = PatchParams::apply("test").force();

    // Every kind of object: a Ready and a Failed ModelVersion, a policy, a rollout that
    // succeeded and one that waits for a version nobody published.
    publish_cpu_version(&s3, &mvs, "1.0.0", 1, 32 << 10, false).await;
    let broken = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "metadata": {"name": "broken"},
        "spec": {"model": "other", "version": "1.0.0", "variants": [{"name": "cpu", "format": "onnx",
            "artifact": {"uri": "s3://models/nowhere.onnx", "sha256": "0".repeat(64), "sizeBytes": 1}}]}
    });
    mvs.patch("broken", &apply, &Patch::Apply(&broken))
        .await
        .expect("mv");
    let policy = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"targets": [{"name": "on-device", "device": {"model": "assistant"}}], "default": {"route": "on-device"}}
    });
    rps.patch("p", &apply, &Patch::Apply(&policy))
        .await
        .expect("rp");
    rollout_manifest("1.0.0").apply(&mros, "test").await;
    let mut waiting = rollout_manifest("9.9.9").json();
    waiting["metadata"]["name"] = json!("waiting");
    waiting["spec"]["model"] = json!("other");
    mros.patch("waiting", &apply, &Patch::Apply(&waiting))
        .await
        .expect("mro");

    eventually(Duration::from_secs(90), "a settled fleet", || async {
        let mro = mros.get("assistant").await.ok()?.status?;
        let rp = rps.get("p").await.ok()?.status?;
        let mv = mvs.get("assistant-1.0.0").await.ok()?.status?;
        (mro.devices.installed == 9 && rp.devices.acked == 10 && mv.devices == Some(9))
            .then_some(())
    })
    .await;
    // Let in-flight uploads and counts land.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let before = resource_versions(&client).await;
    let cpu_before = dev.cpu_seconds();
    let idle = Duration::from_secs(30);
    tokio::time::sleep(idle).await;
    let cpu = (dev.cpu_seconds() - cpu_before) / idle.as_secs_f64();
    let after = resource_versions(&client).await;
    dev.stop();
    assert_eq!(before.len(), 5, "{before:?}");
    assert_eq!(before, after, "an idle stack rewrote objects");
    assert!(
        cpu < 0.05,
        "idle dev stack used {:.1} % of a core",
        cpu * 100.0
    );
    eprintln!("idle dev stack: {:.2} % of a core", cpu * 100.0);
}
