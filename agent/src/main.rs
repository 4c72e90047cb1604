//! `edgewise-agent`: parses the command line and hands over to the library.

use clap::Parser;

/// Edgewise on-device agent.
#[derive(Debug, Parser)]
#[command(name = "edgewise-agent", version, about)]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
}
