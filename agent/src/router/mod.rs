//! The local Router: where does this request run? Answered from the last good policy and
//! the installed models, online or offline, in-process ([`LocalRouter`]) or over a Unix
//! socket ([`socket`]) that speaks gRPC ([`service`]) and a framed lane ([`lane`]).

mod authority;
pub mod lane;
pub mod service;
pub mod socket;

pub use service::RouterService;
pub use socket::serve_unix;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use edgewise_core::policy::{Network, Request, TargetKind};
use edgewise_proto::convert::{InstalledModels, MAX_FIELD_LEN, decide_response};
use edgewise_proto::fleet::InferenceEvent;
use edgewise_proto::router::{DecideRequest, DecideResponse, LocalModel, Outcome};
use tokio::sync::watch;
use tonic::Status;

use crate::policy::PolicyStore;
use crate::store::ModelsFile;
use crate::telemetry::clock::utc_day;
use crate::telemetry::{BufferError, Event, TelemetryBuffer, new_event_id};

/// Active models by family, as apps see them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelsView {
    /// By model family.
    pub models: BTreeMap<String, LocalModel>,
    /// The rollout that installed each, for telemetry.
    pub rollouts: BTreeMap<String, String>,
}

impl ModelsView {
    /// The view of a model state.
    #[must_use]
    pub fn from_state(file: &ModelsFile) -> Self {
        ModelsView {
            models: file
                .models
                .iter()
                .map(|(name, slots)| {
                    let a = &slots.active;
                    (
                        name.clone(),
                        LocalModel {
                            model: name.clone(),
                            version: a.version.clone(),
                            variant: a.variant.clone(),
                            format: a.format.clone(),
                            path: a.path.display().to_string(),
                            sha256: a.sha256.clone(),
                        },
                    )
                })
                .collect(),
            rollouts: file
                .models
                .iter()
                .map(|(name, slots)| (name.clone(), slots.active.rollout.clone()))
                .collect(),
        }
    }
}

impl InstalledModels for ModelsView {
    fn active(&self, model: &str) -> Option<(&str, &str)> {
        self.models
            .get(model)
            .map(|m| (m.version.as_str(), m.path.as_str()))
    }
}

/// Where routing answers come from.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No policy has been received or persisted yet.
    #[error("no routing policy yet: the agent has not received one from the gateway")]
    NoPolicy,
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Self {
        match e {
            RouterError::NoPolicy => Status::failed_precondition(e.to_string()),
            RouterError::Invalid(m) => Status::invalid_argument(m),
        }
    }
}

/// Why a reported outcome was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A value no request can have; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The telemetry buffer could not store it.
    #[error("outcome not stored: {0}")]
    NotStored(#[from] BufferError),
}

impl From<ReportError> for Status {
    fn from(e: ReportError) -> Self {
        match e {
            ReportError::Invalid(m) => Status::invalid_argument(m),
            ReportError::NotStored(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Longest latency an outcome may report: a day.
const MAX_REPORTED_MS: f64 = 86_400_000.0;
/// Longest error message recorded; longer ones are cut (at a character boundary).
pub const MAX_ERROR_BYTES: usize = 1024;

/// Checks what an app reports: latencies are finite, not negative and under a day.
///
/// # Errors
/// The field at fault and why.
pub fn check_outcome(o: &Outcome) -> Result<(), String> {
    for (field, v) in [
        ("latency_ms", o.latency_ms),
        ("first_token_ms", o.first_token_ms),
    ] {
        if !(v.is_finite() && (0.0..=MAX_REPORTED_MS).contains(&v)) {
            return Err(format!(
                "{field} {v} must be a number of milliseconds from 0 to {MAX_REPORTED_MS}"
            ));
        }
    }
    Ok(())
}

/// `s` cut to at most `max` bytes at a character boundary.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// How often, at most, today's cloud use is written to disk.
pub const USAGE_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Cloud use of one UTC day, for budgets; kept in `usage.json` when the router persists it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct DailyUsage {
    day: i64,
    cloud_requests: u32,
    cloud_spend_usd: f64,
}

/// What the socket answers `status` with: the agent's status document (JSON), made when
/// asked. Set by whoever owns the device; the router only carries it.
type StatusSource = Box<dyn Fn() -> String + Send + Sync>;

struct StatusSlot(std::sync::OnceLock<StatusSource>);

impl std::fmt::Debug for StatusSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "StatusSlot(set)"
        } else {
            "StatusSlot(unset)"
        })
    }
}

