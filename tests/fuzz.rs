//! Every decoder of untrusted input, fed arbitrary bytes and structured nonsense (proptest,
//! stable Rust, bounded case counts so CI stays fast): telemetry views and their validation,
//! enrolment requests, credentials, routing-policy JSON, Sync frames on a live gateway and
//! request bodies on the dev API. The property is always the same: an answer, never a
//! panic, a hang or a 5xx, and the server still serves afterwards.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use edgewise_core::policy::spec::RoutingPolicySpec;
use edgewise_core::policy::{Network, Request, compile};
use edgewise_operator::gateway::auth::{Authority, BootstrapToken};
use edgewise_operator::telemetry::ingest::validate;
use edgewise_proto::fleet::{DeviceFacts, EnrollRequest, InferenceEvent, TelemetryBatch};
use edgewise_proto::view::TelemetryBatchView;
use edgewise_tests::*;
use proptest::prelude::*;
use prost::Message;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text a hostile client might send: empty, long, multi-byte, control characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9.-]{1,12}",
        "\\PC{0,40}",
        "[\\x00-\\x1f]{1,8}",
        (0usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-0.0),
        0.0f64..10_000.0
    ]
}

fn event() -> impl Strategy<Value = InferenceEvent> {
    (
        (text(), any::<i64>(), text(), text(), text()),
        (float(), float(), float(), any::<i32>(), text()),
    )
        .prop_map(
            |(
                (event_id, time_unix_ms, model, version, target),
                (latency, ttft, cost, shadow, error),
            )| {
                InferenceEvent {
                    event_id,
                    time_unix_ms,
                    model,
                    version,
                    target,
                    latency_ms: latency,
                    first_token_ms: ttft,
                    cost_usd: cost,
                    shadow,
                    error,
                    ..InferenceEvent::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn telemetry_bytes_decode_or_fail_and_validation_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        if let Ok(view) = TelemetryBatchView::decode(bytes::Bytes::from(bytes))
            && let Ok(refused) = validate("dev-1", &view)
        {
            prop_assert!(refused.len() <= view.inference.len() + view.model_events.len());
        }
    }

    #[test]
    fn structured_batches_are_judged_event_by_event(
        events in prop::collection::vec(event(), 0..20),
        batch_id in text(),
    ) {
        let batch = TelemetryBatch {
            batch_id,
            device_id: "dev-1".into(),
            inference: events.clone(),
            ..TelemetryBatch::default()
        };
        let view = TelemetryBatchView::decode(bytes::Bytes::from(batch.encode_to_vec()))
            .expect("a TelemetryBatch reads as its view");
        if let Ok(refused) = validate("dev-1", &view) {
            for (i, e) in events.iter().enumerate() {
                if !e.latency_ms.is_finite() || e.latency_ms < 0.0 || e.event_id.is_empty() {
                    prop_assert!(refused.inference.contains_key(&i), "event {i} {e:?} passed");
                }
            }
        }
    }

    #[test]
    fn policy_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(spec) = serde_json::from_slice::<RoutingPolicySpec>(&bytes) {
            let _ = compile(&spec);
        }
    }

    #[test]
    fn structured_policies_compile_or_name_a_problem_and_decide_within_their_targets(
        targets in prop::collection::vec(("[a-c]{1,2}", any::<bool>()), 0..4),
        rules in prop::collection::vec(
            ("[a-c]{1,2}", "[a-z]{1,12}", text(), "[a-c]{1,2}", prop::collection::vec("[a-c]{1,2}", 0..3)),
            0..4,
        ),
        task in text(),
        tokens in any::<Option<u32>>(),
        complexity in any::<Option<f32>>(),
        battery in any::<Option<f32>>(),
    ) {
        let spec = serde_json::json!({
            "targets": targets.iter().map(|(name, device)| if *device {
                serde_json::json!({"name": name, "device": {"model": "m"}})
            } else {
                serde_json::json!({"name": name, "cloud": {"endpoint": "https://c", "model": "big"}})
            }).collect::<Vec<_>>(),
            "rules": rules.iter().map(|(name, attribute, eq, route, fallback)| serde_json::json!({
                "name": name, "match": [{"attribute": attribute, "eq": eq}],
                "route": route, "fallback": fallback,
            })).collect::<Vec<_>>(),
            "default": {"route": targets.first().map_or("none", |t| t.0.as_str())},
        });
        let Ok(spec) = serde_json::from_value::<RoutingPolicySpec>(spec) else {
            return Ok(());
        };
        match compile(&spec) {
            Err(e) => prop_assert!(!e.issues.is_empty()),
            Ok(policy) => {
                let d = policy.decide(&Request {
                    request_id: "r",
                    task: Some(&task),
                    input_tokens: tokens,
                    complexity,
                    battery,
                    network: Network::Online,
                    ..Request::default()
                });
                prop_assert!(policy.targets().iter().any(|t| t.name == d.target.name));
            }
        }
    }
}

fn authority() -> Authority {
    let auth = Authority::new(credential_keys(), Duration::from_secs(3600));
    auth.set_bootstrap_tokens(vec![BootstrapToken {
        name: "t".into(),
        token: TOKEN.into(),
        labels: Default::default(),
        expires_at: None,
        max_devices: None,
    }]);
    auth
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn enrolment_requests_never_panic(
        token in prop_oneof![Just(TOKEN.to_owned()), text()],
        device_id in text(),
        public_key in prop_oneof![
            prop::collection::vec(any::<u8>(), 32..=32),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
        derive_id in any::<bool>(),
        proof in prop::collection::vec(any::<u8>(), 0..80),
        proof_time in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX)],
        labels in prop::collection::hash_map(text(), text(), 0..40),
        facts in prop::option::of((text(), text(), any::<u64>())),
    ) {
        // Half the time the id is the key's, so the checks past it are reached too.
        let device_id = match <[u8; 32]>::try_from(public_key.as_slice()) {
            Ok(key) if derive_id => edgewise_proto::identity::device_id_for(&key),
            _ => device_id,
        };
        let request = EnrollRequest {
            bootstrap_token: token,
            device_id,
            public_key,
            proof,
            proof_time_unix_ms: proof_time,
            self_labels: labels.into_iter().collect::<HashMap<_, _>>(),
            facts: facts.map(|(os, arch, memory_mib)| DeviceFacts {
                os,
                arch,
                memory_mib,
                ..DeviceFacts::default()
            }),
        };
        // Random keys and proofs cannot verify: every one is refused, none panics.
        prop_assert!(authority().enroll(&request).is_err());
    }

    #[test]
    fn credentials_never_panic(credential in prop_oneof![text(), "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,60}"]) {
        prop_assert!(authority().verify_credential(&credential).is_err());
    }
}

