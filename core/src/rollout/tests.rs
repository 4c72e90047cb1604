use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use super::spec::{AnalysisStep, PauseStep};
use super::*;
use crate::cohort::BUCKETS;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("valid time")
}

fn percent(p: u32) -> Step {
    Step {
        set_percent: Some(p),
        ..Step::default()
    }
}
fn pause(d: Option<&str>) -> Step {
    Step {
        pause: Some(PauseStep {
            duration: d.map(Into::into),
        }),
        ..Step::default()
    }
}
fn analysis() -> Step {
    Step {
        analysis: Some(AnalysisStep {}),
        ..Step::default()
    }
}

/// 5% → analysis → 25% → pause 10m → analysis → 100%, gated on error rate and p95.
fn strategy(version: &str) -> RolloutStrategy {
    RolloutStrategy {
        version: version.into(),
        steps: vec![
            percent(5),
            analysis(),
            percent(25),
            pause(Some("10m")),
            analysis(),
            percent(100),
        ],
        analysis: Some(AnalysisSpec {
            interval: "1m".into(),
            window: "10m".into(),
            min_devices: 5,
            min_samples: 50,
            failure_limit: 1,
            gates: vec![
                Gate {
                    metric: Metric::ErrorRate,
                    max: Some(0.05),
                    min: None,
                    relative_to_baseline: false,
                },
                Gate {
                    metric: Metric::LatencyP95Ms,
                    max: Some(1.5),
                    min: None,
                    relative_to_baseline: true,
                },
            ],
        }),
        rate_limit: None,
        on_failure: OnFailure::Rollback,
        paused: false,
        require_signed: false,
    }
}

fn metrics(error_rate: f64, p95: f64) -> GateMetrics {
    GateMetrics {
        canary: MetricSet {
            values: [(Metric::ErrorRate, error_rate), (Metric::LatencyP95Ms, p95)].into(),
            samples: 1_000,
            devices: 50,
        },
        baseline: MetricSet {
            values: [(Metric::ErrorRate, 0.01), (Metric::LatencyP95Ms, 100.0)].into(),
            samples: 10_000,
            devices: 500,
        },
    }
}

fn healthy() -> Observations {
    Observations {
        targeted_devices: 1_000,
        metrics: Some(metrics(0.01, 110.0)),
        version: Availability::Ready,
        ..Observations::default()
    }
}
fn breaching() -> Observations {
    Observations {
        metrics: Some(metrics(0.01, 400.0)),
        ..healthy()
    }
}
fn quiet() -> Observations {
    Observations {
        metrics: None,
        ..healthy()
    }
}
fn command(c: Command) -> Observations {
    Observations {
        command: Some(Request {
            command: c,
            id: "1".into(),
        }),
        ..healthy()
    }
}

/// A rollout whose first version, `version`, became stable at `t(0)`.
fn stable_on(version: &str) -> RolloutState {
    advance(
        &strategy(version),
        &RolloutState::default(),
        &healthy(),
        t(0),
    )
    .state
}

/// A rollout that has v1 stable, freshly told to roll out v2 at `t(0)`.
fn started() -> RolloutState {
    advance(&strategy("2.0.0"), &stable_on("1.0.0"), &quiet(), t(0)).state
}

fn reasons(tr: &Transition) -> Vec<&'static str> {
    tr.events.iter().map(|e| e.reason).collect()
}

#[test]
fn first_version_becomes_stable_at_once() {
    let tr = advance(
        &strategy("1.0.0"),
        &RolloutState::default(),
        &healthy(),
        t(0),
    );
    assert_eq!(tr.state.phase, Some(Phase::Succeeded));
    assert_eq!(tr.state.stable_version.as_deref(), Some("1.0.0"));
    assert_eq!(tr.state.version_for(0), Some("1.0.0"));
    assert_eq!(reasons(&tr), ["InitialVersion"]);
}

