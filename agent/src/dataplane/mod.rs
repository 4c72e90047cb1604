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
pub mod http;
pub mod reprocess;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use edgewise_core::agreement;
use edgewise_proto::router::{
    DecideRequest, DecideResponse, Outcome as WireOutcome, Target, target::Kind,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, info, warn};

use crate::config::{AgentConfig, CloudCredential};
use crate::device::Device;
use crate::openai::{Answer, ApiError, Backend, Endpoint, Outcome, Phase, Request};
use crate::runtime::{Piece, RuntimeError};
use cloud::CloudFailure;
use reprocess::{CloudTarget, Pending, Queue, Reprocessed};

/// The whole request, fallbacks included, when the app gives no latency budget.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// A cloud target's wait for its response head when the policy gives no `timeoutMs`.
const DEFAULT_CLOUD_TIMEOUT: Duration = Duration::from_secs(30);
/// Shadow requests in flight at once; a sampled request beyond this is not shadowed (and
/// counted), so shadows can never pile up behind a slow cloud.
const MAX_SHADOWS_IN_FLIGHT: usize = 4;
/// A shadow or reprocessed request's whole answer, once its first token came.
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(120);

/// The policy-executing backend of the agent's OpenAI endpoint. Cheap to clone: the parts
/// are shared.
#[derive(Clone)]
pub struct DataPlane {
    device: Arc<Device>,
    http: http::CloudHttp,
    credentials: Arc<[CloudCredential]>,
    /// Endpoints that answered 429 with `retry-after`: skipped until then.
    cooldown: Arc<Mutex<HashMap<String, Instant>>>,
    shadows: Arc<Semaphore>,
    reprocess: Arc<Queue>,
    battery: Arc<crate::power::Battery>,
}

/// Why one target did not serve.
enum Attempt {
    /// Try the next target; the reason goes into `edgewise.fallbacks`.
    Next(String),
    /// The request is at fault: answer the app with this.
    Client(ApiError),
}

impl Attempt {
    fn reason(self) -> String {
        match self {
            Attempt::Next(r) => r,
            Attempt::Client(e) => e.message,
        }
    }
}

/// A target that has produced its first piece.
struct Serving {
    first: Piece,
    rest: crate::openai::Pieces,
    model_version: Option<String>,
    cost_per_1k: f64,
}

impl Serving {
    fn pieces(self) -> crate::openai::Pieces {
        futures_util::stream::iter([self.first])
            .chain(self.rest)
            .boxed()
    }
}

/// A request the chain's `target` (at `index`) has begun to answer.
struct Served<'a> {
    request: &'a Request,
    attrs: &'a DecideRequest,
    /// The learned router's version, when it scored the request.
    router_version: &'a str,
    decision: &'a DecideResponse,
    target: &'a Target,
    index: usize,
    fallbacks: Vec<Value>,
    serving: Serving,
    started: Instant,
}

// === impl DataPlane ===

impl DataPlane {
    /// The data plane of `device`, with the cloud credentials of `config`; requests kept
    /// for reprocessing live under its data dir.
    ///
    /// # Errors
    /// When the TLS client for cloud endpoints cannot be configured.
    pub fn new(device: Arc<Device>, config: &AgentConfig) -> Result<Self, rustls::Error> {
        Ok(Self::with_parts(
            device,
            http::CloudHttp::new()?,
            config.cloud.clone(),
            &config.data_dir,
        ))
    }

    /// The data plane of `device` calling cloud endpoints with `http` and these
    /// credentials, keeping requests for reprocessing under `data_dir`.
    pub fn with_parts(
        device: Arc<Device>,
        http: http::CloudHttp,
        credentials: Vec<CloudCredential>,
        data_dir: &std::path::Path,
    ) -> Self {
        DataPlane {
            device,
            http,
            credentials: credentials.into(),
            cooldown: Arc::default(),
            shadows: Arc::new(Semaphore::new(MAX_SHADOWS_IN_FLIGHT)),
            reprocess: Arc::new(Queue::new(data_dir.join("reprocess"))),
            battery: Arc::default(),
        }
    }

