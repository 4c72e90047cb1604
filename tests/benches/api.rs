//! The dev stack's API endpoint under list and watch, through kube-rs as controllers and
//! kubectl use it, beside the latency SLOs Kubernetes publishes for kube-apiserver (issue 17;
//! context, not a goal: the dev endpoint is one process with its store on local disk, a
//! real cluster is etcd behind several API servers).
//!
//! ```text
//! cargo bench -p edgewise-tests --bench api
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgewise_tests::*;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};

/// Objects in the namespace that is listed.
const OBJECTS: usize = 1_000;
const SAMPLES: usize = 200;

/// kube-apiserver's published SLOs (sig-scalability, `api_call_latency.md`): p99 of
/// read-only calls over a namespace ≤ 5 s, of single-object mutating calls ≤ 1 s. Watch
/// latency's SLO is still work in progress upstream; its proposed threshold is p99 ≤ 5 s.
const LIST_SLO: Duration = Duration::from_secs(5);
const MUTATE_SLO: Duration = Duration::from_secs(1);
const WATCH_SLO: Duration = Duration::from_secs(5);

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[i]
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"payload": "x".repeat(256)},
    }))
    .unwrap()
}

fn report(what: &str, samples: &mut [Duration], slo: Duration) {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms; kube-apiserver SLO p99 <= {} s ({:.0}x under it)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        slo.as_secs(),
        slo.as_secs_f64() / p99.as_secs_f64()
    );
}

fn main() {
    bench_main(|_| async {
        let dir = tempfile::tempdir().unwrap();
        let (_api, client) = dev_api_cluster(dir.path()).await;
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "edgewise");

        let mut creates = Vec::with_capacity(OBJECTS);
        for i in 0..OBJECTS {
            let t = Instant::now();
            maps.create(&PostParams::default(), &config_map(&format!("object-{i}")))
                .await
                .unwrap();
            creates.push(t.elapsed());
        }
        report("create one ConfigMap", &mut creates, MUTATE_SLO);

        let mut lists = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let listed = maps.list(&ListParams::default()).await.unwrap();
            lists.push(t.elapsed());
            assert_eq!(listed.items.len(), OBJECTS);
        }
        report(
            &format!("list {OBJECTS} ConfigMaps in a namespace"),
            &mut lists,
            LIST_SLO,
        );

        // Watch latency: from a create sent to the watcher holding its ADDED event (the write
        // included: the event may arrive before the create's own answer).
        let from = maps
            .list(&ListParams::default().limit(1))
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let mut events = maps
            .watch(&WatchParams::default().timeout(290), &from)
            .await
            .unwrap()
            .boxed();
        let mut watches = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let name = format!("watched-{i}");
            let t = Instant::now();
            maps.create(&PostParams::default(), &config_map(&name))
                .await
                .unwrap();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), events.next())
                    .await
                    .expect("an event within 10 s")
                    .expect("the watch stays open")
                    .unwrap()
                {
                    WatchEvent::Added(m) if m.metadata.name.as_deref() == Some(name.as_str()) => {
                        break;
                    }
                    _ => {}
                }
            }
            watches.push(t.elapsed());
        }
        report(
            "watch: create sent -> ADDED event received",
            &mut watches,
            WATCH_SLO,
        );
    });
}
