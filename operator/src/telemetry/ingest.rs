//! The gateway's telemetry path: validate a batch, queue it, insert in batches (by size or
//! time, whichever first), and acknowledge only once ClickHouse has it.
//!
//! Back-pressure instead of loss: the queue is bounded in bytes (rows are encoded to
//! RowBinary on arrival, so the bound is exact); when it is full the gateway answers
//! `RESOURCE_EXHAUSTED` and when ClickHouse is failing `UNAVAILABLE`, both with a
//! `retry-after-ms` hint, and the events stay on the devices' disks. Memory stays bounded
//! by the queue, whatever ClickHouse does.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clickhouse::Client;
use edgewise_proto::convert::MAX_FIELD_LEN;
use edgewise_proto::fleet::{
    ModelEventKind, RejectedEvent, ShadowAgreement, TelemetryAck, TelemetryBatch,
};
use edgewise_proto::view::{InferenceEventView, ModelEventView, TelemetryBatchView};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::rows::{BatchOrigin, BatchRow, DeviceStatusRow};

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// How far ahead of the gateway's clock an event may claim to be.
const FUTURE_SKEW_MS: i64 = 10 * 60 * 1000;
/// Earliest plausible event time (2020-01-01).
const EARLIEST_MS: i64 = 1_577_836_800_000;

/// Sink settings.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Rows per INSERT at most.
    pub max_insert_rows: usize,
    /// Longest a row waits before its INSERT.
    pub flush_interval: Duration,
    /// Encoded row bytes queued at most; beyond it, uploads are pushed back.
    pub max_queued_bytes: usize,
    /// Name written with each row (the replica).
    pub gateway: String,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_insert_rows: 100_000,
            flush_interval: Duration::from_millis(200),
            // About 400k rows at ~160 bytes each: a burst of every device's batch is absorbed.
            max_queued_bytes: 128 << 20,
            gateway: "gateway".into(),
        }
    }
}

/// Counters, exported as metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Rows waiting for an INSERT now.
    pub queued_rows: AtomicUsize,
    /// Encoded row bytes waiting for an INSERT now.
    pub queued_bytes: AtomicUsize,
    /// Most encoded row bytes ever queued at once.
    pub queued_bytes_high_water: AtomicUsize,
    /// Batches acknowledged.
    pub batches_acked: AtomicU64,
    /// Rows inserted.
    pub rows_inserted: AtomicU64,
    /// INSERTs that failed.
    pub insert_failures: AtomicU64,
    /// Batches refused as invalid.
    pub batches_rejected: AtomicU64,
    /// Events refused alone (their batches stored without them).
    pub events_rejected: AtomicU64,
    /// Uploads pushed back (queue full or ClickHouse down).
    pub pushed_back: AtomicU64,
    /// Milliseconds spent in the last INSERT round.
    pub last_insert_ms: AtomicU64,
    /// Rows in the last INSERT round.
    pub last_insert_rows: AtomicU64,
    /// Milliseconds spent pushing back because ClickHouse was failing.
    pub backpressure_ms: AtomicU64,
}

/// A validated batch, its rows already in RowBinary.
struct Pending {
    inference: Bytes,
    model: Bytes,
    batch: BatchRow,
    rows: usize,
    done: oneshot::Sender<Result<(), Arc<clickhouse::error::Error>>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.inference.len() + self.model.len()
    }
}

/// Batches telemetry into ClickHouse.
pub struct TelemetrySink {
    config: SinkConfig,
    tx: mpsc::UnboundedSender<Pending>,
    healthy: Arc<AtomicBool>,
    recent: Mutex<RecentBatches>,
    statuses: Arc<Mutex<HashMap<String, DeviceStatusRow>>>,
    stats: Arc<SinkStats>,
}

