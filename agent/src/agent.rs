//! One real agent: state under the data dir, the Router on a Unix socket, the Sync client
//! and the installer, and a `status.json` for `edgewise-agent status`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::device::{Device, DeviceParts};
use crate::identity::{Identity, IdentityError};
use crate::policy::PolicyStore;
use crate::status::StatusFile;
use crate::store::{ContentStore, ModelState};
use crate::telemetry::{BufferConfig, BufferError, TelemetryBuffer};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or a state file is unusable.
    #[error("data dir {dir}: {source}")]
    State {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The identity file is unusable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The gateway URL is invalid.
    #[error("gateway URL: {0}")]
    Gateway(#[from] tonic::transport::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Opens the device's state from `config` (no network I/O).
///
/// # Errors
/// [`StartError`] naming the file at fault.
pub fn open_device(config: &AgentConfig) -> Result<Arc<Device>, StartError> {
    let dir = &config.data_dir;
    let state_err = |source| StartError::State {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(state_err)?;
    let identity = Identity::load_or_create(dir, config.durable)?;
    let content =
        Arc::new(ContentStore::open(&dir.join("store"), config.durable).map_err(state_err)?);
    let state = ModelState::load(&dir.join("models.json"), config.durable).map_err(state_err)?;
    let policy =
        Arc::new(PolicyStore::load(&dir.join("policy.json"), config.durable).map_err(state_err)?);
    let telemetry = TelemetryBuffer::open(
        &dir.join("telemetry"),
        BufferConfig {
            durable: config.durable,
            ..BufferConfig::default()
        },
    )
    .map_err(|e| match e {
        BufferError::Io(source) => state_err(source),
        BufferError::Closed => state_err(std::io::Error::other("telemetry buffer closed")),
    })?;
    Ok(Device::new(DeviceParts {
        identity,
        content,
        state,
        policy,
        facts: config.facts.clone(),
        labels: config.labels.clone(),
        publisher: config.publisher_key,
        bootstrap_token: config.bootstrap_token.clone(),
        backoff: config.backoff,
        collect_garbage: true,
        telemetry: Some(telemetry),
    }))
}

/// Runs the agent until `shutdown`.
///
/// # Errors
/// [`StartError`] when it cannot start; once running it retries rather than fails.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), StartError> {
    let device = open_device(&config)?;
    let channel = crate::gateway_channel(&config.gateway)?;
    let http = crate::artifact_client()?;
    info!(device = %device.device_id, gateway = %config.gateway, "agent starting");
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(socket) = config.router_socket.clone() {
        let router = device.router.clone();
        let stop = shutdown.clone();
        // Its own thread and single-threaded runtime: a Decide is served start to finish on
        // one thread with no cross-thread wake-ups, which halves its latency.
        let served = std::thread::Builder::new()
            .name("router".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return error!(error = %e, "router runtime"),
                };
                if let Err(e) = rt.block_on(crate::router::serve_unix(socket.clone(), router, stop))
                {
                    error!(socket = %socket.display(), error = %e, "router socket failed");
                }
            });
        if let Err(e) = served {
            error!(error = %e, "starting the router thread");
        }
    }
    tasks.spawn(crate::installer::run(
        device.clone(),
        http,
        shutdown.clone(),
    ));
    if let Some(buffer) = device.telemetry.clone() {
        tasks.spawn(crate::telemetry::uploader::run(
            device.clone(),
            buffer,
            channel.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(crate::sync::run(device.clone(), channel, shutdown.clone()));
    tasks.spawn(write_status(
        device.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    while tasks.join_next().await.is_some() {}
    info!("agent stopped");
    Ok(())
}

/// Keeps `status.json` current (at most once a second).
#[tracing::instrument(name = "status", skip_all, fields(device = %device.device_id))]
async fn write_status(device: Arc<Device>, config: AgentConfig, shutdown: CancellationToken) {
    let path = config.data_dir.join("status.json");
    let mut connection = device.connection.subscribe();
    let mut models = device.board.subscribe();
    loop {
        let file = StatusFile::of(&device, &config.gateway);
        if let Err(e) = file.write(&path) {
            warn!(error = %e, "writing status.json");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = connection.changed() => {}
            _ = models.changed() => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
