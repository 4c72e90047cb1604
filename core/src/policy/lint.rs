//! Warnings about a policy that compiles but may not do what its author meant: an earlier
//! rule that can send to the cloud a data class a later rule keeps on the device (rules are
//! tried in order, so the later one never sees those requests), and rules that can never
//! match. They do not stop a policy; the controller shows them on the RoutingPolicy.

use std::collections::BTreeSet;
use std::fmt;

use super::spec::{Condition, RoutingPolicySpec, RuleSpec};

/// One warning, with the path of the rule it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    /// `rules[2]`.
    pub path: String,
    /// What may go wrong, and what to change.
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn rule_name(rules: &[RuleSpec], i: usize) -> String {
    rules[i]
        .name
        .as_ref()
        .map_or_else(|| format!("rules[{i}]"), |n| format!("rule {n:?}"))
}

/// Which values of a string attribute a rule can match: `None` is any value.
fn admitted(conditions: &[Condition], attribute: &str) -> Option<BTreeSet<String>> {
    let mut allowed: Option<BTreeSet<String>> = None;
    let mut intersect = |set: BTreeSet<String>| {
        allowed = Some(match allowed.take() {
            None => set,
            Some(a) => a.intersection(&set).cloned().collect(),
        });
    };
    for c in conditions.iter().filter(|c| c.attribute == attribute) {
        if let Some(eq) = &c.eq {
            intersect(BTreeSet::from([eq.clone()]));
        }
        if let Some(values) = &c.in_ {
            intersect(values.iter().cloned().collect());
        }
        if c.exists == Some(false) {
            intersect(BTreeSet::new());
        }
    }
    let excluded: BTreeSet<&String> = conditions
        .iter()
        .filter(|c| c.attribute == attribute)
        .flat_map(|c| c.not_in.iter().flatten())
        .collect();
    allowed.map(|a| a.into_iter().filter(|v| !excluded.contains(v)).collect())
}

/// Whether a rule admits `value` for `attribute` (its other conditions aside).
fn admits(conditions: &[Condition], attribute: &str, value: &str) -> bool {
    let excluded = conditions
        .iter()
        .filter(|c| c.attribute == attribute)
        .any(|c| c.not_in.iter().flatten().any(|v| v == value));
    !excluded && admitted(conditions, attribute).is_none_or(|a| a.contains(value))
}

/// Whether no request can satisfy the conditions, and why.
fn impossible(conditions: &[Condition]) -> Option<String> {
    let attributes: BTreeSet<&str> = conditions.iter().map(|c| c.attribute.as_str()).collect();
    for a in attributes {
        let on: Vec<&Condition> = conditions.iter().filter(|c| c.attribute == a).collect();
        let absent = on.iter().any(|c| c.exists == Some(false));
        let other = on.iter().any(|c| {
            c.exists == Some(true)
                || c.eq.is_some()
                || c.in_.is_some()
                || c.lt.is_some()
                || c.lte.is_some()
                || c.gt.is_some()
                || c.gte.is_some()
        });
        if absent && other {
            return Some(format!("{a} must be absent and present at once"));
        }
        if let Some(set) = admitted(conditions, a)
            && set.is_empty()
            && !absent
        {
            return Some(format!("no value of {a} satisfies all its conditions"));
        }
        // Numbers: the tightest bounds.
        let mut lo = (f64::NEG_INFINITY, false);
        let mut hi = (f64::INFINITY, false);
        for c in &on {
            for (v, strict) in [(c.gt, true), (c.gte, false)] {
                if let Some(v) = v
                    && (v > lo.0 || (v == lo.0 && strict))
                {
                    lo = (v, strict);
                }
            }
            for (v, strict) in [(c.lt, true), (c.lte, false)] {
                if let Some(v) = v
                    && (v < hi.0 || (v == hi.0 && strict))
                {
                    hi = (v, strict);
                }
            }
        }
        if lo.0 > hi.0 || (lo.0 == hi.0 && (lo.1 || hi.1)) {
            return Some(format!("no {a} is both above {} and below {}", lo.0, hi.0));
        }
    }
    None
}

