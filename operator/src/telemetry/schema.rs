//! Versioned, idempotent migrations for database `edgewise`.
//!
//! Every statement runs on ClickHouse 18.16 (Debian's) and on current releases, so it uses
//! only what both have: no `DateTime64`, `Map`, `LowCardinality` or TTL in the base schema.
//! Retention (TTL) is a migration of its own that runs only on a server that supports it,
//! and is recorded only when it ran, so it applies after the server is upgraded.
//!
//! Exactly-once counting rests on this schema: events are `ReplacingMergeTree` rows keyed by
//! their sorting key, which ends in `(device_id, event_id)`; a batch retried after a lost ack
//! (to any replica) writes identical keys, which collapse. Every query that counts reads
//! with `FINAL`.

use clickhouse::Client;

/// The database.
pub const DATABASE: &str = "edgewise";

/// Creates the migrations table itself.
pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS edgewise.schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime
) ENGINE = ReplacingMergeTree ORDER BY version";

/// What a migration needs of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requires {
    /// Any supported server.
    Any,
    /// Table TTL (ClickHouse 19.6 and later).
    Ttl,
}

/// One migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Version, increasing.
    pub version: u32,
    /// What it does.
    pub name: &'static str,
    /// Server capability it needs.
    pub requires: Requires,
    /// Statements, run in order; each is idempotent.
    pub statements: &'static [&'static str],
}

/// An event table: the columns every event has (its time, device, id and batch, which
/// make it unique), then `columns`, deduplicated on the key a retried batch repeats.
macro_rules! event_table {
    ($name:literal, $columns:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS edgewise.",
            $name,
            " (
                time DateTime,
                time_ms UInt64,
                device_id String,
                event_id String,
                batch_id String,
                rollout String,",
            $columns,
            ") ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(time)
            ORDER BY (model, version, time, device_id, event_id)"
        )
    };
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events, device status and batches",
        requires: Requires::Any,
        statements: &[
            event_table!(
                "inference_events",
                "
                model String,
                version String,
                variant String,
                target String,
                on_device UInt8,
                rule String,
                policy_version String,
                latency_ms Float64,
                ok UInt8,
                fallback_used UInt8,
                error String,
                input_tokens UInt32,
                output_tokens UInt32,
                cost_usd Float64,
                shadow Enum8('none' = 0, 'agree' = 1, 'disagree' = 2),
                task String,
                data_class String,
                received_at DateTime
"
            ),
            event_table!(
                "model_events",
                "
                kind Enum8('download_started' = 1, 'downloaded' = 2, 'activated' = 3, 'rolled_back' = 4, 'install_failed' = 5, 'collected' = 6),
                model String,
                version String,
                variant String,
                duration_ms UInt64,
                bytes UInt64,
                error String,
                received_at DateTime
"
            ),
            "CREATE TABLE IF NOT EXISTS edgewise.device_status (
                device_id String,
                updated_at DateTime,
                updated_ms UInt64,
                connected UInt8,
                agent_version String,
                os String,
                arch String,
                memory_mib UInt64,
                accelerators Array(String),
                label_keys Array(String),
                label_values Array(String),
                installed_models Array(String),
                installed_versions Array(String),
                policy_version String,
                connects UInt64,
                gateway String
            ) ENGINE = ReplacingMergeTree(updated_ms)
            ORDER BY device_id",
            "CREATE TABLE IF NOT EXISTS edgewise.telemetry_batches (
                device_id String,
                batch_id String,
                received_at DateTime,
                inference_events UInt32,
                model_events UInt32,
                dropped_events UInt64,
                gateway String
            ) ENGINE = ReplacingMergeTree
            ORDER BY (device_id, batch_id)",
        ],
    },
    Migration {
        version: 2,
        name: "retention: events 90 days, batches 30 days",
        requires: Requires::Ttl,
        statements: &[
            "ALTER TABLE edgewise.inference_events MODIFY TTL time + INTERVAL 90 DAY",
            "ALTER TABLE edgewise.model_events MODIFY TTL time + INTERVAL 90 DAY",
            "ALTER TABLE edgewise.telemetry_batches MODIFY TTL received_at + INTERVAL 30 DAY",
        ],
    },
    Migration {
        version: 3,
        name: "inference events: the learned router's version, time to first token",
        requires: Requires::Any,
        statements: &[
            "ALTER TABLE edgewise.inference_events ADD COLUMN router_version String DEFAULT ''",
            "ALTER TABLE edgewise.inference_events ADD COLUMN first_token_ms Float64 DEFAULT 0",
        ],
    },
];

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement failed.
    #[error("migration {version} ({name}): {source}")]
    Statement {
        /// Migration version.
        version: u32,
        /// Its name.
        name: &'static str,
        /// What ClickHouse said.
        #[source]
        source: clickhouse::error::Error,
    },
    /// Talking to ClickHouse failed.
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// What a migration run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Server version.
    pub server: String,
    /// Versions applied now.
    pub applied: Vec<u32>,
    /// Versions skipped because the server lacks what they need.
    pub skipped: Vec<u32>,
}

/// `(major, minor)` of a version string like `18.16.1` or `25.3.2.1`.
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Applies every migration not yet applied. Safe to run concurrently and repeatedly.
///
/// # Errors
/// [`Error`] naming the migration whose statement failed.
pub async fn migrate(client: &Client) -> Result<Report, Error> {
    client
        .query("CREATE DATABASE IF NOT EXISTS edgewise")
        .execute()
        .await?;
    client.query(MIGRATIONS_TABLE).execute().await?;
    let server: String = client.query("SELECT version()").fetch_one().await?;
    let ttl = major_minor(&server) >= (19, 6);
    let done: Vec<u32> = client
        .query("SELECT version FROM edgewise.schema_migrations FINAL")
        .fetch_all()
        .await?;
    let mut report = Report {
        server,
        ..Report::default()
    };
    for m in MIGRATIONS {
        if done.contains(&m.version) {
            continue;
        }
        if m.requires == Requires::Ttl && !ttl {
            report.skipped.push(m.version);
            continue;
        }
        for statement in m.statements {
            client
                .query(statement)
                .execute()
                .await
                .map_err(|source| Error::Statement {
                    version: m.version,
                    name: m.name,
                    source,
                })?;
        }
        client
            .query("INSERT INTO edgewise.schema_migrations (version, name, applied_at) SELECT ?, ?, now()")
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await?;
        report.applied.push(m.version);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_for_capability_checks() {
        assert!(major_minor("18.16.1") < (19, 6));
        assert!(major_minor("19.6.1.1") >= (19, 6));
        assert!(major_minor("25.3.2.39") >= (19, 6));
    }

    #[test]
    fn migration_versions_increase() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }
}
