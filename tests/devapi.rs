//! The dev stack's Kubernetes-compatible endpoint, driven by kube-rs as a controller would:
//! CRUD, status, all three patch types, finalizers, generation, selectors, conflicts, watch
//! with bookmarks and resumption, 410 Gone, admission (schema and CEL) and persistence.

use std::time::Duration;

use base64::Engine;
use sha2::Digest;

use edgewise_dev::devapi::DevApi;
use edgewise_operator::crd::{ModelRollout, ModelVersion, ModelVersionPhase, ModelVersionStatus};
use edgewise_tests::*;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, Config, ResourceExt};
use serde_json::json;

async fn client(api: &DevApi) -> Client {
    let config = Config::new(api.url().parse().expect("url"));
    Client::try_from(config).expect("client")
}

/// A merge patch of `name`, the way `kubectl patch --type=merge` sends it.
async fn merge<K>(api: &Api<K>, name: &str, body: &serde_json::Value) -> kube::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(body))
        .await
}

/// The same on the status subresource.
async fn merge_status<K>(api: &Api<K>, name: &str, body: &serde_json::Value) -> kube::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(body))
        .await
}

/// An endpoint in a fresh directory (kept alive by the returned guard).
async fn started() -> (tempfile::TempDir, DevApi, Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path()).await;
    (dir, server, c)
}

