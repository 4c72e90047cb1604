//! The whole system on one machine: the dev Kubernetes API, an embedded S3 server,
//! ClickHouse (a child process, or `--clickhouse-url`), migrations, the controllers, the
//! gateway and a simulated fleet. `--exit-after-demo` then runs [`crate::demo`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgewise_agent::simulate::{SimConfig, SimFleet, Traffic};
use edgewise_operator::gateway::keys::KeyRing;
use edgewise_operator::gateway::{BootstrapToken, Gateway, GatewayConfig};
use edgewise_operator::telemetry::ingest::{SinkConfig, TelemetrySink};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clickhouse_server::ClickHouseServer;
use crate::demo::{self, DemoError};
use crate::devapi::DevApi;
use crate::examples;
use crate::s3_server::EmbeddedS3;

/// `edgewise-dev` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct DevOptions {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Where everything keeps its state (kubeconfig, S3 objects, ClickHouse data…).
    #[arg(long, default_value = "edgewise-dev")]
    pub data_dir: PathBuf,
    /// Run the demo and exit 0 only if every step succeeded.
    #[arg(long)]
    pub exit_after_demo: bool,
    /// Kubernetes-compatible API listen address (loopback unless `--allow-remote-api`).
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub api_addr: SocketAddr,
    /// Let `--api-addr` be a non-loopback address: the dev API has no authentication, so
    /// anyone who reaches it can change every Edgewise resource.
    #[arg(long)]
    pub allow_remote_api: bool,
    /// Embedded S3 listen address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub s3_addr: SocketAddr,
    /// Gateway listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub gateway_addr: SocketAddr,
    /// The dev cloud's listen address (an OpenAI-compatible server with the demo's
    /// full-precision model).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub cloud_addr: SocketAddr,
    /// Use this ClickHouse instead of starting `clickhouse-server`.
    #[arg(long, env = "EDGEWISE_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,
    /// Synthetic requests per second per simulated device (0: none). Default: 2, more in a
    /// small fleet so its canaries gather samples quickly.
    #[arg(long)]
    pub traffic_rps: Option<f64>,
    /// Run against the cluster in this kubeconfig (its current context) instead of the
    /// embedded API; the CRDs are applied to it first. For kind, k3d and the like.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// The embedded S3 server's credentials (loopback only, printed at start).
pub const S3_ACCESS_KEY: &str = "edgewise";
/// See [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "edgewise-dev-secret";
/// The bucket the demo publishes its models to.
pub const DEMO_BUCKET: &str = "models";

/// A random secret kept in `path` (mode 0600), made on first use.
fn persistent_secret(path: &std::path::Path) -> Result<String, Error> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            return Ok(existing.to_owned());
        }
    }
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write as _;
    options
        .open(path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(start("secrets in the data dir"))?;
    Ok(secret)
}

/// Why the dev stack failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component did not start.
    #[error("{what}: {source}")]
    Start {
        /// The component.
        what: &'static str,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A CRD was applied to the cluster but never became established.
    #[error("CRD {0} not established within 30 s")]
    CrdNotEstablished(String),
    /// A demo step failed.
    #[error("demo step failed: {0}")]
    Demo(#[from] DemoError),
    /// The dev API was asked to listen beyond loopback without `--allow-remote-api`.
    #[error(
        "--api-addr {0} is not a loopback address: the dev API checks no credentials, so anyone who reaches it can change every resource. Use 127.0.0.1, or add --allow-remote-api if you mean it"
    )]
    RemoteApi(SocketAddr),
}

fn start<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    what: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::Start {
        what,
        source: e.into(),
    }
}

/// The running parts of the dev stack.
pub struct DevStack {
    /// The embedded Kubernetes-compatible API, unless `--kubeconfig` named a cluster.
    pub api: Option<DevApi>,
    /// The S3 server.
    pub s3: EmbeddedS3,
    /// An S3 client.
    pub s3_client: aws_sdk_s3::Client,
    /// The ClickHouse child process, unless `--clickhouse-url` was given.
    pub clickhouse_server: Option<ClickHouseServer>,
    /// A ClickHouse client.
    pub clickhouse: clickhouse::Client,
    /// The gateway.
    pub gateway: Gateway,
    /// A Kubernetes client for the dev API.
    pub client: Client,
    /// The simulated fleet.
    pub fleet: SimFleet,
    /// The dev cloud's `http://…/v1`.
    pub cloud_url: String,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for DevStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevStack")
            .field("api", &self.api.as_ref().map(DevApi::url))
            .finish_non_exhaustive()
    }
}