/// Every warning about `spec`, in rule order.
#[must_use]
pub fn lint(spec: &RoutingPolicySpec) -> Vec<PolicyWarning> {
    let is_cloud = |name: &str| {
        spec.targets
            .iter()
            .any(|t| t.name == name && t.cloud.is_some())
    };
    let rules = &spec.rules;
    let mut out = Vec::new();
    let mut catch_all: Option<usize> = None;
    for (j, rule) in rules.iter().enumerate() {
        let path = format!("rules[{j}]");
        if let Some(i) = catch_all {
            out.push(PolicyWarning {
                path,
                message: format!(
                    "never matches: {} before it has no conditions and takes every request",
                    rule_name(rules, i)
                ),
            });
            continue;
        }
        if let Some(why) = impossible(&rule.conditions) {
            out.push(PolicyWarning {
                path,
                message: format!("never matches: {why}"),
            });
            continue;
        }
        // A rule that keeps its data classes on the device: routed to a device target
        // with no cloud target anywhere in its chain.
        let pinned = admitted(&rule.conditions, "dataClass").filter(|set| !set.is_empty());
        let stays =
            !is_cloud(&rule.route.route) && !rule.route.fallback.iter().any(|t| is_cloud(t));
        if let (Some(classes), true) = (pinned, stays) {
            for (i, earlier) in rules.iter().enumerate().take(j) {
                let cloud = std::iter::once(&earlier.route.route)
                    .chain(&earlier.route.fallback)
                    .find(|t| is_cloud(t));
                let Some(cloud) = cloud else { continue };
                for class in classes
                    .iter()
                    .filter(|c| admits(&earlier.conditions, "dataClass", c))
                {
                    out.push(PolicyWarning {
                        path: format!("rules[{i}]"),
                        message: format!(
                            "can send dataClass {class:?} requests to the cloud (target {cloud:?}) before {} keeps them on the device; move that rule up or exclude {class:?} here (notIn)",
                            rule_name(rules, j)
                        ),
                    });
                }
            }
        }
        if rule.conditions.is_empty() {
            catch_all = Some(j);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(rules: serde_json::Value) -> RoutingPolicySpec {
        serde_json::from_value(json!({
            "targets": [
                {"name": "on-device", "device": {"model": "m"}},
                {"name": "cloud", "cloud": {"endpoint": "https://c.example.com/v1", "model": "big"}}
            ],
            "rules": rules,
            "default": {"route": "on-device"}
        }))
        .expect("spec")
    }

    #[test]
    fn a_cloud_rule_above_the_private_rule_is_called_out() {
        let s = spec(json!([
            {"name": "long", "match": [{"attribute": "inputTokens", "gt": 4000}], "route": "cloud"},
            {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"}
        ]));
        let w = lint(&s);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].path, "rules[0]");
        assert!(
            w[0].message.contains("\"private\"") && w[0].message.contains("rule \"private\""),
            "{}",
            w[0]
        );
    }

    #[test]
    fn the_private_rule_first_or_an_exclusion_is_fine() {
        let first = spec(json!([
            {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
            {"name": "long", "match": [{"attribute": "inputTokens", "gt": 4000}], "route": "cloud"}
        ]));
        assert!(lint(&first).is_empty());
        let excluded = spec(json!([
            {"name": "long", "match": [{"attribute": "inputTokens", "gt": 4000}, {"attribute": "dataClass", "notIn": ["private"]}], "route": "cloud"},
            {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"}
        ]));
        assert!(lint(&excluded).is_empty(), "{:?}", lint(&excluded));
        let fallback = spec(json!([
            {"name": "fast", "match": [{"attribute": "task", "eq": "chat"}], "route": "on-device", "fallback": ["cloud"]},
            {"name": "private", "match": [{"attribute": "dataClass", "in": ["private", "secret"]}], "route": "on-device"}
        ]));
        assert_eq!(
            lint(&fallback).len(),
            2,
            "a cloud fallback counts, once per class"
        );
    }

    #[test]
    fn rules_that_can_never_match_are_named() {
        let s = spec(json!([
            {"name": "both", "match": [{"attribute": "task", "eq": "chat"}, {"attribute": "task", "eq": "code"}], "route": "cloud"},
            {"name": "range", "match": [{"attribute": "battery", "gt": 0.8, "lt": 0.2}], "route": "cloud"},
            {"name": "edge", "match": [{"attribute": "battery", "gte": 0.5, "lt": 0.5}], "route": "cloud"},
            {"name": "gone", "match": [{"attribute": "task", "exists": false}, {"attribute": "task", "eq": "x"}], "route": "cloud"},
            {"name": "everything", "route": "on-device"},
            {"name": "after", "match": [{"attribute": "task", "eq": "chat"}], "route": "cloud"}
        ]));
        let paths: Vec<String> = lint(&s).into_iter().map(|w| w.path).collect();
        assert_eq!(
            paths,
            ["rules[0]", "rules[1]", "rules[2]", "rules[3]", "rules[5]"]
        );
        let ok = spec(json!([
            {"name": "band", "match": [{"attribute": "battery", "gte": 0.2, "lte": 0.2}], "route": "cloud"},
            {"name": "some", "match": [{"attribute": "task", "in": ["a", "b"]}, {"attribute": "task", "notIn": ["a"]}], "route": "cloud"}
        ]));
        assert!(lint(&ok).is_empty(), "{:?}", lint(&ok));
    }
}
