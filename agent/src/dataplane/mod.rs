//! The data plane: apps send OpenAI requests to the agent, and the pushed RoutingPolicy is
//! executed, not just consulted. The policy decides (through the same [`LocalRouter`] that
//! answers `Decide`); this module runs the decision: the device target on the on-device
//! runtime, cloud targets on the endpoint the policy names, the fallback chain on failure
//! within one deadline, privacy pinning (an empty fallback never leaves its route), and
//! measures each request into telemetry.
//!
//! [`LocalRouter`]: crate::router::LocalRouter

pub mod attributes;
pub mod cloud;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use edgewise_proto::router::{Outcome as WireOutcome, Target, target::Kind};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::config::{AgentConfig, CloudCredential};
use crate::device::Device;
use crate::openai::{Answer, ApiError, Backend, Outcome, Request};
use crate::runtime::{Piece, RuntimeError};
use cloud::CloudFailure;

/// The whole request, fallbacks included, when the app gives no latency budget.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// A cloud target's wait for its response head when the policy gives no `timeoutMs`.
const DEFAULT_CLOUD_TIMEOUT: Duration = Duration::from_secs(30);

/// The policy-executing backend of the agent's OpenAI endpoint.
pub struct DataPlane {
    device: Arc<Device>,
    http: reqwest::Client,
    credentials: Vec<CloudCredential>,
    /// Endpoints that answered 429 with `retry-after`: skipped until then.
    cooldown: Mutex<HashMap<String, Instant>>,
}

/// Why one target did not serve.
enum Attempt {
    /// Try the next target; the reason goes into `edgewise.fallbacks`.
    Next(String),
    /// The request is at fault: answer the app with this.
    Client(ApiError),
}

/// A target that has produced its first piece.
struct Serving {
    first: Piece,
    rest: mpsc::Receiver<Piece>,
    model_version: Option<String>,
    cost_per_1k: f64,
}

impl DataPlane {
    /// The data plane of `device`, with the cloud credentials of `config`.
    pub fn new(device: Arc<Device>, config: &AgentConfig) -> Self {
        DataPlane {
            device,
            // No overall timeout: a streaming answer may be long. Each target's wait for its
            // first bytes is bounded by the policy's timeoutMs.
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default(),
            credentials: config.cloud.clone(),
            cooldown: Mutex::new(HashMap::new()),
        }
    }

    fn key_for(&self, endpoint: &str) -> Option<String> {
        self.credentials
            .iter()
            .find(|c| c.endpoint.trim_end_matches('/') == endpoint.trim_end_matches('/'))
            .and_then(CloudCredential::key)
    }

