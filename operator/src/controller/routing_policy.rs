//! RoutingPolicy: compile with core, publish the content hash, count acks and NACKs.

use std::sync::Arc;
use std::time::Duration;

use edgewise_core::policy::{compile, policy_version};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use tracing::instrument;

use super::status::{Cond, conditions, write_status};
use super::{Context, Error};
use crate::crd::names::condition;
use crate::crd::{PolicyDeviceCounts, RoutingPolicy, RoutingPolicyStatus};

#[instrument(skip_all, fields(routing_policy = %super::key(rp.as_ref())))]
pub(super) async fn reconcile(rp: Arc<RoutingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rp.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<RoutingPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = rp.metadata.generation;
    let version = policy_version(&rp.spec.policy);
    let compiled = compile(&rp.spec.policy);
    let accepted = match &compiled {
        Ok(_) => Cond {
            type_: condition::ACCEPTED,
            ok: true,
            reason: "Compiled",
            message: "the policy compiles".into(),
        },
        Err(e) => Cond {
            type_: condition::ACCEPTED,
            ok: false,
            reason: "Invalid",
            message: e.to_string(),
        },
    };
    let warnings: Vec<String> = edgewise_core::policy::lint(&rp.spec.policy)
        .iter()
        .map(ToString::to_string)
        .collect();
    // Ready is Accepted under the name every kind shares.
    let ready = Cond {
        type_: condition::READY,
        ..accepted.clone()
    };
    let (mut acked, mut rejected, mut reasons) = (0u64, 0u64, Vec::new());
    // A controller without an in-process gateway (the `controller` role) counts acks from
    // the devices' latest status in ClickHouse; NACK reasons need the gateway's view.
    if ctx.gateway.is_none()
        && let Some(ch) = &ctx.clickhouse
    {
        acked = crate::telemetry::gates::policy_acks(ch, &version).await?;
    }
    if let Some(gw) = &ctx.gateway {
        for d in gw.registry().devices() {
            if d.policy.running.as_deref() == Some(version.as_str()) {
                acked += 1;
            }
            if let Some((v, why)) = &d.policy.rejected
                && *v == version
            {
                rejected += 1;
                if reasons.len() < 5 {
                    reasons.push(format!("{}: {why}", d.device_id));
                }
            }
        }
    }
    let was_accepted = rp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::ACCEPTED))
        .map(|c| c.status == "True");
    let now_accepted = compiled.is_ok();
    let announce = (was_accepted != Some(now_accepted)).then(|| match &compiled {
        Ok(p) => (
            "PolicyCompiled",
            format!("version {version}, {} rules", p.rule_count()),
            false,
        ),
        Err(e) => ("PolicyInvalid", e.to_string(), true),
    });
    let previous = rp.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let status = RoutingPolicyStatus {
        observed_generation: generation,
        version: Some(version),
        rules: Some(rp.spec.policy.rules.len() as u32),
        devices: PolicyDeviceCounts {
            targeted: acked + rejected,
            acked,
            rejected,
        },
        last_rejections: reasons,
        warning_count: u32::try_from(warnings.len()).unwrap_or(u32::MAX),
        conditions: conditions(
            previous,
            vec![
                ready,
                accepted,
                Cond {
                    type_: condition::POLICY_WARNINGS,
                    ok: !warnings.is_empty(),
                    reason: if warnings.is_empty() {
                        "NoWarnings"
                    } else {
                        "MayNotDoWhatItSays"
                    },
                    message: warnings.join("; "),
                },
            ],
            generation,
        ),
        warnings,
    };
    if write_status(&api, rp.as_ref(), status).await?.is_some()
        && let Some((reason, note, warning)) = announce
    {
        ctx.event(rp.as_ref(), reason, note, warning).await;
    }
    // Ack counts change without the object changing: look again.
    Ok(Action::requeue(Duration::from_secs(10)))
}
