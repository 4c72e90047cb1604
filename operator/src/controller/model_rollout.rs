//! ModelRollout: drive the core step machine. Inputs are the strategy, the pending manual
//! request (annotations `edgewise.dev/promote`, `promote-full`, `abort`, `retry`; see
//! [`edgewise_core::rollout::command`]), whether the ModelVersion of `spec.version` is
//! Ready, the segment's devices (from the in-process gateway or ClickHouse), and gate
//! metrics from ClickHouse when an analysis is due. Output is the status the gateways
//! assign from, and an Event per transition, published once the status holding it is stored.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgewise_core::cohort::bucket;
use edgewise_core::rollout::command::pending;
use edgewise_core::rollout::{
    Availability, Observations, Phase, RolloutState, Transition, Verdict, advance, analysis_due,
};
use edgewise_core::variant::choose_variant;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use tracing::instrument;

use super::segment::{SegmentDevice, summarize};
use super::status::{Cond, conditions, write_status};
use super::{Context, Error, key};
use crate::crd::names::condition;
use crate::crd::{ModelRollout, ModelRolloutStatus, ModelVersion, ModelVersionPhase};
use crate::gateway::desired::cohort_salt;

/// What the rollout reconciler reads besides the cluster's events: the shared context and
/// reflector stores of the objects it consults, so a reconcile lists nothing.
pub(super) struct RolloutContext {
    /// Clients, the gateway and the event recorder.
    pub(super) base: Arc<Context>,
    /// Every ModelVersion, kept by a reflector whose changes also trigger the rollouts.
    pub(super) versions: Store<ModelVersion>,
    /// Every ModelRollout (the rollout controller's own store).
    pub(super) rollouts: Store<ModelRollout>,
}

impl std::ops::Deref for RolloutContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// How often a rollout with nothing pending is looked at again: device counts and skew
/// change without the object changing.
const RESYNC: Duration = Duration::from_secs(10);

fn window(r: &ModelRollout) -> Duration {
    r.spec
        .strategy
        .analysis
        .as_ref()
        .and_then(|a| humantime::parse_duration(&a.window).ok())
        .unwrap_or(Duration::from_secs(600))
}

#[instrument(skip_all, fields(rollout = %key(r.as_ref())))]
pub(super) async fn reconcile(
    r: Arc<ModelRollout>,
    ctx: Arc<RolloutContext>,
) -> Result<Action, Error> {
    // Until the ModelVersion reflector has listed once, "missing" would be a guess.
    ctx.versions
        .wait_until_ready()
        .await
        .map_err(|_| Error::StoreStopped("ModelVersion"))?;
    let ns = r.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let state: RolloutState = r
        .status
        .as_ref()
        .map(|s| s.state.clone())
        .unwrap_or_default();
    let strategy = &r.spec.strategy;
    let mv = model_version(&ctx.versions, &ns, &r.spec.model, &strategy.version);
    let version = availability(mv.as_ref(), r.spec.strategy.require_signed);
    let devices = segment_devices(&ctx, &r, mv.as_ref()).await?;

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
            targeted_devices: devices.len() as u64,
            eligible_buckets: Some(
                devices
                    .iter()
                    .filter(|d| d.eligible)
                    .map(|d| d.bucket)
                    .collect(),
            ),
            metrics,
            command: pending(r.annotations(), &state.handled_commands),
            version: version.clone(),
        },
        now,
    );

    let conflict = older_overlapping(&ctx.rollouts, &r);
    let state = &transition.state;
    let target = state
        .canary_version
        .as_deref()
        .or(state.stable_version.as_deref());
    let summary = summarize(&devices, target);
    let generation = r.metadata.generation;
    let previous = r.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let status = ModelRolloutStatus {
        observed_generation: generation,
        state: state.clone(),
        devices: summary.counts,
        skew: summary.skew,
        conditions: conditions(
            previous,
            rollout_conditions(&r, &transition, &version, conflict),
            generation,
        ),
    };
    if write_status(&api, r.as_ref(), status).await?.is_some() {
        // Only a stored transition is announced: a stale reconcile fails its write above.
        for e in &transition.events {
            ctx.event(r.as_ref(), e.reason, e.message.clone(), e.warning)
                .await;
        }
    }
    let wait = transition.requeue_after.unwrap_or(RESYNC).min(RESYNC);
    Ok(Action::requeue(wait.max(Duration::from_millis(200))))
}

