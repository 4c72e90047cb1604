//! The controllers: ModelVersion (verify artifacts in S3), RoutingPolicy (compile, content
//! hash, ack counts) and ModelRollout (drive the step machine on telemetry), plus the
//! reflectors that feed the gateway's desired state and Lease-based leader election.
//!
//! Reconcilers are idempotent; status is written by server-side apply with one field
//! manager; every user-visible transition is a Kubernetes Event.

pub mod leader;
mod model_rollout;
mod model_version;
mod reflect;
mod routing_policy;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use reflect::feed_gateway;

use crate::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use crate::gateway::Gateway;

/// Field manager for every status write.
pub const MANAGER: &str = "edgewise-controller";

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// ClickHouse.
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// An object without the metadata a reconciler needs.
    #[error("object has no {0}")]
    Metadata(&'static str),
}

/// What every reconciler shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// S3 client for artifact verification.
    pub s3: aws_sdk_s3::Client,
    /// ClickHouse client for gate metrics and device counts, if configured.
    pub clickhouse: Option<clickhouse::Client>,
    /// The in-process gateway, for assignment progress and ack counts, if any.
    pub gateway: Option<Gateway>,
    /// Publishes Events.
    pub recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client`.
    #[must_use]
    pub fn new(
        client: Client,
        s3: aws_sdk_s3::Client,
        clickhouse: Option<clickhouse::Client>,
        gateway: Option<Gateway>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("HOSTNAME").ok(),
            },
        );
        Context {
            client,
            s3,
            clickhouse,
            gateway,
            recorder,
        }
    }

    /// Records an Event on `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        reason: &str,
        note: String,
        warning: bool,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "publishing an event");
        }
    }
}

fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the three controllers until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let mv = Controller::new(
        Api::<ModelVersion>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(model_version::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "ModelVersion reconcile");
        }
    });
    let rp = Controller::new(
        Api::<RoutingPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(routing_policy::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "RoutingPolicy reconcile");
        }
    });
    let mro = Controller::new(
        Api::<ModelRollout>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(model_rollout::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "ModelRollout reconcile");
        }
    });
    info!("controllers running");
    tokio::join!(mv, rp, mro);
}

/// `namespace/name` of an object.
pub(crate) fn key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// A standard condition; `lastTransitionTime` is filled in by [`apply_status`].
pub(crate) fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> serde_json::Value {
    serde_json::json!({
        "type": type_, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message,
        "observedGeneration": generation,
    })
}

/// Writes `desired` (`{apiVersion, kind, status}`) by server-side apply, unless the
/// object's status already says the same: an unchanged status must not trigger another
/// reconcile. Conditions keep their `lastTransitionTime` while their status holds.
pub(crate) async fn apply_status<K, S>(
    api: &kube::Api<K>,
    name: &str,
    current: Option<&S>,
    mut desired: serde_json::Value,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let current = current
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or(serde_json::Value::Null);
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    if let Some(conds) = desired["status"]["conditions"].as_array_mut() {
        for c in conds {
            let previous = current["conditions"]
                .as_array()
                .and_then(|cs| {
                    cs.iter()
                        .find(|p| p["type"] == c["type"] && p["status"] == c["status"])
                })
                .and_then(|p| p["lastTransitionTime"].as_str().map(str::to_owned));
            c["lastTransitionTime"] = serde_json::json!(previous.unwrap_or_else(|| now.clone()));
        }
    }
    let mut merged = current.clone();
    json_patch::merge(&mut merged, &desired["status"]);
    if merged == current && !current.is_null() {
        return Ok(());
    }
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(MANAGER).force(),
        &kube::api::Patch::Apply(&desired),
    )
    .await?;
    Ok(())
}