    /// The HTTP API: the OpenAI endpoints and `/v1/edgewise/reprocessed`.
    pub fn routes(&self) -> axum::Router {
        crate::openai::router(Arc::new(self.clone())).merge(
            axum::Router::new()
                .route("/v1/edgewise/reprocessed", axum::routing::get(reprocessed))
                .route(
                    "/v1/edgewise/reprocessed/{id}",
                    axum::routing::delete(forget_reprocessed),
                )
                .with_state(self.reprocess.clone()),
        )
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
                let mut rx = ReceiverStream::new(
                    loaded.stream(request.prompt.clone(), request.sampling.clone()),
                )
                .boxed();
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
                let body = cloud::upstream_body(&request.raw, &c.model, request.stream);
                let started = Instant::now();
                let called = cloud::call(
                    &self.http,
                    &c.endpoint,
                    request.endpoint,
                    body,
                    request.stream,
                    self.key_for(&c.endpoint).as_deref(),
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

    /// The whole answer of `target`, for work done in the background (shadows,
    /// reprocessing): text and tokens, or why not.
    async fn answer_of(&self, target: &Target, request: &Request) -> Result<(String, u32), String> {
        let deadline = Instant::now() + BACKGROUND_DEADLINE;
        let serving = self
            .attempt(target, request, deadline)
            .await
            .map_err(Attempt::reason)?;
        let mut pieces = serving.pieces();
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, pieces.next()).await {
                Err(_) => return Err("the answer did not finish in time".into()),
                Ok(Some(Piece::Text(t))) => text.push_str(&t),
                Ok(Some(Piece::Done(u, _))) => {
                    let tokens = u.prompt_tokens + u.completion_tokens;
                    return Ok((text, u32::try_from(tokens).unwrap_or(u32::MAX)));
                }
                Ok(Some(Piece::Failed(e))) => return Err(e.to_string()),
                Ok(None) => return Err("the answer ended early".into()),
            }
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
        let app_complexity = attributes::gives_complexity(&request, headers);
        // The learned router scores what the app did not: its version goes with the request.
        let classifier = runtime
            .as_ref()
            .and_then(|r| r.classifier())
            .filter(|_| !app_complexity);
        let learned = classifier
            .as_ref()
            .and_then(|c| c.complexity(&attributes::scored_text(&request.prompt)));
        let router_version = classifier.map(|c| c.version.clone()).unwrap_or_default();
        // Counted with the tokenizer of the model asked for, else the policy's first device
        // model's (the one that would answer on the device), when the decision reads the
        // count: a rule on inputTokens, or complexity from the heuristic. Otherwise the
        // estimate does (~10 % of the agent's CPU on a cloud request); what is recorded of a
        // served request is the serving target's own count.
        let heuristic = policy.compiled.reads_complexity() && learned.is_none() && !app_complexity;
        let input_tokens = (policy.compiled.reads_input_tokens() || heuristic)
            .then_some(runtime.as_ref())
            .flatten()
            .and_then(|r| {
                r.serving(&request.model)
                    .or_else(|| device_models.first().and_then(|m| r.serving(m)))
            })
            .and_then(|l| l.count_tokens(&request.prompt).ok())
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| attributes::estimate_tokens(&request.prompt));
        let attrs = attributes::from_request(
            &request,
            headers,
            attributes::Filled {
                input_tokens,
                learned_complexity: learned,
                battery: self.battery.level(),
            },
        )?;
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
        for (index, target) in chain.iter().enumerate() {
            match self.attempt(target, &request, deadline).await {
                Ok(serving) => {
                    debug!(target = %target.name, rule = %decision.rule, "serving");
                    return Ok(self.answer(Served {
                        request: &request,
                        attrs: &attrs,
                        router_version: &router_version,
                        decision: &decision,
                        target,
                        index,
                        fallbacks,
                        serving,
                        started,
                    }));
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
            router_version,
            ..Default::default()
        });
        Err(ApiError::unavailable(error))
    }

    fn answer(&self, served: Served<'_>) -> Answer {
        let Served {
            request,
            attrs,
            router_version,
            decision,
            target,
            index,
            fallbacks,
            serving,
            started,
        } = served;
        let fallback_used = index > 0;
        let pinned = decision.fallback.is_empty();
        let on_device = matches!(target.kind, Some(Kind::Device(_)));
        // Shadows and reprocessing apply to device answers only; the policy already keeps
        // pinned requests out of both.
        let shadow = decision.shadow.clone().filter(|_| on_device);
        let reprocess = decision
            .reprocess
            .as_ref()
            .filter(|_| on_device)
            .and_then(CloudTarget::of);
        let reprocess_id = reprocess.as_ref().map(|_| Queue::new_id());
        let mut edgewise = json!({
            "target": target.name,
            "onDevice": on_device,
            "rule": decision.rule,
            "policyVersion": decision.policy_version,
            "modelVersion": serving.model_version,
            "fallbackUsed": fallback_used,
            "fallbacks": fallbacks,
            "pinned": pinned,
            "refined": false,
            "shadowed": shadow.is_some(),
            "complexity": attrs.complexity,
        });
        if !router_version.is_empty() {
            edgewise["routerVersion"] = json!(router_version);
        }
        if let (Some(id), Some(t)) = (&reprocess_id, &reprocess) {
            edgewise["reprocess"] = json!({"id": id, "target": t.name});
        }
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
        let outcome = WireOutcome {
            request_id: attrs.request_id.clone(),
            target: target.name.clone(),
            rule: decision.rule.clone(),
            policy_version: decision.policy_version.clone(),
            fallback_used,
            task: attrs.task.clone().unwrap_or_default(),
            data_class: attrs.data_class.clone().unwrap_or_default(),
            router_version: router_version.to_owned(),
            // The chain's target has produced its first piece by now.
            first_token_ms: started.elapsed().as_secs_f64() * 1000.0,
            ..Default::default()
        };
        let refine = decision
            .refine
            .clone()
            .filter(|r| r.name != target.name)
            .map(|r| self.refinement(r, request.clone(), outcome.clone()));
        let plane = self.clone();
        let model = request.model.clone();
        // Kept for the work that follows a device answer only (a shadow, reprocessing).
        let request = (shadow.is_some() || reprocess.is_some()).then(|| request.clone());
        let model_version = serving.model_version.clone();
        let per_1k = serving.cost_per_1k;
        let on_end = Box::new(move |o: Outcome| {
            let tokens = o.usage.prompt_tokens + o.usage.completion_tokens;
            let cost = per_1k * tokens as f64 / 1000.0;
            let ok = o.error.is_none();
            let report = WireOutcome {
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                ok,
                error: o.error.clone().unwrap_or_default(),
                input_tokens: u32::try_from(o.usage.prompt_tokens).unwrap_or(u32::MAX),
                output_tokens: u32::try_from(o.usage.completion_tokens).unwrap_or(u32::MAX),
                ..outcome
            };
            if let (true, Some(id), Some(target), Some(request)) =
                (ok, reprocess_id, reprocess, &request)
            {
                plane.keep_for_reprocessing(Pending {
                    id,
                    created_unix_ms: crate::telemetry::clock::now_unix_ms(),
                    endpoint: endpoint_name(request.endpoint).into(),
                    body: Value::Object(request.raw.clone()),
                    rule: report.rule.clone(),
                    target,
                    device_text: o.text.clone(),
                    device_version: model_version,
                });
            }
            match (shadow.filter(|_| ok), request) {
                (Some(shadow), Some(request)) => plane.shadow(shadow, request, o.text, report),
                _ => plane.report(report),
            }
            Some(json!({"costUsd": cost}))
        });
        Answer {
            model,
            pieces: serving.pieces(),
            edgewise: Some(edgewise),
            headers,
            on_end: Some(on_end),
            refine,
        }
    }

    /// Starts the refine target now, alongside the first answer; its answer follows the
    /// first (docs/protocol.md). Dropping the result cancels it.
    fn refinement(
        &self,
        target: Target,
        request: Request,
        outcome: WireOutcome,
    ) -> crate::openai::Refinement {
        let plane = self.clone();
        let task = tokio::spawn(
            async move {
                let started = Instant::now();
                let deadline = started + DEFAULT_DEADLINE;
                let serving = plane
                    .attempt(&target, &request, deadline)
                    .await
                    .map_err(|a| format!("{}: {}", target.name, a.reason()))?;
                let per_1k = serving.cost_per_1k;
                let edgewise = json!({
                    "target": target.name,
                    "onDevice": matches!(target.kind, Some(Kind::Device(_))),
                    "modelVersion": serving.model_version,
                });
                let on_end = Box::new(move |o: Outcome| {
                    let tokens = o.usage.prompt_tokens + o.usage.completion_tokens;
                    plane.report(WireOutcome {
                        target: target.name.clone(),
                        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                        ok: o.error.is_none(),
                        error: o.error.unwrap_or_default(),
                        input_tokens: u32::try_from(o.usage.prompt_tokens).unwrap_or(u32::MAX),
                        output_tokens: u32::try_from(o.usage.completion_tokens).unwrap_or(u32::MAX),
                        fallback_used: false,
                        ..outcome
                    });
                    Some(json!({"costUsd": per_1k * tokens as f64 / 1000.0}))
                });
                Ok(Phase {
                    pieces: serving.pieces(),
                    edgewise,
                    on_end: Some(on_end),
                })
            }
            .in_current_span(),
        );
        let task = AbortOnDropHandle::new(task);
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the refinement stopped: {e}")))
        })
    }

    /// Sends a device-answered request to the shadow target in the background, compares
    /// the answers, and records the request with the verdict. Never delays the app; beyond
    /// [`MAX_SHADOWS_IN_FLIGHT`] the request is recorded unshadowed.
    fn shadow(&self, target: Target, request: Request, device_text: String, report: WireOutcome) {
        let Ok(permit) = self.shadows.clone().try_acquire_owned() else {
            self.device
                .stats
                .shadows_skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(target = %target.name, "shadow skipped: too many in flight");
            return self.report(report);
        };
        let plane = self.clone();
        tokio::spawn(
            async move {
                let verdict = match plane.answer_of(&target, &request).await {
                    Ok((cloud_text, tokens)) => {
                        if let Some(per_1k) = plane.device.router.cloud_price(&target.name) {
                            plane.device.router.charge_cloud(per_1k, tokens);
                        }
                        let a = agreement::compare(&device_text, &cloud_text);
                        debug!(f1 = a.f1, agree = a.agree, "shadow compared");
                        if a.agree {
                            SHADOW_AGREE
                        } else {
                            SHADOW_DISAGREE
                        }
                    }
                    Err(why) => {
                        debug!(target = %target.name, error = %why, "shadow failed");
                        SHADOW_NONE
                    }
                };
                drop(permit);
                plane.report(WireOutcome {
                    shadow_agreement: verdict,
                    ..report
                });
            }
            .in_current_span(),
        );
    }

    /// Keeps a request for reprocessing, in the background: the write syncs twice.
    fn keep_for_reprocessing(&self, pending: Pending) {
        let queue = self.reprocess.clone();
        tokio::spawn(
            async move {
                let id = pending.id.clone();
                if let Err(e) = on_disk(move || queue.push(&pending)).await {
                    warn!(id = %id, error = %e, "keeping a request for reprocessing");
                }
            }
            .in_current_span(),
        );
    }

    /// Runs kept requests in the cloud whenever the device is online, oldest first, backing
    /// off while the cloud does not answer. Quiet when nothing is kept.
    #[tracing::instrument(name = "reprocess", skip_all)]
    pub async fn reprocess(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let queue = self.reprocess.clone();
            let pending = on_disk(move || queue.pending()).await.unwrap_or_else(|e| {
                warn!(error = %e, "reading the reprocess queue");
                Vec::new()
            });
            let wait = if pending.is_empty() {
                None
            } else if self.device.router.network() == edgewise_core::policy::Network::Offline {
                // Backs off while offline too: a device offline for days is not polled twice
                // a second.
                failures = failures.saturating_add(1);
                Some(reprocess::retry_after(failures))
            } else {
                match self.reprocess_all(pending).await {
                    Ok(()) => {
                        failures = 0;
                        continue;
                    }
                    Err(why) => {
                        failures += 1;
                        let wait = reprocess::retry_after(failures);
                        info!(error = %why, retry_in_ms = wait.as_millis() as u64, "reprocessing waits for the cloud");
                        Some(wait)
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.reprocess.queued.notified() => {}
                () = async {
                    match wait {
                        Some(w) => tokio::time::sleep(w).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    async fn reprocess_all(&self, pending: Vec<Pending>) -> Result<(), String> {
        for p in pending {
            let endpoint = match p.endpoint.as_str() {
                "completions" => Endpoint::Completions,
                _ => Endpoint::Chat,
            };
            let request = match crate::openai::wire::parse(endpoint, p.body.to_string().as_bytes())
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(id = %p.id, error = %e.message, "a kept request no longer parses; dropped");
                    let (queue, done) = (
                        self.reprocess.clone(),
                        done(&p, json!({"error": e.message}), Value::Null),
                    );
                    let _ = on_disk(move || queue.complete(&done)).await;
                    continue;
                }
            };
            let target = p.target.target();
            let started = Instant::now();
            let (text, tokens) = self.answer_of(&target, &request).await?;
            let a = agreement::compare(&p.device_text, &text);
            self.report(WireOutcome {
                request_id: p.id.clone(),
                target: target.name.clone(),
                rule: p.rule.clone(),
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                ok: true,
                input_tokens: tokens,
                shadow_agreement: if a.agree {
                    SHADOW_AGREE
                } else {
                    SHADOW_DISAGREE
                },
                ..Default::default()
            });
            let cloud = json!({"target": p.target.name, "model": p.target.model, "text": text});
            let (queue, done) = (
                self.reprocess.clone(),
                done(&p, cloud, json!({"f1": a.f1, "agree": a.agree})),
            );
            on_disk(move || queue.complete(&done))
                .await
                .map_err(|e| format!("recording reprocessed {}: {e}", p.id))?;
            debug!(id = %p.id, agree = a.agree, "reprocessed");
        }
        Ok(())
    }

    /// Counts the request against budgets now (the next decision must see it) and records
    /// it once the answer is on its way: a task of its own, which the runtime runs on this
    /// thread when the connection's task yields, after writing the response (a record's
    /// write is ~10 µs that the app need not wait for).
    fn report(&self, outcome: WireOutcome) {
        let router = &self.device.router;
        router.charge(&outcome);
        let record = {
            let router = router.clone();
            move || {
                if let Err(e) = router.record_soon(&outcome) {
                    warn!(error = %e, "recording a data-plane request");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move { record() })),
            Err(_) => record(),
        }
    }
}

/// Runs disk work that syncs (the reprocess queue's) on the blocking pool: the data plane's
/// runtime may be one thread, and every request on it would wait out the fsyncs.
async fn on_disk<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// `Outcome.shadow_agreement` values (edgewise.v1.ShadowAgreement).
const SHADOW_NONE: u32 = 0;
const SHADOW_AGREE: u32 = 1;
const SHADOW_DISAGREE: u32 = 2;

fn done(p: &Pending, cloud: Value, agreement: Value) -> Reprocessed {
    Reprocessed {
        id: p.id.clone(),
        created_unix_ms: p.created_unix_ms,
        reprocessed_unix_ms: crate::telemetry::clock::now_unix_ms(),
        rule: p.rule.clone(),
        request: p.body.clone(),
        device: json!({"text": p.device_text, "modelVersion": p.device_version}),
        cloud,
        agreement,
    }
}

fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "completions",
    }
}

#[derive(serde::Deserialize)]
struct After {
    after: Option<String>,
}

/// `GET /v1/edgewise/reprocessed[?after=ID]`: answers the cloud gave to requests the
/// device answered offline, oldest first.
async fn reprocessed(State(queue): State<Arc<Queue>>, Query(q): Query<After>) -> Response {
    match on_disk(move || queue.done(q.after.as_deref())).await {
        Ok(list) => axum::Json(json!({"object": "list", "data": list})).into_response(),
        Err(e) => {
            ApiError::unavailable(format!("reading reprocessed requests: {e}")).into_response()
        }
    }
}

/// `DELETE /v1/edgewise/reprocessed/{id}`: the app has taken it.
async fn forget_reprocessed(
    State(queue): State<Arc<Queue>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let forgotten = {
        let id = id.clone();
        on_disk(move || queue.forget(&id)).await
    };
    match forgotten {
        Ok(true) => axum::Json(json!({"id": id, "deleted": true})).into_response(),
        Ok(false) => ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("no reprocessed request {id:?}"),
            param: Some("id"),
            code: Some("not_found"),
        }
        .into_response(),
        Err(e) => ApiError::unavailable(format!("forgetting {id}: {e}")).into_response(),
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
async fn first_piece(pieces: &mut crate::openai::Pieces, wait: Duration) -> Result<Piece, Attempt> {
    match tokio::time::timeout(wait, pieces.next()).await {
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
        // OpenAI's own codes and parameters pass through, so an app's handling of them
        // (e.g. trimming on context_length_exceeded) works whichever target refused.
        param: known(
            &upstream["error"]["param"],
            &["messages", "prompt", "max_tokens", "model"],
        ),
        code: known(
            &upstream["error"]["code"],
            &[
                "context_length_exceeded",
                "model_not_found",
                "invalid_value",
                "invalid_type",
            ],
        ),
    }
}

/// `value` if it is one of `known` (the wire type holds static names only).
fn known(value: &Value, known: &[&'static str]) -> Option<&'static str> {
    let v = value.as_str()?;
    known.iter().copied().find(|k| *k == v)
}

/// The device models a policy routes to, in order.
pub fn device_models(policy: &edgewise_core::policy::CompiledPolicy) -> Vec<String> {
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
