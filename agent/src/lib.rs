//! The Edgewise on-device agent.
//!
//! It keeps a device's models and routing policy in line with the control plane over the
//! `edgewise.v1.Fleet` protocol and answers routing questions locally through
//! `edgewise.agent.v1.Router` (a Unix socket) or in-process ([`router::LocalRouter`]),
//! offline too.
//!
//! - [`config`]: the TOML configuration, loaded then built;
//! - [`identity`]: device key, id and credential;
//! - [`store`] and [`download`]: the content-addressed store and resumable, verifying
//!   downloads; [`installer`] activates what the gateway assigns;
//! - [`policy`] and [`router`]: the last good policy and the local routing API;
//! - [`sync`]: the Sync client with backoff;
//! - [`agent`]: one real agent; [`simulate`]: many virtual devices in one process;
//! - [`status`]: what `edgewise-agent status` prints.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod device;
pub mod direct_io;
pub mod download;
pub mod fsutil;
pub mod identity;
pub mod installer;
pub mod local_socket;
pub mod network;
pub mod openai;
pub mod policy;
pub mod power;
pub mod router;
pub mod runtime;
pub mod simulate;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;

/// How the agent trusts its gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayTls {
    /// Accept an `http://` (cleartext) gateway URL: only on a network the operator trusts
    /// (the dev stack, tests). An `https://` URL is verified whatever this says.
    pub insecure: bool,
    /// PEM CA certificates to verify the gateway with, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl GatewayTls {
    /// Cleartext allowed, system roots for `https://`: the dev stack's and tests' setting.
    #[must_use]
    pub fn insecure() -> Self {
        GatewayTls {
            insecure: true,
            ca_pem: None,
        }
    }
}

/// Why there is no channel to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// An `http://` URL without `insecure`.
    #[error(
        "{0} is cleartext: the bootstrap token, credentials and policy would travel unencrypted; use https://, or set insecure = true on a network you trust"
    )]
    Cleartext(String),
    /// Neither `http://` nor `https://`.
    #[error("{0:?} is not an http(s) URL")]
    Scheme(String),
    /// Not a URI, or the TLS settings are unusable.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// A channel to the gateway that dials lazily and redials on demand; TLS for `https://`
/// (system roots, or `tls.ca_pem`), cleartext for `http://` only when `tls.insecure`.
///
/// # Errors
/// [`ChannelError`].
pub fn gateway_channel(
    url: &str,
    tls: &GatewayTls,
) -> Result<tonic::transport::Channel, ChannelError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let endpoint = if url.starts_with("https://") {
        let config = tonic::transport::ClientTlsConfig::new();
        endpoint.tls_config(match &tls.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        })?
    } else if url.starts_with("http://") {
        if !tls.insecure {
            return Err(ChannelError::Cleartext(url.to_owned()));
        }
        endpoint
    } else {
        return Err(ChannelError::Scheme(url.to_owned()));
    };
    Ok(endpoint.connect_lazy())
}

/// An HTTP client for artifact downloads.
///
/// # Errors
/// When the TLS backend cannot be initialised.
pub fn artifact_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        // No overall timeout (artifacts are large); a stalled body fails on read timeout.
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
}
