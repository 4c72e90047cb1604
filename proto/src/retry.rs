//! The retry hint the gateway attaches to `UNAVAILABLE` and `RESOURCE_EXHAUSTED`: how long a
//! device should wait before sending the same request again. One definition for the gateway
//! that writes it and the agent that reads it.

use std::time::Duration;

use tonic::Status;

/// gRPC metadata key of the hint, in whole milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// `status` carrying the hint `after`.
#[must_use]
pub fn with_retry_after(mut status: Status, after: Duration) -> Status {
    if let Ok(v) = after.as_millis().to_string().parse() {
        status.metadata_mut().insert(RETRY_AFTER_MS, v);
    }
    status
}

/// The hint in `status`, if it carries a valid one.
#[must_use]
pub fn retry_after(status: &Status) -> Option<Duration> {
    status
        .metadata()
        .get(RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_survives_a_round_trip_and_garbage_reads_as_none() {
        let s = with_retry_after(Status::unavailable("busy"), Duration::from_millis(250));
        assert_eq!(retry_after(&s), Some(Duration::from_millis(250)));
        let mut bad = Status::unavailable("busy");
        bad.metadata_mut()
            .insert(RETRY_AFTER_MS, "soon".parse().expect("ascii"));
        assert_eq!(retry_after(&bad), None);
        assert_eq!(retry_after(&Status::unavailable("busy")), None);
    }
}
