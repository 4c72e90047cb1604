//! The durable telemetry buffer: bounded, crash-safe, append-only.
//!
//! Events are appended as records to segment files (`seg-<seq>.log`, rolled at a size) and
//! uploaded from a persisted cursor; a batch leaves the buffer only when the gateway has
//! acknowledged it. An append writes its records to the active segment on the caller's
//! thread, at once, so the agent's own crash loses none; a writer thread syncs them,
//! group-committed: one fsync for every append written while the previous one ran. An
//! append that is waited on (`Router.Report`) is synced before it returns; one nobody waits
//! on (the data plane's record of a request it has answered) with the next group, at the
//! latest `sync_interval` later, and it costs the caller no wake-up of the writer while a
//! sync is already due. Readers see a segment only up to what is synced.
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
    /// Sealed segments and the active one, each up to what is synced: what readers see.
    segments: VecDeque<Segment>,
    cursor: CursorFile,
}

/// Where appends go: the end of the active segment. Apart from [`State`], so an append
/// never waits for an upload's reads or its cursor's fsync, and a sync runs outside both.
struct Active {
    seq: u64,
    file: Arc<File>,
    /// The file's end: records past `synced` are written but not yet synced.
    written: u64,
    synced: u64,
    /// Events in the records past `synced` that the writer has not yet taken for a sync.
    unsynced_events: usize,
    /// The writer has been asked for a sync of what is written and has not yet begun it.
    sync_asked: bool,
}

type Done = oneshot::Sender<Result<(), Arc<std::io::Error>>>;

/// A request to the writer to sync what is written: now, telling `done`, or (no one
/// waiting) within `sync_interval`.
struct SyncRequest {
    done: Option<Done>,
}

/// The buffer. Cheap to share behind an `Arc`.
pub struct TelemetryBuffer {
    state: Arc<Mutex<State>>,
    active: Arc<Mutex<Active>>,
    writer: Mutex<Option<mpsc::Sender<SyncRequest>>>,
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
        let (active_seq, active_len) = segments.back().map_or((0, 0), |s| (s.seq, s.len));
        let file = OpenOptions::new()
            .append(true)
            .open(segment_path(dir, active_seq))?;
        let active = Arc::new(Mutex::new(Active {
            seq: active_seq,
            file: Arc::new(file),
            written: active_len,
            synced: active_len,
            unsynced_events: 0,
            sync_asked: false,
        }));
        let writer_config = config.clone();
        let state = Arc::new(Mutex::new(State {
            dir: dir.to_owned(),
            config,
            segments,
            cursor,
        }));
        let appended = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<SyncRequest>();
        let shared = Shared {
            state: state.clone(),
            active: active.clone(),
            appended: appended.clone(),
            commits: commits.clone(),
            config: writer_config,
        };
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || writer(&shared, &rx))?;
        Ok(Arc::new(TelemetryBuffer {
            state,
            active,
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
        let (done, rx) = oneshot::channel();
        let writer = self.writer()?;
        self.write(&events)?;
        writer
            .send(SyncRequest { done: Some(done) })
            .map_err(|_| BufferError::Closed)?;
        rx.await
            .map_err(|_| BufferError::Closed)?
            .map_err(|e| BufferError::Io(std::io::Error::new(e.kind(), e)))
    }

    /// Appends events that nobody waits on (a data plane's record of a request it has
    /// answered): written at once (the agent's own crash does not lose them) and synced
    /// within `sync_interval`. A failure to store them is logged and counted as dropped
    /// events, which the gateway hears of.
    ///
    /// # Errors
    /// [`BufferError::Closed`] once the buffer is closed.
    pub fn append_soon(&self, events: Vec<Event>) -> Result<(), BufferError> {
        let writer = self.writer()?;
        let ask = match self.write(&events) {
            Ok(ask) => ask,
            Err(_) => return Ok(()), // refused: logged and counted
        };
        if ask {
            writer
                .send(SyncRequest { done: None })
                .map_err(|_| BufferError::Closed)?;
        }
        Ok(())
    }

    fn writer(&self) -> Result<mpsc::Sender<SyncRequest>, BufferError> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(BufferError::Closed)
    }

    /// Writes `events` to the active segment; `true` when no sync has been asked for them
    /// yet. A failed write is cut off again, and its events counted as dropped.
    fn write(&self, events: &[Event]) -> Result<bool, BufferError> {
        let mut records = Vec::with_capacity(256 * events.len());
        encode_records(events, &mut records);
        let mut a = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match write(&mut a, &records, events.len()) {
            Ok(()) => Ok(!std::mem::replace(&mut a.sync_asked, true)),
            Err(e) => {
                drop(a);
                let mut st = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                refuse(&mut st, events.len(), &e);
                Err(BufferError::Io(e))
            }
        }
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

/// What the writer thread shares with the buffer.
struct Shared {
    state: Arc<Mutex<State>>,
    active: Arc<Mutex<Active>>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
    config: BufferConfig,
}

/// The group-commit loop: syncs when someone waits, or when the interval of a sync asked
/// without waiting is up, taking everything written by then along.
fn writer(shared: &Shared, rx: &mpsc::Receiver<SyncRequest>) {
    // Without fsync a commit only shows records to readers: nothing to gather for.
    let interval = if shared.config.durable {
        shared.config.sync_interval
    } else {
        Duration::ZERO
    };
    let mut last_sync = Instant::now();
    let mut waiting: Vec<Done> = Vec::new();
    // When a sync nobody waits on is due.
    let mut due_at: Option<Instant> = None;
    let mut closed = false;
    while !closed {
        let first = match due_at {
            None => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            },
        };
        for r in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match r.done {
                Some(done) => waiting.push(done),
                None => {
                    due_at.get_or_insert(last_sync + interval);
                }
            }
        }
        let due = closed || !waiting.is_empty() || due_at.is_some_and(|at| at <= Instant::now());
        if !due {
            continue;
        }
        let outcome = commit(shared).map_err(Arc::new);
        last_sync = Instant::now();
        due_at = None;
        shared.commits.fetch_add(1, Ordering::Relaxed);
        for done in waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
        shared.appended.notify_one();
    }
}

