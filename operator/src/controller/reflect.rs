//! Feeds the gateway's desired state from the custom resources through watches (the same
//! list+watch reflectors use), so a resource change reaches the devices without polling.

use std::collections::HashSet;

use futures_util::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use crate::gateway::{Change, Gateway};

fn key<K: ResourceExt>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

macro_rules! feed {
    ($fn:ident, $kind:ty, $apply:ident, $delete:ident, $map:ident) => {
        async fn $fn(client: Client, gateway: Gateway, shutdown: CancellationToken) {
            let stream = watcher::watcher(Api::<$kind>::all(client), watcher::Config::default());
            let mut stream = Box::pin(stream);
            let mut init: HashSet<(String, String)> = HashSet::new();
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = stream.next() => match e { Some(e) => e, None => return },
                };
                match event {
                    Ok(Event::Apply(o)) => gateway.snapshots().apply([Change::$apply(o)]),
                    Ok(Event::Delete(o)) => gateway.snapshots().apply([Change::$delete(key(&o))]),
                    Ok(Event::Init) => init.clear(),
                    Ok(Event::InitApply(o)) => {
                        init.insert(key(&o));
                        gateway.snapshots().apply([Change::$apply(o)]);
                    }
                    Ok(Event::InitDone) => {
                        // A re-list: drop what no longer exists.
                        let gone: Vec<Change> = gateway
                            .snapshots()
                            .current()
                            .$map
                            .keys()
                            .filter(|k| !init.contains(*k))
                            .map(|k| Change::$delete(k.clone()))
                            .collect();
                        gateway.snapshots().apply(gone);
                    }
                    Err(e) => warn!(error = %e, "watching {}", stringify!($kind)),
                }
            }
        }
    };
}

feed!(
    versions,
    ModelVersion,
    ApplyVersion,
    DeleteVersion,
    model_versions
);
feed!(
    rollouts,
    ModelRollout,
    ApplyRollout,
    DeleteRollout,
    rollouts
);
feed!(policies, RoutingPolicy, ApplyPolicy, DeletePolicy, policies);

/// Keeps `gateway`'s snapshot in line with the cluster until `shutdown`.
pub async fn feed_gateway(client: Client, gateway: Gateway, shutdown: CancellationToken) {
    tokio::join!(
        versions(client.clone(), gateway.clone(), shutdown.clone()),
        rollouts(client.clone(), gateway.clone(), shutdown.clone()),
        policies(client, gateway, shutdown),
    );
}
