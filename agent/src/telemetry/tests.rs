use std::io::Write;
use std::time::{Duration, Instant};

use edgewise_proto::fleet::InferenceEvent;

use super::*;

fn event(i: u64) -> Event {
    Event::Inference(InferenceEvent {
        event_id: format!("e-{i}"),
        time_unix_ms: 1_800_000_000_000 + i as i64,
        model: "assistant".into(),
        version: "1.0.0".into(),
        latency_ms: i as f64,
        ok: true,
        ..InferenceEvent::default()
    })
}

fn ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Inference(i) => i.event_id.clone(),
            Event::Model(m) => m.event_id.clone(),
        })
        .collect()
}

fn small(durable: bool) -> BufferConfig {
    BufferConfig {
        max_bytes: 1 << 20,
        segment_bytes: 4 << 10,
        durable,
        ..BufferConfig::default()
    }
}

/// A buffer in a fresh directory holding events `0..n`, written and closed as a process
/// that exits would leave it; the directory is returned for reopening.
async fn closed_buffer_of(n: u64, durable: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let buf = TelemetryBuffer::open(dir.path(), small(durable)).expect("opens");
    buf.append((0..n).map(event).collect())
        .await
        .expect("appends");
    buf.close();
    dir
}

#[tokio::test]
async fn batches_survive_restarts_and_leave_only_when_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buf = TelemetryBuffer::open(dir.path(), small(true)).expect("opens");
    buf.append((0..100).map(event).collect())
        .await
        .expect("appends");
    let first = buf
        .next_batch(40, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(first.events().len(), 40);
    // Not acknowledged: the same batch, with the same id, comes back, also after a restart.
    assert_eq!(
        buf.next_batch(40, usize::MAX)
            .expect("reads")
            .expect("batch")
            .id,
        first.id
    );
    buf.close();
    drop(buf);
    let buf = TelemetryBuffer::open(dir.path(), small(true)).expect("reopens");
    let again = buf
        .next_batch(40, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(
        (again.id.as_str(), ids(&again.events())),
        (first.id.as_str(), ids(&first.events()))
    );
    buf.ack(&again).expect("acks");
    let mut seen = ids(&again.events());
    while let Some(b) = buf.next_batch(25, usize::MAX).expect("reads") {
        seen.extend(ids(&b.events()));
        buf.ack(&b).expect("acks");
    }
    assert_eq!(seen, (0..100).map(|i| format!("e-{i}")).collect::<Vec<_>>());
    assert!(buf.next_batch(10, usize::MAX).expect("reads").is_none());
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_everything_before_it_kept() {
    let dir = closed_buffer_of(10, true).await;
    // A crash mid-write: half a record at the end of the active segment.
    let seg = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .expect("a segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .expect("open");
    f.write_all(&0xEDE1_B0F0u32.to_le_bytes()).expect("write");
    f.write_all(&[200, 0, 0, 0, 1, 2, 3]).expect("write");
    drop(f);
    let buf = TelemetryBuffer::open(dir.path(), small(true)).expect("recovers");
    buf.append(vec![event(10)])
        .await
        .expect("appends after recovery");
    let b = buf
        .next_batch(100, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(
        ids(&b.events()),
        (0..=10).map(|i| format!("e-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(b.dropped, 0, "a torn tail is not a lost acknowledged event");
}

#[tokio::test]
async fn a_corrupted_segment_keeps_the_good_records_around_the_damage() {
    let dir = closed_buffer_of(30, false).await;
    let seg = dir.path().join("seg-0000000000000000.log");
    let mut bytes = std::fs::read(&seg).expect("read");
    let third = bytes.len() / 3;
    for b in &mut bytes[third..third + 20] {
        *b ^= 0xff;
    }
    std::fs::write(&seg, &bytes).expect("write");
    let buf = TelemetryBuffer::open(dir.path(), small(false)).expect("opens");
    let b = buf
        .next_batch(100, usize::MAX)
        .expect("reads")
        .expect("batch");
    let got = ids(&b.events());
    assert!(
        got.len() >= 27 && got.len() < 30,
        "kept {} of 30",
        got.len()
    );
    assert_eq!(
        got.first().map(String::as_str),
        Some("e-0"),
        "records before the damage kept"
    );
    assert_eq!(
        got.last().map(String::as_str),
        Some("e-29"),
        "records after the damage kept"
    );
    assert_eq!(b.dropped, 1, "the damaged region is reported");
}

#[tokio::test]
async fn when_full_the_oldest_are_dropped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BufferConfig {
        max_bytes: 16 << 10,
        segment_bytes: 2 << 10,
        durable: false,
        ..BufferConfig::default()
    };
    let buf = TelemetryBuffer::open(dir.path(), config).expect("opens");
    for chunk in 0..20 {
        buf.append((chunk * 50..(chunk + 1) * 50).map(event).collect())
            .await
            .expect("appends");
    }
    assert!(
        buf.bytes() <= (16 << 10) + (2 << 10),
        "bounded: {} bytes",
        buf.bytes()
    );
    let mut kept = Vec::new();
    let mut reported = 0;
    while let Some(b) = buf.next_batch(5_000, usize::MAX).expect("reads") {
        kept.extend(ids(&b.events()));
        reported += b.dropped;
        buf.ack(&b).expect("acks");
    }
    assert_eq!(
        kept.len() as u64 + reported,
        1_000,
        "every event is either delivered or counted as dropped"
    );
    assert!(reported > 0);
    assert_eq!(
        kept.last().map(String::as_str),
        Some("e-999"),
        "the newest are kept"
    );
    assert_eq!(buf.unreported_drops(), 0);
}

#[tokio::test]
async fn concurrent_appends_are_group_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buf = TelemetryBuffer::open(dir.path(), BufferConfig::default()).expect("opens");
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let buf = buf.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                buf.append(vec![event(t * 1000 + i)])
                    .await
                    .expect("appends");
            }
        }));
    }
    for t in tasks {
        t.await.expect("joins");
    }
    let b = buf
        .next_batch(10_000, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(b.events().len(), 400);
}

/// A steady trickle of appends nobody waits on (the data plane's requests) costs one fsync
/// per `sync_interval`, not one per event, and every event lands.
#[tokio::test]
async fn a_trickle_of_appends_soon_is_synced_at_most_once_per_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let interval = Duration::from_millis(20);
    let buf = TelemetryBuffer::open(
        dir.path(),
        BufferConfig {
            sync_interval: interval,
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    let started = Instant::now();
    for i in 0..60 {
        buf.append_soon(vec![event(i)]).expect("appends");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let synced = match buf.next_batch(10_000, usize::MAX).expect("reads") {
            Some(b) => {
                buf.forget_inflight(&b).expect("forgets");
                b.events().len()
            }
            None => 0,
        };
        if synced == 60 {
            break;
        }
        assert!(Instant::now() < deadline, "all synced within the interval");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let bound = 2 + (elapsed.as_millis() / interval.as_millis()) as u64;
    assert!(
        buf.commits() <= bound,
        "{} syncs for 60 appends over {elapsed:?}; at most {bound} expected",
        buf.commits()
    );
    let b = buf
        .next_batch(10_000, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(b.events().len(), 60, "every event synced");
}

/// An append that is waited on is synced at once, taking the unsynced ones along; until a
/// sync, unsynced events are not uploaded, yet already in the file, so a restart after the
/// agent's own crash finds them.
#[tokio::test]
async fn an_append_is_never_held_for_the_interval_and_unsynced_events_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buf = TelemetryBuffer::open(
        dir.path(),
        BufferConfig {
            sync_interval: Duration::from_secs(3600),
            ..BufferConfig::default()
        },
    )
    .expect("opens");
    buf.append_soon(vec![event(1)]).expect("appends");
    let segment = dir.path().join("seg-0000000000000000.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&segment).expect("segment").len() == 0 {
        assert!(
            Instant::now() < deadline,
            "an append_soon is written at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        buf.next_batch(100, usize::MAX).expect("reads").is_none(),
        "nothing unsynced is uploaded"
    );
    // What a restart after a crash now would find.
    let copy = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&segment, copy.path().join("seg-0000000000000000.log")).expect("copies");
    let reopened = TelemetryBuffer::open(copy.path(), BufferConfig::default()).expect("opens");
    let found = reopened
        .next_batch(100, usize::MAX)
        .expect("reads")
        .expect("a batch");
    assert_eq!(ids(&found.events()), ["e-1"]);

    tokio::time::timeout(Duration::from_secs(10), buf.append(vec![event(2)]))
        .await
        .expect("not held for the hour")
        .expect("appends");
    let b = buf
        .next_batch(100, usize::MAX)
        .expect("reads")
        .expect("batch");
    assert_eq!(ids(&b.events()), ["e-1", "e-2"]);
}

/// Segments are read in windows: records cut by a window's end, and damage across one, must
/// read exactly as from a whole file.
#[tokio::test]
async fn large_segments_read_across_windows_and_damage_at_a_boundary_is_skipped_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BufferConfig {
        max_bytes: 64 << 20,
        segment_bytes: 8 << 20,
        durable: false,
        ..BufferConfig::default()
    };
    let buf = TelemetryBuffer::open(dir.path(), config.clone()).expect("opens");
    let total = 40_000u64;
    for chunk in (0..total).collect::<Vec<_>>().chunks(5_000) {
        buf.append(chunk.iter().copied().map(event).collect())
            .await
            .expect("appends");
    }
    buf.close();
    drop(buf);
    let seg = dir.path().join("seg-0000000000000000.log");
    let mut bytes = std::fs::read(&seg).expect("read");
    assert!(
        bytes.len() > 2 * super::buffer::READ_WINDOW,
        "spans windows"
    );
    let boundary = super::buffer::READ_WINDOW;
    for b in &mut bytes[boundary - 30..boundary + 30] {
        *b ^= 0xff;
    }
    std::fs::write(&seg, &bytes).expect("write");
    let buf = TelemetryBuffer::open(dir.path(), config).expect("opens");
    let mut got = Vec::new();
    let mut dropped = 0;
    while let Some(b) = buf.next_batch(7_000, usize::MAX).expect("reads") {
        got.extend(ids(&b.events()));
        dropped = dropped.max(b.dropped);
        buf.ack(&b).expect("acks");
    }
    let kept: std::collections::HashSet<&String> = got.iter().collect();
    let lost: Vec<String> = (0..total)
        .map(|i| format!("e-{i}"))
        .filter(|id| !kept.contains(id))
        .collect();
    assert!(
        (1..=3).contains(&lost.len()),
        "only the records under the damage are lost: {lost:?}"
    );
    let mut sorted = got.clone();
    sorted.sort_by_key(|id| id[2..].parse::<u64>().unwrap_or(u64::MAX));
    assert_eq!(got, sorted, "order kept");
    assert_eq!(dropped, 1, "one damaged region, counted once");
}

#[derive(Clone, Debug)]
enum Op {
    /// `append` of n events, awaited.
    Append(u8),
    /// `append_soon` of n events (nothing to await).
    AppendSoon(u8),
    /// Upload a batch and acknowledge it.
    UploadAndAck,
    /// A SIGKILL now: the directory as the disk has it, reopened.
    Crash,
    /// Let time pass (ms).
    Wait(u8),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1u8..4).prop_map(Op::Append),
        (1u8..4).prop_map(Op::AppendSoon),
        Just(Op::UploadAndAck),
        Just(Op::Crash),
        (0u8..12).prop_map(Op::Wait),
    ]
}

