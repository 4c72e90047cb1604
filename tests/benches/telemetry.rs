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
use std::sync::atomic::Ordering::Relaxed;
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

/// Waits until the server has no merge running, so each measurement starts from a quiet
/// server rather than paying for the previous one's background work.
async fn quiet(ch: &ClickHouse) {
    while ch.count("SELECT count() FROM system.merges").await > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The same rows as `event`, as TSV in the table's column order (every column, so
/// clickhouse-client parses as much as our path encodes).
fn write_tsv(path: &std::path::Path, devices: usize, per_device: usize, now: i64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for d in 0..devices {
        let device = format!("dev-{d}");
        for i in 0..per_device {
            let e = event(&device, i, now);
            writeln!(
                f,
                "{}\t{}\t{device}\t{}\tb\t{}\t{}\t{}\t{}\t{}\t1\t{}\t{}\t{}\t{}\t0\t\t{}\t{}\t0\tnone\t{}\t{}\t{}\t{}\t{}",
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
                now / 1000,
                e.router_version,
                e.first_token_ms
            )
            .unwrap();
        }
    }
}

async fn ingest() {
    const DEVICES: usize = 50;
    const PER_DEVICE: usize = 20_000;
    const ROUNDS: usize = 3;
    let total = DEVICES * PER_DEVICE;
    let ch = ClickHouse::start().await;
    let mut h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let fleet = SimFleet::start(&SimConfig {
        devices: DEVICES,
        gateway: h.gateway_url(),
        tls: tls_for(&h.gateway_url()),
        bootstrap_tokens: vec![TOKEN.into()],
        data_dir: h.dir.path().join("sim"),
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        devices_per_connection: 10,
        telemetry: true,
        traffic: None,
        runtime: false,
    })
    .unwrap();
    let now = now_ms();
    let tsv = h.dir.path().join("rows.tsv");
    write_tsv(&tsv, DEVICES, PER_DEVICE, now);
    let mut ours = Vec::new();
    let mut cli = Vec::new();
    for round in 0..ROUNDS {
        // Agents → gateway → ClickHouse: fill every agent's buffer with the gateway stopped,
        // then time from its start until every buffer is acknowledged. It keeps running
        // through the clickhouse-client measurement, so idle agents are not reconnecting.
        h.stop_gateway().await;
        ch.client
            .query("TRUNCATE TABLE edgewise.inference_events")
            .execute()
            .await
            .unwrap();
        for d in fleet.devices() {
            let events: Vec<Event> = (0..PER_DEVICE)
                .map(|i| Event::Inference(event(&d.device_id, round * PER_DEVICE + i, now)))
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
        quiet(&ch).await;
        h.restart_gateway().await;
        println!("round {round}: uploading {total} events from {DEVICES} agents");
        // The clock starts with the first batch queued at the gateway, not with the agents'
        // reconnect backoff.
        let stats = h.gateway.telemetry().unwrap().stats();
        let acked = stats.batches_acked.load(Relaxed);
        while stats.queued_rows.load(Relaxed) == 0 && stats.batches_acked.load(Relaxed) == acked {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let t0 = Instant::now();
        while !fleet
            .devices()
            .iter()
            .all(|d| d.telemetry.as_ref().unwrap().is_drained())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t0.elapsed();
        let count = ch
            .count("SELECT count() FROM edgewise.inference_events")
            .await;
        assert_eq!(count as usize, total);
        ours.push(total as f64 / elapsed.as_secs_f64());

        // The same rows with clickhouse-client, from a TSV file, into a fresh table.
        for sql in [
            "DROP TABLE IF EXISTS edgewise.inference_events_cli",
            "CREATE TABLE edgewise.inference_events_cli AS edgewise.inference_events",
        ] {
            ch.client.query(sql).execute().await.unwrap();
        }
        quiet(&ch).await;
        let t0 = Instant::now();
        let status = Command::new("clickhouse-client")
            .args([
                "--port",
                &ch.server.tcp_port().to_string(),
                "--query",
                "INSERT INTO edgewise.inference_events_cli FORMAT TabSeparated",
            ])
            .stdin(std::fs::File::open(&tsv).unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let elapsed = t0.elapsed();
        assert!(status.success());
        let count = ch
            .count("SELECT count() FROM edgewise.inference_events_cli")
            .await;
        assert_eq!(count as usize, total);
        cli.push(total as f64 / elapsed.as_secs_f64());
        println!(
            "round {round}: agents -> gateway -> ClickHouse {:.0} rows/s; clickhouse-client TSV {:.0} rows/s",
            ours[round], cli[round]
        );
    }
    let stats = h.gateway.telemetry().unwrap().stats();
    println!(
        "gateway: {} batches acked, {} pushed back, queue high water {} bytes",
        stats.batches_acked.load(Relaxed),
        stats.pushed_back.load(Relaxed),
        stats.queued_bytes_high_water.load(Relaxed),
    );
    fleet.stop().await;
    let (ours, cli) = (median(ours), median(cli));
    println!(
        "ingest {total} rows, median of {ROUNDS} rounds: agents -> gateway -> ClickHouse {ours:.0} rows/s; clickhouse-client TSV {cli:.0} rows/s; ratio {:.2}",
        ours / cli
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
    bench_main(|args| async move {
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
