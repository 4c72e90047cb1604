//! Compiling a [`RoutingPolicySpec`] into the form the evaluator runs.
//!
//! Every mistake a policy can hold is found here, all at once, each with the path of the
//! field (`rules[3].match[0].gt`), so the controller can report them in a condition and an
//! agent can NACK with the same words.

use std::collections::HashSet;
use std::fmt;

use sha2::{Digest, Sha256};

use super::spec::{
    Condition, NETWORK_VALUES, NUMBER_ATTRIBUTES, RouteSpec, RoutingPolicySpec, STRING_ATTRIBUTES,
    TargetSpec,
};

/// Index of a target within a compiled policy.
pub(crate) type TargetId = u16;

/// A compiled target.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The target's name from the spec.
    pub name: Box<str>,
    /// Where it runs.
    pub kind: TargetKind,
}

/// Where a target runs.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetKind {
    /// On the device, with the installed version of `model`.
    Device {
        /// Model family.
        model: Box<str>,
    },
    /// In the cloud.
    Cloud {
        /// Endpoint URL.
        endpoint: Box<str>,
        /// Model at the endpoint.
        model: Box<str>,
        /// USD per 1,000 tokens.
        cost_per_1k_tokens_usd: f64,
        /// Timeout before falling back.
        timeout_ms: u32,
    },
}

impl Target {
    /// Whether the target runs in the cloud.
    #[must_use]
    pub fn is_cloud(&self) -> bool {
        matches!(self.kind, TargetKind::Cloud { .. })
    }
}

/// A route with resolved target ids.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) route: TargetId,
    pub(crate) fallback: Box<[TargetId]>,
    pub(crate) refine: Option<TargetId>,
    /// Answered on the device while offline: run on `route` again once online.
    pub(crate) reprocess: bool,
}

impl Route {
    /// An empty fallback pins the request to its route: nothing leaves it, not even shadows.
    pub(crate) fn pinned(&self) -> bool {
        self.fallback.is_empty()
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub(crate) name: Box<str>,
    pub(crate) conditions: Box<[Cond]>,
    pub(crate) route: Route,
}

/// A request attribute a condition reads.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Attr {
    Task,
    DataClass,
    Network,
    ModelVersion,
    InputTokens,
    LatencyBudgetMs,
    Battery,
    Complexity,
    Custom(Box<str>),
}

#[derive(Clone, Debug)]
pub(crate) struct Cond {
    pub(crate) attr: Attr,
    pub(crate) one_of: Option<Box<[Box<str>]>>,
    pub(crate) none_of: Option<Box<[Box<str>]>>,
    pub(crate) eq: Option<Box<str>>,
    /// `(bound, inclusive)`.
    pub(crate) lower: Option<(f64, bool)>,
    pub(crate) upper: Option<(f64, bool)>,
    pub(crate) exists: Option<bool>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Budget {
    pub(crate) max_cloud_requests: Option<u32>,
    pub(crate) max_cloud_spend_usd: Option<f64>,
}

#[derive(Clone, Debug)]
pub(crate) struct Shadow {
    /// A request is sampled iff `hash(request_id) % 10000 < per_10k`.
    pub(crate) per_10k: u64,
    pub(crate) target: TargetId,
}

/// A validated routing policy, ready for allocation-free decisions.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub(crate) version: Box<str>,
    pub(crate) targets: Box<[Target]>,
    pub(crate) rules: Box<[Rule]>,
    pub(crate) default: Route,
    pub(crate) first_device_target: Option<TargetId>,
    pub(crate) budget: Budget,
    pub(crate) shadow: Option<Shadow>,
}

impl CompiledPolicy {
    /// Content hash of the policy (see [`policy_version`]).
    #[must_use]
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The compiled targets, in spec order.
    #[must_use]
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Number of rules.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether any rule reads `inputTokens`: a caller can skip counting them otherwise.
    #[must_use]
    pub fn reads_input_tokens(&self) -> bool {
        self.reads(&Attr::InputTokens)
    }

    /// Whether any rule reads `complexity`: a caller can skip estimating it otherwise.
    #[must_use]
    pub fn reads_complexity(&self) -> bool {
        self.reads(&Attr::Complexity)
    }

