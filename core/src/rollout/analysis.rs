//! Judging a canary by its gates.

use std::collections::BTreeMap;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::{AnalysisSpec, Gate, Metric};

/// Metric values for one version over the analysis window. A metric is absent when the
/// window holds no data for it (no shadow requests, say).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricSet {
    /// Metric values.
    pub values: BTreeMap<Metric, f64>,
    /// Inference samples in the window.
    pub samples: u64,
    /// Distinct devices that reported in the window.
    pub devices: u64,
}

/// Canary and baseline metrics, as the telemetry side computed them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GateMetrics {
    /// The canary (new) version.
    pub canary: MetricSet,
    /// The stable (baseline) version.
    pub baseline: MetricSet,
}

/// Outcome of one gate or one analysis run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Verdict {
    /// Within bounds.
    Pass,
    /// Out of bounds.
    Fail,
    /// Not enough data to judge.
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "Pass",
            Verdict::Fail => "Fail",
            Verdict::Inconclusive => "Inconclusive",
        })
    }
}

/// One gate's evaluation, kept in the rollout status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateResult {
    /// The metric.
    pub metric: Metric,
    /// Canary value (absent: no data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Baseline value, for relative gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// What was compared with the bounds: the value, or canary/baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared: Option<f64>,
    /// Human-readable bounds, e.g. `<= 1.2x baseline`.
    pub threshold: String,
    /// Outcome.
    pub verdict: Verdict,
}

/// One analysis run, kept as `status.lastAnalysis`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    /// When it ran.
    #[schemars(with = "String")]
    pub at: Timestamp,
    /// Overall outcome: any failing gate fails the run.
    pub verdict: Verdict,
    /// Canary devices reporting in the window.
    pub canary_devices: u64,
    /// Canary samples in the window.
    pub canary_samples: u64,
    /// Each gate.
    pub gates: Vec<GateResult>,
    /// Why the run was inconclusive, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Evaluates every gate. Thin data (`minDevices`, `minSamples`) makes the run inconclusive
/// even when a gate is out of bounds, naming the breach: a p95 over a dozen samples is their
/// maximum, and one error in ten requests is a 10 % error rate, so judging early would roll
/// back good versions on noise. With enough data any failing gate fails the run; a metric with
/// no data makes it inconclusive.
#[must_use]
pub fn evaluate(spec: &AnalysisSpec, metrics: &GateMetrics, at: Timestamp) -> AnalysisResult {
    let gates: Vec<GateResult> = spec
        .gates
        .iter()
        .map(|g| evaluate_gate(g, metrics))
        .collect();
    let canary = &metrics.canary;
    let thin = if canary.devices < u64::from(spec.min_devices) {
        Some(format!(
            "{} canary devices reported, {} needed",
            canary.devices, spec.min_devices
        ))
    } else if canary.samples < spec.min_samples {
        Some(format!(
            "{} canary samples, {} needed",
            canary.samples, spec.min_samples
        ))
    } else {
        None
    };
    let breaching: Vec<&str> = gates
        .iter()
        .filter(|g| g.verdict == Verdict::Fail)
        .map(|g| g.metric.as_str())
        .collect();
    let (verdict, reason) = match (thin, breaching.is_empty()) {
        (Some(thin), true) => (Verdict::Inconclusive, Some(thin)),
        (Some(thin), false) => (
            Verdict::Inconclusive,
            Some(format!(
                "{thin} ({} out of bounds so far)",
                breaching.join(", ")
            )),
        ),
        (None, false) => (Verdict::Fail, None),
        (None, true) => match gates.iter().find(|g| g.verdict == Verdict::Inconclusive) {
            Some(g) => (
                Verdict::Inconclusive,
                Some(format!("no data for {}", g.metric.as_str())),
            ),
            None => (Verdict::Pass, None),
        },
    };
    AnalysisResult {
        at,
        verdict,
        canary_devices: canary.devices,
        canary_samples: canary.samples,
        gates,
        reason,
    }
}

fn evaluate_gate(gate: &Gate, metrics: &GateMetrics) -> GateResult {
    let value = metrics.canary.values.get(&gate.metric).copied();
    let baseline = metrics.baseline.values.get(&gate.metric).copied();
    let compared = if gate.relative_to_baseline {
        match (value, baseline) {
            // A zero baseline makes any non-zero canary value infinitely worse (or better).
            (Some(v), Some(0.0)) => Some(if v == 0.0 { 1.0 } else { f64::INFINITY }),
            (Some(v), Some(b)) => Some(v / b),
            _ => None,
        }
    } else {
        value
    };
    let verdict = match compared {
        None => Verdict::Inconclusive,
        Some(c) if gate.max.is_some_and(|max| c > max) || gate.min.is_some_and(|min| c < min) => {
            Verdict::Fail
        }
        Some(c) if c.is_nan() => Verdict::Inconclusive,
        Some(_) => Verdict::Pass,
    };
    GateResult {
        metric: gate.metric,
        value,
        baseline: if gate.relative_to_baseline {
            baseline
        } else {
            None
        },
        compared,
        threshold: threshold_text(gate),
        verdict,
    }
}

