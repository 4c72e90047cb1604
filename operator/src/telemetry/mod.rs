//! Telemetry in ClickHouse: the schema and its migrations ([`schema`]), the gateway's
//! batched, back-pressured ingest ([`ingest`]), the rows ([`rows`]) and the gate metrics
//! and version skew the rollout controller reads ([`gates`]).

pub mod gates;
pub mod ingest;
pub mod rows;
pub mod schema;
pub mod summary;

/// A client for ClickHouse at `url`. Validation is off: ClickHouse 18.16 rejects the
/// settings the validating mode sends, and the rows here are typed by construction.
/// Inserts are LZ4-compressed across a network, but not to a server on loopback, where
/// compressing only costs CPU the server needs.
#[must_use]
pub fn client(url: &str) -> clickhouse::Client {
    let loopback = ["://127.", "://localhost", "://[::1]"]
        .iter()
        .any(|p| url.contains(p));
    let compression = if loopback {
        clickhouse::Compression::None
    } else {
        clickhouse::Compression::Lz4
    };
    clickhouse::Client::default()
        .with_url(url)
        .with_validation(false)
        .with_compression(compression)
}
