//! Telemetry benchmarks (a bench binary, not timed tests):
//!
//! ```text
//! cargo bench -p edgewise-tests --bench telemetry            # both
//! cargo bench -p edgewise-tests --bench telemetry -- ingest  # agents → gateway → ClickHouse vs clickhouse-client
//! cargo bench -p edgewise-tests --bench telemetry -- append  # agent buffer, group commit
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgewise_agent::config::Backoff;
use edgewise_agent::simulate::{SimConfig, SimFleet};
use edgewise_agent::telemetry::{BufferConfig, Event, TelemetryBuffer};
use edgewise_operator::telemetry::ingest::SinkConfig;
use edgewise_proto::fleet::InferenceEvent;
use edgewise_tests::*;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn event(device: &str, i: usize, now: i64) -> InferenceEvent {
    InferenceEvent {
        event_id: format!("{device}-{i}"),
        time_unix_ms: now - (i as i64 % 3_600_000),
        model: "assistant".into(),
        version: "2.1.0".into(),
        variant: "cpu-onnx-int8".into(),
        target: "on-device".into(),
        on_device: true,
        rule: "default".into(),
        policy_version: "65f881e7dcaf0c7c".into(),
        latency_ms: 20.0 + (i % 97) as f64,
        ok: !i.is_multiple_of(50),
        input_tokens: 120,
        output_tokens: 40,
        task: "chat".into(),
        data_class: "public".into(),
        rollout: "fleet/assistant".into(),
        ..InferenceEvent::default()
    }
}

async fn ingest() {
    const DEVICES: usize = 50;
    const PER_DEVICE: usize = 20_000;
    let ch = ClickHouse::start().await;
    let mut h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    h.stop_gateway().await;
    let fleet = SimFleet::start(&SimConfig {
        devices: DEVICES,
        gateway: h.gateway_url(),
        bootstrap_token: TOKEN.into(),
        data_dir: h.dir.path().join("sim"),
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        devices_per_connection: 10,
        telemetry: true,
        traffic: None,
    })
    .unwrap();
    let now = now_ms();
    for d in fleet.devices() {
        let events: Vec<Event> = (0..PER_DEVICE)
            .map(|i| Event::Inference(event(&d.device_id, i, now)))
            .collect();
        for chunk in events.chunks(5_000) {
            d.telemetry
                .as_ref()
                .unwrap()
                .append(chunk.to_vec())
                .await
                .unwrap();
        }
    }
    let total = DEVICES * PER_DEVICE;
    // Enrollment needs the gateway: wait until every device is connected, then measure
    // only the upload.
    h.restart_gateway().await;
    let t0 = Instant::now();
    while !fleet
        .devices()
        .iter()
        .all(|d| d.telemetry.as_ref().unwrap().is_drained())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ours = t0.elapsed();
    let count: u64 = ch
        .client
        .query("SELECT count() FROM edgewise.inference_events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(count as usize, total);
    fleet.stop().await;

    // The same rows with clickhouse-client, from a TSV file, into a fresh table.
    ch.client
        .query("CREATE TABLE edgewise.inference_events_cli AS edgewise.inference_events")
        .execute()
        .await
        .unwrap();
    let path = h.dir.path().join("rows.tsv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for d in 0..DEVICES {
            let device = format!("dev-{d}");
            for i in 0..PER_DEVICE {
                let e = event(&device, i, now);
                writeln!(
                    f,
                    "{}\t{}\t{device}\t{}\tb\t{}\t{}\t{}\t{}\t{}\t1\t{}\t{}\t{}\t{}\t0\t\t{}\t{}\t0\tnone\t{}\t{}\t{}",
                    e.time_unix_ms / 1000,
                    e.time_unix_ms,
                    e.event_id,
                    e.rollout,
                    e.model,
                    e.version,
                    e.variant,
                    e.target,
                    e.rule,
                    e.policy_version,
                    e.latency_ms,
                    u8::from(e.ok),
                    e.input_tokens,
                    e.output_tokens,
                    e.task,
                    e.data_class,
                    now / 1000
                )
                .unwrap();
            }
        }
    }
    let t0 = Instant::now();
    let status = Command::new("clickhouse-client")
        .args([
            "--port",
            &ch.server.tcp_port().to_string(),
            "--query",
            "INSERT INTO edgewise.inference_events_cli FORMAT TabSeparated",
        ])
        .stdin(std::fs::File::open(&path).unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let cli = t0.elapsed();
    assert!(status.success());
    let count: u64 = ch
        .client
        .query("SELECT count() FROM edgewise.inference_events_cli")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(count as usize, total);
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!(
        "ingest {total} rows: agents -> gateway -> ClickHouse {:.0} rows/s ({:.2} s); clickhouse-client TSV {:.0} rows/s ({:.2} s); ratio {:.2}",
        rate(ours),
        ours.as_secs_f64(),
        rate(cli),
        cli.as_secs_f64(),
        rate(ours) / rate(cli)
    );
}

async fn append() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = TelemetryBuffer::open(
        dir.path(),
        BufferConfig {
            max_bytes: 4 << 30,
            ..BufferConfig::default()
        },
    )
    .unwrap();
    let now = now_ms();
    for (producers, per_append) in [(1usize, 1usize), (16, 1), (16, 100), (4, 1_000)] {
        let total = 400_000usize.min(producers * per_append * 20_000);
        let appends_each = total / producers / per_append;
        let template: Vec<Event> = (0..per_append)
            .map(|i| Event::Inference(event("dev", i, now)))
            .collect();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..producers {
            let buffer: Arc<TelemetryBuffer> = buffer.clone();
            let template = template.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..appends_each {
                    buffer.append(template.clone()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = t0.elapsed();
        let events = producers * appends_each * per_append;
        println!(
            "buffer append (durable, group commit): {producers} producers x {per_append} events per append: {:.0} events/s",
            events as f64 / elapsed.as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match args.first().map(String::as_str) {
            Some("ingest") => ingest().await,
            Some("append") => append().await,
            _ => {
                append().await;
                ingest().await;
            }
        }
    });
}
