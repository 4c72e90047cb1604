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

mod discovery;
mod error;
mod events;
mod objects;
mod patch;
mod protobuf;
mod resources;
mod review;
mod selectors;
mod store;
mod table;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use error::{ApiError, ApiResult, json_response};
use objects::{WriteOptions, Written, new_namespace};
pub use resources::Resource;
use store::{Change, Store};
use table::IncludeObject;

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
    /// The watches' tasks, awaited on stop: they hold the store.
    tasks: TaskTracker,
    /// `None` once stopped: `stop` closes the database itself, so a handler or connection
    /// still unwinding cannot keep the file locked.
    store: Mutex<Option<Store>>,
    resources: Vec<Resource>,
    bookmark_every: Duration,
}

impl Api {
    /// The store; a panic elsewhere while holding it leaves it usable (writes are atomic).
    ///
    /// # Errors
    /// [`ApiError::stopping`] once the endpoint has stopped.
    fn store(&self) -> Result<OpenStore<'_>, ApiError> {
        let guard = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_some() {
            Ok(OpenStore(guard))
        } else {
            Err(ApiError::stopping())
        }
    }

    /// Closes the database (idempotent).
    fn close_store(&self) {
        drop(
            self.store
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

/// The locked store, known to be open.
struct OpenStore<'a>(MutexGuard<'a, Option<Store>>);

impl std::ops::Deref for OpenStore<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        self.0.as_ref().expect("checked open when locked")
    }
}

impl std::ops::DerefMut for OpenStore<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        self.0.as_mut().expect("checked open when locked")
    }
}

/// A running dev API endpoint.
#[derive(Debug)]
pub struct DevApi {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tasks: TaskTracker,
    /// Closes the store on stop; gone once every handler and watch has let go.
    api: Weak<Api>,
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
        let resources = resources::all();
        seed_crds(&mut store, &resources)?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let api = Arc::new(Api {
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            store: Mutex::new(Some(store)),
            resources,
            bookmark_every,
        });
        let (listener, addr) = crate::listen(bind)
            .await
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let weak = Arc::downgrade(&api);
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
            tasks,
            api: weak,
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

    /// Stops serving and returns once the store is closed: open watches end, connections
    /// drain, and a new [`DevApi`] may open the same data dir at once.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.tasks.close();
        self.tasks.wait().await;
        // A connection task may still hold the state while it unwinds; the database is
        // closed here regardless, so the data dir is free when this returns.
        if let Some(api) = self.api.upgrade() {
            api.close_store();
        }
    }
}