    async fn attempt(
        &self,
        target: &Target,
        request: &Request,
        deadline: Instant,
    ) -> Result<Serving, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Attempt::Next("the request's deadline passed".into()));
        }
        match &target.kind {
            Some(Kind::Device(d)) => {
                let Some(loaded) = self
                    .device
                    .runtime
                    .as_ref()
                    .and_then(|r| r.serving(&d.model))
                else {
                    return Err(Attempt::Next(format!(
                        "model {} has no version loaded on this device",
                        d.model
                    )));
                };
                let mut rx = loaded.stream(request.prompt.clone(), request.sampling.clone());
                let first = first_piece(&mut rx, left).await?;
                Ok(Serving {
                    first,
                    rest: rx,
                    model_version: Some(loaded.version.clone()),
                    cost_per_1k: 0.0,
                })
            }
            Some(Kind::Cloud(c)) => {
                let now = Instant::now();
                if let Some(until) = self.cooled(&c.endpoint, now) {
                    return Err(Attempt::Next(format!(
                        "rate limited by the endpoint for {} s more",
                        until.saturating_duration_since(now).as_secs()
                    )));
                }
                let timeout = match c.timeout_ms {
                    0 => DEFAULT_CLOUD_TIMEOUT,
                    ms => Duration::from_millis(u64::from(ms)),
                }
                .min(left);
                let body = cloud::upstream_body(&request.raw, &c.model);
                let started = Instant::now();
                let called = cloud::call(
                    &self.http,
                    &c.endpoint,
                    request.endpoint,
                    &body,
                    self.key_for(&c.endpoint),
                    timeout,
                )
                .await;
                let mut rx = match called {
                    Ok(rx) => rx,
                    Err(CloudFailure::Rejected(code, upstream)) => {
                        return Err(Attempt::Client(rejected(code, &upstream)));
                    }
                    Err(f) => {
                        if let CloudFailure::RateLimited(Some(s)) = &f {
                            self.cool(&c.endpoint, Instant::now() + Duration::from_secs(*s));
                        }
                        return Err(Attempt::Next(f.reason()));
                    }
                };
                let first = first_piece(&mut rx, timeout.saturating_sub(started.elapsed())).await?;
                Ok(Serving {
                    first,
                    rest: rx,
                    model_version: None,
                    cost_per_1k: c.cost_per_1k_tokens_usd,
                })
            }
            None => Err(Attempt::Next("the target has no kind".into())),
        }
    }

    fn cooled(&self, endpoint: &str, now: Instant) -> Option<Instant> {
        let mut map = self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until > now);
        map.get(endpoint).copied()
    }

    fn cool(&self, endpoint: &str, until: Instant) {
        self.cooldown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(endpoint.to_owned(), until);
    }

    async fn run(&self, request: Request, headers: &HeaderMap) -> Result<Answer, ApiError> {
        let router = &self.device.router;
        let policy = self.device.policy.current().ok_or_else(|| {
            ApiError::unavailable("no routing policy has reached this device yet")
        })?;
        let device_models: Vec<String> = device_models(&policy.compiled);
        if !device_models.contains(&request.model)
            && !policy
                .compiled
                .targets()
                .iter()
                .any(|t| *t.name == *request.model)
        {
            return Err(ApiError::unknown_model(&request.model));
        }
        let runtime = self.device.runtime.clone();
        // Counted with the tokenizer of the model asked for, else the policy's first device
        // model's: the one that would answer on the device.
        let input_tokens = runtime
            .as_ref()
            .and_then(|r| {
                r.serving(&request.model)
                    .or_else(|| device_models.first().and_then(|m| r.serving(m)))
            })
            .and_then(|l| l.count_tokens(&request.prompt).ok())
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| attributes::estimate_tokens(&request.prompt));
        let attrs = attributes::from_request(&request, headers, input_tokens)?;
        let decision = router
            .decide(&attrs)
            .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        let chain: Vec<&Target> = decision
            .target
            .iter()
            .chain(decision.fallback.iter())
            .collect();
        let pinned = decision.fallback.is_empty();
        let budget = attrs
            .latency_budget_ms
            .map_or(DEFAULT_DEADLINE, |ms| Duration::from_millis(u64::from(ms)));
        let started = Instant::now();
        let deadline = started + budget;
        let mut fallbacks: Vec<Value> = Vec::new();
        for (i, target) in chain.iter().enumerate() {
            match self.attempt(target, &request, deadline).await {
                Ok(serving) => {
                    debug!(target = %target.name, rule = %decision.rule, "serving");
                    return Ok(self.answer(
                        &request,
                        &attrs,
                        &decision,
                        target,
                        i > 0,
                        pinned,
                        fallbacks,
                        serving,
                        started,
                    ));
                }
                Err(Attempt::Client(e)) => return Err(e),
                Err(Attempt::Next(reason)) => {
                    fallbacks.push(json!({"target": target.name, "reason": reason}));
                }
            }
        }
        let reasons: Vec<String> = fallbacks
            .iter()
            .map(|f| {
                format!(
                    "{}: {}",
                    f["target"].as_str().unwrap_or(""),
                    f["reason"].as_str().unwrap_or("")
                )
            })
            .collect();
        let error = if pinned {
            format!(
                "rule {} keeps this request on {} and it cannot serve ({})",
                decision.rule,
                chain.first().map_or("", |t| t.name.as_str()),
                reasons.join("; ")
            )
        } else {
            format!("no target could serve this request: {}", reasons.join("; "))
        };
        self.report(WireOutcome {
            request_id: attrs.request_id.clone(),
            target: chain.last().map(|t| t.name.clone()).unwrap_or_default(),
            rule: decision.rule.clone(),
            policy_version: decision.policy_version.clone(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            ok: false,
            fallback_used: chain.len() > 1,
            error: error.clone(),
            input_tokens,
            task: attrs.task.clone().unwrap_or_default(),
            data_class: attrs.data_class.clone().unwrap_or_default(),
            ..Default::default()
        });
        Err(ApiError::unavailable(error))
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        request: &Request,
        attrs: &edgewise_proto::router::DecideRequest,
        decision: &edgewise_proto::router::DecideResponse,
        target: &Target,
        fallback_used: bool,
        pinned: bool,
        fallbacks: Vec<Value>,
        serving: Serving,
        started: Instant,
    ) -> Answer {
        let on_device = matches!(target.kind, Some(Kind::Device(_)));
        let edgewise = json!({
            "target": target.name,
            "onDevice": on_device,
            "rule": decision.rule,
            "policyVersion": decision.policy_version,
            "modelVersion": serving.model_version,
            "fallbackUsed": fallback_used,
            "fallbacks": fallbacks,
            "pinned": pinned,
            "refined": false,
        });
        let mut headers = vec![
            header("x-edgewise-target", &target.name),
            header("x-edgewise-rule", &decision.rule),
            header("x-edgewise-policy-version", &decision.policy_version),
            header(
                "x-edgewise-fallback-used",
                if fallback_used { "true" } else { "false" },
            ),
        ];
        if let Some(v) = &serving.model_version {
            headers.push(header("x-edgewise-model-version", v));
        }
        let per_1k = serving.cost_per_1k;
        let outcome = WireOutcome {
            request_id: attrs.request_id.clone(),
            target: target.name.clone(),
            rule: decision.rule.clone(),
            policy_version: decision.policy_version.clone(),
            fallback_used,
            task: attrs.task.clone().unwrap_or_default(),
            data_class: attrs.data_class.clone().unwrap_or_default(),
            ..Default::default()
        };
        let router = self.device.router.clone();
        let on_end = Box::new(move |o: Outcome| {
            let tokens = o.usage.prompt_tokens + o.usage.completion_tokens;
            let cost = per_1k * tokens as f64 / 1000.0;
            let report = WireOutcome {
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                ok: o.error.is_none(),
                error: o.error.unwrap_or_default(),
                input_tokens: u32::try_from(o.usage.prompt_tokens).unwrap_or(u32::MAX),
                output_tokens: u32::try_from(o.usage.completion_tokens).unwrap_or(u32::MAX),
                ..outcome
            };
            tokio::spawn(async move {
                if let Err(e) = router.report(&report).await {
                    tracing::warn!(error = %e, "recording a data-plane request");
                }
            });
            Some(json!({"costUsd": cost}))
        });
        let pieces = futures_util::stream::iter([serving.first])
            .chain(ReceiverStream::new(serving.rest))
            .boxed();
        Answer {
            model: request.model.clone(),
            pieces,
            edgewise: Some(edgewise),
            headers,
            on_end: Some(on_end),
        }
    }

    fn report(&self, outcome: WireOutcome) {
        let router = self.device.router.clone();
        tokio::spawn(async move {
            if let Err(e) = router.report(&outcome).await {
                tracing::warn!(error = %e, "recording a data-plane request");
            }
        });
    }
}

