//! Data-plane benchmarks (a bench binary, not timed tests):
//!
//! ```text
//! cargo bench -p edgewise-tests --bench data_plane
//! ```
//!
//! The same tiny GGUF model answers three ways, side by side in one run: straight from
//! `edgewise-agent serve-model` (the runtime alone behind the OpenAI API), through the
//! agent's data plane to its on-device runtime, and through the data plane to a cloud
//! target (that same serve-model). The agent runs as its own process (`edgewise-agent run`),
//! so its memory is measured apart. Reported: p50/p99 added latency at one stream
//! (requests interleaved, so drift hits both sides alike), throughput at 64 concurrent
//! streams, and the agent's RSS idle and under load with the model's memory apart.
//! Results go to stdout; `docs/benchmarks.md` records them.
//!
//! `-- litellm` puts the agent beside LiteLLM's proxy (PyPI `litellm[proxy]`, found as
//! `litellm` on PATH or at `$EDGEWISE_LITELLM`; `scripts/bench` installs it) in front of the
//! same upstream server, the same requests, the same concurrency.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgewise_operator::gateway::Change;
use edgewise_tests::*;
use serde_json::{Value, json};

const SAMPLES: usize = 400;
const STREAMS: usize = 64;
const LOAD_SECS: u64 = 8;

fn main() {
    bench_main(|args| async move {
        match args.first().map(String::as_str) {
            Some("litellm") => litellm().await,
            _ => run().await,
        }
    });
}

