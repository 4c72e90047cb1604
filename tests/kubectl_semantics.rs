//! The dev API as kubectl meets it: every scenario of `edgewise_tests::conformance`, each
//! against its own endpoint. `tests/cluster.rs` runs the same scenarios on a real cluster.

use std::time::Duration;

use edgewise_dev::devapi::DevApi;
use edgewise_tests::conformance::{self, Cluster};
use edgewise_tests::*;

/// A dev API endpoint on its own runtime, so kubectl can block the test thread.
struct Endpoint {
    rt: tokio::runtime::Runtime,
    api: Option<DevApi>,
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl Endpoint {
    fn start() -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let api = rt
            .block_on(DevApi::start_with(
                &dir.path().join("api"),
                loopback(),
                Duration::from_millis(200),
                1_000,
            ))
            .expect("starts");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
        let cluster = Cluster {
            kubeconfig,
            namespace: "conformance".into(),
            scratch: dir.path().to_owned(),
        };
        cluster.ensure_namespace();
        Endpoint {
            rt,
            api: Some(api),
            cluster,
            _dir: dir,
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            self.rt.block_on(api.stop());
        }
    }
}

/// One test per scenario, each against its own endpoint.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                conformance::$name(&Endpoint::start().cluster);
            }
        )*
    };
}

scenarios!(
    dry_run_writes_nothing,
    unknown_fields_are_refused_warned_or_pruned,
    names_and_labels_are_validated,
    writes_that_change_nothing_are_no_ops,
    events_read_through_both_apis,
    tables_lists_and_patch_types,
    builtins_and_everyday_commands,
);

#[test]
fn deleting_a_namespace_deletes_its_objects() {
    conformance::deleting_a_namespace_deletes_its_objects(&Endpoint::start().cluster, "doomed");
}
