//! `kubectl edgewise`: the kubectl plugin for Edgewise rollouts and policies.
//!
//! `status [--watch]`, `promote`, `pause`, `resume`, `abort`, `retry`, `skew`, and `explain`
//! (which rule a given request would hit, and why). Uses the current kubeconfig.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgewise_core::policy::{Network, Request, compile};
use edgewise_core::rollout::Command;
use edgewise_operator::crd::{ModelRollout, RoutingPolicy};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Edgewise rollouts and routing policies from kubectl.
#[derive(Debug, Parser)]
#[command(name = "kubectl-edgewise", version, about)]
struct Cli {
    /// Namespace.
    #[arg(short, long, global = true, default_value = "default")]
    namespace: String,
    /// Commands (promote, abort, retry): return once requested, without waiting for the
    /// controller's answer.
    #[arg(long, global = true)]
    no_wait: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Rollouts with phase, versions, progress and the last analysis.
    Status {
        /// Keep printing every 2 seconds.
        #[arg(long)]
        watch: bool,
    },
    /// Skip the current pause step (never an analysis); `--full` makes the canary stable
    /// now, skipping every remaining step and analysis.
    Promote {
        rollout: String,
        /// Promote in full: 100 % now, remaining steps and analysis skipped.
        #[arg(long)]
        full: bool,
    },
    /// Hold a rollout where it is.
    Pause { rollout: String },
    /// Let a paused rollout go on.
    Resume { rollout: String },
    /// Send every device back to the stable version.
    Abort { rollout: String },
    /// Restart from the first step after an abort, a rollback or a failed analysis.
    Retry { rollout: String },
    /// Which versions the rollout's devices run.
    Skew { rollout: String },
    /// Which rule of a RoutingPolicy a request would hit, and where it would run.
    Explain {
        /// The RoutingPolicy.
        policy: String,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        data_class: Option<String>,
        #[arg(long)]
        input_tokens: Option<u32>,
        #[arg(long)]
        latency_budget_ms: Option<u32>,
        /// online, offline or metered.
        #[arg(long, default_value = "online")]
        network: String,
        #[arg(long)]
        complexity: Option<f32>,
        #[arg(long)]
        battery: Option<f32>,
        #[arg(long, default_value = "explain")]
        request_id: String,
    },
}

fn status_line(r: &ModelRollout) -> String {
    let s = r.status.clone().unwrap_or_default();
    let mut line = format!(
        "{:<24} {:<12} {:<12} {:<10} {:<10} {:>4} {:>7}% {:>6}/{:<6}",
        r.name_any(),
        r.spec.model,
        s.state
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "-".into()),
        s.state.stable_version.unwrap_or_else(|| "-".into()),
        s.state.canary_version.unwrap_or_else(|| "-".into()),
        s.state.step_index,
        s.state.percent,
        s.devices.installed,
        s.devices.targeted,
    );
    if let Some(a) = s.state.last_analysis {
        let gates: Vec<String> = a
            .gates
            .iter()
            .map(|g| {
                format!(
                    "{}={} ({} {:?})",
                    g.metric.as_str(),
                    g.compared.map_or("n/a".into(), |v| format!("{v:.3}")),
                    g.threshold,
                    g.verdict
                )
            })
            .collect();
        line.push_str(&format!(
            "\n    last analysis {:?}: {}",
            a.verdict,
            gates.join(", ")
        ));
    }
    if let Some(m) = s.state.message {
        line.push_str(&format!("\n    {m}"));
    }
    line
}

