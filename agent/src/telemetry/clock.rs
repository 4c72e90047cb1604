//! Event ids and the wall clock, as telemetry stamps them.

use std::time::{SystemTime, UNIX_EPOCH};

/// A fresh event id: 128 random bits in hex, fixed when the event is made so that every
/// retry of its batch carries the same id.
#[must_use]
pub fn new_event_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
#[must_use]
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Days since the Unix epoch, UTC: the unit of daily budgets.
#[must_use]
pub fn utc_day() -> i64 {
    now_unix_ms() / 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_128_bit_hex_and_distinct_and_the_clock_is_after_2020() {
        let (a, b) = (new_event_id(), new_event_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(now_unix_ms() > 1_577_836_800_000);
        assert_eq!(utc_day(), now_unix_ms() / 86_400_000);
    }
}