#[test]
fn new_version_sets_the_first_percent_then_waits_for_analysis() {
    let s = started();
    assert_eq!(s.phase, Some(Phase::Analyzing), "{s:?}");
    assert_eq!(s.canary_version.as_deref(), Some("2.0.0"));
    assert_eq!(s.step_index, 1);
    assert_eq!(s.percent, 5);
    // Cohort: buckets below 500 run the canary, the rest stay stable.
    assert_eq!(s.version_for(499), Some("2.0.0"));
    assert_eq!(s.version_for(500), Some("1.0.0"));
}

#[test]
fn passing_gates_advance_to_the_timed_pause_which_then_expires() {
    let s = started();
    let early = advance(&strategy("2.0.0"), &s, &healthy(), t(59));
    assert!(
        early.events.is_empty(),
        "the first run waits one interval for fresh data"
    );
    assert_eq!(early.requeue_after, Some(std::time::Duration::from_secs(1)));
    let tr = advance(&strategy("2.0.0"), &s, &healthy(), t(60));
    assert_eq!(reasons(&tr), ["AnalysisPassed", "CanaryPercent"]);
    assert_eq!(tr.state.percent, 25);
    assert_eq!(tr.state.phase, Some(Phase::Paused));
    assert_eq!(tr.requeue_after, Some(std::time::Duration::from_secs(600)));
    let still = advance(&strategy("2.0.0"), &tr.state, &healthy(), t(300));
    assert_eq!(still.state.step_index, 3);
    let after = advance(&strategy("2.0.0"), &tr.state, &healthy(), t(661));
    assert_eq!(after.state.step_index, 4, "{after:?}");
    assert_eq!(after.state.phase, Some(Phase::Analyzing));
}

#[test]
fn full_run_ends_with_the_new_version_stable() {
    let mut s = started();
    for (i, at) in [60, 661, 721].into_iter().enumerate() {
        s = advance(&strategy("2.0.0"), &s, &healthy(), t(at)).state;
        assert_ne!(s.phase, Some(Phase::RolledBack), "tick {i}");
    }
    assert_eq!(s.phase, Some(Phase::Succeeded));
    assert_eq!(s.stable_version.as_deref(), Some("2.0.0"));
    assert_eq!(s.canary_version, None);
    assert_eq!(s.percent, 100);
    assert!(
        (0..BUCKETS)
            .step_by(97)
            .all(|b| s.version_for(b) == Some("2.0.0"))
    );
}

#[test]
fn failures_within_the_limit_retry_then_roll_back() {
    let s = started();
    let first = advance(&strategy("2.0.0"), &s, &breaching(), t(60));
    assert_eq!(reasons(&first), ["AnalysisFailed"]);
    assert_eq!(first.state.phase, Some(Phase::Analyzing));
    assert_eq!(first.state.analysis_failures, 1);
    // Not yet due: the interval has not passed, so no second run.
    let early = advance(&strategy("2.0.0"), &first.state, &breaching(), t(90));
    assert_eq!(early.state.analysis_failures, 1);
    let second = advance(&strategy("2.0.0"), &first.state, &breaching(), t(120));
    assert_eq!(reasons(&second), ["AnalysisFailed", "RolledBack"]);
    assert_eq!(second.state.phase, Some(Phase::RolledBack));
    assert_eq!(second.state.percent, 0);
    assert_eq!(second.state.version_for(0), Some("1.0.0"));
    let gate = &second.state.last_analysis.as_ref().expect("kept").gates[1];
    assert_eq!(gate.verdict, Verdict::Fail);
    assert_eq!(gate.compared, Some(4.0));
}

#[test]
fn on_failure_pause_holds_the_canary_until_retry() {
    let mut st = strategy("2.0.0");
    st.on_failure = OnFailure::Pause;
    st.analysis.as_mut().expect("set").failure_limit = 0;
    let paused = advance(&st, &started(), &breaching(), t(60)).state;
    assert_eq!(paused.phase, Some(Phase::Paused));
    assert_eq!(paused.percent, 5, "devices stay where they are");
    let held = advance(&st, &paused, &healthy(), t(500)).state;
    assert_eq!(held.step_index, 1, "no progress without a command");
    let retried = advance(&st, &paused, &command(Command::Retry), t(501));
    assert_eq!(reasons(&retried), ["Retried", "CanaryPercent"]);
    assert_eq!(
        (retried.state.step_index, retried.state.percent),
        (1, 5),
        "retry restarts from the first step and waits for a fresh analysis"
    );
    assert_eq!(retried.state.last_analysis, None);
    assert_eq!(retried.state.failure, None);
}

