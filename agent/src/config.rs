//! Agent configuration: a TOML file, loaded (parsed, nothing else) and then built
//! (token read, hardware detected, keys decoded). Nothing binds a port or dials out here.
//!
//! ```toml
//! gateway = "https://edgewise-gateway.example.com:7443"   # http:// only with insecure = true
//! bootstrap_token_file = "/etc/edgewise/bootstrap-token"
//! data_dir = "/var/lib/edgewise"
//! router_socket = "/run/edgewise/router.sock"      # optional; default <data_dir>/router.sock
//! publisher_key = "base64 ed25519 public key"      # optional; then artifacts must be signed
//! probe_network = true                             # default: offline when the routing table
//!                                                  # has no default route (crate::network)
//!
//! insecure = false                                 # default; true accepts an http:// gateway
//!
//! [tls]                                            # how the gateway is verified
//! ca_file = "/etc/edgewise/gateway-ca.pem"         # optional; default: the system's roots
//! pins = ["sha256//base64 of a SubjectPublicKeyInfo's SHA-256"]   # optional: the chain
//!                                                  # must hold one of these keys
//!
//! [sockets]                                        # optional: who may use the Unix sockets
//! allowed_uids = [1000]                            # default: anyone the mode (0660) admits
//! allowed_gids = [2000]                            # the peer's primary gid
//!
//! [labels]                                         # self-reported, seen as `self.<key>`
//! channel = "beta"
//!
//! [hardware]                                       # all optional; detected when absent
//! accelerators = ["npu"]
//! memory_mib = 8192
//!
//! [sync]
//! backoff_initial_ms = 500
//! backoff_max_ms = 30000
//!
//! [data_plane]                                     # the OpenAI-compatible endpoint
//! listen = "127.0.0.1:8088"                        # default; enabled = false serves none
//! socket = "/run/edgewise/openai.sock"             # optional: also on a Unix socket
//! model_memory_mib = 2048                          # optional cap for loaded models
//! threads = 1                                      # its own runtime's threads (default 1)
//!
//! [[cloud]]                                        # keys for the endpoints policies name
//! endpoint = "https://api.openai.com/v1"
//! api_key_file = "/etc/edgewise/openai.key"        # or api_key_env = "OPENAI_API_KEY"
//!
//! [[runtime]]                                      # a server on the device for other formats
//! name = "llama-server"
//! formats = ["gguf"]                               # here: GGUF through llama.cpp, not candle
//! command = ["llama-server", "-m", "{model}", "--port", "{port}"]   # or url = "http://…/v1"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use edgewise_core::variant::DeviceFacts;
use edgewise_core::version::Version;
use serde::Deserialize;

/// The agent's own version, reported to the gateway.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A configuration problem, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and field).
        message: String,
    },
    /// A field has an unusable value.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Gateway URL: `https://`, or `http://` with `insecure`.
    pub gateway: String,
    /// Accept a cleartext (`http://`) gateway: only on a network you trust.
    #[serde(default)]
    pub insecure: bool,
    /// How the gateway's certificate is verified.
    #[serde(default)]
    pub tls: TlsConfig,
    /// File holding the bootstrap token.
    pub bootstrap_token_file: PathBuf,
    /// Where identity, models, policy and telemetry live.
    pub data_dir: PathBuf,
    /// Unix socket for the local Router API.
    #[serde(default)]
    pub router_socket: Option<PathBuf>,
    /// Who may connect to the Router and data-plane sockets.
    #[serde(default)]
    pub sockets: crate::local_socket::PeerPolicy,
    /// Base64 ed25519 public key of the model publisher; when set, unsigned or badly
    /// signed artifacts are refused.
    #[serde(default)]
    pub publisher_key: Option<String>,
    /// Self-reported labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Hardware facts; detected when absent.
    #[serde(default)]
    pub hardware: HardwareConfig,
    /// Reconnect behaviour.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Read the routing table for the router's `network` (see [`crate::network`]); off,
    /// the router assumes online unless a request says otherwise.
    #[serde(default = "probe_network_default")]
    pub probe_network: bool,
    /// The OpenAI-compatible endpoint apps send their requests to.
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// Credentials for cloud endpoints, by endpoint URL: policies name endpoints, never
    /// keys.
    #[serde(default)]
    pub cloud: Vec<CloudCredential>,
    /// OpenAI-compatible servers on the device for the formats they list.
    #[serde(default)]
    pub runtime: Vec<crate::runtime::external::ExternalConfig>,
}

fn probe_network_default() -> bool {
    true
}