impl std::fmt::Debug for TelemetrySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetrySink")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `(device, batch)` ids this replica stored lately, oldest first.
#[derive(Debug, Default)]
struct RecentBatches {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

/// Batch ids remembered per replica to flag retries as duplicates in the ack.
const RECENT_BATCHES: usize = 100_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Why a batch was not stored. The gateway's service edge maps each to a gRPC status (and
/// a retry hint for the ones a device should retry); nothing here knows about gRPC.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is not a protobuf `TelemetryBatch` at all. Retrying is useless.
    #[error("failed to decode Protobuf message: {0}")]
    Undecodable(String),
    /// The batch is malformed; the message names the field at fault. Retrying is useless.
    #[error("{0}")]
    Invalid(String),
    /// The batch claims another device's id.
    #[error("device_id {0:?} is not the credential's device")]
    WrongDevice(String),
    /// ClickHouse is down: keep the batch and retry after the hint.
    #[error("telemetry store is unavailable; keep the batch and retry")]
    StoreUnavailable,
    /// The queue is full: keep the batch and retry after `retry_after`.
    #[error("telemetry queue is full; keep the batch and retry")]
    QueueFull {
        /// About two INSERT rounds.
        retry_after: Duration,
    },
    /// The INSERT holding this batch failed: keep it and retry.
    #[error("telemetry insert failed ({0}); keep the batch and retry")]
    InsertFailed(#[source] Arc<clickhouse::error::Error>),
    /// The sink is shutting down.
    #[error("telemetry writer stopped")]
    Stopped,
}

impl IngestError {
    /// When a device should send the same batch again, if it should.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::Undecodable(_)
            | IngestError::Invalid(_)
            | IngestError::WrongDevice(_)
            | IngestError::Stopped => None,
            IngestError::StoreUnavailable | IngestError::InsertFailed(_) => {
                Some(Duration::from_secs(2))
            }
            IngestError::QueueFull { retry_after } => Some(*retry_after),
        }
    }
}

fn invalid(message: String) -> IngestError {
    IngestError::Invalid(message)
}

/// A text field of a view: UTF-8, within `max` bytes. `at` names the field.
fn text<'a>(
    at: &impl Fn(&str) -> String,
    field: &str,
    value: &'a [u8],
    max: usize,
) -> Result<&'a str, IngestError> {
    if value.len() > max {
        return Err(invalid(format!("{} is longer than {max} bytes", at(field))));
    }
    std::str::from_utf8(value).map_err(|_| invalid(format!("{} is not UTF-8", at(field))))
}

/// The checks every event kind shares: the required fields present, label-like fields
/// UTF-8 within 256 bytes, the error text within 4096, a plausible time.
fn check_event(
    at: &impl Fn(&str) -> String,
    required: &[(&str, &Bytes)],
    labels: &[(&str, &Bytes)],
    error: &Bytes,
    time_unix_ms: i64,
    time_ok: &impl Fn(i64) -> bool,
) -> Result<(), IngestError> {
    for (field, value) in required {
        if value.is_empty() {
            return Err(invalid(format!("{} is required", at(field))));
        }
    }
    for (field, value) in required.iter().chain(labels) {
        text(at, field, value, MAX_FIELD_LEN)?;
    }
    text(at, "error", error, 4096)?;
    if !time_ok(time_unix_ms) {
        return Err(invalid(format!(
            "{} {time_unix_ms} is not a plausible time (before 2020 or in the future)",
            at("time_unix_ms")
        )));
    }
    Ok(())
}

/// The events of a batch refused alone: by list, their indexes and reasons.
#[derive(Debug, Default)]
pub struct Refused {
    /// `inference[i]`.
    pub inference: BTreeMap<usize, String>,
    /// `model_events[i]`.
    pub model_events: BTreeMap<usize, String>,
}

impl Refused {
    /// How many.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inference.len() + self.model_events.len()
    }

    /// None refused.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As the ack lists them.
    #[must_use]
    pub fn to_wire(&self) -> Vec<RejectedEvent> {
        let list = |name: &str, m: &BTreeMap<usize, String>| {
            m.iter()
                .map(|(i, reason)| RejectedEvent {
                    event: format!("{name}[{i}]"),
                    reason: reason.clone(),
                })
                .collect::<Vec<_>>()
        };
        let mut out = list("inference", &self.inference);
        out.extend(list("model_events", &self.model_events));
        out
    }
}

/// Checks a batch from `device_id`: the batch itself (its id, its device, its size) or
/// else each event on its own, so one bad event is refused alone, named with its reason.
///
/// # Errors
/// [`IngestError::Invalid`] for the batch, or [`IngestError::WrongDevice`] for another
/// device's id.
pub fn validate(device_id: &str, batch: &TelemetryBatchView) -> Result<Refused, IngestError> {
    validate_assigned(device_id, batch, &|_| Ok(()))
}

