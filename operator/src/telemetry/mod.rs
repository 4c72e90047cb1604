//! Telemetry in ClickHouse: the schema and its migrations ([`schema`]), the gateway's
//! batched, back-pressured ingest ([`ingest`]), the rows ([`rows`]) and the gate metrics
//! and version skew the rollout controller reads ([`gates`]).

pub mod gates;
pub mod ingest;
pub mod rows;
pub mod schema;

/// A client for ClickHouse at `url`. Validation is off: ClickHouse 18.16 rejects the
/// settings the validating mode sends, and the rows here are typed by construction.
#[must_use]
pub fn client(url: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_validation(false)
}
