//! The Sync client: enroll when needed, keep one Sync stream open, apply what the gateway
//! sends (ACK or NACK each update), report progress, and reconnect with exponential backoff
//! and full jitter so a fleet reconnecting at once spreads out instead of stampeding.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgewise_proto::fleet::fleet_client::FleetClient;
use edgewise_proto::fleet::{
    Ack, AgentMessage, Assignment, GatewayMessage, Hello, ModelAssignment, PolicyUpdate,
    ResourceKind, StatusReport, agent_message, gateway_message,
};
use tokio::sync::mpsc;
use tokio_retry2::strategy::{ExponentialFactorBackoff, jitter_with_bounds};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::config::Backoff;
use crate::device::{Connection, Device, Nack};

/// A session that lasted this long was healthy: the next failure starts backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// How a session ended.
enum End {
    Shutdown,
    Closed,
    Refresh,
}

/// An infinite iterator of reconnect delays: full jitter over an exponential ceiling.
pub fn delays(backoff: Backoff) -> impl Iterator<Item = Duration> {
    let initial = u64::try_from(backoff.initial.as_millis()).unwrap_or(u64::MAX);
    ExponentialFactorBackoff::from_millis(initial, 2.0)
        .max_delay(backoff.max)
        .map(jitter_with_bounds(0.0, 1.0))
}

/// Runs until `shutdown`.
#[tracing::instrument(name = "sync", skip_all, fields(device = %device.device_id))]
pub async fn run(device: Arc<Device>, channel: Channel, shutdown: CancellationToken) {
    let mut backoff = delays(device.backoff);
    // Failures in a row: the first is a warning, retries are logged at 1, 2, 4, 8… so an
    // agent offline for a day says so without filling its log.
    let mut failures = 0u32;
    loop {
        device.stats.sync_attempts.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let outcome = session(&device, channel.clone(), &shutdown).await;
        if *device.connection.borrow() == Connection::Connected {
            failures = 0;
        }
        device.set_connection(Connection::Connecting);
        let hint = match outcome {
            Ok(End::Shutdown) => return,
            Ok(End::Refresh) => {
                debug!("reconnecting for fresh assignments");
                None
            }
            Ok(End::Closed) => {
                info!("the gateway closed the Sync stream; reconnecting");
                None
            }
            Err(status) => {
                failures += 1;
                let hint = edgewise_proto::retry::retry_after(&status);
                match status.code() {
                    Code::Unauthenticated => {
                        // Signed by a key the gateway no longer has, revoked, or a token it
                        // no longer knows: enrol again with the token file as it is now.
                        warn!(reason = %status.message(), "credential or bootstrap token refused; re-enrolling with the token file");
                        let mut id = device
                            .identity
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if let Err(e) = id.clear_credential() {
                            warn!(error = %e, "clearing credential");
                        }
                    }
                    Code::Unavailable if hint.is_none() => {
                        // Only the control plane is out of reach: routing goes on unchanged
                        // with the last good policy (network is the targets' reachability).
                        device.set_connection(Connection::Offline);
                        if failures == 1 {
                            warn!(reason = %status.message(), "gateway unreachable; routing goes on with the last good policy, reconnecting with backoff");
                        }
                    }
                    _ if failures == 1 => {
                        warn!(code = ?status.code(), reason = %status.message(), "Sync failed; reconnecting with backoff");
                    }
                    _ => debug!(code = ?status.code(), reason = %status.message(), "Sync failed"),
                }
                hint
            }
        };
        if started.elapsed() > HEALTHY_SESSION {
            backoff = delays(device.backoff);
        }
        let jittered = backoff.next().unwrap_or(device.backoff.max);
        let delay = hint.map_or(jittered, |h| h.max(jittered));
        if failures > 1 && failures.is_power_of_two() {
            info!(
                failures,
                delay_ms = delay.as_millis() as u64,
                "still not connected; retrying"
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn bearer(token: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, Status> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::internal("credential is not valid metadata"))
}

async fn credential(device: &Device, client: &mut FleetClient<Channel>) -> Result<String, Status> {
    let request = {
        let id = device
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = id.credential() {
            return Ok(c.token.clone());
        }
        // Read again at every enrolment: a rotated token is picked up from its file.
        let token = device
            .bootstrap_token
            .read()
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        id.enroll_request(&token, &device.facts, &device.labels)
    };
    let response = client.enroll(request).await?.into_inner();
    let token = response.credential.clone();
    info!(device = %response.device_id, "enrolled");
    device
        .identity
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .set_credential(response)
        .map_err(|e| Status::internal(format!("saving credential: {e}")))?;
    Ok(token)
}

async fn session(
    device: &Device,
    channel: Channel,
    shutdown: &CancellationToken,
) -> Result<End, Status> {
    let mut client = FleetClient::new(channel);
    let token = credential(device, &mut client).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let hello = Hello {
        device_id: device.device_id.clone(),
        agent_version: device.facts.agent_version.to_string(),
        facts: Some((&device.facts).into()),
        installed: device.installed(),
        policy_version: device.policy.version().unwrap_or_default(),
        assignment_version: String::new(),
    };
    send(&tx, agent_message::Kind::Hello(hello)).await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", bearer(&token)?);
    debug!("opening Sync stream");
    let mut inbound = client.sync(request).await?.into_inner();
    info!("connected to the gateway");
    device.set_connection(Connection::Connected);
    let mut changes = device.board.subscribe();
    device.board.mark_all_changed();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(End::Shutdown),
            () = device.refresh.notified() => return Ok(End::Refresh),
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(End::Shutdown);
                }
                let models = device.board.take_changed();
                if !models.is_empty() {
                    send(&tx, agent_message::Kind::Status(StatusReport { models })).await?;
                }
            }
            msg = inbound.message() => match msg? {
                Some(GatewayMessage { kind: Some(kind) }) => {
                    let now = crate::telemetry::clock::now_unix_ms();
                    device.activity.send_modify(|a| a.last_sync_unix_ms = Some(now));
                    if let Some(ack) = handle(device, kind) {
                        send(&tx, agent_message::Kind::Ack(ack)).await?;
                    }
                }
                Some(GatewayMessage { kind: None }) => {}
                None => return Ok(End::Closed),
            },
        }
    }
}

