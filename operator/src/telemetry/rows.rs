//! Rows as they are inserted (RowBinary, column order = field order), and their
//! construction from validated wire messages.
//!
//! Event rows are written straight from the (zero-copy) wire views into RowBinary bytes on
//! the connection that received them ([`BatchOrigin::write_inference_row`], [`BatchOrigin::write_model_row`]): the
//! queue then holds compact bytes, bounded exactly, and the single writer only concatenates.
//! The typed rows ([`InferenceRow`], [`ModelRow`]) describe the same columns and read them
//! back.

use clickhouse::Row;
use edgewise_proto::fleet::{ModelEventKind, ShadowAgreement};
use edgewise_proto::view::{InferenceEventView, ModelEventView};
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
    /// Added by migration 3, so they come last.
    pub router_version: String,
    pub first_token_ms: f64,
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

/// Appends RowBinary values: the format the `clickhouse` crate writes for its `Row`s (its
/// serializer is private). Strings are length-prefixed with the same LEB128 varint as
/// protobuf; numbers are little endian.
struct RowBinary<'a>(&'a mut Vec<u8>);

/// One appender per fixed-width number type, little endian.
macro_rules! little_endian {
    ($($t:ident),*) => {$(
        fn $t(&mut self, v: $t) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
    )*};
}

impl RowBinary<'_> {
    fn str(&mut self, s: &[u8]) -> &mut Self {
        prost::encoding::encode_varint(s.len() as u64, self.0);
        self.0.extend_from_slice(s);
        self
    }
    little_endian!(u8, i8, u32, u64, f64);
}

fn shadow_enum(shadow: i32) -> i8 {
    match ShadowAgreement::try_from(shadow).unwrap_or(ShadowAgreement::None) {
        ShadowAgreement::None => 0,
        ShadowAgreement::Agree => 1,
        ShadowAgreement::Disagree => 2,
    }
}

/// What every row of one batch shares: who sent it and when it arrived.
#[derive(Clone, Copy, Debug)]
pub struct BatchOrigin<'a> {
    /// The authenticated device.
    pub device_id: &'a [u8],
    /// The batch's id.
    pub batch_id: &'a [u8],
    /// Arrival, unix seconds.
    pub received_at: u32,
}

impl BatchOrigin<'_> {
    /// The leading columns of an event row (`time, time_ms, device_id, event_id, batch_id,
    /// rollout`).
    fn event_columns<'o>(
        &self,
        out: &'o mut Vec<u8>,
        time_unix_ms: i64,
        event_id: &[u8],
        rollout: &[u8],
    ) -> RowBinary<'o> {
        let mut row = RowBinary(out);
        row.u32(seconds(time_unix_ms))
            .u64(u64::try_from(time_unix_ms).unwrap_or(0))
            .str(self.device_id)
            .str(event_id)
            .str(self.batch_id)
            .str(rollout);
        row
    }

    /// Appends the `inference_events` row of a validated event, columns as [`InferenceRow`].
    pub fn write_inference_row(&self, out: &mut Vec<u8>, e: &InferenceEventView) {
        self.event_columns(out, e.time_unix_ms, &e.event_id, &e.rollout)
            .str(&e.model)
            .str(&e.version)
            .str(&e.variant)
            .str(&e.target)
            .u8(u8::from(e.on_device))
            .str(&e.rule)
            .str(&e.policy_version)
            .f64(e.latency_ms)
            .u8(u8::from(e.ok))
            .u8(u8::from(e.fallback_used))
            .str(&e.error)
            .u32(e.input_tokens)
            .u32(e.output_tokens)
            .f64(e.cost_usd)
            .i8(shadow_enum(e.shadow))
            .str(&e.task)
            .str(&e.data_class)
            .u32(self.received_at)
            .str(&e.router_version)
            .f64(e.first_token_ms);
    }

    /// Appends the `model_events` row of a validated event, columns as [`ModelRow`].
    pub fn write_model_row(&self, out: &mut Vec<u8>, e: &ModelEventView) {
        self.event_columns(out, e.time_unix_ms, &e.event_id, &e.rollout)
            .i8(model_kind_enum(e.kind))
            .str(&e.model)
            .str(&e.version)
            .str(&e.variant)
            .u64(e.duration_ms)
            .u64(e.bytes)
            .str(&e.error)
            .u32(self.received_at);
    }
}

fn model_kind_enum(kind: i32) -> i8 {
    ModelEventKind::try_from(kind).map_or(0, |k| k as i8)
}

fn seconds(ms: i64) -> u32 {
    u32::try_from(ms.max(0) / 1000).unwrap_or(u32::MAX)
}
