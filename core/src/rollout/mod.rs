//! Progressive delivery of a model version to a device segment.
//!
//! [`spec`] holds the strategy users write, [`analysis`] judges a canary by its gates, and
//! [`machine`] moves a rollout through its steps as a pure function.

pub mod analysis;
pub mod machine;
pub mod spec;

pub use analysis::{AnalysisResult, GateMetrics, GateResult, MetricSet, Verdict};
pub use machine::{
    Command, Event, Observations, Phase, RolloutState, Transition, advance, analysis_due, validate,
};
pub use spec::{AnalysisSpec, Gate, Metric, OnFailure, RateLimit, RolloutStrategy, Step};

#[cfg(test)]
mod tests;
