//! End to end on the dev stack: the dev Kubernetes API, a real S3 server, a real ClickHouse
//! server, the controllers, the gateway and 100 simulated devices with synthetic traffic.

use std::path::Path;
use std::time::Duration;

use edgewise_core::rollout::Phase;
use edgewise_dev::{DevOptions, DevStack};
use edgewise_operator::controller::leader::{LeaseConfig, campaign};
use edgewise_operator::crd::{ModelRollout, ModelVersion, ModelVersionPhase, RoutingPolicy};
use edgewise_tests::*;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// One dev stack (or operator process) at a time: each runs a fleet whose devices execute
/// real models, and two or three at once on a 2-core machine starve each other's API
/// servers and timers (a SIGTERM drain then outlived its bound).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(dir: &Path, exit_after_demo: bool) -> DevOptions {
    dev_options(dir, 100, exit_after_demo, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_stack_demo_rolls_a_version_out_on_telemetry_and_succeeds() {
    let _serial = SERIAL.lock().await;
    init_logging();
    // A data dir relative to the working directory, as in the README's `./scripts/dev
    // --data-dir edgewise-dev` (removed when the test ends).
    let dir = tempfile::Builder::new()
        .prefix("dev-stack-test-")
        .tempdir_in(".")
        .expect("tempdir");
    let cwd = std::env::current_dir().expect("cwd");
    let relative = dir.path().strip_prefix(&cwd).unwrap_or(dir.path());
    let relative = relative.strip_prefix(".").unwrap_or(relative);
    assert!(relative.is_relative(), "{}", relative.display());
    edgewise_dev::run(options(relative, true), CancellationToken::new())
        .await
        .expect("every demo step succeeds");
    assert!(dir.path().join("kubeconfig").is_file());
}

/// The `assistant` rollout's status once it has rolled back, within `within`.
async fn rolled_back(
    mros: &Api<ModelRollout>,
    within: Duration,
) -> edgewise_operator::crd::ModelRolloutStatus {
    eventually(within, "rollback", || async {
        mros.get("assistant")
            .await
            .ok()?
            .status
            .filter(|s| s.state.phase == Some(Phase::RolledBack))
    })
    .await
}

fn running(stack: &DevStack, v: &str) -> usize {
    stack
        .fleet
        .summary()
        .active
        .get(&("assistant".to_owned(), v.to_owned()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaching_canary_rolls_back_a_bad_digest_never_ships_and_pauses_wait_for_promotion() {
    let _serial = SERIAL.lock().await;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let stack = DevStack::start(&options(dir.path(), false), shutdown.clone())
        .await
        .expect("starts");
    let mvs: Api<ModelVersion> = Api::namespaced(stack.client.clone(), "edgewise");
    let mros: Api<ModelRollout> = Api::namespaced(stack.client.clone(), "edgewise");
    let rps: Api<RoutingPolicy> = Api::namespaced(stack.client.clone(), "edgewise");
    let apply = PatchParams::apply("test").force();
    for (v, seed, corrupt) in [
        ("1.0.0", 1, false),
        ("2.0.0", 2, false),
        ("3.0.0", 3, false),
        ("4.0.0", 4, true),
    ] {
        publish_cpu_version(&stack.s3_client, &mvs, v, seed, 64 << 10, corrupt).await;
    }
    let policy = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"targets": [{"name": "on-device", "device": {"model": "assistant"}}, {"name": "cloud", "cloud": {"endpoint": "https://x.example.com", "model": "m"}}],
                 "default": {"route": "on-device", "fallback": ["cloud"]}, "shadow": {"sampleRate": 0.1, "target": "cloud"}}
    });
    rps.patch("p", &apply, &Patch::Apply(&policy))
        .await
        .expect("policy");

    // The corrupt version fails verification with the reason.
    let failed = eventually(Duration::from_secs(60), "4.0.0 Failed", || async {
        mvs.get("assistant-4.0.0")
            .await
            .ok()?
            .status
            .filter(|s| s.phase == Some(ModelVersionPhase::Failed))
    })
    .await;
    assert!(
        failed.variants[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("SHA-256 mismatch"),
        "{failed:?}"
    );
    eventually(Duration::from_secs(60), "the others Ready", || async {
        let ready = mvs
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|m| m.status.as_ref().and_then(|s| s.phase) == Some(ModelVersionPhase::Ready))
            .count();
        (ready == 3).then_some(())
    })
    .await;

    // An invalid policy is rejected at admission; a semantically bad one gets a condition.
    let mut dup = policy.clone();
    dup["metadata"]["name"] = json!("dup");
    dup["spec"]["targets"][1]["name"] = json!("on-device");
    dup["spec"]["targets"][1]["device"] = json!({"model": "assistant"});
    dup["spec"]["targets"][1]
        .as_object_mut()
        .expect("object")
        .remove("cloud");
    dup["spec"]
        .as_object_mut()
        .expect("object")
        .remove("shadow");
    let err = rps
        .create(
            &PostParams::default(),
            &serde_json::from_value(dup).expect("typed"),
        )
        .await
        .expect_err("admission");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("unique")),
        "{err:?}"
    );
    let mut bad = policy.clone();
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["default"]["fallback"] = json!(["nowhere"]);
    rps.patch("bad", &apply, &Patch::Apply(&bad))
        .await
        .expect("admitted");
    let condition = eventually(Duration::from_secs(30), "Accepted=False", || async {
        rps.get("bad")
            .await
            .ok()?
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Accepted" && c.status == "False")
    })
    .await;
    assert!(
        condition
            .message
            .contains("default.fallback[0]: no target named \"nowhere\""),
        "{}",
        condition.message
    );

    // Stable 1.0.0 everywhere it fits.
    let steps = json!([{"setPercent": 30}, {"analysis": {}}, {"setPercent": 100}]);
    rollout_manifest("1.0.0")
        .steps(steps.clone())
        .every("3s")
        .min_samples(20)
        .apply(&mros, "test")
        .await;
    eventually(Duration::from_secs(90), "1.0.0 on 90 devices", || async {
        (running(&stack, "1.0.0") == 90).then_some(())
    })
    .await;

    // 3.0.0 is six times slower: the latency gate fails and every device goes back to 1.0.0.
    rollout_manifest("3.0.0")
        .steps(steps.clone())
        .every("3s")
        .min_samples(20)
        .apply(&mros, "test")
        .await;
    let status = rolled_back(&mros, Duration::from_secs(120)).await;
    assert_latency_gate_breached(&status.state);
    eventually(
        Duration::from_secs(60),
        "everyone back on 1.0.0",
        || async { (running(&stack, "1.0.0") == 90).then_some(()) },
    )
    .await;

    // A version whose artifact failed verification is never assigned.
    rollout_manifest("4.0.0")
        .steps(steps)
        .every("3s")
        .min_samples(20)
        .apply(&mros, "test")
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(running(&stack, "4.0.0"), 0);
    assert_eq!(running(&stack, "1.0.0"), 90);

    // A manual pause holds until promoted.
    let paused = json!([{"setPercent": 50}, {"pause": {}}, {"setPercent": 100}]);
    rollout_manifest("2.0.0")
        .steps(paused)
        .every("3s")
        .min_samples(20)
        .apply(&mros, "test")
        .await;
    eventually(Duration::from_secs(60), "Paused", || async {
        mros.get("assistant")
            .await
            .ok()?
            .status
            .filter(|s| s.state.phase == Some(Phase::Paused) && s.state.percent == 50)
    })
    .await;
    let promote = json!({"metadata": {"annotations": {"edgewise.dev/promote": "now"}}});
    mros.patch(
        "assistant",
        &PatchParams::default(),
        &Patch::Merge(&promote),
    )
    .await
    .expect("annotates");
    eventually(
        Duration::from_secs(60),
        "Succeeded after promote",
        || async {
            mros.get("assistant").await.ok()?.status.filter(|s| {
                s.state.phase == Some(Phase::Succeeded)
                    && s.state.stable_version.as_deref() == Some("2.0.0")
            })
        },
    )
    .await;
    let handled = mros
        .get("assistant")
        .await
        .expect("get")
        .status
        .and_then(|s| s.state.last_command)
        .expect("the handled request is recorded");
    assert!(handled.applied, "{handled:?}");
    assert_eq!(
        (handled.command.as_str(), handled.request.as_str()),
        ("promote", "now")
    );
    eventually(Duration::from_secs(60), "2.0.0 everywhere", || async {
        (running(&stack, "2.0.0") == 90).then_some(())
    })
    .await;
    stack.stop().await;
}

