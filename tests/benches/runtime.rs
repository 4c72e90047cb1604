//! The embedded runtime (candle) against llama.cpp on the same GGUF file, side by side in
//! one run (a bench binary, not timed tests):
//!
//! ```text
//! python3 -m pip install 'llama-cpp-python[server]'   # once: builds llama.cpp from source
//! cargo bench -p edgewise-tests --bench runtime
//! ```
//!
//! Both serve the model over the OpenAI API on loopback (`edgewise-agent serve-model` and
//! `python3 -m llama_cpp.server`), measured one after the other, rounds alternating, greedy:
//! time to first token on a short and an 84-word prompt, prompt processing (each server's
//! own token count), generation speed over 64 tokens. The model is made here
//! (`runtime::tiny`, 512 wide, 8 layers, F32).
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
use edgewise_tests::*;
use serde_json::{Value, json};

const ROUNDS: usize = 6;

fn main() {
    bench_main(|_| run());
}

struct Sample {
    ttft_ms: f64,
    gen_tps: f64,
}

/// One streamed completion: time to the first text, and tokens per second after it.
async fn stream(http: &reqwest::Client, base: &str, prompt: &str, max_tokens: u32) -> Sample {
    use futures_util::StreamExt;
    let started = Instant::now();
    let r = http
        .post(format!("{base}/completions"))
        .json(
            &json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{base}");
    let mut body = r.bytes_stream();
    let (mut first, mut last, mut pieces) = (None, started, 0u32);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        // Each SSE event with text is one token (both servers stream token by token).
        for line in String::from_utf8_lossy(&chunk).lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                pieces += 1;
            }
        }
    }
    let first = first.unwrap_or(last);
    Sample {
        ttft_ms: (first - started).as_secs_f64() * 1000.0,
        gen_tps: f64::from(pieces.saturating_sub(1)) / (last - first).as_secs_f64().max(1e-9),
    }
}

async fn llama_cpp(model: &std::path::Path) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new("python3")
        .args([
            "-m",
            "llama_cpp.server",
            "--host",
            "127.0.0.1",
            "--n_ctx",
            "1024",
        ])
        .args([
            "--n_threads",
            &std::thread::available_parallelism()
                .unwrap()
                .get()
                .to_string(),
        ])
        .args(["--port", &port.to_string(), "--model"])
        .arg(model)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 -m llama_cpp.server (pip install 'llama-cpp-python[server]')");
    let base = format!("http://127.0.0.1:{port}/v1");
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(120),
        "llama_cpp.server answers",
        || async { get_json(&http, &format!("{base}/models")).await.map(|_| ()) },
    )
    .await;
    (child, base)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() {
    // The models are kept under EDGEWISE_BENCH_DIR when it is set (to try them by hand).
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("EDGEWISE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    // Each server counts this prompt with its own tokenizer: llama.cpp splits these words
    // into more pieces than the file's word vocabulary does, so prompt speed is per server.
    let long_prompt =
        "the device answers the request on the network today and the cloud ".repeat(7);
    println!(
        "embedded runtime (candle) vs llama.cpp, same GGUF file, greedy, medians of {ROUNDS} rounds:"
    );
    println!("  model         server      TTFT short  TTFT long      prompt tok/s  gen tok/s");
    // F32 only: llama.cpp (llama-cpp-python 0.3 here, AVX-512/AMX build) segfaults loading
    // these tiny Q8_0 and Q4_0 files (candle serves them), so quantised kernels are not
    // compared yet.
    for dtype in [GgmlDType::F32] {
        let path = dir.join(format!("bench-{dtype:?}.gguf"));
        let model = TinyModel {
            dim: 512,
            layers: 8,
            ..TinyModel::new(5, dtype)
        };
        tiny::write(&path, model).unwrap();
        let ours = serve_model(&path, "m").await;
        let (_peer, peer_base) = llama_cpp(&path).await;
        let mut prompt_tokens = Vec::new();
        for base in [&ours.base_url, &peer_base] {
            let r: Value = http
                .post(format!("{base}/completions"))
                .json(&json!({"model": "m", "prompt": long_prompt, "max_tokens": 1}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            prompt_tokens.push(r["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0));
        }
        let mut results: Vec<(&str, Vec<Sample>, Vec<Sample>)> = vec![
            ("candle", Vec::new(), Vec::new()),
            ("llama.cpp", Vec::new(), Vec::new()),
        ];
        for base in [&ours.base_url, &peer_base] {
            stream(&http, base, "the device", 8).await; // warm
        }
        for _ in 0..ROUNDS {
            for (i, base) in [&ours.base_url, &peer_base].into_iter().enumerate() {
                let short = stream(&http, base, "the device", 64).await;
                let long = stream(&http, base, &long_prompt, 1).await;
                results[i].1.push(short);
                results[i].2.push(long);
            }
        }
        let mut gen_speed = Vec::new();
        for (i, (name, short, long)) in results.iter().enumerate() {
            let ttft = median(short.iter().map(|s| s.ttft_ms).collect());
            let ttft_long = median(long.iter().map(|s| s.ttft_ms).collect());
            let generation = median(short.iter().map(|s| s.gen_tps).collect());
            gen_speed.push(generation);
            println!(
                "  {:<12}  {name:<10} {ttft:>8.1} ms  {ttft_long:>10.1} ms  {:>12.0}  {generation:>9.0}",
                format!("{dtype:?}"),
                prompt_tokens[i] / (ttft_long / 1000.0),
            );
        }
        println!(
            "  {:<12}  generation speed, candle ÷ llama.cpp: {:.2}x",
            format!("{dtype:?}"),
            gen_speed[0] / gen_speed[1]
        );
    }
}