/// The router, shared by the sync client (which feeds it) and apps (which ask it).
#[derive(Debug)]
pub struct LocalRouter {
    policy: Arc<PolicyStore>,
    telemetry: Option<Arc<TelemetryBuffer>>,
    models: watch::Sender<Arc<ModelsView>>,
    network: AtomicU8,
    usage: Mutex<DailyUsage>,
    /// Where `usage` is kept across restarts, once set.
    usage_file: std::sync::OnceLock<std::path::PathBuf>,
    /// Told on every charge; [`LocalRouter::keep_usage`] writes the file behind it.
    usage_changed: tokio::sync::Notify,
    status: StatusSlot,
}

impl LocalRouter {
    /// A router over `policy`, reporting outcomes into `telemetry`.
    #[must_use]
    pub fn new(policy: Arc<PolicyStore>, telemetry: Option<Arc<TelemetryBuffer>>) -> Self {
        LocalRouter {
            policy,
            telemetry,
            models: watch::Sender::new(Arc::new(ModelsView::default())),
            network: AtomicU8::new(0),
            usage: Mutex::new(DailyUsage::default()),
            usage_file: std::sync::OnceLock::new(),
            usage_changed: tokio::sync::Notify::new(),
            status: StatusSlot(std::sync::OnceLock::new()),
        }
    }

    /// Keeps today's cloud use in `path` (read now, written behind the requests by
    /// [`LocalRouter::keep_usage`]), so a restart does not reset the device's budgets. Set
    /// once; later calls are ignored.
    ///
    /// # Errors
    /// When an existing file cannot be read or parsed.
    pub fn persist_usage(&self, path: std::path::PathBuf) -> std::io::Result<()> {
        if let Some(saved) = crate::fsutil::read_json::<DailyUsage>(&path)? {
            *self
                .usage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = saved;
        }
        let _ = self.usage_file.set(path);
        Ok(())
    }

    /// Cloud requests and spend counted today (UTC).
    #[must_use]
    pub fn cloud_usage_today(&self) -> (u32, f64) {
        let usage = self
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if usage.day == utc_day() {
            (usage.cloud_requests, usage.cloud_spend_usd)
        } else {
            (0, 0.0)
        }
    }

    /// The price per 1,000 tokens of the policy's target `name`, if it is a cloud target.
    #[must_use]
    pub fn cloud_price(&self, name: &str) -> Option<f64> {
        let policy = self.policy.current()?;
        policy
            .compiled
            .targets()
            .iter()
            .find(|t| *t.name == *name)
            .and_then(|t| match &t.kind {
                TargetKind::Cloud {
                    cost_per_1k_tokens_usd,
                    ..
                } => Some(*cost_per_1k_tokens_usd),
                TargetKind::Device { .. } => None,
            })
    }

    /// Counts one cloud request of `tokens` at `per_1k` dollars against today's budgets
    /// (shadow requests are counted this way: they cost, but are no request of the app's).
    pub fn charge_cloud(&self, per_1k: f64, tokens: u32) {
        let mut usage = self
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let today = utc_day();
        if usage.day != today {
            *usage = DailyUsage {
                day: today,
                ..DailyUsage::default()
            };
        }
        usage.cloud_requests += 1;
        usage.cloud_spend_usd += per_1k * f64::from(tokens) / 1000.0;
        drop(usage);
        self.usage_changed.notify_one();
    }

