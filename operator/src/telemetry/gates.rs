//! Gate metrics, device counts and version skew: SQL over the telemetry tables.
//!
//! Windows are in event time (`time`), not arrival time, so events a device uploads late,
//! after days offline, land in the window they belong to. Every query reads with `FINAL`, so
//! a batch delivered twice is counted once.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clickhouse::{Client, Row};
use edgewise_core::rollout::fleet::{self, DeviceInference, DeviceInstalls};
use edgewise_core::rollout::{GateMetrics, Metric, MetricSet};
use serde::Deserialize;

/// On-device inference of one version of one rollout over `[from, to)`, per device: gates
/// weigh devices, not samples (`edgewise_core::rollout::fleet`).
pub const INFERENCE_METRICS_SQL: &str = "SELECT
    device_id,
    count() AS samples,
    quantileExact(0.5)(latency_ms) AS p50,
    quantileExact(0.95)(latency_ms) AS p95,
    quantileExact(0.99)(latency_ms) AS p99,
    countIf(ok = 0) AS errors,
    countIf(fallback_used = 1) AS fallbacks,
    countIf(shadow = 'agree') AS agreements,
    countIf(shadow != 'none') AS shadows
FROM edgewise.inference_events FINAL
WHERE rollout = ? AND model = ? AND version = ? AND on_device = 1
  AND time >= toDateTime(?) AND time < toDateTime(?)
GROUP BY device_id";

/// Install outcomes of one version of one rollout over `[from, to)`, per device.
pub const INSTALL_METRICS_SQL: &str = "SELECT
    device_id,
    countIf(kind = 'install_failed') AS failed,
    countIf(kind IN ('activated', 'install_failed')) AS attempts
FROM edgewise.model_events FINAL
WHERE rollout = ? AND model = ? AND version = ?
  AND time >= toDateTime(?) AND time < toDateTime(?)
GROUP BY device_id";

/// Version skew of a model: devices per installed version, from the latest device status.
pub const VERSION_SKEW_SQL: &str = "SELECT
    installed_versions[indexOf(installed_models, ?)] AS version,
    count() AS devices
FROM edgewise.device_status FINAL
WHERE has(installed_models, ?)
GROUP BY version
ORDER BY version";

/// Every device's latest labels and the version of a model it runs ('' for none): a
/// rollout's segment when no gateway runs in-process (its selector is applied in Rust).
pub const SEGMENT_DEVICES_SQL: &str = "SELECT
    device_id,
    label_keys,
    label_values,
    if(has(installed_models, ?), installed_versions[indexOf(installed_models, ?)], '') AS version
FROM edgewise.device_status FINAL";

/// Devices whose latest status says they run a policy version.
pub const POLICY_ACKS_SQL: &str =
    "SELECT count() FROM edgewise.device_status FINAL WHERE policy_version = ?";

#[derive(Debug, Row, Deserialize)]
struct InferenceRow {
    device_id: String,
    samples: u64,
    p50: f64,
    p95: f64,
    p99: f64,
    errors: u64,
    fallbacks: u64,
    agreements: u64,
    shadows: u64,
}

#[derive(Debug, Row, Deserialize)]
struct InstallRow {
    device_id: String,
    failed: u64,
    attempts: u64,
}

#[derive(Debug, Row, Deserialize)]
struct SegmentRow {
    device_id: String,
    label_keys: Vec<String>,
    label_values: Vec<String>,
    version: String,
}

/// A device as its latest status in ClickHouse describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDevice {
    /// Device id.
    pub device_id: String,
    /// Targeting labels.
    pub labels: BTreeMap<String, String>,
    /// The version of the model it runs.
    pub version: Option<String>,
}

#[derive(Debug, Row, Deserialize)]
struct SkewRow {
    version: String,
    devices: u64,
}

/// Which slice of telemetry: one version in one rollout.
#[derive(Clone, Copy, Debug)]
pub struct Slice<'a> {
    /// `namespace/name` of the rollout.
    pub rollout: &'a str,
    /// Model family.
    pub model: &'a str,
    /// Version.
    pub version: &'a str,
}

