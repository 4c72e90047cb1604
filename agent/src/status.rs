//! What `edgewise-agent status` prints: the running agent keeps `status.json` current in
//! its data dir; the command reads it (and the model and policy files) without talking to
//! the agent, so it works while the agent is stopped too.

use std::fmt::Write as _;
use std::path::Path;

use edgewise_proto::fleet::ModelState as WireState;
use serde::{Deserialize, Serialize};

use crate::device::{Connection, Device};
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

/// The agent's own view, written to `status.json`.
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

/// Renders the status of the agent whose data dir is `dir`.
///
/// # Errors
/// When the files exist but cannot be read.
pub fn render(dir: &Path) -> std::io::Result<String> {
    let status: Option<StatusFile> = read_json(&dir.join("status.json"))?;
    let models: ModelsFile = read_json(&dir.join("models.json"))?.unwrap_or_default();
    let mut out = String::new();
    match &status {
        Some(s) => {
            let _ = writeln!(out, "device      {}", s.device_id);
            let _ = writeln!(out, "gateway     {} ({:?})", s.gateway, s.connection);
            let _ = writeln!(
                out,
                "policy      {}",
                s.policy_version.as_deref().map_or_else(
                    || "none".to_owned(),
                    |v| format!("{v} from {}", s.policy_source.as_deref().unwrap_or("?"))
                )
            );
        }
        None => {
            let _ = writeln!(
                out,
                "no status.json in {}: the agent has not run here",
                dir.display()
            );
        }
    }
    let _ = writeln!(
        out,
        "\nMODEL        VERSION     VARIANT          SHA256        PREVIOUS"
    );
    for (name, slots) in &models.models {
        let _ = writeln!(
            out,
            "{name:<12} {:<11} {:<16} {:<13} {}",
            slots.active.version,
            slots.active.variant,
            &slots.active.sha256[..12.min(slots.active.sha256.len())],
            slots.previous.as_ref().map_or("-", |p| p.version.as_str())
        );
    }
    if let Some(s) = &status {
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
    Ok(out)
}
