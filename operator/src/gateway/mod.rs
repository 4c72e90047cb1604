//! The agent gateway: `edgewise.v1.Fleet` over gRPC.
//!
//! Stateless by design so N replicas can run behind one Service: credentials are signed,
//! cohorts are hashed, and the desired state comes from the custom resources (reflectors
//! in a cluster, [`Snapshots::apply`] in tests). What it learns about connected devices is
//! kept in [`Registry`] for the controllers.

pub mod auth;
pub mod desired;
pub mod enrolled;
pub mod keys;
pub mod limits;
pub mod presign;
pub mod registry;
mod session;
pub mod snapshot;
pub mod tls;
pub mod trust;
mod upload;

pub use upload::FleetRoutes;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgewise_core::variant::DeviceFacts;
use edgewise_proto::convert::required;
use edgewise_proto::fleet::fleet_server::{Fleet, FleetServer};
use edgewise_proto::fleet::{
    AgentMessage, EnrollRequest, EnrollResponse, GatewayMessage, TelemetryAck, TelemetryBatch,
    agent_message,
};
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

pub use auth::{Authority, BootstrapToken, DeviceClaims};
pub use registry::{DeviceRecord, Registry};
pub use snapshot::{Change, FleetSnapshot, Snapshots};

use crate::telemetry::ingest::TelemetrySink;
use crate::telemetry::rows::DeviceStatusRow;

impl Inner {
    /// Sends a device's current record to `device_status` (coalesced by the sink).
    fn publish_status(&self, device_id: &str) {
        let (Some(sink), Some(record)) = (&self.telemetry, self.registry.device(device_id)) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut installed: std::collections::BTreeMap<String, String> = record
            .installed
            .iter()
            .filter(|m| m.active)
            .map(|m| (m.model.clone(), m.version.clone()))
            .collect();
        for (model, status) in &record.models {
            if status.state() == edgewise_proto::fleet::ModelState::Active {
                installed.insert(model.clone(), status.version.clone());
            }
        }
        let facts = record.facts.clone();
        sink.device_status(DeviceStatusRow {
            device_id: record.device_id.clone(),
            updated_at: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            updated_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            connected: u8::from(record.connected),
            agent_version: facts
                .as_ref()
                .map(|f| f.agent_version.to_string())
                .unwrap_or_default(),
            os: facts.as_ref().map(|f| f.os.clone()).unwrap_or_default(),
            arch: facts.as_ref().map(|f| f.arch.clone()).unwrap_or_default(),
            memory_mib: facts.as_ref().map_or(0, |f| f.memory_mib),
            accelerators: facts.map(|f| f.accelerators).unwrap_or_default(),
            label_keys: record.labels.keys().cloned().collect(),
            label_values: record.labels.values().cloned().collect(),
            installed_models: installed.keys().cloned().collect(),
            installed_versions: installed.values().cloned().collect(),
            policy_version: record.policy.running.unwrap_or_default(),
            connects: record.connects,
            gateway: self.config.name.clone(),
        });
    }
}

use presign::Presigner;
use session::Session;