fn unix(t: SystemTime) -> u32 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// The metrics of one slice over `[from, to)`. A metric with no data is absent.
///
/// # Errors
/// ClickHouse errors.
pub async fn metric_set(
    client: &Client,
    slice: Slice<'_>,
    from: SystemTime,
    to: SystemTime,
) -> Result<MetricSet, clickhouse::error::Error> {
    // Both queries take the same parameters: the slice, then the window.
    let query = |sql| {
        client
            .query(sql)
            .bind(slice.rollout)
            .bind(slice.model)
            .bind(slice.version)
            .bind(unix(from))
            .bind(unix(to))
    };
    let inference: Vec<InferenceRow> = query(INFERENCE_METRICS_SQL).fetch_all().await?;
    let installs: Vec<InstallRow> = query(INSTALL_METRICS_SQL).fetch_all().await?;
    let per_device: Vec<DeviceInference> = inference
        .iter()
        .map(|r| DeviceInference {
            samples: r.samples,
            p50: r.p50,
            p95: r.p95,
            p99: r.p99,
            errors: r.errors,
            fallbacks: r.fallbacks,
            agreements: r.agreements,
            shadows: r.shadows,
        })
        .collect();
    let mut values = fleet::inference_values(&per_device);
    let install: Vec<DeviceInstalls> = installs
        .iter()
        .map(|r| DeviceInstalls {
            failed: r.failed,
            attempts: r.attempts,
        })
        .collect();
    if let Some(v) = fleet::install_failure_rate(&install) {
        values.insert(Metric::InstallFailureRate, v);
    }
    let devices: std::collections::BTreeSet<&str> = inference
        .iter()
        .map(|r| r.device_id.as_str())
        .chain(installs.iter().map(|r| r.device_id.as_str()))
        .collect();
    Ok(MetricSet {
        values,
        samples: inference.iter().map(|r| r.samples).sum(),
        devices: devices.len() as u64,
    })
}

/// Canary vs stable over the `window` ending at `now`.
///
/// # Errors
/// ClickHouse errors.
pub async fn gate_metrics(
    client: &Client,
    rollout: &str,
    model: &str,
    canary: &str,
    stable: &str,
    window: Duration,
    now: SystemTime,
) -> Result<GateMetrics, clickhouse::error::Error> {
    let from = now.checked_sub(window).unwrap_or(UNIX_EPOCH);
    // The window's end is exclusive; include the current second.
    let to = now + Duration::from_secs(1);
    let canary = metric_set(
        client,
        Slice {
            rollout,
            model,
            version: canary,
        },
        from,
        to,
    )
    .await?;
    let baseline = metric_set(
        client,
        Slice {
            rollout,
            model,
            version: stable,
        },
        from,
        to,
    )
    .await?;
    Ok(GateMetrics { canary, baseline })
}

/// Devices per installed version of `model`.
///
/// # Errors
/// ClickHouse errors.
pub async fn version_skew(
    client: &Client,
    model: &str,
) -> Result<Vec<(String, u64)>, clickhouse::error::Error> {
    let rows: Vec<SkewRow> = client
        .query(VERSION_SKEW_SQL)
        .bind(model)
        .bind(model)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|r| (r.version, r.devices)).collect())
}

/// Every device with its labels and the version of `model` it runs.
///
/// # Errors
/// ClickHouse errors.
pub async fn segment_devices(
    client: &Client,
    model: &str,
) -> Result<Vec<StoredDevice>, clickhouse::error::Error> {
    let rows: Vec<SegmentRow> = client
        .query(SEGMENT_DEVICES_SQL)
        .bind(model)
        .bind(model)
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredDevice {
            device_id: r.device_id,
            labels: r.label_keys.into_iter().zip(r.label_values).collect(),
            version: (!r.version.is_empty()).then_some(r.version),
        })
        .collect())
}

/// Devices running policy `version`, from their latest status.
///
/// # Errors
/// ClickHouse errors.
pub async fn policy_acks(client: &Client, version: &str) -> Result<u64, clickhouse::error::Error> {
    client
        .query(POLICY_ACKS_SQL)
        .bind(version)
        .fetch_one()
        .await
}
