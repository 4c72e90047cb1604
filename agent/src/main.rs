//! `edgewise-agent`: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgewise_agent::config::{Backoff, ConfigFile};
use edgewise_agent::simulate::{SimConfig, SimFleet};
use tokio_util::sync::CancellationToken;

/// Edgewise on-device agent.
#[derive(Debug, Parser)]
#[command(name = "edgewise-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one device agent.
    Run {
        /// Configuration file (TOML).
        #[arg(long, env = "EDGEWISE_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Run many virtual devices in one process (real protocol, real downloads).
    Simulate {
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Gateway URL.
        #[arg(long, env = "EDGEWISE_GATEWAY")]
        gateway: String,
        /// PEM CA that signed the gateway's certificate (`https://` URLs; default: the
        /// system's roots). `http://` URLs are allowed here: the simulator is a test tool.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// File holding the bootstrap token.
        #[arg(long, env = "EDGEWISE_BOOTSTRAP_TOKEN_FILE")]
        bootstrap_token_file: PathBuf,
        /// Directory for the shared content store.
        #[arg(long, default_value = "edgewise-sim")]
        data_dir: PathBuf,
        /// Devices sharing one HTTP/2 connection.
        #[arg(long, default_value_t = 100)]
        devices_per_connection: usize,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration_secs: Option<u64>,
    },
    /// Serve one model file over the OpenAI-compatible API.
    ServeModel {
        /// The model file (GGUF).
        #[arg(long)]
        model: PathBuf,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8089")]
        addr: std::net::SocketAddr,
        /// The model name responses carry (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// What the local agent runs: asked of the running agent over its socket, else its
    /// last saved state (said so, with its time). Exits 1 when no agent has run there.
    Status {
        /// The agent's configuration file.
        #[arg(long, env = "EDGEWISE_AGENT_CONFIG", conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// Or its data directory (the socket is then `<data_dir>/router.sock`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `text` for people, `json` for scripts.
        #[arg(long, short, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting runtime: {e}")),
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                let built = match ConfigFile::load(&config).and_then(ConfigFile::build) {
                    Ok(c) => c,
                    Err(e) => return fail(&e.to_string()),
                };
                let shutdown = shutdown_on_signal();
                match edgewise_agent::agent::run(built, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(&e.to_string()),
                }
            }
            Command::ServeModel { model, addr, name } => serve_model(model, addr, name).await,
            Command::Simulate {
                devices,
                gateway,
                bootstrap_token_file,
                ca_file,
                data_dir,
                devices_per_connection,
                duration_secs,
            } => {
                let ca_pem = match ca_file.map(std::fs::read).transpose() {
                    Ok(pem) => pem,
                    Err(e) => return fail(&format!("--ca-file: {e}")),
                };
                let token = match std::fs::read_to_string(&bootstrap_token_file) {
                    Ok(t) => t.trim().to_owned(),
                    Err(e) => return fail(&format!("{}: {e}", bootstrap_token_file.display())),
                };
                let config = SimConfig {
                    devices,
                    gateway,
                    tls: edgewise_agent::GatewayTls {
                        insecure: true,
                        ca_pem,
                        pins: Vec::new(),
                    },
                    bootstrap_tokens: vec![token],
                    data_dir,
                    backoff: Backoff {
                        initial: Duration::from_millis(500),
                        max: Duration::from_secs(30),
                    },
                    devices_per_connection,
                    telemetry: true,
                    traffic: Some(edgewise_agent::simulate::Traffic::default()),
                    runtime: true,
                };
                let fleet = match SimFleet::start(&config) {
                    Ok(f) => f,
                    Err(e) => return fail(&e.to_string()),
                };
                let shutdown = shutdown_on_signal();
                let deadline = duration_secs.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => {
                            let s = fleet.summary();
                            eprintln!(
                                "simulate: {}/{devices} connected, active {:?}, policies {:?}, downloading {}, failed {}, unsupported {}",
                                s.connected, s.active, s.policies, s.downloading, s.failed, s.unsupported
                            );
                            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                                break;
                            }
                        }
                    }
                }
                fleet.stop().await;
                ExitCode::SUCCESS
            }
            Command::Status {
                config,
                data_dir,
                output,
            } => {
                let (dir, socket) = match (config, data_dir) {
                    (Some(c), _) => match ConfigFile::load(&c) {
                        Ok(f) => {
                            let socket = f
                                .router_socket
                                .clone()
                                .unwrap_or_else(|| f.data_dir.join("router.sock"));
                            (f.data_dir, socket)
                        }
                        Err(e) => return fail(&e.to_string()),
                    },
                    (None, Some(d)) => {
                        let socket = d.join("router.sock");
                        (d, socket)
                    }
                    (None, None) => return fail("give --config FILE or --data-dir DIR"),
                };
                match edgewise_agent::status::report(&dir, Some(&socket)).await {
                    Ok(report) if output == "json" => match serde_json::to_string_pretty(&report) {
                        Ok(json) => {
                            println!("{json}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(&e.to_string()),
                    },
                    Ok(report) => {
                        print!("{}", edgewise_agent::status::render(&report));
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e.to_string()),
                }
            }
        }
    })
}

async fn serve_model(path: PathBuf, addr: std::net::SocketAddr, name: Option<String>) -> ExitCode {
    use edgewise_agent::openai;
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let runtime = edgewise_agent::runtime::Runtime::new(None);
    eprintln!("serve-model: loading {}", path.display());
    let loaded = match runtime.load(&name, "file", &path, "gguf").await {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("listening on {addr}: {e}")),
    };
    let bound = listener.local_addr().map_or(addr, |a| a);
    eprintln!("serve-model: {name} answers on http://{bound}/v1 (OpenAI-compatible)");
    let backend = std::sync::Arc::new(openai::serve_model::ServeModel {
        name,
        model: loaded,
    });
    match openai::serve(listener, openai::router(backend), shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("edgewise-agent: {message}");
    ExitCode::FAILURE
}

/// Cancels on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        cancel.cancel();
    });
    token
}
