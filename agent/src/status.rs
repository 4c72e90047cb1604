//! What `edgewise-agent status` prints. It asks the running agent over its socket (the
//! lane's `Status` method) and falls back to `status.json`, which the agent rewrites on
//! every change, only when no agent runs there, saying so and how old that state is.

use std::fmt::Write as _;
use std::path::Path;

use edgewise_proto::fleet::ModelState as WireState;
use serde::{Deserialize, Serialize};

use crate::device::{Activity, Connection, Device, Nack};
use crate::fsutil::{atomic_write, read_json};
use crate::store::ModelsFile;

/// One model in progress or done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelProgress {
    /// Model family.
    pub model: String,
    /// Version.
    pub version: String,
    /// `downloading`, `installed`, `active`, `failed`, `unsupported`.
    pub state: String,
    /// Bytes downloaded.
    pub bytes_done: u64,
    /// Artifact size.
    pub bytes_total: u64,
    /// Error, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The agent's own view: what the socket answers and what `status.json` keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusFile {
    /// Device id.
    pub device_id: String,
    /// Gateway URL.
    pub gateway: String,
    /// Connection state.
    pub connection: Connection,
    /// Routing policy version in force.
    #[serde(default)]
    pub policy_version: Option<String>,
    /// Where it came from.
    #[serde(default)]
    pub policy_source: Option<String>,
    /// Latest status per assigned model.
    #[serde(default)]
    pub models: Vec<ModelProgress>,
    /// Connection times and the last NACK.
    #[serde(default)]
    pub activity: Activity,
    /// Server-side labels, from the credential (these drive targeting).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Self-reported labels (selectors see them as `self.<key>`).
    #[serde(default)]
    pub self_labels: std::collections::BTreeMap<String, String>,
    /// What the on-device runtime serves, per model (live only).
    #[serde(default)]
    pub serving: Vec<crate::runtime::ServedModel>,
    /// The agent's process id.
    #[serde(default)]
    pub pid: u32,
    /// When this was taken, Unix ms.
    #[serde(default)]
    pub taken_at_unix_ms: i64,
}

fn state_name(state: i32) -> &'static str {
    match WireState::try_from(state).unwrap_or(WireState::Unspecified) {
        WireState::Downloading => "downloading",
        WireState::Installed => "installed",
        WireState::Active => "active",
        WireState::Failed => "failed",
        WireState::Unsupported => "unsupported",
        WireState::Unspecified => "unknown",
    }
}

impl StatusFile {
    /// The current status of a device.
    #[must_use]
    pub fn of(device: &Device, gateway: &str) -> Self {
        let policy = device.policy.current();
        let labels = device
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .credential()
            .map(|c| c.labels.clone())
            .unwrap_or_default();
        StatusFile {
            device_id: device.device_id.clone(),
            gateway: gateway.to_owned(),
            connection: device.connection.borrow().clone(),
            policy_version: policy.as_ref().map(|p| p.version.clone()),
            policy_source: policy.as_ref().map(|p| p.source.clone()),
            models: device
                .board
                .all()
                .into_values()
                .map(|s| ModelProgress {
                    state: state_name(s.state).to_owned(),
                    model: s.model,
                    version: s.version,
                    bytes_done: s.bytes_done,
                    bytes_total: s.bytes_total,
                    error: s.error,
                })
                .collect(),
            activity: device.activity.borrow().clone(),
            labels,
            self_labels: device.labels.clone(),
            serving: device
                .runtime
                .as_ref()
                .map(|r| r.status())
                .unwrap_or_default(),
            pid: std::process::id(),
            taken_at_unix_ms: crate::telemetry::clock::now_unix_ms(),
        }
    }

    /// Writes the file atomically (no fsync: it is rewritten often and only informative).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        atomic_write(path, &bytes, false)
    }
}

/// Where a status came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Asked of the running agent.
    Live,
    /// Read from `status.json`: no agent runs there now.
    Saved,
}

/// A status and where it came from, as `--output json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Live or saved.
    pub source: Source,
    /// The status, if any agent ever ran there.
    pub status: Option<StatusFile>,
    /// The installed models (from `models.json`).
    pub installed: ModelsFile,
}

