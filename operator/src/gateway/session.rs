//! One device's Sync stream: push desired state as deltas, take ACK/NACKs and progress.
//!
//! Each stream is its own task with a small outbound queue. A slow device only delays
//! itself: while its queue is full its task waits, and when it resumes it computes from the
//! latest snapshot, so intermediate states coalesce instead of piling up.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgewise_core::variant::DeviceFacts;
use edgewise_proto::convert::bounded;
use edgewise_proto::fleet::{
    Ack, AgentMessage, Assignment, GatewayMessage, Hello, ModelAssignment, PolicyUpdate,
    ResourceKind, StatusReport, agent_message, gateway_message,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

use super::Inner;
use super::auth::{DeviceClaims, Verified};
use super::desired::{DesiredModel, DeviceContext, desired_for};
use super::snapshot::{FleetSnapshot, Scope};

/// A queued outbound message. Boxed because tokio's channel allocates slots in blocks of 32
/// whatever the capacity, and an unboxed `Status` makes each block several KiB per stream.
pub(super) type Outbound = Box<Result<GatewayMessage, Status>>;

/// Most model statuses one report may carry.
const MAX_STATUS_MODELS: usize = 64;

/// What the device has for a model, as far as the gateway knows: the key of the last
/// assignment sent, or of the active install the device reported.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelKey {
    version: String,
    variant: String,
    /// SHA-256 of the artifact, or the reason no variant fits.
    digest_or_reason: String,
}

impl From<&DesiredModel> for ModelKey {
    fn from(d: &DesiredModel) -> Self {
        match &d.variant {
            Ok(v) => ModelKey {
                version: d.version.clone(),
                variant: v.name.clone(),
                digest_or_reason: v.artifact.sha256.clone(),
            },
            Err(reason) => ModelKey {
                version: d.version.clone(),
                variant: String::new(),
                digest_or_reason: reason.to_string(),
            },
        }
    }
}

pub(super) struct Session {
    gw: Arc<Inner>,
    device_id: String,
    labels: BTreeMap<String, String>,
    facts: DeviceFacts,
    out: mpsc::Sender<Outbound>,
    snapshot: Arc<FleetSnapshot>,
    desired: super::desired::Desired,
    /// Per model: what the device has or was last sent.
    known: BTreeMap<String, ModelKey>,
    /// Policy version the device runs.
    policy_running: Option<String>,
    /// Policy sent and not yet answered: (nonce, version).
    policy_in_flight: Option<(String, String)>,
    /// Last rejected policy version: never resent until the desired version changes.
    policy_rejected: Option<String>,
    assignment_in_flight: Option<String>,
    nonces: u64,
    /// The credential the device holds (as far as this stream knows).
    credential: Verified,
    /// When to send it a fresh one.
    refresh_at: tokio::time::Instant,
    auth_changes: watch::Receiver<u64>,
}

/// When a credential expiring at `exp` (Unix seconds) is due for refresh: once less than
/// half of `ttl` is left (at once if that is already so).
fn refresh_due(exp: u64, ttl: std::time::Duration) -> tokio::time::Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let due_unix = exp.saturating_sub(ttl.as_secs() / 2);
    tokio::time::Instant::now() + std::time::Duration::from_secs(due_unix.saturating_sub(now_unix))
}

impl Session {
    pub(super) fn new(
        gw: Arc<Inner>,
        credential: Verified,
        hello: &Hello,
        facts: DeviceFacts,
        out: mpsc::Sender<Outbound>,
        snapshot: Arc<FleetSnapshot>,
    ) -> Self {
        let claims: &DeviceClaims = &credential.claims;
        let mut labels = claims.targeting_labels();
        labels.insert(crate::crd::names::label::OS.into(), facts.os.clone());
        labels.insert(crate::crd::names::label::ARCH.into(), facts.arch.clone());
        let known = hello
            .installed
            .iter()
            .filter(|m| m.active)
            .map(|m| {
                (
                    m.model.clone(),
                    ModelKey {
                        version: m.version.clone(),
                        variant: m.variant.clone(),
                        digest_or_reason: m.sha256.clone(),
                    },
                )
            })
            .collect();
        let policy_running = Some(hello.policy_version.clone()).filter(|v| !v.is_empty());
        let desired = desired_for(
            &snapshot,
            DeviceContext {
                device_id: &claims.sub,
                labels: &labels,
                facts: &facts,
            },
        );
        let refresh_at = refresh_due(claims.exp, gw.auth.ttl());
        let mut auth_changes = gw.auth.changes();
        auth_changes.mark_unchanged();
        let device_id = claims.sub.clone();
        Session {
            gw,
            device_id,
            labels,
            facts,
            out,
            snapshot,
            desired,
            known,
            policy_running,
            policy_in_flight: None,
            policy_rejected: None,
            assignment_in_flight: None,
            nonces: 0,
            credential,
            refresh_at,
            auth_changes,
        }
    }

