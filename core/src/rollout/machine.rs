//! The rollout step machine: `(strategy, state, observations, now) → (state, events, requeue)`.
//!
//! Pure and deterministic so that the controller, tests and the kubectl plugin agree on what
//! a rollout does next. The controller feeds it telemetry and manual commands and applies
//! the resulting state; gateways read `stableVersion`, `canaryVersion` and `percent` from it.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::analysis::{AnalysisResult, GateMetrics, Verdict, evaluate};
use super::command::{Command, Request};
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
    /// The name as it appears in status and in `kubectl get`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Analyzing => "Analyzing",
            Phase::Succeeded => "Succeeded",
            Phase::RolledBack => "RolledBack",
            Phase::Aborted => "Aborted",
            Phase::Failed => "Failed",
        }
    }

    /// Whether the rollout is still moving or holding mid-way.
    #[must_use]
    pub fn in_flight(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused | Phase::Analyzing)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command that acted: the reason and message of the event that records it.
type Applied = (&'static str, String);

/// Why a command was refused, as its `CommandRefused` event and `status.lastCommand` say.
#[derive(Debug)]
struct Refused(String);

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
    /// Version being rolled out, if any. Set only once its ModelVersion is Ready.
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
    /// The most recent analysis run of this rollout run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    /// Why the rollout is where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the run stopped on failure (failed analysis, or its ModelVersion no longer
    /// Ready); set while rolled back or held by `onFailure: Pause`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Fingerprint of the `spec.steps` this run follows: changing the steps of a running
    /// rollout restarts it from its first step, so no new analysis step is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_hash: Option<String>,
    /// Set when the canary was promoted in full by hand (remaining steps and analysis
    /// skipped); cleared when the next run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub promoted_full_at: Option<Timestamp>,
    /// Per command (`promote`, `promote-full`, `abort`, `retry`), the value of the last
    /// request handled, so each request acts once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handled_commands: BTreeMap<String, String>,
    /// The last command request and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_command: Option<CommandOutcome>,
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

    /// Whether the rollout stopped on failure and holds there (`onFailure: Pause`).
    #[must_use]
    pub fn held_on_failure(&self) -> bool {
        self.phase == Some(Phase::Paused) && self.failure.is_some()
    }
}

/// A command request and its outcome, kept as `status.lastCommand`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandOutcome {
    /// `promote`, `promote-full`, `abort` or `retry`.
    pub command: String,
    /// The request's annotation value.
    pub request: String,
    /// Whether it was carried out (false: refused, `message` says why).
    pub applied: bool,
    /// What it did, or why it was refused.
    pub message: String,
}

/// Whether the ModelVersion of `spec.version` can be rolled out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Availability {
    /// No ModelVersion has this model and version.
    #[default]
    Missing,
    /// It exists and is not verified yet (its phase, e.g. `Verifying`).
    NotReady(String),
    /// Its verification failed (why).
    Failed(String),
    /// Verified: it may be assigned.
    Ready,
}

impl Availability {
    /// Whether it may be assigned.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        *self == Availability::Ready
    }

    /// Why it may not, in words (`None` when Ready).
    #[must_use]
    pub fn problem(&self, version: &str) -> Option<String> {
        match self {
            Availability::Ready => None,
            Availability::Missing => Some(format!("no ModelVersion has version {version}")),
            Availability::NotReady(phase) => Some(format!(
                "the ModelVersion of {version} is {phase}, not Ready yet"
            )),
            Availability::Failed(why) => Some(format!(
                "the ModelVersion of {version} failed verification: {why}"
            )),
        }
    }
}

/// What the controller observed for this reconcile.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    /// Devices the rollout's selector targets.
    pub targeted_devices: u64,
    /// Cohort buckets of the targeted devices that can run `spec.version`, when known: the
    /// machine counts how many a percentage puts in the canary.
    pub eligible_buckets: Option<Vec<u16>>,
    /// Gate metrics over the analysis window, when the controller queried them.
    pub metrics: Option<GateMetrics>,
    /// A pending manual command request.
    pub command: Option<Request>,
    /// The ModelVersion of `spec.version`.
    pub version: Availability,
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

/// Why the rollout cannot move on: a condition for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What is missing and what to change.
    pub message: String,
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
    /// The rollout waits for its ModelVersion.
    pub version_blocker: Option<Blocker>,
    /// The rollout waits for devices: none targeted, or too few for the analysis.
    pub device_blocker: Option<Blocker>,
}