/// The ModelVersion of `model` at `version` in `ns`, Ready ones first.
fn model_version(
    versions: &Store<ModelVersion>,
    ns: &str,
    model: &str,
    version: &str,
) -> Option<ModelVersion> {
    let mut found: Vec<Arc<ModelVersion>> = versions
        .state()
        .into_iter()
        .filter(|m| m.namespace().as_deref() == Some(ns))
        .filter(|m| m.spec.model == model && m.spec.version == version)
        .collect();
    found
        .sort_by_key(|m| m.status.as_ref().and_then(|s| s.phase) != Some(ModelVersionPhase::Ready));
    found.into_iter().next().map(|m| m.as_ref().clone())
}

fn availability(mv: Option<&ModelVersion>, require_signed: bool) -> Availability {
    let Some(mv) = mv else {
        return Availability::Missing;
    };
    let status = mv.status.as_ref();
    match status.and_then(|s| s.phase) {
        Some(ModelVersionPhase::Ready) if require_signed => {
            let unsigned: Vec<&str> = status
                .map(|s| &s.variants[..])
                .unwrap_or_default()
                .iter()
                .filter(|v| v.signed_by.is_none())
                .map(|v| v.name.as_str())
                .collect();
            if unsigned.is_empty() {
                Availability::Ready
            } else {
                Availability::Failed(format!(
                    "spec.strategy.requireSigned, and no publisher key verified variant(s) {}",
                    unsigned.join(", ")
                ))
            }
        }
        Some(ModelVersionPhase::Ready) => Availability::Ready,
        Some(ModelVersionPhase::Failed) => Availability::Failed(
            status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::VERIFIED))
                .map_or_else(|| "verification failed".to_owned(), |c| c.message.clone()),
        ),
        Some(phase) => Availability::NotReady(phase.as_str().to_owned()),
        None => Availability::NotReady("Pending".into()),
    }
}

/// The devices the rollout's selector targets, from the in-process gateway's registry, or
/// (the `controller` role) from the devices' latest status in ClickHouse.
async fn segment_devices(
    ctx: &Context,
    r: &ModelRollout,
    mv: Option<&ModelVersion>,
) -> Result<Vec<SegmentDevice>, Error> {
    let salt = cohort_salt(r);
    let model = &r.spec.model;
    if let Some(gw) = &ctx.gateway {
        return Ok(gw
            .registry()
            .devices()
            .into_iter()
            .filter(|d| r.spec.selector.matches(&d.labels))
            .map(|d| SegmentDevice {
                bucket: bucket(&salt, &d.device_id),
                running: d.active_version(model).map(str::to_owned),
                reported: d.models.get(model).map(|s| (s.version.clone(), s.state())),
                eligible: match (mv, &d.facts) {
                    (Some(mv), Some(facts)) => choose_variant(&mv.spec.variants, facts).is_ok(),
                    _ => true,
                },
            })
            .collect());
    }
    let Some(ch) = &ctx.clickhouse else {
        return Ok(Vec::new());
    };
    Ok(crate::telemetry::gates::segment_devices(ch, model)
        .await?
        .into_iter()
        .filter(|d| r.spec.selector.matches(&d.labels))
        .map(|d| SegmentDevice {
            bucket: bucket(&salt, &d.device_id),
            running: d.version,
            reported: None,
            eligible: true,
        })
        .collect())
}

/// The older rollout of the same model whose selector may share devices with this one: it
/// wins them.
fn older_overlapping(rollouts: &Store<ModelRollout>, r: &ModelRollout) -> Option<String> {
    rollouts
        .state()
        .into_iter()
        .filter(|o| o.spec.model == r.spec.model && key(o.as_ref()) != key(r))
        .filter(|o| o.metadata.creation_timestamp < r.metadata.creation_timestamp)
        .find(|o| o.spec.selector.may_overlap(&r.spec.selector))
        .map(|o| key(o.as_ref()))
}

