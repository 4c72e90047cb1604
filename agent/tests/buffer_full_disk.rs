//! The telemetry buffer on a full disk: on a filesystem of its own (a 256 KiB tmpfs), an
//! append that does not fit fails cleanly and its events are counted as dropped (reported
//! upstream with the next batch, never silently lost), what was written before stays
//! readable with no torn record, and appends work again once space returns.
//!
//! Mounting needs root (or passwordless sudo), as `.ci/run` has.

use std::path::Path;
use std::process::Command;

use edgewise_agent::telemetry::{BufferConfig, Event, TelemetryBuffer};
use edgewise_proto::fleet::InferenceEvent;

fn event(i: u64) -> Event {
    Event::Inference(InferenceEvent {
        event_id: format!("e-{i:08}"),
        time_unix_ms: 1_790_000_000_000,
        model: "m".into(),
        target: "on-device".into(),
        error: "x".repeat(200),
        ..InferenceEvent::default()
    })
}

/// Runs `mount`/`umount` as root, through `sudo -n` when the tests are not root.
fn as_root(args: &[&str]) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let status = if root {
        Command::new(args[0]).args(&args[1..]).status()
    } else {
        Command::new("sudo").arg("-n").args(args).status()
    }
    .expect("runs");
    assert!(
        status.success(),
        "{args:?} (needs root or passwordless sudo)"
    );
}

/// A size-limited tmpfs at a fresh directory, unmounted when dropped.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_str().expect("utf-8");
        as_root(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0777"),
            "tmpfs",
            path,
        ]);
        SmallFs(dir)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let path = self.0.path().to_str().unwrap_or_default().to_owned();
        as_root(&["umount", &path]);
    }
}

fn ids(batch: &edgewise_agent::telemetry::Batch) -> Vec<String> {
    batch
        .events()
        .iter()
        .map(|e| match e {
            Event::Inference(i) => i.event_id.clone(),
            Event::Model(m) => m.event_id.clone(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_cleanly_counts_them_and_recovers() {
    let fs = SmallFs::mount("256k");
    // Something else holds most of the disk; it goes away later, as space returns.
    let filler = fs.path().join("other-files");
    std::fs::write(&filler, vec![0u8; 160 << 10]).expect("filler");
    let dir = fs.path().join("telemetry");
    let buffer = TelemetryBuffer::open(
        &dir,
        BufferConfig {
            max_bytes: 16 << 20,
            // Small segments: the disk also fills while segments roll over.
            segment_bytes: 16 << 10,
            durable: true,
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    // Fill the filesystem in groups of 10 until an append fails, then a few more.
    let (mut n, mut kept, mut failed) = (0u64, Vec::new(), 0u64);
    while failed < 30 {
        let group: Vec<Event> = (n..n + 10).map(event).collect();
        match buffer.append(group).await {
            Ok(()) if failed == 0 => kept.extend((n..n + 10).map(|i| format!("e-{i:08}"))),
            Ok(()) => panic!("an append succeeded on a full disk after one failed"),
            Err(e) => {
                assert!(e.to_string().contains("No space left"), "{e}");
                failed += 10;
            }
        }
        n += 10;
        assert!(n < 100_000, "the 256 KiB filesystem never filled");
    }
    assert!(kept.len() > 50, "{} events fit", kept.len());
    assert_eq!(
        buffer.unreported_drops(),
        failed,
        "every refused event is counted"
    );

    // Space returns: appends work again, after everything confirmed before.
    std::fs::remove_file(&filler).expect("space returns");
    let first = buffer
        .next_batch(usize::MAX, usize::MAX)
        .expect("reads")
        .expect("a batch");
    assert_eq!(
        ids(&first),
        kept,
        "all that was confirmed, in order, none torn"
    );
    assert_eq!(
        first.dropped, failed,
        "the drops go upstream with the batch"
    );
    buffer.ack(&first).expect("acks");
    let again: Vec<Event> = (n..n + 10).map(event).collect();
    buffer
        .append(again)
        .await
        .expect("appends once there is space");
    let next = buffer
        .next_batch(usize::MAX, usize::MAX)
        .expect("reads")
        .expect("a batch");
    let expected: Vec<String> = (n..n + 10).map(|i| format!("e-{i:08}")).collect();
    assert_eq!(ids(&next), expected);
    assert_eq!(next.dropped, 0, "drops were reported once");
    buffer.close();
}