/// Whether the device may report an event of (rollout, model, version): the gateway's check
/// against what it assigned (`gateway::desired::may_report`).
pub type AssignedCheck<'a> = &'a (dyn Fn(&Reported<'_>) -> Result<(), String> + Sync);

/// What an event says it ran: the rollout (`namespace/name`), model, version and variant.
#[derive(Clone, Copy, Debug)]
pub struct Reported<'a> {
    /// `namespace/name` of the rollout.
    pub rollout: &'a str,
    /// Model family.
    pub model: &'a str,
    /// Version.
    pub version: &'a str,
    /// Variant; empty when none ran (a cloud answer, a failed download).
    pub variant: &'a str,
}

/// [`validate`], also refusing the events `assigned` refuses.
///
/// # Errors
/// As [`validate`].
pub fn validate_assigned(
    device_id: &str,
    batch: &TelemetryBatchView,
    assigned: AssignedCheck<'_>,
) -> Result<Refused, IngestError> {
    let top = |field: &str| field.to_owned();
    if batch.batch_id.is_empty() {
        return Err(invalid("batch_id is required".into()));
    }
    text(&top, "batch_id", &batch.batch_id, MAX_FIELD_LEN)?;
    if batch.device_id != device_id.as_bytes() {
        return Err(IngestError::WrongDevice(
            String::from_utf8_lossy(&batch.device_id).into_owned(),
        ));
    }
    let events = batch.inference.len() + batch.model_events.len();
    if events > MAX_BATCH_EVENTS {
        return Err(invalid(format!(
            "batch has {events} events; at most {MAX_BATCH_EVENTS}"
        )));
    }
    let now = now_ms();
    let time_ok = |t: i64| (EARLIEST_MS..=now + FUTURE_SKEW_MS).contains(&t);
    let mut refused = Refused::default();
    // Text is checked as UTF-8 first; the assignment check reads it after.
    let check = |list: &str, i: usize, [rollout, model, version, variant]: [&Bytes; 4]| {
        if rollout.is_empty() {
            return Ok(());
        }
        let reported = Reported {
            rollout: utf8(rollout),
            model: utf8(model),
            version: utf8(version),
            variant: utf8(variant),
        };
        assigned(&reported).map_err(|why| invalid(format!("{list}[{i}]: {why}")))
    };
    for (i, e) in batch.inference.iter().enumerate() {
        let checked = check_inference(i, e, &time_ok).and_then(|()| {
            check(
                "inference",
                i,
                [&e.rollout, &e.model, &e.version, &e.variant],
            )
        });
        if let Err(e) = checked {
            refused.inference.insert(i, e.to_string());
        }
    }
    for (i, e) in batch.model_events.iter().enumerate() {
        let checked = check_model_event(i, e, &time_ok).and_then(|()| {
            check(
                "model_events",
                i,
                [&e.rollout, &e.model, &e.version, &e.variant],
            )
        });
        if let Err(e) = checked {
            refused.model_events.insert(i, e.to_string());
        }
    }
    Ok(refused)
}

/// Text already checked as UTF-8.
fn utf8(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

fn check_inference(
    i: usize,
    e: &InferenceEventView,
    time_ok: &impl Fn(i64) -> bool,
) -> Result<(), IngestError> {
    let at = |field: &str| format!("inference[{i}].{field}");
    check_event(
        &at,
        &[
            ("event_id", &e.event_id),
            ("model", &e.model),
            ("target", &e.target),
        ],
        &[
            ("version", &e.version),
            ("variant", &e.variant),
            ("rule", &e.rule),
            ("policy_version", &e.policy_version),
            ("task", &e.task),
            ("data_class", &e.data_class),
            ("rollout", &e.rollout),
            ("router_version", &e.router_version),
        ],
        &e.error,
        e.time_unix_ms,
        time_ok,
    )?;
    if !(e.latency_ms.is_finite() && e.latency_ms >= 0.0) {
        return Err(invalid(format!(
            "{} must be finite and >= 0",
            at("latency_ms")
        )));
    }
    if !(e.first_token_ms.is_finite() && e.first_token_ms >= 0.0) {
        return Err(invalid(format!(
            "{} must be finite and >= 0",
            at("first_token_ms")
        )));
    }
    if !(e.cost_usd.is_finite() && e.cost_usd >= 0.0) {
        return Err(invalid(format!(
            "{} must be finite and >= 0",
            at("cost_usd")
        )));
    }
    if ShadowAgreement::try_from(e.shadow).is_err() {
        return Err(invalid(format!(
            "{} {} is not a ShadowAgreement",
            at("shadow"),
            e.shadow
        )));
    }
    Ok(())
}

fn check_model_event(
    i: usize,
    e: &ModelEventView,
    time_ok: &impl Fn(i64) -> bool,
) -> Result<(), IngestError> {
    let at = |field: &str| format!("model_events[{i}].{field}");
    check_event(
        &at,
        &[("event_id", &e.event_id), ("model", &e.model)],
        &[
            ("version", &e.version),
            ("variant", &e.variant),
            ("rollout", &e.rollout),
        ],
        &e.error,
        e.time_unix_ms,
        time_ok,
    )?;
    match ModelEventKind::try_from(e.kind) {
        Ok(ModelEventKind::Unspecified) | Err(_) => {
            return Err(invalid(format!(
                "{} {} is not a ModelEventKind",
                at("kind"),
                e.kind
            )));
        }
        Ok(_) => {}
    }
    Ok(())
}

impl TelemetrySink {
    /// Starts the writer and status-flush tasks.
    #[must_use]
    pub fn start(client: Client, config: SinkConfig) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(SinkStats::default());
        let statuses = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(writer(
            client.clone(),
            config.clone(),
            rx,
            healthy.clone(),
            stats.clone(),
        ));
        tokio::spawn(status_writer(client, statuses.clone()));
        Arc::new(TelemetrySink {
            config,
            tx,
            healthy,
            recent: Mutex::new(RecentBatches::default()),
            statuses,
            stats,
        })
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// Validates, queues and waits for the INSERT; returns the acknowledgement.
    ///
    /// # Errors
    /// As [`TelemetrySink::submit_encoded`].
    pub async fn submit(
        &self,
        device_id: &str,
        batch: &TelemetryBatch,
    ) -> Result<TelemetryAck, IngestError> {
        self.submit_encoded(device_id, batch.encode_to_vec().into())
            .await
    }

    /// [`TelemetrySink::submit`] for an encoded `TelemetryBatch`, as it arrives: it is read
    /// as a [`TelemetryBatchView`], its text fields slices of `body`, and written to
    /// RowBinary from there.
    ///
    /// # Errors
    /// [`IngestError`]: a bad batch, or push-back with [`IngestError::retry_after`].
    pub async fn submit_encoded(
        &self,
        device_id: &str,
        body: Bytes,
    ) -> Result<TelemetryAck, IngestError> {
        self.submit_checked(device_id, body, &|_| Ok(())).await
    }

    /// [`TelemetrySink::submit_encoded`], refusing the events `assigned` refuses (the
    /// gateway's check against what it assigned the device).
    ///
    /// # Errors
    /// As [`TelemetrySink::submit_encoded`].
    pub async fn submit_checked(
        &self,
        device_id: &str,
        body: Bytes,
        assigned: AssignedCheck<'_>,
    ) -> Result<TelemetryAck, IngestError> {
        let checked = TelemetryBatchView::decode(body)
            .map_err(|e| IngestError::Undecodable(format!("TelemetryBatch: {e}")))
            .and_then(|batch| {
                validate_assigned(device_id, &batch, assigned).map(|refused| (batch, refused))
            });
        let (batch, refused) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                self.stats.batches_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        // Validated: UTF-8.
        let batch_id = String::from_utf8_lossy(&batch.batch_id).into_owned();
        if !self.healthy.load(Ordering::Relaxed) {
            self.stats.pushed_back.fetch_add(1, Ordering::Relaxed);
            return Err(IngestError::StoreUnavailable);
        }
        let received = u32::try_from(now_ms() / 1000).unwrap_or(0);
        let (inference, model) = encode_rows(device_id, &batch, &refused, received);
        let stored_inference = batch.inference.len() - refused.inference.len();
        let stored_model = batch.model_events.len() - refused.model_events.len();
        let rows = stored_inference + stored_model + 1;
        let bytes = inference.len() + model.len();
        let queued = self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if queued > self.config.max_queued_bytes {
            self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.stats.pushed_back.fetch_add(1, Ordering::Relaxed);
            // About two INSERT rounds: long enough for the queue to drain, short enough not
            // to idle when it does. Agents add their own jitter.
            let round = self.stats.last_insert_ms.load(Ordering::Relaxed);
            return Err(IngestError::QueueFull {
                retry_after: Duration::from_millis(round.saturating_mul(2).clamp(50, 1_000)),
            });
        }
        self.stats.queued_rows.fetch_add(rows, Ordering::Relaxed);
        self.stats
            .queued_bytes_high_water
            .fetch_max(queued, Ordering::Relaxed);
        let key = (device_id.to_owned(), batch_id);
        let duplicate = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set
            .contains(&key);
        let accepted = u32::try_from(stored_inference + stored_model).unwrap_or(u32::MAX);
        let batch_row = BatchRow {
            device_id: device_id.to_owned(),
            batch_id: key.1.clone(),
            received_at: received,
            inference_events: u32::try_from(stored_inference).unwrap_or(u32::MAX),
            model_events: u32::try_from(stored_model).unwrap_or(u32::MAX),
            dropped_events: batch.dropped_events,
            gateway: self.config.gateway.clone(),
        };
        let (done, wait) = oneshot::channel();
        let pending = Pending {
            inference,
            model,
            batch: batch_row,
            rows,
            done,
        };
        if let Err(mpsc::error::SendError(p)) = self.tx.send(pending) {
            dequeued(&self.stats, &p);
            return Err(IngestError::Stopped);
        }
        match wait.await {
            Ok(Ok(())) => {
                let mut recent = self
                    .recent
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let batch_id = key.1.clone();
                if recent.set.insert(key.clone()) {
                    recent.order.push_back(key);
                    if recent.order.len() > RECENT_BATCHES
                        && let Some(old) = recent.order.pop_front()
                    {
                        recent.set.remove(&old);
                    }
                }
                self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                if !refused.is_empty() && !duplicate {
                    self.stats
                        .events_rejected
                        .fetch_add(refused.len() as u64, Ordering::Relaxed);
                }
                Ok(TelemetryAck {
                    batch_id,
                    accepted,
                    duplicate,
                    rejected: refused.to_wire(),
                })
            }
            Ok(Err(e)) => Err(IngestError::InsertFailed(e)),
            Err(_) => Err(IngestError::Stopped),
        }
    }

    /// Records the latest status of a device (coalesced; latest wins).
    pub fn device_status(&self, row: DeviceStatusRow) {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(row.device_id.clone(), row);
    }
}

/// The batch's event rows in RowBinary: `(inference_events, model_events)`.
fn encode_rows(
    device_id: &str,
    batch: &TelemetryBatchView,
    refused: &Refused,
    received: u32,
) -> (Bytes, Bytes) {
    // Rows are about the size of the wire events plus the ids repeated on each.
    let per_row = device_id.len() + batch.batch_id.len() + 64;
    let origin = BatchOrigin {
        device_id: device_id.as_bytes(),
        batch_id: &batch.batch_id,
        received_at: received,
    };
    let mut inference = Vec::with_capacity(batch.inference.len() * (per_row + 96));
    for (i, e) in batch.inference.iter().enumerate() {
        if !refused.inference.contains_key(&i) {
            origin.write_inference_row(&mut inference, e);
        }
    }
    let mut model = Vec::with_capacity(batch.model_events.len() * (per_row + 48));
    for (i, e) in batch.model_events.iter().enumerate() {
        if !refused.model_events.contains_key(&i) {
            origin.write_model_row(&mut model, e);
        }
    }
    (inference.into(), model.into())
}

/// Takes a batch out of the queue's accounting.
fn dequeued(stats: &SinkStats, p: &Pending) {
    stats.queued_rows.fetch_sub(p.rows, Ordering::Relaxed);
    stats.queued_bytes.fetch_sub(p.bytes(), Ordering::Relaxed);
}

/// Sends RowBinary chunks as one INSERT into `table`.
async fn insert_encoded(
    client: &Client,
    table: &str,
    chunks: impl Iterator<Item = Bytes>,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert_formatted_with(format!("INSERT INTO {table} FORMAT RowBinary"));
    for chunk in chunks.filter(|c| !c.is_empty()) {
        insert.send(chunk).await?;
    }
    insert.end().await
}

async fn insert_all<T>(
    client: &Client,
    table: &str,
    rows: impl Iterator<Item = T>,
) -> Result<usize, clickhouse::error::Error>
where
    T: clickhouse::RowWrite + serde::Serialize + for<'a> clickhouse::Row<Value<'a> = T>,
{
    // Table names here are constants with a database prefix, which `insert` would quote whole.
    let mut insert = client.insert_unescaped::<T>(table).await?;
    let mut n = 0;
    for row in rows {
        insert.write(&row).await?;
        n += 1;
    }
    insert.end().await?;
    Ok(n)
}

async fn flush(client: &Client, group: &[Pending]) -> Result<usize, clickhouse::error::Error> {
    if group.iter().any(|p| !p.inference.is_empty()) {
        let chunks = group.iter().map(|p| p.inference.clone());
        insert_encoded(client, "edgewise.inference_events", chunks).await?;
    }
    if group.iter().any(|p| !p.model.is_empty()) {
        let chunks = group.iter().map(|p| p.model.clone());
        insert_encoded(client, "edgewise.model_events", chunks).await?;
    }
    // Batches last: a recorded batch means its events are in.
    let batches = group.iter().map(|p| p.batch.clone());
    insert_all(client, "edgewise.telemetry_batches", batches).await?;
    Ok(group.iter().map(|p| p.rows).sum())
}

/// INSERTs in flight at once: the next group is gathered and sent while the previous one is
/// written, so devices waiting for acks do not idle the pipeline.
const INSERTS_IN_FLIGHT: usize = 2;

async fn writer(
    client: Client,
    config: SinkConfig,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    healthy: Arc<AtomicBool>,
    stats: Arc<SinkStats>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(INSERTS_IN_FLIGHT));
    // The first failure's message, for whatever was queued behind it.
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<Arc<clickhouse::error::Error>>();
    loop {
        let first = tokio::select! {
            Some(message) = failed_rx.recv() => {
                recover(&client, &mut rx, &healthy, &stats, &slots, &message).await;
                continue;
            }
            first = rx.recv() => match first {
                Some(p) => p,
                None => return,
            },
        };
        let mut rows = first.rows;
        let mut group = vec![first];
        let deadline = Instant::now() + config.flush_interval;
        while rows < config.max_insert_rows {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some(p)) => {
                    rows += p.rows;
                    group.push(p);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, stats, failed) = (client.clone(), stats.clone(), failed_tx.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let result = flush(&client, &group).await;
            stats.last_insert_ms.store(
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            for p in &group {
                dequeued(&stats, p);
            }
            match result {
                Ok(n) => {
                    stats.rows_inserted.fetch_add(n as u64, Ordering::Relaxed);
                    stats.last_insert_rows.store(n as u64, Ordering::Relaxed);
                    debug!(rows = n, batches = group.len(), "telemetry inserted");
                    for p in group {
                        let _ = p.done.send(Ok(()));
                    }
                }
                Err(e) => {
                    stats.insert_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, batches = group.len(), "telemetry insert failed; pushing back until ClickHouse answers");
                    let e = Arc::new(e);
                    for p in group {
                        let _ = p.done.send(Err(e.clone()));
                    }
                    let _ = failed.send(e);
                }
            }
            drop(slot);
        });
    }
}

