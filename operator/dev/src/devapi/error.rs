//! The one error type of the dev API: every failure is answered as a Kubernetes `Status`
//! object with the code, reason and details a real API server sends, so clients (kubectl,
//! kube-rs, client-go) react to it as they would on a cluster.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Resource;

/// A failed request, rendered as a `Status` (`kind: Status`, `status: Failure`).
#[derive(Debug)]
pub(super) struct ApiError {
    code: StatusCode,
    /// The `StatusReason` (`NotFound`, `Conflict`, `Invalid`…).
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: String, details: Value) -> Self {
        ApiError {
            code,
            reason,
            message,
            details,
        }
    }

    /// `404` for an object of `r` named `name`.
    pub(super) fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{}.{} \"{name}\" not found", r.plural, r.group),
            json!({"name": name, "group": r.group, "kind": r.plural}),
        )
    }

    /// `404` for a path, group or subresource the server does not serve.
    pub(super) fn no_route(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message.into(), json!({}))
    }

    /// `404` for a namespace that does not exist.
    pub(super) fn namespace_not_found(namespace: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
            json!({"name": namespace, "kind": "namespaces"}),
        )
    }

    /// `403 Forbidden`: creating in a namespace that is being deleted.
    pub(super) fn namespace_terminating(namespace: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "unable to create new content in namespace {namespace} because it is being terminated"
            ),
            json!({"name": namespace, "kind": "namespaces", "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {namespace} is being terminated"), "field": "metadata.namespace"}]}),
        )
    }

    /// `409 AlreadyExists`.
    pub(super) fn already_exists(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{}.{} \"{name}\" already exists", r.plural, r.group),
            json!({"name": name, "group": r.group, "kind": r.plural}),
        )
    }

    /// `409 Conflict`: a stale `resourceVersion`.
    pub(super) fn conflict(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                r.plural, r.group
            ),
            json!({"name": name, "group": r.group, "kind": r.plural}),
        )
    }

    /// `422 Invalid` with the details (`causes`, each naming a field) an admission failure
    /// carries.
    pub(super) fn invalid(message: impl Into<String>, details: Value) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            message.into(),
            details,
        )
    }

    /// `400 BadRequest`.
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            message.into(),
            json!({}),
        )
    }

    /// `405 MethodNotAllowed`.
    pub(super) fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            message.into(),
            json!({}),
        )
    }

    /// `415 UnsupportedMediaType`.
    pub(super) fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            message.into(),
            json!({}),
        )
    }

    /// The `Status` object itself, for a watch's `ERROR` event.
    pub(super) fn to_status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "details": self.details, "code": self.code.as_u16()
        })
    }

    /// `503 ServiceUnavailable`: the endpoint is stopping and its store is closed.
    pub(super) fn stopping() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the dev API is shutting down".to_string(),
            json!({}),
        )
    }

    /// `410 Expired`: a watch asked to resume from a version the log no longer holds.
    pub(super) fn expired(rv: u64, oldest: u64) -> Self {
        Self::new(
            StatusCode::GONE,
            "Expired",
            format!("too old resource version: {rv} ({oldest})"),
            json!({}),
        )
    }
}

impl From<super::store::Error> for ApiError {
    fn from(e: super::store::Error) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
            json!({}),
        )
    }
}

impl From<super::selectors::SelectorError> for ApiError {
    fn from(e: super::selectors::SelectorError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_status();
        (
            self.code,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// A JSON body with `code`.
pub(super) fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// What every handler returns.
pub(super) type ApiResult = Result<Response, ApiError>;
