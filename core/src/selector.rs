//! Label selectors over device labels, with Kubernetes `LabelSelector` semantics.
//!
//! Devices are not Kubernetes objects, so selection happens here rather than in the API
//! server. The wire and CRD shape is the familiar `matchLabels` + `matchExpressions`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selects devices by their labels. An empty selector selects every device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSelector {
    /// Labels a device must carry with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
     "message": "In and NotIn need values; Exists and DoesNotExist take none"}
]))]
pub struct SelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1))]
    pub key: String,
    /// How the label relates to `values`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// Operators of a selector requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The label is present with one of the values.
    In,
    /// The label is absent or has none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl DeviceSelector {
    /// Whether a device with these labels is selected.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_where(labels, |_| true)
    }

    /// [`DeviceSelector::matches`] judged on the keys `considered` alone; a requirement
    /// on any other key is taken as met. For what a device may claim of itself: it can
    /// report any value of a self-reported key, so only the keys it cannot forge decide.
    #[must_use]
    pub fn matches_where(
        &self,
        labels: &BTreeMap<String, String>,
        considered: impl Fn(&str) -> bool,
    ) -> bool {
        self.match_labels
            .iter()
            .filter(|(k, _)| considered(k))
            .all(|(k, v)| labels.get(k) == Some(v))
            && self
                .match_expressions
                .iter()
                .filter(|r| considered(&r.key))
                .all(|req| {
                    let value = labels.get(&req.key);
                    match req.operator {
                        SelectorOperator::In => value.is_some_and(|v| req.values.contains(v)),
                        SelectorOperator::NotIn => value.is_none_or(|v| !req.values.contains(v)),
                        SelectorOperator::Exists => value.is_some(),
                        SelectorOperator::DoesNotExist => value.is_none(),
                    }
                })
    }

    /// Conservative overlap test: `false` only when no label set can match both selectors.
    ///
    /// Used to flag rollouts of one model whose segments may share devices; a `true` for
    /// selectors that are in fact disjoint only costs a warning condition.
    #[must_use]
    pub fn may_overlap(&self, other: &DeviceSelector) -> bool {
        let (a, b) = (self.allowed_values(), other.allowed_values());
        a.iter().all(|(key, allowed_a)| match b.get(key) {
            Some(allowed_b) => allowed_a.compatible(allowed_b),
            None => true,
        })
    }

    /// What each constrained key may be, folding labels and expressions together.
    fn allowed_values(&self) -> BTreeMap<&str, Allowed<'_>> {
        let mut out: BTreeMap<&str, Allowed<'_>> = BTreeMap::new();
        for (k, v) in &self.match_labels {
            let allowed = Allowed::OneOf(vec![v.as_str()]);
            out.entry(k.as_str())
                .and_modify(|cur| *cur = cur.intersect(&allowed))
                .or_insert(allowed);
        }
        for req in &self.match_expressions {
            let allowed = match req.operator {
                SelectorOperator::In => {
                    Allowed::OneOf(req.values.iter().map(String::as_str).collect())
                }
                SelectorOperator::Exists => Allowed::Present,
                SelectorOperator::DoesNotExist => Allowed::Absent,
                // NotIn admits absence and all other values: never proves disjointness alone.
                SelectorOperator::NotIn => continue,
            };
            out.entry(req.key.as_str())
                .and_modify(|cur| *cur = cur.intersect(&allowed))
                .or_insert(allowed);
        }
        out
    }
}

/// The values a selector admits for one key.
#[derive(Clone, Debug)]
enum Allowed<'a> {
    OneOf(Vec<&'a str>),
    Present,
    Absent,
}

impl<'a> Allowed<'a> {
    fn intersect(&self, other: &Allowed<'a>) -> Allowed<'a> {
        match (self, other) {
            (Allowed::OneOf(a), Allowed::OneOf(b)) => {
                Allowed::OneOf(a.iter().filter(|v| b.contains(v)).copied().collect())
            }
            (Allowed::OneOf(a), Allowed::Present) | (Allowed::Present, Allowed::OneOf(a)) => {
                Allowed::OneOf(a.clone())
            }
            (Allowed::Present, Allowed::Present) => Allowed::Present,
            (Allowed::Absent, Allowed::Absent) => Allowed::Absent,
            _ => Allowed::OneOf(Vec::new()),
        }
    }

    fn compatible(&self, other: &Allowed<'a>) -> bool {
        !matches!(self.intersect(other), Allowed::OneOf(v) if v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selector(json: serde_json::Value) -> DeviceSelector {
        serde_json::from_value(json).expect("valid selector")
    }

    #[test]
    fn empty_selector_selects_every_device() {
        assert!(DeviceSelector::default().matches(&labels(&[])));
        assert!(DeviceSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn requirements_on_keys_not_considered_are_taken_as_met() {
        let sel = DeviceSelector {
            match_labels: BTreeMap::from([("region".into(), "eu".into())]),
            match_expressions: vec![SelectorRequirement {
                key: "self.os".into(),
                operator: SelectorOperator::In,
                values: vec!["linux".into()],
            }],
        };
        let server = |k: &str| !k.starts_with("self.");
        let eu = BTreeMap::from([("region".to_owned(), "eu".to_owned())]);
        let us = BTreeMap::from([("region".to_owned(), "us".to_owned())]);
        assert!(!sel.matches(&eu), "self.os is missing");
        assert!(sel.matches_where(&eu, server));
        assert!(!sel.matches_where(&us, server));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = selector(serde_json::json!({
            "matchLabels": {"tier": "beta"},
            "matchExpressions": [
                {"key": "region", "operator": "In", "values": ["eu", "us"]},
                {"key": "blocked", "operator": "DoesNotExist"},
                {"key": "os", "operator": "NotIn", "values": ["ios"]},
            ]
        }));
        assert!(s.matches(&labels(&[("tier", "beta"), ("region", "eu")])));
        assert!(s.matches(&labels(&[
            ("tier", "beta"),
            ("region", "us"),
            ("os", "android")
        ])));
        assert!(!s.matches(&labels(&[("tier", "ga"), ("region", "eu")])));
        assert!(!s.matches(&labels(&[("tier", "beta"), ("region", "apac")])));
        assert!(!s.matches(&labels(&[
            ("tier", "beta"),
            ("region", "eu"),
            ("blocked", "")
        ])));
        assert!(!s.matches(&labels(&[
            ("tier", "beta"),
            ("region", "eu"),
            ("os", "ios")
        ])));
    }

    #[test]
    fn disjoint_label_values_do_not_overlap() {
        let eu = selector(serde_json::json!({"matchLabels": {"region": "eu"}}));
        let us = selector(serde_json::json!({"matchLabels": {"region": "us"}}));
        let beta = selector(serde_json::json!({"matchLabels": {"tier": "beta"}}));
        assert!(!eu.may_overlap(&us));
        assert!(eu.may_overlap(&beta));
        assert!(eu.may_overlap(&DeviceSelector::default()));
    }

    #[test]
    fn exists_and_does_not_exist_do_not_overlap() {
        let has = selector(
            serde_json::json!({"matchExpressions": [{"key": "npu", "operator": "Exists"}]}),
        );
        let lacks = selector(
            serde_json::json!({"matchExpressions": [{"key": "npu", "operator": "DoesNotExist"}]}),
        );
        let in_set = selector(
            serde_json::json!({"matchExpressions": [{"key": "npu", "operator": "In", "values": ["a"]}]}),
        );
        assert!(!has.may_overlap(&lacks));
        assert!(has.may_overlap(&in_set));
        assert!(!lacks.may_overlap(&in_set));
    }
}
