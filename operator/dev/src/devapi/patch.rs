//! PATCH in the three forms a custom resource takes: JSON patch, JSON merge patch and
//! server-side apply (simplified: the applied fields are merged in, creating the object when
//! absent, without field ownership). Strategic merge patch is refused on custom resources
//! with `415`, as a real API server refuses it (kubectl then falls back to a merge patch);
//! on the built-in kinds kept here (no lists merged by key) it is applied as a merge patch.

use std::collections::BTreeMap;

use axum::body::Bytes;
use serde_json::{Value, json};

use super::error::ApiError;
use super::objects::{WriteOptions, Written};
use super::{Api, Target};

const APPLY: &str = "application/apply-patch";
const STRATEGIC: &str = "application/strategic-merge-patch+json";

/// Apply patches carry `null` for fields the applier leaves alone.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

impl Api {
    pub(super) fn patch(
        &self,
        t: &Target<'_>,
        name: &str,
        content_type: &str,
        body: &Bytes,
        q: &BTreeMap<String, String>,
        opts: WriteOptions,
    ) -> Result<Written, ApiError> {
        let r = t.resource;
        let existing = self
            .store()?
            .get(&r.key(), &t.namespace, name)
            .cloned()
            .map(|o| r.show(o));
        if r.is_custom() && content_type.starts_with(STRATEGIC) {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/apply-patch+cbor (got {STRATEGIC})"
            )));
        }
        let mut obj = match (&existing, content_type) {
            (_, ct) if ct.starts_with(APPLY) => {
                if q.get("fieldManager").is_none_or(String::is_empty) {
                    return Err(ApiError::invalid(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        json!({}),
                    ));
                }
                let applied: Value = serde_yaml_ng::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("apply patch is not YAML or JSON: {e}"))
                })?;
                match existing.clone() {
                    // Server-side apply creates what does not exist.
                    None if t.subresource.is_none() => {
                        let mut create = applied;
                        create["metadata"]["name"] = json!(name);
                        return self.create(t, create, opts);
                    }
                    None => return Err(ApiError::not_found(r, name)),
                    Some(mut cur) => {
                        json_patch::merge(&mut cur, &strip_nulls(applied));
                        cur
                    }
                }
            }
            (None, _) => return Err(ApiError::not_found(r, name)),
            (Some(cur), ct) if ct.starts_with("application/json-patch+json") => {
                let ops: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                let mut doc = cur.clone();
                json_patch::patch(&mut doc, &ops).map_err(|e| {
                    ApiError::invalid(format!("the JSON patch does not apply: {e}"), json!({}))
                })?;
                doc
            }
            (Some(cur), ct)
                if ct.starts_with("application/merge-patch+json") || ct.starts_with(STRATEGIC) =>
            {
                let p: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid merge patch: {e}")))?;
                let mut doc = cur.clone();
                json_patch::merge(&mut doc, &p);
                doc
            }
            (Some(_), ct) => {
                return Err(ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})"
                )));
            }
        };
        // A patch that names a resourceVersion must match it (optimistic concurrency).
        let stale = |want: &str| {
            existing
                .as_ref()
                .and_then(|e| e["metadata"]["resourceVersion"].as_str())
                .is_some_and(|cur| cur != want)
        };
        if !content_type.starts_with(APPLY)
            && obj["metadata"]["resourceVersion"]
                .as_str()
                .is_some_and(stale)
        {
            return Err(ApiError::conflict(r, name));
        }
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.update(t, name, obj, true, opts)
    }
}