/// The data plane's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlaneConfig {
    /// Listen address (loopback by default); `enabled = false` serves none.
    #[serde(default = "default_data_plane_listen")]
    pub listen: SocketAddr,
    /// Whether to serve it.
    #[serde(default = "probe_network_default")]
    pub enabled: bool,
    /// Memory the on-device runtime may use for models, MiB (default: what is free).
    #[serde(default)]
    pub model_memory_mib: Option<u64>,
    /// Also serve the API on this Unix socket (mode 0660), for apps that should not
    /// reach a TCP port.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Threads of the data plane's own runtime (default 1; docs/operations.md).
    #[serde(default = "one_thread")]
    pub threads: NonZeroUsize,
}

fn one_thread() -> NonZeroUsize {
    NonZeroUsize::MIN
}

fn default_data_plane_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8088))
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            listen: default_data_plane_listen(),
            enabled: true,
            model_memory_mib: None,
            socket: None,
            threads: one_thread(),
        }
    }
}

/// The API key the agent sends to one cloud endpoint.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudCredential {
    /// Endpoint URL as the policy writes it (`https://api.example.com/v1`).
    pub endpoint: String,
    /// File holding the key (read at each request, so rotation needs no restart).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Or an environment variable holding it.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

impl CloudCredential {
    /// The key, if one is configured and readable.
    #[must_use]
    pub fn key(&self) -> Option<String> {
        if let Some(f) = &self.api_key_file {
            return std::fs::read_to_string(f)
                .ok()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty());
        }
        self.api_key_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|k| !k.is_empty())
    }
}

/// Hardware facts that override detection.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareConfig {
    /// Operating system.
    pub os: Option<String>,
    /// CPU architecture.
    pub arch: Option<String>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Accelerators present (cannot be detected portably; declare them).
    #[serde(default)]
    pub accelerators: Vec<String>,
}

/// Reconnect settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// First backoff ceiling.
    #[serde(default = "default_initial")]
    pub backoff_initial_ms: u64,
    /// Largest backoff ceiling.
    #[serde(default = "default_max")]
    pub backoff_max_ms: u64,
}

fn default_initial() -> u64 {
    500
}
fn default_max() -> u64 {
    30_000
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            backoff_initial_ms: default_initial(),
            backoff_max_ms: default_max(),
        }
    }
}

/// Where a bootstrap token comes from. A file is read again at every enrolment, so a
/// token rotated on disk (a re-provisioned device, a control plane with new tokens) is
/// picked up without restarting the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// A fixed token (the simulator, tests).
    Fixed(String),
    /// A file holding the token.
    File(PathBuf),
}

impl From<&str> for TokenSource {
    fn from(token: &str) -> Self {
        TokenSource::Fixed(token.to_owned())
    }
}

impl From<String> for TokenSource {
    fn from(token: String) -> Self {
        TokenSource::Fixed(token)
    }
}

/// A bootstrap token that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file.
    #[error("bootstrap token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It holds nothing.
    #[error("bootstrap token file {} is empty", .0.display())]
    Empty(PathBuf),
}

impl TokenSource {
    /// The token now.
    ///
    /// # Errors
    /// [`TokenError`] when the file is unreadable or empty.
    pub fn read(&self) -> Result<String, TokenError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::File(path) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|source| TokenError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned();
                if token.is_empty() {
                    return Err(TokenError::Empty(path.clone()));
                }
                Ok(token)
            }
        }
    }
}

/// `[tls]`: trust for an `https://` gateway.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA certificate(s) the gateway's chain must end in, instead of the system's
    /// roots (a private CA, cert-manager's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `sha256//<base64>` pins of public keys, one of which the verified chain must hold
    /// (the issuing CA's key survives renewals): [`crate::pinning`].
    #[serde(default)]
    pub pins: Vec<String>,
}

