//! Telemetry end to end against a real ClickHouse server (Debian's 18.16, started by the
//! tests): exactly-once counting, back-pressure without loss, exact gate metrics, and every
//! statement also run on a current engine (chdb).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgewise_agent::device::Device;
use edgewise_agent::simulate::{SimConfig, SimFleet};
use edgewise_agent::telemetry::{BufferConfig, Event, TelemetryBuffer};
use edgewise_core::rollout::Metric;
use edgewise_operator::telemetry::gates::{self, Slice};
use edgewise_operator::telemetry::ingest::{SinkConfig, TelemetrySink};
use edgewise_operator::telemetry::rows::{DeviceStatusRow, InferenceRow, ModelRow};
use edgewise_operator::telemetry::schema;
use edgewise_proto::fleet::fleet_client::FleetClient;
use edgewise_proto::fleet::{InferenceEvent, ModelEvent, ModelEventKind, TelemetryBatch};
use edgewise_proto::view::TelemetryBatchView;
use edgewise_tests::*;
use prost::Message;
use tonic::Code;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

#[allow(clippy::too_many_arguments)]
fn inference(
    id: String,
    version: &str,
    time_ms: i64,
    latency: f64,
    ok: bool,
    fallback: bool,
    shadow: i32,
) -> InferenceEvent {
    InferenceEvent {
        event_id: id,
        time_unix_ms: time_ms,
        model: "assistant".into(),
        version: version.into(),
        variant: "cpu".into(),
        target: "on-device".into(),
        on_device: true,
        rule: "default".into(),
        policy_version: "p1".into(),
        latency_ms: latency,
        ok,
        fallback_used: fallback,
        shadow,
        rollout: "fleet/assistant".into(),
        task: "chat".into(),
        data_class: "public".into(),
        ..InferenceEvent::default()
    }
}

fn model_event(id: String, version: &str, time_ms: i64, kind: ModelEventKind) -> ModelEvent {
    ModelEvent {
        event_id: id,
        time_unix_ms: time_ms,
        kind: kind as i32,
        model: "assistant".into(),
        version: version.into(),
        variant: "cpu".into(),
        rollout: "fleet/assistant".into(),
        ..ModelEvent::default()
    }
}

