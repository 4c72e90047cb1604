//! `edgewise-operator`: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match edgewise_operator::cli::run(edgewise_operator::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgewise-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
