//! The three Edgewise custom resources (`edgewise.dev/v1alpha1`) and their CRD manifests.
//!
//! Spec fields shared with devices and the step machine are `edgewise-core` types,
//! flattened in, so the CRD schema, the wire form and the pure logic cannot drift apart.

mod model_rollout;
mod model_version;
pub mod names;
mod routing_policy;

pub use model_rollout::{
    DeviceCounts, ModelRollout, ModelRolloutSpec, ModelRolloutStatus, SkewEntry,
};
pub use model_version::{
    Deprecation, ModelVersion, ModelVersionPhase, ModelVersionSpec, ModelVersionStatus,
    VariantStatus,
};
pub use routing_policy::{
    PolicyDeviceCounts, RoutingPolicy, RoutingPolicySpec, RoutingPolicyStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every Edgewise resource.
pub const GROUP: &str = "edgewise.dev";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// Every CRD, in the order `edgewise-operator crds` prints them.
#[must_use]
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        ModelRollout::crd(),
        ModelVersion::crd(),
        RoutingPolicy::crd(),
    ]
}

/// The CRDs as multi-document YAML, exactly as `crds/` holds them.
///
/// # Errors
/// Only if serialisation fails, which a derived CRD cannot make happen.
pub fn to_yaml(crds: &[CustomResourceDefinition]) -> Result<String, serde_yaml_ng::Error> {
    crds.iter()
        .map(|crd| serde_yaml_ng::to_string(crd).map(|doc| format!("---\n{doc}")))
        .collect()
}

/// File name of a CRD in `crds/`: `<plural>.<group>.yaml`.
#[must_use]
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}
