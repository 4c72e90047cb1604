//! `Table` responses (`kubectl get` asks for them): one row per object, columns from the
//! CRD's printer columns, ages as kubectl shows them.

use serde_json::{Value, json};

use super::resources::Form;
use super::{Api, Resource};

/// `includeObject`: what each row carries besides its cells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum IncludeObject {
    /// Nothing.
    None,
    /// The object's metadata (the server's default).
    #[default]
    Metadata,
    /// The whole object (what `kubectl get --sort-by` and `-o custom-columns` need).
    Object,
}

impl IncludeObject {
    /// From the query string.
    pub(super) fn from_query(v: Option<&str>) -> Self {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

impl Api {
    pub(super) fn table(
        &self,
        r: &Resource,
        items: &[Value],
        rv: u64,
        include: IncludeObject,
    ) -> Value {
        let mut columns = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}),
        ];
        let printer: Vec<_> = if r.kind == "Event" {
            event_columns(r.form == Form::CoreEvent)
        } else if r.columns.is_empty() {
            vec![(
                "Age".to_owned(),
                "date".to_owned(),
                ".metadata.creationTimestamp".to_owned(),
                0,
            )]
        } else {
            r.columns
                .iter()
                .map(|c| {
                    (
                        c.name.clone(),
                        c.type_.clone(),
                        c.json_path.clone(),
                        c.priority.unwrap_or(0),
                    )
                })
                .collect()
        };
        for (name, kind, _, priority) in &printer {
            columns.push(json!({"name": name, "type": kind, "format": "", "description": "", "priority": priority}));
        }
        let rows: Vec<Value> = items
            .iter()
            .map(|o| {
                let mut cells = vec![o["metadata"]["name"].clone()];
                for (_, kind, path, _) in &printer {
                    let v = json_path(o, path);
                    cells.push(if kind == "date" { age(&v) } else { v });
                }
                let object = match include {
                    IncludeObject::None => Value::Null,
                    IncludeObject::Metadata => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}),
                    IncludeObject::Object => o.clone(),
                };
                json!({"cells": cells, "object": object})
            })
            .collect();
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": columns, "rows": rows})
    }
}

/// The columns `kubectl get events` shows, for either Event API.
fn event_columns(core: bool) -> Vec<(String, String, String, i32)> {
    let col =
        |name: &str, kind: &str, path: &str| (name.to_owned(), kind.to_owned(), path.to_owned(), 0);
    vec![
        col("Last Seen", "date", ".metadata.creationTimestamp"),
        col("Type", "string", ".type"),
        col("Reason", "string", ".reason"),
        col(
            "Object",
            "string",
            if core {
                ".involvedObject.name"
            } else {
                ".regarding.name"
            },
        ),
        col("Message", "string", if core { ".message" } else { ".note" }),
    ]
}

/// `.a.b.c` → the value there (null when absent).
fn json_path(o: &Value, path: &str) -> Value {
    path.trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
        .try_fold(o, |v, k| v.get(k))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A timestamp as kubectl shows an age: `42s`, `5m`, `3h`, `2d`.
fn age(v: &Value) -> Value {
    let Some(t) = v.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok()) else {
        return Value::Null;
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    json!(match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    })
}