async fn send(tx: &mpsc::Sender<AgentMessage>, kind: agent_message::Kind) -> Result<(), Status> {
    tx.send(AgentMessage { kind: Some(kind) })
        .await
        .map_err(|_| Status::unavailable("Sync stream closed"))
}

/// Applies a gateway message; what is applied is acknowledged (a credential is not).
fn handle(device: &Device, kind: gateway_message::Kind) -> Option<Ack> {
    match kind {
        gateway_message::Kind::Assignment(a) => Some(assignment(device, a)),
        gateway_message::Kind::Policy(p) => Some(policy(device, &p)),
        gateway_message::Kind::Credential(fresh) => {
            // Used from the next call on; a failed write keeps the old one on disk (the
            // gateway sends another before it runs out).
            let mut id = device
                .identity
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match id.refresh_credential(fresh.credential, fresh.expires_at_unix_ms) {
                Ok(()) => debug!(
                    expires_at_unix_ms = fresh.expires_at_unix_ms,
                    "credential refreshed"
                ),
                Err(e) => warn!(error = %e, "storing the refreshed credential"),
            }
            None
        }
    }
}

fn assignment(device: &Device, a: Assignment) -> Ack {
    let mut ack = Ack {
        kind: ResourceKind::Assignment as i32,
        nonce: a.nonce.clone(),
        version: a.version.clone(),
        error: String::new(),
    };
    if let Err(reason) = a.models.iter().try_for_each(validate_assignment) {
        warn!(%reason, "assignment NACKed");
        ack.error = reason.to_string();
        record_nack(device, "assignment", &a.version, &ack.error);
        return ack;
    }
    device
        .desired
        .send_modify(|desired: &mut BTreeMap<String, ModelAssignment>| {
            for m in &a.removed_models {
                desired.remove(m);
            }
            for m in a.models {
                desired.insert(m.model.clone(), m);
            }
        });
    ack
}

/// Why an assignment was NACKed; its text is the NACK reason.
#[derive(Debug, thiserror::Error)]
enum BadAssignment {
    #[error("models[].model and models[].version are required")]
    Unnamed,
    #[error("{0}: url is not http(s)")]
    Url(String),
    #[error("{0}: sha256 is not 64 lowercase hex digits")]
    Sha256(String),
    #[error("{0}: size_bytes is 0")]
    Empty(String),
}

fn validate_assignment(m: &ModelAssignment) -> Result<(), BadAssignment> {
    if m.model.is_empty() || m.version.is_empty() {
        return Err(BadAssignment::Unnamed);
    }
    if !m.unsupported_reason.is_empty() {
        return Ok(());
    }
    if !(m.url.starts_with("http://") || m.url.starts_with("https://")) {
        return Err(BadAssignment::Url(m.model.clone()));
    }
    if m.sha256.len() != 64
        || !m
            .sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(BadAssignment::Sha256(m.model.clone()));
    }
    if m.size_bytes == 0 {
        return Err(BadAssignment::Empty(m.model.clone()));
    }
    Ok(())
}