/// `dev --kubeconfig`: the stack applies the CRDs to an existing API endpoint (here a
/// standalone dev API standing in for kind), and its controllers work against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_stack_installs_its_crds_into_an_existing_cluster_and_reconciles_there() {
    let _serial = SERIAL.lock().await;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = edgewise_dev::devapi::DevApi::start(&dir.path().join("cluster"), loopback())
        .await
        .expect("api");
    let kubeconfig = dir.path().join("cluster-kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig()).expect("kubeconfig");
    let stack = DevStack::start(
        &dev_options(&dir.path().join("stack"), 5, false, Some(kubeconfig)),
        CancellationToken::new(),
    )
    .await
    .expect("starts against the cluster");
    assert!(
        stack.api.is_none(),
        "no embedded API when a cluster is given"
    );

    let crds: Api<CustomResourceDefinition> = Api::all(stack.client.clone());
    let mut names: Vec<String> = crds
        .list(&Default::default())
        .await
        .expect("CRDs")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "modelrollouts.edgewise.dev",
            "modelversions.edgewise.dev",
            "routingpolicies.edgewise.dev"
        ]
    );

    let mvs: Api<ModelVersion> = Api::namespaced(stack.client.clone(), "edgewise");
    publish_cpu_version(&stack.s3_client, &mvs, "1.0.0", 1, 64 << 10, false).await;
    eventually(Duration::from_secs(60), "1.0.0 Ready", || async {
        mvs.get("assistant-1.0.0")
            .await
            .ok()?
            .status
            .filter(|s| s.phase == Some(ModelVersionPhase::Ready))
    })
    .await;
    stack.stop().await;
    cluster.stop().await;
}

