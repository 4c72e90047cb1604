//! Watches: the initial state (or the changes since a resourceVersion, `410 Expired` when
//! the log no longer holds it), then live changes, bookmarks, and an end at the timeout or
//! when the server stops. `kubectl get -w` gets Table rows.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::error::{ApiError, ApiResult};
use super::objects::selectors;
use super::table::IncludeObject;
use super::{Api, Target};

impl Api {
    pub(super) fn watch(
        self: &Arc<Self>,
        t: &Target<'_>,
        q: &BTreeMap<String, String>,
        table: Option<IncludeObject>,
    ) -> ApiResult {
        let (labels, fields) = selectors(t.resource, q)?;
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
            let object = match table {
                Some(include) if kind != "ERROR" && kind != "BOOKMARK" => {
                    tabler.table(&table_resource, std::slice::from_ref(object), 0, include)
                }
                _ => object.clone(),
            };
            Ok(Bytes::from(format!(
                "{}\n",
                json!({"type": kind, "object": object})
            )))
        };
        let (initial, expired, mut live, rv_now) = {
            let store = self.store()?;
            let since = q.get("resourceVersion").map_or("", String::as_str);
            let too_old = since
                .parse::<u64>()
                .is_ok_and(|rv| rv != 0 && rv < store.oldest_resumable());
            let initial: Vec<Result<Bytes, Infallible>> = match since.parse::<u64>() {
                Ok(0) | Err(_) => store
                    .list(&key, None)
                    .map(|o| r.show(o.clone()))
                    .filter(|o| matches(o))
                    .map(|o| line("ADDED", &o))
                    .collect(),
                Ok(rv) if too_old => {
                    let gone = ApiError::expired(rv, store.oldest_resumable());
                    vec![line("ERROR", &gone.to_status())]
                }
                Ok(rv) => store
                    .since(&key, rv)
                    .map(|e| (e.change, r.show(e.object.clone())))
                    .filter(|(_, o)| matches(o))
                    .map(|(change, o)| line(change.as_str(), &o))
                    .collect(),
            };
            (initial, too_old, store.subscribe(), store.rv())
        };
        let api = self.clone();
        let every = self.bookmark_every;
        self.tasks.spawn(async move {
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
                        let Ok(rv) = api.store().map(|s| s.rv().max(last_rv)) else { return };
                        let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                        if tx.send(line("BOOKMARK", &mark)).await.is_err() { return; }
                    }
                    event = live.recv() => match event {
                        Ok(e) if e.resource == key && e.rv > last_rv => {
                            last_rv = e.rv;
                            let object = r.show(e.object);
                            if matches(&object) && tx.send(line(e.change.as_str(), &object)).await.is_err() {
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
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
    }
}
