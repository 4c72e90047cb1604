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
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};

use crate::controller::leader::{LeaseConfig, campaign};
use crate::gateway::{BootstrapToken, Gateway, GatewayConfig};
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
    /// File with the credential signing key (≥ 32 bytes; the same on every gateway replica).
    #[arg(long, env = "EDGEWISE_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
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
    /// The signing key.
    #[error("signing key {path}: {message}")]
    SigningKey {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Binding a port.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Migrations.
    #[error(transparent)]
    Migrate(#[from] crate::telemetry::schema::Error),
}

/// Bootstrap tokens are Secrets labelled `edgewise.dev/bootstrap-token=true` with a `token`
/// key and, optionally, `labels` (YAML map) for the devices enrolled with it.
/// Label selector of the Secrets holding bootstrap tokens.
fn bootstrap_selector() -> String {
    format!("{}=true", crate::crd::names::label::BOOTSTRAP_TOKEN)
}

fn tokens_from(secrets: &[Secret]) -> Vec<BootstrapToken> {
    secrets
        .iter()
        .filter_map(|s| {
            let data = s.data.as_ref()?;
            let token = String::from_utf8(data.get("token")?.0.clone()).ok()?;
            let labels = data
                .get("labels")
                .and_then(|l| serde_yaml_ng::from_slice(&l.0).ok())
                .unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            // `expiresAt` (RFC 3339): unreadable, the token enrols nobody rather than
            // forever.
            let expires_at = match data.get("expiresAt") {
                None => None,
                Some(v) => match std::str::from_utf8(&v.0).ok().and_then(|t| t.trim().parse().ok()) {
                    Some(at) => Some(at),
                    None => {
                        warn!(token = %name, "bootstrap token expiresAt is not an RFC 3339 time; it enrols nobody");
                        Some(jiff::Timestamp::UNIX_EPOCH)
                    }
                },
            };
            Some(BootstrapToken {
                name,
                token: token.trim().to_owned(),
                labels,
                expires_at,
            })
        })
        .collect()
}

async fn watch_tokens(
    client: Client,
    namespace: String,
    gateway: Gateway,
    shutdown: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let stream = watcher::watcher(
        api.clone(),
        watcher::Config::default().labels(&bootstrap_selector()),
    );
    let mut stream = Box::pin(stream);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            e = stream.next() => match e {
                None => return,
                Some(Err(e)) => warn!(error = %e, "watching bootstrap tokens"),
                // Any change: re-read the set (tokens are few).
                Some(Ok(_)) => match api.list(&kube::api::ListParams::default().labels(&bootstrap_selector())).await {
                    Ok(list) => gateway.auth().set_bootstrap_tokens(tokens_from(&list.items)),
                    Err(e) => warn!(error = %e, "listing bootstrap tokens"),
                },
            }
        }
    }
}

async fn health(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: &Tasks,
) -> Result<(), Error> {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
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

/// Runs `role` until `shutdown`.
///
/// # Errors
/// [`Error`] when the process cannot start.
pub async fn run(role: Role, opts: RunOptions, shutdown: CancellationToken) -> Result<(), Error> {
    let client = Client::try_default().await?;
    let ready = Arc::new(AtomicBool::new(false));
    let tasks = Tasks::new();
    health(opts.health_addr, ready.clone(), shutdown.clone(), &tasks).await?;
    let ch = crate::telemetry::client(&opts.clickhouse_url)
        .with_user(opts.clickhouse_user.clone())
        .with_password(opts.clickhouse_password.clone());
    let report = crate::telemetry::schema::migrate(&ch).await?;
    info!(server = %report.server, applied = ?report.applied, "ClickHouse schema up to date");
    let s3 = opts.s3.client();
    let meter = crate::observability::meter();
    let mut instruments = crate::observability::Instruments::default();

    let gateway = if role != Role::Controller {
        let key = match &opts.signing_key_file {
            Some(path) => std::fs::read(path).map_err(|e| Error::SigningKey {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
            None => {
                return Err(Error::SigningKey {
                    path: "(none)".into(),
                    message: "--signing-key-file is required for the gateway: every replica must share it".into(),
                });
            }
        };
        if key.len() < 32 {
            return Err(Error::SigningKey {
                path: opts
                    .signing_key_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                message: format!("{} bytes; at least 32 are needed", key.len()),
            });
        }
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
                signing_key: key,
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
        .with_telemetry(sink);
        instruments.gateway(&meter, &gateway);
        tasks.spawn(
            info_span!("feed_gateway"),
            crate::controller::feed_gateway(client.clone(), gateway.clone(), shutdown.clone()),
        );
        tasks.spawn(
            info_span!("bootstrap_tokens", namespace = %opts.namespace),
            watch_tokens(
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
        Some(gateway)
    } else {
        None
    };

    if role != Role::Gateway {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn bootstrap_token_secrets_read_labels_and_expiry_and_a_bad_expiry_enrols_nobody() {
        let tokens = tokens_from(&[
            secret(
                "eu",
                &[
                    ("token", "0123456789abcdef\n"),
                    ("labels", "{region: eu}"),
                    ("expiresAt", "2027-06-30T00:00:00Z"),
                ],
            ),
            secret("forever", &[("token", "fedcba9876543210")]),
            secret("typo", &[("token", "x"), ("expiresAt", "next tuesday")]),
            secret("empty", &[("labels", "{a: b}")]),
        ]);
        let by_name: BTreeMap<&str, &BootstrapToken> =
            tokens.iter().map(|t| (t.name.as_str(), t)).collect();
        assert_eq!(by_name["eu"].token, "0123456789abcdef");
        assert_eq!(by_name["eu"].labels["region"], "eu");
        assert_eq!(
            by_name["eu"].expires_at,
            Some("2027-06-30T00:00:00Z".parse().expect("time"))
        );
        assert_eq!(by_name["forever"].expires_at, None);
        assert_eq!(
            by_name["typo"].expires_at,
            Some(jiff::Timestamp::UNIX_EPOCH),
            "an unreadable expiry is already past"
        );
        assert!(!by_name.contains_key("empty"), "no token key, no token");
    }
}
