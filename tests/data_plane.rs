//! The on-device runtime and the OpenAI-compatible API, driven by the official `openai`
//! Python SDK over loopback, on tiny GGUF models the tests write.

use std::collections::BTreeMap;
use std::time::Duration;

use edgewise_agent::config::AgentConfig;
use edgewise_core::variant::{ModelFormat, Requirements, Variant};
use edgewise_operator::gateway::Change;
use edgewise_operator::telemetry::ingest::SinkConfig;
use edgewise_tests::{
    Fault, FaultProxy, Harness, TOKEN, eventually, facts, model_version, quick_backoff, rollout,
    routing_policy,
};
use edgewise_tests::{
    data_plane_serves, get_json, openai_sdk, python_fixture, serve_model, tiny_model,
};
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

/// A device agent's configuration with its data plane on `addr`.
fn agent_config(h: &Harness, dir: &std::path::Path, addr: std::net::SocketAddr) -> AgentConfig {
    AgentConfig {
        gateway: h.gateway_url(),
        gateway_tls: edgewise_tests::tls_for(&h.gateway_url()),
        bootstrap_token: TOKEN.into(),
        data_dir: dir.to_owned(),
        router_socket: Some(dir.join("router.sock")),
        socket_peers: Default::default(),
        publisher_key: None,
        labels: BTreeMap::new(),
        facts: facts("linux", "amd64", 4096, &[]),
        backoff: quick_backoff(),
        durable: true,
        probe_network: false,
        data_plane: Some(addr),
        model_memory: None,
        data_plane_threads: std::num::NonZeroUsize::MIN,
        data_plane_socket: None,
        cloud: Vec::new(),
        runtimes: Vec::new(),
    }
}

/// An agent run in this process until `stop` is cancelled.
type AgentTask = tokio::task::JoinHandle<Result<(), edgewise_agent::agent::StartError>>;