#[test]
fn manual_pause_waits_for_promote() {
    let mut st = strategy("2.0.0");
    st.steps = vec![percent(10), pause(None), percent(100)];
    let stable = stable_on("1.0.0");
    let s = advance(&st, &stable, &healthy(), t(0)).state;
    assert_eq!((s.phase, s.percent), (Some(Phase::Paused), 10));
    let later = advance(&st, &s, &healthy(), t(86_400)).state;
    assert_eq!(later.step_index, 1);
    let promoted = advance(&st, &s, &command(Command::Promote), t(86_401));
    assert_eq!(
        reasons(&promoted),
        ["Promoted", "CanaryPercent", "RolloutSucceeded"]
    );
    assert_eq!(promoted.state.stable_version.as_deref(), Some("2.0.0"));
}

#[test]
fn abort_returns_everyone_to_stable_and_retry_restarts() {
    let aborted = advance(
        &strategy("2.0.0"),
        &started(),
        &command(Command::Abort),
        t(5),
    );
    assert_eq!(aborted.state.phase, Some(Phase::Aborted));
    assert_eq!(aborted.state.version_for(0), Some("1.0.0"));
    let idle = advance(&strategy("2.0.0"), &aborted.state, &healthy(), t(100));
    assert_eq!(idle.state, aborted.state, "an aborted rollout stays put");
    let retried = advance(
        &strategy("2.0.0"),
        &aborted.state,
        &command(Command::Retry),
        t(200),
    );
    assert_eq!(retried.state.phase, Some(Phase::Analyzing));
    assert_eq!(retried.state.percent, 5);
}

#[test]
fn commands_that_do_not_apply_are_reported_not_obeyed() {
    let done = stable_on("1.0.0");
    let tr = advance(&strategy("1.0.0"), &done, &command(Command::Promote), t(1));
    assert_eq!(reasons(&tr), ["CommandRefused"]);
    let outcome = tr.state.last_command.clone().expect("recorded");
    assert!(!outcome.applied);
    assert!(outcome.message.contains("Succeeded"), "{outcome:?}");
    assert_eq!(tr.state.handled_commands["promote"], "1");
    let mut unchanged = tr.state.clone();
    unchanged.last_command = None;
    unchanged.handled_commands.clear();
    assert_eq!(unchanged, done, "a refused command changes nothing else");
}

#[test]
fn spec_paused_holds_without_losing_place() {
    let mut st = strategy("2.0.0");
    st.paused = true;
    let tr = advance(&st, &started(), &healthy(), t(1));
    assert_eq!(tr.state.phase, Some(Phase::Paused));
    assert_eq!(tr.state.step_index, 1);
    assert_eq!(reasons(&tr), ["Paused"]);
    let again = advance(&st, &tr.state, &healthy(), t(2));
    assert!(again.events.is_empty(), "no repeated events while paused");
    st.paused = false;
    let resumed = advance(&st, &tr.state, &healthy(), t(60)).state;
    assert_eq!(resumed.percent, 25);
}

#[test]
fn a_new_version_mid_rollout_starts_over_from_stable() {
    let mid = advance(&strategy("2.0.0"), &started(), &healthy(), t(60)).state;
    assert_eq!(mid.percent, 25);
    let tr = advance(&strategy("3.0.0"), &mid, &healthy(), t(61));
    assert_eq!(reasons(&tr)[..2], ["Superseded", "RolloutStarted"]);
    assert_eq!(tr.state.canary_version.as_deref(), Some("3.0.0"));
    assert_eq!(tr.state.stable_version.as_deref(), Some("1.0.0"));
    assert_eq!(tr.state.percent, 5);
    assert_eq!(tr.state.step_index, 1);
}

