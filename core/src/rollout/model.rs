//! Model-based property test of the rollout controller's pure part: random sequences of
//! spec changes, ModelVersion readiness, gate results, manual requests (as annotations, the
//! way the controller sees them) and time, with the safety invariants checked after every
//! reconcile.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use proptest::prelude::*;

use super::command::pending;
use super::spec::{AnalysisStep, PauseStep};
use super::*;
use crate::cohort::{BUCKETS, bucket};

const VERSIONS: [&str; 3] = ["1.0.0", "2.0.0", "3.0.0"];
const SALT: &str = "edgewise/assistant";
const MAX_DEVICES: u64 = 40;

#[derive(Clone, Copy, Debug)]
enum Gates {
    Pass,
    Fail,
    Thin,
}

#[derive(Clone, Debug)]
enum Op {
    SetVersion(usize),
    SetSteps(Vec<Step>),
    SetPaused(bool),
    SetOnFailure(OnFailure),
    SetDevices(u64),
    SetAvailability(usize, Availability),
    SetGates(Gates),
    Request(Command),
    Wait(i64),
    /// A reconcile with nothing new, as a watch event or requeue would cause.
    Reconcile,
}

fn step_strategy() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0u8..4, 1u32..60), 1..6).prop_map(|shape| {
        let mut pct = 0;
        shape
            .into_iter()
            .map(|(kind, n)| match kind {
                0 => {
                    pct = (pct + n).min(100);
                    Step {
                        set_percent: Some(pct),
                        ..Step::default()
                    }
                }
                1 => Step {
                    pause: Some(PauseStep { duration: None }),
                    ..Step::default()
                },
                2 => Step {
                    pause: Some(PauseStep {
                        duration: Some("30s".into()),
                    }),
                    ..Step::default()
                },
                _ => Step {
                    analysis: Some(AnalysisStep {}),
                    ..Step::default()
                },
            })
            .collect()
    })
}

fn availability() -> impl Strategy<Value = Availability> {
    prop_oneof![
        4 => Just(Availability::Ready),
        1 => Just(Availability::Missing),
        1 => Just(Availability::NotReady("Verifying".into())),
        1 => Just(Availability::Failed("SHA-256 mismatch".into())),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..VERSIONS.len()).prop_map(Op::SetVersion),
        1 => step_strategy().prop_map(Op::SetSteps),
        1 => any::<bool>().prop_map(Op::SetPaused),
        1 => prop_oneof![Just(OnFailure::Rollback), Just(OnFailure::Pause)].prop_map(Op::SetOnFailure),
        1 => prop_oneof![Just(0u64), Just(3), Just(MAX_DEVICES)].prop_map(Op::SetDevices),
        2 => ((0..VERSIONS.len()), availability()).prop_map(|(v, a)| Op::SetAvailability(v, a)),
        2 => prop_oneof![Just(Gates::Pass), Just(Gates::Fail), Just(Gates::Thin)].prop_map(Op::SetGates),
        4 => prop_oneof![
            Just(Command::Promote),
            Just(Command::PromoteFull),
            Just(Command::Abort),
            Just(Command::Retry)
        ]
        .prop_map(Op::Request),
        5 => (1i64..120).prop_map(Op::Wait),
        2 => Just(Op::Reconcile),
    ]
}

/// The world around the machine, and what the checker remembers.
struct World {
    strategy: RolloutStrategy,
    availability: [Availability; 3],
    devices: u64,
    gates: Gates,
    annotations: BTreeMap<String, String>,
    requests: u64,
    now: Timestamp,
    state: RolloutState,
    /// Analysis steps seen passing, with passing gates, in the current run.
    passed: BTreeSet<usize>,
    /// Every request the controller acted on or refused.
    handled: BTreeSet<(Command, String)>,
    /// Cohort buckets of the devices `dev-0`… (`devices` of them are targeted).
    buckets: Vec<u16>,
}

