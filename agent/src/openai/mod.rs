//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions`
//! (SSE streaming and not) and `GET /v1/models`, over whatever [`Backend`] answers: one
//! model file (`serve-model`) or the policy-executing data plane.

pub mod serve_model;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

use tracing::Instrument;

use crate::runtime::{Finish, Piece, RuntimeError, Usage};
pub use wire::{ApiError, Endpoint, Request};

/// Largest request body accepted (OpenAI-style 413 beyond).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Pieces of an answer as they come.
pub type Pieces = Pin<Box<dyn Stream<Item = Piece> + Send>>;

/// A request being answered.
pub struct Answer {
    /// The model name the response reports.
    pub model: String,
    /// The answer's pieces, ending with `Done` or `Failed`.
    pub pieces: Pieces,
    /// What the data plane did (target, rule, fallback…): the `edgewise` response object.
    pub edgewise: Option<Value>,
    /// Extra response headers (`x-edgewise-*`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Called with the outcome once the answer has ended (measurement); what it returns
    /// is merged into the final `edgewise` object (cost, say).
    pub on_end: Option<OnEnd>,
    /// Progressive refinement: a second answer that follows this one (docs/protocol.md).
    pub refine: Option<Refinement>,
}

/// Measures an answer at its end; returns fields for the final `edgewise` object.
pub type OnEnd = Box<dyn FnOnce(Outcome) -> Option<Value> + Send>;

/// The refining phase of an answer: resolves once its target has begun answering, or to
/// why it could not.
pub type Refinement = Pin<Box<dyn Future<Output = Result<Phase, String>> + Send>>;

/// One phase of an answer after the first.
pub struct Phase {
    /// Its pieces, ending with `Done` or `Failed`.
    pub pieces: Pieces,
    /// What served it (target, model version…), for `edgewise.refine`.
    pub edgewise: Value,
    /// Measures it at its end, like [`Answer::on_end`].
    pub on_end: Option<OnEnd>,
}

/// How an answer ended, for whoever measures it.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The whole text answered.
    pub text: String,
    /// Tokens in and out.
    pub usage: Usage,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Who answers.
pub trait Backend: Send + Sync + 'static {
    /// `GET /v1/models`: model objects (`id`, `owned_by` and any extra fields).
    fn models(&self) -> Vec<Value>;
    /// Starts answering; errors before the first piece are the request's status.
    fn answer(
        &self,
        request: Request,
        headers: &HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, ApiError>> + Send + '_>>;
}

/// The API's routes over `backend`.
pub fn router(backend: Arc<dyn Backend>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|s, h, r| complete(Endpoint::Chat, s, h, r)),
        )
        .route(
            "/v1/completions",
            post(|s, h, r| complete(Endpoint::Completions, s, h, r)),
        )
        .route("/v1/models", get(models))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: "Unknown request URL".into(),
                param: None,
                code: Some("unknown_url"),
            }
        })
        .with_state(backend)
}