    fn reads(&self, attr: &Attr) -> bool {
        self.rules
            .iter()
            .flat_map(|r| r.conditions.iter())
            .any(|c| c.attr == *attr)
    }
}

/// One problem in a policy, with the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyIssue {
    /// Field path, e.g. `rules[2].fallback[0]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A policy that does not compile, with every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid routing policy: {}", self.issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct PolicyError {
    /// All problems, in spec order.
    pub issues: Vec<PolicyIssue>,
}

/// Content hash of a policy: the first 16 hex digits of SHA-256 over its canonical JSON
/// (serde's field order, maps sorted). Equal specs give equal versions on every replica.
#[must_use]
pub fn policy_version(spec: &RoutingPolicySpec) -> String {
    // Serialising plain data structs with string keys cannot fail.
    let canonical = serde_json::to_vec(spec).unwrap_or_default();
    Sha256::digest(&canonical)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compiles a policy.
///
/// # Errors
/// [`PolicyError`] listing every problem with its field path.
pub fn compile(spec: &RoutingPolicySpec) -> Result<CompiledPolicy, PolicyError> {
    let mut c = Compiler::default();
    let targets = c.targets(&spec.targets);
    let rules: Vec<Rule> = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let path = format!("rules[{i}]");
            Rule {
                name: rule
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("rule-{i}"))
                    .into(),
                conditions: rule
                    .conditions
                    .iter()
                    .enumerate()
                    .filter_map(|(j, cond)| c.condition(&format!("{path}.match[{j}]"), cond))
                    .collect(),
                route: c.route(&path, &rule.route, &targets),
            }
        })
        .collect();
    let default = c.route("default", &spec.default, &targets);
    let budget = spec.budgets.as_ref().map_or_else(Budget::default, |b| {
        if let Some(usd) = b.cloud_spend_per_device_per_day_usd
            && !(usd >= 0.0 && usd.is_finite())
        {
            c.issue(
                "budgets.cloudSpendPerDevicePerDayUsd",
                "must be a finite amount ≥ 0",
            );
        }
        Budget {
            max_cloud_requests: b.cloud_requests_per_device_per_day,
            max_cloud_spend_usd: b.cloud_spend_per_device_per_day_usd,
        }
    });
    let shadow = spec.shadow.as_ref().and_then(|s| {
        if !(0.0..=1.0).contains(&s.sample_rate) {
            c.issue("shadow.sampleRate", "must be between 0 and 1");
        }
        let target = c.target_ref("shadow.target", &s.target, &targets)?;
        if !targets[usize::from(target)].is_cloud() {
            c.issue(
                "shadow.target",
                format!("{:?} is not a cloud target", s.target),
            );
        }
        Some(Shadow {
            // Rounded so that 1.0 samples all 10000 buckets and 0.0 none.
            per_10k: (s.sample_rate.clamp(0.0, 1.0) * 10_000.0).round() as u64,
            target,
        })
    });
    if !c.issues.is_empty() {
        return Err(PolicyError { issues: c.issues });
    }
    let first_device_target = targets
        .iter()
        .position(|t| !t.is_cloud())
        .map(|i| i as TargetId);
    Ok(CompiledPolicy {
        version: policy_version(spec).into(),
        targets: targets.into(),
        rules: rules.into(),
        default,
        first_device_target,
        budget,
        shadow,
    })
}

#[derive(Default)]
struct Compiler {
    issues: Vec<PolicyIssue>,
}

