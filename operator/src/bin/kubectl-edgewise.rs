//! `kubectl edgewise`: the kubectl plugin for Edgewise rollouts and policies.
//!
//! `status [--watch]`, `promote`, `pause`, `resume`, `abort`, `retry`, `skew`, `explain`
//! (which rule a given request would hit, and why) and `publish` (upload a model's files to
//! S3 and create its ModelVersion). Uses the current kubeconfig and its
//! context's namespace, as kubectl does; `-n` overrides it and `-A` lists every namespace.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgewise_core::policy::{Network, Request, Reroute, compile};
use edgewise_core::rollout::Command;
use edgewise_operator::crd::{ModelRollout, ModelVersion, RoutingPolicy};
use edgewise_operator::publish::{Publication, PublishError, VariantFile};
use edgewise_operator::s3::S3Settings;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// What went wrong, in the words kubectl would use.
#[derive(Debug, thiserror::Error)]
enum PluginError {
    #[error("cannot load a kubeconfig: {}", chain(.0))]
    Kubeconfig(#[source] kube::Error),
    #[error("{}", from_server(.0))]
    Api(#[from] kube::Error),
    #[error("{command} refused: {message}")]
    Refused { command: Command, message: String },
    #[error("the controller has not answered the {0} request within 30 s; is it running?")]
    NoAnswer(Command),
    #[error("--network {0}: use online, offline or metered")]
    Network(String),
    #[error("routingpolicy/{name} does not compile: {source}")]
    Policy {
        name: String,
        #[source]
        source: edgewise_core::policy::PolicyError,
    },
    #[error("--all-namespaces works with status only; name the namespace with -n")]
    AllNamespaces,
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("rendering the ModelVersion: {0}")]
    Render(String),
}

/// `Error from server (NotFound): …` for API answers, the error and its causes otherwise.
fn from_server(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("Error from server ({}): {}", s.reason, s.message),
        other => format!("cannot reach the API server: {}", chain(other)),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Edgewise rollouts and routing policies from kubectl.
#[derive(Debug, Parser)]
#[command(name = "kubectl-edgewise", version, about)]
struct Cli {
    /// Namespace (default: the kubeconfig context's namespace, else `default`).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// `status`: rollouts of every namespace.
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
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
    /// Upload a model's variant files to S3 (digest and size computed while uploading,
    /// optionally signed) and create the ModelVersion naming them.
    Publish {
        /// Model family (`spec.model`).
        model: String,
        /// Semantic version (`spec.version`).
        version: String,
        /// `NAME=FILE[,format=gguf][,platforms=linux/arm64;android/arm64][,min-memory-mib=N]
        /// [,accelerators=npu][,min-agent-version=V]`, once per variant.
        #[arg(long = "variant", required = true)]
        variants: Vec<VariantFile>,
        /// Bucket to upload to.
        #[arg(long, env = "EDGEWISE_S3_BUCKET")]
        bucket: String,
        /// Key prefix; default `MODEL/VERSION`.
        #[arg(long)]
        prefix: Option<String>,
        /// ed25519 key (base64 of its 32-byte seed) signing each artifact's digest.
        #[arg(long)]
        signing_key: Option<std::path::PathBuf>,
        /// Print the ModelVersion as YAML instead of creating it.
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        s3: S3Settings,
    },
    /// Cut a device, or every device of a bootstrap token, off the fleet: a ConfigMap
    /// every gateway replica watches (in `-n`, default `edgewise`: the gateways' namespace).
    /// Open streams end at once; undo by deleting the ConfigMap it prints.
    Revoke {
        /// `device` (by device id) or `token` (by its Secret's name).
        #[arg(value_enum)]
        kind: RevokeKind,
        /// The device id or the token's name.
        id: String,
        /// Why, kept with the revocation.
        #[arg(long, default_value = "")]
        reason: String,
    },
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

/// What `revoke` names.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RevokeKind {
    Device,
    Token,
}

fn status_line(r: &ModelRollout, with_namespace: bool) -> String {
    let s = r.status.clone().unwrap_or_default();
    let mut line = if with_namespace {
        format!("{:<16} ", r.namespace().unwrap_or_default())
    } else {
        String::new()
    };
    line.push_str(&format!(
        "{:<24} {:<12} {:<12} {:<10} {:<10} {:>4} {:>7}% {:>6}/{:<6}",
        r.name_any(),
        r.spec.model,
        s.state.phase.map_or_else(|| "-".into(), |p| p.to_string()),
        s.state.stable_version.unwrap_or_else(|| "-".into()),
        s.state.canary_version.unwrap_or_else(|| "-".into()),
        s.state.step_index,
        s.state.percent,
        s.devices.installed,
        s.devices.targeted,
    ));
    if let Some(a) = s.state.last_analysis {
        let gates: Vec<String> = a
            .gates
            .iter()
            .map(|g| {
                format!(
                    "{}={} ({} {})",
                    g.metric.as_str(),
                    g.compared.map_or("n/a".into(), |v| format!("{v:.3}")),
                    g.threshold,
                    g.verdict
                )
            })
            .collect();
        line.push_str(&format!(
            "\n    last analysis {}: {}",
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
) -> Result<(), PluginError> {
    let id = jiff::Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {cmd.annotation(): id}}});
    rollouts
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    println!("modelrollout/{name}: {cmd} requested");
    if !wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let outcome = rollouts
            .get(name)
            .await?
            .status
            .and_then(|s| s.state.last_command)
            .filter(|c| c.request == id);
        match outcome {
            Some(c) if c.applied => {
                println!("modelrollout/{name}: {cmd} applied: {}", c.message);
                return Ok(());
            }
            Some(c) => {
                return Err(PluginError::Refused {
                    command: cmd,
                    message: c.message,
                });
            }
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    Err(PluginError::NoAnswer(cmd))
}

async fn run(cli: Cli) -> Result<(), PluginError> {
    let client = Client::try_default()
        .await
        .map_err(PluginError::Kubeconfig)?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    if cli.all_namespaces && !matches!(cli.command, Cmd::Status { .. }) {
        return Err(PluginError::AllNamespaces);
    }
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), &namespace);
    let listed: Api<ModelRollout> = if cli.all_namespaces {
        Api::all(client.clone())
    } else {
        rollouts.clone()
    };
    let wait = !cli.no_wait;
    let request = |cmd: Command| {
        let rollouts = rollouts.clone();
        move |name: String| async move { request_command(&rollouts, &name, cmd, wait).await }
    };
    match cli.command {
        Cmd::Status { watch } => loop {
            let list = listed.list(&ListParams::default()).await?;
            if list.items.is_empty() {
                if cli.all_namespaces {
                    println!("No rollouts found.");
                } else {
                    println!("No rollouts found in {namespace} namespace.");
                }
            } else {
                println!(
                    "{}{:<24} {:<12} {:<12} {:<10} {:<10} {:>4} {:>8} {:>13}",
                    if cli.all_namespaces {
                        format!("{:<16} ", "NAMESPACE")
                    } else {
                        String::new()
                    },
                    "NAME",
                    "MODEL",
                    "PHASE",
                    "STABLE",
                    "CANARY",
                    "STEP",
                    "PERCENT",
                    "INSTALLED"
                );
            }
            for r in &list.items {
                println!("{}", status_line(r, cli.all_namespaces));
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
            set_paused(&rollouts, &rollout, true).await?;
            println!("modelrollout/{rollout}: paused");
            Ok(())
        }
        Cmd::Resume { rollout } => {
            set_paused(&rollouts, &rollout, false).await?;
            println!("modelrollout/{rollout}: resumed");
            Ok(())
        }
        Cmd::Skew { rollout } => {
            let r = rollouts.get(&rollout).await?;
            println!("{:<12} DEVICES", "VERSION");
            for e in r.status.map(|s| s.skew).unwrap_or_default() {
                println!("{:<12} {}", e.version, e.devices);
            }
            Ok(())
        }
        Cmd::Publish {
            model,
            version,
            variants,
            bucket,
            prefix,
            signing_key,
            print,
            s3,
        } => {
            let publication = Publication {
                model,
                version,
                bucket,
                prefix,
                variants,
                signing_key: signing_key
                    .as_deref()
                    .map(edgewise_operator::publish::read_signing_key)
                    .transpose()?,
            };
            let mut last_percent = std::collections::BTreeMap::new();
            let mut progress = |variant: &str, done: u64, total: u64| {
                let percent = (done * 100).checked_div(total).unwrap_or(100);
                // One line per 10 % at most: progress for people, not a flood.
                if last_percent.insert(variant.to_owned(), percent / 10) != Some(percent / 10) {
                    eprintln!(
                        "uploading {variant}: {:.1} of {:.1} MiB ({percent} %)",
                        done as f64 / 1_048_576.0,
                        total as f64 / 1_048_576.0
                    );
                }
            };
            let mv = edgewise_operator::publish::publish(&s3.client(), &publication, &mut progress)
                .await?;
            if print {
                let yaml = serde_yaml_ng::to_string(&mv)
                    .map_err(|e| PluginError::Render(e.to_string()))?;
                println!("{yaml}");
                return Ok(());
            }
            let created = Api::<ModelVersion>::namespaced(client, &namespace)
                .create(&PostParams::default(), &mv)
                .await?;
            println!("modelversion.edgewise.dev/{} created", created.name_any());
            Ok(())
        }
        Cmd::Revoke { kind, id, reason } => {
            use edgewise_operator::gateway::trust::{Revoked, revocation};
            let kind = match kind {
                RevokeKind::Device => Revoked::Device,
                RevokeKind::Token => Revoked::Token,
            };
            // Revocations live with the gateways, not with the rollouts of the context.
            let system = cli.namespace.clone().unwrap_or_else(|| "edgewise".into());
            let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
                Api::namespaced(client.clone(), &system);
            let object = revocation(kind, &id, &reason);
            let name = object.name_any();
            match maps.create(&PostParams::default(), &object).await {
                Ok(_) => println!("configmap/{name} created in {system}: {id} is revoked"),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    println!("configmap/{name} unchanged in {system}: {id} was already revoked");
                }
                Err(e) => return Err(e.into()),
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
            let rp: RoutingPolicy = Api::namespaced(client, &namespace).get(&policy).await?;
            let compiled = compile(&rp.spec.policy).map_err(|source| PluginError::Policy {
                name: policy.clone(),
                source,
            })?;
            let network = match network.as_str() {
                "online" => Network::Online,
                "offline" => Network::Offline,
                "metered" => Network::Metered,
                other => return Err(PluginError::Network(other.to_owned())),
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
            for w in edgewise_core::policy::lint(&rp.spec.policy) {
                println!("warning  {w}");
            }
            match d.reroute {
                Some(Reroute::Offline) => {
                    println!("rerouted to the device: the network is offline");
                }
                Some(Reroute::OverBudget) => {
                    println!("rerouted to the device: the cloud budget is spent");
                }
                None => {}
            }
            Ok(())
        }
    }
}

async fn set_paused(
    rollouts: &Api<ModelRollout>,
    name: &str,
    paused: bool,
) -> Result<(), PluginError> {
    let patch = json!({"spec": {"paused": paused}});
    rollouts
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
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