/// A dev API endpoint for Lease tests, its directory and a client of it.
async fn lease_api() -> (
    tempfile::TempDir,
    edgewise_dev::devapi::DevApi,
    kube::Client,
) {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = edgewise_dev::devapi::DevApi::start(dir.path(), loopback())
        .await
        .expect("starts");
    let client =
        kube::Client::try_from(kube::Config::new(api.url().parse().expect("url"))).expect("client");
    (dir, api, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_fails_over_within_the_lease_duration() {
    let (_dir, api, client) = lease_api().await;
    let config = |id: &str| LeaseConfig {
        namespace: "default".into(),
        name: "edgewise-controller".into(),
        identity: id.into(),
        duration: Duration::from_secs(3),
        renew: Duration::from_millis(300),
        wall_clock: jiff::Timestamp::now,
    };
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let a = campaign(client.clone(), config("a"), a_stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = campaign(client.clone(), config("b"), b_stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(*a.borrow() && !*b.borrow(), "exactly one leader");
    // A crashes (stops renewing without releasing): B takes over once the lease runs out.
    drop(a);
    a_stop.cancel();
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    let _ = lease
        .patch(
            "edgewise-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "a"}})),
        )
        .await;
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(5), "b to lead", || async {
        (*b.borrow()).then_some(())
    })
    .await;
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "took over in {:?}",
        started.elapsed()
    );
    b_stop.cancel();
    api.stop().await;
}

/// Candidates whose wall clocks are an hour ahead and an hour behind never take a Lease that
/// is being renewed: expiry is judged by what each observes on its own monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_never_make_two_leaders() {
    let (_dir, api, client) = lease_api().await;
    fn ahead() -> jiff::Timestamp {
        jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)
    }
    fn behind() -> jiff::Timestamp {
        jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)
    }
    let config = |id: &str, wall_clock: fn() -> jiff::Timestamp| LeaseConfig {
        namespace: "default".into(),
        name: "skewed".into(),
        identity: id.into(),
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(200),
        wall_clock,
    };
    let stop = CancellationToken::new();
    // The holder's clock is an hour behind: its renew times look stale to everyone else.
    let a = campaign(client.clone(), config("a", behind), stop.clone());
    eventually(Duration::from_secs(5), "a to lead", || async {
        (*a.borrow()).then_some(())
    })
    .await;
    let b = campaign(client.clone(), config("b", ahead), stop.clone());
    let c = campaign(
        client.clone(),
        config("c", jiff::Timestamp::now),
        stop.clone(),
    );
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let leaders = [&a, &b, &c].iter().filter(|l| *l.borrow()).count();
        assert!(leaders <= 1, "{leaders} leaders at once");
        assert!(*a.borrow(), "the renewing holder lost its lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_command_serves_against_a_cluster_becomes_ready_and_stops_on_sigterm() {
    let _serial = SERIAL.lock().await;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = edgewise_dev::devapi::DevApi::start(&dir.path().join("api"), loopback())
        .await
        .expect("api");
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).expect("kubeconfig");
    let ch = ClickHouse::start().await;
    let s3 = edgewise_dev::s3_server::EmbeddedS3::start(
        &dir.path().join("s3"),
        loopback(),
        "a",
        "secret-key-1",
    )
    .await
    .expect("s3");
    // The credential keys as a mounted Secret holds them: one `<name>.key` file.
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    std::fs::write(
        keys.join("2026-12-07.key"),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]),
    )
    .expect("key");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .to_string()
    };
    let (health, grpc) = (free(), free());
    let mut child = std::process::Command::new(workspace_binary("edgewise-operator"))
        .args([
            "run",
            "--namespace",
            "default",
            "--health-addr",
            &health,
            "--gateway-addr",
            &grpc,
        ])
        .args([
            "--clickhouse-url",
            &ch.url(),
            "--s3-endpoint",
            &s3.endpoint(),
            "--s3-access-key-id",
            "a",
            "--s3-secret-access-key",
            "secret-key-1",
        ])
        .arg("--credential-keys-dir")
        .arg(&keys)
        .args(["--credential-keys-secret", "edgewise-credential-keys"])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("starts");
    let ready = eventually(Duration::from_secs(30), "/readyz", || {
        let health = health.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&health).await.ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            out.contains("200 OK").then_some(out)
        }
    })
    .await;
    assert!(ready.contains("ready"));
    // The controller leads (the only candidate) and holds the Lease.
    let client =
        kube::Client::try_from(kube::Config::new(api.url().parse().expect("url"))).expect("client");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "default");
    eventually(Duration::from_secs(20), "the Lease", || async {
        leases
            .get_opt("edgewise-controller")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await;
    // The controller made the key Secret; the health port publishes the gateway's keys.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(
        kube::Client::try_from(kube::Config::new(api.url().parse().expect("url"))).expect("client"),
        "default",
    );
    assert!(
        secrets
            .get_opt("edgewise-credential-keys")
            .await
            .expect("get")
            .is_some(),
        "the controller creates the credential key Secret"
    );
    let jwks: serde_json::Value = reqwest::get(format!("http://{health}/.well-known/jwks.json"))
        .await
        .expect("GET jwks")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        jwks["keys"][0]["kid"],
        edgewise_operator::gateway::keys::KeyRing::new(&[7u8; 32], &[]).signing_kid(),
        "{jwks}"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let started = std::time::Instant::now();
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "graceful shutdown is bounded"
    );
    api.stop().await;
}

