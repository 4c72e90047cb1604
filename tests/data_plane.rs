//! The on-device runtime and the OpenAI-compatible API, driven by the official `openai`
//! Python SDK over loopback, on tiny GGUF models the tests write.

use edgewise_tests::{openai_sdk, serve_model, tiny_model};

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
