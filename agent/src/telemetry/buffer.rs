//! The durable telemetry buffer: bounded, crash-safe, append-only.
//!
//! Events are appended as records to segment files (`seg-<seq>.log`, rolled at a size) and
//! uploaded from a persisted cursor; a batch leaves the buffer only when the gateway has
//! acknowledged it. Appends are group-committed: a writer thread takes every append queued
//! while the previous fsync ran, writes them and fsyncs once. Appends nobody waits on (the
//! data plane's records of requests it has already answered) are written at once, so the
//! agent's own crash loses none, and synced with the next group, at the latest
//! `sync_interval` later.
//!
//! Record: `magic u32 | length u32 | crc32 u32 | payload` (little endian). On open, a torn
//! tail (a crash mid-write) is cut; a corrupted record inside a segment is skipped by
//! scanning for the next valid magic, so the good records around it are kept, and the loss
//! is counted. When the buffer exceeds its bound the oldest segments are dropped and the
//! number of dropped events is reported upstream with the next batch: never silent.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use edgewise_proto::fleet::{InferenceEvent, ModelEvent};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::fsutil::{atomic_write, read_json, sync_dir};

const MAGIC: u32 = 0xEDE1_B0F0;
const HEADER: usize = 12;
/// Largest record accepted when reading back; anything larger is corruption.
const MAX_RECORD: usize = 1 << 20;

/// One buffered event.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A routed request.
    Inference(InferenceEvent),
    /// A model life-cycle event.
    Model(ModelEvent),
}

impl Event {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Event::Inference(e) => {
                out.push(1);
                e.encode(out).unwrap_or_default();
            }
            Event::Model(e) => {
                out.push(2);
                e.encode(out).unwrap_or_default();
            }
        }
    }
}

/// Sizes of the buffer.
#[derive(Clone, Debug)]
pub struct BufferConfig {
    /// Largest total size on disk before the oldest segments are dropped.
    pub max_bytes: u64,
    /// Size at which a segment is sealed and a new one begun.
    pub segment_bytes: u64,
    /// fsync each group commit (off only in the simulator).
    pub durable: bool,
    /// Longest an [append_soon](TelemetryBuffer::append_soon) waits for its fsync. A
    /// steady stream of them (a data plane serving requests) shares one fsync per interval
    /// instead of one each, which was a sixth of the agent's CPU per proxied request.
    pub sync_interval: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: 256 << 20,
            segment_bytes: 8 << 20,
            durable: true,
            sync_interval: Duration::from_millis(50),
        }
    }
}

/// A position in the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Segment sequence number.
    pub segment: u64,
    /// Byte offset in it.
    pub offset: u64,
}

/// A batch being uploaded; persisted so a restart resends the same batch with the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct InFlight {
    id: String,
    start: Position,
    end: Position,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CursorFile {
    acked: Position,
    #[serde(default)]
    inflight: Option<InFlight>,
    /// Events lost (dropped for space or corrupted) and not yet reported upstream.
    #[serde(default)]
    unreported_drops: u64,
}

/// A batch ready to upload.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Stable id: a retry of this batch carries it again.
    pub id: String,
    /// The events in buffer order, encoded as the `inference` and `model_events` fields of a
    /// `TelemetryBatch`: an upload sends them as they are.
    pub encoded_events: bytes::Bytes,
    /// How many events.
    pub len: usize,
    /// Events lost since the last acknowledged batch, to report with this one.
    pub dropped: u64,
    end: Position,
}

impl Batch {
    /// The events, decoded (for inspection; uploads send [`Batch::encoded_events`]).
    #[must_use]
    pub fn events(&self) -> Vec<Event> {
        let mut events = Vec::with_capacity(self.len);
        let mut rest = &self.encoded_events[..];
        while !rest.is_empty() {
            let Ok((field, _)) = prost::encoding::decode_key(&mut rest) else {
                break;
            };
            let Some(len) = prost::encoding::decode_varint(&mut rest)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= rest.len())
            else {
                break;
            };
            let (message, tail) = rest.split_at(len);
            rest = tail;
            let event = if field == INFERENCE_FIELD {
                InferenceEvent::decode(message).ok().map(Event::Inference)
            } else {
                ModelEvent::decode(message).ok().map(Event::Model)
            };
            events.extend(event);
        }
        events
    }
}

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// Disk I/O.
    #[error("telemetry buffer: {0}")]
    Io(#[from] std::io::Error),
    /// The writer thread is gone.
    #[error("telemetry buffer is closed")]
    Closed,
}