#[test]
fn setting_the_stable_version_back_withdraws_the_canary() {
    let tr = advance(&strategy("1.0.0"), &started(), &healthy(), t(2));
    assert_eq!(tr.state.phase, Some(Phase::RolledBack));
    assert_eq!(tr.state.canary_version, None);
    assert!(
        (0..BUCKETS)
            .step_by(101)
            .all(|b| tr.state.version_for(b) == Some("1.0.0"))
    );
}

#[test]
fn rate_limit_spreads_new_devices_over_time() {
    let mut st = strategy("2.0.0");
    // 1,000 devices, 20 per minute ⇒ 2 percentage points per minute, one minute banked.
    st.rate_limit = Some(RateLimit {
        max_new_devices_per_minute: 20,
    });
    st.steps = vec![percent(10), percent(100)];
    let stable = stable_on("1.0.0");
    let s0 = advance(&st, &stable, &healthy(), t(0));
    assert_eq!(s0.state.percent, 2, "one banked minute");
    assert_eq!(s0.requeue_after, Some(std::time::Duration::from_secs(30)));
    let s1 = advance(&st, &s0.state, &healthy(), t(30)).state;
    assert_eq!(s1.percent, 3);
    let s2 = advance(&st, &s1, &healthy(), t(240)).state;
    // 210 s later: capped to one banked minute ⇒ +2.
    assert_eq!(s2.percent, 5);
    let mut s = s2;
    let mut at = 240;
    while s.phase != Some(Phase::Succeeded) {
        at += 30;
        let before = s.percent;
        s = advance(&st, &s, &healthy(), t(at)).state;
        assert!(
            s.percent <= before + 1 || s.phase == Some(Phase::Succeeded),
            "at most 10 devices per 30 s"
        );
        assert!(at < 4_000, "must finish");
    }
    // The last 95 points at 2 per minute take 47.5 minutes after t = 240 s.
    assert!((3_000..=3_120).contains(&at), "finished at {at}");
}

#[test]
fn invalid_strategies_fail_with_every_problem_named() {
    let mut st = strategy("2.0");
    st.steps = vec![percent(50), percent(20), analysis(), pause(Some("soon"))];
    st.analysis = None;
    let tr = advance(&st, &started(), &healthy(), t(1));
    assert_eq!(tr.state.phase, Some(Phase::Failed));
    let msg = tr.state.message.expect("message");
    for part in [
        "spec.version:",
        "spec.steps[1].setPercent: 20 is below the previous step's 50",
        "spec.steps[2].analysis: needs spec.analysis",
        "spec.steps[3].pause.duration: \"soon\"",
    ] {
        assert!(msg.contains(part), "{part:?} missing from {msg}");
    }
}

#[test]
fn analysis_due_tells_the_controller_when_to_query() {
    let s = started();
    assert!(!analysis_due(&strategy("2.0.0"), &s, t(0)));
    assert!(analysis_due(&strategy("2.0.0"), &s, t(60)));
    let failed_once = advance(&strategy("2.0.0"), &s, &breaching(), t(60)).state;
    assert!(!analysis_due(&strategy("2.0.0"), &failed_once, t(90)));
    assert!(analysis_due(&strategy("2.0.0"), &failed_once, t(120)));
}

// ---- properties ----

fn arb_strategy() -> impl Strategy<Value = RolloutStrategy> {
    (
        prop::collection::vec((0u8..3, 1u32..40), 1..8),
        0u32..3,
        prop::bool::ANY,
        prop::option::of(1u32..200),
    )
        .prop_map(|(shape, failure_limit, pause_on_failure, rate)| {
            let mut pct = 0;
            let mut steps: Vec<Step> = shape
                .into_iter()
                .map(|(kind, n)| match kind {
                    0 => {
                        pct = (pct + n).min(100);
                        percent(pct)
                    }
                    1 => pause(Some(["30s", "5m", "1h"][n as usize % 3])),
                    _ => analysis(),
                })
                .collect();
            if !steps.iter().any(|s| s.analysis.is_some()) {
                steps.push(analysis());
            }
            let mut st = strategy("2.0.0");
            st.steps = steps;
            st.analysis.as_mut().expect("set").failure_limit = failure_limit;
            st.on_failure = if pause_on_failure {
                OnFailure::Pause
            } else {
                OnFailure::Rollback
            };
            st.rate_limit = rate.map(|r| RateLimit {
                max_new_devices_per_minute: r,
            });
            st
        })
}

