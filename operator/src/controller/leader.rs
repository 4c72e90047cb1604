//! Leader election on a `coordination.k8s.io/v1` Lease: one controller writes at a time.
//! The holder renews every `renew`; a Lease not renewed within its duration may be taken.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This candidate's identity.
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
    /// How often the holder renews (and others check).
    pub renew: Duration,
}

fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Campaigns until `shutdown`; the receiver says whether this candidate leads now.
pub fn campaign(
    client: Client,
    config: LeaseConfig,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        loop {
            let leading = match try_acquire(&api, &config).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "lease");
                    false
                }
            };
            if *tx.borrow() != leading {
                info!(identity = %config.identity, leading, "leadership changed");
            }
            tx.send_replace(leading);
            tokio::select! {
                () = shutdown.cancelled() => {
                    if leading {
                        // Step down so another candidate need not wait out the lease.
                        let release = json!({"spec": {"holderIdentity": null}});
                        let _ = api.patch(&config.name, &PatchParams::default(), &Patch::Merge(&release)).await;
                    }
                    tx.send_replace(false);
                    return;
                }
                () = tokio::time::sleep(config.renew) => {}
            }
        }
    });
    rx
}

async fn try_acquire(api: &Api<Lease>, c: &LeaseConfig) -> Result<bool, kube::Error> {
    let secs = i32::try_from(c.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(lease) = api.get_opt(&c.name).await? else {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": c.name},
            "spec": {"holderIdentity": c.identity, "leaseDurationSeconds": secs, "acquireTime": micro_now(), "renewTime": micro_now(), "leaseTransitions": 0}
        }))
        .map_err(kube::Error::SerdeError)?;
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    let expired = spec.renew_time.is_none_or(|t| {
        let age = jiff::Timestamp::now().as_second() - t.0.as_second();
        age > i64::from(spec.lease_duration_seconds.unwrap_or(secs))
    });
    if holder != c.identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != c.identity);
    // The resourceVersion makes the takeover atomic: a concurrent candidate gets a conflict.
    let update = json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": c.identity, "leaseDurationSeconds": secs, "renewTime": micro_now(), "leaseTransitions": transitions}
    });
    match api
        .patch(&c.name, &PatchParams::default(), &Patch::Merge(&update))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
