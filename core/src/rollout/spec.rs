//! The rollout strategy as users write it: steps, analysis gates, rate limit, failure policy.
//!
//! Shared with the ModelRollout CRD (flattened into its spec), so the schema attributes here
//! become the CRD's validation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a new model version reaches the segment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Desired model version (semver). Changing it starts a rollout from `status.stableVersion`.
    #[schemars(regex(
        pattern = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
    ))]
    pub version: String,
    /// Ordered steps; when all are done the version becomes stable.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<Step>,
    /// Gates evaluated by `analysis` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
    /// Caps how fast new devices join the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// What happens when analysis fails more than `failureLimit` times.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Holds the rollout where it is.
    #[serde(default)]
    pub paused: bool,
    /// Roll out only a version whose every variant carries a publisher signature the
    /// controller verified with a key of the namespace's `edgewise-publishers` ConfigMap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_signed: bool,
}

/// One step: exactly one of `setPercent`, `pause`, `analysis`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.setPercent), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
     "message": "a step is exactly one of setPercent, pause or analysis"}
]))]
pub struct Step {
    /// Share of the segment (0–100) that gets the new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub set_percent: Option<u32>,
    /// Wait; with no duration, until promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
    /// Wait until the gates pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStep>,
}

/// A pause step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long (`30s`, `10m`, `2h`); absent waits for manual promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub duration: Option<String>,
}

/// An analysis step; the gates come from `spec.analysis`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AnalysisStep {}

/// Gate evaluation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// How often gates are evaluated.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,
    /// Event-time window the metrics cover.
    #[serde(default = "default_window")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub window: String,
    /// Fewer canary devices reporting than this makes a run inconclusive.
    #[serde(default = "default_min_devices")]
    pub min_devices: u32,
    /// Fewer canary samples than this makes a run inconclusive.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Failed runs tolerated; one more triggers `onFailure`.
    #[serde(default)]
    pub failure_limit: u32,
    /// Conditions on canary metrics.
    #[schemars(length(min = 1, max = 32))]
    pub gates: Vec<Gate>,
}

fn default_interval() -> String {
    "1m".into()
}
fn default_window() -> String {
    "10m".into()
}
fn default_min_devices() -> u32 {
    10
}
fn default_min_samples() -> u64 {
    100
}

/// A bound on one canary metric, absolute or relative to the stable baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.max) || has(self.min)", "message": "a gate needs max or min"},
    {"rule": "self.relativeToBaseline || !(self.metric.endsWith('_rate')) || ((!has(self.max) || (self.max >= 0.0 && self.max <= 1.0)) && (!has(self.min) || (self.min >= 0.0 && self.min <= 1.0)))",
     "message": "absolute bounds on a rate are between 0 and 1"}
]))]
pub struct Gate {
    /// Metric computed from telemetry.
    pub metric: Metric,
    /// The metric (or canary/baseline ratio) must not exceed this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The metric (or canary/baseline ratio) must not fall below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Compare `canary / baseline` instead of the canary value.
    #[serde(default)]
    pub relative_to_baseline: bool,
}

/// Metrics computed from telemetry for a version over the analysis window.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Median on-device latency, ms.
    LatencyP50Ms,
    /// 95th percentile latency, ms.
    LatencyP95Ms,
    /// 99th percentile latency, ms.
    LatencyP99Ms,
    /// Failed requests / requests.
    ErrorRate,
    /// Requests that used a fallback / requests.
    FallbackRate,
    /// Failed installs / install attempts.
    InstallFailureRate,
    /// Shadow requests whose answers agreed / shadow requests.
    CloudAgreementRate,
}

impl Metric {
    /// Every metric, in a fixed order.
    pub const ALL: [Metric; 7] = [
        Metric::LatencyP50Ms,
        Metric::LatencyP95Ms,
        Metric::LatencyP99Ms,
        Metric::ErrorRate,
        Metric::FallbackRate,
        Metric::InstallFailureRate,
        Metric::CloudAgreementRate,
    ];

    /// The name used in specs and SQL.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::LatencyP50Ms => "latency_p50_ms",
            Metric::LatencyP95Ms => "latency_p95_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
            Metric::ErrorRate => "error_rate",
            Metric::FallbackRate => "fallback_rate",
            Metric::InstallFailureRate => "install_failure_rate",
            Metric::CloudAgreementRate => "cloud_agreement_rate",
        }
    }
}

/// Rate limit on canary growth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// At most this many devices join the canary per minute.
    #[schemars(range(min = 1))]
    pub max_new_devices_per_minute: u32,
}

/// Reaction to failed analysis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnFailure {
    /// Send every device back to the stable version.
    #[default]
    Rollback,
    /// Hold devices where they are until retried, promoted or aborted.
    Pause,
}