impl World {
    fn new(steps: Vec<Step>) -> World {
        World {
            strategy: RolloutStrategy {
                version: VERSIONS[0].into(),
                steps,
                analysis: Some(AnalysisSpec {
                    interval: "10s".into(),
                    window: "1m".into(),
                    min_devices: 2,
                    min_samples: 10,
                    failure_limit: 1,
                    gates: vec![Gate {
                        metric: Metric::ErrorRate,
                        max: Some(0.05),
                        min: None,
                        relative_to_baseline: false,
                    }],
                }),
                rate_limit: None,
                on_failure: OnFailure::Rollback,
                paused: false,
                require_signed: false,
            },
            availability: [
                Availability::Ready,
                Availability::Ready,
                Availability::Ready,
            ],
            devices: 40,
            gates: Gates::Pass,
            annotations: BTreeMap::new(),
            requests: 0,
            now: Timestamp::from_second(1_800_000_000).expect("valid"),
            state: RolloutState::default(),
            passed: BTreeSet::new(),
            handled: BTreeSet::new(),
            buckets: (0..MAX_DEVICES)
                .map(|i| bucket(SALT, &format!("dev-{i}")))
                .collect(),
        }
    }

    fn availability_of(&self, version: &str) -> Availability {
        VERSIONS
            .iter()
            .position(|v| *v == version)
            .map_or(Availability::Missing, |i| self.availability[i].clone())
    }

    fn metrics(&self) -> GateMetrics {
        let (error_rate, samples, devices) = match self.gates {
            Gates::Pass => (0.0, 500, 10),
            Gates::Fail => (0.5, 500, 10),
            Gates::Thin => (0.0, 0, 0),
        };
        GateMetrics {
            canary: MetricSet {
                values: [(Metric::ErrorRate, error_rate)].into(),
                samples,
                devices,
            },
            baseline: MetricSet::default(),
        }
    }

    /// What the controller does on one reconcile: read the pending request, query the
    /// gates only when an analysis is due, run the machine, store the state.
    fn observe(&self) -> (Observations, bool) {
        let due = analysis_due(&self.strategy, &self.state, self.now);
        let obs = Observations {
            targeted_devices: self.devices,
            eligible_buckets: Some(self.buckets[..self.devices as usize].to_vec()),
            metrics: due.then(|| self.metrics()),
            command: pending(&self.annotations, &self.state.handled_commands),
            version: self.availability_of(&self.strategy.version),
        };
        (obs, due)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mut steps_changed = false;
        match op {
            Op::SetVersion(i) => self.strategy.version = VERSIONS[*i].into(),
            Op::SetSteps(steps) => {
                steps_changed = *steps != self.strategy.steps;
                self.strategy.steps = steps.clone();
            }
            Op::SetPaused(p) => self.strategy.paused = *p,
            Op::SetOnFailure(f) => self.strategy.on_failure = *f,
            Op::SetDevices(n) => self.devices = *n,
            Op::SetAvailability(i, a) => self.availability[*i] = a.clone(),
            Op::SetGates(g) => self.gates = *g,
            Op::Request(c) => {
                self.requests += 1;
                self.annotations
                    .insert(c.annotation().to_owned(), self.requests.to_string());
            }
            Op::Wait(secs) => {
                self.now += jiff::SignedDuration::from_secs(*secs);
            }
            Op::Reconcile => {}
        }
        let (obs, _) = self.observe();
        let prev = self.state.clone();
        let tr = advance(&self.strategy, &prev, &obs, self.now);
        self.check(&prev, &obs, &tr, steps_changed)?;
        self.state = tr.state;
        self.check_quiet()
    }

