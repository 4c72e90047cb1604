//! The rollout step machine: `(strategy, state, observations, now) → (state, events, requeue)`.
//!
//! Pure and deterministic so that the controller, tests and the kubectl plugin agree on what
//! a rollout does next. The controller feeds it telemetry and manual commands and applies
//! the resulting state; gateways read `stableVersion`, `canaryVersion` and `percent` from it.

use std::time::Duration;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::analysis::{AnalysisResult, GateMetrics, Verdict, evaluate};
use super::spec::{OnFailure, RolloutStrategy};
use crate::cohort::bucket_in_cohort;
use crate::version::parse_version;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Moving through steps.
    Progressing,
    /// Held: a pause step, `spec.paused`, or failed analysis with `onFailure: Pause`.
    Paused,
    /// Waiting for an analysis step's gates.
    Analyzing,
    /// `spec.version` is the stable version on every targeted device.
    Succeeded,
    /// Analysis failed; every device was sent back to the stable version.
    RolledBack,
    /// Aborted by hand; every device was sent back to the stable version.
    Aborted,
    /// The strategy is invalid; nothing changes until it is fixed.
    Failed,
}

impl Phase {
    /// Whether the rollout is still moving or holding mid-way.
    #[must_use]
    pub fn in_flight(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused | Phase::Analyzing)
    }
}

/// The rollout's state, persisted as the ModelRollout status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// Phase; absent before the first reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Version every device outside the canary cohort runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,
    /// Version being rolled out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_version: Option<String>,
    /// Index of the current step; equals the step count when done.
    #[serde(default)]
    pub step_index: u32,
    /// Share (0–100) of the segment assigned `spec.version`.
    #[serde(default)]
    pub percent: u32,
    /// When the current step began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub step_started_at: Option<Timestamp>,
    /// Rate-limit clock: credit for new canary devices accrues from here (at most one
    /// minute's worth is banked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub ramp_clock: Option<Timestamp>,
    /// Failed analysis runs at the current step.
    #[serde(default)]
    pub analysis_failures: u32,
    /// The most recent analysis run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    /// Why the rollout is where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RolloutState {
    /// The version a device in `bucket` must run, if the rollout has one yet.
    #[must_use]
    pub fn version_for(&self, bucket: u16) -> Option<&str> {
        match &self.canary_version {
            Some(canary) if bucket_in_cohort(bucket, self.percent) => Some(canary),
            _ => self.stable_version.as_deref(),
        }
    }
}

/// A manual command, from the kubectl plugin's annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Skip the current step (a pause, an analysis, a rate-limited ramp).
    Promote,
    /// Send every device back to stable and stop.
    Abort,
    /// Restart after abort or rollback, or re-run failed analysis when paused on failure.
    Retry,
}

/// What the controller observed for this reconcile.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    /// Devices the rollout's selector targets (for the rate limit).
    pub targeted_devices: u64,
    /// Gate metrics over the analysis window, when the controller queried them.
    pub metrics: Option<GateMetrics>,
    /// A pending manual command.
    pub command: Option<Command>,
}

/// A Kubernetes Event the controller should record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Warning (true) or Normal.
    pub warning: bool,
}

/// The machine's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The new state.
    pub state: RolloutState,
    /// Events for every user-visible change.
    pub events: Vec<Event>,
    /// When to look again without any change (a timed pause, the next analysis, the ramp).
    pub requeue_after: Option<Duration>,
}

