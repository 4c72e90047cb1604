//! `edgewise-dev`: the whole system on one machine (see the crate docs). `scripts/dev` runs it.

use clap::Parser;

/// Run Edgewise on one machine: a dev Kubernetes API, S3, ClickHouse, the controllers, the
/// gateway and a simulated fleet. For trying Edgewise and for tests, not production.
#[derive(Debug, Parser)]
#[command(name = "edgewise-dev", version, about)]
struct Cli {
    #[command(flatten)]
    options: edgewise_dev::DevOptions,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    edgewise_operator::shutdown::run_main("edgewise-dev", || async {
        let _obs = edgewise_operator::observability::init("edgewise-dev");
        // SIGTERM too: the dev stack must stop its ClickHouse child on the way out.
        edgewise_dev::run(cli.options, edgewise_operator::shutdown::on_signal()).await
    })
}