fn batch(
    device: &str,
    id: &str,
    inference: Vec<InferenceEvent>,
    model_events: Vec<ModelEvent>,
) -> TelemetryBatch {
    TelemetryBatch {
        batch_id: id.into(),
        device_id: device.into(),
        inference,
        model_events,
        dropped_events: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_record_what_they_applied() {
    let ch = ClickHouse::start().await;
    // ClickHouse::start migrated once; again is a no-op.
    let again = schema::migrate(&ch.client).await.expect("migrates again");
    assert!(again.applied.is_empty(), "{again:?}");
    assert!(
        again.server.starts_with("18.16"),
        "tests run on Debian's 18.16: {}",
        again.server
    );
    assert_eq!(again.skipped, [2], "TTL waits for a server that has it");
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.schema_migrations FINAL")
            .await,
        2,
        "1 and 3 applied"
    );
    for table in [
        "inference_events",
        "model_events",
        "device_status",
        "telemetry_batches",
    ] {
        assert_eq!(
            ch.count(&format!(
                "SELECT count() FROM system.tables WHERE database = 'edgewise' AND name = '{table}'"
            ))
            .await,
            1,
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_metrics_are_exact_late_events_land_in_their_window_and_retries_count_once() {
    let ch = ClickHouse::start().await;
    let sink = TelemetrySink::start(ch.client.clone(), SinkConfig::default());
    let now = now_ms();
    // Canary 2.0.0: latencies 1..=100 ms from 10 devices; 5 errors, 3 fallbacks, 20 shadows
    // of which 18 agree. Baseline 1.0.0: latencies 101..=200 ms, no errors.
    for d in 0..10 {
        let device = format!("dev-{d}");
        let canary: Vec<InferenceEvent> = (0..10)
            .map(|i| {
                let n = d * 10 + i; // 0..100
                let shadow = if n < 20 {
                    if n < 18 { 1 } else { 2 }
                } else {
                    0
                };
                inference(
                    format!("c-{n}"),
                    "2.0.0",
                    now - 60_000,
                    f64::from(n + 1),
                    n >= 5,
                    n < 3,
                    shadow,
                )
            })
            .collect();
        let baseline: Vec<InferenceEvent> = (0..10)
            .map(|i| {
                let n = d * 10 + i;
                inference(
                    format!("b-{n}"),
                    "1.0.0",
                    now - 60_000,
                    f64::from(n + 101),
                    true,
                    false,
                    0,
                )
            })
            .collect();
        let installs = vec![model_event(
            format!("m-{d}"),
            "2.0.0",
            now - 120_000,
            if d < 2 {
                ModelEventKind::InstallFailed
            } else {
                ModelEventKind::Activated
            },
        )];
        let mut all = canary;
        all.extend(baseline);
        sink.submit(
            &device,
            &batch(&device, &format!("batch-{d}"), all, installs),
        )
        .await
        .expect("stored");
    }
    // A batch retried after a lost ack: the same events again.
    let retry = batch(
        "dev-0",
        "batch-0",
        vec![inference(
            "c-0".into(),
            "2.0.0",
            now - 60_000,
            1.0,
            false,
            true,
            1,
        )],
        vec![],
    );
    let duplicate = sink
        .submit("dev-0", &retry)
        .await
        .expect("stored")
        .duplicate;
    assert!(duplicate, "the replica recognises the retry");
    // A late event: uploaded now, but it happened 5 minutes ago (inside a 10-minute window)…
    sink.submit(
        "dev-late",
        &batch(
            "dev-late",
            "late",
            vec![inference(
                "late-1".into(),
                "2.0.0",
                now - 300_000,
                1000.0,
                true,
                false,
                0,
            )],
            vec![],
        ),
    )
    .await
    .expect("stored");
    // …and one from 2 hours ago, outside the window.
    sink.submit(
        "dev-old",
        &batch(
            "dev-old",
            "old",
            vec![inference(
                "old-1".into(),
                "2.0.0",
                now - 7_200_000,
                5000.0,
                false,
                false,
                0,
            )],
            vec![],
        ),
    )
    .await
    .expect("stored");

    let m = gates::gate_metrics(
        &ch.client,
        "fleet/assistant",
        "assistant",
        "2.0.0",
        "1.0.0",
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .await
    .expect("queries");
    // 101 canary samples in the window from 11 devices: dev-d's ten at d·10+1..=d·10+10 ms
    // and dev-late's one at 1000 ms. Devices are weighed, not samples: each device's own
    // quantile (quantileExact takes the element at floor(level × n)), then the mean over
    // devices without the lowest and the highest (docs/telemetry.md).
    assert_eq!(m.canary.samples, 101);
    assert_eq!(m.canary.devices, 11);
    // p50s 6, 16, …, 96 and 1000: without 6 and 1000, the mean of 16..=96.
    assert_eq!(m.canary.values[&Metric::LatencyP50Ms], 56.0);
    // p95s and p99s 10, 20, …, 100 and 1000: the mean of 20..=100.
    assert_eq!(m.canary.values[&Metric::LatencyP95Ms], 60.0);
    assert_eq!(m.canary.values[&Metric::LatencyP99Ms], 60.0);
    // All 5 errors and 3 fallbacks are dev-0's: one device, set aside as the highest.
    assert_eq!(m.canary.values[&Metric::ErrorRate], 0.0);
    assert_eq!(m.canary.values[&Metric::FallbackRate], 0.0);
    // Shadows on two devices only (10/10 and 8/10 agree): nothing to set aside.
    assert_eq!(m.canary.values[&Metric::CloudAgreementRate], 0.9);
    // Two of ten devices failed their install: one is set aside, one of eight remains.
    assert_eq!(m.canary.values[&Metric::InstallFailureRate], 1.0 / 8.0);
    assert_eq!(m.baseline.samples, 100);
    assert_eq!(m.baseline.values[&Metric::LatencyP50Ms], 151.0);
    assert_eq!(m.baseline.values[&Metric::ErrorRate], 0.0);
    assert!(
        !m.baseline.values.contains_key(&Metric::CloudAgreementRate),
        "no shadows, no value"
    );

    // An empty slice has no values rather than zeros.
    let empty = gates::metric_set(
        &ch.client,
        Slice {
            rollout: "fleet/assistant",
            model: "assistant",
            version: "9.9.9",
        },
        SystemTime::now() - Duration::from_secs(600),
        SystemTime::now(),
    )
    .await
    .expect("queries");
    assert_eq!((empty.samples, empty.values.len()), (0, 0));

    // Version skew from device status, latest status per device wins.
    let status = |device: &str, version: &str, ms: u64| DeviceStatusRow {
        device_id: device.into(),
        updated_at: (ms / 1000) as u32,
        updated_ms: ms,
        connected: 1,
        installed_models: vec!["assistant".into()],
        installed_versions: vec![version.into()],
        ..DeviceStatusRow::default()
    };
    let t = now as u64;
    for (device, version) in [("a", "1.0.0"), ("b", "1.0.0"), ("c", "2.0.0")] {
        sink.device_status(status(device, version, t));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.device_status(status("b", "2.0.0", t + 10));
    let skew = eventually(Duration::from_secs(10), "skew", || async {
        let s = gates::version_skew(&ch.client, "assistant").await.ok()?;
        (s == [("1.0.0".to_owned(), 1), ("2.0.0".to_owned(), 2)]).then_some(s)
    })
    .await;
    assert_eq!(skew.len(), 2);
}

/// Simulated devices with durable buffers and uploaders, pointed at `gateway_url`.
fn fleet(h: &Harness, devices: usize) -> SimFleet {
    SimFleet::start(&SimConfig {
        devices,
        gateway: h.gateway_url(),
        tls: tls_for(&h.gateway_url()),
        bootstrap_tokens: vec![TOKEN.into()],
        data_dir: h.dir.path().join("sim"),
        backoff: quick_backoff(),
        devices_per_connection: 10,
        telemetry: true,
        traffic: None,
        runtime: false,
    })
    .expect("fleet starts")
}

/// Gates weigh devices, not samples: five honest devices and one hostile one that sends
/// 5,000 samples saying the opposite, through the real sink into ClickHouse, judged by the
/// rollout's own gate evaluation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hostile_device_neither_rolls_back_a_healthy_canary_nor_passes_a_bad_one() {
    use edgewise_core::rollout::{AnalysisSpec, Verdict, analysis};
    let ch = ClickHouse::start().await;
    let sink = TelemetrySink::start(ch.client.clone(), SinkConfig::default());
    let now = now_ms();
    let send = |device: String, version: &'static str, n: usize, latency: f64, errors: usize| {
        let sink = &sink;
        async move {
            let events = (0..n)
                .map(|i| {
                    inference(
                        format!("{device}-{version}-{i}"),
                        version,
                        now - 60_000,
                        latency,
                        i >= errors,
                        false,
                        0,
                    )
                })
                .collect();
            let id = format!("{device}-{version}");
            sink.submit(&device, &batch(&device, &id, events, vec![]))
                .await
                .expect("stored");
        }
    };
    for d in 0..5 {
        // 3.0.0 is healthy: ~100 ms, no errors. 4.0.0 is bad: ~900 ms, a fifth failing.
        send(format!("honest-{d}"), "3.0.0", 40, 100.0 + f64::from(d), 0).await;
        send(format!("honest-{d}"), "4.0.0", 40, 900.0 + f64::from(d), 8).await;
    }
    send("hostile".into(), "3.0.0", 5_000, 10_000.0, 5_000).await;
    send("hostile".into(), "4.0.0", 5_000, 1.0, 0).await;

    let spec: AnalysisSpec = serde_json::from_value(serde_json::json!({
        "minDevices": 3,
        "minSamples": 50,
        "gates": [
            {"metric": "latency_p95_ms", "max": 500.0},
            {"metric": "error_rate", "max": 0.05}
        ]
    }))
    .expect("spec");
    for (version, expected) in [("3.0.0", Verdict::Pass), ("4.0.0", Verdict::Fail)] {
        let m = gates::gate_metrics(
            &ch.client,
            "fleet/assistant",
            "assistant",
            version,
            "1.0.0",
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .await
        .expect("queries");
        assert_eq!(m.canary.devices, 6);
        assert_eq!(
            m.canary.samples, 5_200,
            "every sample is stored and counted"
        );
        let run = analysis::evaluate(&spec, &m, jiff::Timestamp::now());
        assert_eq!(run.verdict, expected, "{version}: {run:?} from {m:?}");
    }
}

async fn append(device: &Arc<Device>, from: usize, n: usize) {
    let buffer = device.telemetry.as_ref().expect("telemetry");
    let now = now_ms();
    let events: Vec<Event> = (from..from + n)
        .map(|i| {
            Event::Inference(inference(
                format!("{}-{i}", device.device_id),
                "1.0.0",
                now - 1000,
                10.0,
                true,
                false,
                0,
            ))
        })
        .collect();
    for chunk in events.chunks(2_500) {
        buffer.append(chunk.to_vec()).await.expect("appends");
    }
}

/// Waits until every device's buffer is acknowledged.
async fn all_drained(fleet: &SimFleet) {
    eventually(
        Duration::from_secs(120),
        "every buffer to drain",
        || async { drained(fleet).await.then_some(()) },
    )
    .await;
}

async fn drained(fleet: &SimFleet) -> bool {
    fleet
        .devices()
        .iter()
        .all(|d| d.telemetry.as_ref().is_some_and(|b| b.is_drained()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_times_ten_thousand_events_arrive_exactly_once() {
    let ch = ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let fleet = fleet(&h, 50);
    for d in fleet.devices() {
        append(d, 0, 10_000).await;
    }
    all_drained(&fleet).await;
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL")
            .await,
        500_000
    );
    assert_eq!(
        ch.count("SELECT uniqExact(device_id, event_id) FROM edgewise.inference_events")
            .await,
        500_000
    );
    assert_eq!(
        ch.count("SELECT sum(inference_events) FROM edgewise.telemetry_batches FINAL")
            .await,
        500_000
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_under_load_loses_nothing_and_counts_nothing_twice() {
    let mut ch = ClickHouse::start().await;
    let sink = SinkConfig {
        max_queued_bytes: 3 << 20,
        ..SinkConfig::default()
    };
    let h = Harness::start_with_telemetry(&ch.url(), sink.clone()).await;
    let fleet = fleet(&h, 20);
    let mut total = 0;
    for round in 0..6 {
        for d in fleet.devices() {
            append(d, round * 1_000, 1_000).await;
        }
        total += 20 * 1_000;
        if round == 2 {
            ch.server.stop().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if round == 4 {
            ch.server.restart().await.expect("restarts");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    all_drained(&fleet).await;
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL")
            .await,
        total as u64,
        "nothing lost"
    );
    assert_eq!(
        ch.count("SELECT uniqExact(device_id, event_id) FROM edgewise.inference_events")
            .await,
        total as u64,
        "nothing counted twice"
    );
    let stats = h.gateway.telemetry().expect("sink").stats();
    assert!(
        stats.pushed_back.load(Ordering::Relaxed) > 0,
        "the gateway pushed back while ClickHouse was down"
    );
    assert!(stats.insert_failures.load(Ordering::Relaxed) > 0);
    let high = stats.queued_bytes_high_water.load(Ordering::Relaxed);
    assert!(
        high <= sink.max_queued_bytes,
        "gateway memory bounded: {high} bytes queued at most"
    );
    fleet.stop().await;
}

/// A freshly enrolled device: its identity and credential.
async fn enroll(
    url: &str,
) -> (
    edgewise_agent::identity::Identity,
    edgewise_proto::fleet::EnrollResponse,
) {
    let id = edgewise_agent::identity::Identity::ephemeral();
    let enrolled = FleetClient::new(fleet_channel(url))
        .enroll(id.enroll_request(
            TOKEN,
            &facts("linux", "x86_64", 4096, &[]),
            &Default::default(),
        ))
        .await
        .expect("enrolls")
        .into_inner();
    (id, enrolled)
}

/// Uploads a body as it is (bytes no `TelemetryBatch` value can hold).
async fn upload_raw(
    url: &str,
    credential: &str,
    body: Vec<u8>,
) -> Result<edgewise_proto::fleet::TelemetryAck, tonic::Status> {
    unary_raw(
        url,
        credential,
        edgewise_proto::codec::UPLOAD_TELEMETRY_PATH,
        body,
    )
    .await
}

/// A unary call to `path` with `body` as the request bytes, whatever they are.
async fn unary_raw<U: prost::Message + Default + Send + 'static>(
    url: &str,
    credential: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<U, tonic::Status> {
    let mut grpc = raw_grpc(url).await;
    grpc.unary(
        with_credential(bytes::Bytes::from(body), credential),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        edgewise_proto::codec::PreEncodedCodec::<U>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn upload(
    url: &str,
    credential: &str,
    b: TelemetryBatch,
) -> Result<edgewise_proto::fleet::TelemetryAck, tonic::Status> {
    let mut client = FleetClient::new(fleet_channel(url));
    client
        .upload_telemetry(with_credential(b, credential))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_lost_ack_even_to_another_gateway_is_counted_once() {
    let ch = ClickHouse::start().await;
    let a = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let b = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let (id, enrolled) = enroll(&a.gateway_url()).await;
    let now = now_ms();
    let events: Vec<InferenceEvent> = (0..500)
        .map(|i| inference(format!("e-{i}"), "1.0.0", now - 1000, 5.0, true, false, 0))
        .collect();
    let one = batch(id.device_id(), "b-1", events, vec![]);
    let first = upload(&a.gateway_url(), &enrolled.credential, one.clone())
        .await
        .expect("stored on A");
    assert_eq!((first.accepted, first.duplicate), (500, false));
    // The ack was lost: the agent retries on A, then (A gone from its view) on B.
    assert!(
        upload(&a.gateway_url(), &enrolled.credential, one.clone())
            .await
            .expect("again on A")
            .duplicate
    );
    upload(&b.gateway_url(), &enrolled.credential, one)
        .await
        .expect("again on B");
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL")
            .await,
        500
    );
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.telemetry_batches FINAL")
            .await,
        1
    );
    let m = gates::metric_set(
        &ch.client,
        Slice {
            rollout: "fleet/assistant",
            model: "assistant",
            version: "1.0.0",
        },
        SystemTime::now() - Duration::from_secs(600),
        SystemTime::now() + Duration::from_secs(1),
    )
    .await
    .expect("queries");
    assert_eq!(m.samples, 500, "gate metrics count it once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_rejected_naming_the_problem() {
    let ch = ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let (id, enrolled) = enroll(&h.gateway_url()).await;
    let now = now_ms();
    let good = |n: &str| inference(n.into(), "1.0.0", now, 5.0, true, false, 0);
    let mut nan = good("nan");
    nan.latency_ms = f64::NAN;
    let mut future = good("future");
    future.time_unix_ms = now + 86_400_000;
    let mut no_id = good("");
    no_id.event_id.clear();
    let mut long = good("long");
    long.rule = "r".repeat(300);
    let bad_kind = ModelEvent {
        kind: 99,
        ..model_event("m".into(), "1.0.0", now, ModelEventKind::Activated)
    };

    // A bad event is refused alone, with its index and reason; the rest of its batch is
    // stored (3 good events here).
    let mixed = batch(
        id.device_id(),
        "mixed",
        vec![good("a"), nan, future, good("b"), no_id, long],
        vec![
            bad_kind,
            model_event("m-ok".into(), "1.0.0", now, ModelEventKind::Activated),
        ],
    );
    let mut body =
        TelemetryBatchView::decode(bytes::Bytes::from(mixed.encode_to_vec())).expect("decodes");
    // Text that is not UTF-8 (no `TelemetryBatch` value can hold it), in a seventh event.
    let mut not_utf8 = TelemetryBatchView::decode(bytes::Bytes::from(
        batch(id.device_id(), "x", vec![good("c")], vec![]).encode_to_vec(),
    ))
    .expect("decodes")
    .inference
    .remove(0);
    not_utf8.model = bytes::Bytes::from_static(&[0x61, 0xff, 0xfe]);
    body.inference.push(not_utf8);
    let ack = upload_raw(&h.gateway_url(), &enrolled.credential, body.encode_to_vec())
        .await
        .expect("the batch is stored without its bad events");
    let refused: Vec<(String, String)> = ack
        .rejected
        .iter()
        .map(|r| (r.event.clone(), r.reason.clone()))
        .collect();
    let expected = [
        (
            "inference[1]",
            "inference[1].latency_ms must be finite and >= 0",
        ),
        ("inference[2]", "inference[2].time_unix_ms"),
        ("inference[4]", "inference[4].event_id is required"),
        ("inference[5]", "inference[5].rule is longer than 256 bytes"),
        ("inference[6]", "inference[6].model is not UTF-8"),
        (
            "model_events[0]",
            "model_events[0].kind 99 is not a ModelEventKind",
        ),
    ];
    assert_eq!(refused.len(), expected.len(), "{refused:?}");
    for ((event, reason), (want_event, want_reason)) in refused.iter().zip(expected) {
        assert_eq!(event, want_event);
        assert!(reason.contains(want_reason), "{reason} lacks {want_reason}");
    }
    assert_eq!(ack.accepted, 3, "a, b and m-ok");
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL")
            .await,
        2
    );
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.model_events FINAL")
            .await,
        1
    );
    assert_eq!(
        h.gateway
            .telemetry()
            .expect("sink")
            .stats()
            .events_rejected
            .load(Ordering::Relaxed),
        6
    );

    // What is wrong with the batch itself refuses the batch.
    let cases = [
        (
            batch(id.device_id(), "", vec![good("d")], vec![]).encode_to_vec(),
            Code::InvalidArgument,
            "batch_id is required",
        ),
        (
            batch("dev-someone-else", "x", vec![good("d")], vec![]).encode_to_vec(),
            Code::PermissionDenied,
            "not the credential's device",
        ),
        (
            vec![0x1a, 0xff, 0xff, 0xff],
            Code::Internal,
            "failed to decode Protobuf message",
        ),
    ];
    for (body, code, words) in cases {
        let err = upload_raw(&h.gateway_url(), &enrolled.credential, body)
            .await
            .expect_err("rejected");
        assert_eq!(err.code(), code, "{words}: {err:?}");
        assert!(err.message().contains(words), "{words}: {}", err.message());
    }
    // The same undecodable bytes get the same status from Enroll (tonic's own decoder).
    let err = unary_raw::<edgewise_proto::fleet::EnrollResponse>(
        &h.gateway_url(),
        &enrolled.credential,
        "/edgewise.v1.Fleet/Enroll",
        vec![0x1a, 0xff, 0xff, 0xff],
    )
    .await
    .expect_err("rejected");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("failed to decode Protobuf message"),
        "{}",
        err.message()
    );
    // A good batch still goes through.
    upload(
        &h.gateway_url(),
        &enrolled.credential,
        batch(id.device_id(), "good", vec![good("e")], vec![]),
    )
    .await
    .expect("stored");
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL")
            .await,
        3
    );
}

/// The canary speaks only through its cohort: a device the gateway did not put in a
/// rollout's canary cohort has its canary-version events refused (each alone, counted),
/// while its stable-version events and a cohort device's canary events are stored. A
/// rollout speaks only through the devices it selects by their enrolment labels (what it
/// asks of self-reported facts aside): the harness's devices (`tier=test`) cannot report for
/// a rollout of `tier=prod` devices, whatever OS they claim; nor for a variant the version
/// does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_canary_cohort_reports_for_the_canary() {
    use edgewise_core::selector::{DeviceSelector, SelectorOperator, SelectorRequirement};
    let ch = ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let selecting = |tier: &str| DeviceSelector {
        match_labels: std::collections::BTreeMap::from([("tier".to_owned(), tier.to_owned())]),
        match_expressions: vec![SelectorRequirement {
            key: "self.edgewise.dev/os".into(),
            operator: SelectorOperator::In,
            values: vec!["android".into()],
        }],
    };
    h.apply([
        edgewise_operator::gateway::Change::ApplyRollout(
            rollout("assistant")
                .named("assistant")
                .stable("1.0.0")
                .canary("2.0.0", 30)
                .build(),
        ),
        edgewise_operator::gateway::Change::ApplyRollout(
            rollout("assistant")
                .named("prod")
                .selector(selecting("prod"))
                .build(),
        ),
        edgewise_operator::gateway::Change::ApplyRollout(
            rollout("assistant")
                .named("test")
                .selector(selecting("test"))
                .build(),
        ),
    ]);
    let in_cohort = |id: &str| {
        edgewise_core::cohort::bucket_in_cohort(
            edgewise_core::cohort::bucket("fleet/assistant", id),
            30,
        )
    };
    let (mut inside, mut outside) = (None, None);
    while inside.is_none() || outside.is_none() {
        let (id, enrolled) = enroll(&h.gateway_url()).await;
        let slot = if in_cohort(id.device_id()) {
            &mut inside
        } else {
            &mut outside
        };
        slot.get_or_insert((id, enrolled));
    }
    let now = now_ms();
    let event = |n: &str, version: &str| inference(n.into(), version, now, 5.0, true, false, 0);
    let (id, enrolled) = outside.expect("a device outside the cohort");
    let ack = upload(
        &h.gateway_url(),
        &enrolled.credential,
        batch(
            id.device_id(),
            "outside",
            vec![event("o-canary", "2.0.0"), event("o-stable", "1.0.0")],
            vec![],
        ),
    )
    .await
    .expect("stored without the forged event");
    assert_eq!(ack.accepted, 1);
    assert_eq!(ack.rejected.len(), 1, "{ack:?}");
    assert_eq!(ack.rejected[0].event, "inference[0]");
    assert!(
        ack.rejected[0].reason.contains("not in its cohort"),
        "{}",
        ack.rejected[0].reason
    );
    let (id, enrolled) = inside.expect("a device in the cohort");
    let ack = upload(
        &h.gateway_url(),
        &enrolled.credential,
        batch(
            id.device_id(),
            "inside",
            vec![event("i-canary", "2.0.0")],
            vec![],
        ),
    )
    .await
    .expect("stored");
    assert_eq!((ack.accepted, ack.rejected.len()), (1, 0), "{ack:?}");
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL WHERE version = '2.0.0'")
            .await,
        1,
        "only the cohort's canary event"
    );

    // The device is `tier=test` and says nothing of Android: it reports for `test`, never
    // for `prod`.
    let under = |n: &str, rollout: &str| InferenceEvent {
        rollout: rollout.into(),
        ..event(n, "1.0.0")
    };
    let ack = upload(
        &h.gateway_url(),
        &enrolled.credential,
        batch(
            id.device_id(),
            "selectors",
            vec![under("s-prod", "fleet/prod"), under("s-test", "fleet/test")],
            vec![],
        ),
    )
    .await
    .expect("stored without the forged event");
    assert_eq!((ack.accepted, ack.rejected.len()), (1, 1), "{ack:?}");
    assert!(
        ack.rejected[0]
            .reason
            .contains("does not select this device"),
        "{}",
        ack.rejected[0].reason
    );

    // A variant must be one the version lists: `cpu` is, `npu` is not.
    let cpu = h.put_artifact("assistant/cpu", artifact_bytes(64, 1)).await;
    h.apply([edgewise_operator::gateway::Change::ApplyVersion(
        model_version(
            "assistant",
            "1.0.0",
            vec![variant("cpu", cpu, Default::default())],
        ),
    )]);
    let ack = upload(
        &h.gateway_url(),
        &enrolled.credential,
        batch(
            id.device_id(),
            "variants",
            vec![
                under("v-cpu", "fleet/test"),
                InferenceEvent {
                    variant: "npu".into(),
                    ..under("v-npu", "fleet/test")
                },
            ],
            vec![],
        ),
    )
    .await
    .expect("stored without the forged event");
    assert_eq!((ack.accepted, ack.rejected.len()), (1, 1), "{ack:?}");
    assert!(
        ack.rejected[0].reason.contains("npu is not a variant"),
        "{}",
        ack.rejected[0].reason
    );
}

/// Uploads are bounded in bytes: 6,000 failures with 4 KiB error messages (24 MiB, six
/// times the gateway's message limit) all arrive, including a 5,000-event batch an older
/// agent had already cut by events alone, which the gateway refuses as too large and the
/// agent splits rather than retrying as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_storm_of_4_kib_messages_uploads_completely() {
    let ch = ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let dir = h.dir.path().join("device");
    let buffer = TelemetryBuffer::open(
        &dir.join("telemetry"),
        BufferConfig {
            max_bytes: 64 << 20,
            segment_bytes: 8 << 20,
            durable: false,
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    let now = now_ms();
    let message = "e".repeat(4096);
    for chunk in 0..6 {
        let events = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| {
                let mut e = inference(
                    format!("storm-{i}"),
                    "1.0.0",
                    now - 1000,
                    5.0,
                    false,
                    false,
                    0,
                );
                e.error.clone_from(&message);
                Event::Inference(e)
            })
            .collect();
        buffer.append(events).await.expect("appends");
    }
    let pinned = buffer
        .next_batch(5_000, usize::MAX)
        .expect("reads")
        .expect("a batch");
    assert!(
        pinned.encoded_events.len() > 4 << 20,
        "in flight: {} bytes, over the gateway's limit",
        pinned.encoded_events.len()
    );
    let agent = TestAgentWithTelemetry::start(&dir, &h.gateway_url(), buffer);
    eventually(Duration::from_secs(120), "the storm uploaded", || async {
        agent.buffer.is_drained().then_some(())
    })
    .await;
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.inference_events FINAL WHERE length(error) = 4096")
            .await,
        6_000,
        "every event, with its whole message"
    );
    assert_eq!(
        ch.count("SELECT sum(dropped_events) FROM edgewise.telemetry_batches FINAL")
            .await,
        0,
        "nothing dropped"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_the_oldest_and_the_drop_count_reaches_clickhouse() {
    let ch = ClickHouse::start().await;
    let mut h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let dir = h.dir.path().join("device");
    // A device whose uploads cannot get through while it buffers 5,000 events in 64 KiB.
    h.stop_gateway().await;
    let buffer = TelemetryBuffer::open(
        &dir.join("telemetry"),
        BufferConfig {
            max_bytes: 64 << 10,
            segment_bytes: 8 << 10,
            durable: true,
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    let now = now_ms();
    for chunk in 0..50 {
        let events = (chunk * 100..(chunk + 1) * 100)
            .map(|i| {
                Event::Inference(inference(
                    format!("e-{i}"),
                    "1.0.0",
                    now - 1000,
                    5.0,
                    true,
                    false,
                    0,
                ))
            })
            .collect();
        buffer.append(events).await.expect("appends");
    }
    let dropped = buffer.unreported_drops();
    assert!(dropped > 0, "the bound forced drops");
    h.restart_gateway().await;
    let agent = TestAgentWithTelemetry::start(&dir, &h.gateway_url(), buffer);
    eventually(Duration::from_secs(60), "buffer drained", || async {
        agent.buffer.is_drained().then_some(())
    })
    .await;
    let delivered = ch
        .count("SELECT count() FROM edgewise.inference_events FINAL")
        .await;
    let reported = ch
        .count("SELECT sum(dropped_events) FROM edgewise.telemetry_batches FINAL")
        .await;
    assert_eq!(reported, dropped, "the drop count arrived in ClickHouse");
    assert_eq!(
        delivered + reported,
        5_000,
        "every event is delivered or counted as dropped"
    );
    agent.stop().await;
}

/// One in-process agent that uploads from a given buffer.
struct TestAgentWithTelemetry {
    buffer: Arc<TelemetryBuffer>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestAgentWithTelemetry {
    fn start(dir: &std::path::Path, gateway: &str, buffer: Arc<TelemetryBuffer>) -> Self {
        use edgewise_agent::device::DeviceParts;
        let device = Device::new(DeviceParts {
            identity: edgewise_agent::identity::Identity::load_or_create(dir, true)
                .expect("identity"),
            content: Arc::new(
                edgewise_agent::store::ContentStore::open(&dir.join("store"), true).expect("store"),
            ),
            state: edgewise_agent::store::ModelState::ephemeral(),
            policy: Arc::new(edgewise_agent::policy::PolicyStore::ephemeral()),
            facts: facts("linux", "x86_64", 4096, &[]),
            labels: Default::default(),
            publisher: None,
            bootstrap_token: TOKEN.into(),
            backoff: quick_backoff(),
            collect_garbage: false,
            telemetry: Some(buffer.clone()),
            runtime: None,
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let channel = fleet_channel(gateway);
        let tasks = vec![
            tokio::spawn(edgewise_agent::sync::run(
                device.clone(),
                channel.clone(),
                stop.clone(),
            )),
            tokio::spawn(edgewise_agent::telemetry::uploader::run(
                device,
                buffer.clone(),
                channel,
                stop.clone(),
            )),
        ];
        TestAgentWithTelemetry {
            buffer,
            stop,
            tasks,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migrate_command_applies_the_schema_and_can_run_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = edgewise_dev::clickhouse_server::ClickHouseServer::start(dir.path())
        .await
        .expect("starts");
    for round in 0..2 {
        let stdout = stdout_of(
            std::process::Command::new(workspace_binary("edgewise-operator")).args([
                "migrate",
                "--clickhouse-url",
                &server.url(),
            ]),
        );
        let applied = if round == 0 {
            "applied [1, 3]"
        } else {
            "applied []"
        };
        assert!(
            stdout.contains(applied) && stdout.contains("skipped [2]"),
            "round {round}: {stdout}"
        );
    }
}

/// Rows are written as RowBinary straight from the upload's bytes: every field must land in
/// its own column, read back through the typed rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_lands_in_its_column() {
    let ch = ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let (id, enrolled) = enroll(&h.gateway_url()).await;
    let now = now_ms();
    let event = InferenceEvent {
        event_id: "e-1".into(),
        time_unix_ms: now - 1_234,
        model: "assistant".into(),
        version: "2.1.0".into(),
        variant: "gpu-fp16".into(),
        target: "cloud-large".into(),
        on_device: false,
        rule: "long-context".into(),
        policy_version: "65f881e7".into(),
        latency_ms: 812.25,
        ok: false,
        fallback_used: true,
        error: "upstream timeout".into(),
        input_tokens: 9_000,
        output_tokens: 321,
        cost_usd: 0.0125,
        shadow: 2,
        task: "summarize".into(),
        data_class: "internal".into(),
        rollout: "fleet/assistant".into(),
        router_version: "0.3.0".into(),
        first_token_ms: 143.5,
    };
    let model = ModelEvent {
        event_id: "m-1".into(),
        time_unix_ms: now - 5_000,
        kind: ModelEventKind::InstallFailed as i32,
        model: "assistant".into(),
        version: "2.1.0".into(),
        variant: "gpu-fp16".into(),
        duration_ms: 4_321,
        bytes: 1 << 33,
        error: "SHA-256 mismatch".into(),
        rollout: "fleet/assistant".into(),
    };
    let b = batch(id.device_id(), "b-cols", vec![event], vec![model]);
    upload(&h.gateway_url(), &enrolled.credential, b)
        .await
        .expect("stored");
    let rows = ch
        .client
        .query("SELECT ?fields FROM edgewise.inference_events")
        .fetch_all::<InferenceRow>()
        .await
        .expect("reads");
    let received_at = rows.first().map_or(0, |r| r.received_at);
    assert!(u64::from(received_at).abs_diff((now / 1000) as u64) < 60);
    assert_eq!(
        rows,
        vec![InferenceRow {
            time: ((now - 1_234) / 1000) as u32,
            time_ms: (now - 1_234) as u64,
            device_id: id.device_id().into(),
            event_id: "e-1".into(),
            batch_id: "b-cols".into(),
            rollout: "fleet/assistant".into(),
            model: "assistant".into(),
            version: "2.1.0".into(),
            variant: "gpu-fp16".into(),
            target: "cloud-large".into(),
            on_device: 0,
            rule: "long-context".into(),
            policy_version: "65f881e7".into(),
            latency_ms: 812.25,
            ok: 0,
            fallback_used: 1,
            error: "upstream timeout".into(),
            input_tokens: 9_000,
            output_tokens: 321,
            cost_usd: 0.0125,
            shadow: 2,
            task: "summarize".into(),
            data_class: "internal".into(),
            received_at,
            router_version: "0.3.0".into(),
            first_token_ms: 143.5,
        }]
    );
    let rows = ch
        .client
        .query("SELECT ?fields FROM edgewise.model_events")
        .fetch_all::<ModelRow>()
        .await
        .expect("reads");
    assert_eq!(
        rows,
        vec![ModelRow {
            time: ((now - 5_000) / 1000) as u32,
            time_ms: (now - 5_000) as u64,
            device_id: id.device_id().into(),
            event_id: "m-1".into(),
            batch_id: "b-cols".into(),
            rollout: "fleet/assistant".into(),
            kind: ModelEventKind::InstallFailed as i8,
            model: "assistant".into(),
            version: "2.1.0".into(),
            variant: "gpu-fp16".into(),
            duration_ms: 4_321,
            bytes: 1 << 33,
            error: "SHA-256 mismatch".into(),
            received_at,
        }]
    );
}

/// A gateway process killed after its ClickHouse INSERT went through and before it
/// acknowledged the batch (ClickHouse's answer held back by a proxy, so the moment is
/// certain) loses and double-counts nothing: the agent sends the same batch, under the same
/// id, to the restarted gateway, and the rows collapse to one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_insert_and_ack_loses_and_double_counts_nothing() {
    use k8s_openapi::api::core::v1::Secret;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let ch = ClickHouse::start().await;
    let proxy = FaultProxy::start(
        ch.url()
            .trim_start_matches("http://")
            .parse()
            .expect("ClickHouse address"),
    )
    .await;
    let api = edgewise_dev::devapi::DevApi::start(&dir.path().join("api"), loopback())
        .await
        .expect("api");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let client =
        kube::Client::try_from(kube::Config::new(api.url().parse().expect("url"))).expect("client");
    kube::Api::<Secret>::namespaced(client, "default")
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "fleet", "labels": {"edgewise.dev/bootstrap-token": "true"}},
                // As manifests usually carry it: the API server stores it as `data`.
                "stringData": {"token": TOKEN},
            }))
            .expect("secret"),
        )
        .await
        .expect("bootstrap token");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::write(
        keys.join("k.key"),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [5u8; 32]),
    )
    .expect("key");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .to_string()
    };
    let (grpc, health) = (free(), free());
    let pki = test_pki();
    let gateway = || {
        std::process::Command::new(workspace_binary("edgewise-operator"))
            .args(["gateway", "--namespace", "default"])
            .args(["--gateway-addr", &grpc, "--health-addr", &health])
            .args(["--clickhouse-url", &format!("http://{}", proxy.addr)])
            .args(["--s3-endpoint", "http://127.0.0.1:9"])
            .args(["--s3-access-key-id", "a", "--s3-secret-access-key", "b"])
            .arg("--credential-keys-dir")
            .arg(&keys)
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("starts")
    };
    let ready = |health: String| async move {
        eventually(Duration::from_secs(30), "the gateway ready", || {
            let health = health.clone();
            async move {
                let r = reqwest::get(format!("http://{health}/readyz")).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    };
    let mut first = gateway();
    ready(health.clone()).await;

    // 500 events buffered on a device; ClickHouse's answers held back from now on.
    let device_dir = dir.path().join("device");
    let buffer = TelemetryBuffer::open(
        &device_dir.join("telemetry"),
        BufferConfig {
            max_bytes: 16 << 20,
            segment_bytes: 1 << 20,
            durable: true,
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    let now = now_ms();
    let events = (0..500)
        .map(|i| {
            Event::Inference(inference(
                format!("k-{i}"),
                "1.0.0",
                now - 1000,
                5.0,
                true,
                false,
                0,
            ))
        })
        .collect();
    buffer.append(events).await.expect("appends");
    proxy.set(Fault::Deaf);
    let agent = TestAgentWithTelemetry::start(&device_dir, &format!("https://{grpc}"), buffer);
    let inserted = "SELECT count() FROM edgewise.inference_events WHERE event_id LIKE 'k-%'";
    eventually(
        Duration::from_secs(30),
        "the INSERT to reach ClickHouse",
        || async { (ch.count(inserted).await == 500).then_some(()) },
    )
    .await;
    assert!(
        !agent.buffer.is_drained(),
        "not acknowledged: the answer is held"
    );
    std::process::Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status()
        .expect("kill");
    first.wait().expect("reaped");

    // The next gateway takes the resent batch.
    proxy.set(Fault::Pass);
    let mut second = gateway();
    ready(health.clone()).await;
    eventually(
        Duration::from_secs(60),
        "the batch acknowledged",
        || async { agent.buffer.is_drained().then_some(()) },
    )
    .await;
    let once = "SELECT count() FROM edgewise.inference_events FINAL WHERE event_id LIKE 'k-%'";
    assert_eq!(ch.count(once).await, 500, "every event, once");
    assert_eq!(
        ch.count(
            "SELECT uniqExact(event_id) FROM edgewise.inference_events WHERE event_id LIKE 'k-%'"
        )
        .await,
        500
    );
    assert_eq!(
        ch.count("SELECT count() FROM edgewise.telemetry_batches FINAL")
            .await,
        1,
        "one batch, counted once"
    );
    agent.stop().await;
    let _ = second.kill();
    let _ = second.wait();
    api.stop().await;
}
