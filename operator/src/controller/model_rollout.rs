//! ModelRollout: drive the core step machine. Inputs are the strategy, manual commands
//! (annotations `edgewise.dev/promote`, `edgewise.dev/abort`, `edgewise.dev/retry`, removed
//! once handled), device counts from the gateway, and gate metrics from ClickHouse when an
//! analysis is due. Output is the status the gateways assign from, and an Event per
//! transition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgewise_core::rollout::{Command, Observations, RolloutState, advance, analysis_due};
use edgewise_proto::fleet::ModelState;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;

use super::{Context, Error, condition, key};
use crate::crd::{DeviceCounts, ModelRollout, SkewEntry};

/// Annotation → command.
pub const COMMANDS: [(&str, Command); 3] = [
    ("edgewise.dev/promote", Command::Promote),
    ("edgewise.dev/abort", Command::Abort),
    ("edgewise.dev/retry", Command::Retry),
];

fn window(r: &ModelRollout) -> Duration {
    r.spec
        .strategy
        .analysis
        .as_ref()
        .and_then(|a| humantime::parse_duration(&a.window).ok())
        .unwrap_or(Duration::from_secs(600))
}

pub(super) async fn reconcile(r: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = r.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let name = r.name_any();
    let state: RolloutState = r
        .status
        .as_ref()
        .map(|s| s.state.clone())
        .unwrap_or_default();
    let strategy = &r.spec.strategy;
    let annotations = r.annotations();
    let command = COMMANDS
        .iter()
        .find(|(a, _)| annotations.contains_key(*a))
        .map(|(a, c)| (*a, *c));

    // Device counts and skew from the gateway's view of the segment.
    let mut counts = DeviceCounts::default();
    let mut skew: BTreeMap<String, u64> = BTreeMap::new();
    let canary = state.canary_version.clone();
    if let Some(gw) = &ctx.gateway {
        for d in gw.registry().devices() {
            if !r.spec.selector.matches(&d.labels) {
                continue;
            }
            counts.targeted += 1;
            if let Some(v) = d.active_version(&r.spec.model) {
                *skew.entry(v.to_owned()).or_default() += 1;
            }
            if let (Some(c), Some(s)) = (&canary, d.models.get(&r.spec.model))
                && &s.version == c
            {
                counts.assigned += 1;
                match s.state() {
                    ModelState::Downloading => counts.downloading += 1,
                    ModelState::Active | ModelState::Installed => counts.installed += 1,
                    ModelState::Failed | ModelState::Unsupported => counts.failed += 1,
                    ModelState::Unspecified => {}
                }
            }
        }
    }

    // Without an in-process gateway (the `controller` role), counts come from the devices'
    // latest status in ClickHouse: every device running the model, whatever its segment.
    if ctx.gateway.is_none()
        && let Some(ch) = &ctx.clickhouse
    {
        for (version, devices) in crate::telemetry::gates::version_skew(ch, &r.spec.model).await? {
            counts.targeted += devices;
            if canary.as_deref() == Some(version.as_str()) {
                counts.assigned += devices;
                counts.installed += devices;
            }
            skew.insert(version, devices);
        }
    }
    let now = jiff::Timestamp::now();
    let mut metrics = None;
    if analysis_due(strategy, &state, now)
        && let (Some(ch), Some(c), Some(s)) = (
            &ctx.clickhouse,
            &state.canary_version,
            &state.stable_version,
        )
    {
        metrics = Some(
            crate::telemetry::gates::gate_metrics(
                ch,
                &key(r.as_ref()),
                &r.spec.model,
                c,
                s,
                window(&r),
                SystemTime::now(),
            )
            .await?,
        );
    }
    let transition = advance(
        strategy,
        &state,
        &Observations {
            targeted_devices: counts.targeted,
            metrics,
            command: command.map(|(_, c)| c),
        },
        now,
    );
    for e in &transition.events {
        ctx.event(r.as_ref(), e.reason, e.message.clone(), e.warning)
            .await;
    }

    // The older rollout of a model wins devices both select; the newer says so.
    let all: Api<ModelRollout> = Api::all(ctx.client.clone());
    let conflict = all
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|o| o.spec.model == r.spec.model && key(o) != key(r.as_ref()))
        .filter(|o| o.metadata.creation_timestamp < r.metadata.creation_timestamp)
        .find(|o| o.spec.selector.may_overlap(&r.spec.selector))
        .map(|o| key(&o));
    let generation = r.metadata.generation;
    let phase = transition.state.phase;
    let healthy = transition
        .state
        .last_analysis
        .as_ref()
        .is_none_or(|a| a.verdict != edgewise_core::rollout::Verdict::Fail);
    let conditions = vec![
        condition(
            "Progressing",
            phase.is_some_and(edgewise_core::rollout::Phase::in_flight),
            &format!("{phase:?}")
                .replace(['(', ')'], "")
                .replace("Some", ""),
            transition.state.message.as_deref().unwrap_or(""),
            generation,
        ),
        condition(
            "Healthy",
            healthy,
            if healthy {
                "GatesPassing"
            } else {
                "GateFailed"
            },
            "",
            generation,
        ),
        match &conflict {
            Some(other) => condition(
                "Conflict",
                true,
                "OverlappingSelector",
                &format!("{other} is older and selects some of the same devices; it wins them"),
                generation,
            ),
            None => condition("Conflict", false, "NoOverlap", "", generation),
        },
    ];
    let mut status = serde_json::to_value(&transition.state).unwrap_or_default();
    status["observedGeneration"] = json!(generation);
    status["devices"] = json!(counts);
    status["skew"] = json!(
        skew.into_iter()
            .map(|(version, devices)| SkewEntry { version, devices })
            .collect::<Vec<_>>()
    );
    status["conditions"] = json!(conditions);
    let desired =
        json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout", "status": status});
    super::apply_status(&api, &name, r.status.as_ref(), desired).await?;

    if let Some((annotation, _)) = command {
        let clear = json!({"metadata": {"annotations": {annotation: null}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&clear))
            .await?;
    }
    let wait = transition
        .requeue_after
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(10));
    Ok(Action::requeue(wait.max(Duration::from_millis(200))))
}
