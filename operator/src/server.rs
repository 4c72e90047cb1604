//! `edgewise-operator run | controller | gateway`: the production process, against the
//! cluster of the current kubeconfig or the in-cluster config. `run` is both roles in one
//! process. The controller role campaigns for a Lease and reconciles only while it leads;
//! the gateway role serves devices from reflected desired state and writes telemetry.
//! SIGTERM or Ctrl-C: stop accepting, end streams, drain for a bounded grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span};

use crate::controller::leader::{LeaseConfig, campaign};
use crate::gateway::{Gateway, GatewayConfig};
use crate::s3::S3Settings;
use crate::shutdown::Tasks;
use crate::telemetry::ingest::{SinkConfig, TelemetrySink};

/// Which parts run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Controllers and gateway.
    All,
    /// Controllers only.
    Controller,
    /// Gateway only.
    Gateway,
}

/// Flags of `run`, `controller` and `gateway`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Namespace of the Lease and the bootstrap-token Secrets.
    #[arg(long, env = "EDGEWISE_NAMESPACE", default_value = "edgewise")]
    pub namespace: String,
    /// gRPC listen address for devices.
    #[arg(long, env = "EDGEWISE_GATEWAY_ADDR", default_value = "0.0.0.0:7443")]
    pub gateway_addr: SocketAddr,
    /// PEM certificate chain the gateway serves TLS with (re-read when it changes, as a
    /// cert-manager Secret mount does). Without it the gateway speaks cleartext.
    #[arg(long, env = "EDGEWISE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file`.
    #[arg(long, env = "EDGEWISE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// How often the certificate and key files are checked for a change.
    #[arg(long, env = "EDGEWISE_TLS_RELOAD_SECS", default_value_t = 10)]
    pub tls_reload_secs: u64,
    /// Health (`/healthz`, `/readyz`) listen address.
    #[arg(long, env = "EDGEWISE_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Directory of the keys that sign device credentials (a mounted Secret: `<name>.key`
    /// files, base64 Ed25519 seeds, and `active` naming the signer when there are several);
    /// re-read every 10 s, so a rotation needs no restart. The same on every replica.
    #[arg(long, env = "EDGEWISE_CREDENTIAL_KEYS_DIR")]
    pub credential_keys_dir: Option<PathBuf>,
    /// Secret the controller creates, with one fresh key, when it does not exist: the
    /// gateways' `--credential-keys-dir` (made in the cluster, so no install tool has to
    /// generate or keep it).
    #[arg(long, env = "EDGEWISE_CREDENTIAL_KEYS_SECRET")]
    pub credential_keys_secret: Option<String>,
    /// How long a device credential is valid; devices connected over Sync get a fresh one
    /// when less than half is left.
    #[arg(long, env = "EDGEWISE_CREDENTIAL_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub credential_ttl: Duration,
    /// ClickHouse HTTP URL.
    #[arg(
        long,
        env = "EDGEWISE_CLICKHOUSE_URL",
        default_value = "http://clickhouse:8123"
    )]
    pub clickhouse_url: String,
    /// ClickHouse user.
    #[arg(long, env = "EDGEWISE_CLICKHOUSE_USER", default_value = "default")]
    pub clickhouse_user: String,
    /// ClickHouse password.
    #[arg(
        long,
        env = "EDGEWISE_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub clickhouse_password: String,
    /// Object store.
    #[command(flatten)]
    pub s3: S3Settings,
    /// This replica's identity (Lease holder, telemetry tag); defaults to the host name.
    #[arg(long, env = "HOSTNAME", default_value = "edgewise-operator")]
    pub identity: String,
    /// Longest a shutdown waits for work in flight.
    #[arg(long, env = "EDGEWISE_GRACE_PERIOD_SECS", default_value_t = 20)]
    pub grace_period_secs: u64,
}

/// Why the process could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kubernetes configuration.
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The credential keys.
    #[error("credential keys: {0}")]
    CredentialKeys(String),
    /// Binding a port.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Migrations.
    #[error(transparent)]
    Migrate(#[from] crate::telemetry::schema::Error),
}

