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
}

/// Runs the parsed command.
///
/// # Errors
/// Whatever the subcommand reports.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Crds => {
            let yaml = crate::crd::to_yaml(&crate::crd::all())?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(())
        }
    }
}
