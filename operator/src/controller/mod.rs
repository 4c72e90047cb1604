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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    if status::is_conflict(error) {
        // The object changed since it was read: look again at once, on the fresh copy.
        tracing::debug!(%error, "stale object; reconciling again");
        return Action::requeue(Duration::from_millis(100));
    }
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
    );
    // A rollout waiting for its ModelVersion moves as soon as it is verified.
    let rollouts = mro.store();
    let mro = mro
        .watches(
            Api::<ModelVersion>::all(client.clone()),
            watcher::Config::default(),
            move |mv: ModelVersion| {
                let ns = mv.namespace();
                rollouts
                    .state()
                    .into_iter()
                    .filter(|r| r.namespace() == ns && r.spec.model == mv.spec.model)
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            },
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