    fn check(
        &mut self,
        prev: &RolloutState,
        obs: &Observations,
        tr: &Transition,
        steps_changed: bool,
    ) -> Result<(), TestCaseError> {
        let next = &tr.state;
        let reasons: Vec<&str> = tr.events.iter().map(|e| e.reason).collect();
        let full = obs
            .command
            .as_ref()
            .is_some_and(|r| r.command == Command::PromoteFull)
            && reasons.contains(&"PromotedFull");

        // Each request acts at most once, and exactly one event records it.
        let command_events = reasons
            .iter()
            .filter(|r| {
                [
                    "Promoted",
                    "PromotedFull",
                    "Aborted",
                    "Retried",
                    "CommandRefused",
                ]
                .contains(r)
            })
            .count();
        match &obs.command {
            Some(r) => {
                prop_assert!(
                    self.handled.insert((r.command, r.id.clone())),
                    "request {r:?} handled twice"
                );
                prop_assert_eq!(command_events, 1, "events {:?} for {:?}", reasons, r);
                prop_assert_eq!(next.handled_commands.get(r.command.name()), Some(&r.id));
            }
            None => prop_assert_eq!(command_events, 0, "command events without a request"),
        }

        // The checker's own idea of a run: it restarts when the canary changes, when the
        // steps change, or when the machine reports a restart.
        let restarted = (next.canary_version.is_some()
            && prev.canary_version != next.canary_version)
            || steps_changed
            || reasons
                .iter()
                .any(|r| ["RolloutStarted", "Retried", "StepsChanged", "SpecValid"].contains(r));
        if restarted {
            self.passed.clear();
        }
        // Leaving an analysis step needs passing gates in this very reconcile.
        let from = if restarted {
            0
        } else {
            prev.step_index as usize
        };
        let to =
            if next.phase == Some(Phase::Succeeded) && next.stable_version != prev.stable_version {
                self.strategy.steps.len()
            } else {
                next.step_index as usize
            };
        let gates_passed = matches!(self.gates, Gates::Pass) && obs.metrics.is_some();
        let mut left = 0;
        // The first version of a segment is stable at once, with no steps to run.
        // Outside a running canary (and unless one was just made stable) the step index is a
        // leftover.
        let initial = prev.stable_version.is_none();
        let running = (next.canary_version.is_some() && next.phase.is_some_and(Phase::in_flight))
            || next.stable_version != prev.stable_version;
        for i in (from..to.min(self.strategy.steps.len())).filter(|_| running && !initial) {
            if self.strategy.steps[i].analysis.is_some() && !full {
                left += 1;
                prop_assert!(gates_passed, "left analysis step {i} without passing gates");
                self.passed.insert(i);
            }
        }
        prop_assert!(left <= 1, "left {left} analysis steps in one reconcile");

        // No version becomes stable without every analysis step passing, unless promoted in
        // full by hand; and never one whose ModelVersion is not Ready, nor on no devices.
        if next.stable_version != prev.stable_version {
            let stable = next.stable_version.clone().unwrap_or_default();
            prop_assert!(
                self.availability_of(&stable).is_ready(),
                "{stable} became stable without a Ready ModelVersion"
            );
            if prev.stable_version.is_some() && !full {
                for (i, s) in self.strategy.steps.iter().enumerate() {
                    if s.analysis.is_some() {
                        prop_assert!(
                            self.passed.contains(&i),
                            "{stable} became stable but analysis step {i} never passed"
                        );
                    }
                }
            }
            if !full {
                prop_assert!(self.devices > 0, "{stable} became stable on no devices");
            }
        }

        // The percentage never exceeds the current step's target.
        if next.phase.is_some_and(Phase::in_flight) {
            let upto = (next.step_index as usize + 1).min(self.strategy.steps.len());
            let target = self.strategy.steps[..upto]
                .iter()
                .filter_map(|s| s.set_percent)
                .max()
                .unwrap_or(0);
            prop_assert!(next.percent <= target, "{} > {}", next.percent, target);
        }

        // Rollback and abort return every device to the stable version.
        if matches!(next.phase, Some(Phase::RolledBack | Phase::Aborted)) {
            for b in (0..BUCKETS).step_by(97) {
                prop_assert_eq!(next.version_for(b), next.stable_version.as_deref());
            }
        }

        // No version without a Ready ModelVersion is ever assigned to a canary device.
        if let Some(canary) = &next.canary_version
            && next.percent > 0
        {
            prop_assert!(
                self.availability_of(canary).is_ready(),
                "canary {canary} at {}% is not Ready",
                next.percent
            );
        }
        if next.stable_version.is_none() {
            prop_assert_eq!(next.canary_version.as_deref(), None);
        }

        // status.message always says where the rollout stands.
        if next.phase.is_some() {
            prop_assert!(
                next.message.as_ref().is_some_and(|m| !m.is_empty()),
                "no message in {next:?}"
            );
        }
        Ok(())
    }

    /// A second reconcile at the same instant with nothing new changes nothing and says
    /// nothing: a quiet system is quiet.
    fn check_quiet(&self) -> Result<(), TestCaseError> {
        let (obs, _) = self.observe();
        prop_assert!(obs.command.is_none());
        let again = advance(&self.strategy, &self.state, &obs, self.now);
        prop_assert_eq!(
            &again.state,
            &self.state,
            "a repeat reconcile changed the state"
        );
        prop_assert!(
            again.events.is_empty(),
            "a repeat reconcile said {:?}",
            again.events
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_sequence_of_commands_and_events_keeps_the_rollout_safe(
        steps in step_strategy(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut world = World::new(steps);
        for op in &ops {
            world.apply(op)?;
        }
    }
}
