//! Calls to a cloud target: the OpenAI-compatible endpoint a policy names, turned into
//! pieces. A streamed request is streamed upstream (so its first token can be awaited
//! against the target's timeout); a request answered whole is asked for whole, which spares
//! the upstream and the agent one event, parse and wake-up per chunk.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::openai::{Endpoint, Pieces};
use crate::runtime::remote::{pieces, without_url};
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

/// The body sent upstream: the app's, with the target's model, streamed with usage when
/// `stream`, and without the `edgewise` routing object.
pub fn upstream_body(raw: &serde_json::Map<String, Value>, model: &str, stream: bool) -> Value {
    let mut body = raw.clone();
    body.remove("edgewise");
    body.insert("model".into(), json!(model));
    body.insert("stream".into(), json!(stream));
    if stream {
        body.insert("stream_options".into(), json!({"include_usage": true}));
    } else {
        body.remove("stream_options");
    }
    Value::Object(body)
}

/// Sends the request and waits for the response head within `timeout`; a streamed body is
/// then read as the returned pieces are, a whole one (`body.stream` false) is read within
/// the same `timeout`. Dropping the pieces cancels the upstream request.
pub async fn call(
    http: &reqwest::Client,
    endpoint: &str,
    kind: Endpoint,
    body: &Value,
    key: Option<String>,
    timeout: Duration,
) -> Result<Pieces, CloudFailure> {
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
    let started = std::time::Instant::now();
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
    let chat = kind == Endpoint::Chat;
    if body.get("stream") == Some(&Value::Bool(true)) {
        return Ok(pieces(resp, chat, "the cloud").boxed());
    }
    let left = timeout.saturating_sub(started.elapsed());
    let bytes = tokio::time::timeout(left, resp.bytes())
        .await
        .map_err(|_| CloudFailure::Timeout(timeout_ms))?
        .map_err(|e| CloudFailure::Unreachable(without_url(&e)))?;
    Ok(futures_util::stream::iter(whole(&bytes, chat)).boxed())
}

/// A whole (non-streamed) answer as the pieces a stream of it would give: its text, then
/// the end with usage; a body that is not an answer is a failure.
fn whole(bytes: &[u8], chat: bool) -> Vec<Piece> {
    let failed = |why: &str| vec![Piece::Failed(RuntimeError::Generation(why.to_owned()))];
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return failed("the cloud answered with a body that is not JSON");
    };
    let choice = &v["choices"][0];
    let text = if chat {
        choice["message"]["content"].as_str()
    } else {
        choice["text"].as_str()
    };
    let Some(text) = text else {
        return failed("the cloud's answer has no choices[0] text");
    };
    let n = |k: &str| {
        v["usage"][k]
            .as_u64()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    };
    let usage = Usage {
        prompt_tokens: n("prompt_tokens").unwrap_or(0),
        completion_tokens: n("completion_tokens").unwrap_or(usize::from(!text.is_empty())),
    };
    let finish = if choice["finish_reason"].as_str() == Some("length") {
        Finish::Length
    } else {
        Finish::Stop
    };
    let mut out = Vec::with_capacity(2);
    if !text.is_empty() {
        out.push(Piece::Text(text.to_owned()));
    }
    out.push(Piece::Done(usage, finish));
    out
}