struct Segment {
    seq: u64,
    len: u64,
}

struct State {
    dir: PathBuf,
    config: BufferConfig,
    segments: VecDeque<Segment>,
    active: File,
    /// Bytes written to the active segment past its `len`, not yet synced: readers see a
    /// segment up to `len`, so nothing unsynced is uploaded.
    unsynced: u64,
    cursor: CursorFile,
}

/// When an append counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    /// Synced before the append returns (`Router.Report` acknowledges only then).
    Now,
    /// Written at once, synced with the next group within `sync_interval`; nobody waits.
    Soon,
}

type Done = oneshot::Sender<Result<(), Arc<std::io::Error>>>;

/// An append waiting for the writer; `done` hears the outcome, if anyone waits.
struct Queued {
    events: Vec<Event>,
    durability: Durability,
    done: Option<Done>,
}

/// The buffer. Cheap to share behind an `Arc`.
pub struct TelemetryBuffer {
    state: Arc<Mutex<State>>,
    writer: Mutex<Option<mpsc::Sender<Queued>>>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for TelemetryBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryBuffer").finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:016x}.log"))
}

/// Bytes read from a segment at a time: a batch costs the records it takes, not the whole
/// segment. Large enough for the largest record, so every window makes progress.
pub(crate) const READ_WINDOW: usize = HEADER + MAX_RECORD;

/// Where a [`walk`] over a slice of a segment ended.
#[derive(Clone, Copy, Debug, Default)]
struct Walk {
    /// Corrupt regions skipped.
    corrupt: u64,
    /// Where the last valid record ends.
    tail: usize,
    /// Where to continue: the end of the slice, the record `visit` declined, or the start of
    /// a record the slice cuts (when more of the segment follows).
    resume: usize,
    /// Whether `visit` asked to stop.
    stopped: bool,
    /// Whether the walk ended inside a corrupt region (carried into the next window so one
    /// region is counted once).
    in_garbage: bool,
}

/// Walks the valid records of `bytes` from `from`, calling `visit(offset, payload)` until it
/// returns `false`. `more` says the segment continues past `bytes` (a read window): a record
/// cut by the end of the slice is then not corruption, the walk stops before it.
fn walk(
    bytes: &[u8],
    from: usize,
    more: bool,
    in_garbage: bool,
    mut visit: impl FnMut(usize, &[u8]) -> bool,
) -> Walk {
    let mut w = Walk {
        tail: from,
        resume: from,
        in_garbage,
        ..Walk::default()
    };
    let mut at = from;
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    while at + HEADER <= bytes.len() {
        let len = word(at + 4) as usize;
        let framed = word(at) == MAGIC && len <= MAX_RECORD;
        if framed && more && at + HEADER + len > bytes.len() {
            break; // the next window holds the rest of this record
        }
        let valid = framed
            && at + HEADER + len <= bytes.len()
            && crc32fast::hash(&bytes[at + HEADER..at + HEADER + len]) == word(at + 8);
        if valid {
            if !visit(at, &bytes[at + HEADER..at + HEADER + len]) {
                w.stopped = true;
                w.resume = at;
                return w;
            }
            at += HEADER + len;
            w.tail = at;
            w.in_garbage = false;
        } else {
            if !w.in_garbage {
                w.corrupt += 1;
                w.in_garbage = true;
            }
            at += 1;
        }
    }
    w.resume = if more { at } else { bytes.len() };
    w
}

/// Counts the valid records of `bytes` from `from`.
fn count_records(bytes: &[u8], from: usize) -> (u64, Walk) {
    let mut n = 0;
    let w = walk(bytes, from, false, false, |_, _| {
        n += 1;
        true
    });
    (n, w)
}

/// Appends a buffered record (`kind | encoded event`) to `wire` as the `TelemetryBatch`
/// field it belongs to; `false` for an unknown kind.
fn push_wire(wire: &mut Vec<u8>, record: &[u8]) -> bool {
    let Some((kind, message)) = record.split_first() else {
        return false;
    };
    let field = match kind {
        1 => INFERENCE_FIELD,
        2 => MODEL_EVENTS_FIELD,
        _ => return false,
    };
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, wire);
    prost::encoding::encode_varint(message.len() as u64, wire);
    wire.extend_from_slice(message);
    true
}