/// A built, validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Gateway URL.
    pub gateway: String,
    /// How the gateway is trusted.
    pub gateway_tls: crate::GatewayTls,
    /// Bootstrap token: the file, validated when the config was built and read again at
    /// every enrolment.
    pub bootstrap_token: TokenSource,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Router socket path, if serving one.
    pub router_socket: Option<PathBuf>,
    /// Who may connect to the Unix sockets.
    pub socket_peers: crate::local_socket::PeerPolicy,
    /// Publisher key.
    pub publisher_key: Option<VerifyingKey>,
    /// Self-reported labels.
    pub labels: BTreeMap<String, String>,
    /// Device facts.
    pub facts: DeviceFacts,
    /// Backoff floor and ceiling.
    pub backoff: Backoff,
    /// fsync state changes (off only in the simulator).
    pub durable: bool,
    /// Derive `network` from the routing table.
    pub probe_network: bool,
    /// Where the data plane listens, if it runs.
    pub data_plane: Option<SocketAddr>,
    /// The data plane's Unix socket, if it serves one.
    pub data_plane_socket: Option<PathBuf>,
    /// Model memory for the runtime, bytes (`None`: what is free).
    pub model_memory: Option<u64>,
    /// Threads of the data plane's own runtime.
    pub data_plane_threads: NonZeroUsize,
    /// Cloud endpoint credentials.
    pub cloud: Vec<CloudCredential>,
    /// External runtimes on the device.
    pub runtimes: Vec<crate::runtime::external::ExternalConfig>,
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, initial × 2ⁿ))`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First ceiling.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl ConfigFile {
    /// Reads and parses the file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Validates, reads the token file and detects hardware.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn build(self) -> Result<AgentConfig, ConfigError> {
        if !(self.gateway.starts_with("http://") || self.gateway.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                field: "gateway",
                message: format!("{:?} is not an http(s) URL", self.gateway),
            });
        }
        if self.gateway.starts_with("http://") && !self.insecure {
            return Err(ConfigError::Invalid {
                field: "gateway",
                message: crate::ChannelError::Cleartext(self.gateway.clone()).to_string(),
            });
        }
        let ca_pem = self.tls.ca_file.as_deref().map(read_ca).transpose()?;
        let pins = self
            .tls
            .pins
            .iter()
            .map(|p| crate::pinning::parse_pin(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ConfigError::Invalid {
                field: "tls.pins",
                message,
            })?;
        // Read now so a missing or empty file fails at start, naming the field; it is read
        // again at every enrolment.
        if let Err(e) = TokenSource::File(self.bootstrap_token_file.clone()).read() {
            return Err(match e {
                TokenError::Read { path, source } => ConfigError::Read { path, source },
                TokenError::Empty(path) => ConfigError::Invalid {
                    field: "bootstrap_token_file",
                    message: format!("{} is empty", path.display()),
                },
            });
        }
        let publisher_key = self
            .publisher_key
            .as_deref()
            .map(parse_public_key)
            .transpose()?;
        if self.sync.backoff_initial_ms == 0
            || self.sync.backoff_max_ms < self.sync.backoff_initial_ms
        {
            return Err(ConfigError::Invalid {
                field: "sync",
                message: "backoff_initial_ms must be > 0 and <= backoff_max_ms".into(),
            });
        }
        if let Some(problem) = self.runtime.iter().find_map(|r| r.problem()) {
            return Err(ConfigError::Invalid {
                field: "runtime",
                message: problem,
            });
        }
        let router_socket = Some(
            self.router_socket
                .unwrap_or_else(|| self.data_dir.join("router.sock")),
        );
        Ok(AgentConfig {
            gateway: self.gateway,
            gateway_tls: crate::GatewayTls {
                insecure: self.insecure,
                ca_pem,
                pins,
            },
            bootstrap_token: TokenSource::File(self.bootstrap_token_file),
            facts: detect_facts(&self.hardware),
            router_socket,
            socket_peers: self.sockets,
            publisher_key,
            labels: self.labels,
            backoff: Backoff {
                initial: Duration::from_millis(self.sync.backoff_initial_ms),
                max: Duration::from_millis(self.sync.backoff_max_ms),
            },
            data_dir: self.data_dir,
            durable: true,
            probe_network: self.probe_network,
            data_plane: self.data_plane.enabled.then_some(self.data_plane.listen),
            data_plane_socket: self.data_plane.socket.filter(|_| self.data_plane.enabled),
            model_memory: self.data_plane.model_memory_mib.map(|m| m << 20),
            data_plane_threads: self.data_plane.threads,
            cloud: self.cloud,
            runtimes: self.runtime,
        })
    }
}

/// Reads a CA file, which must hold at least one PEM certificate.
fn read_ca(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Invalid {
            field: "tls.ca_file",
            message: format!("{}: not PEM certificates: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid {
            field: "tls.ca_file",
            message: format!("{} holds no CERTIFICATE block", path.display()),
        });
    }
    Ok(pem)
}

/// Decodes a base64 ed25519 public key.
///
/// # Errors
/// [`ConfigError::Invalid`] for `publisher_key`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        field: "publisher_key",
        message,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| invalid(format!("not base64: {e}")))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        invalid(format!("{} bytes; an ed25519 public key has 32", b.len()))
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| invalid(e.to_string()))
}

/// Facts from the config, else detected on this machine.
#[must_use]
pub fn detect_facts(hw: &HardwareConfig) -> DeviceFacts {
    // Reported in OCI names (`amd64`, `arm64`, `darwin`), as platforms are written.
    let arch =
        edgewise_core::variant::oci_arch(std::env::consts::ARCH).unwrap_or(std::env::consts::ARCH);
    let os = edgewise_core::variant::oci_os(std::env::consts::OS).unwrap_or(std::env::consts::OS);
    let memory_mib = hw.memory_mib.unwrap_or_else(|| {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        sys.total_memory() / (1024 * 1024)
    });
    DeviceFacts {
        os: hw.os.clone().unwrap_or_else(|| os.to_owned()),
        arch: hw.arch.clone().unwrap_or_else(|| arch.to_owned()),
        memory_mib,
        accelerators: hw.accelerators.clone(),
        agent_version: Version::parse(AGENT_VERSION).unwrap_or_else(|_| Version::new(0, 0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn a_minimal_config_builds_with_detected_hardware() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "token", "s3cret\n");
        let cfg = write(
            dir.path(),
            "agent.toml",
            &format!(
                "gateway = \"http://127.0.0.1:7443\"\ninsecure = true\nbootstrap_token_file = \"{}/token\"\ndata_dir = \"{}/data\"\n[hardware]\naccelerators = [\"npu\"]\n",
                dir.path().display(),
                dir.path().display()
            ),
        );
        let built = ConfigFile::load(&cfg)
            .expect("loads")
            .build()
            .expect("builds");
        assert_eq!(built.bootstrap_token.read().expect("reads"), "s3cret");
        assert!(built.facts.memory_mib > 0, "memory detected");
        assert_eq!(built.facts.os, std::env::consts::OS);
        assert_eq!(built.facts.accelerators, ["npu"]);
        assert_eq!(
            built.router_socket,
            Some(dir.path().join("data/router.sock"))
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write(
            dir.path(),
            "a.toml",
            "gateway = \"x\"\ninsecure = true\nbootstrap_token_file = \"t\"\ndata_dir = \"d\"\ncolour = 1\n",
        );
        let err = ConfigFile::load(&cfg)
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("colour"), "{err}");

        let cfg = write(
            dir.path(),
            "b.toml",
            "gateway = \"ftp://x\"\ninsecure = true\nbootstrap_token_file = \"t\"\ndata_dir = \"d\"\n",
        );
        let err = ConfigFile::load(&cfg)
            .expect("parses")
            .build()
            .expect_err("bad url")
            .to_string();
        assert!(err.starts_with("gateway:"), "{err}");

        let cfg = write(
            dir.path(),
            "c.toml",
            "gateway = \"x\"\ninsecure = true\nbootstrap_token_file = \"t\"\ndata_dir = \"d\"\n[data_plane]\nthreads = 0\n",
        );
        let err = ConfigFile::load(&cfg).expect_err("no threads").to_string();
        assert!(err.contains("threads") && err.contains("nonzero"), "{err}");

        assert!(
            parse_public_key("AAAA")
                .expect_err("short")
                .to_string()
                .contains("3 bytes")
        );
    }

    #[test]
    fn a_cleartext_gateway_needs_insecure_and_a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "token",
            "s3cret
",
        );
        let build = |extra: &str| {
            let text = format!(
                "bootstrap_token_file = \"{0}/token\"\ndata_dir = \"{0}/data\"\n{extra}",
                dir.path().display()
            );
            ConfigFile::load(&write(dir.path(), "agent.toml", &text))
                .expect("parses")
                .build()
        };
        let err = build("gateway = \"http://gw:7443\"\n")
            .expect_err("cleartext refused")
            .to_string();
        assert!(
            err.starts_with("gateway:") && err.contains("insecure = true"),
            "{err}"
        );
        let ok = build("gateway = \"http://gw:7443\"\ninsecure = true\n").expect("allowed");
        assert!(ok.gateway_tls.insecure);

        write(dir.path(), "ca.pem", "not a certificate\n");
        let err = build(&format!(
            "gateway = \"https://gw:7443\"\n[tls]\nca_file = \"{}/ca.pem\"\n",
            dir.path().display()
        ))
        .expect_err("no certificate")
        .to_string();
        assert!(err.starts_with("tls.ca_file:"), "{err}");
        let https = build("gateway = \"https://gw:7443\"\n").expect("system roots");
        assert!(!https.gateway_tls.insecure && https.gateway_tls.ca_pem.is_none());
    }
}