/// Sync frames of arbitrary bytes on a live gateway: each stream ends with an error status
/// (never OK, never a hang), and an honest agent enrols and syncs afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_sync_frames_end_their_stream_with_an_error_and_the_gateway_serves_on() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let h = Harness::start().await;
    h.apply([edgewise_operator::gateway::Change::ApplyPolicy(routing_policy(
        "p",
        serde_json::json!({"targets": [{"name": "d", "device": {"model": "m"}}], "default": {"route": "d"}}),
    ))]);
    let credential = {
        let id = edgewise_agent::identity::Identity::ephemeral();
        let req = id.enroll_request(
            TOKEN,
            &facts("linux", "amd64", 4096, &[]),
            &Default::default(),
        );
        let mut c =
            edgewise_proto::fleet::fleet_client::FleetClient::new(fleet_channel(&h.gateway_url()));
        c.enroll(req).await.expect("enrols").into_inner().credential
    };
    let mut runner = TestRunner::deterministic();
    let frames = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..256), 1..4);
    for _ in 0..24 {
        let body = frames.new_tree(&mut runner).expect("a value").current();
        let mut grpc = raw_grpc(&h.gateway_url()).await;
        let stream = futures_util::stream::iter(body.into_iter().map(bytes::Bytes::from));
        let mut request = tonic::Request::new(stream);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().expect("metadata"),
        );
        let call = grpc.streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static("/edgewise.v1.Fleet/Sync"),
            edgewise_proto::codec::RawRequestCodec::<bytes::Bytes>::default(),
        );
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            let mut inbound = match call.await {
                Err(status) => return status,
                Ok(r) => r.into_inner(),
            };
            loop {
                match inbound.message().await {
                    Err(status) => return status,
                    Ok(None) => return tonic::Status::ok("ended"),
                    Ok(Some(_)) => {}
                }
            }
        })
        .await
        .expect("the stream ends within 15 s");
        assert_ne!(
            ended.code(),
            tonic::Code::Ok,
            "garbage closed as OK: {ended:?}"
        );
    }
    let agent = TestAgent::start(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "amd64", 4096, &[]),
        None,
    );
    eventually(
        Duration::from_secs(20),
        "an honest agent's policy",
        || async { agent.device.policy.version() },
    )
    .await;
    agent.stop().await;
}

/// Request bodies of arbitrary bytes on the dev API endpoint: a 4xx naming the problem,
/// never a 5xx, and the endpoint answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bodies_on_the_dev_api_get_a_client_error() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let dir = tempfile::tempdir().expect("tempdir");
    let api = edgewise_dev::devapi::DevApi::start_with(
        dir.path(),
        loopback(),
        Duration::from_millis(200),
        50,
    )
    .await
    .expect("starts");
    let http = reqwest::Client::new();
    let base = api.url();
    let collection = format!(
        "{base}/apis/{}/{}/namespaces/default/modelversions",
        edgewise_operator::crd::GROUP,
        edgewise_operator::crd::VERSION
    );
    let mut runner = TestRunner::deterministic();
    let bodies = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "\\PC{0,200}".prop_map(String::into_bytes),
        Just(b"{\"apiVersion\": 7, \"kind\": [], \"metadata\": \"x\"}".to_vec()),
        Just(
            b"{\"metadata\": {\"name\": \"a\"}, \"spec\": {\"model\": {\"deep\": [[[[]]]]}}}"
                .to_vec()
        ),
    ];
    for i in 0..48 {
        let body = bodies.new_tree(&mut runner).expect("a value").current();
        let (method, url, content_type) = match i % 4 {
            0 => (
                reqwest::Method::POST,
                collection.clone(),
                "application/json",
            ),
            1 => (
                reqwest::Method::PUT,
                format!("{collection}/a"),
                "application/json",
            ),
            2 => (
                reqwest::Method::PATCH,
                format!("{collection}/a"),
                "application/merge-patch+json",
            ),
            _ => (
                reqwest::Method::PATCH,
                format!("{collection}/a"),
                "application/json-patch+json",
            ),
        };
        let r = http
            .request(method.clone(), &url)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .expect("an answer");
        assert!(
            r.status().is_client_error(),
            "{method} {url} with {:?}: {}",
            String::from_utf8_lossy(&body),
            r.status()
        );
    }
    let listed = http.get(&collection).send().await.expect("lists");
    assert_eq!(listed.status(), 200);
}