/// `TelemetryBatch.inference` and `TelemetryBatch.model_events` (fleet.proto).
const INFERENCE_FIELD: u32 = 3;
const MODEL_EVENTS_FIELD: u32 = 4;

impl TelemetryBuffer {
    /// Opens (creating) the buffer in `dir`, recovering from a crash: the active segment's
    /// torn tail is cut and the cursor kept.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path, config: BufferConfig) -> Result<Arc<Self>, BufferError> {
        std::fs::create_dir_all(dir)?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("seg-")
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
            })
            .collect();
        seqs.sort_unstable();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        for &seq in &seqs {
            let len = std::fs::metadata(segment_path(dir, seq))?.len();
            segments.push_back(Segment { seq, len });
        }
        // The last segment is where a crash leaves a torn record: cut everything after the
        // last valid record (corruption before it is skipped when reading).
        if let Some(last) = segments.back_mut() {
            let path = segment_path(dir, last.seq);
            let tail = count_records(&std::fs::read(&path)?, 0).1.tail as u64;
            if tail < last.len {
                OpenOptions::new().write(true).open(&path)?.set_len(tail)?;
                last.len = tail;
            }
        }
        if segments.is_empty() {
            File::create(segment_path(dir, 0))?;
            segments.push_back(Segment { seq: 0, len: 0 });
        }
        let mut cursor: CursorFile = read_json(&dir.join("cursor.json"))?.unwrap_or_default();
        if let Some(first) = segments.front()
            && cursor.acked.segment < first.seq
        {
            cursor.acked = Position {
                segment: first.seq,
                offset: 0,
            };
        }
        let active_seq = segments.back().map_or(0, |s| s.seq);
        let active = OpenOptions::new()
            .append(true)
            .open(segment_path(dir, active_seq))?;
        // Without fsync a commit is only a write: nothing to gather for.
        let sync_interval = if config.durable {
            config.sync_interval
        } else {
            Duration::ZERO
        };
        let state = Arc::new(Mutex::new(State {
            dir: dir.to_owned(),
            config,
            segments,
            active,
            unsynced: 0,
            cursor,
        }));
        let appended = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Queued>();
        let (writer_state, writer_notify, writer_commits) =
            (state.clone(), appended.clone(), commits.clone());
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || {
                writer(
                    &writer_state,
                    &rx,
                    &writer_notify,
                    &writer_commits,
                    sync_interval,
                );
            })?;
        Ok(Arc::new(TelemetryBuffer {
            state,
            writer: Mutex::new(Some(tx)),
            appended,
            commits,
        }))
    }

    /// Appends events; resolves once they are on disk (group commit).
    ///
    /// # Errors
    /// [`BufferError`] when the write or fsync failed; the events are then not buffered.
    pub async fn append(&self, events: Vec<Event>) -> Result<(), BufferError> {
        self.queue(events, Durability::Now).await
    }

    /// Appends events that nobody waits on (a data plane's record of a request it has
    /// answered): handed to the writer, which writes them at once (the agent's own crash does
    /// not lose them) and syncs them within `sync_interval`. A failure to store them is
    /// logged and counted as dropped events, which the gateway hears of.
    ///
    /// # Errors
    /// [`BufferError::Closed`] once the buffer is closed.
    pub fn append_soon(&self, events: Vec<Event>) -> Result<(), BufferError> {
        self.send(events, Durability::Soon, None)
    }

    async fn queue(&self, events: Vec<Event>, durability: Durability) -> Result<(), BufferError> {
        let (done, rx) = oneshot::channel();
        self.send(events, durability, Some(done))?;
        rx.await
            .map_err(|_| BufferError::Closed)?
            .map_err(|e| BufferError::Io(std::io::Error::new(e.kind(), e)))
    }

    fn send(
        &self,
        events: Vec<Event>,
        durability: Durability,
        done: Option<Done>,
    ) -> Result<(), BufferError> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .ok_or(BufferError::Closed)?
            .send(Queued {
                events,
                durability,
                done,
            })
            .map_err(|_| BufferError::Closed)
    }

    /// Group commits so far (each one write and, when durable, one fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Waits until something is appended.
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    /// The next batch to upload (at most `max_events` and about `max_bytes` encoded, one
    /// event at least), or `None` when all is acknowledged. Until it is acknowledged or
    /// [forgotten](TelemetryBuffer::forget_inflight) the same batch, with the same id, is
    /// returned again.
    ///
    /// # Errors
    /// I/O errors reading segments.
    pub fn next_batch(
        &self,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Option<Batch>, BufferError> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = st.cursor.acked;
        let mut wire = Vec::new();
        let mut events = 0usize;
        let mut end = start;
        let mut corrupt = 0;
        // A batch in flight is resent exactly as it was, whatever `max_events` is now.
        let limit = st
            .cursor
            .inflight
            .as_ref()
            .filter(|f| f.start == start)
            .map(|f| f.end);
        let max_events = if limit.is_some() {
            usize::MAX
        } else {
            max_events
        };
        let segs: Vec<(u64, u64)> = st.segments.iter().map(|s| (s.seq, s.len)).collect();
        let mut window = Vec::new();
        'segments: for (seq, len) in segs {
            if seq < start.segment {
                continue;
            }
            let mut pos = if seq == start.segment {
                start.offset
            } else {
                0
            };
            if pos < len {
                let file = File::open(segment_path(&st.dir, seq))?;
                let mut in_garbage = false;
                while pos < len {
                    let take =
                        usize::try_from(len - pos).map_or(READ_WINDOW, |n| n.min(READ_WINDOW));
                    window.resize(take, 0);
                    file.read_exact_at(&mut window, pos)?;
                    let more = pos + (take as u64) < len;
                    let w = walk(&window, 0, more, in_garbage, |offset, record| {
                        let here = Position {
                            segment: seq,
                            offset: pos + offset as u64,
                        };
                        // Bytes bound the batch as well as events: one at least, so an
                        // event larger than the bound still goes (and is refused alone).
                        let full = events > 0 && wire.len() + record.len() + 16 > max_bytes;
                        if limit.is_some_and(|l| here >= l)
                            || (limit.is_none() && (events >= max_events || full))
                        {
                            return false;
                        }
                        if push_wire(&mut wire, record) {
                            events += 1;
                        } else {
                            corrupt += 1;
                        }
                        true
                    });
                    corrupt += w.corrupt;
                    in_garbage = w.in_garbage;
                    if w.stopped {
                        end = Position {
                            segment: seq,
                            offset: pos + w.resume as u64,
                        };
                        break 'segments;
                    }
                    pos += w.resume as u64;
                    if !more {
                        break;
                    }
                }
            }
            end = Position {
                segment: seq,
                offset: len,
            };
        }
        if corrupt > 0 {
            st.cursor.unreported_drops += corrupt;
        }
        if events == 0 {
            if end != start || corrupt > 0 {
                st.cursor.acked = end;
                st.cursor.inflight = None;
                let cursor = st.cursor.clone();
                persist_cursor(&st.dir, &cursor, st.config.durable)?;
            }
            // Drops alone still go upstream, in an otherwise empty batch.
            if st.cursor.unreported_drops == 0 {
                return Ok(None);
            }
        }
        let inflight = match st
            .cursor
            .inflight
            .clone()
            .filter(|f| f.start == start && f.end == end)
        {
            Some(f) => f,
            None => {
                let f = InFlight {
                    id: format!(
                        "{:016x}-{:016x}-{:016x}",
                        start.segment,
                        start.offset,
                        rand::random::<u64>()
                    ),
                    start,
                    end,
                };
                st.cursor.inflight = Some(f.clone());
                let cursor = st.cursor.clone();
                persist_cursor(&st.dir, &cursor, st.config.durable)?;
                f
            }
        };
        Ok(Some(Batch {
            id: inflight.id,
            encoded_events: wire.into(),
            len: events,
            dropped: st.cursor.unreported_drops,
            end,
        }))
    }

    /// Gives up `batch` as it was cut (the gateway refused its size, not its events): the
    /// next batch starts at the same event under a new id and the limits then given.
    ///
    /// # Errors
    /// I/O errors persisting the cursor.
    pub fn forget_inflight(&self, batch: &Batch) -> Result<(), BufferError> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st
            .cursor
            .inflight
            .as_ref()
            .is_some_and(|f| f.id == batch.id)
        {
            st.cursor.inflight = None;
            let cursor = st.cursor.clone();
            persist_cursor(&st.dir, &cursor, st.config.durable)?;
        }
        Ok(())
    }

    /// Marks a batch delivered: its events leave the buffer and its drops are reported.
    ///
    /// # Errors
    /// I/O errors persisting the cursor.
    pub fn ack(&self, batch: &Batch) -> Result<(), BufferError> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.cursor.inflight.as_ref().is_none_or(|f| f.id != batch.id) {
            return Ok(()); // stale ack: the batch was already acknowledged
        }
        st.cursor.acked = batch.end;
        st.cursor.inflight = None;
        st.cursor.unreported_drops = st.cursor.unreported_drops.saturating_sub(batch.dropped);
        let cursor = st.cursor.clone();
        persist_cursor(&st.dir, &cursor, st.config.durable)?;
        // Whole segments behind the cursor are done.
        while st.segments.len() > 1
            && st
                .segments
                .front()
                .is_some_and(|s| s.seq < st.cursor.acked.segment)
        {
            if let Some(s) = st.segments.pop_front() {
                std::fs::remove_file(segment_path(&st.dir, s.seq))?;
            }
        }
        Ok(())
    }

    /// Drops a batch the gateway refused as invalid: its events count as lost (and are
    /// reported as such with the next batch), so a bad record cannot block the buffer.
    ///
    /// # Errors
    /// I/O errors persisting the cursor.
    pub fn reject(&self, batch: &Batch) -> Result<(), BufferError> {
        // Acknowledged without its drop count: those were not delivered either.
        let rejected = Batch {
            dropped: 0,
            ..batch.clone()
        };
        self.ack(&rejected)?;
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.cursor.unreported_drops += batch.len as u64;
        let cursor = st.cursor.clone();
        persist_cursor(&st.dir, &cursor, st.config.durable)?;
        Ok(())
    }

    /// Whether everything appended has been acknowledged and every loss reported. Reads
    /// only: it does not start a batch.
    #[must_use]
    pub fn is_drained(&self) -> bool {
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let acked = st.cursor.acked;
        let unread: u64 = st
            .segments
            .iter()
            .map(|s| match s.seq.cmp(&acked.segment) {
                std::cmp::Ordering::Less => 0,
                std::cmp::Ordering::Equal => s.len.saturating_sub(acked.offset),
                std::cmp::Ordering::Greater => s.len,
            })
            .sum();
        unread == 0 && st.cursor.unreported_drops == 0
    }

    /// Events lost and not yet reported.
    #[must_use]
    pub fn unreported_drops(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cursor
            .unreported_drops
    }

    /// Bytes on disk.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .segments
            .iter()
            .map(|s| s.len)
            .sum()
    }

    /// Stops the writer thread (appends fail afterwards).
    pub fn close(&self) {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

fn persist_cursor(dir: &Path, cursor: &CursorFile, durable: bool) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(cursor).map_err(std::io::Error::other)?;
    atomic_write(&dir.join("cursor.json"), &bytes, durable)
}

