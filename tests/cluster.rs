//! Opt-in end-to-end suite against a real Kubernetes cluster (kind, k3d, …). It needs the
//! `e2e-cluster` feature and `EDGEWISE_E2E_KUBECONFIG` naming a throwaway cluster: it applies
//! the CRDs and replaces the Edgewise resources in the `edgewise` namespace.
//!
//! ```text
//! kind create cluster --name edgewise-e2e
//! EDGEWISE_E2E_KUBECONFIG=$HOME/.kube/config \
//!   cargo test -p edgewise-tests --features e2e-cluster --test cluster -- --test-threads 1
//! ```
//!
//! The controllers, gateway, S3, ClickHouse and the simulated fleet run on this machine, as
//! in `edgewise-dev --kubeconfig`; the cluster's API server does admission (OpenAPI
//! schema and CEL) and storage.

use std::path::PathBuf;
use std::time::Duration;

use edgewise_core::rollout::Phase;
use edgewise_operator::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use edgewise_tests::*;
use kube::api::{Api, DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn kubeconfig() -> PathBuf {
    std::env::var_os("EDGEWISE_E2E_KUBECONFIG")
        .map(PathBuf::from)
        .expect("set EDGEWISE_E2E_KUBECONFIG to the kubeconfig of a throwaway kind/k3d cluster")
}

async fn cluster() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

/// Removes what an earlier run left, so the demo starts from nothing.
async fn clear(client: &Client) {
    async fn clear_kind<K>(api: Api<K>)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .is_err()
        {
            return; // The CRD is not installed yet: nothing to clear.
        }
        for _ in 0..120 {
            if api
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("earlier resources were not deleted within 60 s");
    }
    clear_kind(Api::<ModelRollout>::namespaced(client.clone(), "edgewise")).await;
    clear_kind(Api::<RoutingPolicy>::namespaced(client.clone(), "edgewise")).await;
    clear_kind(Api::<ModelVersion>::namespaced(client.clone(), "edgewise")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_against_a_real_cluster() {
    init_logging();
    let client = cluster().await;
    clear(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    edgewise_dev::run(
        dev_options(dir.path(), 50, true, Some(kubeconfig())),
        CancellationToken::new(),
    )
    .await
    .expect("every demo step succeeds on the real cluster");

    let mros: Api<ModelRollout> = Api::namespaced(client, "edgewise");
    let rollout = mros.get("assistant").await.expect("rollout");
    let status = rollout.status.expect("status written by the controller");
    assert_eq!(status.state.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.state.stable_version.as_deref(), Some("2.0.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_api_server_enforces_the_crd_schema_and_cel_rules() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    // Starting the stack installs the CRDs; the rules are then the API server's own.
    let stack = edgewise_dev::DevStack::start(
        &dev_options(dir.path(), 1, false, Some(kubeconfig())),
        CancellationToken::new(),
    )
    .await
    .expect("stack");

    let mvs: Api<ModelVersion> = Api::namespaced(stack.client.clone(), "edgewise");
    let mut bad = example("modelversion.yaml");
    bad["metadata"]["name"] = json!("e2e-bad-digest");
    bad["spec"]["variants"][0]["artifact"]["sha256"] = json!("abc");
    assert_create_rejected(&mvs, bad, "sha256").await;

    let mros: Api<ModelRollout> = Api::namespaced(stack.client.clone(), "edgewise");
    let mut bad = example("modelrollout.yaml");
    bad["metadata"]["name"] = json!("e2e-decreasing");
    bad["spec"]["steps"] = json!([{"setPercent": 50}, {"setPercent": 10}]);
    assert_create_rejected(&mros, bad, "never decrease").await;
    stack.stop().await;
}

/// The kubectl scenarios the dev API is held to (`tests/kubectl_semantics.rs`), on the real
/// API server: what they assert is what kube-apiserver answers.
#[test]
fn kubectl_semantics_match_the_dev_api() {
    let scratch = tempfile::tempdir().expect("tempdir");
    edgewise_tests::conformance::all(&edgewise_tests::conformance::Cluster {
        kubeconfig: kubeconfig(),
        namespace: "edgewise-conformance".into(),
        scratch: scratch.path().to_owned(),
    });
}
