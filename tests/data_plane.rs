//! The on-device runtime and the OpenAI-compatible API, driven by the official `openai`
//! Python SDK over loopback, on tiny GGUF models the tests write.

use std::collections::BTreeMap;
use std::time::Duration;

use edgewise_agent::config::AgentConfig;
use edgewise_core::variant::{ModelFormat, Requirements, Variant};
use edgewise_operator::gateway::Change;
use edgewise_tests::{
    Fault, FaultProxy, Harness, TOKEN, eventually, facts, model_version, quick_backoff, rollout,
    routing_policy,
};
use edgewise_tests::{openai_sdk, serve_model, tiny_model};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_model_answers_the_openai_sdk_streaming_and_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(&dir.path().join("tiny.gguf"), 3, false);
    let served = serve_model(&model, "tiny").await;
    let said = openai_sdk(&served.base_url, "tiny", None).await;

    assert_eq!(said["models"], serde_json::json!(["tiny"]), "{said}");
    let chat = &said["chat"];
    assert!(
        !chat["text"].as_str().unwrap_or_default().is_empty(),
        "{said}"
    );
    assert!(
        chat["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 5,
        "{said}"
    );
    assert!(
        chat["usage"]["completion_tokens"].as_u64().unwrap_or(0) <= 8,
        "{said}"
    );
    // Greedy decoding: the streamed answer is the same text, in several chunks.
    assert_eq!(said["stream"]["text"], chat["text"], "{said}");
    assert!(said["stream"]["chunks"].as_u64().unwrap_or(0) > 1, "{said}");
    assert_eq!(said["stream"]["usage"], chat["usage"], "{said}");
    assert_eq!(said["stream"]["finish"], chat["finish"], "{said}");
    // "the device" is BOS + two words.
    assert_eq!(said["completion"]["usage"]["prompt_tokens"], 3, "{said}");
    assert_eq!(said["errors"]["empty_messages"]["status"], 400, "{said}");
    assert_eq!(
        said["errors"]["empty_messages"]["param"], "messages",
        "{said}"
    );
    assert_eq!(said["errors"]["too_long"]["status"], 400, "{said}");
    assert_eq!(
        said["errors"]["too_long"]["code"], "context_length_exceeded",
        "{said}"
    );
}

/// A free loopback port for the agent's data plane.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

