//! `ModelRollout` (`mro`): progressive delivery of one model to one device segment.

use edgewise_core::rollout::{RolloutState, RolloutStrategy};
use edgewise_core::selector::DeviceSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One long-lived object per model and segment; changing `version` starts a rollout from
/// `status.stableVersion`.
// Each printcolumn(...) repeats keys like `type_ = "string"`, which this lint misreads.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "edgewise.dev",
    version = "v1alpha1",
    kind = "ModelRollout",
    namespaced,
    shortname = "mro",
    category = "edgewise",
    category = "all",
    status = "ModelRolloutStatus",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableVersion"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canaryVersion"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.stepIndex"),
    printcolumn(
        name = "Percent",
        type_ = "integer",
        json_path = ".status.percent",
        description = "share of the segment assigned spec.version"
    ),
    printcolumn(
        name = "Installed",
        type_ = "integer",
        json_path = ".status.devices.installed"
    ),
    printcolumn(
        name = "Targeted",
        type_ = "integer",
        json_path = ".status.devices.targeted"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.steps.filter(s, has(s.setPercent)).map(s, s.setPercent).isSorted()").message("steps[].setPercent must never decrease").field_path(".steps"))]
#[x_kube(validation = Rule::new("!self.steps.exists(s, has(s.analysis)) || has(self.analysis)").message("analysis steps need spec.analysis with gates").field_path(".analysis"))]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutSpec {
    /// Model family to roll out (ModelVersion `spec.model`).
    #[schemars(schema_with = "edgewise_core::names::dns_label_schema")]
    pub model: String,
    /// Devices in this segment, by label.
    #[serde(default)]
    pub selector: DeviceSelector,
    /// Version, steps, analysis, rate limit, failure policy and pause flag.
    #[serde(flatten)]
    pub strategy: RolloutStrategy,
}

/// Observed state of a rollout: the step machine's state plus fleet counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutStatus {
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase, versions, step, percent, last analysis.
    #[serde(flatten)]
    pub state: RolloutState,
    /// Device counts for this segment.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// Version skew: which versions the segment's devices run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skew: Vec<SkewEntry>,
    /// Standard conditions: `Progressing`, `Healthy`, `Conflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Device counts of a rollout's segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Devices the selector matches.
    pub targeted: u64,
    /// Devices assigned the version being delivered: the canary while one runs, else the
    /// stable version.
    pub assigned: u64,
    /// Devices downloading it.
    pub downloading: u64,
    /// Devices running it (the count `skew` shows for that version).
    pub installed: u64,
    /// Devices whose install failed.
    pub failed: u64,
}

/// One row of the version-skew table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkewEntry {
    /// Model version.
    pub version: String,
    /// Devices running it.
    pub devices: u64,
}