async fn models(State(backend): State<Arc<dyn Backend>>) -> Response {
    let created = jiff::Timestamp::now().as_second();
    let data: Vec<Value> = backend
        .models()
        .into_iter()
        .map(|mut m| {
            m["object"] = json!("model");
            m["created"] = json!(created);
            m
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn complete(
    endpoint: Endpoint,
    State(backend): State<Arc<dyn Backend>>,
    headers: HeaderMap,
    req: HttpRequest,
) -> Response {
    let bytes = match axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            let mut response = ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "invalid_request_error",
                message: format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                param: None,
                code: Some("request_too_large"),
            }
            .into_response();
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a pooling client reuses it and loses its next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let request = match wire::parse(endpoint, &bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (stream, include_usage) = (request.stream, request.include_usage);
    let mut answer = match backend.answer(request, &headers).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let extra = std::mem::take(&mut answer.headers);
    let meta = wire::Meta::new(endpoint, &answer.model);
    let mut response = if stream {
        sse(endpoint, meta, answer, include_usage)
    } else {
        whole(endpoint, meta, answer).await
    };
    response.headers_mut().extend(extra);
    response
}

/// How one phase of an answer ended.
struct Ended {
    text: String,
    usage: Usage,
    end: Result<Finish, RuntimeError>,
    /// The phase's `edgewise` fields with what its measurement added.
    edgewise: Value,
}

/// Calls `on_end` with how a phase went; returns the fields it adds.
fn measure(
    on_end: Option<OnEnd>,
    text: &str,
    usage: Usage,
    error: Option<String>,
) -> Option<Value> {
    on_end.and_then(|f| {
        f(Outcome {
            text: text.to_owned(),
            usage,
            error,
        })
    })
}

/// Reads a phase to its end.
async fn collect(mut pieces: Pieces, edgewise: Value, on_end: Option<OnEnd>) -> Ended {
    let mut text = String::new();
    let mut end = Err(RuntimeError::Generation("the answer ended early".into()));
    let mut usage = Usage::default();
    while let Some(p) = pieces.next().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(u, f) => {
                (usage, end) = (u, Ok(f));
                break;
            }
            Piece::Failed(e) => {
                end = Err(e);
                break;
            }
        }
    }
    let error = end.as_ref().err().map(ToString::to_string);
    let patch = measure(on_end, &text, usage, error);
    Ended {
        text,
        usage,
        end,
        edgewise: merged(edgewise, patch),
    }
}

/// Collects the whole answer into one response object; a refined answer is the refining
/// phase's, with the first one under `edgewise.draft`.
async fn whole(endpoint: Endpoint, meta: wire::Meta, answer: Answer) -> Response {
    match body_of(endpoint, &meta, answer).await {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Answers `request` without HTTP, as a non-streaming call to the API would: the same
/// backend, measurement and response object (the simulated fleet's traffic goes this way).
///
/// # Errors
/// The API error the HTTP call would have answered.
pub async fn respond(
    backend: &dyn Backend,
    request: Request,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let endpoint = request.endpoint;
    let answer = backend.answer(request, headers).await?;
    let meta = wire::Meta::new(endpoint, &answer.model);
    body_of(endpoint, &meta, answer).await
}

async fn body_of(endpoint: Endpoint, meta: &wire::Meta, answer: Answer) -> Result<Value, ApiError> {
    let draft = collect(
        answer.pieces,
        answer.edgewise.unwrap_or_else(|| json!({})),
        answer.on_end,
    )
    .await;
    let finish = match draft.end {
        Ok(f) => f,
        Err(e) => return Err(generation_error(&e)),
    };
    let (text, usage, finish, edgewise) = match answer.refine {
        None => (draft.text, draft.usage, finish, draft.edgewise),
        Some(refine) => {
            let mut edgewise = draft.edgewise;
            match refine.await {
                Err(why) => {
                    edgewise["refined"] = json!(false);
                    edgewise["refineError"] = json!(why);
                    (draft.text, draft.usage, finish, edgewise)
                }
                Ok(phase) => {
                    let refined = collect(phase.pieces, phase.edgewise, phase.on_end).await;
                    match refined.end {
                        Err(e) => {
                            edgewise["refined"] = json!(false);
                            edgewise["refineError"] = json!(e.to_string());
                            (draft.text, draft.usage, finish, edgewise)
                        }
                        Ok(refined_finish) => {
                            edgewise["refined"] = json!(true);
                            edgewise["refine"] = refined.edgewise;
                            edgewise["draft"] = json!({
                                "text": draft.text,
                                "finishReason": finish.as_str(),
                                "usage": wire::usage_json(draft.usage),
                            });
                            (
                                refined.text,
                                sum(draft.usage, refined.usage),
                                refined_finish,
                                edgewise,
                            )
                        }
                    }
                }
            }
        }
    };
    let mut body = wire::completion(endpoint, meta, &text, usage, finish);
    if edgewise.as_object().is_some_and(|o| !o.is_empty()) {
        body["edgewise"] = edgewise;
    }
    Ok(body)
}

/// Usage of a response with two phases: both models read the prompt and wrote an answer.
fn sum(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens + b.prompt_tokens,
        completion_tokens: a.completion_tokens + b.completion_tokens,
    }
}

/// The error object of an answer that failed before its first piece was sent.
fn generation_error(e: &RuntimeError) -> ApiError {
    if e.is_client_error() {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: e.to_string(),
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        }
    } else {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "server_error",
            message: e.to_string(),
            param: None,
            code: Some("generation_failed"),
        }
    }
}

