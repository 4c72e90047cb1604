//! `RoutingPolicy` (`rp`): where each request runs, pushed to every matching device.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selector, priority, targets, rules, default, budgets and shadow traffic. The fields are
/// `edgewise-core`'s policy spec, which is also the wire form devices compile.
// Each printcolumn(...) repeats keys like `type_ = "string"`, which this lint misreads.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "edgewise.dev",
    version = "v1alpha1",
    kind = "RoutingPolicy",
    namespaced,
    shortname = "rp",
    category = "edgewise",
    category = "all",
    status = "RoutingPolicyStatus",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "Acked", type_ = "integer", json_path = ".status.devices.acked"),
    printcolumn(
        name = "Rejected",
        type_ = "integer",
        json_path = ".status.devices.rejected"
    ),
    printcolumn(
        name = "Warnings",
        type_ = "integer",
        json_path = ".status.warningCount"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RoutingPolicySpec {
    /// The policy itself.
    #[serde(flatten)]
    pub policy: edgewise_core::policy::spec::RoutingPolicySpec,
}

/// Observed state of a routing policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingPolicyStatus {
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Content hash of the compiled policy, as devices report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Number of rules, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
    /// Devices that acked or rejected this version.
    #[serde(default)]
    pub devices: PolicyDeviceCounts,
    /// Most recent NACK reasons, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_rejections: Vec<String>,
    /// What the policy may do that its author did not mean (`rules[0]: can send dataClass
    /// "private" requests to the cloud…`, rules that never match); it is pushed anyway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How many warnings (a printer column).
    #[serde(default)]
    pub warning_count: u32,
    /// Standard conditions: `Accepted` (compiles), `Conflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Ack counts of the current policy version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDeviceCounts {
    /// Devices the selector matches and this policy wins for.
    pub targeted: u64,
    /// Devices running this version.
    pub acked: u64,
    /// Devices that NACKed it (and keep their previous policy).
    pub rejected: u64,
}