/// Why the gateway stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Its certificate or key.
    #[error("gateway TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The server.
    #[error("gateway server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Keys that sign and verify device credentials; every replica must hold the same ring
    /// (the default, one fresh key, suits a single process only).
    pub credential_keys: keys::KeyRing,
    /// How long a credential is valid; devices on a Sync stream get a fresh one when less
    /// than half of it is left.
    pub credential_ttl: Duration,
    /// How long a presigned artifact URL is valid.
    pub presign_ttl: Duration,
    /// Open Sync streams above this are refused with a retry hint.
    pub max_sessions: usize,
    /// How long a new stream may take to send Hello.
    pub hello_timeout: Duration,
    /// Outbound messages buffered per stream before the stream's task waits.
    pub stream_queue: usize,
    /// This replica's name, recorded with telemetry and device status.
    pub name: String,
    /// Serve TLS with this certificate and key (re-read when they change); `None` serves
    /// cleartext, for loopback and tests only.
    pub tls: Option<tls::TlsFiles>,
    /// Enrolment rate limits; `None` admits every enrolment (tests, the dev stack's
    /// simulated fleet). `edgewise-operator gateway` sets [`limits::EnrolRates::default`].
    pub enroll_limits: Option<limits::EnrolRates>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            credential_keys: keys::KeyRing::new(&rand::random(), &[]),
            credential_ttl: Duration::from_secs(7 * 24 * 3600),
            presign_ttl: Duration::from_secs(6 * 3600),
            max_sessions: 100_000,
            hello_timeout: Duration::from_secs(10),
            stream_queue: 4,
            name: "gateway".into(),
            tls: None,
            enroll_limits: None,
        }
    }
}

struct Inner {
    telemetry: Option<Arc<TelemetrySink>>,
    config: GatewayConfig,
    auth: Authority,
    snapshots: Snapshots,
    registry: Registry,
    presigner: Presigner,
    enroll_limits: Option<limits::EnrolLimits>,
    enrolments: enrolled::EnrolmentLedger,
    sessions: AtomicUsize,
    /// Each device's one open stream on this replica: its number and how to end it.
    streams: std::sync::Mutex<std::collections::HashMap<String, (u64, CancellationToken)>>,
    stream_numbers: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// Registers `device_id`'s new stream, ending the one it had open here (a device runs
    /// one agent, so the older stream is a dead connection or a copied identity): its
    /// number, and the token that ends it in turn.
    fn open_stream(&self, device_id: &str) -> (u64, CancellationToken) {
        let number = self.stream_numbers.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let old = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(device_id.to_owned(), (number, token.clone()));
        if let Some((_, old)) = old {
            debug!(device = %device_id, "a newer Sync stream replaces the open one");
            old.cancel();
        }
        (number, token)
    }

    /// Forgets stream `number` of `device_id`; whether it was still the device's stream
    /// (a replaced one leaves the device's state to its successor).
    fn close_stream(&self, device_id: &str, number: u64) -> bool {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if streams.get(device_id).is_some_and(|(n, _)| *n == number) {
            streams.remove(device_id);
            true
        } else {
            false
        }
    }
}