impl DevStack {
    /// Starts every component, printing each endpoint as it comes up.
    ///
    /// # Errors
    /// [`Error::Start`] naming the component that failed, with the fix where there is one.
    pub async fn start(opts: &DevOptions, shutdown: CancellationToken) -> Result<Self, Error> {
        let dir = &opts.data_dir;
        if !opts.api_addr.ip().is_loopback() && !opts.allow_remote_api && opts.kubeconfig.is_none()
        {
            return Err(Error::RemoteApi(opts.api_addr));
        }
        std::fs::create_dir_all(dir).map_err(start("data dir"))?;
        let (api, client) = match &opts.kubeconfig {
            Some(path) => {
                let (client, url) = cluster_client(path).await?;
                install_crds(&client).await?;
                println!(
                    "Kubernetes API  {url}   (kubectl --kubeconfig {} get edgewise -A)",
                    path.display()
                );
                (None, client)
            }
            None => {
                let api = DevApi::start(&dir.join("api"), opts.api_addr)
                    .await
                    .map_err(start("Kubernetes API"))?;
                std::fs::write(dir.join("kubeconfig"), api.kubeconfig())
                    .map_err(start("kubeconfig"))?;
                println!(
                    "Kubernetes API  {}   (kubectl --kubeconfig {}/kubeconfig get edgewise -A)",
                    api.url(),
                    dir.display()
                );
                let client =
                    Client::try_from(Config::new(api.url().parse().map_err(start("API URL"))?))
                        .map_err(start("kube client"))?;
                (Some(api), client)
            }
        };
        let s3 = EmbeddedS3::start(&dir.join("s3"), opts.s3_addr, S3_ACCESS_KEY, S3_SECRET_KEY)
            .await
            .map_err(start("S3"))?;
        println!(
            "S3              {}   (access key {S3_ACCESS_KEY}, secret {S3_SECRET_KEY}, buckets {DEMO_BUCKET} and {})",
            s3.endpoint(),
            examples::BUCKET
        );
        let mut clickhouse_server = None;
        let mut native = String::new();
        let clickhouse_url = match &opts.clickhouse_url {
            Some(url) => url.clone(),
            None => {
                let server = ClickHouseServer::start(&dir.join("clickhouse"))
                    .await
                    .map_err(start("ClickHouse"))?;
                let url = server.url();
                native = format!(", clickhouse-client --port {}", server.tcp_port());
                clickhouse_server = Some(server);
                url
            }
        };
        let ch = edgewise_operator::telemetry::client(&clickhouse_url);
        let report = edgewise_operator::telemetry::schema::migrate(&ch)
            .await
            .map_err(start("migrations"))?;
        let migrations: Vec<String> = report.applied.iter().map(ToString::to_string).collect();
        println!(
            "ClickHouse      {clickhouse_url}   ({}, migrations applied: {}{native})",
            report.server,
            if migrations.is_empty() {
                "none new".to_owned()
            } else {
                migrations.join(", ")
            }
        );

        let s3_client = s3.settings().client();
        let _ = s3_client.create_bucket().bucket(DEMO_BUCKET).send().await;
        examples::publish(&s3_client)
            .await
            .map_err(start("example artifacts"))?;
        // Kept in the data dir: agents enrolled before a restart keep their credentials.
        let token = persistent_secret(&dir.join("bootstrap-token"))?;
        let signing_key = persistent_secret(&dir.join("signing-key"))?;
        let sink = TelemetrySink::start(ch.clone(), SinkConfig::default());
        // TLS as in production, from a CA of the dev stack's own.
        let pki = crate::pki::DevPki::ensure(&dir.join("tls")).map_err(start("dev CA"))?;
        let gateway = Gateway::new(
            GatewayConfig {
                tls: Some(edgewise_operator::gateway::tls::TlsFiles {
                    cert: pki.cert.clone(),
                    key: pki.key.clone(),
                    reload_every: Duration::from_secs(10),
                }),
                // The persisted secret is 256 random bits; its hash is the key's seed.
                credential_keys: KeyRing::new(&Sha256::digest(signing_key.as_bytes()).into(), &[]),
                ..GatewayConfig::default()
            },
            s3_client.clone(),
        )
        .with_telemetry(sink);
        let dev_labels = || [("cluster".to_owned(), "dev".to_owned())].into_iter();
        let mut tokens = vec![BootstrapToken {
            name: "dev".into(),
            token: token.clone(),
            labels: dev_labels().collect(),
            expires_at: None,
            max_devices: None,
        }];
        for (segment, labels) in examples::SEGMENTS {
            tokens.push(BootstrapToken {
                name: (*segment).to_owned(),
                token: format!("{token}-{segment}"),
                labels: dev_labels()
                    .chain(
                        labels
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
                    )
                    .collect(),
                expires_at: None,
                max_devices: None,
            });
        }
        let fleet_tokens: Vec<String> = tokens.iter().skip(1).map(|t| t.token.clone()).collect();
        gateway.auth().set_bootstrap_tokens(tokens);
        let (gw_addr, _gw) = gateway
            .spawn(opts.gateway_addr, shutdown.clone())
            .await
            .map_err(start("gateway"))?;
        println!(
            "Gateway         https://{gw_addr}   (CA {}; bootstrap token in {}/bootstrap-token; the fleet's segments: {})",
            pki.ca.display(),
            dir.display(),
            examples::SEGMENTS
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        );

        let namespaces: Api<Namespace> = Api::all(client.clone());
        if namespaces
            .get_opt("edgewise")
            .await
            .map_err(start("namespace"))?
            .is_none()
        {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "edgewise"}}))
                .map_err(start("namespace"))?;
            namespaces
                .create(&PostParams::default(), &ns)
                .await
                .map_err(start("namespace"))?;
        }
        let ctx = Arc::new(edgewise_operator::controller::Context::new(
            client.clone(),
            s3_client.clone(),
            Some(ch.clone()),
            Some(gateway.clone()),
            Some("edgewise-dev".into()),
        ));
        tokio::spawn(edgewise_operator::controller::feed_gateway(
            client.clone(),
            gateway.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(edgewise_operator::controller::run(ctx, shutdown.clone()));
        tokio::spawn(edgewise_operator::gateway::trust::follow_revocations(
            client.clone(),
            "edgewise".into(),
            gateway.clone(),
            shutdown.clone(),
        ));
        println!("Controllers     ModelVersion, ModelRollout, RoutingPolicy");
        println!(
            "Revocations     kubectl edgewise revoke device|token ID (ConfigMaps in namespace edgewise)"
        );
        let cloud_url = crate::cloud::start(&dir.join("cloud"), opts.cloud_addr, shutdown.clone())
            .await
            .map_err(start("cloud model server"))?;
        println!(
            "Cloud model     {cloud_url}   (OpenAI-compatible: {}, what the demo policy's cloud target calls)",
            crate::cloud::CLOUD_MODEL
        );

        // Devices execute their requests on the models they run; where a model's format has
        // no runtime here (ONNX), outcomes are synthetic, and version 3.0.0 of such a model
        // is slow: rolling it out shows an automatic rollback on a latency gate.
        // A small fleet sends more per device, so even a canary of one or two devices reaches
        // the demo analysis's sample count within seconds.
        let rps = opts
            .traffic_rps
            .unwrap_or_else(|| demo::requests_per_device(opts.devices));
        let traffic = (rps > 0.0).then(|| Traffic {
            requests_per_sec: rps,
            slow_versions: [("3.0.0".to_owned(), 6.0)].into(),
            ..Traffic::default()
        });
        let fleet = SimFleet::start(&SimConfig {
            devices: opts.devices,
            gateway: format!("https://{gw_addr}"),
            tls: edgewise_agent::GatewayTls {
                insecure: false,
                ca_pem: Some(std::fs::read(&pki.ca).map_err(start("dev CA"))?),
                pins: Vec::new(),
            },
            bootstrap_tokens: fleet_tokens,
            data_dir: dir.join("sim"),
            backoff: edgewise_agent::config::Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
            },
            devices_per_connection: 100,
            telemetry: true,
            traffic,
            runtime: true,
        })
        .map_err(start("simulated fleet"))?;
        println!("Fleet           {} simulated devices", opts.devices);
        Ok(DevStack {
            api,
            s3,
            s3_client,
            clickhouse_server,
            clickhouse: ch,
            gateway,
            client,
            fleet,
            cloud_url,
            shutdown,
        })
    }

    /// Stops every component.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.fleet.stop().await;
        if let Some(api) = self.api {
            api.stop().await;
        }
        self.s3.stop().await;
        if let Some(mut server) = self.clickhouse_server {
            server.stop().await;
        }
    }
}