    /// Writes today's cloud use to the file of [`LocalRouter::persist_usage`] whenever it
    /// changes, at most every [`USAGE_WRITE_INTERVAL`], and once more at `shutdown`.
    ///
    /// Written behind the requests rather than by each: a file rewritten per request cost
    /// the cloud path ~0.2 ms (docs/benchmarks.md). A crash loses at most the last
    /// interval's count; a clean stop loses none.
    pub async fn keep_usage(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Some(path) = self.usage_file.get() else {
            return;
        };
        loop {
            tokio::select! {
                () = self.usage_changed.notified() => {}
                () = shutdown.cancelled() => break,
            }
            self.write_usage(path);
            tokio::select! {
                () = tokio::time::sleep(USAGE_WRITE_INTERVAL) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.write_usage(path);
    }

    fn write_usage(&self, path: &std::path::Path) {
        let bytes = serde_json::to_vec(
            &*self
                .usage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Renamed into place: a crash leaves the old or the new count, never a torn file.
        let written = bytes
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::atomic_write(path, &bytes, false));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "saving today's cloud use");
        }
    }

    /// Sets what `status` answers (once; later calls are ignored).
    pub fn set_status_source(&self, source: impl Fn() -> String + Send + Sync + 'static) {
        let _ = self.status.0.set(Box::new(source));
    }

    /// The agent's status document, if whoever runs this router provides one.
    #[must_use]
    pub fn status_json(&self) -> Option<String> {
        self.status.0.get().map(|f| f())
    }

    /// Publishes the installed models.
    pub fn set_models(&self, view: ModelsView) {
        self.models.send_if_modified(|cur| {
            let changed = **cur != view;
            if changed {
                *cur = Arc::new(view);
            }
            changed
        });
    }

    /// Updates the agent's view of connectivity.
    pub fn set_network(&self, network: Network) {
        let v = match network {
            Network::Online => 0,
            Network::Offline => 1,
            Network::Metered => 2,
        };
        self.network.store(v, Ordering::Relaxed);
    }

    /// The agent's view of connectivity.
    #[must_use]
    pub fn network(&self) -> Network {
        match self.network.load(Ordering::Relaxed) {
            1 => Network::Offline,
            2 => Network::Metered,
            _ => Network::Online,
        }
    }

    /// Changes to the installed models (the current set first).
    #[must_use]
    pub fn watch_models(&self) -> watch::Receiver<Arc<ModelsView>> {
        self.models.subscribe()
    }

    /// Decides where a request runs.
    ///
    /// # Errors
    /// [`RouterError::NoPolicy`] before the first policy arrives.
    pub fn decide(&self, req: &DecideRequest) -> Result<DecideResponse, RouterError> {
        let policy = self.policy.current().ok_or(RouterError::NoPolicy)?;
        let network = edgewise_proto::router::Network::try_from(req.network)
            .map_err(|_| {
                RouterError::Invalid(format!("network {} is not a known value", req.network))
            })?
            .to_core(self.network());
        let attributes: Vec<(&str, &str)> = req
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let models = self.models.borrow().clone();
        let (cloud_requests_today, cloud_spend_today_usd) = self.cloud_usage_today();
        let request = Request {
            request_id: &req.request_id,
            task: req.task.as_deref(),
            data_class: req.data_class.as_deref(),
            input_tokens: req.input_tokens,
            latency_budget_ms: req.latency_budget_ms,
            network,
            battery: req.battery,
            complexity: req.complexity,
            // The installed version of the model the policy's first device target uses.
            model_version: policy
                .compiled
                .targets()
                .iter()
                .find_map(|t| match &t.kind {
                    TargetKind::Device { model } => models.models.get(&**model),
                    TargetKind::Cloud { .. } => None,
                })
                .map(|m| m.version.as_str()),
            attributes: &attributes,
            cloud_requests_today,
            cloud_spend_today_usd,
        };
        let decision = policy.compiled.decide(&request);
        Ok(decide_response(&decision, &*models))
    }

    /// Takes an outcome an app reports: checks it, counts cloud usage for budgets and
    /// buffers it as telemetry (text cut to what the gateway takes); resolves once the
    /// event is on disk.
    ///
    /// # Errors
    /// [`ReportError::Invalid`] naming the field, or the buffer's error.
    pub async fn report(&self, outcome: &Outcome) -> Result<(), ReportError> {
        check_outcome(outcome).map_err(ReportError::Invalid)?;
        self.charge(outcome);
        Ok(self.record(outcome).await?)
    }

