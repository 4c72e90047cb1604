//! The demo `--exit-after-demo` runs: publish a model with two variants, push a routing
//! policy, roll a first version out, then a second one in steps gated on telemetry, and
//! report the outcome. It is sized to the fleet it runs on and never waits without a
//! deadline.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
use edgewise_agent::simulate::{SimFleet, Summary};
use edgewise_core::rollout::Phase;
use edgewise_operator::crd::names::condition;
use edgewise_operator::crd::{
    ModelRollout, ModelRolloutStatus, ModelVersion, ModelVersionPhase, RoutingPolicy,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use edgewise_operator::telemetry::summary::{self, TrafficSummary};

use crate::cloud::{CLOUD_MODEL, DEMO_MODEL_SEED};
use crate::stack::DevStack;

/// Why the demo failed, with what to change where there is something.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The fleet cannot hold a canary and a baseline.
    #[error(
        "the demo rolls 2.0.0 out to a canary and compares it with devices still on 1.0.0, so it needs at least 2 devices that can run a variant; --devices {devices} gives {can_run}. Run with --devices {smallest} or more"
    )]
    FleetTooSmall {
        /// `--devices`.
        devices: usize,
        /// Of those, devices that can run a variant.
        can_run: usize,
        /// The smallest `--devices` that works.
        smallest: usize,
    },
    /// No canary percentage splits this fleet usefully.
    #[error(
        "no canary percentage of this fleet holds {min_devices} device(s) and leaves one on the stable version ({can_run} devices can run a variant); run with more --devices"
    )]
    NoCanarySplit {
        /// Canary devices the analysis needs.
        min_devices: usize,
        /// Devices that can run a variant.
        can_run: usize,
    },
    /// Uploading an artifact failed.
    #[error("uploading {key}: {source}")]
    Upload {
        /// The object key.
        key: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A Kubernetes request failed.
    #[error("{what}: {source}")]
    Kube {
        /// What the demo was doing.
        what: &'static str,
        /// Why.
        source: kube::Error,
    },
    /// Something the demo waits for did not happen in time.
    #[error("{what} did not happen within {} s ({last}){hint}", timeout.as_secs())]
    Timeout {
        /// What the demo waited for.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
        /// The last progress seen.
        last: String,
        /// What to change, with its leading punctuation; may be empty.
        hint: String,
    },
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> DemoError {
    move |source| DemoError::Kube { what, source }
}

fn step(n: usize, text: &str) {
    println!("[{n}] {text}");
}

/// Uploads an artifact to the demo bucket; returns its `artifact` spec.
///
/// # Errors
/// [`DemoError::Upload`] when the upload fails.
pub async fn publish(
    s3: &aws_sdk_s3::Client,
    key: &str,
    bytes: Vec<u8>,
) -> Result<serde_json::Value, DemoError> {
    let sha = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len();
    s3.put_object()
        .bucket(crate::stack::DEMO_BUCKET)
        .key(key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .map_err(|e| DemoError::Upload {
            key: key.to_owned(),
            source: e.into(),
        })?;
    Ok(
        json!({"uri": format!("s3://{}/{key}", crate::stack::DEMO_BUCKET), "sha256": sha, "sizeBytes": size}),
    )
}

/// One look at what the demo waits for: how far it got, and whether that is the end.
struct Progress {
    line: String,
    done: bool,
}

impl Progress {
    fn at(line: String, done: bool) -> Option<Progress> {
        Some(Progress { line, done })
    }
}

/// Polls `check` until it reports done, printing each new state it reaches (the final one
/// included), or fails after `timeout` with the last state and `hint`.
async fn wait<F, Fut>(
    what: &'static str,
    timeout: Duration,
    hint: &str,
    mut check: F,
) -> Result<(), DemoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Progress>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(progress) = check().await {
            if progress.line != last {
                println!("    {}", progress.line);
                last = progress.line;
            }
            if progress.done {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Timeout {
                what,
                timeout,
                last,
                hint: hint.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Devices running `version` of the demo model, out of `of`.
fn running(fleet: &SimFleet, version: &str, of: usize) -> Option<Progress> {
    let on = fleet
        .summary()
        .active
        .get(&("assistant".to_owned(), version.to_owned()))
        .copied()
        .unwrap_or(0);
    Progress::at(format!("{on}/{of} devices run {version}"), on >= of)
}

/// `assistant 2.0.0: 27, assistant 1.0.0: 3` — what a summary map reads as.
fn counts<'a, K: 'a>(
    map: impl IntoIterator<Item = (&'a K, &'a usize)>,
    name: impl Fn(&K) -> String,
) -> String {
    let parts: Vec<String> = map
        .into_iter()
        .map(|(k, n)| format!("{} on {n}", name(k)))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn print_outcome(devices: usize, summary: &Summary) {
    println!(
        "    devices: {devices} ({} cannot run any variant and say why)",
        summary.unsupported
    );
    println!(
        "    running: {}",
        counts(&summary.active, |(m, v)| format!("{m} {v}"))
    );
    println!(
        "    policy versions: {}",
        counts(&summary.policies, |p| p.chars().take(12).collect())
    );
}

/// Runs the demo against a started stack.
///
/// # Errors
/// [`DemoError`] naming the step that failed and, where there is one, what to change.
pub async fn run(stack: &DevStack) -> Result<(), DemoError> {
    let (client, s3, fleet) = (&stack.client, &stack.s3_client, &stack.fleet);
    let started = jiff::Timestamp::now();
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
    let plan = DemoPlan::for_fleet(&buckets)?;
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
        "publish assistant 1.0.0 and 2.0.0 (real tiny GGUF models: an NPU and a CPU build of each) to S3",
    );
    // 2.0.0 ships higher-precision builds of the same weights: closer to the cloud's
    // original, so its shadow agreement rises.
    for (version, npu_dtype, cpu_dtype) in [
        ("1.0.0", GgmlDType::Q8_0, GgmlDType::Q4_0),
        ("2.0.0", GgmlDType::F32, GgmlDType::Q8_0),
    ] {
        let model = |dtype| {
            tiny::bytes(TinyModel::new(DEMO_MODEL_SEED, dtype)).map_err(|e| DemoError::Upload {
                key: format!("assistant/{version}"),
                source: e.into(),
            })
        };
        let npu = publish(
            s3,
            &format!("assistant/{version}/npu-{npu_dtype:?}.gguf").to_lowercase(),
            model(npu_dtype)?,
        )
        .await?;
        let cpu = publish(
            s3,
            &format!("assistant/{version}/cpu-{cpu_dtype:?}.gguf").to_lowercase(),
            model(cpu_dtype)?,
        )
        .await?;
        let mv = json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion",
            "metadata": {"name": format!("assistant-{version}")},
            "spec": {"model": "assistant", "version": version, "variants": [
                {"name": "npu-gguf", "format": "gguf", "artifact": npu, "requires": {"minMemoryMiB": 6144, "accelerators": ["npu"]}},
                {"name": "cpu-gguf", "format": "gguf", "artifact": cpu, "requires": {"minMemoryMiB": 2048}}
            ]}
        });
        mvs.patch(&format!("assistant-{version}"), &pp, &Patch::Apply(&mv))
            .await
            .map_err(kube_err("publishing the ModelVersions"))?;
    }
    wait(
        "both versions verified",
        Duration::from_secs(30),
        "",
        || async {
            let list = mvs.list(&Default::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|m| {
                    m.status.as_ref().and_then(|s| s.phase) == Some(ModelVersionPhase::Ready)
                })
                .count();
            Progress::at(format!("{ready}/2 ModelVersions Ready"), ready >= 2)
        },
    )
    .await?;

    step(
        2,
        &format!(
            "push a routing policy: private data stays on device, reasoning goes to the cloud ({}), 10 % of device answers shadowed there",
            stack.cloud_url
        ),
    );
    let rp = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "assistant"},
        "spec": {
            "targets": [
                {"name": "on-device", "device": {"model": "assistant"}},
                {"name": "cloud", "cloud": {"endpoint": stack.cloud_url, "model": CLOUD_MODEL,
                    "costPer1kTokensUsd": CLOUD_PRICE_PER_1K_USD, "timeoutMs": 5000}}
            ],
            "rules": [
                {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
                {"name": "reasoning", "match": [{"attribute": "task", "eq": "reasoning"}], "route": "cloud", "fallback": ["on-device"]}
            ],
            "default": {"route": "on-device", "fallback": ["cloud"]},
            "shadow": {"sampleRate": 0.1, "target": "cloud"}
        }
    });
    rps.patch("assistant", &pp, &Patch::Apply(&rp))
        .await
        .map_err(kube_err("pushing the routing policy"))?;
    let devices = fleet.devices().len();
    wait(
        "the policy acked by the fleet",
        Duration::from_secs(30),
        "",
        || async {
            let acked = rps
                .get("assistant")
                .await
                .ok()?
                .status
                .map_or(0, |s| s.devices.acked);
            Progress::at(
                format!("{acked}/{devices} devices acked the policy"),
                acked >= devices as u64,
            )
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
        .map_err(kube_err("rolling out 1.0.0"))?;
    wait("1.0.0 installed", Duration::from_secs(30), "", || async {
        running(fleet, "1.0.0", supported)
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
        .map_err(kube_err("rolling out 2.0.0"))?;
    let hint = format!(
        ". The canary never gathered what its analysis needs: run with more --devices, or see `kubectl describe mro {DEMO_ROLLOUT}` for the gate values"
    );
    wait(
        "the 2.0.0 rollout to succeed",
        Duration::from_secs(40),
        &hint,
        || async {
            let s = mros.get(DEMO_ROLLOUT).await.ok()?.status?;
            let done = s.state.phase == Some(Phase::Succeeded)
                && s.state.stable_version.as_deref() == Some("2.0.0");
            Progress::at(rollout_progress(&s, &plan), done)
        },
    )
    .await?;
    wait(
        "2.0.0 on the fleet",
        Duration::from_secs(30),
        "",
        || async { running(fleet, "2.0.0", supported) },
    )
    .await?;

    step(5, "outcome");
    print_outcome(devices, &fleet.summary());
    step(
        6,
        "what the fleet's requests did (executed by the devices' data planes, from ClickHouse)",
    );
    let traffic = tokio::time::timeout(
        Duration::from_secs(30),
        summary::fetch(&stack.clickhouse, "assistant", started.as_second()),
    )
    .await;
    match traffic {
        Ok(Ok(s)) => print!("{}", describe_traffic(&s, CLOUD_PRICE_PER_1K_USD)),
        Ok(Err(e)) => println!("    (no summary: {e})"),
        Err(_) => println!("    (no summary: ClickHouse did not answer within 30 s)"),
    }
    println!("\nDemo succeeded.");
    Ok(())
}

/// What the traffic summary reads as, for people.
fn describe_traffic(s: &TrafficSummary, price_per_1k_usd: f64) -> String {
    let t = &s.totals;
    let mut out = format!(
        "    {} requests: {:.1} % answered on the device, {:.1} % in the cloud\n",
        t.requests,
        100.0 * s.device_share(),
        100.0 * (1.0 - s.device_share()),
    );
    for row in &s.targets {
        out.push_str(&format!(
            "    {:<10} {:>6} requests  p50 {:>7.1} ms  p95 {:>7.1} ms  ${:.4}  {} failed{}\n",
            row.target,
            row.requests,
            row.p50,
            row.p95,
            row.cost_usd,
            row.errors,
            if row.an_error.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", row.an_error)
            }
        ));
    }
    out.push_str(&format!(
        "    cloud spend ${:.4}, against ${:.4} had every request gone to the cloud\n",
        s.cloud_spend_usd(),
        s.all_cloud_usd(price_per_1k_usd)
    ));
    out.push_str(&format!(
        "    private requests: {} of {} kept on the device\n",
        t.private_on_device, t.private
    ));
    if t.shadows > 0 {
        out.push_str(&format!(
            "    shadowed to the cloud: {}, agreeing {:.1} %\n",
            t.shadows,
            100.0 * t.agreements as f64 / t.shadows as f64
        ));
    }
    out
}

/// The price the demo policy gives the cloud target, per 1,000 tokens.
const CLOUD_PRICE_PER_1K_USD: f64 = 0.002;

/// The demo's rollout (`edgewise/assistant`, which is also its cohort salt).
const DEMO_ROLLOUT: &str = "assistant";
/// Memory the demo's smallest variant needs (its CPU variant).
const DEMO_MIN_MEMORY_MIB: u64 = 2048;
/// Canary samples an analysis run needs: enough that p95 and a 0.5 % error rate are not noise.
const DEMO_MIN_SAMPLES: u64 = 150;
/// Requests per second the whole simulated fleet sends. Devices execute them on real
/// (tiny) models, a few milliseconds of CPU each: this keeps a 2-core machine under half
/// busy while canaries gather the analysis's samples within seconds.
const DEMO_FLEET_REQUESTS_PER_SEC: f64 = 80.0;

/// Requests per second per device: the fleet's rate shared out, within 0.5 and 20.
#[must_use]
pub fn requests_per_device(devices: usize) -> f64 {
    (DEMO_FLEET_REQUESTS_PER_SEC / devices.max(1) as f64).clamp(0.5, 20.0)
}
/// The canary share the demo prefers when the fleet allows it.
const DEMO_PERCENT: u32 = 25;

/// The demo compares a canary with devices still on the stable version, so it needs two
/// devices that can run a variant. Refuses a smaller fleet before anything starts, naming
/// the smallest `--devices` that works.
///
/// # Errors
/// [`DemoError::FleetTooSmall`].
pub fn check_fleet(devices: usize) -> Result<(), DemoError> {
    let can_run = |n: usize| {
        (0..n)
            .filter(|i| edgewise_agent::simulate::facts_for(*i).memory_mib >= DEMO_MIN_MEMORY_MIB)
            .count()
    };
    if can_run(devices) >= 2 {
        return Ok(());
    }
    Err(DemoError::FleetTooSmall {
        devices,
        can_run: can_run(devices),
        smallest: (1..).find(|n| can_run(*n) >= 2).unwrap_or(2),
    })
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
    fn for_fleet(buckets: &[u16]) -> Result<DemoPlan, DemoError> {
        let n = buckets.len();
        let min_devices = (n / 4).clamp(1, 3);
        let in_cohort = |p: u32| {
            buckets
                .iter()
                .filter(|b| edgewise_core::cohort::bucket_in_cohort(**b, p))
                .count()
        };
        let fits = |p: u32| in_cohort(p) >= min_devices && in_cohort(p) < n;
        let smallest = (1..100)
            .find(|p| fits(*p))
            .ok_or(DemoError::NoCanarySplit {
                min_devices,
                can_run: n,
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
fn rollout_progress(s: &ModelRolloutStatus, plan: &DemoPlan) -> String {
    if s.state.canary_version.is_none() && s.state.phase.is_some_and(|p| !p.in_flight()) {
        return "waiting for the controller to start the rollout".into();
    }
    let phase = s.state.phase.map_or("Pending", Phase::as_str);
    let mut line = format!(
        "{phase} step {} at {}%",
        s.state.step_index, s.state.percent
    );
    if let Some(a) = &s.state.last_analysis {
        line.push_str(&format!(
            ": {}/{} canary devices, {}/{DEMO_MIN_SAMPLES} samples, analysis {}",
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
        c.status == "False"
            && (c.type_ == condition::DEVICES_AVAILABLE || c.type_ == condition::VERSION_READY)
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
        let e = check_fleet(1).expect_err("one device cannot be canary and baseline");
        assert!(e.to_string().contains("--devices 2"), "{e}");
        assert!(check_fleet(2).is_ok());
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
