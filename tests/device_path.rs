//! The device path end to end: gateway + agents over real gRPC on loopback, artifacts in a
//! real S3-compatible server, presigned URLs checked by that server.

use std::collections::BTreeMap;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use edgewise_agent::identity::Identity;
use edgewise_agent::simulate::{SimConfig, SimFleet};
use edgewise_core::cohort::bucket;
use edgewise_core::variant::Requirements;
use edgewise_operator::gateway::desired::cohort_salt;
use edgewise_operator::gateway::{BootstrapToken, Change, DeviceClaims};
use edgewise_proto::fleet::fleet_client::FleetClient;
use edgewise_proto::fleet::{
    Ack, AgentMessage, EnrollResponse, GatewayMessage, Hello, ModelState, ResourceKind,
    agent_message,
};
use edgewise_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

fn requirements_npu() -> Requirements {
    Requirements {
        platforms: vec!["android/arm64".into(), "linux/*".into()],
        min_memory_mib: Some(6144),
        accelerators: vec!["npu".into()],
        min_agent_version: None,
    }
}

fn requirements_cpu() -> Requirements {
    Requirements {
        min_memory_mib: Some(2048),
        ..Requirements::default()
    }
}

fn simple_policy() -> serde_json::Value {
    serde_json::json!({
        "targets": [
            {"name": "on-device", "device": {"model": "assistant"}},
            {"name": "cloud", "cloud": {"endpoint": "https://cloud.example.com/v1", "model": "big", "costPer1kTokensUsd": 0.002}}
        ],
        "rules": [
            {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
            {"name": "long", "match": [{"attribute": "inputTokens", "gt": 4000}], "route": "cloud", "fallback": ["on-device"]}
        ],
        "default": {"route": "on-device", "fallback": ["cloud"]}
    })
}

/// Publishes assistant 1.0.0 and 2.0.0 (an NPU and a CPU variant each).
async fn publish_two_versions(h: &Harness) {
    let mut versions = Vec::new();
    for (version, seed) in [("1.0.0", 1u8), ("2.0.0", 2u8)] {
        let npu = h
            .put_artifact(
                &format!("assistant/{version}/npu.gguf"),
                artifact_bytes(96 * 1024, seed),
            )
            .await;
        let cpu = h
            .put_artifact(
                &format!("assistant/{version}/cpu.onnx"),
                artifact_bytes(64 * 1024, seed + 100),
            )
            .await;
        versions.push(Change::ApplyVersion(model_version(
            "assistant",
            version,
            vec![
                variant("npu", npu, requirements_npu()),
                variant("cpu", cpu, requirements_cpu()),
            ],
        )));
    }
    h.apply(versions);
}

async fn client(h: &Harness) -> FleetClient<Channel> {
    FleetClient::new(fleet_channel(&h.gateway_url()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_agents_converge_and_split_between_canary_and_stable_by_cohort() {
    let h = Harness::start().await;
    publish_two_versions(&h).await;
    let r = rollout("assistant")
        .named("assistant-all")
        .canary("2.0.0", 30)
        .build();
    let salt = cohort_salt(&r);
    h.apply([
        Change::ApplyRollout(r),
        Change::ApplyPolicy(routing_policy("default", simple_policy())),
    ]);

    let fleet = SimFleet::start(&SimConfig {
        devices: 60,
        gateway: h.gateway_url(),
        tls: tls_for(&h.gateway_url()),
        bootstrap_tokens: vec![TOKEN.into()],
        data_dir: h.dir.path().join("sim"),
        backoff: quick_backoff(),
        devices_per_connection: 20,
        telemetry: false,
        traffic: None,
        runtime: false,
    })
    .expect("fleet starts");

    let expect = |percent: u32, device_id: &str| {
        if bucket(&salt, device_id) < (percent * 100) as u16 {
            "2.0.0"
        } else {
            "1.0.0"
        }
    };
    let converged = |percent: u32| {
        let devices = fleet.devices().to_vec();
        let expect = &expect;
        async move {
            devices
                .iter()
                .all(|d| {
                    if d.facts.memory_mib < 2048 {
                        d.board
                            .all()
                            .get("assistant")
                            .is_some_and(|s| s.state == ModelState::Unsupported as i32)
                    } else {
                        d.active_version("assistant").as_deref()
                            == Some(expect(percent, &d.device_id))
                    }
                })
                .then_some(())
        }
    };
    eventually(
        Duration::from_secs(60),
        "60 agents to converge at 30 %",
        || converged(30),
    )
    .await;

    let mut canary = 0;
    for d in fleet.devices() {
        if d.facts.memory_mib < 2048 {
            let status = &d.board.all()["assistant"];
            assert!(
                status
                    .error
                    .contains("cpu: needs 2048 MiB memory, device has 1024 MiB"),
                "{}",
                status.error
            );
            continue;
        }
        let active = d.state.active("assistant").expect("active");
        let want_variant = if d.facts.accelerators.is_empty() {
            "cpu"
        } else {
            "npu"
        };
        assert_eq!(
            active.variant, want_variant,
            "{} has {:?}",
            d.device_id, d.facts
        );
        canary += usize::from(active.version == "2.0.0");
    }
    assert!(
        (4..=30).contains(&canary),
        "{canary} of 54 devices on the canary at 30 %"
    );

    // Every device got the policy, and the gateway saw the acks.
    eventually(Duration::from_secs(20), "policy acks", || async {
        (fleet.summary().policies.values().sum::<usize>() == 60
            && h.gateway
                .registry()
                .devices()
                .iter()
                .filter(|d| d.policy.running.is_some())
                .count()
                == 60)
            .then_some(())
    })
    .await;

    // Raising the percentage moves more devices to the canary; none moves back.
    let before: BTreeMap<String, Option<String>> = fleet
        .devices()
        .iter()
        .map(|d| (d.device_id.clone(), d.active_version("assistant")))
        .collect();
    h.apply([Change::ApplyRollout(
        rollout("assistant")
            .named("assistant-all")
            .canary("2.0.0", 70)
            .build(),
    )]);
    eventually(Duration::from_secs(60), "convergence at 70 %", || {
        converged(70)
    })
    .await;
    for d in fleet.devices() {
        if before[&d.device_id].as_deref() == Some("2.0.0") {
            assert_eq!(d.active_version("assistant").as_deref(), Some("2.0.0"));
        }
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_badly_signed_artifacts_are_never_activated() {
    let h = Harness::start().await;
    let publisher = SigningKey::from_bytes(&[7; 32]);
    let impostor = SigningKey::from_bytes(&[8; 32]);

    let mut good = h
        .put_artifact("m/1.0.0/model.onnx", artifact_bytes(200_000, 1))
        .await;
    sign_artifact(&publisher, ("m", "1.0.0", "cpu"), &mut good);
    // The digest in the spec is of other bytes than the object holds.
    let mut corrupt = h
        .put_artifact("m/2.0.0/model.onnx", artifact_bytes(200_000, 2))
        .await;
    corrupt.sha256 = h
        .put_artifact("m/unused", artifact_bytes(200_000, 3))
        .await
        .sha256;
    sign_artifact(&publisher, ("m", "2.0.0", "cpu"), &mut corrupt);
    let mut forged = h
        .put_artifact("m/3.0.0/model.onnx", artifact_bytes(200_000, 4))
        .await;
    sign_artifact(&impostor, ("m", "3.0.0", "cpu"), &mut forged);
    // An old build the publisher signed as 0.9.0, presented as 4.0.0: signed, but not as
    // this version.
    let mut replayed = h
        .put_artifact("m/0.9.0/model.onnx", artifact_bytes(200_000, 5))
        .await;
    sign_artifact(&publisher, ("m", "0.9.0", "cpu"), &mut replayed);
    let any = Requirements::default();
    h.apply([
        Change::ApplyVersion(model_version(
            "m",
            "1.0.0",
            vec![variant("cpu", good.clone(), any.clone())],
        )),
        Change::ApplyVersion(model_version(
            "m",
            "2.0.0",
            vec![variant("cpu", corrupt.clone(), any.clone())],
        )),
        Change::ApplyVersion(model_version(
            "m",
            "3.0.0",
            vec![variant("cpu", forged.clone(), any.clone())],
        )),
        Change::ApplyVersion(model_version(
            "m",
            "4.0.0",
            vec![variant("cpu", replayed.clone(), any)],
        )),
        Change::ApplyRollout(rollout("m").build()),
    ]);
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "x86_64", 4096, &[]),
        Some(publisher.verifying_key()),
    );
    let device = agent.device.clone();
    eventually(Duration::from_secs(30), "1.0.0 active", || async {
        (device.active_version("m").as_deref() == Some("1.0.0")).then_some(())
    })
    .await;

    for (version, artifact, words) in [
        ("2.0.0", &corrupt, "SHA-256 mismatch"),
        ("3.0.0", &forged, "signature"),
        ("4.0.0", &replayed, "as this model, version and variant"),
    ] {
        h.apply([Change::ApplyRollout(rollout("m").stable(version).build())]);
        let status = eventually(Duration::from_secs(30), "install failure", || async {
            device
                .board
                .all()
                .get("m")
                .filter(|s| s.version == version && s.state == ModelState::Failed as i32)
                .cloned()
        })
        .await;
        assert!(status.error.contains(words), "{version}: {}", status.error);
        assert_eq!(
            device.active_version("m").as_deref(),
            Some("1.0.0"),
            "{version} must not activate"
        );
        assert!(
            !device.content.has_blob(&artifact.sha256),
            "{version} must not enter the store"
        );
        // The gateway learns of the failure, so rollout status can count it.
        eventually(
            Duration::from_secs(10),
            "gateway sees the failure",
            || async {
                h.gateway
                    .registry()
                    .device(&device.device_id)
                    .and_then(|r| r.models.get("m").cloned())
                    .filter(|s| s.version == version && s.state == ModelState::Failed as i32)
            },
        )
        .await;
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_does_not_compile_is_never_pushed_and_the_previous_one_stays() {
    let h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy("p", simple_policy()))]);
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "x86_64", 4096, &[]),
        None,
    );
    let device = agent.device.clone();
    let good = eventually(Duration::from_secs(20), "first policy", || async {
        device.policy.version()
    })
    .await;

    // A policy that passes the CRD schema but not the compiler (the controller marks it
    // Accepted=False): a fallback to nowhere. The gateway keeps the accepted version.
    let mut bad = simple_policy();
    bad["rules"][1]["fallback"] = serde_json::json!(["nowhere"]);
    h.apply([Change::ApplyPolicy(routing_policy("p", bad))]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rejected = device
        .stats
        .policies_rejected
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rejected, 0, "nothing was pushed for the device to NACK");
    assert_eq!(
        device.policy.version().as_deref(),
        Some(good.as_str()),
        "the device keeps the last accepted policy"
    );
    let record = h
        .gateway
        .registry()
        .device(&device.device_id)
        .expect("known");
    assert_eq!(record.policy.running.as_deref(), Some(good.as_str()));
    assert!(record.policy.rejected.is_none());

    // Routing still answers from the good policy.
    let answer = device
        .router
        .decide(&edgewise_proto::router::DecideRequest {
            request_id: "r1".into(),
            data_class: Some("private".into()),
            ..Default::default()
        })
        .expect("decides");
    assert_eq!(
        (answer.rule.as_str(), answer.policy_version.as_str()),
        ("private", good.as_str())
    );

    // A fixed policy is accepted and pushed.
    let mut fixed = simple_policy();
    fixed["default"]["fallback"] = serde_json::json!([]);
    h.apply([Change::ApplyPolicy(routing_policy("p", fixed))]);
    eventually(Duration::from_secs(20), "fixed policy applied", || async {
        device.policy.version().filter(|v| *v != good)
    })
    .await;
    agent.stop().await;
}

async fn enroll_new(h: &Harness) -> (Identity, EnrollResponse) {
    let id = Identity::ephemeral();
    let request = id.enroll_request(
        TOKEN,
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    let response = client(h)
        .await
        .enroll(request)
        .await
        .expect("enrolls")
        .into_inner();
    (id, response)
}

fn hello(device_id: &str) -> Hello {
    Hello {
        device_id: device_id.into(),
        agent_version: "0.1.0".into(),
        facts: Some((&facts("linux", "x86_64", 4096, &[])).into()),
        ..Hello::default()
    }
}

/// Opens a Sync stream with `credential` and the given first messages; returns the status
/// of the call or of the first stream item.
async fn sync_with(
    h: &Harness,
    credential: &str,
    first: Vec<AgentMessage>,
) -> Result<(mpsc::Sender<AgentMessage>, tonic::Streaming<GatewayMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    for m in first {
        tx.send(m).await.expect("queue");
    }
    let request = with_credential(ReceiverStream::new(rx), credential);
    let stream = client(h).await.sync(request).await?.into_inner();
    Ok((tx, stream))
}

/// A Sync stream whose messages are `raw` bytes, whatever they are; how it ended.
async fn sync_raw(h: &Harness, credential: &str, raw: Vec<Vec<u8>>) -> tonic::Status {
    let mut grpc = raw_grpc(&h.gateway_url()).await;
    let (tx, rx) = mpsc::channel(8);
    for m in raw {
        tx.send(bytes::Bytes::from(m)).await.expect("queue");
    }
    let request = with_credential(ReceiverStream::new(rx), credential);
    let response = grpc
        .streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static("/edgewise.v1.Fleet/Sync"),
            edgewise_proto::codec::PreEncodedCodec::<GatewayMessage>::default(),
        )
        .await;
    let mut stream = match response {
        Ok(r) => r.into_inner(),
        Err(status) => return status,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return tonic::Status::ok("the stream ended with OK"),
            Err(status) => return status,
        }
    }
}

