//! Command line of `edgewise-operator`. Each subcommand parses its flags and calls a library
//! function; flags have `EDGEWISE_*` environment twins where they configure a server.

use std::io::Write;

use clap::{Parser, Subcommand};

/// Edgewise control plane for hybrid (device + cloud) AI fleets.
#[derive(Debug, Parser)]
#[command(name = "edgewise-operator", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every Edgewise CRD as multi-document YAML (the same as `crds/`).
    Crds,
    /// Run controllers and gateway in one process against the current cluster.
    Run(crate::server::RunOptions),
    /// Run the controllers only (leader-elected).
    Controller(crate::server::RunOptions),
    /// Run the device gateway only.
    Gateway(crate::server::RunOptions),
    /// Moved: the dev stack is its own binary, `edgewise-dev` (run `./scripts/dev`).
    #[command(hide = true)]
    Dev {
        /// Whatever was passed; only named in the error.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Create or upgrade the ClickHouse schema (database `edgewise`); safe to repeat.
    Migrate {
        /// ClickHouse HTTP URL.
        #[arg(
            long,
            env = "EDGEWISE_CLICKHOUSE_URL",
            default_value = "http://127.0.0.1:8123"
        )]
        clickhouse_url: String,
        /// ClickHouse user.
        #[arg(long, env = "EDGEWISE_CLICKHOUSE_USER", default_value = "default")]
        clickhouse_user: String,
        /// ClickHouse password.
        #[arg(
            long,
            env = "EDGEWISE_CLICKHOUSE_PASSWORD",
            default_value = "",
            hide_env_values = true
        )]
        clickhouse_password: String,
    },
}

/// Errors the command line reports before exiting non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Rendering the CRDs failed.
    #[error("rendering CRDs: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// Writing to stdout failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    /// Migrating failed.
    #[error(transparent)]
    Migrate(#[from] crate::telemetry::schema::Error),
    /// `edgewise-operator dev` was asked for.
    #[error(
        "the dev stack is its own binary now, so that production images carry none of it: run `./scripts/dev` (or `cargo run -p edgewise-dev --`)"
    )]
    DevMoved,
    /// The server failed.
    #[error(transparent)]
    Server(#[from] crate::server::Error),
}

/// Runs the parsed command.
///
/// # Errors
/// Whatever the subcommand reports.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Crds => {
            let yaml = crate::crd::to_yaml(&crate::crd::all())?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(())
        }
        Command::Run(opts) => serve(crate::server::Role::All, opts).await,
        Command::Controller(opts) => serve(crate::server::Role::Controller, opts).await,
        Command::Gateway(opts) => serve(crate::server::Role::Gateway, opts).await,
        Command::Dev { .. } => Err(Error::DevMoved),
        Command::Migrate {
            clickhouse_url,
            clickhouse_user,
            clickhouse_password,
        } => {
            let _obs = crate::observability::init("edgewise-operator");
            let client = crate::telemetry::client(&clickhouse_url)
                .with_user(clickhouse_user)
                .with_password(clickhouse_password);
            let report = crate::telemetry::schema::migrate(&client).await?;
            tracing::info!(server = %report.server, applied = ?report.applied, skipped = ?report.skipped, "schema up to date");
            println!(
                "ClickHouse {}: applied {:?}, skipped {:?} (unsupported by this server)",
                report.server, report.applied, report.skipped
            );
            Ok(())
        }
    }
}

async fn serve(role: crate::server::Role, opts: crate::server::RunOptions) -> Result<(), Error> {
    let _obs = crate::observability::init("edgewise-operator");
    crate::server::run(role, opts, crate::shutdown::on_signal()).await?;
    Ok(())
}
