//! Calls to a cloud target: the OpenAI-compatible endpoint a policy names, always streamed
//! (so the first token can be awaited against the target's timeout), turned into pieces.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::openai::{Endpoint, Pieces};
use crate::runtime::remote::{pieces, without_url};

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

/// Sends the request and waits for the response head within `timeout`; the body is then
/// read as the returned pieces are. Dropping them cancels the upstream request.
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
    Ok(pieces(resp, kind == Endpoint::Chat, "the cloud").boxed())
}