impl Compiler {
    fn issue(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(PolicyIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn targets(&mut self, specs: &[TargetSpec]) -> Vec<Target> {
        if specs.is_empty() {
            self.issue("targets", "at least one target is required");
        }
        if specs.len() > usize::from(TargetId::MAX) {
            self.issue("targets", "too many targets");
        }
        let mut seen = HashSet::new();
        specs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let path = format!("targets[{i}]");
                if !seen.insert(t.name.as_str()) {
                    self.issue(
                        format!("{path}.name"),
                        format!("duplicate target name {:?}", t.name),
                    );
                }
                let kind = match (&t.device, &t.cloud) {
                    (Some(d), None) => TargetKind::Device {
                        model: d.model.as_str().into(),
                    },
                    (None, Some(cloud)) => {
                        if !(cloud.cost_per_1k_tokens_usd >= 0.0
                            && cloud.cost_per_1k_tokens_usd.is_finite())
                        {
                            self.issue(
                                format!("{path}.cloud.costPer1kTokensUsd"),
                                "must be a finite amount ≥ 0",
                            );
                        }
                        if cloud.timeout_ms == 0 {
                            self.issue(format!("{path}.cloud.timeoutMs"), "must be greater than 0");
                        }
                        if !(cloud.endpoint.starts_with("https://")
                            || cloud.endpoint.starts_with("http://"))
                        {
                            self.issue(format!("{path}.cloud.endpoint"), "must be an http(s) URL");
                        }
                        TargetKind::Cloud {
                            endpoint: cloud.endpoint.as_str().into(),
                            model: cloud.model.as_str().into(),
                            cost_per_1k_tokens_usd: cloud.cost_per_1k_tokens_usd,
                            timeout_ms: cloud.timeout_ms,
                        }
                    }
                    _ => {
                        self.issue(path, "a target is exactly one of device or cloud");
                        TargetKind::Device { model: "".into() }
                    }
                };
                Target {
                    name: t.name.as_str().into(),
                    kind,
                }
            })
            .collect()
    }

    fn target_ref(&mut self, path: &str, name: &str, targets: &[Target]) -> Option<TargetId> {
        let found = targets.iter().position(|t| &*t.name == name);
        if found.is_none() {
            self.issue(path, format!("no target named {name:?}"));
        }
        found.map(|i| i as TargetId)
    }