/// The fingerprint kept in `steps_hash`.
#[must_use]
pub fn steps_hash(strategy: &RolloutStrategy) -> String {
    let canonical = serde_json::to_vec(&strategy.steps).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&canonical))
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

/// Where the rollout stands, in words, for a state the machine gave no reason for.
fn describe(strategy: &RolloutStrategy, s: &RolloutState) -> Option<String> {
    let stable = s.stable_version.as_deref();
    match (s.phase?, &s.canary_version) {
        (Phase::Succeeded, _) => Some(format!("{} is stable on the whole segment", stable?)),
        (phase, Some(canary)) if phase.in_flight() => Some(format!(
            "step {} of {}: {}% of the segment on {canary}, the rest on {}",
            (s.step_index as usize + 1).min(strategy.steps.len()),
            strategy.steps.len(),
            s.percent,
            stable?
        )),
        _ => None,
    }
}

const MINUTE_MS: i64 = 60_000;
/// How often to look again while waiting for devices to connect (counts have no watch).
const DEVICE_WAIT_MS: i64 = 5_000;
const PAUSED_BY_SPEC: &str = "paused by spec.paused";

/// Computes the next state. See the module docs.
#[must_use]
pub fn advance(
    strategy: &RolloutStrategy,
    prev: &RolloutState,
    obs: &Observations,
    now: Timestamp,
) -> Transition {
    let mut s = prev.clone();
    // A description is regenerated from the state each time; a reason stays until replaced.
    if s.message.is_some() && s.message == describe(strategy, prev) {
        s.message = None;
    }
    let mut m = Machine {
        strategy,
        obs,
        s,
        events: Vec::new(),
        requeue_after: None,
        version_blocker: None,
        device_blocker: None,
        now,
    };
    m.run();
    if m.s.message.is_none() {
        m.s.message = describe(strategy, &m.s);
    }
    Transition {
        state: m.s,
        events: m.events,
        requeue_after: m.requeue_after,
        version_blocker: m.version_blocker,
        device_blocker: m.device_blocker,
    }
}

struct Machine<'a> {
    strategy: &'a RolloutStrategy,
    obs: &'a Observations,
    s: RolloutState,
    events: Vec<Event>,
    requeue_after: Option<Duration>,
    version_blocker: Option<Blocker>,
    device_blocker: Option<Blocker>,
    now: Timestamp,
}

