//! Leader election on a `coordination.k8s.io/v1` Lease: one controller writes at a time.
//!
//! As client-go does it: the holder renews every `renew`; another candidate takes the Lease
//! once it has seen the same record (holder, renew time, resource version) unchanged for
//! the lease duration **by its own monotonic clock**, never by comparing the holder's
//! timestamps with its own wall clock, so clocks that disagree cannot make two leaders.
//! Each attempt is bounded by the renew deadline (two thirds of the duration), and a leader
//! that has not renewed within it stops leading before anyone else may take over.

use std::time::{Duration, Instant};

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
    /// This candidate's wall clock, for the times it writes (`jiff::Timestamp::now`; a
    /// skewed one in tests). Expiry is never judged by it.
    pub wall_clock: fn() -> jiff::Timestamp,
}

impl LeaseConfig {
    /// How long a leader may go without a successful renewal before it stops leading:
    /// two thirds of the duration, so it steps down before a candidate may take over.
    #[must_use]
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    fn micro_now(&self) -> String {
        (self.wall_clock)()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    }
}

/// The Lease as last seen, and when (by this process's monotonic clock).
#[derive(Debug)]
struct Observed {
    record: (String, Option<String>, Option<String>),
    at: Instant,
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
        let mut observed: Option<Observed> = None;
        let mut renewed: Option<Instant> = None;
        loop {
            let attempt = tokio::time::timeout(
                config.renew_deadline(),
                try_acquire(&api, &config, &mut observed),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => renewed = Some(Instant::now()),
                Ok(Ok(false)) => renewed = None,
                Ok(Err(e)) => warn!(error = %e, "lease"),
                Err(_) => warn!(deadline = ?config.renew_deadline(), "lease renewal timed out"),
            }
            // A failed or slow renewal keeps leadership only within the renew deadline of
            // the last success: past it another candidate may soon take the Lease.
            let leading = renewed.is_some_and(|t| t.elapsed() < config.renew_deadline());
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

async fn try_acquire(
    api: &Api<Lease>,
    c: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let secs = i32::try_from(c.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(lease) = api.get_opt(&c.name).await? else {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": c.name},
            "spec": {"holderIdentity": c.identity, "leaseDurationSeconds": secs, "acquireTime": c.micro_now(), "renewTime": c.micro_now(), "leaseTransitions": 0}
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
    let record = (
        holder.clone(),
        spec.renew_time.as_ref().map(|t| t.0.to_string()),
        lease.metadata.resource_version.clone(),
    );
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            at: Instant::now(),
        });
    }
    let duration = Duration::from_secs(
        u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
    );
    // Unchanged for a whole duration as this process measures time: the holder is gone.
    let expired = observed.as_ref().is_some_and(|o| o.at.elapsed() > duration);
    if holder != c.identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != c.identity);
    // The resourceVersion makes the takeover atomic: a concurrent candidate gets a conflict.
    let update = json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": c.identity, "leaseDurationSeconds": secs, "renewTime": c.micro_now(), "leaseTransitions": transitions}
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