/// The gateway. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("sessions", &self.inner.sessions.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway presigning with `s3`.
    #[must_use]
    pub fn new(config: GatewayConfig, s3: aws_sdk_s3::Client) -> Self {
        let auth = Authority::new(config.credential_keys.clone(), config.credential_ttl);
        let enroll_limits = config.enroll_limits.map(limits::EnrolLimits::new);
        let presigner = Presigner::new(s3, config.presign_ttl);
        Gateway {
            inner: Arc::new(Inner {
                telemetry: None,
                config,
                auth,
                snapshots: Snapshots::default(),
                registry: Registry::default(),
                presigner,
                enroll_limits,
                enrolments: enrolled::EnrolmentLedger::default(),
                sessions: AtomicUsize::new(0),
                streams: std::sync::Mutex::default(),
                stream_numbers: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Sends telemetry and device status to `sink` (before serving).
    #[must_use]
    pub fn with_telemetry(mut self, sink: Arc<TelemetrySink>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.telemetry = Some(sink);
        }
        self
    }

    /// Counts capped tokens' devices in `ledger` (before serving); the default counts in
    /// this process, which holds for one replica only.
    #[must_use]
    pub fn with_enrolment_ledger(mut self, ledger: enrolled::EnrolmentLedger) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.enrolments = ledger;
        }
        self
    }

    /// The telemetry sink, if any.
    #[must_use]
    pub fn telemetry(&self) -> Option<&Arc<TelemetrySink>> {
        self.inner.telemetry.as_ref()
    }

    /// Enrollment and credentials.
    #[must_use]
    pub fn auth(&self) -> &Authority {
        &self.inner.auth
    }

    /// The desired state.
    #[must_use]
    pub fn snapshots(&self) -> &Snapshots {
        &self.inner.snapshots
    }

    /// What the gateway knows about devices.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Open Sync streams.
    #[must_use]
    pub fn sessions(&self) -> usize {
        self.inner.sessions.load(Ordering::Relaxed)
    }

    /// The tonic service, to mount on a server; its Sync streams end when `shutdown` fires.
    #[must_use]
    pub fn service(&self, shutdown: CancellationToken) -> FleetRoutes {
        FleetRoutes {
            fleet: FleetServer::new(FleetService {
                inner: self.inner.clone(),
                shutdown,
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
            inner: self.inner.clone(),
        }
    }

    /// Serves on `listener` until `shutdown`, over TLS when the config names a certificate;
    /// open streams end at once so agents reconnect elsewhere.
    ///
    /// # Errors
    /// When the certificate cannot be loaded, or the server fails.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let cert = self.certificate()?;
        self.serve_with(listener, cert, shutdown).await
    }

    /// The certificate the config names, loaded.
    fn certificate(&self) -> Result<Option<Arc<tls::ReloadingCert>>, tls::TlsError> {
        self.inner
            .config
            .tls
            .clone()
            .map(tls::ReloadingCert::load)
            .transpose()
    }

    async fn serve_with(
        &self,
        listener: TcpListener,
        cert: Option<Arc<tls::ReloadingCert>>,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let addr = listener.local_addr().ok();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(u32::MAX))
            .add_service(self.service(shutdown.clone()));
        let Some(cert) = cert else {
            if addr.is_some_and(|a| !a.ip().is_loopback()) {
                warn!(
                    ?addr,
                    "gateway serving cleartext beyond loopback: credentials and policy travel unencrypted (--tls-cert-file)"
                );
            } else {
                info!(?addr, "gateway serving edgewise.v1.Fleet (cleartext)");
            }
            // `Server::tcp_nodelay` applies only to listeners tonic binds itself; a listener
            // we bind must carry it, or Nagle meets delayed ACKs: ~40 ms on every unary reply.
            return server
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled_owned(),
                )
                .instrument(info_span!("gateway", ?addr))
                .await
                .map_err(ServeError::Transport);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cert.server_config()?));
        tokio::spawn(cert.watch(shutdown.clone()));
        info!(?addr, "gateway serving edgewise.v1.Fleet over TLS");
        server
            .serve_with_incoming_shutdown(
                tls::incoming(listener, acceptor, shutdown.clone()),
                shutdown.cancelled_owned(),
            )
            .instrument(info_span!("gateway", ?addr))
            .await
            .map_err(ServeError::Transport)
    }

    /// Binds `addr` and serves in a task; returns the bound address.
    ///
    /// # Errors
    /// When the certificate cannot be loaded or the address cannot be bound.
    pub async fn spawn(
        &self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let cert = self
            .certificate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let gw = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = gw.serve_with(listener, cert, shutdown).await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
        Ok((bound, task))
    }
}

