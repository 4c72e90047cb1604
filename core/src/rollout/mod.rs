//! Progressive delivery of a model version to a device segment.
//!
//! [`spec`] holds the strategy users write, [`analysis`] judges a canary by its gates, and
//! [`machine`] moves a rollout through its steps as a pure function, taking manual requests
//! from [`command`].

pub mod analysis;
pub mod command;
pub mod fleet;
pub mod machine;
pub mod spec;

pub use analysis::{AnalysisResult, GateMetrics, GateResult, MetricSet, Verdict};
pub use command::{Command, Request};
pub use machine::{
    Availability, Blocker, CommandOutcome, Event, Observations, Phase, RolloutState, Transition,
    advance, analysis_due, steps_hash, validate,
};
pub use spec::{AnalysisSpec, Gate, Metric, OnFailure, RateLimit, RolloutStrategy, Step};

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