fn msg(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_revoked_credentials_are_refused() {
    let h = Harness::start().await;
    let (id, enrolled) = enroll_new(&h).await;
    let device = id.device_id().to_owned();

    // Valid: the stream opens.
    sync_with(
        &h,
        &enrolled.credential,
        vec![msg(agent_message::Kind::Hello(hello(&device)))],
    )
    .await
    .expect("valid credential");

    let claims = h
        .gateway
        .auth()
        .verify_credential(&enrolled.credential)
        .expect("valid");
    // Signed by a key the gateway does not hold, and a credential whose claims were
    // changed under a genuine signature (labels widened).
    let forger = edgewise_operator::gateway::Authority::new(
        edgewise_operator::gateway::keys::KeyRing::new(&[3; 32], &[]),
        Duration::from_secs(60),
    );
    let foreign = forger.sign(&claims).expect("signs");
    let tampered = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = enrolled.credential.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).expect("base64url")).expect("JSON");
        payload["lbl"]["tier"] = "gold".into();
        let forged_payload = b64.encode(serde_json::to_vec(&payload).expect("JSON"));
        format!("{}.{forged_payload}.{}", parts[0], parts[2])
    };
    let expired = h
        .gateway
        .auth()
        .sign(&DeviceClaims {
            exp: 1_000,
            iat: 900,
            ..claims.clone()
        })
        .expect("signs");
    for (credential, words) in [
        (foreign, "a key this gateway does not hold"),
        (tampered, "signature"),
        (expired, "expired"),
        ("garbage".to_owned(), "credential rejected"),
    ] {
        let err = sync_with(
            &h,
            &credential,
            vec![msg(agent_message::Kind::Hello(hello(&device)))],
        )
        .await
        .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains(words), "{words}: {}", err.message());
    }

    // Another device's id in Hello.
    let (other, _) = enroll_new(&h).await;
    let err = sync_with(
        &h,
        &enrolled.credential,
        vec![msg(agent_message::Kind::Hello(hello(other.device_id())))],
    )
    .await
    .expect_err("wrong device");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Revocation applies to credentials already issued.
    h.gateway.auth().revoke_device(&device);
    let err = sync_with(
        &h,
        &enrolled.credential,
        vec![msg(agent_message::Kind::Hello(hello(&device)))],
    )
    .await
    .expect_err("revoked");
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "credential revoked")
    );

    // Enrollment: a device cannot claim an id that is not its key's, nor forge a proof.
    let mut c = client(&h).await;
    let thief = Identity::ephemeral();
    let mut req = thief.enroll_request(
        TOKEN,
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    req.device_id = other.device_id().to_owned();
    let err = c.enroll(req).await.expect_err("id theft");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("derived from public_key"),
        "{}",
        err.message()
    );
    let mut req = thief.enroll_request(
        TOKEN,
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    req.proof[0] ^= 1;
    assert_eq!(
        c.enroll(req).await.expect_err("bad proof").code(),
        Code::Unauthenticated
    );
    let req = thief.enroll_request(
        "wrong-token",
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    let err = c.enroll(req).await.expect_err("bad token");
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "unknown bootstrap token")
    );
    // A proof is good once: the same request replayed (by someone who saw it) is refused;
    // a proof signed 11 minutes ago, or at the dawn of time, is stale.
    let honest = Identity::ephemeral();
    let req = honest.enroll_request(
        TOKEN,
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    c.enroll(req.clone()).await.expect("first use");
    let err = c.enroll(req).await.expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    for (when, stale) in [
        ("11 minutes ago", -11 * 60_000),
        ("i64::MIN", i64::MIN),
        ("i64::MAX", i64::MAX),
    ] {
        let mut req = honest.enroll_request(
            TOKEN,
            &facts("linux", "x86_64", 4096, &[]),
            &BTreeMap::new(),
        );
        req.proof_time_unix_ms = req.proof_time_unix_ms.saturating_add(stale);
        let err = c.enroll(req).await.expect_err("stale");
        assert_eq!(err.code(), Code::Unauthenticated, "{when}");
        assert!(
            err.message().contains("10 minutes"),
            "{when}: {}",
            err.message()
        );
    }
    let req = thief.enroll_request("", &facts("linux", "x86_64", 4096, &[]), &BTreeMap::new());
    let err = c.enroll(req).await.expect_err("no token");
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "bootstrap_token is required")
    );
    // A configured token shorter than 16 bytes is guessable: it enrols nobody.
    h.gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
        name: "short".into(),
        token: "hunter2".into(),
        labels: BTreeMap::new(),
        expires_at: None,
        max_devices: None,
    }]);
    let req = thief.enroll_request(
        "hunter2",
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    let err = c.enroll(req).await.expect_err("short token");
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "unknown bootstrap token")
    );
    // A token past its expiry enrols nobody; one before it does.
    let minute = jiff::SignedDuration::from_mins(1);
    for (expires_at, enrols) in [
        (jiff::Timestamp::now() - minute, false),
        (jiff::Timestamp::now() + minute, true),
    ] {
        h.gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
            name: "dated".into(),
            token: TOKEN.into(),
            labels: BTreeMap::new(),
            expires_at: Some(expires_at),
            max_devices: None,
        }]);
        let req = Identity::ephemeral().enroll_request(
            TOKEN,
            &facts("linux", "x86_64", 4096, &[]),
            &BTreeMap::new(),
        );
        match c.enroll(req).await {
            Ok(_) => assert!(enrols, "an expired token enrolled a device"),
            Err(err) => {
                assert!(!enrols, "{err:?}");
                assert_eq!(err.code(), Code::Unauthenticated);
                assert!(err.message().contains("expired at"), "{}", err.message());
            }
        }
    }
}