/// Problems that make a strategy unusable, each naming the field.
///
/// # Errors
/// Every problem found, as `field: message`.
pub fn validate(strategy: &RolloutStrategy) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Err(e) = parse_version(&strategy.version) {
        problems.push(format!("spec.version: {e}"));
    }
    if strategy.steps.is_empty() {
        problems.push("spec.steps: at least one step is required".into());
    }
    let mut last_percent = 0;
    for (i, step) in strategy.steps.iter().enumerate() {
        let kinds = [
            step.set_percent.is_some(),
            step.pause.is_some(),
            step.analysis.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            problems.push(format!(
                "spec.steps[{i}]: a step is exactly one of setPercent, pause or analysis"
            ));
        }
        if let Some(p) = step.set_percent {
            if p > 100 {
                problems.push(format!("spec.steps[{i}].setPercent: {p} is above 100"));
            } else if p < last_percent {
                problems.push(format!(
                    "spec.steps[{i}].setPercent: {p} is below the previous step's {last_percent}; percentages never decrease"
                ));
            }
            last_percent = last_percent.max(p);
        }
        if let Some(d) = step.pause.as_ref().and_then(|p| p.duration.as_deref())
            && let Err(e) = humantime::parse_duration(d)
        {
            problems.push(format!("spec.steps[{i}].pause.duration: {d:?}: {e}"));
        }
        if step.analysis.is_some() && strategy.analysis.is_none() {
            problems.push(format!(
                "spec.steps[{i}].analysis: needs spec.analysis with gates"
            ));
        }
    }
    if let Some(a) = &strategy.analysis {
        for (field, value) in [("interval", &a.interval), ("window", &a.window)] {
            if let Err(e) = humantime::parse_duration(value) {
                problems.push(format!("spec.analysis.{field}: {value:?}: {e}"));
            }
        }
        if a.gates.is_empty() {
            problems.push("spec.analysis.gates: at least one gate is required".into());
        }
        for (i, g) in a.gates.iter().enumerate() {
            if g.max.is_none() && g.min.is_none() {
                problems.push(format!("spec.analysis.gates[{i}]: a gate needs max or min"));
            }
        }
    }
    if strategy
        .rate_limit
        .as_ref()
        .is_some_and(|r| r.max_new_devices_per_minute == 0)
    {
        problems.push("spec.rateLimit.maxNewDevicesPerMinute: must be at least 1".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Whether an analysis step is waiting for a run at `now`, so the controller knows to query
/// gate metrics.
#[must_use]
pub fn analysis_due(strategy: &RolloutStrategy, state: &RolloutState, now: Timestamp) -> bool {
    let at_analysis = state.phase.is_some_and(Phase::in_flight)
        && strategy
            .steps
            .get(state.step_index as usize)
            .is_some_and(|s| s.analysis.is_some());
    at_analysis && next_analysis_at(strategy, state).is_none_or(|at| now >= at)
}

const MINUTE_MS: i64 = 60_000;

/// Computes the next state. See the module docs.
#[must_use]
pub fn advance(
    strategy: &RolloutStrategy,
    prev: &RolloutState,
    obs: &Observations,
    now: Timestamp,
) -> Transition {
    let mut m = Machine {
        strategy,
        s: prev.clone(),
        events: Vec::new(),
        requeue_after: None,
        now,
    };
    m.run(obs);
    Transition {
        state: m.s,
        events: m.events,
        requeue_after: m.requeue_after,
    }
}

struct Machine<'a> {
    strategy: &'a RolloutStrategy,
    s: RolloutState,
    events: Vec<Event>,
    requeue_after: Option<Duration>,
    now: Timestamp,
}

impl Machine<'_> {
    fn event(&mut self, reason: &'static str, warning: bool, message: String) {
        self.events.push(Event {
            reason,
            message,
            warning,
        });
    }

    fn requeue_in_ms(&mut self, ms: i64) {
        let d = Duration::from_millis(ms.max(1).unsigned_abs());
        self.requeue_after = Some(self.requeue_after.map_or(d, |cur| cur.min(d)));
    }

    fn run(&mut self, obs: &Observations) {
        if let Err(problems) = validate(self.strategy) {
            let message = problems.join("; ");
            if self.s.phase != Some(Phase::Failed) || self.s.message.as_deref() != Some(&message) {
                self.event("InvalidSpec", true, message.clone());
            }
            self.s.phase = Some(Phase::Failed);
            self.s.message = Some(message);
            return;
        }
        if !self.follow_spec_version() {
            return;
        }
        if let Some(cmd) = obs.command {
            self.command(cmd);
        }
        if !self.phase().in_flight() {
            return;
        }
        if self.strategy.paused {
            if self.phase() != Phase::Paused || self.s.message.as_deref() != Some(PAUSED_BY_SPEC) {
                self.event("Paused", false, PAUSED_BY_SPEC.into());
            }
            self.s.phase = Some(Phase::Paused);
            self.s.message = Some(PAUSED_BY_SPEC.into());
            return;
        }
        if self.paused_on_failure() {
            return;
        }
        self.drive(obs);
    }

    fn phase(&self) -> Phase {
        self.s.phase.unwrap_or(Phase::Progressing)
    }

    /// Reacts to `spec.version`; returns false when there is nothing more to do.
    fn follow_spec_version(&mut self) -> bool {
        let version = self.strategy.version.clone();
        let Some(stable) = self.s.stable_version.clone() else {
            // First version of this segment: nothing to compare a canary with, so it is
            // the stable version at once (as Argo Rollouts does for a first deploy).
            self.s = RolloutState {
                phase: Some(Phase::Succeeded),
                stable_version: Some(version.clone()),
                step_index: self.strategy.steps.len() as u32,
                percent: 100,
                message: Some(format!("initial version {version}")),
                ..RolloutState::default()
            };
            self.event(
                "InitialVersion",
                false,
                format!("{version} is the first version; it is stable"),
            );
            return false;
        };
        if version == stable {
            if let Some(canary) = self.s.canary_version.take() {
                if self.phase().in_flight() {
                    self.s.phase = Some(Phase::RolledBack);
                    self.event(
                        "RolledBack",
                        true,
                        format!(
                            "spec.version returned to stable {stable}; canary {canary} withdrawn"
                        ),
                    );
                }
                self.s.percent = 100;
                self.s.message = Some(format!("spec.version is the stable version {stable}"));
            }
            return true;
        }
        if self.s.canary_version.as_deref() != Some(&version) {
            if let Some(old) = &self.s.canary_version
                && self.phase().in_flight()
            {
                let message = format!("canary {old} superseded by {version}");
                self.event("Superseded", false, message);
            }
            self.start(version, &stable);
        }
        true
    }

    fn start(&mut self, version: String, stable: &str) {
        self.event(
            "RolloutStarted",
            false,
            format!("rolling out {version} over stable {stable}"),
        );
        self.s.canary_version = Some(version);
        self.restart();
    }

    fn restart(&mut self) {
        self.s.phase = Some(Phase::Progressing);
        self.s.step_index = 0;
        self.s.percent = 0;
        self.s.step_started_at = Some(self.now);
        self.s.ramp_clock = Some(self.now - jiff::SignedDuration::from_millis(MINUTE_MS));
        self.s.analysis_failures = 0;
        self.s.last_analysis = None;
        self.s.message = None;
    }

    fn command(&mut self, cmd: Command) {
        let phase = self.phase();
        match cmd {
            Command::Abort if phase.in_flight() => {
                self.s.phase = Some(Phase::Aborted);
                self.s.percent = 0;
                self.s.message =
                    Some("aborted by hand; every device returns to the stable version".into());
                self.event(
                    "Aborted",
                    true,
                    format!("rollout of {} aborted", self.strategy.version),
                );
            }
            Command::Retry
                if matches!(phase, Phase::Aborted | Phase::RolledBack)
                    && self.s.canary_version.is_some() =>
            {
                self.restart();
                self.event(
                    "Retried",
                    false,
                    format!("restarting the rollout of {}", self.strategy.version),
                );
            }
            Command::Retry if self.paused_on_failure() => {
                self.s.analysis_failures = 0;
                self.s.last_analysis = None;
                self.s.phase = Some(Phase::Analyzing);
                self.s.message = None;
                self.event("Retried", false, "re-running analysis".into());
            }
            Command::Promote if phase.in_flight() => {
                let from = self.s.step_index;
                self.next_step();
                self.event("Promoted", false, format!("step {from} skipped by hand"));
            }
            _ => self.event(
                "CommandIgnored",
                true,
                format!("{cmd:?} does not apply to a rollout in phase {phase:?}"),
            ),
        }
    }

    fn paused_on_failure(&self) -> bool {
        let limit = self
            .strategy
            .analysis
            .as_ref()
            .map_or(0, |a| a.failure_limit);
        self.phase() == Phase::Paused && self.s.analysis_failures > limit
    }

    fn next_step(&mut self) {
        self.s.step_index += 1;
        self.s.step_started_at = Some(self.now);
        self.s.analysis_failures = 0;
        self.s.phase = Some(Phase::Progressing);
        self.s.message = None;
    }

    fn drive(&mut self, obs: &Observations) {
        // Each pass either completes a step or stops; the bound makes that explicit.
        for _ in 0..=self.strategy.steps.len() {
            let Some(step) = self.strategy.steps.get(self.s.step_index as usize) else {
                self.complete();
                return;
            };
            let done = if let Some(target) = step.set_percent {
                self.set_percent(target, obs.targeted_devices)
            } else if let Some(pause) = &step.pause {
                self.pause(pause.duration.as_deref())
            } else {
                self.analyze(obs)
            };
            if !done {
                return;
            }
            self.next_step();
        }
    }

    fn complete(&mut self) {
        let version = self.strategy.version.clone();
        self.s.phase = Some(Phase::Succeeded);
        self.s.stable_version = Some(version.clone());
        self.s.canary_version = None;
        self.s.percent = 100;
        self.s.message = None;
        self.event(
            "RolloutSucceeded",
            false,
            format!("{version} is stable on the whole segment"),
        );
    }

    fn set_percent(&mut self, target: u32, targeted: u64) -> bool {
        self.s.phase = Some(Phase::Progressing);
        let before = self.s.percent;
        if self.s.percent > target {
            self.s.percent = target;
        }
        if self.s.percent < target {
            self.ramp(target, targeted);
        }
        if self.s.percent < target {
            self.s.message = Some(format!(
                "ramping to {target}% under the rate limit (at {}%)",
                self.s.percent
            ));
            return false;
        }
        if before != target {
            self.event(
                "CanaryPercent",
                false,
                format!("{target}% of the segment on {}", self.strategy.version),
            );
        }
        true
    }

    /// Raises `percent` towards `target` under the rate limit: a token bucket in which one
    /// percentage point costs `targeted / 100` devices and at most a minute is banked.
    fn ramp(&mut self, target: u32, targeted: u64) {
        let Some(limit) = self
            .strategy
            .rate_limit
            .as_ref()
            .map(|r| r.max_new_devices_per_minute)
        else {
            self.s.percent = target;
            return;
        };
        let ms_per_point = (targeted as i64 * MINUTE_MS) / (i64::from(limit) * 100);
        if ms_per_point == 0 {
            self.s.percent = target;
            return;
        }
        let now_ms = self.now.as_millisecond();
        let clock = self
            .s
            .ramp_clock
            .map_or(now_ms - MINUTE_MS, Timestamp::as_millisecond)
            .max(now_ms - MINUTE_MS);
        let points = ((now_ms - clock) / ms_per_point).max(0);
        let gained = points.min(i64::from(target - self.s.percent));
        self.s.percent += gained as u32;
        let clock = clock + gained * ms_per_point;
        self.s.ramp_clock = Timestamp::from_millisecond(clock).ok();
        if self.s.percent < target {
            self.requeue_in_ms(ms_per_point - (now_ms - clock));
        }
    }

    fn pause(&mut self, duration: Option<&str>) -> bool {
        self.s.phase = Some(Phase::Paused);
        let Some(duration) = duration else {
            self.s.message = Some("waiting for promotion (kubectl edgewise promote)".into());
            return false;
        };
        // validate() parsed it already.
        let ms = humantime::parse_duration(duration).map_or(0, |d| d.as_millis() as i64);
        let started = self.s.step_started_at.unwrap_or(self.now).as_millisecond();
        let remaining = started + ms - self.now.as_millisecond();
        if remaining <= 0 {
            return true;
        }
        self.s.message = Some(format!("pausing for {duration}"));
        self.requeue_in_ms(remaining);
        false
    }

    fn analyze(&mut self, obs: &Observations) -> bool {
        self.s.phase = Some(Phase::Analyzing);
        let Some(spec) = &self.strategy.analysis else {
            return true; // validate() rejects this; unreachable in practice.
        };
        let interval =
            humantime::parse_duration(&spec.interval).map_or(MINUTE_MS, |d| d.as_millis() as i64);
        if let Some(at) = next_analysis_at(self.strategy, &self.s)
            && self.now < at
        {
            self.requeue_in_ms(at.as_millisecond() - self.now.as_millisecond());
            return false;
        }
        let Some(metrics) = &obs.metrics else {
            self.s.message = Some("waiting for gate metrics".into());
            self.requeue_in_ms(interval);
            return false;
        };
        let result = evaluate(spec, metrics, self.now);
        let verdict = result.verdict;
        let reason = result.reason.clone();
        self.s.last_analysis = Some(result);
        match verdict {
            Verdict::Pass => {
                self.event(
                    "AnalysisPassed",
                    false,
                    format!("gates passed at step {}", self.s.step_index),
                );
                true
            }
            Verdict::Inconclusive => {
                self.s.message = reason.map(|r| format!("analysis inconclusive: {r}"));
                self.requeue_in_ms(interval);
                false
            }
            Verdict::Fail => {
                self.s.analysis_failures += 1;
                let failing = self.failing_gates();
                self.event(
                    "AnalysisFailed",
                    true,
                    format!("run {} failed: {failing}", self.s.analysis_failures),
                );
                if self.s.analysis_failures > spec.failure_limit {
                    self.fail(&failing);
                } else {
                    self.requeue_in_ms(interval);
                }
                false
            }
        }
    }

    fn failing_gates(&self) -> String {
        self.s
            .last_analysis
            .iter()
            .flat_map(|a| &a.gates)
            .filter(|g| g.verdict == Verdict::Fail)
            .map(|g| {
                format!(
                    "{} = {} (want {})",
                    g.metric.as_str(),
                    g.compared.unwrap_or(f64::NAN),
                    g.threshold
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn fail(&mut self, failing: &str) {
        match self.strategy.on_failure {
            OnFailure::Rollback => {
                self.s.phase = Some(Phase::RolledBack);
                self.s.percent = 0;
                let stable = self.s.stable_version.clone().unwrap_or_default();
                self.s.message = Some(format!("rolled back to {stable}: {failing}"));
                self.event(
                    "RolledBack",
                    true,
                    format!("every device returns to {stable}: {failing}"),
                );
            }
            OnFailure::Pause => {
                self.s.phase = Some(Phase::Paused);
                self.s.message = Some(format!(
                    "analysis failed ({failing}); retry, promote or abort"
                ));
                self.event(
                    "PausedOnFailure",
                    true,
                    format!("holding at {}%: {failing}", self.s.percent),
                );
            }
        }
    }
}

const PAUSED_BY_SPEC: &str = "paused by spec.paused";

/// When the current analysis step may next run: one `interval` after the step began (so the
/// window holds data from the new percentage), then every `interval` after the last run.
fn next_analysis_at(strategy: &RolloutStrategy, state: &RolloutState) -> Option<Timestamp> {
    let interval = strategy
        .analysis
        .as_ref()
        .and_then(|a| humantime::parse_duration(&a.interval).ok())
        .unwrap_or(Duration::from_secs(60));
    let interval = jiff::SignedDuration::try_from(interval).ok()?;
    let started = state.step_started_at;
    let from = match (&state.last_analysis, started) {
        (Some(last), Some(started)) if last.at >= started => last.at,
        (_, started) => started?,
    };
    from.checked_add(interval).ok()
}
