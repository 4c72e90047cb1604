//! What a model's requests did since a time, per target and overall: the traffic summary
//! the dev demo prints (and an operator can run), SQL over `inference_events`.

use clickhouse::{Client, Row};
use serde::Deserialize;

/// Per target: requests, errors, latency and spend of one model's requests since a time.
pub const TARGETS_SQL: &str = "SELECT
    target,
    max(on_device) AS on_device,
    count() AS requests,
    countIf(ok = 0) AS errors,
    anyIf(error, ok = 0) AS an_error,
    quantileExact(0.5)(latency_ms) AS p50,
    quantileExact(0.95)(latency_ms) AS p95,
    sum(cost_usd) AS cost_usd
FROM edgewise.inference_events FINAL
WHERE model = ? AND time >= toDateTime(?)
GROUP BY target
ORDER BY requests DESC, target";

/// Overall: requests, tokens, private requests and where they ran, shadow verdicts.
pub const TOTALS_SQL: &str = "SELECT
    count() AS requests,
    sum(input_tokens + output_tokens) AS tokens,
    countIf(data_class = 'private') AS private,
    countIf(data_class = 'private' AND on_device = 1) AS private_on_device,
    countIf(shadow != 'none') AS shadows,
    countIf(shadow = 'agree') AS agreements
FROM edgewise.inference_events FINAL
WHERE model = ? AND time >= toDateTime(?)";

/// One target's share.
#[derive(Clone, Debug, PartialEq, Row, Deserialize)]
pub struct TargetRow {
    /// Target name.
    pub target: String,
    /// 1 when it runs on the device.
    pub on_device: u8,
    /// Requests it answered or failed.
    pub requests: u64,
    /// Of those, failed.
    pub errors: u64,
    /// One of the failures' errors ('' when none failed).
    pub an_error: String,
    /// Median latency, ms.
    pub p50: f64,
    /// 95th percentile latency, ms.
    pub p95: f64,
    /// Spend, US dollars.
    pub cost_usd: f64,
}

/// The whole traffic.
#[derive(Clone, Debug, Default, PartialEq, Row, Deserialize)]
pub struct Totals {
    /// Requests.
    pub requests: u64,
    /// Tokens in and out.
    pub tokens: u64,
    /// Requests of data class `private`.
    pub private: u64,
    /// Of those, answered on the device.
    pub private_on_device: u64,
    /// Requests shadowed to the cloud with a verdict.
    pub shadows: u64,
    /// Of those, agreeing.
    pub agreements: u64,
}

/// The summary of `model`'s requests since `since` (Unix seconds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficSummary {
    /// Per target, busiest first.
    pub targets: Vec<TargetRow>,
    /// Overall.
    pub totals: Totals,
}

impl TrafficSummary {
    /// Requests the device answered, 0–1.
    #[must_use]
    pub fn device_share(&self) -> f64 {
        let on_device: u64 = self
            .targets
            .iter()
            .filter(|t| t.on_device == 1)
            .map(|t| t.requests)
            .sum();
        ratio(on_device, self.totals.requests)
    }

    /// Spend on cloud targets, US dollars.
    #[must_use]
    pub fn cloud_spend_usd(&self) -> f64 {
        self.targets.iter().map(|t| t.cost_usd).sum()
    }

    /// What every request would have cost in the cloud at `price_per_1k_usd`.
    #[must_use]
    pub fn all_cloud_usd(&self, price_per_1k_usd: f64) -> f64 {
        self.totals.tokens as f64 * price_per_1k_usd / 1000.0
    }
}

fn ratio(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

/// Reads the summary of `model` since `since` (Unix seconds).
///
/// # Errors
/// When ClickHouse does not answer.
pub async fn fetch(
    client: &Client,
    model: &str,
    since: i64,
) -> Result<TrafficSummary, clickhouse::error::Error> {
    let since = u32::try_from(since.max(0)).unwrap_or(u32::MAX);
    let targets = client
        .query(TARGETS_SQL)
        .bind(model)
        .bind(since)
        .fetch_all::<TargetRow>()
        .await?;
    let totals = client
        .query(TOTALS_SQL)
        .bind(model)
        .bind(since)
        .fetch_one::<Totals>()
        .await?;
    Ok(TrafficSummary { targets, totals })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, on_device: u8, requests: u64, cost_usd: f64) -> TargetRow {
        TargetRow {
            target: name.into(),
            on_device,
            requests,
            errors: 0,
            an_error: String::new(),
            p50: 1.0,
            p95: 2.0,
            cost_usd,
        }
    }

    #[test]
    fn shares_and_spend_come_from_the_rows() {
        let s = TrafficSummary {
            targets: vec![target("on-device", 1, 75, 0.0), target("cloud", 0, 25, 0.5)],
            totals: Totals {
                requests: 100,
                tokens: 1_000_000,
                ..Totals::default()
            },
        };
        assert!((s.device_share() - 0.75).abs() < 1e-9);
        assert!((s.cloud_spend_usd() - 0.5).abs() < 1e-9);
        assert!((s.all_cloud_usd(0.002) - 2.0).abs() < 1e-9);
        assert_eq!(TrafficSummary::default().device_share(), 0.0);
    }
}