/// What a device says of itself is `self.`-prefixed, facts included: a server-side label
/// of the same name (from the bootstrap token) is never overridden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_facts_never_override_server_side_labels() {
    let h = Harness::start().await;
    h.gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
        name: "fleet".into(),
        token: TOKEN.into(),
        labels: BTreeMap::from([("edgewise.dev/os".to_owned(), "managed".to_owned())]),
        expires_at: None,
        max_devices: None,
    }]);
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "arm64", 4096, &[]),
        None,
    );
    let labels = eventually(Duration::from_secs(20), "the device connected", || async {
        h.gateway
            .registry()
            .devices()
            .into_iter()
            .find(|d| d.connected)
            .map(|d| d.labels)
    })
    .await;
    assert_eq!(labels["edgewise.dev/os"], "managed", "{labels:?}");
    assert_eq!(labels["self.edgewise.dev/os"], "linux", "{labels:?}");
    assert_eq!(labels["self.edgewise.dev/arch"], "arm64", "{labels:?}");
    agent.stop().await;
}

/// Enrolment is rate-limited per peer address before any work, with a retry hint; an
/// agent that meets the limit waits and enrols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolments_beyond_the_per_peer_limit_wait_with_a_retry_hint() {
    use edgewise_operator::gateway::limits::{EnrolRates, Rate};
    let h = Harness::start_with(edgewise_operator::gateway::GatewayConfig {
        enroll_limits: Some(EnrolRates {
            per_peer: Rate {
                per_minute: 120,
                burst: 3,
            },
            ..EnrolRates::default()
        }),
        ..Default::default()
    })
    .await;
    let mut c = client(&h).await;
    // Failed enrolments count too: guessing tokens is what the limit is for.
    for _ in 0..3 {
        let req = Identity::ephemeral().enroll_request(
            "a-guessed-token-of-16-bytes",
            &facts("linux", "x86_64", 4096, &[]),
            &BTreeMap::new(),
        );
        assert_eq!(
            c.enroll(req).await.expect_err("unknown").code(),
            Code::Unauthenticated
        );
    }
    let req = Identity::ephemeral().enroll_request(
        TOKEN,
        &facts("linux", "x86_64", 4096, &[]),
        &BTreeMap::new(),
    );
    let err = c.enroll(req).await.expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let hint = edgewise_proto::retry::retry_after(&err).expect("a retry hint");
    assert!(hint <= Duration::from_secs(1), "{hint:?}");
    // An agent meeting the limit honours the hint and enrols (one token every 0.5 s).
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "x86_64", 4096, &[]),
        None,
    );
    eventually(Duration::from_secs(20), "the agent enrolled", || async {
        agent
            .device
            .identity
            .lock()
            .expect("identity")
            .credential()
            .map(|_| ())
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_naming_the_problem_and_other_streams_carry_on() {
    let h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy("p", simple_policy()))]);
    let healthy = TestAgent::start(
        &h.dir.path().join("healthy"),
        &h.gateway_url(),
        facts("linux", "x86_64", 4096, &[]),
        None,
    );
    let first = eventually(
        Duration::from_secs(20),
        "healthy agent's policy",
        || async { healthy.device.policy.version() },
    )
    .await;

    let (id, enrolled) = enroll_new(&h).await;
    let device = id.device_id().to_owned();
    let ack = |kind: i32| {
        msg(agent_message::Kind::Ack(Ack {
            kind,
            nonce: "n".into(),
            version: "v".into(),
            error: String::new(),
        }))
    };
    let mut no_facts = hello(&device);
    no_facts.facts = None;
    let mut bad_version = hello(&device);
    if let Some(f) = bad_version.facts.as_mut() {
        f.agent_version = "banana".into();
    }
    let mut bad_agent = hello(&device);
    bad_agent.agent_version = "latest".into();
    let mut long_os = hello(&device);
    if let Some(f) = long_os.facts.as_mut() {
        f.os = "x".repeat(300);
    }
    let cases = [
        (
            vec![ack(ResourceKind::Policy as i32)],
            "the first Sync message must be Hello",
        ),
        (
            vec![msg(agent_message::Kind::Hello(no_facts))],
            "hello.facts is required",
        ),
        (
            vec![msg(agent_message::Kind::Hello(bad_version))],
            "hello.facts.agent_version",
        ),
        (
            vec![msg(agent_message::Kind::Hello(long_os))],
            "hello.facts.os is 300 bytes",
        ),
        (
            vec![msg(agent_message::Kind::Hello(bad_agent))],
            "hello.agent_version \"latest\" is not a semantic version",
        ),
    ];
    for (messages, words) in cases {
        let err = sync_with(&h, &enrolled.credential, messages)
            .await
            .expect_err("rejected");
        assert_eq!(err.code(), Code::InvalidArgument, "{words}: {err:?}");
        assert!(err.message().contains(words), "{words}: {}", err.message());
    }
    // A bad message mid-stream ends that stream with an error naming the field.
    let (tx, mut stream) = sync_with(
        &h,
        &enrolled.credential,
        vec![msg(agent_message::Kind::Hello(hello(&device)))],
    )
    .await
    .expect("opens");
    tx.send(ack(7)).await.expect("queue");
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ack.kind 7"), "{}", err.message());
    // Bytes that are no message after Hello end the stream with tonic's decode error (as
    // Enroll and UploadTelemetry answer the same bytes), never with a silent OK.
    let err = sync_raw(
        &h,
        &enrolled.credential,
        vec![
            prost::Message::encode_to_vec(&msg(agent_message::Kind::Hello(hello(&device)))),
            vec![0x1a, 0xff, 0xff, 0xff],
        ],
    )
    .await;
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("failed to decode Protobuf message"),
        "{}",
        err.message()
    );

    // The healthy agent's stream was not affected: it still receives updates.
    let mut next = simple_policy();
    next["default"]["fallback"] = serde_json::json!([]);
    h.apply([Change::ApplyPolicy(routing_policy("p", next))]);
    eventually(
        Duration::from_secs(20),
        "healthy agent gets the next policy",
        || async { healthy.device.policy.version().filter(|v| *v != first) },
    )
    .await;
    healthy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_offline_serves_decide_from_its_persisted_policy() {
    let mut h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy("p", simple_policy()))]);
    let dir = h.dir.path().join("agent");
    let config = edgewise_agent::config::AgentConfig {
        gateway: h.gateway_url(),
        gateway_tls: tls_for(&h.gateway_url()),
        bootstrap_token: TOKEN.into(),
        data_dir: dir.clone(),
        router_socket: Some(dir.join("router.sock")),
        socket_peers: Default::default(),
        publisher_key: None,
        labels: BTreeMap::new(),
        facts: facts("linux", "x86_64", 4096, &[]),
        backoff: quick_backoff(),
        durable: true,
        // Routing must not depend on this machine's routing table.
        probe_network: false,
        data_plane: None,
        model_memory: None,
        data_plane_threads: std::num::NonZeroUsize::MIN,
        data_plane_socket: None,
        cloud: Vec::new(),
        runtimes: Vec::new(),
    };
    // First run: online, receives and persists the policy.
    let stop = tokio_util::sync::CancellationToken::new();
    let online = tokio::spawn(edgewise_agent::agent::run(config.clone(), stop.clone()));
    let persisted = eventually(Duration::from_secs(20), "policy persisted", || async {
        std::fs::read_to_string(dir.join("policy.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["version"].as_str().map(str::to_owned))
    })
    .await;
    stop.cancel();
    online.await.expect("joins").expect("runs");

    // Second run: the gateway is gone.
    h.stop_gateway().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let offline = tokio::spawn(edgewise_agent::agent::run(config.clone(), stop.clone()));
    let socket = dir.join("router.sock");
    eventually(Duration::from_secs(10), "router socket", || {
        let socket = socket.clone();
        async move { tokio::net::UnixStream::connect(socket).await.ok().map(drop) }
    })
    .await;
    let mut router = router_client(socket.clone()).await;
    let private_request = edgewise_proto::router::DecideRequest {
        request_id: "r1".into(),
        data_class: Some("private".into()),
        ..Default::default()
    };
    let private = router
        .decide(private_request.clone())
        .await
        .expect("decides offline")
        .into_inner();
    assert_eq!(private.rule, "private");
    assert_eq!(private.policy_version, persisted);

    // The framed lane on the same socket answers the same, and survives bad frames.
    let mut lane = edgewise_agent::router::lane::LaneClient::connect(&socket)
        .await
        .expect("lane connects");
    let same = lane
        .decide(&private_request)
        .await
        .expect("decides over the lane");
    assert_eq!(same, private);
    let (code, text) = lane.raw(9, b"").await.expect("answers");
    assert_eq!(code, Code::InvalidArgument);
    assert!(String::from_utf8_lossy(&text).contains("unknown method 9"));
    let (code, text) = lane.raw(1, &[0xff, 0xff]).await.expect("answers");
    assert_eq!(code, Code::InvalidArgument);
    assert!(String::from_utf8_lossy(&text).contains("malformed DecideRequest"));
    let err = lane
        .decide(&edgewise_proto::router::DecideRequest {
            request_id: "r3".into(),
            network: 42,
            ..Default::default()
        })
        .await
        .expect_err("an unknown network is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("network 42"), "{}", err.message());
    let again = lane
        .decide(&private_request)
        .await
        .expect("still decides after bad frames");
    assert_eq!(again.rule, "private");
    // An oversized frame ends that connection with a reason; others are unaffected.
    let (code, text) = lane
        .raw(1, &vec![0; edgewise_agent::router::lane::MAX_FRAME + 1])
        .await
        .expect("answers before closing");
    assert_eq!(code, Code::ResourceExhausted);
    assert!(String::from_utf8_lossy(&text).contains("frames hold 1 to"));
    assert!(lane.raw(1, b"").await.is_err(), "connection closed");

    // Outcomes reported over either face land in the agent's telemetry buffer.
    let outcome = |latency_ms| edgewise_proto::router::Outcome {
        request_id: "r1".into(),
        target: "on-device".into(),
        rule: "private".into(),
        policy_version: persisted.clone(),
        latency_ms,
        ok: true,
        ..Default::default()
    };
    router
        .report(outcome(11.0))
        .await
        .expect("reported over gRPC");
    let mut lane = edgewise_agent::router::lane::LaneClient::connect(&socket)
        .await
        .expect("lane connects");
    lane.report(&outcome(22.0))
        .await
        .expect("reported over the lane");
    // A stock grpcio client, no channel options: its `:authority` is the socket path.
    let scratch = tempfile::tempdir().expect("scratch");
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let python = tokio::process::Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/grpcio_router.py"))
        .arg(&socket)
        .arg(&proto_root)
        .arg(scratch.path())
        .output()
        .await
        .expect("python3 runs");
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&python.stdout).expect("json");
    assert_eq!(said["decide"]["rule"], "private", "{said}");
    assert_eq!(said["decide"]["policy"], persisted.as_str(), "{said}");
    assert_eq!(said["report"], "ok", "{said}");
    assert!(said["models"].is_array(), "{said}");
    // The control plane is down, the network is not: routing is unchanged, the long
    // request still goes to the cloud (`network` is the targets' reachability).
    let long_request = edgewise_proto::router::DecideRequest {
        request_id: "r2".into(),
        input_tokens: Some(9000),
        ..Default::default()
    };
    let unchanged = router
        .decide(long_request.clone())
        .await
        .expect("decides")
        .into_inner();
    assert_eq!(unchanged.rule, "long");
    assert_eq!(
        unchanged.reroute,
        edgewise_proto::router::Reroute::None as i32
    );
    assert_ne!(
        unchanged.target.map(|t| t.name).as_deref(),
        Some("on-device")
    );
    // An app that knows the device is offline says so; the cloud rule falls back to it.
    let long = router
        .decide(edgewise_proto::router::DecideRequest {
            network: edgewise_proto::router::Network::Offline as i32,
            ..long_request
        })
        .await
        .expect("decides")
        .into_inner();
    assert_eq!(
        long.reroute,
        edgewise_proto::router::Reroute::Offline as i32
    );
    assert_eq!(long.rule, "long");
    assert_eq!(long.target.map(|t| t.name).as_deref(), Some("on-device"));

    // The status command sees the agent's view (status.json is rewritten within a second).
    // `status` asks the running agent itself.
    let status = eventually(
        Duration::from_secs(5),
        "status shows the gateway down",
        || {
            let (dir, socket) = (dir.clone(), socket.clone());
            async move {
                let report = edgewise_agent::status::report(&dir, Some(&socket))
                    .await
                    .ok()?;
                let text = edgewise_agent::status::render(&report);
                text.contains("gateway unreachable since").then_some(text)
            }
        },
    )
    .await;
    assert!(status.contains("agent       running (pid"), "{status}");
    assert!(
        status.contains(&format!("policy      {persisted} from fleet/p")),
        "{status}"
    );
    assert!(
        !status.contains("Some(") && !status.contains("Offline"),
        "{status}"
    );
    stop.cancel();
    offline.await.expect("joins").expect("runs");
    let buffer = edgewise_agent::telemetry::TelemetryBuffer::open(
        &dir.join("telemetry"),
        edgewise_agent::telemetry::BufferConfig::default(),
    )
    .expect("opens");
    // The uploader may hold the first event in a batch of its own (in flight, offline).
    let mut latencies = Vec::new();
    while let Some(batch) = buffer.next_batch(100, usize::MAX).expect("reads") {
        for e in batch.events() {
            if let edgewise_agent::telemetry::Event::Inference(i) = e
                && i.rule == "private"
            {
                latencies.push(i.latency_ms);
            }
        }
        buffer.ack(&batch).expect("acks");
    }
    assert_eq!(
        latencies,
        vec![11.0, 22.0, 33.0],
        "gRPC, lane and grpcio reports"
    );
}

/// One stream per device: a second Sync stream of the same device replaces the first, which
/// ends with ABORTED saying why; the device stays connected through its successor, and is
/// disconnected only when that one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_of_a_device_replaces_the_first() {
    let h = Harness::start().await;
    let (id, enrolled) = enroll_new(&h).await;
    let device = id.device_id().to_owned();
    let hello_msgs = || vec![msg(agent_message::Kind::Hello(hello(&device)))];
    let (_tx_a, mut a) = sync_with(&h, &enrolled.credential, hello_msgs())
        .await
        .expect("first stream");
    eventually(
        Duration::from_secs(5),
        "the first stream registered",
        || async { (h.gateway.registry().connected_count() == 1).then_some(()) },
    )
    .await;
    let (tx_b, _b) = sync_with(&h, &enrolled.credential, hello_msgs())
        .await
        .expect("second stream");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match a.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the replaced stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the first stream ends");
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(ended.message().contains("replaced"), "{ended:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.gateway.registry().connected_count(),
        1,
        "still connected, through the second stream"
    );
    drop(tx_b);
    eventually(
        Duration::from_secs(5),
        "disconnected once the second ends",
        || async { (h.gateway.registry().connected_count() == 0).then_some(()) },
    )
    .await;
}

/// The credential is checked before a telemetry body is read: an upload with a bad
/// credential whose body never comes is refused at once, not after a wait for the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_refused_for_its_credential_before_its_body_is_read() {
    let h = Harness::start().await;
    let mut grpc = raw_grpc(&h.gateway_url()).await;
    // A body that never arrives: the stream stays open and sends nothing.
    let (_keep_open, rx) = mpsc::channel::<bytes::Bytes>(1);
    let request = with_credential(ReceiverStream::new(rx), "forged.credential.value");
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        grpc.client_streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/edgewise.v1.Fleet/UploadTelemetry",
            ),
            edgewise_proto::codec::PreEncodedCodec::<edgewise_proto::fleet::TelemetryAck>::default(
            ),
        ),
    )
    .await
    .expect("answered without the body");
    let refused = answer.expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}