/// CPU microseconds per request that `pids` spend on `SAMPLES` requests of `body`, one
/// at a time: the work per request, apart from the wake-ups a latency figure includes.
async fn cpu_per_request(
    pids: &[u32],
    http: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Vec<f64> {
    let before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
    for _ in 0..SAMPLES {
        once(http, base, body).await;
    }
    pids.iter()
        .zip(before)
        .map(|(p, b)| (cpu_ns(*p) - b) as f64 / SAMPLES as f64 / 1000.0)
        .collect()
}

fn body(task: &str) -> Value {
    json!({"model": "assistant", "max_tokens": 1,
        "messages": [{"role": "user", "content": "is the device fast"}],
        "edgewise": {"task": task}})
}

async fn once(http: &reqwest::Client, base: &str, body: &Value) -> Duration {
    let started = Instant::now();
    let r = http
        .post(format!("{base}/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    started.elapsed()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

/// Requests per second of `STREAMS` concurrent streams for `LOAD_SECS`.
async fn throughput(http: &reqwest::Client, base: &str, body: &Value) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let (http, base, body) = (http.clone(), base.to_owned(), body.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                once(&http, &base, &body).await;
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total as f64 / LOAD_SECS as f64
}

async fn run() {
    // The runtime alone (`direct`): the same file behind the same API, no routing.
    let (h, direct) = stack(
        json!([{"name": "cloud", "match": [{"attribute": "task", "eq": "cloud"}], "route": "cloud", "fallback": ["on-device"]}]),
        json!({"route": "on-device", "fallback": ["cloud"]}),
    )
    .await;
    let (mut agent, base) = agent_process(&h, "agent");
    let pid = agent.id().unwrap();
    let dir = h.dir.path().join("agent");
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    data_plane_serves(&http, &base, "1.0.0").await;
    let status: Value = serde_json::from_str(&stdout_of(
        std::process::Command::new(workspace_binary("edgewise-agent"))
            .args(["status", "-o", "json", "--data-dir"])
            .arg(dir.join("data")),
    ))
    .unwrap();
    let model_kib = status["status"]["serving"][0]["memory_bytes"]
        .as_u64()
        .unwrap_or(0)
        / 1024;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = proc_status_kib(pid, "VmRSS:");

    // Warm every path, then interleave.
    let (device, cloud) = (body("device"), body("cloud"));
    for _ in 0..20 {
        once(&http, &direct.base_url, &device).await;
        once(&http, &base, &device).await;
        once(&http, &base, &cloud).await;
    }
    // What the agent asks of a cloud: the same request, streamed (see dataplane/cloud.rs).
    let mut streamed = device.clone();
    streamed["stream"] = json!(true);
    // The least a second hop can cost here: serve-model behind a TCP relay that parses
    // nothing (the bound for any proxy on this machine, the agent's cloud leg included).
    let relay = proxy::Proxy::start(
        direct
            .base_url
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .parse()
            .unwrap(),
        proxy::Behaviour::default(),
    )
    .await;
    let relayed = format!("http://{}/v1", relay.addr);
    for _ in 0..20 {
        once(&http, &relayed, &device).await;
    }
    let (mut d, mut s, mut r, mut a, mut c) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        d.push(once(&http, &direct.base_url, &device).await);
        s.push(once(&http, &direct.base_url, &streamed).await);
        r.push(once(&http, &relayed, &device).await);
        a.push(once(&http, &base, &device).await);
        c.push(once(&http, &base, &cloud).await);
    }
    for v in [&mut d, &mut s, &mut r, &mut a, &mut c] {
        v.sort();
    }
    println!("data plane, one stream, {SAMPLES} requests each (max_tokens 1), ms:");
    println!("  path                          p50      p99   added p50  added p99");
    println!(
        "  serve-model (runtime alone) {:>7.3}  {:>7.3}",
        pct(&d, 0.5),
        pct(&d, 0.99)
    );
    for (name, v) in [
        ("serve-model, streamed", &s),
        ("serve-model via a TCP relay", &r),
        ("agent → on-device runtime", &a),
        ("agent → cloud (serve-model)", &c),
    ] {
        println!(
            "  {name:<28}{:>7.3}  {:>7.3}  {:>+9.3}  {:>+9.3}",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.5) - pct(&d, 0.5),
            pct(v, 0.99) - pct(&d, 0.99)
        );
    }

    let server = direct.child.id().unwrap();
    let direct_cpu = cpu_per_request(&[server], &http, &direct.base_url, &device).await;
    let device_cpu = cpu_per_request(&[pid, server], &http, &base, &device).await;
    let cloud_cpu = cpu_per_request(&[pid, server], &http, &base, &cloud).await;
    println!(
        "CPU per request, µs: serve-model alone {:.0}; agent → on-device: agent {:.0} (serve-model idle {:.0}); agent → cloud: agent {:.0}, serve-model {:.0}",
        direct_cpu[0], device_cpu[0], device_cpu[1], cloud_cpu[0], cloud_cpu[1]
    );

    let direct_rps = throughput(&http, &direct.base_url, &device).await;
    let rss_before = proc_status_kib(pid, "VmRSS:");
    let load = {
        let (http, base, device) = (http.clone(), base.clone(), device.clone());
        tokio::spawn(async move { throughput(&http, &base, &device).await })
    };
    tokio::time::sleep(Duration::from_secs(LOAD_SECS / 2)).await;
    let busy_kib = proc_status_kib(pid, "VmRSS:").max(rss_before);
    let agent_rps = load.await.unwrap();
    let cloud_rps = throughput(&http, &base, &cloud).await;
    // Measured again last, so an order effect shows as two different direct figures.
    let direct_after = throughput(&http, &direct.base_url, &device).await;
    let direct_mean = (direct_rps + direct_after) / 2.0;
    println!("{STREAMS} concurrent streams, {LOAD_SECS} s each, requests/s:");
    println!(
        "  serve-model {direct_rps:.0} (first) and {direct_after:.0} (last), agent → on-device {agent_rps:.0} ({:.3}x their mean), agent → cloud {cloud_rps:.0} ({:.3}x)",
        agent_rps / direct_mean,
        cloud_rps / direct_mean
    );
    println!(
        "agent RSS: idle {} KiB, under {STREAMS} streams {} KiB; of which the loaded model ≈ {model_kib} KiB",
        idle_kib, busy_kib
    );

    switch(&h, &http, &base).await;
    agent.kill().await.unwrap();
}

/// A version switch and a rollback under 16 concurrent streams: from the rollout change to
/// the first answer of the new version, and every failed request in the meantime.
async fn switch(h: &Harness, http: &reqwest::Client, base: &str) {
    const SWITCH_STREAMS: usize = 16;
    h.publish_tiny("assistant", "2.0.0", 2).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, bool, String)>();
    let mut body = body("device");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(4);
    for _ in 0..SWITCH_STREAMS {
        let (http, base, body, stop, tx) = (
            http.clone(),
            base.to_owned(),
            body.clone(),
            stop.clone(),
            tx.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = http
                    .post(format!("{base}/chat/completions"))
                    .json(&body)
                    .send()
                    .await;
                let (ok, version) = match r {
                    Ok(r) => {
                        let version = r
                            .headers()
                            .get("x-edgewise-model-version")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let ok = r.status() == 200
                            && r.text()
                                .await
                                .is_ok_and(|t| t.ends_with("data: [DONE]\n\n"));
                        (ok, version)
                    }
                    Err(_) => (false, String::new()),
                };
                let _ = tx.send((Instant::now(), ok, version));
            }
        });
    }
    drop(tx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    h.apply([Change::ApplyRollout(
        rollout("assistant")
            .named("assistant")
            .stable("2.0.0")
            .build(),
    )]);
    let (to_new, f1, n1) = first_answer_of("2.0.0", started, &mut rx).await;
    let started = Instant::now();
    h.apply([Change::ApplyRollout(
        rollout("assistant")
            .named("assistant")
            .stable("1.0.0")
            .build(),
    )]);
    let (back, f2, n2) = first_answer_of("1.0.0", started, &mut rx).await;
    stop.cancel();
    println!(
        "version switch under {SWITCH_STREAMS} streams: rollout change → first answer of 2.0.0 {:?} (push, download, verify, load, warm-up); rollback to the kept 1.0.0 {:?}; failed requests {} of {}",
        to_new.map(|d| d.as_millis()),
        back.map(|d| d.as_millis()),
        f1 + f2,
        n1 + n2
    );
}

