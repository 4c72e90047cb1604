//! A Kubernetes-compatible API endpoint for the Edgewise resources, for the dev stack and
//! the tests — never production. It serves discovery, the three Edgewise kinds and the
//! built-ins the product uses, with CRUD, the status subresource, JSON merge, JSON and
//! apply patches, finalizers, generation, label and field selectors, resourceVersion
//! conflicts, list+watch with bookmarks and `410 Gone`, Table responses for `kubectl get`,
//! and admission against the CRDs' schemas and CEL rules. State is persisted in an
//! embedded database under the data dir.
//!
//! Server-side apply is simplified: an apply patch merges the applied fields into the
//! object (creating it when absent) without tracking field ownership; `fieldManager` is
//! required and `force` accepted, as kube-rs and kubectl send them.

// Handlers answer errors as ready-made `Status` responses; boxing them buys nothing here.
#![allow(clippy::result_large_err)]

mod resources;
mod selectors;
mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

pub use resources::Resource;
use selectors::{FieldSelector, LabelSelector};
use store::{Change, Store};

/// Why the dev API could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Binding.
    #[error("binding the dev API on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

struct Api {
    /// Ends open watches when the server stops (graceful shutdown waits for them).
    shutdown: CancellationToken,
    store: Mutex<Store>,
    resources: Vec<Resource>,
    bookmark_every: Duration,
}

/// A running dev API endpoint.
#[derive(Debug)]
pub struct DevApi {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DevApi {
    /// Serves on `bind` with state under `data_dir` (`devapi.redb`).
    ///
    /// # Errors
    /// [`Error`] when the store or the address is unusable.
    pub async fn start(data_dir: &Path, bind: SocketAddr) -> Result<Self, Error> {
        Self::start_with(data_dir, bind, Duration::from_secs(10), store::LOG).await
    }

    /// As [`DevApi::start`], sending watch bookmarks every `bookmark_every` and keeping
    /// `log_capacity` events for watches to resume from.
    ///
    /// # Errors
    /// [`Error`] when the store or the address is unusable.
    pub async fn start_with(
        data_dir: &Path,
        bind: SocketAddr,
        bookmark_every: Duration,
        log_capacity: usize,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Bind { addr: bind, source })?;
        let mut store = Store::open(&data_dir.join("devapi.redb"), log_capacity)?;
        if store.get("/v1/namespaces", "", "default").is_none() {
            store.write(
                "/v1/namespaces",
                "",
                "default",
                new_namespace("default"),
                Change::Added,
            )?;
        }
        let shutdown = CancellationToken::new();
        let api = Arc::new(Api {
            shutdown: shutdown.clone(),
            store: Mutex::new(store),
            resources: resources::all(),
            bookmark_every,
        });
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let app = axum::Router::new().fallback(handle).with_state(api);
        let stop = shutdown.clone();
        let task = tokio::spawn(
            async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    warn!(error = %e, "dev API stopped");
                }
            }
            .instrument(info_span!("devapi", %addr)),
        );
        Ok(DevApi {
            addr,
            shutdown,
            task,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this endpoint (no credentials: loopback only).
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: edgewise-dev\n  cluster:\n    server: {}\ncontexts:\n- name: edgewise-dev\n  context:\n    cluster: edgewise-dev\n    user: edgewise-dev\n    namespace: default\ncurrent-context: edgewise-dev\nusers:\n- name: edgewise-dev\n  user: {{}}\n",
            self.url()
        )
    }

    /// Stops serving (open watches end).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn new_namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": uid(), "creationTimestamp": now()},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    })
}

/// Marks a written CRD established, as a real API server does once it serves it. The dev API
/// serves the Edgewise CRDs from the start, so applying them here (what
/// `dev --kubeconfig` and installers do) is accepted and they are ready at once.
fn established(r: &Resource, obj: &mut Value) {
    if r.kind == "CustomResourceDefinition" {
        obj["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
        ]});
    }
}

fn uid() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A `Status` failure response.
fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason,
        "details": details, "code": code.as_u16()
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(r: &Resource, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}.{} \"{name}\" not found", r.plural, r.group),
        json!({"name": name, "group": r.group, "kind": r.plural}),
    )
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    axum::extract::Query::<BTreeMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