fn header(name: &'static str, value: &str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("")),
    )
}

/// The first piece of an answer within `wait`; a failure before it moves to the next
/// target, except one that is the request's fault.
async fn first_piece(rx: &mut mpsc::Receiver<Piece>, wait: Duration) -> Result<Piece, Attempt> {
    match tokio::time::timeout(wait, rx.recv()).await {
        Err(_) => Err(Attempt::Next(format!(
            "no first token within {} ms",
            wait.as_millis()
        ))),
        Ok(None) => Err(Attempt::Next("the answer ended before it began".into())),
        Ok(Some(Piece::Failed(e))) if e.is_client_error() => Err(Attempt::Client(client_error(&e))),
        Ok(Some(Piece::Failed(e))) => Err(Attempt::Next(e.to_string())),
        Ok(Some(p)) => Ok(p),
    }
}

fn client_error(e: &RuntimeError) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "invalid_request_error",
        message: e.to_string(),
        param: Some("messages"),
        code: Some("context_length_exceeded"),
    }
}

/// An upstream 4xx, passed to the app with the upstream's own message.
fn rejected(code: u16, upstream: &Value) -> ApiError {
    ApiError {
        status: StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        kind: "invalid_request_error",
        message: format!(
            "the cloud endpoint refused the request: {}",
            upstream["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
        ),
        param: None,
        code: None,
    }
}

/// The device models a policy routes to, in order.
fn device_models(policy: &edgewise_core::policy::CompiledPolicy) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in policy.targets() {
        if let edgewise_core::policy::TargetKind::Device { model } = &t.kind
            && !out.iter().any(|m| **m == **model)
        {
            out.push(model.to_string());
        }
    }
    out
}

impl Backend for DataPlane {
    fn models(&self) -> Vec<Value> {
        let Some(policy) = self.device.policy.current() else {
            return Vec::new();
        };
        device_models(&policy.compiled)
            .into_iter()
            .map(|m| {
                let loaded = self.device.runtime.as_ref().and_then(|r| r.serving(&m));
                json!({
                    "id": m,
                    "owned_by": "edgewise",
                    "edgewise": {
                        "version": self.device.active_version(&m),
                        "loaded": loaded.map(|l| l.version.clone()),
                    },
                })
            })
            .collect()
    }

    fn answer(
        &self,
        request: Request,
        headers: &HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, ApiError>> + Send + '_>> {
        let headers = headers.clone();
        Box::pin(async move { self.run(request, &headers).await })
    }
}
