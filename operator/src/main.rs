//! `edgewise-operator`: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = edgewise_operator::cli::Cli::parse();
    edgewise_operator::shutdown::run_main("edgewise-operator", || edgewise_operator::cli::run(cli))
}
