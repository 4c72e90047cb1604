//! Admission checks as an API server runs them for a CRD: the OpenAPI v3 schema (types,
//! required fields, enums, bounds, patterns) and then the CEL rules
//! (`x-kubernetes-validations`), including transition rules against the old object.
//!
//! Used by the tests to check `examples/` and, in the dev API endpoint, to reject what a real
//! cluster would reject, with the same field paths.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// A rejected field, as a `Status` cause would name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Kubernetes field path, e.g. `spec.steps[1].setPercent`.
    pub field: String,
    /// Why it was rejected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A CRD that cannot be turned into a validator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD has no served version with a schema.
    #[error("CRD {0} has no openAPIV3Schema")]
    NoSchema(String),
    /// The schema itself is not valid JSON Schema.
    #[error("CRD {crd} schema does not compile: {message}")]
    BadSchema {
        /// CRD name.
        crd: String,
        /// What the compiler said.
        message: String,
    },
}

/// Validates objects of one CRD version.
pub struct SchemaValidator {
    structural: jsonschema::Validator,
    cel: kube_cel::Validator,
    rules: kube_cel::CompiledSchema,
}

impl fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaValidator").finish_non_exhaustive()
    }
}

impl SchemaValidator {
    /// Builds the validator for the CRD's first served version.
    ///
    /// # Errors
    /// [`Error`] when the CRD carries no schema or its schema does not compile.
    pub fn for_crd(crd: &CustomResourceDefinition) -> Result<Self, Error> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let schema = crd
            .spec
            .versions
            .iter()
            .find(|v| v.served)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| Error::NoSchema(name.clone()))?;
        let schema = serde_json::to_value(schema).map_err(|e| Error::BadSchema {
            crd: name.clone(),
            message: e.to_string(),
        })?;
        let structural = jsonschema::validator_for(&schema).map_err(|e| Error::BadSchema {
            crd: name.clone(),
            message: e.to_string(),
        })?;
        let rules = kube_cel::compile_schema(&schema);
        Ok(SchemaValidator {
            structural,
            cel: kube_cel::Validator::new(),
            rules,
        })
    }

    /// Checks an object (and, on update, its old version for transition rules).
    ///
    /// CEL rules only run on an object that passed the schema, as in an API server: a rule
    /// over a mistyped field would only add noise.
    ///
    /// # Errors
    /// Every rejected field.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
        let structural: Vec<FieldError> = self
            .structural
            .iter_errors(object)
            .map(|e| FieldError {
                field: field_path(e.instance_path().as_str()),
                message: e.to_string(),
            })
            .collect();
        if !structural.is_empty() {
            return Err(structural);
        }
        self.cel
            .validate_compiled(&self.rules, object, old)
            .map_err(|errors| {
                errors
                    .into_vec()
                    .into_iter()
                    .map(|e| FieldError {
                        field: e.field_path.clone(),
                        message: e.message.clone(),
                    })
                    .collect()
            })
    }
}

/// Fields of `ObjectMeta`: everything else under `metadata` is unknown, as on a cluster.
const OBJECT_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Removes what a structural schema does not declare, as an API server prunes a custom
/// resource, and returns the paths removed (`spec.colour`, `spec.steps[1].pause.x`) for
/// `fieldValidation` to reject or warn about.
pub fn prune(schema: &Value, object: &mut Value) -> Vec<String> {
    let mut removed = Vec::new();
    prune_at(schema, object, "", true, &mut removed);
    removed.sort();
    removed
}

/// The properties a schema declares, including those of `allOf`/`anyOf`/`oneOf` branches
/// (a structural schema repeats them at the top, but a generated one may not).
fn declared(schema: &Value) -> Vec<(&str, &Value)> {
    let mut out: Vec<(&str, &Value)> = schema["properties"]
        .as_object()
        .map(|p| p.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .unwrap_or_default();
    for branch in ["allOf", "anyOf", "oneOf"] {
        for s in schema[branch].as_array().into_iter().flatten() {
            for (k, v) in declared(s) {
                if !out.iter().any(|(known, _)| *known == k) {
                    out.push((k, v));
                }
            }
        }
    }
    out
}

fn prune_at(schema: &Value, value: &mut Value, path: &str, resource: bool, out: &mut Vec<String>) {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::Object(map) => {
            let resource = resource || schema["x-kubernetes-embedded-resource"] == true;
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let props = declared(schema);
            let additional = &schema["additionalProperties"];
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let here = child(&key);
                let Some(v) = map.get_mut(&key) else { continue };
                if resource && (key == "apiVersion" || key == "kind") {
                    continue;
                }
                if resource && key == "metadata" {
                    if let Value::Object(meta) = v {
                        meta.retain(|k, _| {
                            let known = OBJECT_META.contains(&k.as_str());
                            if !known {
                                out.push(format!("{here}.{k}"));
                            }
                            known
                        });
                    }
                    continue;
                }
                if let Some((_, s)) = props.iter().find(|(k, _)| *k == key) {
                    prune_at(s, v, &here, false, out);
                } else if additional.is_object() {
                    prune_at(additional, v, &here, false, out);
                } else if *additional == Value::Bool(true) || preserve {
                    // Declared open: kept as sent.
                } else {
                    map.remove(&key);
                    out.push(here);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune_at(item, v, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        _ => {}
    }
}

/// `/spec/steps/1/setPercent` → `spec.steps[1].setPercent`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_drops_and_names_what_the_schema_does_not_declare() {
        let schema = serde_json::json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "paused": {"type": "boolean"},
                "steps": {"type": "array", "items": {"type": "object", "properties": {"setPercent": {"type": "integer"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "target": {"type": "object", "oneOf": [{"properties": {"device": {"type": "object"}}}]}
            }},
            "status": {"type": "object", "properties": {}}
        }});
        let mut obj = serde_json::json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout",
            "metadata": {"name": "x", "labels": {"a": "b"}, "colour": "red"},
            "spec": {"pasued": true, "paused": false, "colour": "red",
                     "steps": [{"setPercent": 10}, {"setPercent": 20, "pause": {}}],
                     "labels": {"any": "thing"}, "open": {"any": {"deep": 1}},
                     "target": {"device": {}, "cloud": {}}},
            "status": {"x": 1}
        });
        let removed = prune(&schema, &mut obj);
        assert_eq!(
            removed,
            [
                "metadata.colour",
                "spec.colour",
                "spec.pasued",
                "spec.steps[1].pause",
                "spec.target.cloud",
                "status.x"
            ]
        );
        assert_eq!(obj["spec"]["paused"], false);
        assert_eq!(obj["spec"]["labels"]["any"], "thing");
        assert_eq!(obj["spec"]["open"]["any"]["deep"], 1);
        assert!(obj["spec"].get("colour").is_none());
        assert_eq!(obj["metadata"]["labels"]["a"], "b");
        assert!(prune(&schema, &mut obj).is_empty(), "pruning is idempotent");
    }

    #[test]
    fn json_pointers_become_kubernetes_field_paths() {
        assert_eq!(
            field_path("/spec/steps/1/setPercent"),
            "spec.steps[1].setPercent"
        );
        assert_eq!(field_path("/metadata/labels/a~1b"), "metadata.labels.a/b");
        assert_eq!(field_path(""), "");
    }
}