/// Keeps the last refusal for `status`.
fn record_nack(device: &Device, kind: &str, version: &str, reason: &str) {
    let nack = Nack {
        kind: kind.to_owned(),
        version: version.to_owned(),
        reason: reason.to_owned(),
        at_unix_ms: crate::telemetry::clock::now_unix_ms(),
    };
    device.activity.send_modify(|a| a.last_nack = Some(nack));
}

fn policy(device: &Device, p: &PolicyUpdate) -> Ack {
    let mut ack = Ack {
        kind: ResourceKind::Policy as i32,
        nonce: p.nonce.clone(),
        version: p.version.clone(),
        error: String::new(),
    };
    match device.policy.apply(p) {
        Ok(()) => {
            device
                .stats
                .policies_applied
                .fetch_add(1, Ordering::Relaxed);
            info!(version = %p.version, source = %p.source, "routing policy applied");
            let now = crate::telemetry::clock::now_unix_ms();
            device
                .activity
                .send_modify(|a| a.policy_applied_unix_ms = Some(now));
        }
        Err(reason) => {
            device
                .stats
                .policies_rejected
                .fetch_add(1, Ordering::Relaxed);
            warn!(version = %p.version, %reason, "routing policy NACKed; keeping the last good one");
            ack.version = device.policy.version().unwrap_or_default();
            ack.error = reason.to_string();
            record_nack(device, "policy", &p.version, &ack.error);
        }
    }
    ack
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceParts;

    fn device(dir: &std::path::Path) -> Arc<Device> {
        Device::new(DeviceParts {
            identity: crate::identity::Identity::ephemeral(),
            content: Arc::new(crate::store::ContentStore::open(dir, false).expect("store")),
            state: crate::store::ModelState::ephemeral(),
            policy: Arc::new(crate::policy::PolicyStore::ephemeral()),
            facts: edgewise_core::variant::DeviceFacts {
                os: "linux".into(),
                arch: "x86_64".into(),
                memory_mib: 1024,
                accelerators: Vec::new(),
                agent_version: edgewise_core::version::Version::new(1, 0, 0),
            },
            labels: BTreeMap::new(),
            publisher: None,
            bootstrap_token: "t".into(),
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(10),
            },
            collect_garbage: false,
            telemetry: None,
            runtime: None,
        })
    }

    #[test]
    fn a_policy_the_agent_cannot_use_is_nacked_recorded_and_the_last_good_one_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = device(dir.path());
        let spec = serde_json::json!({
            "targets": [{"name": "on-device", "device": {"model": "m"}}],
            "default": {"route": "on-device", "fallback": ["nowhere"]}
        });
        let update = PolicyUpdate {
            nonce: "n1".into(),
            version: "v-bad".into(),
            source: "fleet/p".into(),
            spec_json: serde_json::to_vec(&spec).expect("json"),
        };
        let ack = policy(&d, &update);
        assert!(ack.error.contains("nowhere"), "{}", ack.error);
        assert_eq!(ack.version, "", "no good policy yet: the NACK names none");
        let nack = d.activity.borrow().last_nack.clone().expect("recorded");
        assert_eq!(
            (nack.kind.as_str(), nack.version.as_str()),
            ("policy", "v-bad")
        );
        assert!(nack.reason.contains("nowhere"));
        assert_eq!(d.policy.version(), None);
    }

    #[test]
    fn delays_are_fully_jittered_below_a_growing_ceiling() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut firsts = Vec::new();
        for _ in 0..200 {
            let d: Vec<Duration> = delays(backoff).take(8).collect();
            for (i, delay) in d.iter().enumerate() {
                let ceiling = (100u64 << i).min(2_000);
                assert!(
                    *delay <= Duration::from_millis(ceiling),
                    "attempt {i}: {delay:?} > {ceiling} ms"
                );
            }
            firsts.push(d[0]);
        }
        // Full jitter: first delays cover most of [0, 100 ms), not a narrow band.
        let min = firsts.iter().min().copied().unwrap_or_default();
        let max = firsts.iter().max().copied().unwrap_or_default();
        assert!(
            min < Duration::from_millis(20) && max > Duration::from_millis(80),
            "{min:?}..{max:?}"
        );
    }
}