/// Largest message a device may send (a full telemetry batch fits with room to spare).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The `Fleet` service implementation.
pub struct FleetService {
    inner: Arc<Inner>,
    shutdown: CancellationToken,
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<GatewayMessage, Status>> + Send>>;

/// Releases a session slot when the stream's task ends, however it ends.
struct SessionSlot(Arc<Inner>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let token_digest: [u8; 32] =
            <sha2::Sha256 as sha2::Digest>::digest(req.bootstrap_token.as_bytes()).into();
        let admitted = self
            .inner
            .enroll_limits
            .as_ref()
            .map_or(Ok(()), |l| l.admit(peer.map(|p| p.ip()), &token_digest));
        if let Err(wait) = admitted {
            debug!(peer = ?peer, wait_ms = wait.as_millis(), "enrolment rate-limited");
            return Err(edgewise_proto::retry::with_retry_after(
                Status::resource_exhausted(
                    "too many enrolments from this address or with this token; retry later",
                ),
                wait.max(Duration::from_millis(100)),
            ));
        }
        let enrolled = async {
            let admitted = self.inner.auth.admit(&req)?;
            if let Some(max) = admitted.token.max_devices {
                self.inner
                    .enrolments
                    .admit(&admitted.token.name, admitted.device_id(), max)
                    .await?;
            }
            self.inner.auth.issue(admitted)
        };
        let response = enrolled.await.inspect_err(|refused| {
            warn!(
                device = %req.device_id,
                peer = ?peer,
                code = ?refused.code(),
                reason = %refused.message(),
                "enrolment refused"
            );
        })?;
        info!(device = %response.device_id, "device enrolled");
        Ok(Response::new(response))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let verified = self
            .inner
            .auth
            .verify_signed(request.metadata())
            .inspect_err(|refused| {
                debug!(reason = %refused.message(), "Sync refused: credential");
            })?;
        let claims = verified.claims.clone();
        debug!(device = %claims.sub, "Sync requested");
        let open = self.inner.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = SessionSlot(self.inner.clone());
        if open > self.inner.config.max_sessions {
            return Err(edgewise_proto::retry::with_retry_after(
                Status::resource_exhausted(
                    "gateway is at its stream limit; retry later or elsewhere",
                ),
                Duration::from_secs(5),
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.inner.config.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within the hello timeout"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(agent_message::Kind::Hello(h)) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first Sync message must be Hello",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "the first Sync message must be Hello; got none",
                ));
            }
        };
        required("hello.device_id", &hello.device_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if hello.device_id != claims.sub {
            return Err(Status::permission_denied(format!(
                "hello.device_id {:?} is not the credential's device",
                hello.device_id
            )));
        }
        let facts_wire = hello
            .facts
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("hello.facts is required"))?;
        let facts = DeviceFacts::try_from(facts_wire)
            .map_err(|e| Status::invalid_argument(format!("hello.{e}")))?;
        edgewise_core::version::Version::parse(&hello.agent_version).map_err(|e| {
            Status::invalid_argument(format!(
                "hello.agent_version {:?} is not a semantic version: {e}",
                hello.agent_version
            ))
        })?;
        if hello.installed.len() > 256 {
            return Err(Status::invalid_argument(
                "hello.installed has more than 256 entries",
            ));
        }
        let (tx, rx) = mpsc::channel(self.inner.config.stream_queue.max(1));
        let snapshots = self.inner.snapshots.subscribe();
        let snapshot = snapshots.borrow().clone();
        let session = Session::new(
            self.inner.clone(),
            verified,
            &hello,
            facts.clone(),
            tx,
            snapshot,
        );
        let shutdown = self.shutdown.clone();
        let (number, replaced) = self.inner.open_stream(&claims.sub);
        self.inner.registry.connected(
            &claims.sub,
            session.labels().clone(),
            facts,
            hello.installed.clone(),
            Some(hello.policy_version.clone()).filter(|v| !v.is_empty()),
        );
        self.inner.publish_status(&claims.sub);
        let span = info_span!("sync", device = %claims.sub);
        tokio::spawn(
            async move {
                let _slot = slot;
                session
                    .run(inbound, snapshots, shutdown, (number, replaced))
                    .await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m: session::Outbound| *m),
        )))
    }

    async fn upload_telemetry(
        &self,
        request: Request<TelemetryBatch>,
    ) -> Result<Response<TelemetryAck>, Status> {
        // Served by `FleetRoutes` from the encoded bytes; this is the same path for a
        // `FleetServer` mounted on its own.
        upload::upload(
            &self.inner,
            request.map(|batch| prost::Message::encode_to_vec(&batch).into()),
        )
        .await
    }
}
