//! A process killed (SIGKILL) in the middle of writing telemetry recovers its buffer on
//! restart: every append it confirmed is there, in order, and nothing is torn.
//!
//! The test re-executes its own binary as the writer (`EDGEWISE_BUFFER_CHILD=<dir>`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use edgewise_agent::telemetry::{BufferConfig, Event, TelemetryBuffer};
use edgewise_proto::fleet::InferenceEvent;

fn event(i: u64) -> Event {
    Event::Inference(InferenceEvent {
        event_id: format!("e-{i:08}"),
        time_unix_ms: 1_790_000_000_000,
        model: "m".into(),
        target: "on-device".into(),
        error: "x".repeat((i % 50) as usize),
        ..InferenceEvent::default()
    })
}

fn config() -> BufferConfig {
    BufferConfig {
        max_bytes: 1 << 30,
        segment_bytes: 64 << 10,
        durable: true,
        ..BufferConfig::default()
    }
}

/// The writer: appends groups forever, printing the count after each confirmed append.
fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let buffer = TelemetryBuffer::open(std::path::Path::new(dir), config()).expect("opens");
        let mut n = 0u64;
        loop {
            let group: Vec<Event> = (n..n + 37).map(event).collect();
            buffer.append(group).await.expect("appends");
            n += 37;
            println!("{n}");
        }
    });
}

#[test]
fn a_writer_killed_mid_write_keeps_every_confirmed_event() {
    if let Ok(dir) = std::env::var("EDGEWISE_BUFFER_CHILD") {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..5u64 {
        let mut writer = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "a_writer_killed_mid_write_keeps_every_confirmed_event",
                "--nocapture",
            ])
            .env("EDGEWISE_BUFFER_CHILD", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawns the writer");
        let mut lines = BufReader::new(writer.stdout.take().expect("stdout")).lines();
        // Let it confirm a number of appends that grows each round, then kill it mid-stream.
        let mut confirmed = 0u64;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Ok(n) = line.trim().parse::<u64>() {
                confirmed = n;
                if n >= 37 * (20 + 15 * round) {
                    break;
                }
            }
        }
        writer.kill().expect("SIGKILL");
        writer.wait().expect("reaped");

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Read (and acknowledge) everything this round's writer left.
        let ids = rt.block_on(async {
            let buffer = TelemetryBuffer::open(dir.path(), config()).expect("recovers");
            let mut ids = Vec::new();
            while let Some(b) = buffer.next_batch(10_000, usize::MAX).expect("reads") {
                assert_eq!(b.dropped, 0, "round {round}: nothing lost to corruption");
                ids.extend(b.events().iter().map(|e| match e {
                    Event::Inference(i) => i.event_id.clone(),
                    Event::Model(m) => m.event_id.clone(),
                }));
                buffer.ack(&b).expect("acks");
            }
            buffer.close();
            ids
        });
        assert!(
            ids.len() as u64 >= confirmed,
            "round {round}: {} events kept, {confirmed} confirmed",
            ids.len()
        );
        // Exactly e-0, e-1, … in order: no gap, no duplicate, no torn record.
        let expected: Vec<String> = (0..ids.len() as u64).map(|i| format!("e-{i:08}")).collect();
        assert_eq!(ids, expected, "round {round}");
    }
}
