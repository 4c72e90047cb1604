//! Calls to a cloud target: the OpenAI-compatible endpoint a policy names, always streamed
//! (so the first token can be awaited against the target's timeout), turned into pieces.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::openai::Endpoint;
use crate::runtime::{Finish, Piece, RuntimeError, Usage};

/// Why a cloud target did not answer.
#[derive(Debug)]
pub enum CloudFailure {
    /// Connection refused, reset, DNS, TLS: try the next target.
    Unreachable(String),
    /// No answer within the target's timeout.
    Timeout(u64),
    /// 5xx.
    Server(u16),
    /// 429, with `retry-after` seconds when given.
    RateLimited(Option<u64>),
    /// Another 4xx: the request's fault, passed back to the app.
    Rejected(u16, Value),
}

impl CloudFailure {
    /// For the response's `edgewise.fallbacks[].reason`.
    pub fn reason(&self) -> String {
        match self {
            CloudFailure::Unreachable(e) => format!("unreachable: {e}"),
            CloudFailure::Timeout(ms) => format!("no answer within {ms} ms"),
            CloudFailure::Server(code) => format!("HTTP {code}"),
            CloudFailure::RateLimited(Some(s)) => format!("HTTP 429, retry after {s} s"),
            CloudFailure::RateLimited(None) => "HTTP 429".into(),
            CloudFailure::Rejected(code, _) => format!("HTTP {code}"),
        }
    }
}

/// The body sent upstream: the app's, with the target's model, streaming with usage, and
/// without the `edgewise` routing object.
pub fn upstream_body(raw: &serde_json::Map<String, Value>, model: &str) -> Value {
    let mut body = raw.clone();
    body.remove("edgewise");
    body.insert("model".into(), json!(model));
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    Value::Object(body)
}

/// Sends the request and waits for the response head within `timeout`; the body then
/// streams into the returned receiver. Dropping the receiver cancels the upstream request.
pub async fn call(
    http: &reqwest::Client,
    endpoint: &str,
    kind: Endpoint,
    body: &Value,
    key: Option<String>,
    timeout: Duration,
) -> Result<mpsc::Receiver<Piece>, CloudFailure> {
    let path = match kind {
        Endpoint::Chat => "chat/completions",
        Endpoint::Completions => "completions",
    };
    let url = format!("{}/{path}", endpoint.trim_end_matches('/'));
    let mut req = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let resp = tokio::time::timeout(timeout, req.send())
        .await
        .map_err(|_| CloudFailure::Timeout(timeout_ms))?
        .map_err(|e| CloudFailure::Unreachable(without_url(&e)))?;
    let status = resp.status().as_u16();
    if status == 429 {
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(CloudFailure::RateLimited(after));
    }
    if status >= 500 {
        return Err(CloudFailure::Server(status));
    }
    if status >= 400 {
        let body = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        return Err(CloudFailure::Rejected(status, body));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(relay(resp, kind, tx));
    Ok(rx)
}

fn without_url(e: &reqwest::Error) -> String {
    // The URL may carry a key in its query; leave it out of messages.
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    s
}

/// Reads the SSE body into pieces.
async fn relay(resp: reqwest::Response, kind: Endpoint, tx: mpsc::Sender<Piece>) {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut usage = None;
    let mut finish = Finish::Stop;
    let mut chunks = 0usize;
    loop {
        let next = tokio::select! {
            n = body.next() => n,
            // The app went away: stop reading, which closes the upstream request.
            () = tx.closed() => return,
        };
        let bytes = match next {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                let _ = tx
                    .send(Piece::Failed(RuntimeError::Generation(format!(
                        "the cloud stream broke: {}",
                        without_url(&e)
                    ))))
                    .await;
                return;
            }
            None => {
                let _ = tx
                    .send(Piece::Failed(RuntimeError::Generation(
                        "the cloud stream ended before [DONE]".into(),
                    )))
                    .await;
                return;
            }
        };
        buf.extend_from_slice(&bytes);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    let usage = usage.unwrap_or(Usage {
                        prompt_tokens: 0,
                        completion_tokens: chunks,
                    });
                    let _ = tx.send(Piece::Done(usage, finish)).await;
                    return;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(err) = v.get("error") {
                    let _ = tx
                        .send(Piece::Failed(RuntimeError::Generation(format!(
                            "the cloud reported: {}",
                            err.get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("an error")
                        ))))
                        .await;
                    return;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                    usage = Some(Usage {
                        prompt_tokens: n("prompt_tokens"),
                        completion_tokens: n("completion_tokens"),
                    });
                }
                let choice = &v["choices"][0];
                if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
                    finish = Finish::Length;
                }
                let text = match kind {
                    Endpoint::Chat => choice["delta"]["content"].as_str(),
                    Endpoint::Completions => choice["text"].as_str(),
                };
                if let Some(t) = text.filter(|t| !t.is_empty()) {
                    chunks += 1;
                    if tx.send(Piece::Text(t.to_owned())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