async fn post(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let r = http
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": "assistant", "max_tokens": 6,
        "messages": [{"role": "user", "content": "route the request to the edge"}]});
    b["edgewise"] = extra;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_executes_the_policy_on_device_in_the_cloud_with_fallback_and_pinning() {
    let h = Harness::start().await;
    // The device model, published and rolled out like any model.
    let file = tiny_model(&h.dir.path().join("assistant-1.gguf"), 1, false);
    let artifact = h
        .put_artifact(
            "assistant/1.0.0/cpu.gguf",
            std::fs::read(&file).expect("read"),
        )
        .await;
    // The cloud: a real OpenAI-compatible server on its own model, behind a fault proxy.
    let cloud_model = tiny_model(&h.dir.path().join("big.gguf"), 9, false);
    let cloud = serve_model(&cloud_model, "big").await;
    let upstream: std::net::SocketAddr = cloud
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .parse()
        .expect("addr");
    let proxy = FaultProxy::start(upstream).await;
    let endpoint = format!("http://{}/v1", proxy.addr);
    h.apply([
        Change::ApplyVersion(model_version(
            "assistant",
            "1.0.0",
            vec![Variant {
                name: "cpu".into(),
                artifact,
                format: ModelFormat::Gguf,
                requires: Requirements::default(),
            }],
        )),
        Change::ApplyRollout(rollout("assistant").named("assistant").stable("1.0.0").build()),
        Change::ApplyPolicy(routing_policy(
            "p",
            json!({
                "targets": [
                    {"name": "on-device", "device": {"model": "assistant"}},
                    {"name": "vault", "device": {"model": "vault"}},
                    {"name": "cloud", "cloud": {"endpoint": endpoint, "model": "big",
                        "costPer1kTokensUsd": 0.5, "timeoutMs": 1500}}
                ],
                "rules": [
                    {"name": "secret", "match": [{"attribute": "dataClass", "eq": "secret"}], "route": "vault"},
                    {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
                    {"name": "reasoning", "match": [{"attribute": "task", "eq": "reason"}], "route": "cloud", "fallback": ["on-device"]}
                ],
                "default": {"route": "on-device", "fallback": ["cloud"]}
            }),
        )),
    ]);

    let dir = h.dir.path().join("agent");
    let addr = free_addr();
    let config = AgentConfig {
        gateway: h.gateway_url(),
        bootstrap_token: TOKEN.into(),
        data_dir: dir.clone(),
        router_socket: Some(dir.join("router.sock")),
        publisher_key: None,
        labels: BTreeMap::new(),
        facts: facts("linux", "amd64", 4096, &[]),
        backoff: quick_backoff(),
        durable: true,
        probe_network: false,
        data_plane: Some(addr),
        model_memory: None,
        cloud: Vec::new(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(edgewise_agent::agent::run(config, stop.clone()));
    let base = format!("http://{addr}/v1");
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(60),
        "assistant 1.0.0 loaded",
        || async {
            let v: Value = http
                .get(format!("{base}/models"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["data"][0]["edgewise"]["loaded"] == "1.0.0").then_some(())
        },
    )
    .await;

    // The official SDK, default route: answered on the device by the rolled-out version.
    let said = openai_sdk(
        &base,
        "assistant",
        Some(&json!({"edgewise": {"dataClass": "public"}})),
    )
    .await;
    // Every model the policy routes to, installed or not.
    assert_eq!(said["models"], json!(["assistant", "vault"]), "{said}");
    let ew = &said["chat"]["edgewise"];
    assert_eq!(ew["target"], "on-device", "{said}");
    assert_eq!(ew["modelVersion"], "1.0.0", "{said}");
    assert_eq!(ew["rule"], "default", "{said}");
    assert_eq!(
        said["chat"]["headers"]["x-edgewise-target"], "on-device",
        "{said}"
    );
    assert_eq!(said["stream"]["text"], said["chat"]["text"], "{said}");
    assert_eq!(said["errors"]["empty_messages"]["status"], 400, "{said}");
    assert_eq!(
        said["errors"]["too_long"]["code"], "context_length_exceeded",
        "{said}"
    );
    // Unknown model: OpenAI's 404.
    let (status, body) = post(
        &http,
        &base,
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );

    // The reasoning rule goes to the cloud, which answers with its own model; cost counted.
    let (status, body) = post(&http, &base, chat(json!({"task": "reason"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edgewise"]["target"], "cloud", "{body}");
    assert_eq!(body["edgewise"]["fallbackUsed"], false, "{body}");
    assert!(
        body["edgewise"]["costUsd"].as_f64().unwrap_or(0.0) > 0.0,
        "{body}"
    );
    let direct = post(&http, &cloud.base_url, chat(json!({}))).await.1;
    assert_eq!(
        body["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"],
        "the cloud's answer is the cloud model's"
    );

    // Each failure kind of the cloud falls back to the device, saying why.
    for (fault, why) in [
        (Fault::Cut, "unreachable"),
        (Fault::ServerError, "HTTP 500"),
        (Fault::Silent, "within 1500 ms"),
        (Fault::TooMany, "HTTP 429"),
    ] {
        proxy.set(fault);
        let (status, body) = post(&http, &base, chat(json!({"task": "reason"}))).await;
        assert_eq!(status, 200, "{fault:?}: {body}");
        assert_eq!(body["edgewise"]["target"], "on-device", "{fault:?}: {body}");
        assert_eq!(body["edgewise"]["fallbackUsed"], true, "{fault:?}: {body}");
        let reason = body["edgewise"]["fallbacks"][0]["reason"]
            .as_str()
            .unwrap_or_default();
        assert!(reason.contains(why), "{fault:?}: {reason}");
    }
    // After a 429 with retry-after the endpoint is left alone until then.
    proxy.set(Fault::Pass);
    let before = proxy.bytes();
    let (_, body) = post(&http, &base, chat(json!({"task": "reason"}))).await;
    assert!(
        body["edgewise"]["fallbacks"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rate limited"),
        "{body}"
    );
    assert_eq!(proxy.bytes(), before, "nothing sent while rate limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Pinned: private data stays on the device, and a pinned target that cannot serve is a
    // 503, never the cloud. The cloud receives zero bytes of either.
    let before = proxy.bytes();
    let (status, body) = post(&http, &base, chat(json!({"dataClass": "private"}))).await;
    assert_eq!(
        (status, body["edgewise"]["target"].clone()),
        (200, json!("on-device")),
        "{body}"
    );
    assert_eq!(body["edgewise"]["pinned"], true, "{body}");
    let (status, body) = post(&http, &base, chat(json!({"dataClass": "secret"}))).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("keeps this request on vault"),
        "{body}"
    );
    assert_eq!(
        proxy.bytes(),
        before,
        "the cloud received bytes of a pinned request"
    );
    // And the cloud still works for what may go there.
    let (_, body) = post(&http, &base, chat(json!({"task": "reason"}))).await;
    assert_eq!(body["edgewise"]["target"], "cloud", "{body}");
    assert!(proxy.bytes() > before);

    // `status` shows what the runtime serves, with the requests it answered.
    let out = std::process::Command::new(edgewise_tests::workspace_binary("edgewise-agent"))
        .args(["status", "-o", "json", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("status runs");
    let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
    let serving = &status["status"]["serving"][0];
    assert_eq!(serving["model"], "assistant", "{status}");
    assert_eq!(serving["version"], "1.0.0", "{status}");
    assert!(serving["requests"].as_u64().unwrap_or(0) >= 8, "{status}");
    let text = std::process::Command::new(edgewise_tests::workspace_binary("edgewise-agent"))
        .args(["status", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("SERVING") && text.contains("embedded (candle, GGUF)"),
        "{text}"
    );

    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
}