/// The group-commit loop.
fn writer(
    state: &Mutex<State>,
    rx: &mpsc::Receiver<Queued>,
    appended: &Notify,
    commits: &AtomicU64,
    sync_interval: Duration,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut last_sync = Instant::now();
    // Appends written and waiting for the next sync: who hears of it, and how many events.
    let mut waiting: Vec<Done> = Vec::new();
    let mut waiting_events = 0usize;
    let mut closed = false;
    while !closed {
        let first = if waiting_events == 0 {
            match rx.recv() {
                Ok(q) => Some(q),
                Err(_) => return,
            }
        } else {
            match rx
                .recv_timeout((last_sync + sync_interval).saturating_duration_since(Instant::now()))
            {
                Ok(q) => Some(q),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            }
        };
        // Due: the interval is up, the buffer is closing, or an appender waits for the sync.
        let mut due = first.is_none();
        let mut group: Vec<Queued> = first.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        buf.clear();
        for q in &group {
            due |= q.durability == Durability::Now;
            for e in &q.events {
                let start = buf.len();
                buf.extend_from_slice(&[0; HEADER]);
                e.encode(&mut buf);
                let len = buf.len() - start - HEADER;
                let crc = crc32fast::hash(&buf[start + HEADER..]);
                buf[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
                buf[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
                buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let mut st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        due |= !st.config.durable || last_sync.elapsed() >= sync_interval;
        let events: usize = group.iter().map(|q| q.events.len()).sum();
        if let Err(e) = write(&mut st, &buf) {
            refuse(&mut st, events, &e);
            drop(st);
            let e = Arc::new(e);
            for done in group.into_iter().filter_map(|q| q.done) {
                let _ = done.send(Err(e.clone()));
            }
            continue;
        }
        waiting_events += events;
        waiting.extend(group.into_iter().filter_map(|q| q.done));
        if !due {
            continue;
        }
        let result = sync(&mut st);
        if let Err(e) = &result {
            refuse(&mut st, waiting_events, e);
        }
        waiting_events = 0;
        drop(st);
        last_sync = Instant::now();
        commits.fetch_add(1, Ordering::Relaxed);
        let outcome = result.map_err(Arc::new);
        for done in waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
        appended.notify_one();
    }
}

/// Refused (a full disk, say): the appenders that wait hear so, the log says so for all,
/// and the gateway learns the count with the next batch, as for events dropped for space.
fn refuse(st: &mut State, n: usize, error: &std::io::Error) {
    st.cursor.unreported_drops += n as u64;
    tracing::warn!(%error, events = n, "telemetry events not stored; counted as dropped");
}

/// Writes records to the active segment, unsynced and unseen by readers until [`sync`].
fn write(st: &mut State, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let before = st.segments.back().map_or(0, |s| s.len) + st.unsynced;
    if let Err(e) = st.active.write_all(bytes) {
        // Cut a partial write off, so the next append starts on a record boundary and
        // what is already there stays readable.
        if let Err(cut) = st.active.set_len(before) {
            tracing::warn!(error = %cut, "truncating a failed telemetry write");
        }
        return Err(e);
    }
    st.unsynced += bytes.len() as u64;
    Ok(())
}

/// Syncs what [`write`] wrote and shows it to readers; on failure cuts it off again.
fn sync(st: &mut State) -> std::io::Result<()> {
    if st.unsynced == 0 {
        return Ok(());
    }
    let synced = st.segments.back().map_or(0, |s| s.len);
    if st.config.durable
        && let Err(e) = st.active.sync_data()
    {
        st.unsynced = 0;
        if let Err(cut) = st.active.set_len(synced) {
            tracing::warn!(error = %cut, "truncating a failed telemetry write");
        }
        return Err(e);
    }
    if let Some(active) = st.segments.back_mut() {
        active.len += st.unsynced;
    }
    st.unsynced = 0;
    // The events are on disk: what follows is housekeeping, and its failure (no space for a
    // new segment, say) must not tell the appender otherwise. It is tried again next time.
    if let Err(e) = rotate(st).and_then(|()| enforce_bound(st)) {
        tracing::warn!(error = %e, "telemetry buffer housekeeping failed; retrying with the next append");
    }
    Ok(())
}

/// Starts a new segment once the active one is full.
fn rotate(st: &mut State) -> std::io::Result<()> {
    let active = st.segments.back().map_or((0, 0), |s| (s.seq, s.len));
    if active.1 >= st.config.segment_bytes {
        let seq = active.0 + 1;
        st.active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&st.dir, seq))?;
        // Tracked before anything else can fail: appends now go to this file.
        st.segments.push_back(Segment { seq, len: 0 });
        if st.config.durable {
            sync_dir(&st.dir)?;
        }
    }
    Ok(())
}

/// Drops the oldest sealed segments while the buffer is over its bound, counting the
/// events in them that were never acknowledged.
fn enforce_bound(st: &mut State) -> std::io::Result<()> {
    while st.segments.iter().map(|s| s.len).sum::<u64>() > st.config.max_bytes
        && st.segments.len() > 1
    {
        let Some(oldest) = st.segments.pop_front() else {
            break;
        };
        let path = segment_path(&st.dir, oldest.seq);
        if oldest.seq >= st.cursor.acked.segment {
            let bytes = std::fs::read(&path)?;
            let from = if oldest.seq == st.cursor.acked.segment {
                st.cursor.acked.offset as usize
            } else {
                0
            };
            let lost = count_records(&bytes, from.min(bytes.len())).0;
            st.cursor.unreported_drops += lost;
            let next = st.segments.front().map_or(oldest.seq + 1, |s| s.seq);
            st.cursor.acked = Position {
                segment: next,
                offset: 0,
            };
            st.cursor.inflight = None;
            let cursor = st.cursor.clone();
            persist_cursor(&st.dir, &cursor, st.config.durable)?;
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}