/// After a failed INSERT: refuse uploads, fail what is queued rather than insert into a
/// failing store, and wait until ClickHouse answers again.
async fn recover(
    client: &Client,
    rx: &mut mpsc::UnboundedReceiver<Pending>,
    healthy: &AtomicBool,
    stats: &SinkStats,
    slots: &tokio::sync::Semaphore,
    cause: &Arc<clickhouse::error::Error>,
) {
    healthy.store(false, Ordering::Relaxed);
    // Let the other INSERT in flight finish (it fails or lands on its own).
    let in_flight = slots.acquire_many(INSERTS_IN_FLIGHT as u32).await;
    while let Ok(p) = rx.try_recv() {
        dequeued(stats, &p);
        let _ = p.done.send(Err(cause.clone()));
    }
    let down = Instant::now();
    while client.query("SELECT 1").execute().await.is_err() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stats.backpressure_ms.fetch_add(
        u64::try_from(down.elapsed().as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    drop(in_flight);
    healthy.store(true, Ordering::Relaxed);
    warn!("telemetry store answers again");
}

async fn status_writer(client: Client, statuses: Arc<Mutex<HashMap<String, DeviceStatusRow>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let rows: Vec<DeviceStatusRow> = statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, r)| r)
            .collect();
        if rows.is_empty() {
            continue;
        }
        if let Err(e) = insert_all(&client, "edgewise.device_status", rows.iter().cloned()).await {
            warn!(error = %e, devices = rows.len(), "device status upsert failed; retrying with the next flush");
            // Put them back unless a newer status arrived meanwhile: nothing is lost.
            let mut pending = statuses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for r in rows {
                pending.entry(r.device_id.clone()).or_insert(r);
            }
        }
    }
}
