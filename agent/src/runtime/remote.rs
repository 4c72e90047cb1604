//! Talking to an OpenAI-compatible server: its SSE stream read into [`Piece`]s. Shared by
//! cloud targets (the data plane) and external runtimes on the device.

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Finish, Piece, RuntimeError, Usage};

/// A request error in words, without its URL (which may carry a key in its query).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
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

/// Reads an OpenAI SSE body (`chat`: chat chunks, else completion chunks) into pieces;
/// `who` names the server in errors. Stops reading, closing the request, when the
/// receiver is dropped.
pub(crate) async fn relay(
    resp: reqwest::Response,
    chat: bool,
    who: &'static str,
    tx: mpsc::Sender<Piece>,
) {
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
                        "the stream from {who} broke: {}",
                        without_url(&e)
                    ))))
                    .await;
                return;
            }
            None => {
                let _ = tx
                    .send(Piece::Failed(RuntimeError::Generation(format!(
                        "the stream from {who} ended before [DONE]"
                    ))))
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
                            "{who} reported: {}",
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
                let text = if chat {
                    choice["delta"]["content"].as_str()
                } else {
                    choice["text"].as_str()
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