/// Why there is no status to report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing has run in this data dir.
    #[error("no agent has run with data dir {0}: no status.json or models.json there")]
    NeverRan(String),
    /// A state file cannot be read.
    #[error("reading the agent's state in {dir}: {source}")]
    Read {
        /// The directory.
        dir: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Asks the agent on `socket`; `None` when none answers.
pub async fn live(socket: &Path) -> Option<StatusFile> {
    let mut lane = crate::router::lane::LaneClient::connect(socket)
        .await
        .ok()?;
    let json = lane.status().await.ok()?;
    serde_json::from_str(&json).ok()
}

/// The status of the agent with data dir `dir`: live from `socket` when it answers, else
/// what it saved.
///
/// # Errors
/// [`StatusError::NeverRan`] when no agent ever ran there.
pub async fn report(dir: &Path, socket: Option<&Path>) -> Result<Report, StatusError> {
    let read = |source| StatusError::Read {
        dir: dir.display().to_string(),
        source,
    };
    let installed: Option<ModelsFile> = read_json(&dir.join("models.json")).map_err(read)?;
    let live_status = match socket {
        Some(s) => live(s).await,
        None => None,
    };
    let (source, status) = match live_status {
        Some(s) => (Source::Live, Some(s)),
        None => (
            Source::Saved,
            read_json(&dir.join("status.json")).map_err(read)?,
        ),
    };
    if status.is_none() && installed.is_none() {
        return Err(StatusError::NeverRan(dir.display().to_string()));
    }
    Ok(Report {
        source,
        status,
        installed: installed.unwrap_or_default(),
    })
}

/// `2026-12-04 15:20:01 UTC (3m ago)`.
fn when(ms: i64, now_ms: i64) -> String {
    let Ok(t) = jiff::Timestamp::from_millisecond(ms) else {
        return "unknown".to_owned();
    };
    let ago = (now_ms - ms).max(0) / 1000;
    let ago = match ago {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    format!("{} ({ago} ago)", t.strftime("%Y-%m-%d %H:%M:%S UTC"))
}

fn labels(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nack_line(n: &Nack, now: i64) -> String {
    format!(
        "{} {} refused {}: {}",
        n.kind,
        n.version,
        when(n.at_unix_ms, now),
        n.reason
    )
}

/// The report in plain words.
#[must_use]
pub fn render(r: &Report) -> String {
    let now = crate::telemetry::clock::now_unix_ms();
    let mut out = String::new();
    match (&r.source, &r.status) {
        (Source::Live, Some(s)) => {
            let _ = writeln!(out, "agent       running (pid {})", s.pid);
        }
        (Source::Saved, Some(s)) => {
            let _ = writeln!(
                out,
                "agent       not running; its last state, saved {}",
                when(s.taken_at_unix_ms, now)
            );
        }
        (_, None) => {
            let _ = writeln!(
                out,
                "agent       not running; no saved state, only models on disk"
            );
        }
    }
    if let Some(s) = &r.status {
        let _ = writeln!(out, "device      {}", s.device_id);
        let connection = match s.activity.connection_since_unix_ms {
            Some(since) if r.source == Source::Live => {
                format!("{} since {}", s.connection, when(since, now))
            }
            Some(since) => format!("was {} since {}", s.connection, when(since, now)),
            None => s.connection.to_string(),
        };
        let _ = writeln!(out, "gateway     {} ({connection})", s.gateway);
        if let Some(last) = s.activity.last_sync_unix_ms {
            let _ = writeln!(out, "last sync   {}", when(last, now));
        }
        let _ = writeln!(out, "labels      {} (server-side)", labels(&s.labels));
        if !s.self_labels.is_empty() {
            let _ = writeln!(out, "self labels {}", labels(&s.self_labels));
        }
        let _ = writeln!(
            out,
            "policy      {}",
            s.policy_version.as_deref().map_or_else(
                || "none yet".to_owned(),
                |v| format!(
                    "{v} from {}",
                    s.policy_source.as_deref().unwrap_or("an unknown source")
                )
            )
        );
        if let Some(n) = &s.activity.last_nack {
            let _ = writeln!(out, "last NACK   {}", nack_line(n, now));
        }
    }
    let _ = writeln!(
        out,
        "\nMODEL        VERSION     VARIANT          SHA256        PREVIOUS"
    );
    if r.installed.models.is_empty() {
        let _ = writeln!(out, "(none installed)");
    }
    for (name, slots) in &r.installed.models {
        let _ = writeln!(
            out,
            "{name:<12} {:<11} {:<16} {:<13} {}",
            slots.active.version,
            slots.active.variant,
            &slots.active.sha256[..12.min(slots.active.sha256.len())],
            slots.previous.as_ref().map_or("-", |p| p.version.as_str())
        );
    }
    if let Some(s) = r.status.as_ref().filter(|s| !s.serving.is_empty()) {
        let _ = writeln!(
            out,
            "\nSERVING      VERSION     RUNTIME                    MEMORY     REQUESTS"
        );
        for m in &s.serving {
            let _ = writeln!(
                out,
                "{:<12} {:<11} {:<26} {:>6} MiB  {}",
                m.model,
                m.version,
                m.runtime,
                m.memory_bytes.div_ceil(1 << 20),
                m.requests
            );
        }
    }
    if let Some(s) = &r.status {
        let pending: Vec<&ModelProgress> =
            s.models.iter().filter(|m| m.state != "active").collect();
        if !pending.is_empty() {
            let _ = writeln!(
                out,
                "\nPENDING      VERSION     STATE        PROGRESS  ERROR"
            );
            for m in pending {
                let pct = (m.bytes_done * 100).checked_div(m.bytes_total).unwrap_or(0);
                let _ = writeln!(
                    out,
                    "{:<12} {:<11} {:<12} {pct:>7}%  {}",
                    m.model, m.version, m.state, m.error
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_a_date_and_an_age() {
        let t = 1_800_000_000_000;
        assert_eq!(when(t, t + 42_000), "2027-01-15 08:00:00 UTC (42s ago)");
        assert!(when(t, t + 3 * 3_600_000).ends_with("(3h ago)"));
    }
}
