//! `ModelVersion` (`mv`): one immutable model release with its variants.

use edgewise_core::variant::Variant;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One model release. Everything but `deprecated` is immutable once created: publish a new
/// version instead of editing one that devices may already run.
// Each printcolumn(...) repeats keys like `type_ = "string"`, which this lint misreads.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "edgewise.dev",
    version = "v1alpha1",
    kind = "ModelVersion",
    namespaced,
    shortname = "mv",
    category = "edgewise",
    category = "all",
    status = "ModelVersionStatus",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Verified",
        type_ = "string",
        json_path = ".status.verified",
        description = "variants verified / variants"
    ),
    printcolumn(
        name = "Devices",
        type_ = "integer",
        json_path = ".status.devices",
        description = "devices running this version"
    ),
    printcolumn(
        name = "Deprecated",
        type_ = "string",
        json_path = ".spec.deprecated.removeAfter"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.model == oldSelf.model && self.version == oldSelf.version && self.variants == oldSelf.variants").message("model, version and variants are immutable; publish a new ModelVersion instead"))]
#[serde(rename_all = "camelCase")]
pub struct ModelVersionSpec {
    /// Model family name, shared by all its versions.
    #[schemars(schema_with = "edgewise_core::names::dns_label_schema")]
    pub model: String,
    /// Semantic version of this release.
    #[schemars(regex(
        pattern = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
    ))]
    pub version: String,
    /// Builds of this version, tried in order: a device gets the first it satisfies.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("variant names must be unique"))]
    pub variants: Vec<Variant>,
    /// Marks a version that must leave the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated: Option<Deprecation>,
}

/// Deprecation of a model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deprecation {
    /// Why, shown to operators.
    #[schemars(length(min = 1))]
    pub reason: String,
    /// Date (YYYY-MM-DD) after which no device should run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub remove_after: Option<String>,
}

/// Verification phase of a model version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ModelVersionPhase {
    /// Not looked at yet.
    Pending,
    /// Artifacts are being checked in S3.
    Verifying,
    /// Every variant verified; devices may be assigned it.
    Ready,
    /// A variant failed verification; see conditions. No device is assigned it.
    Failed,
}

impl ModelVersionPhase {
    /// The name as status and `kubectl get` show it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ModelVersionPhase::Pending => "Pending",
            ModelVersionPhase::Verifying => "Verifying",
            ModelVersionPhase::Ready => "Ready",
            ModelVersionPhase::Failed => "Failed",
        }
    }
}

/// Observed state of a model version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVersionStatus {
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Verification phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelVersionPhase>,
    /// `verified/total` variants, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    /// Per-variant verification results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantStatus>,
    /// Devices running this version (from telemetry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// Standard conditions: `Verified`, `Deprecated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Verification of one variant's artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VariantStatus {
    /// Variant name.
    pub name: String,
    /// Object exists, size and SHA-256 match.
    pub verified: bool,
    /// What was found, e.g. the digest mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The publisher (an entry of the namespace's `edgewise-publishers` ConfigMap) whose
    /// key verified the variant's signature; absent when unsigned or not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}