    pub(super) fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Runs until the device hangs up, the stream breaks or the gateway shuts down.
    pub(super) async fn run(
        mut self,
        mut inbound: Streaming<AgentMessage>,
        mut snapshots: watch::Receiver<Arc<FleetSnapshot>>,
        shutdown: tokio_util::sync::CancellationToken,
        (number, replaced): (u64, tokio_util::sync::CancellationToken),
    ) {
        loop {
            // Boxed: pushing awaits presigning, whose future is large; inline it would sit
            // in every idle stream's task.
            if Box::pin(self.push()).await.is_err() {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = replaced.cancelled() => {
                    let _ = self
                        .out
                        .send(Box::new(Err(Status::aborted(
                            "a newer Sync stream of this device replaced this one",
                        ))))
                        .await;
                    break;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Err(status) = self.handle(m) {
                            warn!(device = %self.device_id, error = %status.message(), "rejecting Sync message");
                            let _ = self.out.send(Box::new(Err(status))).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    // A message that does not decode or is too large is the device's fault:
                    // the stream ends with that status (not a silent OK), logged at warn.
                    Err(status) if matches!(
                        status.code(),
                        Code::Internal | Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
                    ) => {
                        warn!(device = %self.device_id, code = ?status.code(), error = %status.message(), "ending a Sync stream on a bad message");
                        let _ = self.out.send(Box::new(Err(status))).await;
                        break;
                    }
                    Err(status) => {
                        debug!(device = %self.device_id, error = %status, "Sync stream ended");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let next = snapshots.borrow_and_update().clone();
                    self.observe(next);
                }
                () = tokio::time::sleep_until(self.refresh_at) => {
                    if self.refresh_credential().await.is_err() {
                        break;
                    }
                }
                Ok(()) = self.auth_changes.changed() => {
                    if self.credentials_changed().await.is_err() {
                        break;
                    }
                }
            }
        }
        if self.gw.close_stream(&self.device_id, number) {
            self.gw.registry.disconnected(&self.device_id);
            self.gw.publish_status(&self.device_id);
        }
    }

    /// Takes a new snapshot; recomputes only if one of the changes since the last one
    /// touches this device.
    fn observe(&mut self, next: Arc<FleetSnapshot>) {
        let affected = match next.changes_since(self.snapshot.epoch()) {
            None => true,
            Some(mut scopes) => scopes.any(|scope| match scope {
                Scope::Selectors(selectors) => selectors.iter().any(|s| s.matches(&self.labels)),
                Scope::Model(model) => {
                    self.desired.models.contains_key(model)
                        || next.has_rollout_for(model, &self.labels)
                }
            }),
        };
        self.snapshot = next;
        if affected {
            self.desired = desired_for(
                &self.snapshot,
                DeviceContext {
                    device_id: &self.device_id,
                    labels: &self.labels,
                    facts: &self.facts,
                },
            );
        }
    }

    fn nonce(&mut self) -> String {
        self.nonces += 1;
        format!("{}-{}", self.snapshot.epoch(), self.nonces)
    }

    /// Sends what differs between the desired state and what the device has.
    async fn push(&mut self) -> Result<(), ()> {
        let mut changed = Vec::new();
        for (model, desired) in &self.desired.models {
            let key = ModelKey::from(desired);
            if self.known.get(model) != Some(&key) {
                changed.push((model.clone(), desired.clone(), key));
            }
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|m| !self.desired.models.contains_key(*m))
            .cloned()
            .collect();
        if !changed.is_empty() || !removed.is_empty() {
            let mut models = Vec::with_capacity(changed.len());
            for (model, desired, key) in changed {
                models.push(self.assignment(&model, &desired).await);
                self.known.insert(model, key);
            }
            for model in &removed {
                self.known.remove(model);
            }
            let nonce = self.nonce();
            self.assignment_in_flight = Some(nonce.clone());
            let message = Assignment {
                nonce,
                version: self.assignment_version(),
                models,
                removed_models: removed,
            };
            self.send(gateway_message::Kind::Assignment(message))
                .await?;
        }
        if let Some(policy) = self.desired.policy.clone() {
            let version = policy.entry.version.clone();
            let wanted = self.policy_running.as_deref() != Some(&version)
                && self.policy_rejected.as_deref() != Some(&version)
                && self.policy_in_flight.as_ref().map(|(_, v)| v.as_str()) != Some(&version);
            if wanted {
                let nonce = self.nonce();
                let update = PolicyUpdate {
                    nonce: nonce.clone(),
                    version: version.clone(),
                    source: policy.source.clone(),
                    spec_json: policy.entry.spec_json.to_vec(),
                };
                self.policy_in_flight = Some((nonce, version));
                self.send(gateway_message::Kind::Policy(update)).await?;
            }
        }
        Ok(())
    }

    /// Sends the device a fresh credential; a revoked device's stream ends, refused.
    async fn refresh_credential(&mut self) -> Result<(), ()> {
        match self.gw.auth.reissue(&self.credential.claims) {
            Ok((token, claims)) => {
                let expires_at_unix_ms = i64::try_from(claims.exp)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000);
                self.refresh_at = refresh_due(claims.exp, self.gw.auth.ttl());
                self.credential = Verified {
                    claims,
                    kid: self.gw.auth.keys().signing_kid().to_owned(),
                };
                debug!(device = %self.device_id, kid = %self.credential.kid, "sending a fresh credential");
                self.send(gateway_message::Kind::Credential(
                    edgewise_proto::fleet::CredentialRefresh {
                        credential: token,
                        expires_at_unix_ms,
                    },
                ))
                .await
            }
            Err(refused) => {
                let _ = self.out.send(Box::new(Err(refused))).await;
                Err(())
            }
        }
    }

    /// Keys or revocations changed: a revoked device is cut off now; one holding a
    /// credential from a key that no longer signs gets a fresh one soon, spread over up to
    /// a minute (a tenth of the ttl at most) so a fleet does not refresh in one instant.
    async fn credentials_changed(&mut self) -> Result<(), ()> {
        let claims = &self.credential.claims;
        if self.gw.auth.is_revoked(&claims.sub, &claims.tok) {
            let _ = self
                .out
                .send(Box::new(Err(Status::unauthenticated("credential revoked"))))
                .await;
            return Err(());
        }
        if self.gw.auth.keys().signing_kid() != self.credential.kid {
            let spread = (self.gw.auth.ttl() / 10).min(std::time::Duration::from_secs(60));
            let delay = spread.mul_f64(rand::random::<f64>());
            self.refresh_at = self.refresh_at.min(tokio::time::Instant::now() + delay);
        }
        Ok(())
    }

    async fn send(&self, kind: gateway_message::Kind) -> Result<(), ()> {
        self.out
            .send(Box::new(Ok(GatewayMessage { kind: Some(kind) })))
            .await
            .map_err(|_| ())
    }

    /// Content hash of the full desired model set after this delta.
    fn assignment_version(&self) -> String {
        let mut h = Sha256::new();
        for (model, key) in &self.known {
            h.update(model.as_bytes());
            h.update([0]);
            h.update(key.version.as_bytes());
            h.update([0]);
            h.update(key.digest_or_reason.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..8])
    }

    async fn assignment(&self, model: &str, desired: &DesiredModel) -> ModelAssignment {
        let mut a = ModelAssignment {
            model: model.to_owned(),
            version: desired.version.clone(),
            rollout: desired.rollout.clone(),
            canary: desired.canary,
            ..ModelAssignment::default()
        };
        match &desired.variant {
            Ok(v) => {
                a.variant = v.name.clone();
                a.format = v.format.as_str().to_owned();
                a.sha256 = v.artifact.sha256.clone();
                a.size_bytes = v.artifact.size_bytes;
                a.signature = v.artifact.signature.clone().unwrap_or_default();
                match self.gw.presigner.url(&v.artifact).await {
                    Ok(url) => {
                        a.url = url.url;
                        a.url_expires_at_unix_ms = url.expires_at_unix_ms;
                    }
                    Err(e) => {
                        warn!(device = %self.device_id, %model, error = %e, "cannot presign artifact");
                        a.unsupported_reason = format!("artifact unavailable: {e}");
                    }
                }
            }
            Err(reason) => a.unsupported_reason = reason.to_string(),
        }
        a
    }

    fn handle(&mut self, msg: AgentMessage) -> Result<(), Status> {
        match msg.kind {
            None => Err(Status::invalid_argument("AgentMessage.kind is required")),
            Some(agent_message::Kind::Hello(_)) => Err(Status::invalid_argument(
                "Hello may only be the first message of a Sync stream",
            )),
            Some(agent_message::Kind::Ack(ack)) => self.ack(ack),
            Some(agent_message::Kind::Status(report)) => self.status(report),
        }
    }

    fn ack(&mut self, ack: Ack) -> Result<(), Status> {
        bounded("ack.nonce", &ack.nonce).map_err(|e| Status::invalid_argument(e.to_string()))?;
        bounded("ack.version", &ack.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if ack.error.len() > 16 * 1024 {
            return Err(Status::invalid_argument("ack.error is longer than 16 KiB"));
        }
        match ResourceKind::try_from(ack.kind) {
            Ok(ResourceKind::Policy) => {
                let Some((nonce, sent)) = self.policy_in_flight.clone() else {
                    return Ok(()); // stale: nothing in flight
                };
                if nonce != ack.nonce {
                    return Ok(()); // stale: an older update, superseded
                }
                self.policy_in_flight = None;
                if ack.error.is_empty() {
                    if ack.version != sent {
                        return Err(Status::invalid_argument(format!(
                            "ack.version {:?} is not the version {sent:?} sent with nonce {nonce:?}",
                            ack.version
                        )));
                    }
                    self.policy_running = Some(sent);
                    self.gw
                        .registry
                        .policy_answer(&self.device_id, &ack.version, None);
                } else {
                    warn!(device = %self.device_id, version = %sent, reason = %ack.error, "policy NACKed");
                    self.policy_running = Some(ack.version.clone()).filter(|v| !v.is_empty());
                    self.policy_rejected = Some(sent.clone());
                    self.gw.registry.policy_answer(
                        &self.device_id,
                        &ack.version,
                        Some((sent, ack.error)),
                    );
                }
                Ok(())
            }
            Ok(ResourceKind::Assignment) => {
                if self.assignment_in_flight.as_deref() == Some(ack.nonce.as_str()) {
                    self.assignment_in_flight = None;
                    if !ack.error.is_empty() {
                        warn!(device = %self.device_id, reason = %ack.error, "assignment NACKed");
                    }
                }
                Ok(())
            }
            Ok(ResourceKind::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
                "ack.kind {} is not ASSIGNMENT or POLICY",
                ack.kind
            ))),
        }
    }

    fn status(&mut self, report: StatusReport) -> Result<(), Status> {
        if report.models.len() > MAX_STATUS_MODELS {
            return Err(Status::invalid_argument(format!(
                "status.models has {} entries; at most {MAX_STATUS_MODELS}",
                report.models.len()
            )));
        }
        for m in &report.models {
            for (field, value) in [
                ("status.models[].model", &m.model),
                ("status.models[].version", &m.version),
                ("status.models[].variant", &m.variant),
            ] {
                bounded(field, value).map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            if m.error.len() > 16 * 1024 {
                return Err(Status::invalid_argument(
                    "status.models[].error is longer than 16 KiB",
                ));
            }
        }
        let activated = report
            .models
            .iter()
            .any(|m| m.state() == edgewise_proto::fleet::ModelState::Active);
        self.gw.registry.status(&self.device_id, report.models);
        if activated {
            self.gw.publish_status(&self.device_id);
        }
        Ok(())
    }
}
