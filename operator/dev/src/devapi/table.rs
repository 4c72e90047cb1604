//! `Table` responses (`kubectl get` asks for them): one row per object, columns from the
//! CRD's printer columns, ages as kubectl shows them.

use serde_json::{Value, json};

use super::{Api, Resource};

impl Api {
    pub(super) fn table(&self, r: &Resource, items: &[Value], rv: u64) -> Value {
        let mut columns = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}),
        ];
        let printer: Vec<_> = if r.columns.is_empty() {
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
                json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
            })
            .collect();
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": columns, "rows": rows})
    }
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
