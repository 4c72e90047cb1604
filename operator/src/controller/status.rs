//! Status writes. A controller computes the whole status it wants as a typed value, and it
//! is written only when it differs from what is stored, so a quiet system makes no writes
//! (and no watch events that would wake the controller again).
//!
//! The write is a `PUT …/status` carrying the `resourceVersion` the status was computed
//! from: if the object changed in between (a newer reconcile, a user's command), the API
//! server answers 409 and the reconcile runs again on the fresh object. That precondition is
//! what makes a manual command act once: its handled marker and its effect land together or
//! not at all. Server-side apply would not give it without sending `resourceVersion` too, and
//! a stale apply with `force` silently overwrites newer state.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PostParams};
use kube::core::object::HasStatus;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, instrument};

use super::Error;

/// How long one status write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One condition as a reconciler decides it; [`conditions`] adds the timestamps.
#[derive(Clone, Debug)]
pub(crate) struct Cond<'a> {
    /// `type`.
    pub type_: &'a str,
    /// `status: "True"` when true.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Human-readable message.
    pub message: String,
}

/// Standard conditions; each keeps its `lastTransitionTime` while its status holds.
pub(crate) fn conditions(
    previous: &[Condition],
    wanted: Vec<Cond<'_>>,
    generation: Option<i64>,
) -> Vec<Condition> {
    // Whole seconds, as the API server's metav1.Time stores them.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    wanted
        .into_iter()
        .map(|c| {
            let status = if c.ok { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or(Time(now), |p| p.last_transition_time.clone());
            Condition {
                last_transition_time: since,
                message: c.message,
                observed_generation: generation,
                reason: c.reason.to_owned(),
                status: status.to_owned(),
                type_: c.type_.to_owned(),
            }
        })
        .collect()
}

/// Writes `status` unless the object already has exactly that status. Returns the updated
/// object when it wrote.
///
/// # Errors
/// [`Error::Kube`] (409 Conflict when `obj` is stale: reconcile again on the fresh object),
/// [`Error::Timeout`].
#[instrument(skip_all, fields(kind = %K::kind(&()), name = %obj.name_any()))]
pub(crate) async fn write_status<K>(
    api: &Api<K>,
    obj: &K,
    status: K::Status,
) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = ()>
        + HasStatus
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::Status: PartialEq + Clone,
{
    if obj.status() == Some(&status) {
        return Ok(None);
    }
    let mut updated = obj.clone();
    *updated.status_mut() = Some(status);
    let written = tokio::time::timeout(
        WRITE_TIMEOUT,
        api.replace_status(&obj.name_any(), &PostParams::default(), &updated),
    )
    .await
    .map_err(|_| Error::Timeout("status write"))??;
    debug!(resource_version = ?written.resource_version(), "status written");
    Ok(Some(written))
}

/// Whether `e` is the API server's 409: the object changed since it was read.
pub(crate) fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Kube(kube::Error::Api(s)) if s.code == 409)
}