/// Health, and the gateway's public credential keys (`/.well-known/jwks.json`, once the
/// gateway runs) for whoever verifies devices: other services, a company's cloud gateway.
async fn health(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    gateway: Arc<std::sync::OnceLock<Gateway>>,
    shutdown: CancellationToken,
    tasks: &Tasks,
) -> Result<(), Error> {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let gateway = gateway.clone();
                async move {
                    use axum::response::IntoResponse;
                    match gateway.get() {
                        Some(g) => axum::Json(g.auth().keys().jwks()).into_response(),
                        None => {
                            (StatusCode::NOT_FOUND, "no gateway in this process").into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Bind(addr, e))?;
    tasks.spawn(info_span!("health", %addr), async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

/// Creates the credential key Secret `name`, with one fresh key named by today's date,
/// unless it exists (any replica may; the loser of a race finds it made).
///
/// # Errors
/// The API refused to read or create it.
pub async fn ensure_credential_keys(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let seed: [u8; 32] = rand::random();
    let entry = format!(
        "{}{}",
        jiff::Timestamp::now().strftime("%Y-%m-%d"),
        crate::gateway::keys::KEY_SUFFIX
    );
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "edgewise".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(
            [(
                entry,
                k8s_openapi::ByteString(
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, seed)
                        .into_bytes(),
                ),
            )]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %name, "created the credential key Secret");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `role` until `shutdown`.
///
/// # Errors
/// [`Error`] when the process cannot start.
pub async fn run(role: Role, opts: RunOptions, shutdown: CancellationToken) -> Result<(), Error> {
    let client = Client::try_default().await?;
    let ready = Arc::new(AtomicBool::new(false));
    let tasks = Tasks::new();
    let published = Arc::new(std::sync::OnceLock::new());
    health(
        opts.health_addr,
        ready.clone(),
        published.clone(),
        shutdown.clone(),
        &tasks,
    )
    .await?;
    let ch = crate::telemetry::client(&opts.clickhouse_url)
        .with_user(opts.clickhouse_user.clone())
        .with_password(opts.clickhouse_password.clone());
    let report = crate::telemetry::schema::migrate(&ch).await?;
    info!(server = %report.server, applied = ?report.applied, "ClickHouse schema up to date");
    let s3 = opts.s3.client();
    let meter = crate::observability::meter();
    let mut instruments = crate::observability::Instruments::default();

    let gateway = if role != Role::Controller {
        let keys_dir = opts.credential_keys_dir.clone().ok_or_else(|| {
            Error::CredentialKeys(
                "--credential-keys-dir is required for the gateway: every replica must share its keys".into(),
            )
        })?;
        let keys = crate::gateway::keys::load_dir(&keys_dir).map_err(Error::CredentialKeys)?;
        let sink = TelemetrySink::start(
            ch.clone(),
            SinkConfig {
                gateway: opts.identity.clone(),
                ..SinkConfig::default()
            },
        );
        instruments.telemetry(&meter, &sink);
        let gateway = Gateway::new(
            GatewayConfig {
                credential_keys: keys,
                credential_ttl: opts.credential_ttl,
                name: opts.identity.clone(),
                tls: opts
                    .tls_cert_file
                    .clone()
                    .zip(opts.tls_key_file.clone())
                    .map(|(cert, key)| crate::gateway::tls::TlsFiles {
                        cert,
                        key,
                        reload_every: Duration::from_secs(opts.tls_reload_secs.max(1)),
                    }),
                enroll_limits: Some(crate::gateway::limits::EnrolRates::default()),
                ..GatewayConfig::default()
            },
            s3.clone(),
        )
        .with_telemetry(sink)
        .with_enrolment_ledger(crate::gateway::enrolled::EnrolmentLedger::Cluster(
            Box::new(kube::Api::namespaced(client.clone(), &opts.namespace)),
        ));
        instruments.gateway(&meter, &gateway);
        tasks.spawn(
            info_span!("feed_gateway"),
            crate::controller::feed_gateway(client.clone(), gateway.clone(), shutdown.clone()),
        );
        let auth = gateway.clone();
        tasks.spawn(
            info_span!("credential_keys", dir = %keys_dir.display()),
            crate::gateway::keys::watch_dir(
                keys_dir,
                Duration::from_secs(10),
                move |ring| auth.auth().set_keys(ring),
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            info_span!("bootstrap_tokens", namespace = %opts.namespace),
            crate::gateway::trust::follow_tokens(
                client.clone(),
                opts.namespace.clone(),
                gateway.clone(),
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            info_span!("revocations", namespace = %opts.namespace),
            crate::gateway::trust::follow_revocations(
                client.clone(),
                opts.namespace.clone(),
                gateway.clone(),
                shutdown.clone(),
            ),
        );
        let (addr, task) = gateway
            .spawn(opts.gateway_addr, shutdown.clone())
            .await
            .map_err(|e| Error::Bind(opts.gateway_addr, e))?;
        info!(%addr, "gateway listening");
        tasks.track(task);
        let _ = published.set(gateway.clone());
        Some(gateway)
    } else {
        None
    };

    if role != Role::Gateway {
        if let Some(name) = &opts.credential_keys_secret {
            ensure_credential_keys(&client, &opts.namespace, name).await?;
        }
        let leading = campaign(
            client.clone(),
            LeaseConfig {
                namespace: opts.namespace.clone(),
                name: "edgewise-controller".into(),
                identity: opts.identity.clone(),
                duration: Duration::from_secs(15),
                renew: Duration::from_secs(5),
                wall_clock: jiff::Timestamp::now,
            },
            shutdown.clone(),
        );
        let ctx = Arc::new(crate::controller::Context::new(
            client.clone(),
            s3.clone(),
            Some(ch.clone()),
            gateway.clone(),
            Some(opts.identity.clone()),
        ));
        tasks.spawn(
            info_span!("leader", identity = %opts.identity),
            lead(leading, ctx, shutdown.clone()),
        );
    }
    ready.store(true, Ordering::Relaxed);
    shutdown.cancelled().await;
    info!(grace = opts.grace_period_secs, "shutting down");
    // Streams end at once (devices reconnect elsewhere); the controllers finish the
    // reconciles in flight and the servers their requests, within the grace period.
    tasks
        .drain(Duration::from_secs(opts.grace_period_secs))
        .await;
    drop(instruments);
    Ok(())
}

/// Runs the controllers while this replica leads; stops them the moment it does not.
async fn lead(
    mut leading: tokio::sync::watch::Receiver<bool>,
    ctx: Arc<crate::controller::Context>,
    shutdown: CancellationToken,
) {
    loop {
        while !*leading.borrow_and_update() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
        }
        info!("leading: starting controllers");
        let term = shutdown.child_token();
        let controllers = tokio::spawn(crate::controller::run(ctx.clone(), term.clone()));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => { term.cancel(); let _ = controllers.await; return; }
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow() {
                        info!("lost leadership: stopping controllers");
                        term.cancel();
                        let _ = controllers.await;
                        break;
                    }
                }
            }
        }
    }
}