/// The CRDs the endpoint serves are objects too (`kubectl get crd`): written at start when
/// absent or changed, left alone otherwise.
fn seed_crds(store: &mut Store, resources: &[Resource]) -> Result<(), store::Error> {
    let Some(crds) = resources
        .iter()
        .find(|r| r.kind == "CustomResourceDefinition")
    else {
        return Ok(());
    };
    let key = crds.key();
    for crd in edgewise_operator::crd::all() {
        let Ok(mut obj) = serde_json::to_value(&crd) else {
            continue;
        };
        let name = crd.metadata.name.clone().unwrap_or_default();
        obj["apiVersion"] = json!("apiextensions.k8s.io/v1");
        obj["kind"] = json!("CustomResourceDefinition");
        match store.get(&key, "", &name).cloned() {
            Some(old) if old["spec"] == obj["spec"] => {}
            old => {
                obj["metadata"]["uid"] = old
                    .as_ref()
                    .map_or_else(|| json!(objects::uid()), |o| o["metadata"]["uid"].clone());
                obj["metadata"]["creationTimestamp"] = old.as_ref().map_or_else(
                    || json!(objects::now()),
                    |o| o["metadata"]["creationTimestamp"].clone(),
                );
                objects::established(crds, &mut obj, old.as_ref());
                let change = if old.is_some() {
                    Change::Modified
                } else {
                    Change::Added
                };
                store.write(&key, "", &name, obj, change)?;
            }
        }
    }
    Ok(())
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
    let ok = |v: &serde_json::Value| Ok(json_response(StatusCode::OK, v));
    let answer: ApiResult = match path.as_slice() {
        ["version"] => ok(
            &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-edgewise-dev", "platform": "linux/amd64"}),
        ),
        ["healthz"] | ["readyz"] | ["livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => ok(
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["apis"] => ok(&api.group_list()),
        ["api", "v1"] => ok(&api.resource_list("", "v1")),
        ["apis", group] => match api.group(group) {
            Some(g) => ok(&g),
            None => Err(ApiError::no_route(format!("group {group} not found"))),
        },
        ["apis", group, version] => ok(&api.resource_list(group, version)),
        ["openapi", "v2"] => Ok(openapi_v2(&headers)),
        ["openapi", "v3"] => ok(&api.openapi_index()),
        ["openapi", "v3", "api", "v1"] => ok(&api.openapi("", "v1")),
        ["openapi", "v3", "apis", group, version] => ok(&api.openapi(group, version)),
        ["api", "v1", rest @ ..] => {
            api.resource_request("", "v1", rest, &method, &q, &headers, &body)
        }
        ["apis", group, version, rest @ ..] => {
            api.resource_request(group, version, rest, &method, &q, &headers, &body)
        }
        _ => Err(ApiError::no_route(format!(
            "the server could not find the requested resource {}",
            uri.path()
        ))),
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// `/openapi/v2` in protobuf, as kubectl asks for it, or JSON.
fn openapi_v2(headers: &HeaderMap) -> Response {
    let wants_protobuf = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(protobuf::OPENAPI_V2_MEDIA_TYPE));
    if wants_protobuf {
        (
            StatusCode::OK,
            // What kube-apiserver answers: Go's mime parser refuses the `@` of the request's.
            [(
                header::CONTENT_TYPE,
                "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )],
            protobuf::openapi_v2(),
        )
            .into_response()
    } else {
        json_response(
            StatusCode::OK,
            &json!({"swagger": "2.0", "info": {"title": "Edgewise dev API", "version": "v1.32.0"}, "paths": {}, "definitions": {}}),
        )
    }
}

/// The verb a request is, as discovery lists verbs.
fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
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
    fn resource_request(
        self: &Arc<Self>,
        group: &str,
        version: &str,
        rest: &[&str],
        method: &Method,
        q: &BTreeMap<String, String>,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> ApiResult {
        let t = self.target(group, version, rest).ok_or_else(|| {
            ApiError::no_route("the server could not find the requested resource")
        })?;
        if t.subresource
            .as_deref()
            .is_some_and(|s| s != "status" || !t.resource.status)
        {
            return Err(ApiError::no_route("no such subresource"));
        }
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let table = header(header::ACCEPT)
            .is_some_and(|a| a.contains("as=Table"))
            .then(|| IncludeObject::from_query(q.get("includeObject").map(String::as_str)));
        let content_type = header(header::CONTENT_TYPE).unwrap_or("application/json");
        let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
        let writing = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method);
        let opts = if writing {
            WriteOptions::from_query(q)?
        } else {
            WriteOptions::default()
        };
        if !t
            .resource
            .verbs
            .contains(&verb(method, t.name.is_some(), watch))
        {
            return Err(ApiError::method_not_allowed(format!(
                "{} does not support {}",
                t.resource.plural,
                verb(method, t.name.is_some(), watch)
            )));
        }
        match (method.clone(), t.name.clone()) {
            (Method::GET, None) if watch => self.watch(&t, q, table),
            (Method::GET, None) => self.list(&t, q, table),
            (Method::GET, Some(name)) => self.get(&t, &name, table),
            (Method::POST, None) => self
                .create(&t, objects::parse_body(body, content_type)?, opts)
                .map(Written::into_response),
            (Method::PUT, Some(name)) => self
                .update(
                    &t,
                    &name,
                    objects::parse_body(body, content_type)?,
                    false,
                    opts,
                )
                .map(Written::into_response),
            (Method::PATCH, Some(name)) => self
                .patch(&t, &name, content_type, body, q, opts)
                .map(Written::into_response),
            (Method::DELETE, Some(name)) => {
                self.delete(&t, &name, opts.with_delete_body(body, content_type)?)
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported here"
            ))),
        }
    }
}