fn threshold_text(gate: &Gate) -> String {
    let unit = if gate.relative_to_baseline {
        "x baseline"
    } else {
        ""
    };
    match (gate.min, gate.max) {
        (Some(min), Some(max)) => format!("{min}{unit} ..= {max}{unit}"),
        (Some(min), None) => format!(">= {min}{unit}"),
        (None, Some(max)) => format!("<= {max}{unit}"),
        (None, None) => "unbounded".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gates: Vec<Gate>) -> AnalysisSpec {
        AnalysisSpec {
            interval: "1m".into(),
            window: "10m".into(),
            min_devices: 5,
            min_samples: 100,
            failure_limit: 0,
            gates,
        }
    }

    fn set(pairs: &[(Metric, f64)], samples: u64, devices: u64) -> MetricSet {
        MetricSet {
            values: pairs.iter().copied().collect(),
            samples,
            devices,
        }
    }

    fn gate(metric: Metric, max: Option<f64>, min: Option<f64>, relative: bool) -> Gate {
        Gate {
            metric,
            max,
            min,
            relative_to_baseline: relative,
        }
    }

    #[test]
    fn absolute_and_relative_gates_pass_within_bounds() {
        let s = spec(vec![
            gate(Metric::ErrorRate, Some(0.02), None, false),
            gate(Metric::LatencyP95Ms, Some(1.2), None, true),
            gate(Metric::CloudAgreementRate, None, Some(0.9), false),
        ]);
        let m = GateMetrics {
            canary: set(
                &[
                    (Metric::ErrorRate, 0.01),
                    (Metric::LatencyP95Ms, 110.0),
                    (Metric::CloudAgreementRate, 0.95),
                ],
                500,
                20,
            ),
            baseline: set(&[(Metric::LatencyP95Ms, 100.0)], 5000, 200),
        };
        let r = evaluate(&s, &m, Timestamp::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
        let latency = &r.gates[1];
        assert_eq!(latency.compared, Some(1.1));
        assert_eq!(latency.threshold, "<= 1.2x baseline");
    }

    #[test]
    fn thin_data_never_fails_a_run_but_names_the_breach() {
        let s = spec(vec![gate(Metric::LatencyP99Ms, Some(300.0), None, false)]);
        let thin = GateMetrics {
            canary: set(&[(Metric::LatencyP99Ms, 450.0)], 3, 1),
            baseline: MetricSet::default(),
        };
        let r = evaluate(&s, &thin, Timestamp::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        assert_eq!(r.gates[0].verdict, Verdict::Fail);
        assert_eq!(
            r.reason.as_deref(),
            Some("1 canary devices reported, 5 needed (latency_p99_ms out of bounds so far)")
        );
        let enough = GateMetrics {
            canary: set(&[(Metric::LatencyP99Ms, 450.0)], 300, 10),
            baseline: MetricSet::default(),
        };
        assert_eq!(
            evaluate(&s, &enough, Timestamp::UNIX_EPOCH).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn thin_data_or_missing_metrics_are_inconclusive() {
        let s = spec(vec![gate(Metric::ErrorRate, Some(0.05), None, false)]);
        let thin = GateMetrics {
            canary: set(&[(Metric::ErrorRate, 0.0)], 50, 10),
            baseline: MetricSet::default(),
        };
        let r = evaluate(&s, &thin, Timestamp::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        assert_eq!(r.reason.as_deref(), Some("50 canary samples, 100 needed"));
        let missing = GateMetrics {
            canary: set(&[], 500, 10),
            baseline: MetricSet::default(),
        };
        let r = evaluate(&s, &missing, Timestamp::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        assert_eq!(r.reason.as_deref(), Some("no data for error_rate"));
    }

    #[test]
    fn zero_baseline_makes_any_canary_error_infinitely_worse() {
        let s = spec(vec![gate(Metric::ErrorRate, Some(2.0), None, true)]);
        let m = GateMetrics {
            canary: set(&[(Metric::ErrorRate, 0.001)], 500, 10),
            baseline: set(&[(Metric::ErrorRate, 0.0)], 500, 10),
        };
        assert_eq!(
            evaluate(&s, &m, Timestamp::UNIX_EPOCH).verdict,
            Verdict::Fail
        );
        let both_zero = GateMetrics {
            canary: set(&[(Metric::ErrorRate, 0.0)], 500, 10),
            baseline: set(&[(Metric::ErrorRate, 0.0)], 500, 10),
        };
        assert_eq!(
            evaluate(&s, &both_zero, Timestamp::UNIX_EPOCH).verdict,
            Verdict::Pass
        );
    }
}
