//! The OpenAI API as the agent speaks it: request bodies, response objects, SSE chunks and
//! error objects with the status codes OpenAI uses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::runtime::{ChatMessage, Finish, Prompt, Sampling, Usage};

/// An OpenAI-style error: status, `type`, `param` and `code`.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI `type` (`invalid_request_error`, `server_error`…).
    pub kind: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<&'static str>,
    /// OpenAI `code` (`model_not_found`…).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the parameter at fault.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
        }
    }

    /// 404 `model_not_found`.
    pub fn unknown_model(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("The model `{model}` does not exist on this device"),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// 503: nothing could serve the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: Some("unavailable"),
        }
    }

    /// The body OpenAI sends.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `content` is a string or a list of parts; text parts are joined.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Strings {
    One(String),
    Many(Vec<String>),
}

impl Strings {
    fn into_vec(self) -> Vec<String> {
        match self {
            Strings::One(s) => vec![s],
            Strings::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of both completion endpoints the agent uses; others are accepted and ignored,
/// as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
struct Body {
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    prompt: Option<Strings>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Strings>,
    #[serde(default)]
    edgewise: Option<serde_json::Map<String, Value>>,
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// A parsed, validated completion request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Where it came.
    pub endpoint: Endpoint,
    /// The `model` asked for.
    pub model: String,
    /// What to answer.
    pub prompt: Prompt,
    /// How to decode.
    pub sampling: Sampling,
    /// Whether to answer with server-sent events.
    pub stream: bool,
    /// Whether the stream ends with a usage chunk.
    pub include_usage: bool,
    /// The `edgewise` object of the body: routing attributes.
    pub edgewise: serde_json::Map<String, Value>,
    /// The body as received, for forwarding to a cloud endpoint.
    pub raw: serde_json::Map<String, Value>,
}

/// Most tokens one request may ask for.
const MAX_TOKENS: usize = 4096;

/// Parses and checks a request body, as OpenAI does: bad JSON, missing or empty fields and
/// out-of-range values are 400s naming the parameter.
pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Request, ApiError> {
    let raw: serde_json::Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    let body: Body = serde_json::from_value(Value::Object(raw.clone()))
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}"), None))?;
    let model = body
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("you must provide a model parameter", Some("model")))?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            let messages = body.messages.ok_or_else(|| {
                ApiError::invalid("Missing required parameter: 'messages'.", Some("messages"))
            })?;
            if messages.is_empty() {
                return Err(ApiError::invalid(
                    "'messages' must contain at least one message.",
                    Some("messages"),
                ));
            }
            Prompt::Chat(
                messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: match m.content {
                            None => String::new(),
                            Some(Content::Text(t)) => t,
                            Some(Content::Parts(parts)) => parts
                                .into_iter()
                                .filter(|p| p.kind == "text")
                                .filter_map(|p| p.text)
                                .collect::<Vec<_>>()
                                .join("\n"),
                        },
                    })
                    .collect(),
            )
        }
        Endpoint::Completions => {
            let prompts = body
                .prompt
                .ok_or_else(|| {
                    ApiError::invalid("Missing required parameter: 'prompt'.", Some("prompt"))
                })?
                .into_vec();
            if prompts.len() != 1 {
                return Err(ApiError::invalid(
                    "this server takes one prompt per request",
                    Some("prompt"),
                ));
            }
            Prompt::Text(prompts.into_iter().next().unwrap_or_default())
        }
    };
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(256);
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return Err(ApiError::invalid(
            format!("max_tokens must be between 1 and {MAX_TOKENS}"),
            Some("max_tokens"),
        ));
    }
    let temperature = body.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    Ok(Request {
        endpoint,
        model,
        prompt,
        sampling: Sampling {
            max_tokens,
            temperature,
            top_p: body.top_p,
            seed: body.seed.unwrap_or(0),
            stop: body.stop.map(Strings::into_vec).unwrap_or_default(),
        },
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        edgewise: body.edgewise.unwrap_or_default(),
        raw,
    })
}

/// OpenAI's `usage` object.
pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Identity shared by every object of one response.
pub struct Meta {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// Model name reported.
    pub model: String,
}

impl Meta {
    /// A fresh identity for a response to `model`.
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Meta {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: jiff::Timestamp::now().as_second(),
            model: model.to_owned(),
        }
    }
}

/// The non-streaming response object.
pub fn completion(
    endpoint: Endpoint,
    meta: &Meta,
    text: &str,
    usage: Usage,
    finish: Finish,
) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(usage),
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(usage),
        }),
    }
}

/// One streamed chunk of choice `index`: more text (`delta`), or its end (`finish`).
pub fn chunk(
    endpoint: Endpoint,
    meta: &Meta,
    index: u32,
    delta: Option<&str>,
    finish: Option<Finish>,
) -> Value {
    let finish = finish.map(Finish::as_str);
    match endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": index,
                "delta": match delta {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                },
                "logprobs": null,
                "finish_reason": finish,
            }],
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": index,
                "text": delta.unwrap_or_default(),
                "logprobs": null,
                "finish_reason": finish,
            }],
        }),
    }
}

/// The usage chunk sent last when `stream_options.include_usage` is set.
pub fn usage_chunk(endpoint: Endpoint, meta: &Meta, usage: Usage) -> Value {
    let mut chunk = chunk_without_choices(endpoint, meta);
    chunk["usage"] = usage_json(usage);
    chunk
}

/// A chunk with no choices, to carry response-wide fields (usage, `edgewise`).
pub fn chunk_without_choices(endpoint: Endpoint, meta: &Meta) -> Value {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let err = parse(Endpoint::Chat, b"{not json").expect_err("refused");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("parse the JSON"), "{}", err.message);
        let err = parse(Endpoint::Chat, br#"{"model":"m"}"#).expect_err("refused");
        assert_eq!(err.param, Some("messages"));
        let err = parse(Endpoint::Chat, br#"{"model":"m","messages":[]}"#).expect_err("refused");
        assert_eq!(err.param, Some("messages"));
        let err = parse(
            Endpoint::Chat,
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
        )
        .expect_err("refused");
        assert_eq!(err.param, Some("model"));
        let err = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":0}"#,
        )
        .expect_err("refused");
        assert_eq!(err.param, Some("max_tokens"));
        assert_eq!(err.body()["error"]["type"], json!("invalid_request_error"));
    }

    #[test]
    fn content_parts_and_edgewise_attributes_are_read() {
        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}},{"type":"text","text":"b"}]}],
                 "edgewise":{"dataClass":"private"},"stop":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .expect("parses");
        let Prompt::Chat(m) = &r.prompt else {
            panic!("chat")
        };
        assert_eq!(m[0].content, "a\nb");
        assert_eq!(r.edgewise["dataClass"], json!("private"));
        assert_eq!(r.sampling.stop, ["x"]);
        assert!(r.stream && r.include_usage);
    }
}
