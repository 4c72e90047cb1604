//! Device credentials over time: refreshed over Sync before they expire, moved to a new key
//! when the gateways rotate (without a device re-enrolling), cut off when revoked, and
//! verifiable from the published key set by a JWT library we did not write (PyJWT).

use std::time::Duration;

use edgewise_agent::device::Connection;
use edgewise_operator::gateway::GatewayConfig;
use edgewise_operator::gateway::keys::KeyRing;
use edgewise_tests::*;

fn credential(agent: &TestAgent) -> Option<String> {
    agent
        .device
        .identity
        .lock()
        .expect("identity")
        .credential()
        .map(|c| c.token.clone())
}

fn kid_of(h: &Harness, token: &str) -> String {
    let header = token.split('.').next().expect("a JWT");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
            .expect("base64url"),
    )
    .expect("JSON header");
    assert_eq!(header["alg"], "EdDSA");
    // Verifies, too.
    h.gateway.auth().verify_credential(token).expect("valid");
    header["kid"].as_str().expect("kid").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_refresh_over_sync_and_a_key_rotation_cuts_nobody_off() {
    init_logging();
    let ttl = Duration::from_secs(6);
    let mut h = Harness::start_with(GatewayConfig {
        credential_ttl: ttl,
        ..GatewayConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(
        dir.path(),
        &h.gateway_url(),
        facts("linux", "arm64", 4096, &[]),
        None,
    );
    let connected = |a: &TestAgent| *a.device.connection.borrow() == Connection::Connected;
    eventually(Duration::from_secs(20), "the agent to connect", || async {
        connected(&agent).then_some(())
    })
    .await;
    let first = credential(&agent).expect("enrolled");
    let old_kid = kid_of(&h, &first);
    // From here on nobody can enrol: the device lives on refreshed credentials alone.
    h.gateway.auth().set_bootstrap_tokens(Vec::new());

    // Two lifetimes pass; the credential is renewed at half-life each time.
    let mut seen = vec![first.clone()];
    let until = tokio::time::Instant::now() + ttl * 2;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = credential(&agent).expect("a usable credential at every moment");
        assert!(connected(&agent), "the stream stays up");
        if seen.last() != Some(&now) {
            seen.push(now);
        }
    }
    assert!(
        seen.len() >= 4,
        "refreshed about every {:?}: {} credentials in {:?}",
        ttl / 2,
        seen.len(),
        ttl * 2
    );
    assert_eq!(
        agent
            .device
            .stats
            .sync_attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one stream throughout, no reconnect"
    );

    // Rotation: stage the new key, make it the signer, retire the old one.
    let old = edgewise_tests::CREDENTIAL_SEED;
    let new = [42u8; 32];
    h.gateway.auth().set_keys(KeyRing::new(&old, &[new]));
    h.gateway.auth().set_keys(KeyRing::new(&new, &[old]));
    let new_kid = h.gateway.auth().keys().signing_kid().to_owned();
    assert_ne!(new_kid, old_kid);
    eventually(
        ttl / 10 + Duration::from_secs(2),
        "the connected device to hold a credential from the new key",
        || async { credential(&agent).filter(|c| kid_of(&h, c) == new_kid) },
    )
    .await;
    h.gateway.auth().set_keys(KeyRing::new(&new, &[]));
    h.gateway
        .auth()
        .verify_credential(&first)
        .expect_err("the retired key's credentials are refused");
    // The device reconnects on what it holds: no enrolment (there is no token to enrol with).
    h.restart_gateway().await;
    eventually(
        Duration::from_secs(20),
        "a reconnect on the new key's credential",
        || async {
            (connected(&agent)
                && agent
                    .device
                    .stats
                    .sync_attempts
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 1)
            .then_some(())
        },
    )
    .await;
    assert_eq!(kid_of(&h, &credential(&agent).expect("held")), new_kid);

    // Revoked while connected: the stream ends at once, and with no token it stays out.
    let device_id = agent.device.device_id.clone();
    h.gateway.auth().revoke_device(&device_id);
    eventually(
        Duration::from_secs(5),
        "the revoked device to be cut off",
        || async { (!connected(&agent)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!connected(&agent), "a revoked device does not get back in");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_library_we_did_not_write_verifies_devices_with_the_published_key_set() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(
        dir.path(),
        &h.gateway_url(),
        facts("linux", "arm64", 4096, &[]),
        None,
    );
    let token = eventually(Duration::from_secs(20), "enrolment", || async {
        credential(&agent)
    })
    .await;
    agent.stop().await;
    // Rotation in progress: two keys published, the device's among them.
    h.gateway
        .auth()
        .set_keys(KeyRing::new(&edgewise_tests::CREDENTIAL_SEED, &[[7; 32]]));
    let jwks = serde_json::to_string(&h.gateway.auth().keys().jwks()).expect("JSON");
    let tampered = {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&base64::Engine::decode(&b64, &parts[1]).expect("base64url"))
                .expect("test setup");
        claims["sub"] = "dev-someone-else".into();
        parts[1] = base64::Engine::encode(&b64, serde_json::to_vec(&claims).expect("JSON"));
        parts.join(".")
    };
    let out = python_fixture("jwks_verify.py", &[jwks, token.clone(), tampered]).await;
    assert_eq!(out["keys"], 2, "{out}");
    assert_eq!(out["genuine"]["sub"], agent_device_id(&token), "{out}");
    assert_eq!(out["genuine"]["alg"], "EdDSA");
    assert!(
        out["tampered"]
            .as_str()
            .is_some_and(|e| e.contains("Signature verification failed")),
        "{out}"
    );
}

/// A bootstrap token's `maxDevices` holds across replicas: six devices enrol at once
/// through two gateways sharing the cluster's record, three get in, three are refused
/// `RESOURCE_EXHAUSTED` naming the cap; an enrolled device enrols again (a new proof) and
/// keeps its slot, and a replica started later (a restart) knows the token is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_capped_at_three_devices_enrols_three_across_replicas() {
    use edgewise_agent::identity::Identity;
    use edgewise_operator::gateway::enrolled::{EnrolmentLedger, object_name};
    use edgewise_proto::fleet::fleet_client::FleetClient;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, PostParams};
    use tokio_util::sync::CancellationToken;

    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_api, client) = dev_api_cluster(dir.path()).await;
    const CAPPED: &str = "capped-token-0123456789";
    Api::<Secret>::namespaced(client.clone(), "edgewise")
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "line-3", "labels": {"edgewise.dev/bootstrap-token": "true"}},
                "stringData": {"token": CAPPED, "maxDevices": "3"},
            }))
            .expect("JSON"),
        )
        .await
        .expect("token Secret");
    let stop = CancellationToken::new();
    let replica = |stop: &CancellationToken| {
        let gateway = edgewise_operator::gateway::Gateway::new(
            GatewayConfig {
                credential_keys: credential_keys(),
                tls: Some(gateway_tls_files()),
                ..GatewayConfig::default()
            },
            edgewise_operator::s3::S3Settings::with_endpoint("http://127.0.0.1:9", "a", "b")
                .client(),
        )
        .with_enrolment_ledger(EnrolmentLedger::Cluster(Box::new(Api::namespaced(
            client.clone(),
            "edgewise",
        ))));
        tokio::spawn(edgewise_operator::gateway::trust::follow_tokens(
            client.clone(),
            "edgewise".into(),
            gateway.clone(),
            stop.clone(),
        ));
        gateway
    };
    let mut urls = Vec::new();
    for _ in 0..2 {
        let (addr, _) = replica(&stop)
            .spawn(loopback(), stop.clone())
            .await
            .expect("serves");
        urls.push(format!("https://127.0.0.1:{}", addr.port()));
    }
    let enrol = |url: String, id: std::sync::Arc<Identity>| async move {
        let mut fleet = FleetClient::new(fleet_channel(&url));
        // Until the replica has read the token Secret.
        for _ in 0..100 {
            let req = id.enroll_request(
                CAPPED,
                &facts("linux", "arm64", 1024, &[]),
                &std::collections::BTreeMap::new(),
            );
            match fleet.enroll(req).await {
                Err(s) if s.message() == "unknown bootstrap token" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done => return done.map(|_| ()),
            }
        }
        panic!("{url} never learned the token");
    };
    let devices: Vec<_> = (0..6)
        .map(|_| std::sync::Arc::new(Identity::ephemeral()))
        .collect();
    let outcomes = futures_util::future::join_all(
        devices
            .iter()
            .enumerate()
            .map(|(i, id)| enrol(urls[i % 2].clone(), id.clone())),
    )
    .await;
    let admitted: Vec<usize> = (0..6).filter(|i| outcomes[*i].is_ok()).collect();
    assert_eq!(admitted.len(), 3, "{outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(refused.message().contains("maxDevices"), "{refused:?}");
    }
    let record = Api::<ConfigMap>::namespaced(client.clone(), "edgewise")
        .get(&object_name("line-3"))
        .await
        .expect("the record");
    let mut listed: Vec<String> = record.data.expect("data")["devices"]
        .lines()
        .map(str::to_owned)
        .collect();
    listed.sort();
    let mut expected: Vec<String> = admitted
        .iter()
        .map(|i| devices[*i].device_id().to_owned())
        .collect();
    expected.sort();
    assert_eq!(listed, expected);

    // Re-enrolment through the other replica keeps the device's slot.
    let again = admitted[0];
    enrol(urls[(again + 1) % 2].clone(), devices[again].clone())
        .await
        .expect("an enrolled device enrols again");
    // A replica started now refuses a fourth device from the record alone.
    let (addr, _) = replica(&stop)
        .spawn(loopback(), stop.clone())
        .await
        .expect("serves");
    let late = enrol(
        format!("https://127.0.0.1:{}", addr.port()),
        std::sync::Arc::new(Identity::ephemeral()),
    )
    .await
    .expect_err("the token is full");
    assert_eq!(late.code(), tonic::Code::ResourceExhausted, "{late:?}");
    stop.cancel();
}

