//! One store of Events, two APIs: `events.k8s.io/v1` (what controllers write through
//! kube-rs' `Recorder`) and core `v1` (what `kubectl describe`, `kubectl get events` and
//! `kubectl events` read). Objects are kept in the `events.k8s.io` form and converted field
//! by field as the API server's conversion does, so an event written through either API is
//! read through both.

use serde_json::{Map, Value};

/// `(core/v1 field, events.k8s.io/v1 field)`: the fields the two versions share under
/// other names. Everything else (`metadata`, `reason`, `type`, `action`, `related`,
/// `series`, `eventTime`, `reportingInstance`) has the same name in both.
const RENAMED: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn renamed(mut obj: Value, api_version: &str, from_core: bool) -> Value {
    let Some(map) = obj.as_object_mut() else {
        return obj;
    };
    let mut out = Map::new();
    for (key, value) in std::mem::take(map) {
        if value.is_null() {
            continue;
        }
        let name = RENAMED
            .iter()
            .find_map(|(core, events)| {
                if from_core {
                    (key == *core).then_some(*events)
                } else {
                    (key == *events).then_some(*core)
                }
            })
            .map_or(key, str::to_owned);
        out.insert(name, value);
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    out.insert("kind".into(), Value::String("Event".into()));
    Value::Object(out)
}

/// A core `v1` Event in its stored (`events.k8s.io/v1`) form.
#[must_use]
pub fn from_core(obj: Value) -> Value {
    renamed(obj, "events.k8s.io/v1", true)
}

/// A stored Event as core `v1` shows it.
#[must_use]
pub fn to_core(obj: Value) -> Value {
    renamed(obj, "v1", false)
}

/// Fields the API server lets a field selector name on core `v1` Events.
pub const CORE_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// The same for `events.k8s.io/v1`.
pub const EVENTS_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_reads_the_same_through_both_apis() {
        let written = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "r.1", "namespace": "edgewise"},
            "regarding": {"kind": "ModelRollout", "name": "r", "uid": "u-1"},
            "reason": "StepAdvanced", "note": "now at 25 %", "type": "Normal",
            "reportingController": "edgewise.dev/rollouts", "reportingInstance": "c-0",
            "eventTime": "2026-12-04T10:00:00.000000Z", "action": "Advance",
            "deprecatedCount": 2, "related": null
        });
        let core = to_core(written.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "r");
        assert_eq!(core["message"], "now at 25 %");
        assert_eq!(core["reportingComponent"], "edgewise.dev/rollouts");
        assert_eq!(core["count"], 2);
        assert_eq!(core["reason"], "StepAdvanced");
        assert!(core.get("related").is_none(), "nulls are not carried");
        let mut back = written;
        back.as_object_mut().map(|m| m.remove("related"));
        assert_eq!(from_core(core), back, "the round trip loses nothing");
    }
}