/// Starts an agent on `config` and waits until its data plane serves `version`; the stop
/// token, the task, the data plane's base URL and a client of it.
async fn serving_agent(
    config: AgentConfig,
    version: &str,
) -> (
    tokio_util::sync::CancellationToken,
    AgentTask,
    String,
    reqwest::Client,
) {
    let addr = config.data_plane.expect("a data plane");
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(edgewise_agent::agent::run(config, stop.clone()));
    let base = format!("http://{addr}/v1");
    let http = reqwest::Client::new();
    data_plane_serves(&http, &base, version).await;
    (stop, agent, base, http)
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
    h.publish_tiny("assistant", "1.0.0", 1).await;
    // The cloud: a real OpenAI-compatible server on its own model, behind a fault proxy.
    let cloud = Cloud::start(&tiny_model(&h.dir.path().join("big.gguf"), 9, false), "big").await;
    let (proxy, endpoint) = (&cloud.proxy, cloud.endpoint());
    h.apply([
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
                    {"name": "reasoning", "match": [{"attribute": "task", "eq": "reason"}], "route": "cloud", "fallback": ["on-device"]},
                    {"name": "long", "match": [{"attribute": "inputTokens", "gt": 80}], "route": "cloud", "fallback": ["on-device"]}
                ],
                "default": {"route": "on-device", "fallback": ["cloud"]}
            }),
        )),
    ]);

    let dir = h.dir.path().join("agent");
    let addr = free_addr();
    let (stop, agent, base, http) = serving_agent(agent_config(&h, &dir, addr), "1.0.0").await;

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

    // Malformed requests get OpenAI error objects with the status OpenAI uses.
    let raw = |body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{base}/chat/completions");
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("an error object"))
        }
    };
    let (status, body) = raw(b"{\"model\": \"assistant\", \"messages\": [".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let (status, body) = raw(br#"{"model": "assistant"}"#.to_vec()).await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("messages")),
        "{body}"
    );
    let mut huge = br#"{"model": "assistant", "messages": [{"role": "user", "content": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend_from_slice(br#""}]}"#);
    let r = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    // The unread rest of the body ends the connection, and the client is told so: a pooling
    // client must not send its next request on it.
    assert_eq!(r.headers()["connection"], "close");
    let body: Value = r.json().await.expect("an error object");
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");

    // The reasoning rule goes to the cloud, which answers with its own model; cost counted.
    let (status, body) = post(&http, &base, chat(json!({"task": "reason"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edgewise"]["target"], "cloud", "{body}");
    assert_eq!(body["edgewise"]["fallbackUsed"], false, "{body}");
    assert!(
        body["edgewise"]["costUsd"].as_f64().unwrap_or(0.0) > 0.0,
        "{body}"
    );
    let direct = post(&http, &cloud.served.base_url, chat(json!({}))).await.1;
    assert_eq!(
        body["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"],
        "the cloud's answer is the cloud model's"
    );

    // Input tokens are the device model's count: 120 letters it has no word for are 120
    // byte tokens (more than 80), though a 4-characters-a-token estimate says 34.
    let mut long = chat(json!({}));
    long["messages"][0]["content"] = json!("q".repeat(120));
    let (status, body) = post(&http, &base, long).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edgewise"]["rule"], "long", "{body}");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 80,
        "the cloud read it as many tokens too: {body}"
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

    // An app that goes away mid-stream closes the cloud request on its behalf: the slow
    // answer would run for many seconds, and its connection is not kept for reuse.
    proxy.set(Fault::Trickle);
    let closed = proxy.closed();
    let mut body = chat(json!({"task": "reason"}));
    body["stream"] = json!(true);
    body["max_tokens"] = json!(400);
    let mut streaming = http
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(streaming.status(), 200);
    assert_eq!(streaming.headers()["x-edgewise-target"], "cloud");
    let first = streaming.chunk().await.expect("a chunk").expect("bytes");
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(streaming);
    eventually(
        Duration::from_secs(5),
        "the upstream request closed",
        || async { (proxy.closed() > closed).then_some(()) },
    )
    .await;
    proxy.set(Fault::Pass);

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

/// A cloud: `edgewise-agent serve-model` on `file`, behind a fault proxy.
struct Cloud {
    served: edgewise_tests::ServedModel,
    proxy: FaultProxy,
}

impl Cloud {
    async fn start(file: &std::path::Path, name: &str) -> Self {
        let served = serve_model(file, name).await;
        let upstream: std::net::SocketAddr = served
            .base_url
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .parse()
            .expect("addr");
        let proxy = FaultProxy::start(upstream).await;
        Cloud { served, proxy }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1", self.proxy.addr)
    }

    /// What this cloud answers the test's chat request, asked directly.
    async fn answer(&self, http: &reqwest::Client) -> String {
        let (_, body) = post(http, &self.served.base_url, chat(json!({}))).await;
        body["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
            .to_owned()
    }
}

/// Runs `tests/fixtures/openai_phases.py` (the official SDK, over TCP or a Unix socket).
async fn openai_phases(base: &str, extra: &Value, socket: Option<&std::path::Path>) -> Value {
    let mut args = vec![base.to_owned(), "assistant".to_owned(), extra.to_string()];
    args.extend(socket.map(|s| s.display().to_string()));
    python_fixture("openai_phases.py", &args).await
}

/// Policy of the second test: `shadow` names the shadow target, `budget` caps cloud
/// requests per day.
fn phases_policy(same: &str, other: &str, shadow: &str, budget: Option<u64>) -> Value {
    let mut spec = json!({
        "targets": [
            {"name": "on-device", "device": {"model": "assistant"}},
            {"name": "same", "cloud": {"endpoint": same, "model": "same",
                "costPer1kTokensUsd": 0.5, "timeoutMs": 1500}},
            {"name": "other", "cloud": {"endpoint": other, "model": "other",
                "costPer1kTokensUsd": 1.0, "timeoutMs": 1500}}
        ],
        "rules": [
            {"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"},
            {"name": "draft", "match": [{"attribute": "task", "eq": "draft"}],
                "route": "on-device", "fallback": ["other"], "refine": "other"},
            {"name": "later", "match": [{"attribute": "task", "eq": "later"}],
                "route": "other", "fallback": ["on-device"], "reprocess": true},
            {"name": "reason", "match": [{"attribute": "task", "eq": "reason"}],
                "route": "other", "fallback": ["on-device"]}
        ],
        "default": {"route": "on-device", "fallback": ["other"]},
        "shadow": {"sampleRate": 1.0, "target": shadow}
    });
    if let Some(n) = budget {
        spec["budgets"] = json!({"cloudRequestsPerDevicePerDay": n});
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_refines_shadows_keeps_budgets_and_reprocesses_offline_answers() {
    let ch = edgewise_tests::ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    let file = h.publish_tiny("assistant", "1.0.0", 1).await;
    // Two clouds: one serves the device's own model (so its answers agree), one another.
    let same = Cloud::start(&file, "same").await;
    let other = Cloud::start(
        &tiny_model(&h.dir.path().join("other.gguf"), 9, false),
        "other",
    )
    .await;
    let policy = |shadow: &str, budget| {
        Change::ApplyPolicy(routing_policy(
            "p",
            phases_policy(&same.endpoint(), &other.endpoint(), shadow, budget),
        ))
    };
    h.apply([
        Change::ApplyRollout(
            rollout("assistant")
                .named("assistant")
                .stable("1.0.0")
                .build(),
        ),
        policy("same", None),
    ]);
    let dir = h.dir.path().join("agent");
    let addr = free_addr();
    let socket = dir.join("openai.sock");
    let mut config = agent_config(&h, &dir, addr);
    config.data_plane_socket = Some(socket.clone());
    let (stop, agent, base, http) = serving_agent(config.clone(), "1.0.0").await;
    let device_text = same.answer(&http).await;
    let other_text = other.answer(&http).await;
    assert_ne!(device_text, other_text, "the two clouds must differ");

    // Refinement, through the official SDK over TCP and over the Unix socket.
    let draft = json!({"edgewise": {"task": "draft"}});
    for socket in [None, Some(socket.as_path())] {
        let said = openai_phases(&base, &draft, socket).await;
        let whole = &said["whole"];
        assert_eq!(whole["text"], json!(other_text), "refined answer: {said}");
        assert_eq!(whole["choices"], 1, "{said}");
        assert_eq!(whole["edgewise"]["refined"], true, "{said}");
        assert_eq!(whole["edgewise"]["target"], "on-device", "{said}");
        assert_eq!(whole["edgewise"]["refine"]["target"], "other", "{said}");
        assert_eq!(
            whole["edgewise"]["draft"]["text"],
            json!(device_text),
            "{said}"
        );
        // Streaming: the device's answer first as choice 0, then the refinement as choice 1,
        // each of its chunks marked.
        assert_eq!(said["stream_texts"]["0"], json!(device_text), "{said}");
        assert_eq!(said["stream_texts"]["1"], json!(other_text), "{said}");
        let chunks = said["chunks"].as_array().expect("chunks");
        let first_refined = chunks
            .iter()
            .position(|c| c["index"] == 1)
            .expect("refined chunks");
        assert!(
            chunks[first_refined..]
                .iter()
                .all(|c| c["index"] == 1 && (c["phase"] == "refine" || c["content"].is_null())),
            "the phases interleave or are unmarked: {said}"
        );
        assert!(
            chunks[..first_refined]
                .iter()
                .any(|c| c["finish"] == "stop" || c["finish"] == "length"),
            "the first phase ends before the second: {said}"
        );
        assert_eq!(said["stream_edgewise"]["refined"], true, "{said}");
    }

    // Shadows: every device answer is also sent to `same` and agrees; a private request
    // is never shadowed (zero bytes to either cloud).
    let before = (same.proxy.bytes(), other.proxy.bytes());
    let (status, body) = post(&http, &base, chat(json!({"dataClass": "private"}))).await;
    assert_eq!(
        (status, body["edgewise"]["shadowed"].clone()),
        (200, json!(false)),
        "{body}"
    );
    for _ in 0..3 {
        let (status, body) = post(&http, &base, chat(json!({"dataClass": "public"}))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["edgewise"]["shadowed"], true, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        other.proxy.bytes(),
        before.1,
        "nothing went to the other cloud"
    );
    assert!(same.proxy.bytes() > before.0, "the shadows went to `same`");
    let agreed = "SELECT count() FROM edgewise.inference_events FINAL \
        WHERE rule = 'default' AND target = 'on-device' AND shadow = 'agree'";
    eventually(
        Duration::from_secs(30),
        "3 agreeing shadows in ClickHouse",
        || async { (ch.count(agreed).await == 3).then_some(()) },
    )
    .await;
    // The data plane measured each request itself: time to first token within its latency.
    let measured = "SELECT count() FROM edgewise.inference_events FINAL \
        WHERE rule = 'default' AND first_token_ms > 0 AND first_token_ms <= latency_ms";
    assert_eq!(ch.count(measured).await, 3, "time to first token recorded");
    // The refinements were measured as cloud requests of the draft rule, with their cost.
    let refined = "SELECT count() FROM edgewise.inference_events FINAL \
        WHERE rule = 'draft' AND target = 'other' AND NOT on_device AND cost_usd > 0";
    eventually(
        Duration::from_secs(30),
        "4 refinements in ClickHouse",
        || async { (ch.count(refined).await == 4).then_some(()) },
    )
    .await;

    // Shadowed to the other model, device answers disagree.
    let spec = phases_policy(&same.endpoint(), &other.endpoint(), "other", None);
    h.apply([policy("other", None)]);
    in_force(&http, &base, &spec).await;
    let (status, body) = post(&http, &base, chat(json!({}))).await;
    assert_eq!(
        (status, body["edgewise"]["shadowed"].clone()),
        (200, json!(true)),
        "{body}"
    );
    let disagreed = "SELECT count() FROM edgewise.inference_events FINAL \
        WHERE rule = 'default' AND shadow = 'disagree'";
    eventually(
        Duration::from_secs(30),
        "a disagreeing shadow in ClickHouse",
        || async { (ch.count(disagreed).await >= 1).then_some(()) },
    )
    .await;

    // Offline, then reconcile: the cloud is cut and the app says it is offline; the device
    // answers, the request is kept, and once the cloud answers it is reprocessed.
    other.proxy.set(Fault::Cut);
    let (status, body) = post(
        &http,
        &base,
        chat(json!({"task": "later", "network": "offline"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edgewise"]["target"], "on-device", "{body}");
    let id = body["edgewise"]["reprocess"]["id"]
        .as_str()
        .expect("a reprocess id")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list: Value = http
        .get(format!("{base}/edgewise/reprocessed"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list["data"],
        json!([]),
        "nothing reprocessed while the cloud is cut"
    );
    other.proxy.set(Fault::Pass);
    let done = eventually(
        Duration::from_secs(60),
        "the request reprocessed",
        || async {
            let list = get_json(&http, &format!("{base}/edgewise/reprocessed")).await?;
            list["data"].as_array().filter(|d| !d.is_empty()).cloned()
        },
    )
    .await;
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["id"], json!(id));
    assert_eq!(done[0]["device"]["text"], json!(device_text));
    assert_eq!(done[0]["cloud"]["text"], json!(other_text));
    assert_eq!(done[0]["agreement"]["agree"], false, "{done:?}");
    let gone = http
        .delete(format!("{base}/edgewise/reprocessed/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(gone.status(), 200);
    let again = http
        .delete(format!("{base}/edgewise/reprocessed/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(again.status(), 404);

    // Budgets: counted from real requests, kept across a restart.
    let usage = |dir: &std::path::Path| -> u64 {
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("usage.json")).expect("usage.json"))
                .expect("json");
        v["cloud_requests"].as_u64().expect("count")
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spent = usage(&dir);
    // 4 refinements, 8 shadows (of the 4 drafts and 4 default requests), 1 reprocessed.
    assert_eq!(
        spent, 13,
        "refinements, shadows and reprocessing are cloud requests"
    );
    let spec = phases_policy(
        &same.endpoint(),
        &other.endpoint(),
        "other",
        Some(spent + 2),
    );
    h.apply([policy("other", Some(spent + 2))]);
    in_force(&http, &base, &spec).await;
    let reason = || chat(json!({"task": "reason"}));
    for _ in 0..2 {
        let (_, body) = post(&http, &base, reason()).await;
        assert_eq!(body["edgewise"]["target"], "other", "within budget: {body}");
    }
    let (_, body) = post(&http, &base, reason()).await;
    assert_eq!(
        body["edgewise"]["target"], "on-device",
        "over budget: {body}"
    );
    // Written behind the requests, within the agent's write interval.
    eventually(Duration::from_secs(5), "usage.json counts them", || async {
        (usage(&dir) == spent + 2).then_some(())
    })
    .await;
    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
    let (stop, agent, _, _) = serving_agent(config, "1.0.0").await;
    let (_, body) = post(&http, &base, reason()).await;
    assert_eq!(
        body["edgewise"]["target"], "on-device",
        "still over budget after a restart: {body}"
    );
    assert_eq!(usage(&dir), spent + 2);
    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
}

/// Waits until the agent decides with `spec` (asked with private requests, which never
/// leave the device).
async fn in_force(http: &reqwest::Client, base: &str, spec: &Value) {
    let spec: edgewise_core::policy::spec::RoutingPolicySpec =
        serde_json::from_value(spec.clone()).expect("a policy spec");
    let version = edgewise_core::policy::policy_version(&spec);
    eventually(
        Duration::from_secs(30),
        "the new policy in force",
        || async {
            let (_, body) = post(http, base, chat(json!({"dataClass": "private"}))).await;
            (body["edgewise"]["policyVersion"] == json!(version)).then_some(())
        },
    )
    .await;
}

/// The agent's `status -o json` for the data dir `dir`.
fn agent_status(dir: &std::path::Path) -> Value {
    let out = std::process::Command::new(edgewise_tests::workspace_binary("edgewise-agent"))
        .args(["status", "-o", "json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("status runs");
    serde_json::from_slice(&out.stdout).expect("status json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_runtime_is_started_from_its_command_restarted_and_fallen_back_from_meanwhile()
{
    let h = Harness::start().await;
    let file = h.publish_tiny("assistant", "1.0.0", 1).await;
    let cloud = Cloud::start(
        &tiny_model(&h.dir.path().join("other.gguf"), 9, false),
        "other",
    )
    .await;
    h.apply([
        Change::ApplyRollout(rollout("assistant").named("assistant").stable("1.0.0").build()),
        Change::ApplyPolicy(routing_policy(
            "p",
            json!({
                "targets": [
                    {"name": "on-device", "device": {"model": "assistant"}},
                    {"name": "cloud", "cloud": {"endpoint": cloud.endpoint(), "model": "other", "timeoutMs": 3000}}
                ],
                "default": {"route": "on-device", "fallback": ["cloud"]}
            }),
        )),
    ]);
    let dir = h.dir.path().join("agent");
    let addr = free_addr();
    let mut config = agent_config(&h, &dir, addr);
    // GGUF goes to a server the agent starts per version (serve-model plays llama-server).
    let agent_binary = edgewise_tests::workspace_binary("edgewise-agent");
    config.runtimes = vec![edgewise_agent::runtime::external::ExternalConfig {
        name: "serve-model".into(),
        formats: vec!["gguf".into()],
        url: None,
        command: Some(vec![
            agent_binary.display().to_string(),
            "serve-model".into(),
            "--model".into(),
            "{model}".into(),
            "--addr".into(),
            "{addr}".into(),
        ]),
        model: None,
        ready_timeout_secs: 30,
    }];
    let (stop, agent, base, http) = serving_agent(config, "1.0.0").await;
    let serving = agent_status(&dir)["status"]["serving"][0].clone();
    assert!(
        serving["runtime"]
            .as_str()
            .is_some_and(|r| r.starts_with("external (serve-model")),
        "{serving}"
    );
    let pid = serving["process_id"].as_u64().expect("a process id");

    // The device's answer comes from the external server: the model's own text.
    let direct = serve_model(&file, "assistant").await;
    let expected = post(&http, &direct.base_url, chat(json!({}))).await.1["choices"][0]["message"]
        ["content"]
        .clone();
    let (status, body) = post(&http, &base, chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edgewise"]["target"], "on-device", "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], expected, "{body}");

    // Killed: requests fall back to the cloud while it restarts, then return to it.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let fell_back = eventually(Duration::from_secs(10), "a fallback", || async {
        let (_, body) = post(&http, &base, chat(json!({}))).await;
        (body["edgewise"]["target"] == "cloud").then_some(body)
    })
    .await;
    assert_eq!(fell_back["edgewise"]["fallbackUsed"], true, "{fell_back}");
    assert!(
        fell_back["edgewise"]["fallbacks"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("external runtime")),
        "{fell_back}"
    );
    eventually(
        Duration::from_secs(30),
        "served on the device again",
        || async {
            let (_, body) = post(&http, &base, chat(json!({}))).await;
            (body["edgewise"]["target"] == "on-device").then_some(())
        },
    )
    .await;
    let restarted = agent_status(&dir)["status"]["serving"][0]["process_id"].as_u64();
    assert!(
        restarted.is_some_and(|p| p != pid),
        "{restarted:?} after {pid}"
    );

    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
    // The agent's servers go with it.
    eventually(
        Duration::from_secs(10),
        "the external runtime stopped",
        || async {
            let alive =
                restarted.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            (!alive).then_some(())
        },
    )
    .await;
}

/// Trains a learned router with `scripts/train-router` on `examples` (text, complex).
fn train_router(dir: &std::path::Path, name: &str, examples: &[(String, bool)]) -> Vec<u8> {
    let data = dir.join(format!("{name}.jsonl"));
    let lines: Vec<String> = examples
        .iter()
        .map(|(text, complex)| json!({"text": text, "complex": complex}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).expect("examples");
    let model = dir.join(format!("{name}.json"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/train-router");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&data)
        .arg(&model)
        .arg("--bigrams")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "train-router: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(model).expect("a model")
}

/// What `scripts/train-router --score` computes for `texts` (the trainer's own features).
fn python_scores(model: &std::path::Path, texts: &[&str]) -> Vec<f64> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/train-router");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg("--score")
        .arg(model)
        .args(texts)
        .output()
        .expect("python3 runs");
    serde_json::from_slice(&out.stdout).expect("scores")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learned_router_version_rolled_out_changes_which_requests_go_to_the_cloud() {
    let ch = edgewise_tests::ClickHouse::start().await;
    let h = Harness::start_with_telemetry(&ch.url(), SinkConfig::default()).await;
    h.publish_tiny("assistant", "1.0.0", 1).await;
    let cloud = Cloud::start(
        &tiny_model(&h.dir.path().join("other.gguf"), 9, false),
        "other",
    )
    .await;
    // Labelled examples: questions that ask for reasoning, and small talk. 2.0.0 is trained
    // on the opposite labels, so rolling it out must flip where each kind goes.
    let reasoning = [
        "why does the network drop when the battery is low",
        "explain how the cloud model ranks the answers",
        "prove that the cache never serves a stale answer",
        "compare the latency of the device and the cloud and explain why",
        "analyze the cost of the cloud over a month",
        "why is the answer different today",
    ];
    let small_talk = [
        "hello",
        "thanks a lot",
        "good morning",
        "what time is it",
        "hi there",
        "ok see you",
    ];
    let labelled = |flip: bool| -> Vec<(String, bool)> {
        reasoning
            .iter()
            .map(|t| (t.to_string(), !flip))
            .chain(small_talk.iter().map(|t| (t.to_string(), flip)))
            .collect()
    };
    let v1 = train_router(h.dir.path(), "router-1", &labelled(false));
    let v2 = train_router(h.dir.path(), "router-2", &labelled(true));
    let mut routers = Vec::new();
    for (version, bytes) in [("1.0.0", v1), ("2.0.0", v2)] {
        let artifact = h
            .put_artifact(&format!("router/{version}/router.json"), bytes)
            .await;
        routers.push(Change::ApplyVersion(model_version(
            "router",
            version,
            vec![Variant {
                name: "any".into(),
                artifact,
                format: ModelFormat::EdgewiseRouter,
                requires: Requirements::default(),
            }],
        )));
    }
    h.apply(routers);
    h.apply([
        Change::ApplyRollout(
            rollout("assistant")
                .named("assistant")
                .stable("1.0.0")
                .build(),
        ),
        Change::ApplyRollout(rollout("router").named("router").stable("1.0.0").build()),
        Change::ApplyPolicy(routing_policy(
            "p",
            json!({
                "targets": [
                    {"name": "on-device", "device": {"model": "assistant"}},
                    {"name": "cloud", "cloud": {"endpoint": cloud.endpoint(), "model": "other"}}
                ],
                "rules": [{"name": "hard", "match": [{"attribute": "complexity", "gt": 0.5}],
                           "route": "cloud", "fallback": ["on-device"]}],
                "default": {"route": "on-device", "fallback": ["cloud"]}
            }),
        )),
    ]);
    let dir = h.dir.path().join("agent");
    let addr = free_addr();
    let (stop, agent, base, http) = serving_agent(agent_config(&h, &dir, addr), "1.0.0").await;
    let router_serves = |version: &'static str| {
        let dir = dir.clone();
        async move {
            eventually(
                Duration::from_secs(60),
                &format!("the learned router {version} serving"),
                || async {
                    let status = agent_status(&dir);
                    status["status"]["serving"]
                        .as_array()?
                        .iter()
                        .any(|m| m["model"] == "router" && m["version"] == version)
                        .then_some(())
                },
            )
            .await;
        }
    };
    router_serves("1.0.0").await;
    let ask = |text: &str| {
        let mut body = chat(json!({}));
        body["messages"] = json!([{"role": "user", "content": text}]);
        body
    };
    let targets = |version: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut out = Vec::new();
            for text in reasoning.iter().chain(small_talk.iter()) {
                let (status, body) = post(&http, &base, ask(text)).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["edgewise"]["routerVersion"], version, "{body}");
                out.push((
                    text.to_string(),
                    body["edgewise"]["target"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    body["edgewise"]["complexity"].as_f64().unwrap_or(-1.0),
                ));
            }
            out
        }
    };
    let with_v1 = targets("1.0.0").await;
    for (text, target, _) in &with_v1 {
        let expected = if reasoning.contains(&text.as_str()) {
            "cloud"
        } else {
            "on-device"
        };
        assert_eq!(target, expected, "{text:?} under router 1.0.0: {with_v1:?}");
    }
    // The agent scores exactly as the trainer does (the format's features, in Rust).
    let texts: Vec<&str> = with_v1.iter().map(|(t, _, _)| t.as_str()).collect();
    let python = python_scores(&h.dir.path().join("router-1.json"), &texts);
    for ((text, _, rust), py) in with_v1.iter().zip(&python) {
        assert!(
            (rust - py).abs() < 1e-4,
            "{text:?}: agent {rust}, trainer {py}"
        );
    }

    // A new version, rolled out like any model, flips the shares.
    h.apply([Change::ApplyRollout(
        rollout("router").named("router").stable("2.0.0").build(),
    )]);
    router_serves("2.0.0").await;
    let with_v2 = targets("2.0.0").await;
    for (text, target, _) in &with_v2 {
        let expected = if reasoning.contains(&text.as_str()) {
            "on-device"
        } else {
            "cloud"
        };
        assert_eq!(target, expected, "{text:?} under router 2.0.0: {with_v2:?}");
    }
    // Telemetry carries the router version of every request it scored.
    let per_version = |v: &str, target: &str| {
        format!(
            "SELECT count() FROM edgewise.inference_events FINAL WHERE router_version = '{v}' AND target = '{target}'"
        )
    };
    eventually(
        Duration::from_secs(30),
        "both versions in ClickHouse",
        || async {
            let counts = (
                ch.count(&per_version("1.0.0", "cloud")).await,
                ch.count(&per_version("1.0.0", "on-device")).await,
                ch.count(&per_version("2.0.0", "cloud")).await,
                ch.count(&per_version("2.0.0", "on-device")).await,
            );
            (counts == (6, 6, 6, 6)).then_some(())
        },
    )
    .await;
    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_switch_and_a_rollback_under_load_fail_no_request() {
    let h = Harness::start().await;
    h.publish_tiny("assistant", "1.0.0", 1).await;
    h.publish_tiny("assistant", "2.0.0", 2).await;
    h.apply([
        Change::ApplyRollout(
            rollout("assistant")
                .named("assistant")
                .stable("1.0.0")
                .build(),
        ),
        Change::ApplyPolicy(routing_policy(
            "p",
            json!({"targets": [{"name": "on-device", "device": {"model": "assistant"}}],
                   "default": {"route": "on-device"}}),
        )),
    ]);
    let dir = h.dir.path().join("agent");
    // The data plane on a multi-threaded runtime of its own (the other tests: one thread).
    let config = AgentConfig {
        data_plane_threads: std::num::NonZeroUsize::new(2).expect("nonzero"),
        ..agent_config(&h, &dir, free_addr())
    };
    let (stop, agent, base, http) = serving_agent(config, "1.0.0").await;
    // Eight streams of requests for as long as the switch and the rollback take.
    let load = tokio_util::sync::CancellationToken::new();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, base, load) = (http.clone(), base.clone(), load.clone());
        streams.spawn(async move {
            let mut served: Vec<(u16, String)> = Vec::new();
            while !load.is_cancelled() {
                let (status, body) = post(&http, &base, chat(json!({}))).await;
                let version = body["edgewise"]["modelVersion"].as_str().unwrap_or("");
                served.push((status, version.to_owned()));
            }
            served
        });
    }
    let switched_to = |version: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            eventually(
                Duration::from_secs(30),
                &format!("{version} answering"),
                || async {
                    let (_, body) = post(&http, &base, chat(json!({}))).await;
                    (body["edgewise"]["modelVersion"] == version).then_some(())
                },
            )
            .await;
        }
    };
    h.apply([Change::ApplyRollout(
        rollout("assistant")
            .named("assistant")
            .stable("2.0.0")
            .build(),
    )]);
    switched_to("2.0.0").await;
    // Back to the version kept on disk.
    h.apply([Change::ApplyRollout(
        rollout("assistant")
            .named("assistant")
            .stable("1.0.0")
            .build(),
    )]);
    switched_to("1.0.0").await;
    load.cancel();
    let mut served = Vec::new();
    while let Some(s) = streams.join_next().await {
        served.extend(s.expect("a stream"));
    }
    let failed: Vec<&(u16, String)> = served.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        served.len()
    );
    for v in ["1.0.0", "2.0.0"] {
        assert!(
            served.iter().any(|(_, s)| s == v),
            "the load saw {v} answer"
        );
    }
    stop.cancel();
    agent.await.expect("joins").expect("agent ran");
}

/// Cloud calls go through the proxy the environment names (`HTTP_PROXY`, `NO_PROXY`, read
/// as curl reads them), here a real tinyproxy: a plain-HTTP endpoint is asked in absolute
/// form through it, whole and streamed; an endpoint `NO_PROXY` names is called directly.
#[tokio::test]
async fn cloud_calls_go_through_the_proxy_unless_no_proxy_names_the_endpoint() {
    use edgewise_agent::dataplane::http::{CloudHttp, Proxies};
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(&dir.path().join("tiny.gguf"), 3, false);
    let served = serve_model(&model, "tiny").await;
    let proxy = Tinyproxy::start(dir.path()).await;
    let path = format!("{}/chat/completions", served.base_url);
    let through = CloudHttp::with_proxies(Proxies::builder().http(proxy.url.clone()).build())
        .expect("client");
    for stream in [false, true] {
        let text = cloud_answer(&through, &served.base_url, stream).await;
        assert!(
            !text.is_empty(),
            "an answer through the proxy (stream {stream})"
        );
    }
    let log = proxy.log();
    assert_eq!(
        log.matches(&format!("POST {path}")).count(),
        2,
        "both requests in absolute form through the proxy: {log}"
    );
    let direct = CloudHttp::with_proxies(
        Proxies::builder()
            .http(proxy.url.clone())
            .no("127.0.0.1")
            .build(),
    )
    .expect("client");
    assert!(
        !cloud_answer(&direct, &served.base_url, false)
            .await
            .is_empty()
    );
    assert_eq!(
        proxy.log().matches(&format!("POST {path}")).count(),
        2,
        "NO_PROXY's endpoint is called directly"
    );
}

/// The text of a chat answer from the cloud endpoint at `base`, through the data plane's
/// cloud client.
async fn cloud_answer(
    http: &edgewise_agent::dataplane::http::CloudHttp,
    base: &str,
    stream: bool,
) -> String {
    use edgewise_agent::runtime::Piece;
    use futures_util::StreamExt;
    let request =
        json!({"messages": [{"role": "user", "content": "is the device fast"}], "max_tokens": 4});
    let body = edgewise_agent::dataplane::cloud::upstream_body(
        request.as_object().expect("object"),
        "tiny",
        stream,
    );
    let Ok(mut pieces) = edgewise_agent::dataplane::cloud::call(
        http,
        base,
        edgewise_agent::openai::Endpoint::Chat,
        body,
        stream,
        None,
        Duration::from_secs(30),
    )
    .await
    else {
        panic!("the cloud call failed");
    };
    let mut text = String::new();
    while let Some(piece) = pieces.next().await {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(..) => return text,
            Piece::Failed(e) => panic!("the answer failed: {e}"),
        }
    }
    panic!("the answer ended before its end");
}

/// A tinyproxy (Debian's package) on a free loopback port, logging each request it serves.
struct Tinyproxy {
    _child: tokio::process::Child,
    url: String,
    log: std::path::PathBuf,
}

impl Tinyproxy {
    async fn start(dir: &std::path::Path) -> Self {
        let addr = free_addr();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {}\nListen 127.0.0.1\nTimeout 60\nMaxClients 16\nAllow 127.0.0.1\nLogLevel Info\nLogFile \"{}\"\n",
                addr.port(),
                log.display()
            ),
        )
        .expect("writes tinyproxy.conf");
        let child = tokio::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .kill_on_drop(true)
            .spawn()
            .expect("tinyproxy (apt install tinyproxy; scripts/test installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tinyproxy did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Tinyproxy {
            _child: child,
            url: format!("http://{addr}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An idle agent process with its data plane on is quiet once it has enrolled and taken
/// its policy: its threads (the data plane's own runtime, the telemetry writer, the main
/// runtime) sleep until something happens, under 1 % of a core (a 1 ms ticker would be 2 %).
#[tokio::test]
async fn an_idle_agent_with_its_data_plane_stays_under_one_percent_of_a_core() {
    let h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy(
        "p",
        json!({"targets": [{"name": "on-device", "device": {"model": "m"}},
                           {"name": "cloud", "cloud": {"endpoint": "http://127.0.0.1:9/v1", "model": "m"}}],
               "default": {"route": "on-device", "fallback": ["cloud"]}}),
    ))]);
    let (agent, base) = edgewise_tests::agent_process(&h, "agent");
    let pid = agent.id().expect("pid");
    let models = format!("{base}/models");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = reqwest::get(&models)
            .await
            .ok()
            .filter(|r| r.status() == 200);
        if let Some(r) = listed {
            let body: Value = r.json().await.expect("json");
            if body["data"].as_array().is_some_and(|d| !d.is_empty()) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: the status file's once-a-second rewrite after the last change has run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = edgewise_tests::cpu_ns(pid);
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let used = edgewise_tests::cpu_ns(pid) - before;
    assert!(
        (used as f64) < 0.01 * window.as_nanos() as f64,
        "an idle agent used {} ms of CPU in {window:?}",
        used / 1_000_000
    );
}
