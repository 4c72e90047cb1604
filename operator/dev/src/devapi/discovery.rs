//! Discovery and OpenAPI: what kubectl reads before anything else (`/apis`, the resource
//! lists, `/openapi/v3`), built from the served resources.

use serde_json::{Value, json};

use super::Api;

impl Api {
    pub(super) fn groups(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for r in &self.resources {
            if !r.group.is_empty() && !out.contains(&(r.group, r.version)) {
                out.push((r.group, r.version));
            }
        }
        out
    }

    pub(super) fn group(&self, group: &str) -> Option<Value> {
        self.groups().into_iter().find(|(g, _)| *g == group).map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
    }

    pub(super) fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .into_iter()
            .filter_map(|(g, _)| self.group(g))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    pub(super) fn resource_list(&self, group: &str, version: &str) -> Value {
        let mut list = Vec::new();
        for r in self
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            list.push(json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                "kind": r.kind, "verbs": r.verbs, "shortNames": r.short_names, "categories": r.categories,
            }));
            if r.status {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    }

    /// Group-versions with OpenAPI documents: every group, and core `v1` as `api/v1`.
    pub(super) fn openapi_index(&self) -> Value {
        let mut paths = serde_json::Map::new();
        paths.insert(
            "api/v1".into(),
            json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=edgewise"}),
        );
        for (g, v) in self.groups() {
            paths.insert(
                format!("apis/{g}/{v}"),
                json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=edgewise")}),
            );
        }
        json!({"paths": paths})
    }

    /// An OpenAPI v3 document: schemas (for `kubectl explain`) and, per resource, the
    /// create and patch operations with their `fieldValidation` parameter, which is how
    /// kubectl learns that this server validates (so it needs no v2 document).
    pub(super) fn openapi(&self, group: &str, version: &str) -> Value {
        let mut schemas = serde_json::Map::new();
        let mut paths = serde_json::Map::new();
        for r in self
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            let gvk = json!({"group": group, "version": version, "kind": r.kind});
            let mut schema = r.schema.clone().unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
            schema["x-kubernetes-group-version-kind"] = json!([gvk.clone()]);
            let prefix: Vec<&str> = if group.is_empty() {
                vec!["io", "k8s", "api", "core"]
            } else {
                group.split('.').rev().collect()
            };
            let name = format!("{}.{version}.{}", prefix.join("."), r.kind);
            schemas.insert(name.clone(), schema);
            let base = if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            };
            let collection = if r.namespaced {
                format!("{base}/namespaces/{{namespace}}/{}", r.plural)
            } else {
                format!("{base}/{}", r.plural)
            };
            let op = |action: &str| {
                json!({
                    "x-kubernetes-action": action,
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}],
                    "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}}}
                })
            };
            paths.insert(collection.clone(), json!({"post": op("post")}));
            paths.insert(
                format!("{collection}/{{name}}"),
                json!({"patch": op("patch"), "put": op("put")}),
            );
        }
        json!({"openapi": "3.0.0", "info": {"title": "Edgewise dev API", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": schemas}})
    }
}