// === impl Machine ===

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

    fn phase(&self) -> Phase {
        self.s.phase.unwrap_or(Phase::Progressing)
    }

    fn run(&mut self) {
        if let Err(problems) = validate(self.strategy) {
            let message = problems.join("; ");
            if self.s.phase != Some(Phase::Failed) || self.s.message.as_deref() != Some(&message) {
                self.event("InvalidSpec", true, message.clone());
            }
            self.s.phase = Some(Phase::Failed);
            self.s.message = Some(message);
            self.command(false);
            return;
        }
        if self.s.phase == Some(Phase::Failed) {
            self.recover();
        }
        let proceed = self.follow_spec_version();
        if proceed {
            self.follow_steps();
        }
        self.command(true);
        if !proceed || !self.phase().in_flight() || self.s.canary_version.is_none() {
            return;
        }
        let withdrawn = self.s.held_on_failure() && self.s.percent == 0;
        if !self.obs.version.is_ready() && !withdrawn {
            let canary = self.s.canary_version.clone().unwrap_or_default();
            let why = self.obs.version.problem(&canary).unwrap_or_default();
            self.fail(&why, true);
            return;
        }
        if self.s.held_on_failure() {
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
        if self.s.message.as_deref() == Some(PAUSED_BY_SPEC) {
            self.s.message = None;
            self.event("Resumed", false, "spec.paused cleared".into());
        }
        self.drive();
    }

    /// The spec was invalid and is valid again: a run in progress starts over.
    fn recover(&mut self) {
        self.s.message = None;
        self.s.phase = match (&self.s.canary_version, &self.s.stable_version) {
            (Some(_), _) => {
                self.restart();
                self.event(
                    "SpecValid",
                    false,
                    "the spec is valid again; the rollout restarts from its first step".into(),
                );
                Some(Phase::Progressing)
            }
            (None, Some(_)) => Some(Phase::Succeeded),
            (None, None) => None,
        };
    }

    /// Reacts to `spec.version`; returns false when there is nothing more to do.
    fn follow_spec_version(&mut self) -> bool {
        let version = self.strategy.version.clone();
        let Some(stable) = self.s.stable_version.clone() else {
            self.initial(version);
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
            } else if self.phase().in_flight() {
                // Was waiting for a version that never became Ready.
                self.s.phase = Some(Phase::Succeeded);
                self.s.step_index = self.strategy.steps.len() as u32;
                self.s.percent = 100;
                self.s.message = Some(format!("spec.version is the stable version {stable}"));
            }
            return true;
        }
        if self.s.canary_version.as_deref() != Some(&version) {
            if let Some(old) = self.s.canary_version.take()
                && self.phase().in_flight()
            {
                let message = format!("canary {old} superseded by {version}");
                self.event("Superseded", false, message);
            }
            if !self.obs.version.is_ready() {
                self.wait_for_version(&version);
                return false;
            }
            self.start(version, &stable);
        }
        true
    }

    /// The first version of a segment: nothing to compare a canary with, so it is stable at
    /// once (as Argo Rollouts does for a first deploy), once it is Ready and has devices.
    fn initial(&mut self, version: String) {
        if !self.obs.version.is_ready() {
            self.wait_for_version(&version);
            return;
        }
        if self.obs.targeted_devices == 0 {
            self.s.canary_version = None;
            self.s.phase = Some(Phase::Progressing);
            self.wait_for_devices();
            return;
        }
        self.s = RolloutState {
            phase: Some(Phase::Succeeded),
            stable_version: Some(version.clone()),
            step_index: self.strategy.steps.len() as u32,
            percent: 100,
            message: Some(format!("initial version {version}")),
            handled_commands: std::mem::take(&mut self.s.handled_commands),
            last_command: self.s.last_command.take(),
            ..RolloutState::default()
        };
        self.event(
            "InitialVersion",
            false,
            format!("{version} is the first version; it is stable"),
        );
    }

    /// Holds with no canary until the ModelVersion of `version` is Ready.
    fn wait_for_version(&mut self, version: &str) {
        let problem = self.obs.version.problem(version).unwrap_or_default();
        let message = format!("waiting for version {version}: {problem}");
        let reason = match self.obs.version {
            Availability::Missing => "ModelVersionMissing",
            Availability::Failed(_) => "ModelVersionFailed",
            _ => "ModelVersionNotReady",
        };
        if self.s.phase != Some(Phase::Progressing) || self.s.message.as_deref() != Some(&message) {
            let warning = !matches!(self.obs.version, Availability::NotReady(_));
            self.event("WaitingForModelVersion", warning, message.clone());
        }
        self.version_blocker = Some(Blocker {
            reason,
            message: problem,
        });
        self.s.phase = Some(Phase::Progressing);
        self.s.canary_version = None;
        self.s.step_index = 0;
        self.s.percent = 0;
        self.s.step_started_at = None;
        self.s.ramp_clock = None;
        self.s.analysis_failures = 0;
        self.s.last_analysis = None;
        self.s.failure = None;
        self.s.promoted_full_at = None;
        self.s.steps_hash = None;
        self.s.message = Some(message);
    }

    /// Holds because the selector matches no device: nothing can be judged or completed.
    fn wait_for_devices(&mut self) {
        let message = "waiting for devices: the selector matches no device".to_owned();
        if self.s.message.as_deref() != Some(&message) {
            self.event("WaitingForDevices", true, message.clone());
        }
        self.device_blocker = Some(Blocker {
            reason: "NoDevices",
            message:
                "the selector matches no device; check spec.selector against the devices' labels"
                    .into(),
        });
        self.s.message = Some(message);
        self.requeue_in_ms(DEVICE_WAIT_MS);
    }

    /// A run follows the steps it started with: new steps start it over.
    fn follow_steps(&mut self) {
        if !self.phase().in_flight() || self.s.canary_version.is_none() {
            return;
        }
        let hash = steps_hash(self.strategy);
        match &self.s.steps_hash {
            None => self.s.steps_hash = Some(hash),
            Some(h) if *h != hash => {
                self.restart();
                self.event(
                    "StepsChanged",
                    false,
                    "spec.steps changed; the rollout restarts from its first step".into(),
                );
            }
            Some(_) => {}
        }
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
        self.s.failure = None;
        self.s.promoted_full_at = None;
        self.s.steps_hash = Some(steps_hash(self.strategy));
        self.s.message = None;
    }

    /// Handles the pending request, if any: carried out or refused, recorded either way.
    fn command(&mut self, spec_valid: bool) {
        let Some(request) = self.obs.command.clone() else {
            return;
        };
        let outcome = if spec_valid {
            match request.command {
                Command::Promote => self.promote(),
                Command::PromoteFull => self.promote_full(),
                Command::Abort => self.abort(),
                Command::Retry => self.retry(),
            }
        } else {
            Err(Refused("the spec is invalid; fix it first".to_owned()))
        };
        let name = request.command.name();
        let (applied, message) = match outcome {
            Ok((reason, message)) => {
                let warning = request.command == Command::Abort;
                self.event(reason, warning, message.clone());
                (true, message)
            }
            Err(Refused(why)) => {
                self.event("CommandRefused", true, format!("{name} refused: {why}"));
                (false, why)
            }
        };
        self.s
            .handled_commands
            .insert(name.to_owned(), request.id.clone());
        self.s.last_command = Some(CommandOutcome {
            command: name.to_owned(),
            request: request.id,
            applied,
            message,
        });
    }

    /// The running canary, or why there is none to act on.
    ///
    /// Commands answer [`Applied`] (the event's reason and message) or [`Refused`].
    fn running_canary(&self) -> Result<String, Refused> {
        let phase = self.phase();
        match &self.s.canary_version {
            Some(c) if phase.in_flight() => Ok(c.clone()),
            _ if phase.in_flight() => Err(Refused(
                self.s
                    .message
                    .clone()
                    .unwrap_or_else(|| "no canary is running".into()),
            )),
            _ => Err(Refused(format!(
                "the rollout is {phase}; no canary is running"
            ))),
        }
    }

    fn promote(&mut self) -> Result<Applied, Refused> {
        self.running_canary()?;
        if self.s.held_on_failure() {
            return Err(Refused(
                "analysis failed; retry, abort, or promote --full to accept the canary anyway"
                    .into(),
            ));
        }
        let i = self.s.step_index;
        match self.strategy.steps.get(i as usize) {
            Some(step) if step.pause.is_some() => {
                self.next_step();
                Ok(("Promoted", format!("pause step {i} skipped by hand")))
            }
            Some(step) if step.analysis.is_some() => Err(Refused(format!(
                "step {i} is an analysis; promote never skips one: wait for its gates, or promote --full"
            ))),
            Some(_) => Err(Refused(format!(
                "step {i} is not a pause; promote skips pause steps only"
            ))),
            None => Err(Refused("no step left to skip".into())),
        }
    }

    fn promote_full(&mut self) -> Result<Applied, Refused> {
        let canary = self.running_canary()?;
        if let Some(problem) = self.obs.version.problem(&canary) {
            return Err(Refused(problem));
        }
        let from = self.s.step_index;
        self.s.promoted_full_at = Some(self.now);
        self.s.failure = None;
        self.complete();
        Ok((
            "PromotedFull",
            format!(
                "{canary} promoted in full by hand at step {from}: remaining steps and analysis skipped"
            ),
        ))
    }

    fn abort(&mut self) -> Result<Applied, Refused> {
        let canary = self.running_canary()?;
        self.s.phase = Some(Phase::Aborted);
        self.s.percent = 0;
        self.s.message = Some("aborted by hand; every device returns to the stable version".into());
        Ok(("Aborted", format!("rollout of {canary} aborted")))
    }

    fn retry(&mut self) -> Result<Applied, Refused> {
        let phase = self.phase();
        let retryable =
            matches!(phase, Phase::Aborted | Phase::RolledBack) || self.s.held_on_failure();
        let Some(canary) = self.s.canary_version.clone().filter(|_| retryable) else {
            return Err(Refused(format!(
                "the rollout is {phase}; retry applies to a rollout that rolled back, was aborted or is held on failure"
            )));
        };
        if let Some(problem) = self.obs.version.problem(&canary) {
            return Err(Refused(problem));
        }
        self.restart();
        Ok((
            "Retried",
            format!("restarting the rollout of {canary} from its first step"),
        ))
    }

    fn next_step(&mut self) {
        self.s.step_index += 1;
        self.s.step_started_at = Some(self.now);
        self.s.analysis_failures = 0;
        self.s.phase = Some(Phase::Progressing);
        self.s.message = None;
    }

    fn drive(&mut self) {
        // Each pass either completes a step or stops; the bound makes that explicit.
        for _ in 0..=self.strategy.steps.len() {
            let Some(step) = self.strategy.steps.get(self.s.step_index as usize) else {
                if self.obs.targeted_devices == 0 {
                    self.wait_for_devices();
                } else {
                    self.complete();
                }
                return;
            };
            let done = if let Some(target) = step.set_percent {
                self.set_percent(target)
            } else if let Some(pause) = &step.pause {
                self.pause(pause.duration.as_deref())
            } else {
                self.analyze()
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
        self.s.step_index = self.strategy.steps.len() as u32;
        self.s.percent = 100;
        self.s.message = None;
        self.event(
            "RolloutSucceeded",
            false,
            format!("{version} is stable on the whole segment"),
        );
    }

    fn set_percent(&mut self, target: u32) -> bool {
        self.s.phase = Some(Phase::Progressing);
        let before = self.s.percent;
        if self.s.percent > target {
            self.s.percent = target;
        }
        if self.s.percent < target {
            self.ramp(target);
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
    fn ramp(&mut self, target: u32) {
        let Some(limit) = self
            .strategy
            .rate_limit
            .as_ref()
            .map(|r| r.max_new_devices_per_minute)
        else {
            self.s.percent = target;
            return;
        };
        let targeted = self.obs.targeted_devices;
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

    /// Whether the segment can ever satisfy the analysis at this percentage; says why not.
    fn check_capacity(&mut self, min_devices: u32) {
        if self.obs.targeted_devices == 0 {
            self.device_blocker = Some(Blocker {
                reason: "NoDevices",
                message: format!(
                    "analysis step {} waits: the selector matches no device",
                    self.s.step_index
                ),
            });
            return;
        }
        let Some(buckets) = &self.obs.eligible_buckets else {
            return;
        };
        let percent = self.s.percent;
        let in_cohort = buckets
            .iter()
            .filter(|b| bucket_in_cohort(**b, percent))
            .count() as u64;
        if in_cohort < u64::from(min_devices) {
            self.device_blocker = Some(Blocker {
                reason: "SegmentTooSmall",
                message: format!(
                    "analysis step {} waits: at {percent}% the canary cohort holds {in_cohort} device(s) that can run {}, and spec.analysis.minDevices is {min_devices}; raise the step's setPercent, lower minDevices or widen the selector",
                    self.s.step_index, self.strategy.version
                ),
            });
        }
    }

    fn analyze(&mut self) -> bool {
        self.s.phase = Some(Phase::Analyzing);
        let Some(spec) = &self.strategy.analysis else {
            return true; // validate() rejects this; unreachable in practice.
        };
        self.check_capacity(spec.min_devices);
        let interval =
            humantime::parse_duration(&spec.interval).map_or(MINUTE_MS, |d| d.as_millis() as i64);
        if let Some(at) = next_analysis_at(self.strategy, &self.s)
            && self.now < at
        {
            self.requeue_in_ms(at.as_millisecond() - self.now.as_millisecond());
            return false;
        }
        let Some(metrics) = &self.obs.metrics else {
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
                    self.fail(&failing, false);
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

    /// Stops the run as `onFailure` says. `withdraw`: the canary cannot be held (its
    /// ModelVersion is gone or failed), so even a pause sends its devices back to stable.
    fn fail(&mut self, why: &str, withdraw: bool) {
        self.s.failure = Some(why.to_owned());
        let stable = self.s.stable_version.clone().unwrap_or_default();
        match self.strategy.on_failure {
            OnFailure::Rollback => {
                self.s.phase = Some(Phase::RolledBack);
                self.s.percent = 0;
                self.s.message = Some(format!("rolled back to {stable}: {why}"));
                self.event(
                    "RolledBack",
                    true,
                    format!("every device returns to {stable}: {why}"),
                );
            }
            OnFailure::Pause => {
                if withdraw {
                    self.s.percent = 0;
                }
                self.s.phase = Some(Phase::Paused);
                self.s.message = Some(format!("{why}; retry, promote --full or abort"));
                self.event(
                    "PausedOnFailure",
                    true,
                    format!("holding at {}%: {why}", self.s.percent),
                );
            }
        }
    }
}

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