    fn route(&mut self, path: &str, spec: &RouteSpec, targets: &[Target]) -> Route {
        let route = self.target_ref(&format!("{path}.route"), &spec.route, targets);
        let mut seen = HashSet::from([spec.route.as_str()]);
        let fallback: Vec<TargetId> = spec
            .fallback
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let at = format!("{path}.fallback[{i}]");
                if !seen.insert(name.as_str()) {
                    self.issue(
                        at.clone(),
                        format!("{name:?} is already the route or an earlier fallback"),
                    );
                }
                self.target_ref(&at, name, targets)
            })
            .collect();
        let refine = spec.refine.as_deref().and_then(|name| {
            let at = format!("{path}.refine");
            if name == spec.route {
                self.issue(at.clone(), "refine must differ from route");
            }
            let id = self.target_ref(&at, name, targets)?;
            let pinned = spec.fallback.is_empty();
            if pinned && targets[usize::from(id)].is_cloud() {
                self.issue(
                    at,
                    "a pinned route (empty fallback) never leaves its target, so it cannot refine in the cloud",
                );
            }
            Some(id)
        });
        if spec.reprocess {
            let at = format!("{path}.reprocess");
            if route.is_some_and(|id| !targets[usize::from(id)].is_cloud()) {
                self.issue(
                    at,
                    "only a cloud route is reprocessed: a device route already answered where it runs",
                );
            } else if spec.fallback.is_empty() {
                self.issue(
                    at,
                    "a pinned route (empty fallback) never leaves its target, so nothing answers it offline to reprocess",
                );
            }
        }
        Route {
            route: route.unwrap_or(0),
            fallback: fallback.into(),
            refine,
            reprocess: spec.reprocess,
        }
    }

    fn condition(&mut self, path: &str, spec: &Condition) -> Option<Cond> {
        let attr = match spec.attribute.as_str() {
            "task" => Attr::Task,
            "dataClass" => Attr::DataClass,
            "network" => Attr::Network,
            "modelVersion" => Attr::ModelVersion,
            "inputTokens" => Attr::InputTokens,
            "latencyBudgetMs" => Attr::LatencyBudgetMs,
            "battery" => Attr::Battery,
            "complexity" => Attr::Complexity,
            other => match other.strip_prefix("attributes.") {
                Some(key) if !key.is_empty() => Attr::Custom(key.into()),
                _ => {
                    self.issue(
                        format!("{path}.attribute"),
                        format!(
                            "unknown attribute {other:?}: use one of {}, {} or attributes.<key>",
                            STRING_ATTRIBUTES.join(", "),
                            NUMBER_ATTRIBUTES.join(", ")
                        ),
                    );
                    return None;
                }
            },
        };
        let is_string = STRING_ATTRIBUTES.contains(&spec.attribute.as_str());
        let is_number = NUMBER_ATTRIBUTES.contains(&spec.attribute.as_str());
        let string_ops = [
            ("in", spec.in_.is_some()),
            ("notIn", spec.not_in.is_some()),
            ("eq", spec.eq.is_some()),
        ];
        let number_ops = [
            ("lt", spec.lt),
            ("lte", spec.lte),
            ("gt", spec.gt),
            ("gte", spec.gte),
        ];
        let any_string_op = string_ops.iter().any(|(_, set)| *set);
        let any_number_op = number_ops.iter().any(|(_, v)| v.is_some());
        if !any_string_op && !any_number_op && spec.exists.is_none() {
            self.issue(path, "a condition needs at least one operator: in, notIn, eq, lt, lte, gt, gte or exists");
        }
        if is_number {
            for (op, _) in string_ops.iter().filter(|(_, set)| *set) {
                self.issue(
                    format!("{path}.{op}"),
                    format!(
                        "{} is a number: use lt, lte, gt, gte or exists",
                        spec.attribute
                    ),
                );
            }
        }
        if is_string {
            for (op, _) in number_ops.iter().filter(|(_, v)| v.is_some()) {
                self.issue(
                    format!("{path}.{op}"),
                    format!(
                        "{} is a string: use in, notIn, eq or exists",
                        spec.attribute
                    ),
                );
            }
        }
        for (op, v) in number_ops {
            if let Some(v) = v {
                if !v.is_finite() {
                    self.issue(format!("{path}.{op}"), "must be a finite number");
                } else if matches!(attr, Attr::Battery | Attr::Complexity)
                    && !(0.0..=1.0).contains(&v)
                {
                    self.issue(
                        format!("{path}.{op}"),
                        format!("{} is between 0 and 1", spec.attribute),
                    );
                }
            }
        }
        for (op, list) in [("in", &spec.in_), ("notIn", &spec.not_in)] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                self.issue(format!("{path}.{op}"), "needs at least one value");
            }
        }
        if attr == Attr::Network {
            let values = spec
                .in_
                .iter()
                .flatten()
                .chain(spec.not_in.iter().flatten())
                .chain(spec.eq.iter());
            for v in values {
                if !NETWORK_VALUES.contains(&v.as_str()) {
                    self.issue(
                        path.to_string(),
                        format!("network {v:?} is not one of {}", NETWORK_VALUES.join(", ")),
                    );
                }
            }
        }
        if spec.exists == Some(false) && (any_string_op || any_number_op) {
            self.issue(
                format!("{path}.exists"),
                "exists: false cannot be combined with other operators",
            );
        }
        let lower = tighter(
            spec.gt.map(|v| (v, false)),
            spec.gte.map(|v| (v, true)),
            |a, b| a > b,
        );
        let upper = tighter(
            spec.lt.map(|v| (v, false)),
            spec.lte.map(|v| (v, true)),
            |a, b| a < b,
        );
        if let (Some((lo, lo_inc)), Some((hi, hi_inc))) = (lower, upper)
            && (lo > hi || (lo == hi && !(lo_inc && hi_inc)))
        {
            self.issue(
                path,
                "the numeric bounds leave no value: this condition never matches",
            );
        }
        let boxed = |list: &Option<Vec<String>>| {
            list.as_ref().map(|l| {
                l.iter()
                    .map(|s| s.as_str().into())
                    .collect::<Box<[Box<str>]>>()
            })
        };
        Some(Cond {
            attr,
            one_of: boxed(&spec.in_),
            none_of: boxed(&spec.not_in),
            eq: spec.eq.as_deref().map(Into::into),
            lower,
            upper,
            exists: spec.exists,
        })
    }
}

/// The stricter of an exclusive and an inclusive bound on the same side.
fn tighter(
    exclusive: Option<(f64, bool)>,
    inclusive: Option<(f64, bool)>,
    stricter: impl Fn(f64, f64) -> bool,
) -> Option<(f64, bool)> {
    match (exclusive, inclusive) {
        (Some(e), Some(i)) => Some(if stricter(i.0, e.0) { i } else { e }),
        (e, i) => e.or(i),
    }
}