proptest! {
    #[test]
    fn the_step_machine_never_advances_past_a_failing_gate(
        st in arb_strategy(),
        ticks in prop::collection::vec(1i64..900, 1..60),
    ) {
        let gate = st.steps.iter().position(|s| s.analysis.is_some()).expect("has analysis") as u32;
        let stable = stable_on("1.0.0");
        let mut s = advance(&st, &stable, &breaching(), t(0)).state;
        let mut now = 0;
        for dt in ticks {
            now += dt;
            s = advance(&st, &s, &breaching(), t(now)).state;
            prop_assert!(s.step_index <= gate, "passed the analysis step: {:?}", s);
            prop_assert_ne!(s.phase, Some(Phase::Succeeded));
            prop_assert_eq!(s.stable_version.as_deref(), Some("1.0.0"));
        }
    }

    #[test]
    fn a_rollback_always_returns_to_the_stable_version(
        st in arb_strategy(),
        ticks in prop::collection::vec((1i64..900, 0u8..10), 1..60),
        bucket in 0u16..BUCKETS,
    ) {
        let stable = stable_on("1.0.0");
        let mut s = advance(&st, &stable, &healthy(), t(0)).state;
        let mut now = 0;
        for (dt, roll) in ticks {
            now += dt;
            let obs = match roll {
                0 => command(Command::Abort),
                1 => command(Command::Retry),
                2..=5 => breaching(),
                _ => healthy(),
            };
            s = advance(&st, &s, &obs, t(now)).state;
            if matches!(s.phase, Some(Phase::RolledBack | Phase::Aborted)) {
                prop_assert_eq!(s.percent, 0);
                prop_assert_eq!(s.version_for(bucket), Some("1.0.0"));
                prop_assert_eq!(s.stable_version.as_deref(), Some("1.0.0"));
            }
        }
    }

    #[test]
    fn percent_never_exceeds_the_current_step_target(
        st in arb_strategy(),
        ticks in prop::collection::vec(1i64..900, 1..40),
    ) {
        let stable = stable_on("1.0.0");
        let mut s = advance(&st, &stable, &healthy(), t(0)).state;
        let mut now = 0;
        for dt in ticks {
            now += dt;
            s = advance(&st, &s, &healthy(), t(now)).state;
            if s.phase.is_some_and(Phase::in_flight) {
                let reached = st.steps[..(s.step_index as usize + 1).min(st.steps.len())]
                    .iter()
                    .filter_map(|x| x.set_percent)
                    .max()
                    .unwrap_or(0);
                prop_assert!(s.percent <= reached, "{} > {}", s.percent, reached);
            }
        }
    }
}

#[test]
fn timestamps_survive_a_status_round_trip() {
    let s = started();
    let json = serde_json::to_string(&s).expect("serialises");
    let back: RolloutState = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, s);
    assert!(
        json.contains("\"stepStartedAt\":\"2027-01-15T08:00:00Z\""),
        "{json}"
    );
    let _ = SignedDuration::ZERO;
}

#[test]
fn the_message_says_where_the_rollout_stands_at_every_tick() {
    let mut s = started();
    let mut said = vec![s.message.clone().unwrap_or_default()];
    for at in [60, 661, 721] {
        s = advance(&strategy("2.0.0"), &s, &healthy(), t(at)).state;
        said.push(s.message.clone().unwrap_or_default());
    }
    assert_eq!(
        said,
        [
            // At the first analysis step, after setting 5 %.
            "step 2 of 6: 5% of the segment on 2.0.0, the rest on 1.0.0",
            "pausing for 10m",
            "step 5 of 6: 25% of the segment on 2.0.0, the rest on 1.0.0",
            "2.0.0 is stable on the whole segment",
        ]
    );
}
