//! The gateway's telemetry path: validate a batch, queue it, insert in batches (by size or
//! time, whichever first), and acknowledge only once ClickHouse has it.
//!
//! Back-pressure instead of loss: the queue is bounded in rows; when it is full the gateway
//! answers `RESOURCE_EXHAUSTED` and when ClickHouse is failing `UNAVAILABLE`, both with a
//! `retry-after-ms` hint, and the events stay on the devices' disks. Memory stays bounded
//! by the queue, whatever ClickHouse does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clickhouse::Client;
use edgewise_proto::convert::{bounded, required};
use edgewise_proto::fleet::{ModelEventKind, ShadowAgreement, TelemetryBatch};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::{debug, warn};

use super::rows::{BatchRow, DeviceStatusRow, InferenceRow, ModelRow, inference_row, model_row};

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
    /// Rows queued at most; beyond it, uploads are pushed back.
    pub max_queued_rows: usize,
    /// Name written with each row (the replica).
    pub gateway: String,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_insert_rows: 50_000,
            flush_interval: Duration::from_millis(200),
            max_queued_rows: 200_000,
            gateway: "gateway".into(),
        }
    }
}

/// Counters, exported as metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Rows waiting for an INSERT now.
    pub queued_rows: AtomicUsize,
    /// Most rows ever queued at once.
    pub queued_rows_high_water: AtomicUsize,
    /// Batches acknowledged.
    pub batches_acked: AtomicU64,
    /// Rows inserted.
    pub rows_inserted: AtomicU64,
    /// INSERTs that failed.
    pub insert_failures: AtomicU64,
    /// Batches refused as invalid.
    pub batches_rejected: AtomicU64,
    /// Uploads pushed back (queue full or ClickHouse down).
    pub pushed_back: AtomicU64,
    /// Milliseconds spent in the last INSERT round.
    pub last_insert_ms: AtomicU64,
    /// Rows in the last INSERT round.
    pub last_insert_rows: AtomicU64,
    /// Milliseconds spent pushing back because ClickHouse was failing.
    pub backpressure_ms: AtomicU64,
}

struct Pending {
    inference: Vec<InferenceRow>,
    model: Vec<ModelRow>,
    batch: BatchRow,
    done: oneshot::Sender<Result<(), String>>,
}

