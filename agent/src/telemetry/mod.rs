//! Telemetry from the device: every routing outcome and model event goes into a durable,
//! bounded buffer ([`buffer`]) and is uploaded in acknowledged batches ([`uploader`]).

pub mod buffer;
pub mod clock;
pub mod uploader;

pub use buffer::{Batch, BufferConfig, BufferError, Event, TelemetryBuffer};
pub use clock::{new_event_id, now_unix_ms};

#[cfg(test)]
mod tests;