/// Reads request results until one second after the first answer of version `to`: how
/// long that took from `started`, and the failed and total requests seen.
async fn first_answer_of(
    to: &str,
    started: Instant,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, bool, String)>,
) -> (Option<Duration>, usize, usize) {
    let (mut first, mut failed, mut total) = (None, 0, 0);
    let deadline = tokio::time::Instant::from_std(started + Duration::from_secs(60));
    while let Ok(Some((at, ok, version))) = tokio::time::timeout_at(deadline, rx.recv()).await {
        total += 1;
        failed += usize::from(!ok);
        if version == to && at > started {
            let since = *first.get_or_insert(at - started);
            if at - started > since + Duration::from_secs(1) {
                break;
            }
        }
    }
    (first, failed, total)
}

/// The harness with model `assistant` 1.0.0 rolled out, serve-model answering from the same
/// file, and a policy of `rules` and `default` over two targets: `on-device`, and `cloud`
/// (that serve-model).
async fn stack(rules: Value, default: Value) -> (Harness, ServedModel) {
    let h = Harness::start().await;
    let file = h.publish_tiny("assistant", "1.0.0", 1).await;
    let served = serve_model(&file, "assistant").await;
    h.apply([
        Change::ApplyRollout(
            rollout("assistant")
                .named("assistant")
                .stable("1.0.0")
                .build(),
        ),
        Change::ApplyPolicy(routing_policy(
            "p",
            json!({
                "targets": [
                    {"name": "on-device", "device": {"model": "assistant"}},
                    {"name": "cloud", "cloud": {"endpoint": served.base_url, "model": "assistant"}}
                ],
                "rules": rules,
                "default": default
            }),
        )),
    ]);
    (h, served)
}

