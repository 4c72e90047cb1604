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
    fn json_pointers_become_kubernetes_field_paths() {
        assert_eq!(
            field_path("/spec/steps/1/setPercent"),
            "spec.steps[1].setPercent"
        );
        assert_eq!(field_path("/metadata/labels/a~1b"), "metadata.labels.a/b");
        assert_eq!(field_path(""), "");
    }
}