async fn start(dir: &std::path::Path) -> (DevApi, Client) {
    init_logging();
    let api = DevApi::start_with(dir, loopback(), Duration::from_millis(200), 50)
        .await
        .expect("starts");
    let c = client(&api).await;
    let ns: Api<Namespace> = Api::all(c.clone());
    if ns.get_opt("edgewise").await.expect("get ns").is_none() {
        ns.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "edgewise"}})).expect("ns"),
        )
        .await
        .expect("creates the namespace");
    }
    (api, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_status_patches_generation_and_conflicts() {
    let (_dir, server, c) = started().await;
    let mvs: Api<ModelVersion> = Api::namespaced(c.clone(), "edgewise");
    let mv: ModelVersion = serde_json::from_value(example("modelversion.yaml")).expect("typed");
    let created = mvs
        .create(&PostParams::default(), &mv)
        .await
        .expect("creates");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let dup = mvs
        .create(&PostParams::default(), &mv)
        .await
        .expect_err("exists");
    assert!(
        matches!(dup, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{dup:?}"
    );

    // Status is its own subresource: writing it keeps the spec and the generation.
    let status = json!({"status": {"phase": "Ready", "verified": "2/2"}});
    let after = merge_status(&mvs, "assistant-2.1.0", &status)
        .await
        .expect("status");
    assert_eq!(
        after.status.as_ref().and_then(|s| s.phase),
        Some(ModelVersionPhase::Ready)
    );
    assert_eq!(after.metadata.generation, Some(1));
    // …and the main resource ignores status.
    let mut attempt = after.clone();
    attempt.status = Some(ModelVersionStatus {
        phase: Some(ModelVersionPhase::Failed),
        ..ModelVersionStatus::default()
    });
    let replaced = mvs
        .replace("assistant-2.1.0", &PostParams::default(), &attempt)
        .await
        .expect("replace");
    assert_eq!(
        replaced.status.and_then(|s| s.phase),
        Some(ModelVersionPhase::Ready)
    );

    // A stale resourceVersion conflicts.
    let mut stale = after.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = mvs
        .replace("assistant-2.1.0", &PostParams::default(), &stale)
        .await
        .expect_err("conflict");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );

    // Deprecating is a spec change: generation moves. JSON patch, merge patch and apply all work.
    let deprecated = json!({"spec": {"deprecated": {"reason": "accuracy regression", "removeAfter": "2027-03-01"}}});
    let p = merge(&mvs, "assistant-2.1.0", &deprecated)
        .await
        .expect("merge");
    assert_eq!(p.metadata.generation, Some(2));
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{"op": "add", "path": "/metadata/labels/tier", "value": "gold"}]),
    )
    .expect("patch");
    let p = mvs
        .patch(
            "assistant-2.1.0",
            &PatchParams::default(),
            &Patch::Json::<()>(jp),
        )
        .await
        .expect("json patch");
    assert_eq!(
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("gold")
    );
    assert_eq!(p.metadata.generation, Some(2), "metadata is not spec");
    let apply = json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "metadata": {"name": "assistant-2.1.0", "labels": {"owner": "ml"}}});
    let p = mvs
        .patch(
            "assistant-2.1.0",
            &PatchParams::apply("edgewise-test").force(),
            &Patch::Apply(&apply),
        )
        .await
        .expect("apply");
    assert_eq!(
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("owner"))
            .map(String::as_str),
        Some("ml")
    );

    // Admission: the immutability rule and the schema, with the field named.
    let change = json!({"spec": {"variants": [{"name": "x", "format": "onnx", "artifact": {"uri": "s3://models/other.onnx", "sha256": "0".repeat(64), "sizeBytes": 1}}]}});
    let err = merge(&mvs, "assistant-2.1.0", &change)
        .await
        .expect_err("immutable");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("immutable")),
        "{err:?}"
    );
    let mut bad = example("modelversion.yaml");
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["variants"][0]["artifact"]["sha256"] = json!("abc");
    assert_create_rejected(&mvs, bad, "spec.variants[0].artifact.sha256").await;
    let mut bad = example("modelrollout.yaml");
    bad["spec"]["steps"] = json!([{"setPercent": 50}, {"setPercent": 10}]);
    let mros: Api<ModelRollout> = Api::namespaced(c.clone(), "edgewise");
    assert_create_rejected(&mros, bad, "never decrease").await;

    // Selectors.
    let by_label = mvs
        .list(&ListParams::default().labels("tier=gold"))
        .await
        .expect("list");
    assert_eq!(by_label.items.len(), 1);
    assert!(
        mvs.list(&ListParams::default().labels("tier=silver"))
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let by_name = mvs
        .list(&ListParams::default().fields("metadata.name=assistant-2.1.0"))
        .await
        .expect("list");
    assert_eq!(by_name.items.len(), 1);

    // A namespace that does not exist.
    let other: Api<ConfigMap> = Api::namespaced(c.clone(), "nowhere");
    let err = other
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("cm"),
        )
        .await
        .expect_err("no namespace");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_deletion_until_removed_and_state_survives_a_restart() {
    let (dir, server, c) = started().await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "edgewise");
    let cm = json!({"metadata": {"name": "held", "finalizers": ["edgewise.dev/cleanup"]}, "data": {"a": "1"}});
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(cm).expect("cm"),
    )
    .await
    .expect("creates");
    cms.delete("held", &DeleteParams::default())
        .await
        .expect("deletes");
    let held = cms.get("held").await.expect("still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    let clear = json!({"metadata": {"finalizers": null}});
    merge(&cms, "held", &clear).await.expect("clears");
    assert!(
        cms.get_opt("held").await.expect("get").is_none(),
        "gone once finalized"
    );

    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "kept"}, "data": {"k": "v"}}))
            .expect("cm"),
    )
    .await
    .expect("creates");
    let rv = cms
        .get("kept")
        .await
        .expect("get")
        .metadata
        .resource_version
        .expect("rv");
    server.stop().await;
    let (server, c) = start(dir.path()).await;
    let cms: Api<ConfigMap> = Api::namespaced(c, "edgewise");
    let kept = cms.get("kept").await.expect("survives a restart");
    assert_eq!(kept.metadata.resource_version.as_deref(), Some(rv.as_str()));
    assert_eq!(
        kept.data.and_then(|d| d.get("k").cloned()).as_deref(),
        Some("v")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stream_changes_send_bookmarks_resume_and_expire() {
    let (_dir, server, c) = started().await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "edgewise");
    let list = cms.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "w"}})).expect("cm"),
    )
    .await
    .expect("creates");
    merge(&cms, "w", &json!({"data": {"x": "1"}}))
        .await
        .expect("patches");
    cms.delete("w", &DeleteParams::default())
        .await
        .expect("deletes");
    let mut seen = Vec::new();
    let mut bookmark = false;
    while seen.len() < 3 || !bookmark {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event in time")
            .expect("open")
            .expect("ok")
        {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                seen.push(o.metadata.name.unwrap_or_default())
            }
            WatchEvent::Bookmark(_) => bookmark = true,
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["w", "w", "w"]);

    // Resuming from the list's resourceVersion replays what happened since.
    let mut resumed = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        match resumed.next().await.expect("open").expect("ok") {
            WatchEvent::Added(_) => kinds.push("ADDED"),
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            _ => {}
        }
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);

    // The log keeps 50 events here: a resourceVersion older than that is Gone.
    for i in 0..60 {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("n{i}")}})).expect("cm"),
        )
        .await
        .expect("creates");
    }
    let mut old = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match old.next().await.expect("an answer").expect("ok") {
        WatchEvent::Error(e) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // kube-runtime's watcher (what reflectors use) lists and then follows.
    let events = kube::runtime::watcher(
        cms.clone(),
        kube::runtime::watcher::Config::default().labels("app=x"),
    );
    let mut events = Box::pin(events);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "labelled", "labels": {"app": "x"}}}))
            .expect("cm"),
    )
    .await
    .expect("creates");
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            match e.expect("watcher") {
                kube::runtime::watcher::Event::Apply(o)
                | kube::runtime::watcher::Event::InitApply(o)
                    if o.metadata.name.as_deref() == Some("labelled") =>
                {
                    return true;
                }
                _ => {}
            }
        }
        false
    })
    .await
    .expect("in time");
    assert!(found);
    server.stop().await;
}

