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

use crate::runtime::{Piece, Usage};
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
}

/// Measures an answer at its end; returns fields for the final `edgewise` object.
pub type OnEnd = Box<dyn FnOnce(Outcome) -> Option<Value> + Send>;

/// How an answer ended, for whoever measures it.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The whole text answered.
    pub text: String,
    /// Tokens in and out.
    pub usage: Usage,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Time to the first piece of text.
    pub first_token_ms: Option<u64>,
    /// Time to the end.
    pub total_ms: u64,
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
            return ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "invalid_request_error",
                message: format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                param: None,
                code: Some("request_too_large"),
            }
            .into_response();
        }
    };
    let request = match wire::parse(endpoint, &bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (stream, include_usage) = (request.stream, request.include_usage);
    let answer = match backend.answer(request, &headers).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let mut response = if stream {
        sse(
            endpoint,
            answer.model.clone(),
            answer.pieces,
            answer.edgewise.clone(),
            include_usage,
            answer.on_end,
        )
    } else {
        whole(
            endpoint,
            answer.model.clone(),
            answer.pieces,
            answer.edgewise.clone(),
            answer.on_end,
        )
        .await
    };
    response.headers_mut().extend(answer.headers);
    response
}

/// Collects the whole answer into one response object.
async fn whole(
    endpoint: Endpoint,
    model: String,
    mut pieces: Pieces,
    edgewise: Option<Value>,
    on_end: Option<OnEnd>,
) -> Response {
    let started = std::time::Instant::now();
    let mut text = String::new();
    let mut first = None;
    let mut end = None;
    while let Some(p) = pieces.next().await {
        match p {
            Piece::Text(t) => {
                first.get_or_insert_with(|| ms(started));
                text.push_str(&t);
            }
            Piece::Done(u, f) => {
                end = Some(Ok((u, f)));
                break;
            }
            Piece::Failed(e) => {
                end = Some(Err(e));
                break;
            }
        }
    }
    let end = end.unwrap_or_else(|| {
        Err(crate::runtime::RuntimeError::Generation(
            "the answer ended early".into(),
        ))
    });
    let patch = on_end.and_then(|f| {
        f(Outcome {
            text: text.clone(),
            usage: end.as_ref().map(|(u, _)| *u).unwrap_or_default(),
            error: end.as_ref().err().map(ToString::to_string),
            first_token_ms: first,
            total_ms: ms(started),
        })
    });
    let edgewise = merged(edgewise, patch);
    match end {
        Ok((usage, finish)) => {
            let mut body = wire::completion(
                endpoint,
                &wire::Meta::new(endpoint, &model),
                &text,
                usage,
                finish,
            );
            if let Some(e) = edgewise {
                body["edgewise"] = e;
            }
            axum::Json(body).into_response()
        }
        Err(e) if e.is_client_error() => ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: e.to_string(),
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        }
        .into_response(),
        Err(e) => ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "server_error",
            message: e.to_string(),
            param: None,
            code: Some("generation_failed"),
        }
        .into_response(),
    }
}

/// `base` with the fields of `patch` set.
fn merged(base: Option<Value>, patch: Option<Value>) -> Option<Value> {
    match (base, patch) {
        (Some(Value::Object(mut b)), Some(Value::Object(p))) => {
            b.extend(p);
            Some(Value::Object(b))
        }
        (b, None) => b,
        (None, p) => p,
        (b, Some(_)) => b,
    }
}

fn ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams the answer as server-sent events, ending with `data: [DONE]`; a failure after
/// the first token ends the stream with an error event.
fn sse(
    endpoint: Endpoint,
    model: String,
    pieces: Pieces,
    edgewise: Option<Value>,
    include_usage: bool,
    on_end: Option<OnEnd>,
) -> Response {
    struct St {
        pieces: Pieces,
        meta: wire::Meta,
        done: bool,
        edgewise: Option<Value>,
        text: String,
        first: Option<u64>,
        started: std::time::Instant,
        on_end: Option<OnEnd>,
    }
    impl St {
        fn end(&mut self, usage: Usage, error: Option<String>) -> Option<Value> {
            self.on_end.take().and_then(|f| {
                f(Outcome {
                    text: std::mem::take(&mut self.text),
                    usage,
                    error,
                    first_token_ms: self.first,
                    total_ms: ms(self.started),
                })
            })
        }
    }
    impl Drop for St {
        // A client that went away mid-stream still gets its request measured.
        fn drop(&mut self) {
            let _ = self.end(Usage::default(), Some("the client disconnected".into()));
        }
    }
    let st = St {
        pieces,
        meta: wire::Meta::new(endpoint, &model),
        done: false,
        edgewise,
        text: String::new(),
        first: None,
        started: std::time::Instant::now(),
        on_end,
    };
    let body = futures_util::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        let out = match st.pieces.next().await {
            Some(Piece::Text(t)) => {
                st.first.get_or_insert_with(|| ms(st.started));
                st.text.push_str(&t);
                event(&wire::chunk(endpoint, &st.meta, Some(&t), None))
            }
            Some(Piece::Done(usage, finish)) => {
                st.done = true;
                let mut last = wire::chunk(endpoint, &st.meta, None, Some(finish));
                let patch = st.end(usage, None);
                if let Some(e) = merged(st.edgewise.take(), patch) {
                    last["edgewise"] = e;
                }
                let mut out = event(&last).to_vec();
                if include_usage {
                    out.extend_from_slice(&event(&wire::usage_chunk(endpoint, &st.meta, usage)));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            Some(Piece::Failed(e)) => {
                st.done = true;
                let msg = e.to_string();
                let _ = st.end(Usage::default(), Some(msg.clone()));
                event(
                    &json!({"error": {"message": msg, "type": "server_error", "param": null, "code": "generation_failed"}}),
                )
            }
            None => {
                st.done = true;
                let _ = st.end(Usage::default(), Some("the answer ended early".into()));
                event(
                    &json!({"error": {"message": "the answer ended early", "type": "server_error", "param": null, "code": "generation_failed"}}),
                )
            }
        };
        Some((Ok::<_, std::convert::Infallible>(out), st))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
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