/// Syncs what is written to the active segment and shows it to readers, starting a new
/// segment first when this one is full; on failure cuts the unsynced records off and
/// counts them as dropped. The fsync runs under neither lock: appends go on meanwhile.
fn commit(shared: &Shared) -> std::io::Result<()> {
    let lock_active = || {
        shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let lock_state = || {
        shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let (seq, file, upto, synced, events, rotated) = {
        let mut a = lock_active();
        a.sync_asked = false;
        let (seq, file, upto, synced) = (a.seq, a.file.clone(), a.written, a.synced);
        let events = std::mem::take(&mut a.unsynced_events);
        // Full: appends go to a new segment from now on; this one is sealed once synced.
        let rotated = upto >= shared.config.segment_bytes && rotate(&shared.state, &mut a);
        (seq, file, upto, synced, events, rotated)
    };
    if upto == synced && !rotated {
        return Ok(());
    }
    let durable = shared.config.durable;
    let result = if durable { file.sync_data() } else { Ok(()) };
    // The new segment's name, made durable as the sealed one is (outside the locks too).
    if rotated && durable {
        let dir = lock_state().dir.clone();
        if let Err(e) = sync_dir(&dir) {
            tracing::warn!(error = %e, "syncing the telemetry directory after a new segment");
        }
    }
    if let Err(e) = result {
        let mut lost = events;
        {
            let mut a = lock_active();
            if a.seq == seq {
                lost += std::mem::take(&mut a.unsynced_events);
                a.written = synced;
            }
            // Cut, so the next append starts on a record boundary and what is synced stays
            // readable.
            if let Err(cut) = file.set_len(synced) {
                tracing::warn!(error = %cut, "truncating a failed telemetry write");
            }
        }
        let mut st = lock_state();
        if rotated {
            st.segments.push_back(Segment {
                seq: seq + 1,
                len: 0,
            });
        }
        refuse(&mut st, lost, &e);
        return Err(e);
    }
    let mut a = lock_active();
    if a.seq == seq {
        a.synced = upto;
    }
    let mut st = lock_state();
    drop(a);
    if let Some(s) = st.segments.iter_mut().find(|s| s.seq == seq) {
        s.len = upto;
    }
    if rotated {
        st.segments.push_back(Segment {
            seq: seq + 1,
            len: 0,
        });
    }
    // The events are on disk: what follows is housekeeping, and its failure must not tell
    // the appender otherwise. It is tried again next time.
    if let Err(e) = enforce_bound(&mut st) {
        tracing::warn!(error = %e, "telemetry buffer housekeeping failed; retrying with the next append");
    }
    Ok(())
}

/// Encodes events as records.
fn encode_records(events: &[Event], buf: &mut Vec<u8>) {
    for e in events {
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER]);
        e.encode(buf);
        let len = buf.len() - start - HEADER;
        let crc = crc32fast::hash(&buf[start + HEADER..]);
        buf[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
        buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Refused (a full disk, say): the appenders that wait hear so, the log says so for all,
/// and the gateway learns the count with the next batch, as for events dropped for space.
fn refuse(st: &mut State, n: usize, error: &std::io::Error) {
    st.cursor.unreported_drops += n as u64;
    tracing::warn!(%error, events = n, "telemetry events not stored; counted as dropped");
}

/// Writes records to the end of the active segment, unsynced and unseen by readers until
/// [`commit`].
fn write(a: &mut Active, bytes: &[u8], events: usize) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    if let Err(e) = (&*a.file).write_all(bytes) {
        // Cut a partial write off, so the next append starts on a record boundary and
        // what is already there stays readable.
        if let Err(cut) = a.file.set_len(a.written) {
            tracing::warn!(error = %cut, "truncating a failed telemetry write");
        }
        return Err(e);
    }
    a.written += bytes.len() as u64;
    a.unsynced_events += events;
    Ok(())
}

/// Makes a new segment the active one for appends; `false` (and tried again at the next
/// commit) when it cannot be created. Readers hear of it from [`commit`], once the sealed
/// one is synced: until then the sealed one's tail is unseen, and a reader that saw the new
/// segment would take that tail as read.
fn rotate(state: &Mutex<State>, a: &mut Active) -> bool {
    let st = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seq = a.seq + 1;
    let opened = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(&st.dir, seq));
    match opened {
        Ok(file) => {
            *a = Active {
                seq,
                file: Arc::new(file),
                written: 0,
                synced: 0,
                unsynced_events: 0,
                sync_asked: false,
            };
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "starting a telemetry segment failed; retrying with the next sync");
            false
        }
    }
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