/// Runs kubectl against the dev API; returns stdout, panicking with stderr on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_the_dev_api_like_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = DevApi::start_with(dir.path(), loopback(), Duration::from_millis(500), 1000)
        .await
        .expect("starts");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).expect("kubeconfig");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let ns = dir.path().join("ns.yaml");
    std::fs::write(
        &ns,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: edgewise\n",
    )
    .expect("ns");
    let kc2 = kc.clone();
    let run = move |args: Vec<String>| {
        let kc = kc2.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                kubectl(&kc, &args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .await
            .expect("joins")
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
    run(s(&["apply", "-f", ns.to_str().expect("utf-8")])).await;
    let applied = run(s(&[
        "apply",
        "-n",
        "edgewise",
        "-f",
        examples.to_str().expect("utf-8"),
    ]))
    .await;
    assert!(
        applied.contains("modelversion.edgewise.dev/assistant-2.1.0 created"),
        "{applied}"
    );

    let got = run(s(&["get", "mv,mro,rp", "-n", "edgewise"])).await;
    for column in [
        "MODEL", "VERSION", "PHASE", "STABLE", "CANARY", "PERCENT", "PRIORITY", "ACKED",
    ] {
        assert!(
            got.contains(column),
            "printer column {column} missing:\n{got}"
        );
    }
    assert!(
        run(s(&["get", "edgewise", "-n", "edgewise"]))
            .await
            .contains("assistant-eu-beta"),
        "category edgewise"
    );
    let described = run(s(&[
        "describe",
        "mro",
        "assistant-eu-beta",
        "-n",
        "edgewise",
    ]))
    .await;
    assert!(
        described.contains("Set Percent") && described.contains("Kind:         ModelRollout"),
        "{described}"
    );

    // get -w sees an update made while it watches.
    let watch = tokio::task::spawn_blocking({
        let kc = kc.clone();
        move || {
            std::process::Command::new("timeout")
                .args(["6", "kubectl", "--kubeconfig"])
                .arg(&kc)
                .args([
                    "get",
                    "mro",
                    "-n",
                    "edgewise",
                    "-w",
                    "--output-watch-events",
                ])
                .output()
                .expect("runs")
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // `kubectl patch --type merge` of the example rollout.
    let merge_patch = |body: &'static str| {
        [
            "patch",
            "mro",
            "assistant-eu-beta",
            "-n",
            "edgewise",
            "--type",
            "merge",
            "-p",
            body,
        ]
    };
    run(s(&merge_patch(r#"{"spec":{"paused":true}}"#))).await;
    let watched = String::from_utf8_lossy(&watch.await.expect("joins").stdout).into_owned();
    assert!(
        watched.contains("MODIFIED") && watched.contains("assistant-eu-beta"),
        "{watched}"
    );

    // Admission errors reach kubectl with the field named.
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(merge_patch(
            r#"{"spec":{"steps":[{"setPercent":50},{"setPercent":10}]}}"#,
        ))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("spec.steps: steps[].setPercent must never decrease")
    );

    let explained = run(s(&["explain", "modelrollouts.spec.steps"])).await;
    assert!(
        explained.contains("setPercent") || explained.contains("steps"),
        "{explained}"
    );
    run(s(&["delete", "rp", "assistant-default", "-n", "edgewise"])).await;
    assert!(
        !run(s(&["get", "rp", "-n", "edgewise"]))
            .await
            .contains("assistant-default")
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubectl_plugin_reports_commands_and_explains_routing() {
    let (dir, server, c) = started().await;
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, server.kubeconfig()).expect("kubeconfig");
    let mros: Api<ModelRollout> = Api::namespaced(c.clone(), "edgewise");
    mros.create(
        &PostParams::default(),
        &serde_json::from_value(example("modelrollout.yaml")).expect("typed"),
    )
    .await
    .expect("creates");
    let rps: Api<edgewise_operator::crd::RoutingPolicy> = Api::namespaced(c.clone(), "edgewise");
    rps.create(
        &PostParams::default(),
        &serde_json::from_value(example("routingpolicy.yaml")).expect("typed"),
    )
    .await
    .expect("creates");
    let plugin = move |args: &[&str]| {
        let out = std::process::Command::new(workspace_binary("kubectl-edgewise"))
            .args(["-n", "edgewise"])
            .args(args)
            .env("KUBECONFIG", &kc)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = tokio::task::spawn_blocking({
        let plugin = plugin.clone();
        move || plugin(&["status"])
    })
    .await
    .expect("joins");
    assert!(
        status.contains("assistant-eu-beta") && status.contains("PHASE"),
        "{status}"
    );
    for (cmd, annotation) in [
        ("promote", "edgewise.dev/promote"),
        ("abort", "edgewise.dev/abort"),
        ("retry", "edgewise.dev/retry"),
    ] {
        let p = plugin.clone();
        // No controller runs here: only the request is checked (tests/rollouts.rs waits for
        // the controller's answer).
        tokio::task::spawn_blocking(move || p(&["--no-wait", cmd, "assistant-eu-beta"]))
            .await
            .expect("joins");
        let r = mros.get("assistant-eu-beta").await.expect("get");
        assert!(r.annotations().contains_key(annotation), "{cmd}");
    }
    let p = plugin.clone();
    tokio::task::spawn_blocking(move || p(&["pause", "assistant-eu-beta"]))
        .await
        .expect("joins");
    assert!(
        mros.get("assistant-eu-beta")
            .await
            .expect("get")
            .spec
            .strategy
            .paused
    );
    let p = plugin.clone();
    let explained = tokio::task::spawn_blocking(move || {
        p(&[
            "explain",
            "assistant-default",
            "--data-class",
            "private",
            "--task",
            "reasoning",
        ])
    })
    .await
    .expect("joins");
    assert!(
        explained.contains("rule 0 \"private-stays-on-device\"")
            && explained.contains("never leaves"),
        "{explained}"
    );
    let p = plugin.clone();
    let offline = tokio::task::spawn_blocking(move || {
        p(&[
            "explain",
            "assistant-default",
            "--task",
            "reasoning",
            "--network",
            "offline",
        ])
    })
    .await
    .expect("joins");
    assert!(offline.contains("offline-on-device"), "{offline}");

    // As kubectl does: the context's namespace when -n is absent, -A for every namespace,
    // and errors as the server said them, not as Rust debug output.
    let in_context = dir.path().join("kubeconfig-edgewise");
    std::fs::write(
        &in_context,
        server
            .kubeconfig()
            .replace("namespace: default", "namespace: edgewise"),
    )
    .expect("kubeconfig");
    let bare = move |args: &'static [&'static str]| {
        let kc = in_context.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(workspace_binary("kubectl-edgewise"))
                .args(args)
                .env("KUBECONFIG", &kc)
                .output()
                .expect("runs")
        })
    };
    let listed = bare(&["status"]).await.expect("joins");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("assistant-eu-beta"),
        "the context's namespace is used: {listed:?}"
    );
    let all = bare(&["status", "-A"]).await.expect("joins");
    let all = String::from_utf8_lossy(&all.stdout).into_owned();
    assert!(
        all.starts_with("NAMESPACE")
            && all.contains("edgewise ")
            && all.contains("assistant-eu-beta"),
        "{all}"
    );
    let missing = bare(&["-n", "default", "promote", "nope"])
        .await
        .expect("joins");
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr).into_owned();
    assert!(
        said.contains("Error from server (NotFound)") && !said.contains("Api("),
        "{said}"
    );
    let empty = bare(&["-n", "default", "status"]).await.expect("joins");
    assert_eq!(
        String::from_utf8_lossy(&empty.stdout).trim(),
        "No rollouts found in default namespace."
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_publishes_files_and_creates_a_model_version_that_verifies() {
    let (dir, server, c) = started().await;
    let s3 = edgewise_dev::s3_server::EmbeddedS3::start(
        &dir.path().join("s3"),
        loopback(),
        "publish-key",
        "publish-secret",
    )
    .await
    .expect("s3");
    let s3_client = s3.settings().client();
    s3_client
        .create_bucket()
        .bucket("releases")
        .send()
        .await
        .expect("bucket");
    // Big enough for a multipart upload of three parts, and a one-part file.
    let big: Vec<u8> = (0..(edgewise_operator::publish::PART_BYTES * 2 + 12_345))
        .map(|i| (i % 251) as u8)
        .collect();
    let small = b"a small onnx file".to_vec();
    std::fs::write(dir.path().join("model-q4.gguf"), &big).expect("writes");
    std::fs::write(dir.path().join("model.onnx"), &small).expect("writes");
    let seed = [7u8; 32];
    let key_file = dir.path().join("signing.key");
    std::fs::write(
        &key_file,
        base64::engine::general_purpose::STANDARD.encode(seed),
    )
    .expect("key");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, server.kubeconfig()).expect("kubeconfig");
    let gguf = format!(
        "q4={},platforms=linux/arm64;android/arm64,min-memory-mib=4096",
        dir.path().join("model-q4.gguf").display()
    );
    let onnx = format!("cpu={}", dir.path().join("model.onnx").display());
    let out = tokio::process::Command::new(workspace_binary("kubectl-edgewise"))
        .env("KUBECONFIG", &kc)
        .args([
            "-n", "edgewise", "publish", "chat", "1.4.0", "--bucket", "releases",
        ])
        .args(["--variant", &gguf, "--variant", &onnx])
        .arg("--signing-key")
        .arg(&key_file)
        .args(["--s3-endpoint", &s3.endpoint()])
        .args([
            "--s3-access-key-id",
            "publish-key",
            "--s3-secret-access-key",
            "publish-secret",
        ])
        .output()
        .await
        .expect("runs");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{progress}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("modelversion.edgewise.dev/chat-1.4.0 created")
    );
    assert!(
        progress.contains("uploading q4:") && progress.contains("(100 %)"),
        "{progress}"
    );

    let mv = Api::<ModelVersion>::namespaced(c.clone(), "edgewise")
        .get("chat-1.4.0")
        .await
        .expect("created");
    let variants = &mv.spec.variants;
    assert_eq!(variants.len(), 2);
    let verifying = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    for (v, bytes) in [(&variants[0], &big), (&variants[1], &small)] {
        let digest = sha2::Sha256::digest(bytes);
        assert_eq!(v.artifact.sha256, hex::encode(digest), "{}", v.name);
        assert_eq!(v.artifact.size_bytes, bytes.len() as u64);
        let (bucket, key) = v.artifact.location().expect("s3 uri");
        let stored = s3_client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("uploaded")
            .body
            .collect()
            .await
            .expect("reads")
            .into_bytes();
        assert_eq!(&stored[..], &bytes[..], "{} stored whole", v.name);
        let signature = base64::engine::general_purpose::STANDARD
            .decode(v.artifact.signature.as_deref().expect("signed"))
            .expect("base64");
        let signature = ed25519_dalek::Signature::from_slice(&signature).expect("signature");
        let signed = edgewise_proto::identity::artifact_signing_message(
            "chat",
            "1.4.0",
            &v.name,
            &v.artifact.sha256,
        );
        verifying
            .verify_strict(&signed, &signature)
            .expect("the signature covers model, version, variant and digest");
    }
    assert_eq!(variants[0].requires.min_memory_mib, Some(4096));
    assert_eq!(
        variants[0].format,
        edgewise_core::variant::ModelFormat::Gguf
    );

    // The controller verifies the signatures too, with the namespace's publisher keys: the
    // signer is named per variant. A namespace requiring signatures fails an unsigned one.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "edgewise");
    let publishers = |extra: &[(&str, &str)]| {
        let mut data = serde_json::Map::new();
        data.insert(
            "release-team".into(),
            base64::engine::general_purpose::STANDARD
                .encode(verifying.as_bytes())
                .into(),
        );
        for (k, v) in extra {
            data.insert((*k).into(), (*v).into());
        }
        serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(json!({
            "metadata": {"name": "edgewise-publishers", "namespace": "edgewise"},
            "data": data,
        }))
        .expect("configmap")
    };
    maps.create(&PostParams::default(), &publishers(&[]))
        .await
        .expect("publishers");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(edgewise_operator::controller::run(
        std::sync::Arc::new(edgewise_operator::controller::Context::new(
            c.clone(),
            s3_client.clone(),
            None,
            None,
            None,
        )),
        stop.clone(),
    ));
    let mvs = Api::<ModelVersion>::namespaced(c.clone(), "edgewise");
    let verified = |name: &'static str| {
        let mvs = mvs.clone();
        async move {
            eventually(Duration::from_secs(20), name, || async {
                mvs.get(name)
                    .await
                    .ok()
                    .and_then(|m| m.status)
                    .filter(|s| s.observed_generation.is_some() && s.variants.len() == 2)
            })
            .await
        }
    };
    let status = verified("chat-1.4.0").await;
    for v in &status.variants {
        assert!(v.verified, "{v:?}");
        assert_eq!(v.signed_by.as_deref(), Some("release-team"), "{v:?}");
    }
    maps.replace(
        "edgewise-publishers",
        &PostParams::default(),
        &publishers(&[("requireSigned", "true")]),
    )
    .await
    .expect("require signatures");
    let mut unsigned = mv.clone();
    unsigned.metadata = kube::api::ObjectMeta {
        name: Some("chat-1.4.1".into()),
        namespace: Some("edgewise".into()),
        ..Default::default()
    };
    unsigned.spec.version = "1.4.1".into();
    for v in &mut unsigned.spec.variants {
        v.artifact.signature = None;
    }
    unsigned.status = None;
    mvs.create(&PostParams::default(), &unsigned)
        .await
        .expect("created");
    let status = verified("chat-1.4.1").await;
    assert_eq!(
        status.phase,
        Some(edgewise_operator::crd::ModelVersionPhase::Failed)
    );
    assert!(
        status.variants.iter().all(|v| !v.verified
            && v.message
                .as_deref()
                .is_some_and(|m| m.contains("requireSigned"))),
        "{status:?}"
    );
    stop.cancel();

    // A file that is not there is a sentence naming it, and nothing is created.
    let missing = tokio::process::Command::new(workspace_binary("kubectl-edgewise"))
        .env("KUBECONFIG", &kc)
        .args([
            "-n", "edgewise", "publish", "chat", "1.5.0", "--bucket", "releases",
        ])
        .args(["--variant", "cpu=/nonexistent/model.onnx"])
        .args(["--s3-endpoint", &s3.endpoint()])
        .output()
        .await
        .expect("runs");
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/model.onnx: No such file"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    s3.stop().await;
    server.stop().await;
}

/// The same semantics as `tests/kubectl_semantics.rs`, through kube-rs: dry runs (create,
/// patch, delete), strict field validation on a patch, pruning, and a no-op write that sends
/// no watch event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_sees_dry_runs_field_validation_and_no_op_writes() {
    let (_dir, server, c) = started().await;
    let mros: Api<ModelRollout> = Api::namespaced(c, "edgewise");
    let mut doc = edgewise_tests::conformance::rollout("kube-rs");
    doc["metadata"]["namespace"] = json!("edgewise");
    let typed: ModelRollout = serde_json::from_value(doc.clone()).expect("typed");
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let previewed = mros.create(&dry, &typed).await.expect("dry-run create");
    assert!(previewed.metadata.resource_version.is_none());
    assert!(
        mros.get_opt("kube-rs").await.expect("get").is_none(),
        "not stored"
    );
    let created = mros
        .create(&PostParams::default(), &typed)
        .await
        .expect("creates");
    let rv = created.metadata.resource_version.clone();

    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let err = mros
        .patch(
            "kube-rs",
            &strict,
            &Patch::Merge(json!({"spec": {"colour": "red"}})),
        )
        .await
        .expect_err("strict refuses unknown fields");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400 && s.message.contains("unknown field \"spec.colour\"")),
        "{err:?}"
    );
    // Not strict: pruned, and since nothing else changed, nothing is written.
    let pruned = merge(&mros, "kube-rs", &json!({"spec": {"colour": "red"}}))
        .await
        .expect("warns and prunes");
    assert_eq!(
        pruned.metadata.resource_version, rv,
        "a no-op keeps its resourceVersion"
    );
    let dry_patch = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let preview = mros
        .patch(
            "kube-rs",
            &dry_patch,
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("dry-run patch");
    assert!(preview.spec.strategy.paused, "the answer shows the change");
    let dry_delete = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    mros.delete("kube-rs", &dry_delete)
        .await
        .expect("dry-run delete");
    let live = mros.get("kube-rs").await.expect("still there");
    assert_eq!(live.metadata.resource_version, rv, "dry runs wrote nothing");
    assert!(!live.spec.strategy.paused);

    // A write of the same object sends no watch event; a real change does.
    let mut watch = mros
        .watch(
            &WatchParams::default().timeout(3),
            rv.as_deref().unwrap_or("0"),
        )
        .await
        .expect("watches")
        .boxed();
    mros.replace("kube-rs", &PostParams::default(), &live)
        .await
        .expect("same object");
    merge(&mros, "kube-rs", &json!({"spec": {"paused": true}}))
        .await
        .expect("a change");
    let mut modified = 0;
    while let Some(event) = watch.next().await {
        if let Ok(WatchEvent::Modified(m)) = event {
            assert!(m.spec.strategy.paused, "the only event is the real change");
            modified += 1;
        }
    }
    assert_eq!(modified, 1);
    server.stop().await;
}