/// What a crash at this moment leaves: a copy of every file in `dir`, reopened; its events
/// not yet acknowledged, in order.
fn after_crash(dir: &std::path::Path) -> Vec<u64> {
    let copy = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        // The file can be mid-write: a torn tail is what a crash leaves too.
        let _ = std::fs::copy(&path, copy.path().join(path.file_name().expect("name")));
    }
    let reopened = TelemetryBuffer::open(copy.path(), BufferConfig::default()).expect("opens");
    let mut out = Vec::new();
    while let Some(b) = reopened.next_batch(1_000, usize::MAX).expect("reads") {
        out.extend(
            ids(&b.events())
                .iter()
                .map(|id| id[2..].parse::<u64>().expect("id")),
        );
        reopened.ack(&b).expect("acks");
    }
    reopened.close();
    out
}

/// Consecutive ids: appended from one task, events reach the writer in order.
fn in_order_once(events: &[u64]) -> bool {
    events.windows(2).all(|w| w[0] + 1 == w[1])
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

    /// Random sequences of awaited and unawaited appends, uploads and crashes, against a
    /// model of which events were appended, confirmed (an awaited append also confirms the
    /// unawaited ones queued before it) and acknowledged. After every step: uploads see only
    /// appended events, in order, each once; a crash keeps every confirmed event not yet
    /// acknowledged, brings back no acknowledged one and invents none; at the end every
    /// event is uploaded exactly once.
    #[test]
    fn appends_soon_and_now_survive_crashes_as_confirmed(ops in proptest::collection::vec(op(), 1..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let buf = TelemetryBuffer::open(
                dir.path(),
                BufferConfig { sync_interval: Duration::from_millis(5), ..small(true) },
            )
            .expect("opens");
            let mut next = 0u64;
            let mut uploaded: Vec<u64> = Vec::new();
            let mut confirmed = std::collections::BTreeSet::new();
            let mut soon = std::collections::BTreeSet::new();
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let batch: Vec<u64> = (next..next + u64::from(n)).collect();
                        next += u64::from(n);
                        buf.append(batch.iter().copied().map(event).collect()).await.expect("appends");
                        // Synced with it: every append_soon queued before it.
                        confirmed.append(&mut soon);
                        confirmed.extend(batch);
                    }
                    Op::AppendSoon(n) => {
                        let batch: Vec<u64> = (next..next + u64::from(n)).collect();
                        next += u64::from(n);
                        buf.append_soon(batch.iter().copied().map(event).collect()).expect("appends");
                        soon.extend(batch);
                    }
                    Op::UploadAndAck => {
                        if let Some(b) = buf.next_batch(5, usize::MAX).expect("reads") {
                            uploaded.extend(ids(&b.events()).iter().map(|id| id[2..].parse::<u64>().expect("id")));
                            buf.ack(&b).expect("acks");
                        }
                        assert!(in_order_once(&uploaded), "in order, each once: {uploaded:?}");
                        assert!(uploaded.iter().all(|e| *e < next), "only appended events");
                    }
                    Op::Crash => {
                        let found = after_crash(dir.path());
                        assert!(in_order_once(&found), "in order, each once: {found:?}");
                        assert!(found.iter().all(|e| *e < next), "invents nothing");
                        let acked: std::collections::BTreeSet<u64> = uploaded.iter().copied().collect();
                        assert!(found.iter().all(|e| !acked.contains(e)), "an acknowledged event came back");
                        for c in confirmed.difference(&acked) {
                            assert!(found.contains(c), "confirmed event {c} lost in a crash: found {found:?}");
                        }
                    }
                    Op::Wait(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
                }
            }
            buf.append(Vec::new()).await.expect("syncs");
            while let Some(b) = buf.next_batch(1_000, usize::MAX).expect("reads") {
                uploaded.extend(ids(&b.events()).iter().map(|id| id[2..].parse::<u64>().expect("id")));
                buf.ack(&b).expect("acks");
            }
            assert_eq!(uploaded, (0..next).collect::<Vec<_>>(), "every event, in order, once");
        });
    }
}
