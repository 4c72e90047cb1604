//! Real generation through the embedded runtime on tiny models written by `tiny`.

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;

use super::tiny::{self, TinyModel};
use super::*;

fn model(dir: &Path, name: &str, m: TinyModel) -> PathBuf {
    let path = dir.join(name);
    tiny::write(&path, m).expect("write tiny model");
    path
}

async fn loaded(path: &Path, version: &str) -> Arc<Loaded> {
    Runtime::new(None)
        .load("tiny", version, path, "gguf")
        .await
        .expect("loads")
}

const PROMPTS: &[&str] = &[
    "hello world",
    "the device runs the model",
    "is the cloud fast today",
    "private data stays local",
    "route the request to the edge",
    "battery and network and cost",
    "a small canary version",
    "the fleet is stable",
];

fn greedy(n: usize) -> Sampling {
    Sampling {
        max_tokens: n,
        ..Sampling::default()
    }
}

/// Greedy answers to every prompt, as token-level text.
async fn answers(l: &Arc<Loaded>) -> Vec<String> {
    let mut out = Vec::new();
    for p in PROMPTS {
        let chat = Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: (*p).into(),
        }]);
        let (text, usage, _) = l.complete(chat, greedy(12)).await.expect("generates");
        assert!(usage.prompt_tokens > 5, "{usage:?}");
        out.push(text);
    }
    out
}

/// Words the two sets of answers share before they first differ, over all prompts: errors
/// compound in greedy decoding, so the shared prefix is what a variant gets right.
fn agreement(a: &[String], b: &[String]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            x.split(' ')
                .zip(y.split(' '))
                .take_while(|(p, q)| p == q)
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_is_deterministic_and_quantized_variants_agree_with_f32() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f32 = loaded(
        &model(dir.path(), "f32.gguf", TinyModel::new(7, GgmlDType::F32)),
        "1",
    )
    .await;
    let q8 = loaded(
        &model(dir.path(), "q8.gguf", TinyModel::new(7, GgmlDType::Q8_0)),
        "1",
    )
    .await;
    let q4 = loaded(
        &model(dir.path(), "q4.gguf", TinyModel::new(7, GgmlDType::Q4_0)),
        "1",
    )
    .await;
    let bad = loaded(
        &model(
            dir.path(),
            "bad.gguf",
            TinyModel::new(7, GgmlDType::Q8_0).damaged(),
        ),
        "1",
    )
    .await;

    let reference = answers(&f32).await;
    assert_eq!(
        reference,
        answers(&f32).await,
        "greedy decoding is deterministic"
    );
    assert!(
        reference.iter().all(|a| !a.is_empty()),
        "every prompt gets an answer: {reference:?}"
    );
    let (q8a, q4a, bada) = (answers(&q8).await, answers(&q4).await, answers(&bad).await);
    let (q8n, q4n, badn) = (
        agreement(&reference, &q8a),
        agreement(&reference, &q4a),
        agreement(&reference, &bada),
    );
    let words: usize = reference.iter().map(|a| a.split(' ').count()).sum();
    eprintln!("words shared with F32 of {words}: Q8_0 {q8n}, Q4_0 {q4n}, damaged {badn}");
    assert!(
        q8n * 2 >= words,
        "Q8_0 follows F32: {q8a:?} vs {reference:?}"
    );
    assert!(
        q8n >= 3 * badn.max(1),
        "Q8_0 {q8n} vs damaged {badn}: {bada:?}"
    );
    assert!(q4n > badn, "Q4_0 {q4n} vs damaged {badn}: {q4a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_counts_limits_and_cancellation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = loaded(
        &model(dir.path(), "m.gguf", TinyModel::new(1, GgmlDType::F32)),
        "1",
    )
    .await;
    // Words of the vocabulary are one token each, after BOS.
    assert_eq!(
        l.count_tokens(&Prompt::Text("the device".into()))
            .expect("counts"),
        3
    );
    let (_, usage, finish) = l
        .complete(Prompt::Text("hello".into()), greedy(5))
        .await
        .expect("generates");
    assert!(usage.completion_tokens <= 5, "{usage:?}");
    if usage.completion_tokens == 5 {
        assert_eq!(finish, Finish::Length);
    }
    // A receiver dropped after the first piece stops the generator.
    let mut rx = l.stream(Prompt::Text("hello".into()), greedy(400));
    let first = rx.recv().await;
    assert!(
        matches!(first, Some(Piece::Text(_) | Piece::Done(..))),
        "{first:?}"
    );
    drop(rx);
    let long = "the ".repeat(2000);
    let err = l
        .complete(Prompt::Text(long), greedy(4))
        .await
        .expect_err("too long");
    assert!(
        matches!(err, RuntimeError::ContextTooLong { context: 1024, .. }),
        "{err}"
    );
    assert!(err.is_client_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_load_or_fit_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = model(dir.path(), "m.gguf", TinyModel::new(1, GgmlDType::F32));
    let bytes = std::fs::read(&good).expect("read");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let rt = Runtime::new(None);
    let err = rt
        .load("tiny", "2", &cut, "gguf")
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, RuntimeError::Load(_)), "{err}");
    assert!(rt.serving("tiny").is_none(), "nothing switched to");

    let small = Runtime::new(Some(bytes.len() as u64));
    let err = small
        .load("tiny", "1", &good, "gguf")
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("MiB are available"), "{err}");
    let err = rt
        .load("tiny", "1", &good, "onnx")
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, RuntimeError::NoRuntime(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_keeps_in_flight_requests_on_the_old_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::new(None);
    let v1 = rt
        .load(
            "tiny",
            "1",
            &model(dir.path(), "1.gguf", TinyModel::new(1, GgmlDType::F32)),
            "gguf",
        )
        .await
        .expect("v1");
    rt.switch(v1);
    let old = rt.serving("tiny").expect("serving");
    let mut rx = old.stream(Prompt::Text("hello".into()), greedy(50));
    let v2 = rt
        .load(
            "tiny",
            "2",
            &model(dir.path(), "2.gguf", TinyModel::new(2, GgmlDType::F32)),
            "gguf",
        )
        .await
        .expect("v2");
    let replaced = rt.switch(v2).expect("replaced v1");
    assert_eq!(replaced.version, "1");
    assert_eq!(rt.serving("tiny").expect("serving").version, "2");
    drop((old, replaced));
    // The request started on 1 still finishes.
    let mut done = false;
    while let Some(p) = rx.recv().await {
        if let Piece::Done(..) = p {
            done = true;
        }
    }
    assert!(done, "the in-flight request finished");
    assert_eq!(rt.status()[0].version, "2");
}
