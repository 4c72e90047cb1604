//! Control-loop benchmarks on the dev stack with 1,000 simulated devices:
//!
//! ```text
//! cargo bench -p edgewise-tests --bench controllers
//! ```
//!
//! - resource change → assignment: a RoutingPolicy edit through the API endpoint, the
//!   reflector and the gateway, until every device runs it;
//! - rollback reaction: from the latency breach being visible in ClickHouse to every canary
//!   device told to go back to the stable version.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use edgewise_core::rollout::Metric;
use edgewise_dev::{DevStack, publish};
use edgewise_operator::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use edgewise_tests::*;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 1_000;

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let opts = dev_options(dir.path(), DEVICES, false, None);
        let stack = DevStack::start(&opts, CancellationToken::new()).await.unwrap();
        let apply = PatchParams::apply("bench").force();
        let mvs: Api<ModelVersion> = Api::namespaced(stack.client.clone(), "edgewise");
        let mros: Api<ModelRollout> = Api::namespaced(stack.client.clone(), "edgewise");
        let rps: Api<RoutingPolicy> = Api::namespaced(stack.client.clone(), "edgewise");

        // Resource change → assignment.
        let policy = |fallback: &[&str]| {
            json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
                   "spec": {"targets": [{"name": "on-device", "device": {"model": "assistant"}}, {"name": "cloud", "cloud": {"endpoint": "https://x.example.com", "model": "m"}}],
                            "default": {"route": "on-device", "fallback": fallback}, "shadow": {"sampleRate": 0.2, "target": "cloud"}}})
        };
        rps.patch("p", &apply, &Patch::Apply(&policy(&["cloud"]))).await.unwrap();
        until("first policy everywhere", Duration::from_secs(120), || stack.fleet.summary().policies.values().sum::<usize>() == DEVICES).await;
        let before = stack.fleet.summary().policies.keys().next().cloned().unwrap();
        let t0 = Instant::now();
        rps.patch("p", &apply, &Patch::Apply(&policy(&[]))).await.unwrap();
        until("new policy everywhere", Duration::from_secs(60), || {
            stack.fleet.devices().iter().all(|d| d.policy.version().is_some_and(|v| v != before))
        })
        .await;
        println!("resource change -> assignment, {DEVICES} devices (API endpoint -> reflector -> gateway -> agents): {:.0} ms", t0.elapsed().as_secs_f64() * 1000.0);

        // Rollback reaction.
        for (v, seed) in [("1.0.0", 1u8), ("3.0.0", 3u8)] {
            let artifact = publish(&stack.s3_client, &format!("assistant/{v}/cpu.onnx"), artifact_bytes(32 << 10, seed)).await.unwrap();
            let mv = json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "metadata": {"name": format!("assistant-{v}")},
                            "spec": {"model": "assistant", "version": v, "variants": [{"name": "cpu", "format": "onnx", "artifact": artifact, "requires": {"minMemoryMiB": 2048}}]}});
            mvs.patch(&format!("assistant-{v}"), &apply, &Patch::Apply(&mv)).await.unwrap();
        }
        let interval = Duration::from_secs(5);
        let rollout = |v: &str| {
            json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "assistant"},
                   "spec": {"model": "assistant", "version": v, "steps": [{"setPercent": 25}, {"analysis": {}}, {"setPercent": 100}],
                            "analysis": {"interval": "5s", "window": "1m", "minDevices": 10, "minSamples": 50, "failureLimit": 0,
                                         "gates": [{"metric": "latency_p95_ms", "max": 1.5, "relativeToBaseline": true}]},
                            "onFailure": "Rollback"}})
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        mros.patch("assistant", &apply, &Patch::Apply(&rollout("1.0.0"))).await.unwrap();
        let supported = stack.fleet.devices().iter().filter(|d| d.facts.memory_mib >= 2048).count();
        until("1.0.0 installed", Duration::from_secs(180), || {
            stack.fleet.summary().active.get(&("assistant".to_owned(), "1.0.0".to_owned())).copied().unwrap_or(0) == supported
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await; // baseline traffic
        mros.patch("assistant", &apply, &Patch::Apply(&rollout("3.0.0"))).await.unwrap();
        // Watch ClickHouse for the breach as the controller would see it.
        let breach = loop {
            let m = edgewise_operator::telemetry::gates::gate_metrics(
                &stack.clickhouse, "edgewise/assistant", "assistant", "3.0.0", "1.0.0", Duration::from_secs(60), SystemTime::now(),
            )
            .await
            .unwrap();
            let ratio = match (m.canary.values.get(&Metric::LatencyP95Ms), m.baseline.values.get(&Metric::LatencyP95Ms)) {
                (Some(c), Some(b)) => c / b,
                _ => 0.0,
            };
            if m.canary.samples >= 50 && m.canary.devices >= 10 && ratio > 1.5 {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        until("every device told to go back", Duration::from_secs(60), || {
            stack.fleet.devices().iter().all(|d| d.desired.borrow().get("assistant").is_none_or(|a| a.version == "1.0.0"))
        })
        .await;
        let reaction = breach.elapsed();
        println!(
            "rollback reaction, {DEVICES} devices: {:.2} s from the breach visible in ClickHouse to every canary device told to go back (analysis interval {} s; goal <= interval + 1 s)",
            reaction.as_secs_f64(),
            interval.as_secs()
        );
        stack.stop().await;
    });
}