/// The agent's data plane and LiteLLM's proxy, each in front of the same upstream
/// (serve-model), measured interleaved at one stream and then at `STREAMS` streams.
async fn litellm() {
    // Every request goes to the cloud target: the agent is a proxy here, as LiteLLM is.
    let (h, upstream) = stack(
        json!([]),
        json!({"route": "cloud", "fallback": ["on-device"]}),
    )
    .await;
    let (mut agent, base) = agent_process(&h, "agent");
    let agent_pid = agent.id().unwrap();
    let (mut proxy, litellm_base) =
        spawn_litellm(&h.dir.path().join("litellm"), &upstream.base_url).await;
    let proxy_pid = proxy.id().unwrap();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        // LiteLLM wants its master key; the agent and serve-model ignore the header.
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {LITELLM_KEY}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    data_plane_serves(&http, &base, "1.0.0").await;
    // No `edgewise` object: LiteLLM would pass it upstream as an unknown parameter.
    let mut request = body("cloud");
    request.as_object_mut().unwrap().remove("edgewise");
    for _ in 0..50 {
        once(&http, &upstream.base_url, &request).await;
        once(&http, &base, &request).await;
        once(&http, &litellm_base, &request).await;
    }
    // In alternating blocks, not request by request: LiteLLM keeps working after it has
    // answered (logging, spend tracking), which would slow whichever request came next.
    const BLOCK: usize = 25;
    let (mut d, mut a, mut l) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SAMPLES / BLOCK {
        for (samples, at) in [
            (&mut d, &upstream.base_url),
            (&mut a, &base),
            (&mut l, &litellm_base),
        ] {
            for _ in 0..BLOCK {
                samples.push(once(&http, at, &request).await);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for v in [&mut d, &mut a, &mut l] {
        v.sort();
    }
    let added = |v: &[Duration], p: f64| pct(v, p) - pct(&d, p);
    println!(
        "proxy in front of serve-model, one stream, {SAMPLES} requests each (max_tokens 1), ms:"
    );
    println!(
        "  serve-model alone p50 {:.3} p99 {:.3}",
        pct(&d, 0.5),
        pct(&d, 0.99)
    );
    println!(
        "  added: agent p50 {:.3} ms p99 {:.3} ms; litellm p50 {:.3} ms p99 {:.3} ms",
        added(&a, 0.5),
        added(&a, 0.99),
        added(&l, 0.5),
        added(&l, 0.99)
    );
    let upstream_pid = upstream.child.id().unwrap();
    let agent_cpu = cpu_per_request(&[agent_pid, upstream_pid], &http, &base, &request).await;
    let proxy_cpu =
        cpu_per_request(&[proxy_pid, upstream_pid], &http, &litellm_base, &request).await;
    println!(
        "  CPU per request, µs: agent {:.0} (upstream {:.0}); litellm {:.0} (upstream {:.0})",
        agent_cpu[0], agent_cpu[1], proxy_cpu[0], proxy_cpu[1]
    );
    let direct_rps = throughput(&http, &upstream.base_url, &request).await;
    let agent_rps = throughput(&http, &base, &request).await;
    let litellm_rps = throughput(&http, &litellm_base, &request).await;
    let direct_after = throughput(&http, &upstream.base_url, &request).await;
    println!(
        "  {STREAMS} streams, requests/s: serve-model {direct_rps:.0} (first) {direct_after:.0} (last); agent {agent_rps:.0}; litellm {litellm_rps:.0}"
    );
    proxy.kill().await.unwrap();
    agent.kill().await.unwrap();
}

const LITELLM_KEY: &str = "sk-edgewise-bench-not-a-secret";

/// LiteLLM's proxy with one model, `assistant`, at `upstream` (an OpenAI-compatible base
/// URL); waits until it answers its liveness probe.
async fn spawn_litellm(dir: &std::path::Path, upstream: &str) -> (tokio::process::Child, String) {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: assistant\n    litellm_params:\n      model: openai/assistant\n      api_base: {upstream}\n      api_key: none\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let program = std::env::var("EDGEWISE_LITELLM").unwrap_or_else(|_| "litellm".into());
    let log = std::fs::File::create(dir.join("litellm.log")).unwrap();
    let child = tokio::process::Command::new(&program)
        .args(["--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LITELLM_MASTER_KEY", LITELLM_KEY)
        // Its price table from the package, not from GitHub (nothing but registries here).
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {program} ({e}): pip install 'litellm[proxy]', or run scripts/bench proxy")
        });
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let live = reqwest::get(format!("{base}/health/liveliness")).await;
        if live.is_ok_and(|r| r.status().is_success()) {
            return (child, format!("{base}/v1"));
        }
        assert!(
            Instant::now() < deadline,
            "LiteLLM did not start in 180 s; see {}",
            dir.join("litellm.log").display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