/// The demo sizes its rollout to the fleet: a fleet too small for a canary and a baseline is
/// refused at once with the size it needs; every other size finishes within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_finishes_or_refuses_clearly_for_every_fleet_size() {
    let _serial = SERIAL.lock().await;
    init_logging();
    for devices in [1, 5, 10, 30] {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            edgewise_dev::run(
                dev_options(dir.path(), devices, true, None),
                CancellationToken::new(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("the demo with {devices} devices ran past a minute"));
        let took = started.elapsed();
        match devices {
            1 => {
                let e = outcome.expect_err("one device cannot be canary and baseline");
                assert!(e.to_string().contains("--devices 2"), "{e}");
                assert!(
                    took < Duration::from_secs(5),
                    "refused at start, took {took:?}"
                );
            }
            _ => outcome.unwrap_or_else(|e| panic!("the demo with {devices} devices: {e}")),
        }
        eprintln!("demo with {devices} devices: {took:?}");
    }
}

/// The README's `kubectl apply -f examples/` against the dev stack, as shipped: the
/// ModelVersion turns Ready (its artifacts are there), every device acks the policy, and the
/// rollout reaches the `eu-beta` devices its selector names (server-side labels from their
/// bootstrap tokens). Then the data dir's credentials survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_work_against_the_dev_stack_as_shipped() {
    let _serial = SERIAL.lock().await;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let stack = DevStack::start(&dev_options(dir.path(), 8, false, None), shutdown.clone())
        .await
        .expect("starts");
    let kc = dir.path().join("kubeconfig");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let run = {
        let kc = kc.clone();
        move |args: Vec<String>| {
            let kc = kc.clone();
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                kubectl(&kc, &args)
            })
        }
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    run(vec![
        "apply".into(),
        "-f".into(),
        examples.display().to_string(),
    ])
    .await
    .expect("joins");
    let waited = run(s(&[
        "wait",
        "-n",
        "edgewise",
        "--for=condition=Ready",
        "mv/assistant-2.1.0",
        "rp/assistant-default",
        "--timeout=90s",
    ]))
    .await
    .expect("joins");
    assert_eq!(waited.matches("condition met").count(), 2, "{waited}");
    // A first version becomes the segment's stable one at once: the rollout is Ready too.
    let rolled = run(s(&[
        "wait",
        "-n",
        "edgewise",
        "--for=condition=Ready",
        "mro/assistant-eu-beta",
        "--timeout=60s",
    ]))
    .await
    .expect("joins");
    assert!(rolled.contains("condition met"), "{rolled}");
    let mros: Api<ModelRollout> = Api::namespaced(stack.client.clone(), "edgewise");
    let rps: Api<RoutingPolicy> = Api::namespaced(stack.client.clone(), "edgewise");
    let reached = eventually(
        Duration::from_secs(90),
        "the rollout reaches its devices and every device acks the policy",
        || async {
            let r = mros.get("assistant-eu-beta").await.ok()?;
            let p = rps.get("assistant-default").await.ok()?;
            let d = r.status?.devices;
            let acked = p.status?.devices.acked;
            (d.installed >= 1 && acked == 8).then_some(d.targeted)
        },
    )
    .await;
    // 8 devices round robin over four segments: two are eu-beta.
    assert_eq!(reached, 2, "the selector picks exactly the eu-beta segment");

    // A rule above the private rule that can send private data to the cloud is called out
    // on the object (and still pushed: it compiles).
    let mut careless = example("routingpolicy.yaml");
    careless["metadata"]["name"] = json!("careless");
    let rules = careless["spec"]["rules"].as_array_mut().expect("rules");
    rules.insert(
        0,
        json!({"name": "long-first", "match": [{"attribute": "inputTokens", "gt": 100}], "route": "cloud-large"}),
    );
    let file = dir.path().join("careless.json");
    std::fs::write(&file, careless.to_string()).expect("writes");
    run(vec![
        "apply".into(),
        "-f".into(),
        file.display().to_string(),
    ])
    .await
    .expect("joins");
    let warned = eventually(Duration::from_secs(30), "the policy warning", || async {
        let p = rps.get("careless").await.ok()?;
        let s = p.status?;
        (s.warning_count > 0).then_some(s.warnings)
    })
    .await;
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("rules[0]: can send dataClass \"private\"")),
        "{warned:?}"
    );
    let listed = run(s(&["get", "rp", "-n", "edgewise", "careless"]))
        .await
        .expect("joins");
    assert!(listed.contains("WARNINGS"), "{listed}");
    let token = std::fs::read_to_string(dir.path().join("bootstrap-token")).expect("token");
    shutdown.cancel();
    stack.stop().await;
    let again = DevStack::start(
        &dev_options(dir.path(), 8, false, None),
        CancellationToken::new(),
    )
    .await
    .expect("restarts");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("bootstrap-token")).expect("token"),
        token,
        "the bootstrap token is kept with the data dir"
    );
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_disagrees_with_the_cloud_is_rolled_back_on_executed_shadows() {
    let _serial = SERIAL.lock().await;
    use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
    use edgewise_dev::cloud::{CLOUD_MODEL, DEMO_MODEL_SEED};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let mut opts = dev_options(dir.path(), 20, false, None);
    opts.traffic_rps = Some(2.0);
    let stack = DevStack::start(&opts, shutdown.clone())
        .await
        .expect("starts");
    let mvs: Api<ModelVersion> = Api::namespaced(stack.client.clone(), "edgewise");
    let mros: Api<ModelRollout> = Api::namespaced(stack.client.clone(), "edgewise");
    let rps: Api<RoutingPolicy> = Api::namespaced(stack.client.clone(), "edgewise");
    let apply = PatchParams::apply("test").force();
    // 1.1.0 is a broken build of 1.0.0's weights (the cloud serves their original): it
    // loads, warms and answers quickly, and its answers rarely agree with the cloud's.
    for (v, damaged) in [("1.0.0", false), ("1.1.0", true)] {
        let model = TinyModel {
            damaged,
            ..TinyModel::new(DEMO_MODEL_SEED, GgmlDType::Q8_0)
        };
        let artifact = edgewise_dev::publish(
            &stack.s3_client,
            &format!("assistant/{v}/cpu.gguf"),
            tiny::bytes(model).expect("model"),
        )
        .await
        .expect("uploads");
        let mv = json!({
            "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "metadata": {"name": format!("assistant-{v}")},
            "spec": {"model": "assistant", "version": v, "variants": [{"name": "cpu", "format": "gguf", "artifact": artifact, "requires": {"minMemoryMiB": 2048}}]}
        });
        mvs.patch(&format!("assistant-{v}"), &apply, &Patch::Apply(&mv))
            .await
            .expect("applies");
    }
    let policy = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"targets": [{"name": "on-device", "device": {"model": "assistant"}},
                             {"name": "cloud", "cloud": {"endpoint": stack.cloud_url, "model": CLOUD_MODEL, "costPer1kTokensUsd": 0.002}}],
                 "default": {"route": "on-device", "fallback": ["cloud"]}, "shadow": {"sampleRate": 0.5, "target": "cloud"}}
    });
    rps.patch("p", &apply, &Patch::Apply(&policy))
        .await
        .expect("policy");
    let steps = json!([{"setPercent": 50}, {"analysis": {}}, {"setPercent": 100}]);
    let agreement =
        json!([{"metric": "cloud_agreement_rate", "min": 0.5, "relativeToBaseline": true}]);
    rollout_manifest("1.0.0")
        .steps(json!([{"setPercent": 100}]))
        .apply(&mros, "test")
        .await;
    // The 1 GiB devices (every tenth) fit no variant.
    eventually(Duration::from_secs(90), "1.0.0 on 18 devices", || async {
        (running(&stack, "1.0.0") == 18).then_some(())
    })
    .await;
    rollout_manifest("1.1.0")
        .steps(steps)
        .gates(agreement)
        .every("3s")
        .min_samples(20)
        .apply(&mros, "test")
        .await;
    let status = rolled_back(&mros, Duration::from_secs(150)).await;
    let analysis = status
        .state
        .last_analysis
        .as_ref()
        .expect("an analysis ran");
    let gate = &analysis.gates[0];
    assert_eq!(gate.metric.as_str(), "cloud_agreement_rate", "{gate:?}");
    // Measured from executed shadows: the broken build agrees far less than the baseline.
    let (canary, baseline) = (
        gate.value.expect("canary"),
        gate.baseline.expect("baseline"),
    );
    assert!(canary < 0.5 * baseline, "{gate:?}");
    assert!(
        baseline > 0.3,
        "the baseline agrees with the cloud: {gate:?}"
    );
    eventually(
        Duration::from_secs(60),
        "everyone back on 1.0.0",
        || async { (running(&stack, "1.0.0") == 18).then_some(()) },
    )
    .await;
    shutdown.cancel();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_api_listens_beyond_loopback_only_when_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = dev_options(dir.path(), 1, false, None);
    opts.api_addr = "0.0.0.0:0".parse().expect("addr");
    let err = DevStack::start(&opts, CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("--allow-remote-api"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "refused before anything started or was written"
    );
}
