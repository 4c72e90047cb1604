//! Rows as they are inserted (RowBinary, column order = field order), and their
//! construction from validated wire messages.

use clickhouse::Row;
use edgewise_proto::fleet::{InferenceEvent, ModelEvent, ModelEventKind, ShadowAgreement};
use serde::{Deserialize, Serialize};

/// `edgewise.inference_events`.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct InferenceRow {
    pub time: u32,
    pub time_ms: u64,
    pub device_id: String,
    pub event_id: String,
    pub batch_id: String,
    pub rollout: String,
    pub model: String,
    pub version: String,
    pub variant: String,
    pub target: String,
    pub on_device: u8,
    pub rule: String,
    pub policy_version: String,
    pub latency_ms: f64,
    pub ok: u8,
    pub fallback_used: u8,
    pub error: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub cost_usd: f64,
    /// Enum8: 0 none, 1 agree, 2 disagree.
    pub shadow: i8,
    pub task: String,
    pub data_class: String,
    pub received_at: u32,
}

/// `edgewise.model_events`.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ModelRow {
    pub time: u32,
    pub time_ms: u64,
    pub device_id: String,
    pub event_id: String,
    pub batch_id: String,
    pub rollout: String,
    /// Enum8, values as `ModelEventKind`.
    pub kind: i8,
    pub model: String,
    pub version: String,
    pub variant: String,
    pub duration_ms: u64,
    pub bytes: u64,
    pub error: String,
    pub received_at: u32,
}

/// `edgewise.device_status`.
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DeviceStatusRow {
    pub device_id: String,
    pub updated_at: u32,
    pub updated_ms: u64,
    pub connected: u8,
    pub agent_version: String,
    pub os: String,
    pub arch: String,
    pub memory_mib: u64,
    pub accelerators: Vec<String>,
    pub label_keys: Vec<String>,
    pub label_values: Vec<String>,
    pub installed_models: Vec<String>,
    pub installed_versions: Vec<String>,
    pub policy_version: String,
    pub connects: u64,
    pub gateway: String,
}

/// `edgewise.telemetry_batches`.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct BatchRow {
    pub device_id: String,
    pub batch_id: String,
    pub received_at: u32,
    pub inference_events: u32,
    pub model_events: u32,
    pub dropped_events: u64,
    pub gateway: String,
}

fn seconds(ms: i64) -> u32 {
    u32::try_from(ms.max(0) / 1000).unwrap_or(u32::MAX)
}

/// Builds an inference row (the event was validated).
#[must_use]
pub fn inference_row(
    device_id: &str,
    batch_id: &str,
    received_at: u32,
    e: InferenceEvent,
) -> InferenceRow {
    let shadow = match ShadowAgreement::try_from(e.shadow).unwrap_or(ShadowAgreement::None) {
        ShadowAgreement::None => 0,
        ShadowAgreement::Agree => 1,
        ShadowAgreement::Disagree => 2,
    };
    InferenceRow {
        time: seconds(e.time_unix_ms),
        time_ms: u64::try_from(e.time_unix_ms).unwrap_or(0),
        device_id: device_id.to_owned(),
        event_id: e.event_id,
        batch_id: batch_id.to_owned(),
        rollout: e.rollout,
        model: e.model,
        version: e.version,
        variant: e.variant,
        target: e.target,
        on_device: u8::from(e.on_device),
        rule: e.rule,
        policy_version: e.policy_version,
        latency_ms: e.latency_ms,
        ok: u8::from(e.ok),
        fallback_used: u8::from(e.fallback_used),
        error: e.error,
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        cost_usd: e.cost_usd,
        shadow,
        task: e.task,
        data_class: e.data_class,
        received_at,
    }
}

/// Builds a model-event row (the event was validated).
#[must_use]
pub fn model_row(device_id: &str, batch_id: &str, received_at: u32, e: ModelEvent) -> ModelRow {
    let kind = ModelEventKind::try_from(e.kind).map_or(0, |k| k as i8);
    ModelRow {
        time: seconds(e.time_unix_ms),
        time_ms: u64::try_from(e.time_unix_ms).unwrap_or(0),
        device_id: device_id.to_owned(),
        event_id: e.event_id,
        batch_id: batch_id.to_owned(),
        rollout: e.rollout,
        kind,
        model: e.model,
        version: e.version,
        variant: e.variant,
        duration_ms: e.duration_ms,
        bytes: e.bytes,
        error: e.error,
        received_at,
    }
}