async fn handle(
    State(api): State<Arc<Api>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path: Vec<&str> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let q = query(&uri);
    match path.as_slice() {
        ["version"] => ok_json(
            StatusCode::OK,
            &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-edgewise-dev", "platform": "linux/amd64"}),
        ),
        ["healthz"] | ["readyz"] | ["livez"] => (StatusCode::OK, "ok").into_response(),
        ["api"] => ok_json(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["apis"] => ok_json(StatusCode::OK, &api.group_list()),
        ["api", "v1"] => ok_json(StatusCode::OK, &api.resource_list("", "v1")),
        ["apis", group] => match api.group(group) {
            Some(g) => ok_json(StatusCode::OK, &g),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("group {group} not found"),
                json!({}),
            ),
        },
        ["apis", group, version] => ok_json(StatusCode::OK, &api.resource_list(group, version)),
        ["openapi", "v3"] => ok_json(StatusCode::OK, &api.openapi_index()),
        ["openapi", "v3", "api", "v1"] => ok_json(StatusCode::OK, &api.openapi("", "v1")),
        ["openapi", "v3", "apis", group, version] => {
            ok_json(StatusCode::OK, &api.openapi(group, version))
        }
        ["api", "v1", rest @ ..] => {
            api.resource_request("", "v1", rest, &method, &q, &headers, body)
                .await
        }
        ["apis", group, version, rest @ ..] => {
            api.resource_request(group, version, rest, &method, &q, &headers, body)
                .await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource {}",
                uri.path()
            ),
            json!({}),
        ),
    }
}

