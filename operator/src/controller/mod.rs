//! The controllers: ModelVersion (verify artifacts in S3), RoutingPolicy (compile, content
//! hash, ack counts) and ModelRollout (drive the step machine on telemetry), plus the
//! reflectors that feed the gateway's desired state and Lease-based leader election.
//!
//! Reconcilers are idempotent and compute the whole status they want; it is written only
//! when it changed, with the resourceVersion it was computed from ([`status`]); every
//! user-visible transition is a Kubernetes Event, published once its status is stored.

pub mod leader;
mod model_rollout;
mod model_version;
mod reflect;
mod routing_policy;
mod segment;
mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub use reflect::feed_gateway;

use crate::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use crate::gateway::Gateway;

/// The controllers' name as Events report it.
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
    /// A call that took too long.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// A reflector store's writer is gone (the controllers are stopping).
    #[error("the {0} store stopped")]
    StoreStopped(&'static str),
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
    /// A context for `client`; `instance` names this replica in the Events it records
    /// (the controller's `--identity`).
    #[must_use]
    pub fn new(
        client: Client,
        s3: aws_sdk_s3::Client,
        clickhouse: Option<clickhouse::Client>,
        gateway: Option<Gateway>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance,
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

fn error_policy<K, C>(_obj: Arc<K>, error: &Error, _ctx: Arc<C>) -> Action {
    if status::is_conflict(error) {
        // The object changed since it was read: look again at once, on the fresh copy.
        tracing::debug!(%error, "stale object; reconciling again");
        return Action::requeue(Duration::from_millis(100));
    }
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs one controller until `shutdown`, in a span naming its kind; every reconcile runs
/// in its own span (the reconcilers' `#[instrument]`) naming the object.
async fn drive<K, C, R, Fut>(
    controller: Controller<K>,
    reconcile: R,
    ctx: Arc<C>,
    shutdown: &CancellationToken,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    C: Send + Sync + 'static,
    R: FnMut(Arc<K>, Arc<C>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let kind = K::kind(&()).into_owned();
    controller
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .instrument(info_span!("controller", kind = %kind))
        .await;
}

/// Runs the three controllers until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let all = watcher::Config::default;
    let mv = Controller::new(Api::<ModelVersion>::all(client.clone()), all());
    let rp = Controller::new(Api::<RoutingPolicy>::all(client.clone()), all());
    let mro = Controller::new(Api::<ModelRollout>::all(client.clone()), all());
    // The rollouts read ModelVersions from this reflector, and every change to one
    // re-reconciles them: the store holds the change before the trigger fires, so a rollout
    // waiting for its version moves as soon as it is verified.
    let (versions, writer) = reflector::store::<ModelVersion>();
    let version_changes = reflector(
        writer,
        watcher(Api::<ModelVersion>::all(client.clone()), all()),
    )
    .touched_objects()
    .filter_map(|e| async move { e.ok().map(|_| ()) });
    let rollouts = Arc::new(model_rollout::RolloutContext {
        base: ctx.clone(),
        versions,
        rollouts: mro.store(),
    });
    let mro = mro.reconcile_all_on(version_changes);
    info!("controllers running");
    tokio::join!(
        drive(mv, model_version::reconcile, ctx.clone(), &shutdown),
        drive(rp, routing_policy::reconcile, ctx.clone(), &shutdown),
        drive(mro, model_rollout::reconcile, rollouts, &shutdown),
    );
}

/// `namespace/name` of an object.
pub(crate) fn key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}
