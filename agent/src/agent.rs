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
    Gateway(#[from] crate::ChannelError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The data plane's thread or runtime could not be started.
    #[error("data plane: {0}")]
    Thread(std::io::Error),
    /// The TLS client for cloud endpoints could not be configured.
    #[error("cloud TLS: {0}")]
    CloudTls(#[from] rustls::Error),
    /// The data plane's address is taken or not allowed.
    #[error("data plane: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data plane's socket cannot be bound.
    #[error("data plane: cannot listen on {}: {source}", path.display())]
    ListenUnix {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another agent runs on this data dir.
    #[error("another agent (pid {pid}) is running with data dir {}; stop it or give this one its own data_dir", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The other agent's process id, as it wrote it.
        pid: String,
    },
}

/// One agent per data dir: an exclusive lock on `agent.lock`, held while the agent runs,
/// with the holder's pid in it for the next one to name. The kernel releases it when the
/// process ends, `kill -9` included.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock.
    ///
    /// # Errors
    /// [`StartError::Locked`] when another agent holds it, [`StartError::State`] for I/O.
    pub fn acquire(dir: &std::path::Path) -> Result<Self, StartError> {
        use std::io::{Read, Seek, Write};
        let state_err = |source| StartError::State {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(state_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("agent.lock"))
            .map_err(state_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(StartError::Locked {
                    dir: dir.to_owned(),
                    pid: pid.trim().to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(state_err(e)),
        }
        file.set_len(0).map_err(state_err)?;
        file.rewind().map_err(state_err)?;
        write!(file, "{}", std::process::id()).map_err(state_err)?;
        Ok(DataDirLock { _file: file })
    }
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
    let device = Device::new(DeviceParts {
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
        runtime: Some(Arc::new(
            crate::runtime::Runtime::new(config.model_memory)
                .with_external(config.runtimes.clone()),
        )),
    });
    // Budgets count the whole UTC day, across restarts.
    device
        .router
        .persist_usage(dir.join("usage.json"))
        .map_err(state_err)?;
    Ok(device)
}

/// Runs the agent until `shutdown`.
///
/// # Errors
/// [`StartError`] when it cannot start; once running it retries rather than fails.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), StartError> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let device = open_device(&config)?;
    let channel = crate::gateway_channel(&config.gateway, &config.gateway_tls)?;
    let http = crate::artifact_client()?;
    info!(device = %device.device_id, gateway = %config.gateway, "agent starting");
    {
        // The socket's Status answers from the device as it is when asked.
        let weak = Arc::downgrade(&device);
        let gateway = config.gateway.clone();
        device.router.set_status_source(move || {
            weak.upgrade()
                .and_then(|d| serde_json::to_string(&StatusFile::of(&d, &gateway)).ok())
                .unwrap_or_default()
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(socket) = config.router_socket.clone() {
        let router = device.router.clone();
        let (stop, peers) = (shutdown.clone(), config.socket_peers.clone());
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
                if let Err(e) = rt.block_on(crate::router::serve_unix(
                    socket.clone(),
                    peers,
                    router,
                    stop,
                )) {
                    error!(socket = %socket.display(), error = %e, "router socket failed");
                }
            });
        if let Err(e) = served {
            error!(error = %e, "starting the router thread");
        }
    }
    tasks.spawn(crate::installer::load_active(device.clone()));
    if config.data_plane.is_some() || config.data_plane_socket.is_some() {
        let plane = crate::dataplane::DataPlane::new(device.clone(), &config)?;
        // Bound here, so a taken address fails the start; served on the data plane's runtime.
        let tcp = match config.data_plane {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?;
                info!(addr = %listener.local_addr().unwrap_or(addr), "data plane listening (OpenAI-compatible)");
                Some(
                    listener
                        .into_std()
                        .map_err(|source| StartError::Listen { addr, source })?,
                )
            }
            None => None,
        };
        let unix = match config.data_plane_socket.clone() {
            Some(path) => {
                let listener =
                    crate::local_socket::LocalListener::bind(&path, config.socket_peers.clone())
                        .and_then(crate::local_socket::LocalListener::into_std)
                        .map_err(|source| StartError::ListenUnix {
                            path: path.clone(),
                            source,
                        })?;
                info!(socket = %path.display(), "data plane listening (OpenAI-compatible)");
                Some(listener)
            }
            None => None,
        };
        let stopped = serve_data_plane(
            plane,
            tcp,
            unix,
            config.data_plane_threads,
            shutdown.clone(),
        )
        .map_err(StartError::Thread)?;
        tasks.spawn(async move {
            let _ = stopped.await;
        });
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
    if config.probe_network {
        tasks.spawn(crate::network::watch(
            device.router.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(device.router.clone().keep_usage(shutdown.clone()));
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

/// Serves the data plane (and reprocesses what it keeps) on a thread and runtime of its own
/// until `shutdown`: `threads` worker threads, or one thread running everything when 1. A
/// request is then served start to finish on the thread that accepted it, with no wake-up
/// of another (0.03 ms and 30 µs of CPU less per proxied request, docs/benchmarks.md), and
/// nothing else the agent does (downloads, sync, uploads) runs on its threads. Resolves when
/// it has stopped.
fn serve_data_plane(
    plane: crate::dataplane::DataPlane,
    tcp: Option<std::net::TcpListener>,
    unix: Option<crate::local_socket::StdLocalListener>,
    threads: std::num::NonZeroUsize,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = if threads.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.get())
            .thread_name("data-plane")
            .enable_all()
            .build()?
    };
    let (stopped, done) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("data-plane".into())
        .spawn(move || {
            let _entered = span.enter();
            runtime.block_on(async move {
                let mut served = tokio::task::JoinSet::new();
                if let Some(listener) = tcp {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let (routes, stop) = (plane.routes(), shutdown.clone());
                            served.spawn(async move {
                                if let Err(e) = crate::openai::serve(listener, routes, stop).await {
                                    error!(error = %e, "data plane failed");
                                }
                            });
                        }
                        Err(e) => error!(error = %e, "data plane listener"),
                    }
                }
                if let Some(listener) = unix {
                    match crate::local_socket::LocalListener::from_std(listener) {
                        Ok(listener) => {
                            let (routes, stop) = (plane.routes(), shutdown.clone());
                            served.spawn(async move {
                                let served = axum::serve(listener, routes)
                                    .with_graceful_shutdown(async move { stop.cancelled().await })
                                    .await;
                                if let Err(e) = served {
                                    error!(error = %e, "data plane socket failed");
                                }
                            });
                        }
                        Err(e) => error!(error = %e, "data plane socket listener"),
                    }
                }
                served.spawn(plane.reprocess(shutdown));
                while served.join_next().await.is_some() {}
            });
            let _ = stopped.send(());
        })?;
    Ok(done)
}

/// Keeps `status.json` current (at most once a second).
#[tracing::instrument(name = "status", skip_all, fields(device = %device.device_id))]
async fn write_status(device: Arc<Device>, config: AgentConfig, shutdown: CancellationToken) {
    let path = config.data_dir.join("status.json");
    let mut connection = device.connection.subscribe();
    let mut models = device.board.subscribe();
    let mut activity = device.activity.subscribe();
    loop {
        let file = StatusFile::of(&device, &config.gateway);
        if let Err(e) = file.write(&path) {
            warn!(error = %e, "writing status.json");
        }
        // Rewritten on a change only (at most once a second): a quiet agent writes nothing.
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = connection.changed() => {}
            _ = models.changed() => {}
            _ = activity.changed() => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