    /// Counts a cloud outcome against today's budgets, at once: the next decision sees it.
    pub fn charge(&self, outcome: &Outcome) {
        if let Some(per_1k) = self.cloud_price(&outcome.target) {
            self.charge_cloud(
                per_1k,
                outcome.input_tokens.saturating_add(outcome.output_tokens),
            );
        }
    }

    /// Buffers an outcome as telemetry without counting it against budgets (the caller
    /// has, with [`LocalRouter::charge`]); resolves once the event is on disk.
    ///
    /// # Errors
    /// When the telemetry buffer cannot store the event.
    pub async fn record(&self, outcome: &Outcome) -> Result<(), BufferError> {
        match (&self.telemetry, self.event_of(outcome)) {
            (Some(buffer), Some(event)) => buffer.append(vec![event]).await,
            _ => Ok(()),
        }
    }

    /// As [`LocalRouter::record`], for an outcome nobody waits on (a request the data
    /// plane has answered): written to the buffer at once and synced with others within
    /// its `sync_interval`; a failure to store it is counted as dropped events.
    ///
    /// # Errors
    /// When the telemetry buffer is closed.
    pub fn record_soon(&self, outcome: &Outcome) -> Result<(), BufferError> {
        match (&self.telemetry, self.event_of(outcome)) {
            (Some(buffer), Some(event)) => buffer.append_soon(vec![event]),
            _ => Ok(()),
        }
    }

