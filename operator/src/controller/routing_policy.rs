//! RoutingPolicy: compile with core, publish the content hash, count acks and NACKs.

use std::sync::Arc;
use std::time::Duration;

use edgewise_core::policy::{compile, policy_version};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::json;

use super::{Context, Error};
use crate::crd::RoutingPolicy;

use super::condition;

pub(super) async fn reconcile(rp: Arc<RoutingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rp.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<RoutingPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = rp.metadata.generation;
    let version = policy_version(&rp.spec.policy);
    let compiled = compile(&rp.spec.policy);
    let accepted = match &compiled {
        Ok(_) => condition(
            "Accepted",
            true,
            "Compiled",
            "the policy compiles",
            generation,
        ),
        Err(e) => condition("Accepted", false, "Invalid", &e.to_string(), generation),
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
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
        .map(|c| c.status == "True");
    let now_accepted = compiled.is_ok();
    if was_accepted != Some(now_accepted) {
        match &compiled {
            Ok(p) => {
                ctx.event(
                    rp.as_ref(),
                    "PolicyCompiled",
                    format!("version {version}, {} rules", p.rule_count()),
                    false,
                )
                .await
            }
            Err(e) => {
                ctx.event(rp.as_ref(), "PolicyInvalid", e.to_string(), true)
                    .await
            }
        }
    }
    let status = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy",
        "status": {
            "observedGeneration": generation,
            "version": version,
            "rules": rp.spec.policy.rules.len(),
            "devices": {"targeted": acked + rejected, "acked": acked, "rejected": rejected},
            "lastRejections": reasons,
            "conditions": [accepted],
        }
    });
    super::apply_status(&api, &rp.name_any(), rp.status.as_ref(), status).await?;
    // Ack counts change without the object changing: look again.
    Ok(Action::requeue(Duration::from_secs(10)))
}