fn rollout_conditions<'a>(
    r: &ModelRollout,
    tr: &'a Transition,
    version: &Availability,
    conflict: Option<String>,
) -> Vec<Cond<'a>> {
    let s = &tr.state;
    let phase = s.phase.unwrap_or(Phase::Progressing);
    let healthy = s.failure.is_none()
        && s.last_analysis
            .as_ref()
            .is_none_or(|a| a.verdict != Verdict::Fail);
    let wanted = &r.spec.strategy.version;
    let ns = r.namespace().unwrap_or_default();
    let mut out = vec![
        Cond {
            type_: condition::READY,
            ok: phase == Phase::Succeeded && healthy,
            reason: phase.as_str(),
            message: if phase == Phase::Succeeded {
                format!("{wanted} is the stable version of the segment")
            } else {
                s.message.clone().unwrap_or_default()
            },
        },
        Cond {
            type_: condition::PROGRESSING,
            ok: phase.in_flight(),
            reason: phase.as_str(),
            message: s.message.clone().unwrap_or_default(),
        },
        Cond {
            type_: condition::HEALTHY,
            ok: healthy,
            reason: if healthy { "GatesPassing" } else { "Failed" },
            message: s.failure.clone().unwrap_or_default(),
        },
        match version {
            Availability::Ready => Cond {
                type_: condition::VERSION_READY,
                ok: true,
                reason: "ModelVersionReady",
                message: format!("the ModelVersion of {} {wanted} is Ready", r.spec.model),
            },
            other => Cond {
                type_: condition::VERSION_READY,
                ok: false,
                reason: tr
                    .version_blocker
                    .as_ref()
                    .map_or("ModelVersionNotReady", |b| b.reason),
                message: match other {
                    Availability::Missing => format!(
                        "no ModelVersion in namespace {ns} has spec.model {} and spec.version {wanted}; publish one",
                        r.spec.model
                    ),
                    _ => other.problem(wanted).unwrap_or_default(),
                },
            },
        },
        match &tr.device_blocker {
            Some(b) => Cond {
                type_: condition::DEVICES_AVAILABLE,
                ok: false,
                reason: b.reason,
                message: b.message.clone(),
            },
            None => Cond {
                type_: condition::DEVICES_AVAILABLE,
                ok: true,
                reason: "DevicesTargeted",
                message: String::new(),
            },
        },
        match conflict {
            Some(other) => Cond {
                type_: condition::CONFLICT,
                ok: true,
                reason: "OverlappingSelector",
                message: format!(
                    "{other} is older and selects some of the same devices; it wins them"
                ),
            },
            None => Cond {
                type_: condition::CONFLICT,
                ok: false,
                reason: "NoOverlap",
                message: String::new(),
            },
        },
    ];
    if let Some(c) = &s.last_command {
        out.push(Cond {
            type_: condition::LAST_COMMAND,
            ok: c.applied,
            reason: if c.applied { "Applied" } else { "Refused" },
            message: format!("{} (request {}): {}", c.command, c.request, c.message),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ModelVersionStatus, VariantStatus};

    fn ready(signed: &[Option<&str>]) -> ModelVersion {
        let mut mv = ModelVersion::new(
            "m-1.0.0",
            serde_json::from_value(serde_json::json!({
                "model": "m", "version": "1.0.0", "variants": []
            }))
            .expect("spec"),
        );
        mv.status = Some(ModelVersionStatus {
            phase: Some(ModelVersionPhase::Ready),
            variants: signed
                .iter()
                .enumerate()
                .map(|(i, by)| VariantStatus {
                    name: format!("v{i}"),
                    verified: true,
                    message: None,
                    signed_by: by.map(str::to_owned),
                })
                .collect(),
            ..ModelVersionStatus::default()
        });
        mv
    }

    #[test]
    fn a_rollout_requiring_signatures_waits_for_every_variant_to_be_signed() {
        let half = ready(&[Some("acme"), None]);
        assert_eq!(availability(Some(&half), false), Availability::Ready);
        let Availability::Failed(why) = availability(Some(&half), true) else {
            panic!("an unsigned variant passed requireSigned");
        };
        assert!(why.contains("requireSigned") && why.contains("v1"), "{why}");
        let all = ready(&[Some("acme"), Some("acme")]);
        assert_eq!(availability(Some(&all), true), Availability::Ready);
    }
}
