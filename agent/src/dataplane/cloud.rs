//! Calls to a cloud target: the OpenAI-compatible endpoint a policy names, turned into
//! pieces. A streamed request is streamed upstream (so its first token can be awaited
//! against the target's timeout); a request answered whole is asked for whole, which spares
//! the upstream and the agent one event, parse and wake-up per chunk.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, Full};
use serde_json::{Value, json};

use super::http::CloudHttp;
use crate::openai::{Endpoint, Pieces};
use crate::runtime::remote::{pieces, with_sources};
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
/// `stream`, and without the `edgewise` routing object. Written straight from the app's
/// request, not from a copy of it.
pub fn upstream_body(raw: &serde_json::Map<String, Value>, model: &str, stream: bool) -> Vec<u8> {
    let body = UpstreamBody { raw, model, stream };
    // A map of JSON values with string keys always serialises.
    serde_json::to_vec(&body).unwrap_or_default()
}

struct UpstreamBody<'a> {
    raw: &'a serde_json::Map<String, Value>,
    model: &'a str,
    stream: bool,
}

impl serde::Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.raw {
            if !matches!(
                k.as_str(),
                "edgewise" | "model" | "stream" | "stream_options"
            ) {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("model", self.model)?;
        m.serialize_entry("stream", &self.stream)?;
        if self.stream {
            m.serialize_entry("stream_options", &json!({"include_usage": true}))?;
        }
        m.end()
    }
}

/// Sends `body` and waits for the response head within `timeout`; a streamed body
/// (`stream`) is then read as the returned pieces are, a whole one within the same
/// `timeout`. Dropping the pieces cancels the upstream request.
pub async fn call(
    http: &CloudHttp,
    endpoint: &str,
    kind: Endpoint,
    body: Vec<u8>,
    stream: bool,
    key: Option<&str>,
    timeout: Duration,
) -> Result<Pieces, CloudFailure> {
    let path = match kind {
        Endpoint::Chat => "chat/completions",
        Endpoint::Completions => "completions",
    };
    let uri: http::Uri = format!("{}/{path}", endpoint.trim_end_matches('/'))
        .parse()
        .map_err(|_| CloudFailure::Unreachable("the endpoint is not a valid URL".into()))?;
    let mut req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CloudFailure::Unreachable(e.to_string()))?;
    if let Some(auth) = key.and_then(super::http::bearer) {
        req.headers_mut().insert(http::header::AUTHORIZATION, auth);
    }
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(timeout, http.send(req))
        .await
        .map_err(|_| CloudFailure::Timeout(timeout_ms))?
        .map_err(|e| CloudFailure::Unreachable(failed(&e)))?;
    let status = resp.status().as_u16();
    if status == 429 {
        let after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(CloudFailure::RateLimited(after));
    }
    if status >= 500 {
        return Err(CloudFailure::Server(status));
    }
    let chat = kind == Endpoint::Chat;
    let left = timeout.saturating_sub(started.elapsed());
    if (200..400).contains(&status) && stream {
        let body = BodyDataStream::new(resp.into_body())
            .map(|r| r.map_err(|e| with_sources("the body broke", Some(&e))));
        return Ok(pieces(Box::pin(body), chat, "the cloud").boxed());
    }
    let bytes = tokio::time::timeout(left, resp.into_body().collect())
        .await
        .map_err(|_| CloudFailure::Timeout(timeout_ms))?
        .map_err(|e| CloudFailure::Unreachable(with_sources("the body broke", Some(&e))))?
        .to_bytes();
    if status >= 400 {
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Err(CloudFailure::Rejected(status, body));
    }
    Ok(futures_util::stream::iter(whole(&bytes, chat)).boxed())
}

/// A failed request in words: connection failures say so; the URL is never included.
fn failed(e: &hyper_util::client::legacy::Error) -> String {
    let head = if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    with_sources(head, std::error::Error::source(e))
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