impl Pending {
    fn rows(&self) -> usize {
        self.inference.len() + self.model.len() + 1
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

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// The checks every event kind shares: label-like fields within 256 bytes, the error text
/// within 4096, a plausible time. `at` names a field.
fn check_event(
    at: &impl Fn(&str) -> String,
    labels: &[(&str, &String)],
    error: &str,
    time_unix_ms: i64,
    time_ok: &impl Fn(i64) -> bool,
) -> Result<(), Status> {
    for (field, value) in labels {
        bounded("", value)
            .map_err(|_| invalid(format!("{} is longer than 256 bytes", at(field))))?;
    }
    if error.len() > 4096 {
        return Err(invalid(format!(
            "{} is longer than 4096 bytes",
            at("error")
        )));
    }
    if !time_ok(time_unix_ms) {
        return Err(invalid(format!(
            "{} {time_unix_ms} is not a plausible time (before 2020 or in the future)",
            at("time_unix_ms")
        )));
    }
    Ok(())
}

/// Checks a batch from `device_id`; the error names the field at fault.
///
/// # Errors
/// `INVALID_ARGUMENT` or `PERMISSION_DENIED` (another device's id).
pub fn validate(device_id: &str, batch: &TelemetryBatch) -> Result<(), Status> {
    required("batch_id", &batch.batch_id).map_err(|e| invalid(e.to_string()))?;
    if batch.device_id != device_id {
        return Err(Status::permission_denied(format!(
            "device_id {:?} is not the credential's device",
            batch.device_id
        )));
    }
    let events = batch.inference.len() + batch.model_events.len();
    if events > MAX_BATCH_EVENTS {
        return Err(invalid(format!(
            "batch has {events} events; at most {MAX_BATCH_EVENTS}"
        )));
    }
    let now = now_ms();
    let time_ok = |t: i64| (EARLIEST_MS..=now + FUTURE_SKEW_MS).contains(&t);
    for (i, e) in batch.inference.iter().enumerate() {
        let at = |field: &str| format!("inference[{i}].{field}");
        for (field, value) in [
            ("event_id", &e.event_id),
            ("model", &e.model),
            ("target", &e.target),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("{} is required", at(field))));
            }
        }
        check_event(
            &at,
            &[
                ("event_id", &e.event_id),
                ("model", &e.model),
                ("version", &e.version),
                ("variant", &e.variant),
                ("target", &e.target),
                ("rule", &e.rule),
                ("policy_version", &e.policy_version),
                ("task", &e.task),
                ("data_class", &e.data_class),
                ("rollout", &e.rollout),
            ],
            &e.error,
            e.time_unix_ms,
            &time_ok,
        )?;
        if !(e.latency_ms.is_finite() && e.latency_ms >= 0.0) {
            return Err(invalid(format!(
                "{} must be finite and >= 0",
                at("latency_ms")
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
    }
    for (i, e) in batch.model_events.iter().enumerate() {
        let at = |field: &str| format!("model_events[{i}].{field}");
        if e.event_id.is_empty() || e.model.is_empty() {
            return Err(invalid(format!(
                "{} and {} are required",
                at("event_id"),
                at("model")
            )));
        }
        check_event(
            &at,
            &[
                ("event_id", &e.event_id),
                ("model", &e.model),
                ("version", &e.version),
                ("variant", &e.variant),
                ("rollout", &e.rollout),
            ],
            &e.error,
            e.time_unix_ms,
            &time_ok,
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
    }
    Ok(())
}

fn retry(mut status: Status, after: Duration) -> Status {
    if let Ok(v) = after.as_millis().to_string().parse() {
        status
            .metadata_mut()
            .insert(crate::gateway::RETRY_AFTER_MS, v);
    }
    status
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

    /// Validates, queues and waits for the INSERT; returns `(accepted, duplicate)`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad batch; `RESOURCE_EXHAUSTED` / `UNAVAILABLE` with a retry
    /// hint when the gateway must push back.
    pub async fn submit(
        &self,
        device_id: &str,
        batch: TelemetryBatch,
    ) -> Result<(u32, bool), Status> {
        if let Err(e) = validate(device_id, &batch) {
            self.stats.batches_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        if !self.healthy.load(Ordering::Relaxed) {
            self.stats.pushed_back.fetch_add(1, Ordering::Relaxed);
            return Err(retry(
                Status::unavailable("telemetry store is unavailable; keep the batch and retry"),
                Duration::from_secs(2),
            ));
        }
        let rows = batch.inference.len() + batch.model_events.len() + 1;
        let queued = self.stats.queued_rows.fetch_add(rows, Ordering::Relaxed) + rows;
        if queued > self.config.max_queued_rows {
            self.stats.queued_rows.fetch_sub(rows, Ordering::Relaxed);
            self.stats.pushed_back.fetch_add(1, Ordering::Relaxed);
            return Err(retry(
                Status::resource_exhausted("telemetry queue is full; keep the batch and retry"),
                Duration::from_secs(1),
            ));
        }
        self.stats
            .queued_rows_high_water
            .fetch_max(queued, Ordering::Relaxed);
        let key = (device_id.to_owned(), batch.batch_id.clone());
        let duplicate = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set
            .contains(&key);
        let received = u32::try_from(now_ms() / 1000).unwrap_or(0);
        let accepted =
            u32::try_from(batch.inference.len() + batch.model_events.len()).unwrap_or(u32::MAX);
        let batch_row = BatchRow {
            device_id: device_id.to_owned(),
            batch_id: batch.batch_id.clone(),
            received_at: received,
            inference_events: u32::try_from(batch.inference.len()).unwrap_or(u32::MAX),
            model_events: u32::try_from(batch.model_events.len()).unwrap_or(u32::MAX),
            dropped_events: batch.dropped_events,
            gateway: self.config.gateway.clone(),
        };
        let (done, wait) = oneshot::channel();
        let pending = Pending {
            inference: batch
                .inference
                .into_iter()
                .map(|e| inference_row(device_id, &batch.batch_id, received, e))
                .collect(),
            model: batch
                .model_events
                .into_iter()
                .map(|e| model_row(device_id, &batch.batch_id, received, e))
                .collect(),
            batch: batch_row,
            done,
        };
        if self.tx.send(pending).is_err() {
            self.stats.queued_rows.fetch_sub(rows, Ordering::Relaxed);
            return Err(Status::unavailable("telemetry writer stopped"));
        }
        match wait.await {
            Ok(Ok(())) => {
                let mut recent = self
                    .recent
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if recent.set.insert(key.clone()) {
                    recent.order.push_back(key);
                    if recent.order.len() > RECENT_BATCHES
                        && let Some(old) = recent.order.pop_front()
                    {
                        recent.set.remove(&old);
                    }
                }
                self.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                Ok((accepted, duplicate))
            }
            Ok(Err(e)) => Err(retry(
                Status::unavailable(format!(
                    "telemetry insert failed ({e}); keep the batch and retry"
                )),
                Duration::from_secs(2),
            )),
            Err(_) => Err(Status::unavailable("telemetry writer stopped")),
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

async fn flush(client: &Client, group: &mut [Pending]) -> Result<usize, clickhouse::error::Error> {
    let inference = group
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.inference))
        .collect::<Vec<_>>();
    let model = group
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.model))
        .collect::<Vec<_>>();
    let batches = group.iter().map(|p| p.batch.clone()).collect::<Vec<_>>();
    let mut n = 0;
    if !inference.is_empty() {
        n += insert_all(client, "edgewise.inference_events", inference.into_iter()).await?;
    }
    if !model.is_empty() {
        n += insert_all(client, "edgewise.model_events", model.into_iter()).await?;
    }
    // Batches last: a recorded batch means its events are in.
    n += insert_all(client, "edgewise.telemetry_batches", batches.into_iter()).await?;
    Ok(n)
}

async fn writer(
    client: Client,
    config: SinkConfig,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    healthy: Arc<AtomicBool>,
    stats: Arc<SinkStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut rows = group[0].rows();
        let deadline = Instant::now() + config.flush_interval;
        while rows < config.max_insert_rows {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some(p)) => {
                    rows += p.rows();
                    group.push(p);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = flush(&client, &mut group).await;
        stats.last_insert_ms.store(
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        stats.queued_rows.fetch_sub(rows, Ordering::Relaxed);
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
                let message = e.to_string();
                for p in group {
                    let _ = p.done.send(Err(message.clone()));
                }
                healthy.store(false, Ordering::Relaxed);
                // Fail whatever is already queued rather than insert into a failing store.
                while let Ok(p) = rx.try_recv() {
                    stats.queued_rows.fetch_sub(p.rows(), Ordering::Relaxed);
                    let _ = p.done.send(Err(message.clone()));
                }
                let down = Instant::now();
                while client.query("SELECT 1").execute().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                stats.backpressure_ms.fetch_add(
                    u64::try_from(down.elapsed().as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                healthy.store(true, Ordering::Relaxed);
                warn!("telemetry store answers again");
            }
        }
    }
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