/// `base` with the fields of `patch` set.
fn merged(base: Value, patch: Option<Value>) -> Value {
    match (base, patch) {
        (Value::Object(mut b), Some(Value::Object(p))) => {
            b.extend(p);
            Value::Object(b)
        }
        (b, _) => b,
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn error_event(message: &str) -> Bytes {
    event(
        &json!({"error": {"message": message, "type": "server_error", "param": null, "code": "generation_failed"}}),
    )
}

/// Streams the answer as server-sent events, ending with `data: [DONE]`. A failure after
/// the first token ends the stream with an error event. A refining phase follows the first
/// as choice 1, each of its chunks marked `edgewise.phase = "refine"` (docs/protocol.md).
/// A client that goes away stops generation (upstream requests included) and is measured.
fn sse(endpoint: Endpoint, meta: wire::Meta, answer: Answer, include_usage: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(
        async move {
            let edgewise = answer.edgewise.unwrap_or_else(|| json!({}));
            let Some(draft) = stream_phase(
                &tx,
                endpoint,
                &meta,
                0,
                answer.pieces,
                edgewise,
                answer.on_end,
            )
            .await
            else {
                return;
            };
            let Ok(finish) = draft.end else { return };
            let mut edgewise = draft.edgewise;
            let mut usage = draft.usage;
            match answer.refine {
                None => {
                    let mut last = wire::chunk(endpoint, &meta, 0, None, Some(finish));
                    last["edgewise"] = edgewise;
                    if tx.send(event(&last)).await.is_err() {
                        return;
                    }
                }
                Some(refine) => {
                    // The first phase ends as choice 0 does; the refinement follows.
                    if tx
                        .send(event(&wire::chunk(endpoint, &meta, 0, None, Some(finish))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let started = tokio::select! {
                        r = refine => r,
                        () = tx.closed() => return,
                    };
                    let last = match started {
                        Err(why) => {
                            edgewise["refined"] = json!(false);
                            edgewise["refineError"] = json!(why);
                            wire::chunk_without_choices(endpoint, &meta)
                        }
                        Ok(phase) => {
                            let Some(refined) = stream_phase(
                                &tx,
                                endpoint,
                                &meta,
                                1,
                                phase.pieces,
                                phase.edgewise,
                                phase.on_end,
                            )
                            .await
                            else {
                                return;
                            };
                            match refined.end {
                                Ok(f) => {
                                    edgewise["refined"] = json!(true);
                                    edgewise["refine"] = refined.edgewise;
                                    usage = sum(usage, refined.usage);
                                    wire::chunk(endpoint, &meta, 1, None, Some(f))
                                }
                                Err(_) => return,
                            }
                        }
                    };
                    let mut last = last;
                    last["edgewise"] = edgewise;
                    if tx.send(event(&last)).await.is_err() {
                        return;
                    }
                }
            }
            if include_usage {
                let _ = tx
                    .send(event(&wire::usage_chunk(endpoint, &meta, usage)))
                    .await;
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        .in_current_span(),
    );
    let body =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Streams one phase's text as chunks of choice `index` (a refining phase's chunks are
/// marked). Returns how it ended; a failure has already been sent as an error event.
/// `None`: the client went away, which was measured and has stopped the phase.
async fn stream_phase(
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    endpoint: Endpoint,
    meta: &wire::Meta,
    index: u32,
    mut pieces: Pieces,
    edgewise: Value,
    on_end: Option<OnEnd>,
) -> Option<Ended> {
    let mut text = String::new();
    let marker = (index > 0).then(|| json!({"phase": "refine"}));
    let end = loop {
        let next = tokio::select! {
            p = pieces.next() => p,
            () = tx.closed() => None,
        };
        let piece = match next {
            Some(p) => p,
            None if tx.is_closed() => {
                let error = Some("the client disconnected".to_owned());
                measure(on_end, &text, Usage::default(), error);
                return None;
            }
            None => Piece::Failed(RuntimeError::Generation("the answer ended early".into())),
        };
        match piece {
            Piece::Text(t) => {
                let mut chunk = wire::chunk(endpoint, meta, index, Some(&t), None);
                if let Some(m) = &marker {
                    chunk["edgewise"] = m.clone();
                }
                text.push_str(&t);
                if tx.send(event(&chunk)).await.is_err() {
                    let error = Some("the client disconnected".to_owned());
                    measure(on_end, &text, Usage::default(), error);
                    return None;
                }
            }
            Piece::Done(usage, finish) => break Ok((usage, finish)),
            Piece::Failed(e) => break Err(e),
        }
    };
    let (usage, end) = match end {
        Ok((u, f)) => (u, Ok(f)),
        Err(e) => {
            let _ = tx.send(error_event(&e.to_string())).await;
            (Usage::default(), Err(e))
        }
    };
    let error = end.as_ref().err().map(ToString::to_string);
    let patch = measure(on_end, &text, usage, error);
    Some(Ended {
        text,
        usage,
        end,
        edgewise: merged(edgewise, patch),
    })
}

/// Serves `router` on `listener` until `shutdown`, with `TCP_NODELAY` on every connection
/// (small SSE events must not wait for Nagle).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "setting TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
