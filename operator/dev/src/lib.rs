//! The Edgewise dev stack: everything a laptop needs to try Edgewise with no cluster, and
//! what the end-to-end tests run on. A Kubernetes-compatible API endpoint for the Edgewise
//! kinds (with admission as an API server runs it), an embedded S3 server, a
//! `clickhouse-server` child process, the operator's controllers and gateway, a simulated
//! fleet and the demo. The production binary (`edgewise-operator`) links none of it.

pub mod admission;
pub mod clickhouse_server;
pub mod cloud;
pub mod demo;
pub mod devapi;
pub mod examples;
pub mod pki;
pub mod s3_server;
pub mod stack;

pub use demo::publish;

/// Binds `addr`: the listener and the address it got (the port, when `addr` asked for 0).
async fn listen(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}
pub use stack::{DevOptions, DevStack, Error, run};
