//! `edgewise-operator`: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = edgewise_operator::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgewise-operator: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(edgewise_operator::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgewise-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
