//! Reads and writes: get, list, create, replace (object or status) and delete, with the
//! rules an API server enforces on each (names, namespaces, resourceVersion, generation,
//! the status split, finalizers) and admission against the CRD's schema and CEL rules.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, json_response};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::Change;
use super::{Api, Resource, Target};

/// Now, as `metadata.creationTimestamp` spells it.
pub(super) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A random `metadata.uid` in the UUID form.
pub(super) fn uid() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A Namespace object as the API server creates it.
pub(super) fn new_namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": uid(), "creationTimestamp": now()},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    })
}

/// Marks a written CRD established, as a real API server does once it serves it. The dev API
/// serves the Edgewise CRDs from the start, so applying them here (what
/// `edgewise-dev --kubeconfig` and installers do) is accepted and they are ready at once.
fn established(r: &Resource, obj: &mut Value) {
    if r.kind == "CustomResourceDefinition" {
        obj["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
        ]});
    }
}

/// A request body: JSON, or YAML when the content type says so.
pub(super) fn parse_body(body: &Bytes, content_type: &str) -> Result<Value, ApiError> {
    let parsed = if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the body is not a valid object: {e}")))
}

/// The label and field selectors of a list or watch.
pub(super) fn selectors(
    q: &BTreeMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?;
    Ok((labels, fields))
}

impl Api {
    pub(super) fn get(&self, t: &Target<'_>, name: &str, table: bool) -> ApiResult {
        let store = self.store()?;
        let obj = store
            .get(&t.resource.key(), &t.namespace, name)
            .ok_or_else(|| ApiError::not_found(t.resource, name))?;
        let body = if table {
            self.table(t.resource, std::slice::from_ref(obj), store.rv())
        } else {
            obj.clone()
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    pub(super) fn list(
        &self,
        t: &Target<'_>,
        q: &BTreeMap<String, String>,
        table: bool,
    ) -> ApiResult {
        let (labels, fields) = selectors(q)?;
        let store = self.store()?;
        let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
        let items: Vec<Value> = store
            .list(&t.resource.key(), ns)
            .filter(|o| labels.matches(o) && fields.matches(o))
            .cloned()
            .collect();
        let body = if table {
            self.table(t.resource, &items, store.rv())
        } else {
            json!({
                "kind": format!("{}List", t.resource.kind), "apiVersion": t.resource.api_version(),
                "metadata": {"resourceVersion": store.rv().to_string()}, "items": items
            })
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    /// Runs admission (OpenAPI schema, then CEL with `oldSelf` on updates).
    fn admit(r: &Resource, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
        let Some(v) = &r.validator else { return Ok(()) };
        v.validate(obj, old).map_err(|errors| {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let causes: Vec<Value> = errors
                .iter()
                .map(|e| json!({"reason": "FieldValueInvalid", "message": e.message, "field": e.field}))
                .collect();
            let summary: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ApiError::invalid(
                format!("{}.{} \"{name}\" is invalid: {}", r.kind, r.group, summary.join(", ")),
                json!({"name": name, "group": r.group, "kind": r.kind, "causes": causes}),
            )
        })
    }

    pub(super) fn create(&self, t: &Target<'_>, mut obj: Value) -> ApiResult {
        let r = t.resource;
        if obj["kind"].as_str().is_some_and(|k| k != r.kind) {
            return Err(ApiError::bad_request(format!(
                "kind {} does not match {}",
                obj["kind"], r.kind
            )));
        }
        obj["kind"] = json!(r.kind);
        obj["apiVersion"] = json!(r.api_version());
        if obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            let Some(prefix) = obj["metadata"]["generateName"].as_str() else {
                return Err(ApiError::invalid(
                    "metadata.name: Required value: name or generateName is required",
                    json!({}),
                ));
            };
            obj["metadata"]["name"] = json!(format!("{prefix}{}", &uid()[..5]));
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if r.namespaced {
            match obj["metadata"]["namespace"].as_str() {
                Some(ns) if ns != t.namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the object does not match the namespace on the request",
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(t.namespace),
            }
        }
        obj["metadata"]["uid"] = json!(uid());
        obj["metadata"]["creationTimestamp"] = json!(now());
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
        }
        if r.status {
            obj["metadata"]["generation"] = json!(1);
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        established(r, &mut obj);
        Self::admit(r, &obj, None)?;
        let mut store = self.store()?;
        if r.namespaced && store.get("/v1/namespaces", "", &t.namespace).is_none() {
            return Err(ApiError::namespace_not_found(&t.namespace));
        }
        if store.get(&r.key(), &t.namespace, &name).is_some() {
            return Err(ApiError::already_exists(r, &name));
        }
        let created = store.write(&r.key(), &t.namespace, &name, obj, Change::Added)?;
        Ok(json_response(StatusCode::CREATED, &created))
    }

    /// Replaces an object (or its status), enforcing resourceVersion, generation and the
    /// status-subresource split.
    pub(super) fn update(
        &self,
        t: &Target<'_>,
        name: &str,
        obj: Value,
        from_patch: bool,
    ) -> ApiResult {
        let r = t.resource;
        let mut store = self.store()?;
        let Some(old) = store.get(&r.key(), &t.namespace, name).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            && !from_patch
        {
            return Err(ApiError::conflict(r, name));
        }
        let status_only = t.subresource.as_deref() == Some("status");
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = obj["status"].clone();
            n
        } else {
            let mut n = obj;
            if r.status {
                n["status"] = old["status"].clone();
                if n["status"].is_null()
                    && let Some(o) = n.as_object_mut()
                {
                    o.remove("status");
                }
            }
            n
        };
        new["kind"] = json!(r.kind);
        new["apiVersion"] = json!(r.api_version());
        for keep in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
        ] {
            if old["metadata"][keep].is_null() {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(keep);
                }
            } else {
                new["metadata"][keep] = old["metadata"][keep].clone();
            }
        }
        if r.status {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = new["spec"] != old["spec"];
            new["metadata"]["generation"] =
                json!(if changed { generation + 1 } else { generation });
        }
        established(r, &mut new);
        Self::admit(r, &new, Some(&old))?;
        let finalized = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        let change = if finalized {
            Change::Deleted
        } else {
            Change::Modified
        };
        let written = store.write(&r.key(), &t.namespace, name, new, change)?;
        Ok(json_response(StatusCode::OK, &written))
    }

    /// Deletes an object, or marks it for deletion while finalizers remain.
    pub(super) fn delete(&self, t: &Target<'_>, name: &str) -> ApiResult {
        let r = t.resource;
        let mut store = self.store()?;
        let Some(mut obj) = store.get(&r.key(), &t.namespace, name).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
            && r.kind != "Namespace";
        let change = if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
            }
            Change::Modified
        } else {
            Change::Deleted
        };
        let written = store.write(&r.key(), &t.namespace, name, obj, change)?;
        Ok(json_response(StatusCode::OK, &written))
    }
}