    /// The telemetry event of an outcome; `None` without a policy (nothing to attribute
    /// it to) or a telemetry buffer.
    fn event_of(&self, outcome: &Outcome) -> Option<Event> {
        self.telemetry.as_ref()?;
        let policy = self.policy.current()?;
        let targets = policy.compiled.targets();
        let cost = self.cloud_price(&outcome.target);
        let tokens = outcome.input_tokens.saturating_add(outcome.output_tokens);
        // The model family is the device target's: the app's model, whichever target ran.
        let family = targets.iter().find_map(|t| match &t.kind {
            TargetKind::Device { model } => Some(model.to_string()),
            TargetKind::Cloud { .. } => None,
        });
        let models = self.models.borrow().clone();
        let local = family.as_deref().and_then(|m| models.models.get(m));
        let event = InferenceEvent {
            event_id: new_event_id(),
            time_unix_ms: crate::telemetry::now_unix_ms() - outcome.latency_ms.max(0.0) as i64,
            model: family.clone().unwrap_or_default(),
            version: local.map(|m| m.version.clone()).unwrap_or_default(),
            variant: local.map(|m| m.variant.clone()).unwrap_or_default(),
            target: clip(&outcome.target, MAX_FIELD_LEN),
            on_device: cost.is_none(),
            rule: clip(&outcome.rule, MAX_FIELD_LEN),
            policy_version: clip(&outcome.policy_version, MAX_FIELD_LEN),
            latency_ms: outcome.latency_ms,
            ok: outcome.ok,
            fallback_used: outcome.fallback_used,
            error: clip(&outcome.error, MAX_ERROR_BYTES),
            input_tokens: outcome.input_tokens,
            output_tokens: outcome.output_tokens,
            cost_usd: cost.map_or(0.0, |per_1k| per_1k * f64::from(tokens) / 1000.0),
            shadow: i32::try_from(outcome.shadow_agreement).unwrap_or(0),
            task: clip(&outcome.task, MAX_FIELD_LEN),
            data_class: clip(&outcome.data_class, MAX_FIELD_LEN),
            rollout: family
                .as_deref()
                .and_then(|m| models.rollouts.get(m).cloned())
                .unwrap_or_default(),
            router_version: clip(&outcome.router_version, MAX_FIELD_LEN),
            first_token_ms: outcome.first_token_ms,
        };
        Some(Event::Inference(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(path: &std::path::Path) -> Option<DailyUsage> {
        crate::fsutil::read_json(path).ok().flatten()
    }

    #[tokio::test]
    async fn reported_outcomes_are_checked_and_their_text_cut_to_what_the_gateway_takes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = TelemetryBuffer::open(
            dir.path(),
            crate::telemetry::BufferConfig {
                max_bytes: 1 << 20,
                segment_bytes: 1 << 16,
                durable: false,
                ..crate::telemetry::BufferConfig::default()
            },
        )
        .expect("opens");
        let policy = PolicyStore::ephemeral();
        let spec = serde_json::json!({
            "targets": [{"name": "d", "device": {"model": "m"}}],
            "default": {"route": "d"}
        });
        let parsed = serde_json::from_value(spec.clone()).expect("a spec");
        policy
            .apply(&edgewise_proto::fleet::PolicyUpdate {
                nonce: "n".into(),
                version: edgewise_core::policy::policy_version(&parsed),
                source: "ns/p".into(),
                spec_json: serde_json::to_vec(&spec).expect("json"),
            })
            .expect("applies");
        let router = LocalRouter::new(Arc::new(policy), Some(buffer.clone()));
        let ok = Outcome {
            target: "d".into(),
            latency_ms: 12.0,
            ..Outcome::default()
        };
        for (field, bad) in [
            (
                "latency_ms",
                Outcome {
                    latency_ms: f64::NAN,
                    ..ok.clone()
                },
            ),
            (
                "latency_ms",
                Outcome {
                    latency_ms: -1.0,
                    ..ok.clone()
                },
            ),
            (
                "latency_ms",
                Outcome {
                    latency_ms: 1e300,
                    ..ok.clone()
                },
            ),
            (
                "first_token_ms",
                Outcome {
                    first_token_ms: f64::INFINITY,
                    ..ok.clone()
                },
            ),
        ] {
            let err = router.report(&bad).await.expect_err("refused");
            assert!(
                matches!(&err, ReportError::Invalid(m) if m.starts_with(field)),
                "{err}"
            );
            assert_eq!(Status::from(err).code(), tonic::Code::InvalidArgument);
        }
        let loud = Outcome {
            error: "é".repeat(3000),
            task: "t".repeat(1000),
            ..ok.clone()
        };
        router.report(&loud).await.expect("recorded");
        let batch = buffer
            .next_batch(10, usize::MAX)
            .expect("reads")
            .expect("one");
        let events = batch.events();
        let [Event::Inference(e)] = events.as_slice() else {
            panic!("one inference event: {events:?}");
        };
        assert!(e.error.len() <= MAX_ERROR_BYTES && e.error.len() >= MAX_ERROR_BYTES - 1);
        assert!(
            e.error.chars().all(|c| c == 'é'),
            "cut at a character boundary"
        );
        assert_eq!(e.task.len(), MAX_FIELD_LEN);
    }

    #[tokio::test(start_paused = true)]
    async fn cloud_use_is_written_behind_the_requests_and_flushed_at_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.json");
        let router = Arc::new(LocalRouter::new(Arc::new(PolicyStore::ephemeral()), None));
        router.persist_usage(path.clone()).expect("no file yet");
        let stop = tokio_util::sync::CancellationToken::new();
        let keeper = tokio::spawn(router.clone().keep_usage(stop.clone()));

        router.charge_cloud(2.0, 500);
        assert!(saved(&path).is_none(), "not written on the request's path");
        tokio::time::sleep(USAGE_WRITE_INTERVAL / 2).await;
        assert_eq!(saved(&path).map(|u| u.cloud_requests), Some(1));

        // Within one interval, many charges make one more write, of their total.
        for _ in 0..50 {
            router.charge_cloud(2.0, 500);
        }
        tokio::time::sleep(USAGE_WRITE_INTERVAL * 2).await;
        let u = saved(&path).expect("written");
        assert_eq!(u.cloud_requests, 51);
        assert!(
            (u.cloud_spend_usd - 51.0).abs() < 1e-9,
            "{}",
            u.cloud_spend_usd
        );

        router.charge_cloud(2.0, 500);
        stop.cancel();
        keeper.await.expect("joins");
        assert_eq!(
            saved(&path).map(|u| u.cloud_requests),
            Some(52),
            "flushed at stop"
        );

        let again = LocalRouter::new(Arc::new(PolicyStore::ephemeral()), None);
        again.persist_usage(path).expect("reads");
        assert_eq!(again.cloud_usage_today().0, 52, "kept across a restart");
    }
}
