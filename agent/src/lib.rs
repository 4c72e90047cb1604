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

/// A channel to the gateway that dials lazily and redials on demand.
///
/// # Errors
/// When `url` is not a valid URI.
pub fn gateway_channel(url: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
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