/// Sets the command's annotation to a new request id, then waits for the controller's
/// answer to that request (`status.lastCommand`): carried out, or refused and why.
async fn request_command(
    rollouts: &Api<ModelRollout>,
    name: &str,
    cmd: Command,
    wait: bool,
) -> Result<(), String> {
    let id = jiff::Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {cmd.annotation(): id}}});
    rollouts
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| e.to_string())?;
    println!("modelrollout/{name}: {cmd} requested");
    if !wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let outcome = rollouts
            .get(name)
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.state.last_command)
            .filter(|c| c.request == id);
        match outcome {
            Some(c) if c.applied => {
                println!("modelrollout/{name}: {cmd} applied: {}", c.message);
                return Ok(());
            }
            Some(c) => return Err(format!("{cmd} refused: {}", c.message)),
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    Err(format!(
        "the controller has not answered the {cmd} request within 30 s; is it running?"
    ))
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), &cli.namespace);
    let wait = !cli.no_wait;
    let request = |cmd: Command| {
        let rollouts = rollouts.clone();
        move |name: String| async move { request_command(&rollouts, &name, cmd, wait).await }
    };
    match cli.command {
        Cmd::Status { watch } => loop {
            let list = rollouts
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{:<24} {:<12} {:<12} {:<10} {:<10} {:>4} {:>8} {:>13}",
                "NAME", "MODEL", "PHASE", "STABLE", "CANARY", "STEP", "PERCENT", "INSTALLED"
            );
            for r in &list.items {
                println!("{}", status_line(r));
            }
            if !watch {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            println!();
        },
        Cmd::Promote { rollout, full } => {
            let cmd = if full {
                Command::PromoteFull
            } else {
                Command::Promote
            };
            request(cmd)(rollout).await
        }
        Cmd::Abort { rollout } => request(Command::Abort)(rollout).await,
        Cmd::Retry { rollout } => request(Command::Retry)(rollout).await,
        Cmd::Pause { rollout } => {
            rollouts
                .patch(
                    &rollout,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": true}})),
                )
                .await
                .map_err(|e| e.to_string())?;
            println!("modelrollout/{rollout}: paused");
            Ok(())
        }
        Cmd::Resume { rollout } => {
            rollouts
                .patch(
                    &rollout,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": false}})),
                )
                .await
                .map_err(|e| e.to_string())?;
            println!("modelrollout/{rollout}: resumed");
            Ok(())
        }
        Cmd::Skew { rollout } => {
            let r = rollouts.get(&rollout).await.map_err(|e| e.to_string())?;
            println!("{:<12} DEVICES", "VERSION");
            for e in r.status.map(|s| s.skew).unwrap_or_default() {
                println!("{:<12} {}", e.version, e.devices);
            }
            Ok(())
        }
        Cmd::Explain {
            policy,
            task,
            data_class,
            input_tokens,
            latency_budget_ms,
            network,
            complexity,
            battery,
            request_id,
        } => {
            let rp: RoutingPolicy = Api::namespaced(client, &cli.namespace)
                .get(&policy)
                .await
                .map_err(|e| e.to_string())?;
            let compiled = compile(&rp.spec.policy).map_err(|e| e.to_string())?;
            let network = match network.as_str() {
                "online" => Network::Online,
                "offline" => Network::Offline,
                "metered" => Network::Metered,
                other => return Err(format!("--network {other}: use online, offline or metered")),
            };
            let d = compiled.decide(&Request {
                request_id: &request_id,
                task: task.as_deref(),
                data_class: data_class.as_deref(),
                input_tokens,
                latency_budget_ms,
                network,
                battery,
                complexity,
                ..Request::default()
            });
            let why = match d.rule_index {
                Some(i) => format!(
                    "rule {i} \"{}\" is the first whose conditions all hold",
                    d.rule
                ),
                None => "no rule matches: the default route applies".into(),
            };
            println!("policy   {} (version {})", policy, d.policy_version);
            println!("rule     {why}");
            println!(
                "target   {}{}",
                d.target.name,
                if d.target.is_cloud() {
                    " (cloud)"
                } else {
                    " (on device)"
                }
            );
            let fallback: Vec<&str> = d.fallback().map(|t| &*t.name).collect();
            println!(
                "fallback {}",
                if fallback.is_empty() {
                    "none: the request never leaves its target".into()
                } else {
                    fallback.join(" -> ")
                }
            );
            if let Some(r) = d.refine {
                println!("refine   {}", r.name);
            }
            if let Some(reroute) = d.reroute {
                println!("rerouted {reroute:?}");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl-edgewise: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl-edgewise: {e}");
            ExitCode::FAILURE
        }
    }
}
