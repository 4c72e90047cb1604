//! Talking to an OpenAI-compatible server: its SSE stream read into [`Piece`]s. Shared by
//! cloud targets (the data plane) and external runtimes on the device.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Finish, Piece, RuntimeError, Usage};

/// How long the end of a body is awaited after `[DONE]`, in the background, to keep its
/// connection for the next request.
const DRAIN: Duration = Duration::from_secs(1);

/// A request error in words, without its URL (which may carry a key in its query).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let head = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    with_sources(head, std::error::Error::source(e))
}

/// `head`, then each cause in the chain from `src`.
pub(crate) fn with_sources(
    head: &str,
    mut src: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    let mut s = head.to_owned();
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    s
}

/// A response body as it arrives; errors already in words.
pub(crate) type Body = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A reqwest response's body as a [`Body`].
pub(crate) fn body_of(resp: reqwest::Response) -> Body {
    Box::pin(resp.bytes_stream().map(|r| r.map_err(|e| without_url(&e))))
}

/// The SSE reader's state between pieces.
struct Reader {
    body: Option<Body>,
    chat: bool,
    who: &'static str,
    buf: Vec<u8>,
    ready: VecDeque<Piece>,
    usage: Option<Usage>,
    finish: Finish,
    chunks: usize,
}

/// Reads an OpenAI SSE body (`chat`: chat chunks, else completion chunks) as pieces, in
/// the task that polls them (no task or channel between the socket and the app); `who`
/// names the server in errors. Dropping the stream closes the request.
pub(crate) fn pieces(
    body: Body,
    chat: bool,
    who: &'static str,
) -> impl Stream<Item = Piece> + Send + 'static {
    let reader = Reader {
        body: Some(body),
        chat,
        who,
        buf: Vec::new(),
        ready: VecDeque::new(),
        usage: None,
        finish: Finish::Stop,
        chunks: 0,
    };
    futures_util::stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(p) = r.ready.pop_front() {
                return Some((p, r));
            }
            let body = r.body.as_mut()?;
            let failed = |why: String| Piece::Failed(RuntimeError::Generation(why));
            match body.next().await {
                Some(Ok(bytes)) => r.read(&bytes),
                Some(Err(e)) => {
                    let why = format!("the stream from {} broke: {e}", r.who);
                    r.body = None;
                    r.ready.push_back(failed(why));
                }
                None => {
                    let why = format!("the stream from {} ended before [DONE]", r.who);
                    r.body = None;
                    r.ready.push_back(failed(why));
                }
            }
        }
    })
}

impl Reader {
    /// Takes in `bytes`; whole events become pieces. Reading ends at `[DONE]` or an error.
    fn read(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if let Some(last) = self.event(data) {
                    self.ready.push_back(last);
                    if let Some(body) = self.body.take() {
                        keep_connection(body);
                    }
                    return;
                }
            }
        }
    }

    /// One event's data; `Some` when it ends the answer.
    fn event(&mut self, data: &str) -> Option<Piece> {
        if data == "[DONE]" {
            let usage = self.usage.unwrap_or(Usage {
                prompt_tokens: 0,
                completion_tokens: self.chunks,
            });
            return Some(Piece::Done(usage, self.finish));
        }
        let v: Value = serde_json::from_str(data).ok()?;
        if let Some(err) = v.get("error") {
            let message = err.get("message").and_then(Value::as_str);
            return Some(Piece::Failed(RuntimeError::Generation(format!(
                "{} reported: {}",
                self.who,
                message.unwrap_or("an error")
            ))));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            });
        }
        let choice = &v["choices"][0];
        if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
            self.finish = Finish::Length;
        }
        let text = if self.chat {
            choice["delta"]["content"].as_str()
        } else {
            choice["text"].as_str()
        };
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            self.chunks += 1;
            self.ready.push_back(Piece::Text(t.to_owned()));
        }
        None
    }
}

/// Reads a body past `[DONE]` to its end, so its connection goes back to the pool (a body
/// dropped unread closes it, and the next request pays for a new one). Usually the end is
/// already here; otherwise it is awaited in the background, bounded.
fn keep_connection(mut body: Body) {
    loop {
        match body.next().now_or_never() {
            Some(Some(Ok(_))) => {}
            Some(_) => return,
            None => break,
        }
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN, async {
            while let Some(Ok(_)) = body.next().await {}
        })
        .await;
    });
}

/// [`pieces`] into `tx`, for runtimes that hand out a channel; stops (closing the request)
/// when the receiver is dropped.
pub(crate) async fn relay(
    resp: reqwest::Response,
    chat: bool,
    who: &'static str,
    tx: mpsc::Sender<Piece>,
) {
    let mut pieces = std::pin::pin!(pieces(body_of(resp), chat, who));
    loop {
        let next = tokio::select! {
            p = pieces.next() => p,
            () = tx.closed() => return,
        };
        let Some(piece) = next else { return };
        if tx.send(piece).await.is_err() {
            return;
        }
    }
}