/// A client for the current context of `kubeconfig`.
async fn cluster_client(kubeconfig: &std::path::Path) -> Result<(Client, String), Error> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(start("kubeconfig"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(start("kubeconfig"))?;
    let url = config.cluster_url.to_string();
    Ok((Client::try_from(config).map_err(start("kube client"))?, url))
}

/// Applies the CRDs (server-side, so a re-run updates them) and waits until the API server
/// serves them.
async fn install_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("edgewise-dev").force();
    for crd in edgewise_operator::crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(start("applying CRDs"))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| Error::CrdNotEstablished(name.clone()))?
        .map_err(start("waiting for CRDs"))?;
    }
    Ok(())
}

/// Runs the dev stack until `shutdown` (or the demo's end).
///
/// # Errors
/// [`Error`] saying which component or demo step failed, and how to fix it.
pub async fn run(opts: DevOptions, shutdown: CancellationToken) -> Result<(), Error> {
    if opts.exit_after_demo {
        demo::check_fleet(opts.devices)?;
    }
    let stack = DevStack::start(&opts, shutdown.clone()).await?;
    let outcome = if opts.exit_after_demo {
        demo::run(&stack).await.map_err(Error::from)
    } else {
        let kubeconfig = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| opts.data_dir.join("kubeconfig"));
        println!(
            "\nReady. Try: kubectl --kubeconfig {} apply -n edgewise -f examples/   (Ctrl-C to stop)",
            kubeconfig.display()
        );
        shutdown.cancelled().await;
        Ok(())
    };
    stack.stop().await;
    outcome
}
