//! The RoutingPolicy spec as users write it (and as it travels to devices).
//!
//! These types are the CRD's spec fields and also the policy's wire form: the gateway sends
//! the canonical JSON of this spec and agents compile it with [`super::compile`]. The schema
//! attributes here become the CRD's OpenAPI schema and CEL rules.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::selector::DeviceSelector;

/// Where each request runs, for the devices a selector picks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.targets.all(t, self.targets.exists_one(u, u.name == t.name))",
     "message": "target names must be unique", "fieldPath": ".targets"},
    {"rule": "self.targets.exists(t, t.name == self.default.route)",
     "message": "default.route must name a target", "fieldPath": ".default.route"},
    {"rule": "!has(self.rules) || self.rules.all(r, self.targets.exists(t, t.name == r.route))",
     "message": "every rule's route must name a target", "fieldPath": ".rules"},
    {"rule": "!has(self.shadow) || self.targets.exists(t, t.name == self.shadow.target && has(t.cloud))",
     "message": "shadow.target must name a cloud target", "fieldPath": ".shadow.target"}
]))]
pub struct RoutingPolicySpec {
    /// Devices this policy applies to; empty selects every device.
    #[serde(default)]
    pub selector: DeviceSelector,
    /// Among policies matching a device, the highest priority applies (ties: oldest wins).
    #[serde(default)]
    pub priority: i32,
    /// Named routes that rules refer to.
    #[schemars(length(min = 1, max = 32))]
    pub targets: Vec<TargetSpec>,
    /// Ordered rules; the first whose conditions all hold decides.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<RuleSpec>,
    /// The route when no rule matches.
    pub default: RouteSpec,
    /// Per-device cloud budgets; over budget, requests stay on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<Budgets>,
    /// Mirror a sample of on-device requests to a cloud target to measure agreement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
}

/// A named route: on the device or in the cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.device) != has(self.cloud)", "message": "a target is exactly one of device or cloud"}
]))]
pub struct TargetSpec {
    /// Name rules use to refer to this target.
    #[schemars(schema_with = "crate::names::dns_label_schema")]
    pub name: String,
    /// Run on the device with the installed version of a model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceTarget>,
    /// Run on a cloud endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudTarget>,
}

/// An on-device route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTarget {
    /// Model family; resolved on the device to its installed version.
    #[schemars(length(min = 1))]
    pub model: String,
}

/// A cloud route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudTarget {
    /// Inference endpoint URL.
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub endpoint: String,
    /// Model name at the endpoint.
    #[schemars(length(min = 1))]
    pub model: String,
    /// Price per 1,000 tokens in US dollars, for cost accounting and budgets.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub cost_per_1k_tokens_usd: f64,
    /// Request timeout before the fallback chain is tried.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 600_000))]
    pub timeout_ms: u32,
}

fn default_timeout_ms() -> u32 {
    10_000
}

/// A route with its failure handling.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Target that serves the request.
    #[schemars(length(min = 1))]
    pub route: String,
    /// Targets to try, in order, when the route fails or is unavailable. Empty means the
    /// request never leaves `route` (for private data, say).
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub fallback: Vec<String>,
    /// Progressive enhancement: answer from `route` now, then refine with this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<String>,
    /// Offline, then reconcile: when the device is offline and a device target answers in
    /// place of this cloud route, the agent keeps the request and runs it on the route again
    /// once back online, offering both answers to the app. Needs a cloud route that may
    /// fall back (a pinned route never leaves the device, so never reprocesses).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reprocess: bool,
}

/// One rule: conditions over request attributes, then a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    /// Name reported in decisions and telemetry; defaults to `rule-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Conditions that must all hold; empty matches every request.
    #[serde(default, rename = "match")]
    pub conditions: Vec<Condition>,
    /// Where matching requests go.
    #[serde(flatten)]
    pub route: RouteSpec,
}

/// String-valued request attributes.
pub const STRING_ATTRIBUTES: [&str; 4] = ["task", "dataClass", "network", "modelVersion"];
/// Number-valued request attributes.
pub const NUMBER_ATTRIBUTES: [&str; 4] =
    ["inputTokens", "latencyBudgetMs", "battery", "complexity"];
/// Values of the `network` attribute.
pub const NETWORK_VALUES: [&str; 3] = ["online", "offline", "metered"];

/// One condition on a request attribute. Set operators are combined with AND.
///
/// String attributes (`task`, `dataClass`, `network`, `modelVersion`) take `in`, `notIn`,
/// `eq`, `exists`; number attributes (`inputTokens`, `latencyBudgetMs`, `battery`,
/// `complexity`) take `lt`, `lte`, `gt`, `gte`, `exists`; free-form `attributes.<key>` take
/// any (numeric operators parse the attribute's value as a number).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.__in__) || has(self.notIn) || has(self.eq) || has(self.lt) || has(self.lte) || has(self.gt) || has(self.gte) || has(self.exists)",
     "message": "a condition needs at least one operator: in, notIn, eq, lt, lte, gt, gte or exists"},
    {"rule": "!(self.attribute in ['inputTokens', 'latencyBudgetMs', 'battery', 'complexity']) || !(has(self.__in__) || has(self.notIn) || has(self.eq))",
     "message": "number attributes take lt, lte, gt, gte or exists, not in, notIn or eq"},
    {"rule": "!(self.attribute in ['task', 'dataClass', 'network', 'modelVersion']) || !(has(self.lt) || has(self.lte) || has(self.gt) || has(self.gte))",
     "message": "string attributes take in, notIn, eq or exists, not lt, lte, gt or gte"},
    {"rule": "self.attribute != 'network' || ((!has(self.__in__) || self.__in__.all(v, v in ['online', 'offline', 'metered'])) && (!has(self.notIn) || self.notIn.all(v, v in ['online', 'offline', 'metered'])) && (!has(self.eq) || self.eq in ['online', 'offline', 'metered']))",
     "message": "network is one of online, offline, metered"}
]))]
pub struct Condition {
    /// Request attribute: one of the named attributes or `attributes.<key>`.
    #[schemars(regex(
        pattern = r"^(task|dataClass|network|modelVersion|inputTokens|latencyBudgetMs|battery|complexity|attributes\.[A-Za-z0-9_.-]+)$"
    ))]
    pub attribute: String,
    /// The attribute is one of these values.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub in_: Option<Vec<String>>,
    /// The attribute is absent or none of these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub not_in: Option<Vec<String>>,
    /// The attribute equals this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<String>,
    /// The attribute is below this number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// The attribute is at most this number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    /// The attribute is above this number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// The attribute is at least this number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    /// The attribute is present (`true`) or absent (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

/// Per-device daily cloud budgets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budgets {
    /// Cloud requests per device per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_requests_per_device_per_day: Option<u32>,
    /// Cloud spend per device per UTC day, US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub cloud_spend_per_device_per_day_usd: Option<f64>,
}

/// Shadow traffic: a deterministic sample of on-device requests also sent to the cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowSpec {
    /// Fraction of eligible requests to mirror, 0–1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_rate: f64,
    /// Cloud target that answers the shadow requests.
    #[schemars(length(min = 1))]
    pub target: String,
}