/// Where a request points.
struct Target<'a> {
    resource: &'a Resource,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Api {
    fn groups(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for r in &self.resources {
            if !r.group.is_empty() && !out.contains(&(r.group, r.version)) {
                out.push((r.group, r.version));
            }
        }
        out
    }

    fn group(&self, group: &str) -> Option<Value> {
        self.groups().into_iter().find(|(g, _)| *g == group).map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
    }

    fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .into_iter()
            .filter_map(|(g, _)| self.group(g))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    fn resource_list(&self, group: &str, version: &str) -> Value {
        let verbs = json!([
            "create", "delete", "get", "list", "patch", "update", "watch"
        ]);
        let mut list = Vec::new();
        for r in self
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            list.push(json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs, "shortNames": r.short_names, "categories": r.categories,
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
    fn openapi_index(&self) -> Value {
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
    fn openapi(&self, group: &str, version: &str) -> Value {
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

    fn target<'a>(&'a self, group: &str, version: &str, rest: &[&str]) -> Option<Target<'a>> {
        let find = |plural: &str| {
            self.resources
                .iter()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
        };
        if rest.first() == Some(&"namespaces")
            && rest.len() >= 3
            && let Some(r) = find(rest[2]).filter(|r| r.namespaced)
        {
            return Some(Target {
                resource: r,
                namespace: rest[1].to_owned(),
                name: rest.get(3).map(|s| (*s).to_owned()),
                subresource: rest.get(4).map(|s| (*s).to_owned()),
            });
        }
        let r = find(rest.first()?)?;
        Some(Target {
            resource: r,
            namespace: String::new(),
            name: rest.get(1).map(|s| (*s).to_owned()),
            subresource: rest.get(2).map(|s| (*s).to_owned()),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn resource_request(
        self: &Arc<Self>,
        group: &str,
        version: &str,
        rest: &[&str],
        method: &Method,
        q: &BTreeMap<String, String>,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let Some(t) = self.target(group, version, rest) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
                json!({}),
            );
        };
        if t.subresource
            .as_deref()
            .is_some_and(|s| s != "status" || !t.resource.status)
        {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "no such subresource".into(),
                json!({}),
            );
        }
        let table = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=Table"));
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        match (method.clone(), t.name.clone()) {
            (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(&t, q, table)
            }
            (Method::GET, None) => self.list(&t, q, table),
            (Method::GET, Some(name)) => {
                let store = self
                    .store
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match store.get(&t.resource.key(), &t.namespace, &name) {
                    Some(obj) if table => ok_json(
                        StatusCode::OK,
                        &self.table(t.resource, std::slice::from_ref(obj), store.rv()),
                    ),
                    Some(obj) => ok_json(StatusCode::OK, obj),
                    None => not_found(t.resource, &name),
                }
            }
            (Method::POST, None) => match parse_body(&body, content_type) {
                Ok(obj) => self.create(&t, obj),
                Err(e) => e,
            },
            (Method::PUT, Some(name)) => match parse_body(&body, content_type) {
                Ok(obj) => self.update(&t, &name, obj, false),
                Err(e) => e,
            },
            (Method::PATCH, Some(name)) => self.patch(&t, &name, content_type, &body, q),
            (Method::DELETE, Some(name)) => self.delete(&t, &name),
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported here"),
                json!({}),
            ),
        }
    }

    fn selectors(q: &BTreeMap<String, String>) -> Result<(LabelSelector, FieldSelector), Response> {
        let bad = |m: String| status(StatusCode::BAD_REQUEST, "BadRequest", m, json!({}));
        let labels =
            LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(bad)?;
        let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(|m| status(StatusCode::BAD_REQUEST, "BadRequest", m, json!({})))?;
        Ok((labels, fields))
    }

    fn list(&self, t: &Target<'_>, q: &BTreeMap<String, String>, table: bool) -> Response {
        let (labels, fields) = match Self::selectors(q) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let store = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
        let key = t.resource.key();
        let items: Vec<Value> = store
            .list(&key, ns)
            .filter(|o| labels.matches(o) && fields.matches(o))
            .cloned()
            .collect();
        if table {
            return ok_json(StatusCode::OK, &self.table(t.resource, &items, store.rv()));
        }
        ok_json(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", t.resource.kind), "apiVersion": t.resource.api_version(),
                "metadata": {"resourceVersion": store.rv().to_string()}, "items": items
            }),
        )
    }

    fn table(&self, r: &Resource, items: &[Value], rv: u64) -> Value {
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

    fn admit(r: &Resource, obj: &Value, old: Option<&Value>) -> Result<(), Response> {
        let Some(v) = &r.validator else { return Ok(()) };
        v.validate(obj, old).map_err(|errors| {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let causes: Vec<Value> = errors
                .iter()
                .map(|e| json!({"reason": "FieldValueInvalid", "message": e.message, "field": e.field}))
                .collect();
            let summary: Vec<String> = errors.iter().map(ToString::to_string).collect();
            status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("{}.{} \"{name}\" is invalid: {}", r.kind, r.group, summary.join(", ")),
                json!({"name": name, "group": r.group, "kind": r.kind, "causes": causes}),
            )
        })
    }

    fn create(&self, t: &Target<'_>, mut obj: Value) -> Response {
        let r = t.resource;
        if obj["kind"].as_str().is_some_and(|k| k != r.kind) {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("kind {} does not match {}", obj["kind"], r.kind),
                json!({}),
            );
        }
        obj["kind"] = json!(r.kind);
        obj["apiVersion"] = json!(r.api_version());
        if obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => obj["metadata"]["name"] = json!(format!("{prefix}{}", &uid()[..5])),
                None => {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required".into(),
                        json!({}),
                    );
                }
            }
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if r.namespaced {
            match obj["metadata"]["namespace"].as_str() {
                Some(ns) if ns != t.namespace => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the namespace of the object does not match the namespace on the request"
                            .into(),
                        json!({}),
                    );
                }
                _ => obj["metadata"]["namespace"] = json!(t.namespace),
            }
        }
        obj["metadata"]["uid"] = json!(uid());
        obj["metadata"]["creationTimestamp"] = json!(now());
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
        }
        if r.status {
            obj["metadata"]["generation"] = json!(1);
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        established(r, &mut obj);
        if let Err(e) = Self::admit(r, &obj, None) {
            return e;
        }
        let mut store = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.namespaced && store.get("/v1/namespaces", "", &t.namespace).is_none() {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("namespaces \"{}\" not found", t.namespace),
                json!({"name": t.namespace, "kind": "namespaces"}),
            );
        }
        if store.get(&r.key(), &t.namespace, &name).is_some() {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", r.plural, r.group),
                json!({"name": name, "group": r.group, "kind": r.plural}),
            );
        }
        match store.write(&r.key(), &t.namespace, &name, obj, Change::Added) {
            Ok(o) => ok_json(StatusCode::CREATED, &o),
            Err(e) => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
                json!({}),
            ),
        }
    }

    /// Replaces an object (or its status), enforcing resourceVersion, generation and the
    /// status-subresource split.
    fn update(&self, t: &Target<'_>, name: &str, obj: Value, from_patch: bool) -> Response {
        let r = t.resource;
        let mut store = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(old) = store.get(&r.key(), &t.namespace, name).cloned() else {
            return not_found(r, name);
        };
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            && !from_patch
        {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    r.plural, r.group
                ),
                json!({"name": name, "group": r.group, "kind": r.plural}),
            );
        }
        let status_only = t.subresource.as_deref() == Some("status");
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = obj["status"].clone();
            n
        } else {
            let mut n = obj;
            if r.status {
                n["status"] = old["status"].clone();
                if n["status"].is_null()
                    && let Some(o) = n.as_object_mut()
                {
                    o.remove("status");
                }
            }
            n
        };
        new["kind"] = json!(r.kind);
        new["apiVersion"] = json!(r.api_version());
        for keep in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
        ] {
            if old["metadata"][keep].is_null() {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(keep);
                }
            } else {
                new["metadata"][keep] = old["metadata"][keep].clone();
            }
        }
        if r.status {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = new["spec"] != old["spec"];
            new["metadata"]["generation"] =
                json!(if changed { generation + 1 } else { generation });
        }
        established(r, &mut new);
        if let Err(e) = Self::admit(r, &new, Some(&old)) {
            return e;
        }
        let finalized = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        let change = if finalized {
            Change::Deleted
        } else {
            Change::Modified
        };
        match store.write(&r.key(), &t.namespace, name, new, change) {
            Ok(o) => ok_json(StatusCode::OK, &o),
            Err(e) => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
                json!({}),
            ),
        }
    }

    fn patch(
        &self,
        t: &Target<'_>,
        name: &str,
        content_type: &str,
        body: &Bytes,
        q: &BTreeMap<String, String>,
    ) -> Response {
        let r = t.resource;
        let existing = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&r.key(), &t.namespace, name)
            .cloned();
        let bad = |m: String| status(StatusCode::BAD_REQUEST, "BadRequest", m, json!({}));
        let mut obj = match (&existing, content_type) {
            (_, ct) if ct.starts_with("application/apply-patch") => {
                if q.get("fieldManager").is_none_or(String::is_empty) {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(), json!({}));
                }
                let applied: Value = match serde_yaml_ng::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return bad(format!("apply patch is not YAML or JSON: {e}")),
                };
                match existing.clone() {
                    // Server-side apply creates what does not exist.
                    None if t.subresource.is_none() => {
                        let mut create = applied;
                        create["metadata"]["name"] = json!(name);
                        return self.create(t, create);
                    }
                    None => return not_found(r, name),
                    Some(mut cur) => {
                        json_patch::merge(&mut cur, &strip_nulls(applied));
                        cur
                    }
                }
            }
            (None, _) => return not_found(r, name),
            (Some(cur), ct) if ct.starts_with("application/json-patch+json") => {
                let ops: json_patch::Patch = match serde_json::from_slice(body) {
                    Ok(p) => p,
                    Err(e) => return bad(format!("invalid JSON patch: {e}")),
                };
                let mut doc = cur.clone();
                if let Err(e) = json_patch::patch(&mut doc, &ops) {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!("the JSON patch does not apply: {e}"),
                        json!({}),
                    );
                }
                doc
            }
            (Some(cur), ct)
                if ct.starts_with("application/merge-patch+json")
                    || ct.starts_with("application/strategic-merge-patch+json") =>
            {
                let p: Value = match serde_json::from_slice(body) {
                    Ok(p) => p,
                    Err(e) => return bad(format!("invalid merge patch: {e}")),
                };
                let mut doc = cur.clone();
                json_patch::merge(&mut doc, &p);
                doc
            }
            (Some(_), ct) => {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})"
                    ),
                    json!({}),
                );
            }
        };
        // A patch that names a resourceVersion must match it (optimistic concurrency).
        if let (Some(want), Some(cur)) = (
            obj["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned),
            existing
                .as_ref()
                .and_then(|e| e["metadata"]["resourceVersion"].as_str().map(str::to_owned)),
        ) && want != cur
            && !content_type.starts_with("application/apply-patch")
        {
            let _ = obj;
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified",
                    r.plural, r.group
                ),
                json!({"name": name}),
            );
        }
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.update(t, name, obj, true)
    }

    fn delete(&self, t: &Target<'_>, name: &str) -> Response {
        let r = t.resource;
        let mut store = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut obj) = store.get(&r.key(), &t.namespace, name).cloned() else {
            return not_found(r, name);
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
            && r.kind != "Namespace";
        let (obj, change) = if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
            }
            (obj, Change::Modified)
        } else {
            (obj, Change::Deleted)
        };
        match store.write(&r.key(), &t.namespace, name, obj, change) {
            Ok(o) => ok_json(StatusCode::OK, &o),
            Err(e) => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
                json!({}),
            ),
        }
    }

    fn watch(
        self: &Arc<Self>,
        t: &Target<'_>,
        q: &BTreeMap<String, String>,
        table: bool,
    ) -> Response {
        let (labels, fields) = match Self::selectors(q) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let r = t.resource.clone();
        let key = r.key();
        let namespace = t.namespace.clone();
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let matches = move |o: &Value| {
            (namespace.is_empty()
                || o["metadata"]["namespace"].as_str() == Some(namespace.as_str()))
                && labels.matches(o)
                && fields.matches(o)
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
        // kubectl get -w asks for Table events: one row per event.
        let tabler = self.clone();
        let table_resource = t.resource.clone();
        let line = move |kind: &str, object: &Value| {
            let object = if table && kind != "ERROR" && kind != "BOOKMARK" {
                tabler.table(&table_resource, std::slice::from_ref(object), 0)
            } else {
                object.clone()
            };
            Ok(Bytes::from(format!(
                "{}\n",
                json!({"type": kind, "object": object})
            )))
        };
        let (initial, expired, mut live, rv_now) = {
            let store = self
                .store
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let since = q.get("resourceVersion").map_or("", String::as_str);
            let too_old = since
                .parse::<u64>()
                .is_ok_and(|rv| rv != 0 && rv < store.oldest_resumable());
            let initial: Vec<Result<Bytes, Infallible>> = match since.parse::<u64>() {
                Ok(0) | Err(_) => store
                    .list(&key, None)
                    .filter(|o| matches(o))
                    .map(|o| line("ADDED", o))
                    .collect(),
                Ok(rv) if too_old => {
                    let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {rv} ({})", store.oldest_resumable()),
                        "reason": "Expired", "code": 410});
                    vec![line("ERROR", &gone)]
                }
                Ok(rv) => store
                    .since(&key, rv)
                    .filter(|e| matches(&e.object))
                    .map(|e| line(e.change.as_str(), &e.object))
                    .collect(),
            };
            (initial, too_old, store.subscribe(), store.rv())
        };
        let api = self.clone();
        let every = self.bookmark_every;
        tokio::spawn(async move {
            for l in initial {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if expired {
                return;
            }
            let mut last_rv = rv_now;
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => return,
                    () = api.shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    _ = tick.tick(), if bookmarks => {
                        let rv = api.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rv().max(last_rv);
                        let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                        if tx.send(line("BOOKMARK", &mark)).await.is_err() { return; }
                    }
                    event = live.recv() => match event {
                        Ok(e) if e.resource == key && e.rv > last_rv => {
                            last_rv = e.rv;
                            if matches(&e.object) && tx.send(line(e.change.as_str(), &e.object)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Lagged or closed: end the watch; the client re-lists.
                        Err(_) => return,
                    },
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

fn parse_body(body: &Bytes, content_type: &str) -> Result<Value, Response> {
    let parsed = if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the body is not a valid object: {e}"),
            json!({}),
        )
    })
}

/// Apply patches carry `null` for fields the applier leaves alone.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
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
