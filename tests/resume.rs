//! A download cut mid-way resumes with `Range` and does not start over.

use std::sync::atomic::Ordering;
use std::time::Duration;

use edgewise_core::variant::Requirements;
use edgewise_operator::gateway::Change;
use edgewise_tests::proxy::{Behaviour, Proxy};
use edgewise_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_several_times_resumes_and_fetches_under_1_2x_the_size() {
    let h = Harness::start().await;
    const SIZE: usize = 4 * 1024 * 1024;
    let artifact = h
        .put_artifact("big/1.0.0/model.gguf", artifact_bytes(SIZE, 9))
        .await;
    // The first four connections through the proxy are cut after 700 KiB each.
    let proxy = Proxy::start(
        h.s3.addr(),
        Behaviour {
            cut_after: Some(700 * 1024),
            cuts: 4,
            bytes_per_sec: None,
        },
    )
    .await;
    let (gateway, gateway_url, stop) = h.extra_gateway(&proxy.url()).await;
    gateway.snapshots().apply([
        Change::ApplyVersion(model_version(
            "big",
            "1.0.0",
            vec![variant("cpu", artifact.clone(), Requirements::default())],
        )),
        Change::ApplyRollout(rollout("big").build()),
    ]);
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &gateway_url,
        facts("linux", "x86_64", 4096, &[]),
        None,
    );
    let device = agent.device.clone();
    eventually(
        Duration::from_secs(60),
        "the artifact to activate",
        || async { (device.active_version("big").as_deref() == Some("1.0.0")).then_some(()) },
    )
    .await;

    let connections = proxy.counters.connections.load(Ordering::SeqCst);
    let through_proxy = proxy.counters.downstream_bytes.load(Ordering::SeqCst);
    let body = device.stats.artifact_bytes.load(Ordering::SeqCst);
    assert!(
        connections >= 5,
        "the download was cut and resumed ({connections} connections)"
    );
    assert!(
        (through_proxy as f64) < 1.2 * SIZE as f64,
        "{through_proxy} bytes crossed the proxy for a {SIZE}-byte artifact"
    );
    assert!(
        body >= SIZE as u64 && (body as f64) < 1.2 * SIZE as f64,
        "{body} body bytes"
    );
    let active = device.state.active("big").expect("active");
    let bytes = std::fs::read(&active.path).expect("artifact on disk");
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        artifact.sha256
    );
    agent.stop().await;
    stop.cancel();
}