fn agent_device_id(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .expect("base64url"),
    )
    .expect("test setup");
    claims["sub"].as_str().expect("sub").to_owned()
}

/// Revocation kept in the cluster: `kubectl edgewise revoke` writes a ConfigMap, every
/// gateway following the namespace cuts the device off (two replicas here, one of them
/// started after the revocation, as after a restart); deleting it lets the device back in.
/// The controller's credential key Secret is made once and read back as a ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_live_in_the_cluster_and_every_replica_follows_them() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, DeleteParams};
    use tokio_util::sync::CancellationToken;

    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_api, client) = dev_api_cluster(dir.path()).await;
    let kubeconfig = dir.path().join("kubeconfig");

    // The key Secret: made once, then left alone, and it is a ring a gateway loads.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "edgewise");
    for _ in 0..2 {
        edgewise_operator::server::ensure_credential_keys(&client, "edgewise", "keys")
            .await
            .expect("ensured");
    }
    let made = secrets.get("keys").await.expect("made");
    let entries = made
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let ring = KeyRing::from_entries(&entries).expect("a ring");
    assert_eq!(ring.kids().len(), 1);

    let h = Harness::start().await;
    let stop = CancellationToken::new();
    tokio::spawn(edgewise_operator::gateway::trust::follow_revocations(
        client.clone(),
        "edgewise".into(),
        h.gateway.clone(),
        stop.clone(),
    ));
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(
        agent_dir.path(),
        &h.gateway_url(),
        facts("linux", "arm64", 4096, &[]),
        None,
    );
    let connected = |a: &TestAgent| *a.device.connection.borrow() == Connection::Connected;
    eventually(Duration::from_secs(20), "the agent to connect", || async {
        connected(&agent).then_some(())
    })
    .await;
    let device = agent.device.device_id.clone();
    let token = credential(&agent).expect("enrolled");

    let plugin = {
        let kubeconfig = kubeconfig.clone();
        move |args: Vec<String>| {
            let out = std::process::Command::new(workspace_binary("kubectl-edgewise"))
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .expect("runs");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let args = vec![
        "revoke".into(),
        "device".into(),
        device.clone(),
        "--reason".into(),
        "stolen".into(),
    ];
    let said = tokio::task::spawn_blocking({
        let plugin = plugin.clone();
        let args = args.clone();
        move || plugin(args)
    })
    .await
    .expect("test setup");
    assert!(
        said.contains(&format!(
            "configmap/revoked-device-{device} created in edgewise"
        )),
        "{said}"
    );
    let again = tokio::task::spawn_blocking(move || plugin(args))
        .await
        .expect("test setup");
    assert!(again.contains("already revoked"), "{again}");

    eventually(
        Duration::from_secs(5),
        "the device to be cut off",
        || async { (!connected(&agent)).then_some(()) },
    )
    .await;
    // A replica started now (a restart) refuses it too, from the cluster's record alone.
    let fresh = edgewise_operator::gateway::Gateway::new(
        GatewayConfig {
            credential_keys: credential_keys(),
            ..GatewayConfig::default()
        },
        edgewise_operator::s3::S3Settings::with_endpoint("http://127.0.0.1:9", "a", "b").client(),
    );
    tokio::spawn(edgewise_operator::gateway::trust::follow_revocations(
        client.clone(),
        "edgewise".into(),
        fresh.clone(),
        stop.clone(),
    ));
    eventually(
        Duration::from_secs(5),
        "the new replica to refuse it",
        || async {
            fresh
                .auth()
                .verify_credential(&token)
                .is_err()
                .then_some(())
        },
    )
    .await;

    // Undone by deleting the object: the device enrols again and reconnects.
    Api::<ConfigMap>::namespaced(client.clone(), "edgewise")
        .delete(
            &format!("revoked-device-{device}"),
            &DeleteParams::default(),
        )
        .await
        .expect("deleted");
    eventually(Duration::from_secs(20), "the device to be back", || async {
        connected(&agent).then_some(())
    })
    .await;
    fresh
        .auth()
        .verify_credential(&token)
        .expect("accepted again");
    stop.cancel();
    agent.stop().await;
}
