//! Offline, then reconcile: a request whose rule asks for reprocessing and that the device
//! answered because it was offline is kept on disk, run again on the rule's cloud route once
//! the device is online, and offered to the app with whether the two answers agreed
//! (`GET /v1/edgewise/reprocessed`; `DELETE …/{id}` once the app has taken it).
//!
//! One file per request under `reprocess/pending/`, moved to `reprocess/done/` with the
//! cloud's answer: a crash loses neither, and a request is never run twice once done.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgewise_proto::router::{CloudRoute, Target, target::Kind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::fsutil::{atomic_write, read_json};

/// A request waiting for the cloud.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    /// Sortable id (creation time first), also in the first response's `edgewise.reprocess`.
    pub id: String,
    /// When the device answered, Unix ms.
    pub created_unix_ms: i64,
    /// `chat` or `completions`.
    pub endpoint: String,
    /// The app's request body as received.
    pub body: Value,
    /// The rule that asked for reprocessing.
    pub rule: String,
    /// The cloud target to run it on, as the decision named it (the policy may have
    /// changed by the time the device is online).
    pub target: CloudTarget,
    /// What the device answered.
    pub device_text: String,
    /// The device model version that answered.
    pub device_version: Option<String>,
}

/// A cloud target, kept with a pending request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudTarget {
    /// Target name in the policy.
    pub name: String,
    /// Endpoint URL.
    pub endpoint: String,
    /// Model at the endpoint.
    pub model: String,
    /// Price per 1,000 tokens, US dollars.
    pub cost_per_1k_tokens_usd: f64,
    /// Wait for the first token, ms.
    pub timeout_ms: u32,
}

impl CloudTarget {
    /// The cloud target of a decision; `None` for a device target.
    #[must_use]
    pub fn of(target: &Target) -> Option<Self> {
        match &target.kind {
            Some(Kind::Cloud(c)) => Some(CloudTarget {
                name: target.name.clone(),
                endpoint: c.endpoint.clone(),
                model: c.model.clone(),
                cost_per_1k_tokens_usd: c.cost_per_1k_tokens_usd,
                timeout_ms: c.timeout_ms,
            }),
            _ => None,
        }
    }

    /// As a decision names it.
    #[must_use]
    pub fn target(&self) -> Target {
        Target {
            name: self.name.clone(),
            kind: Some(Kind::Cloud(CloudRoute {
                endpoint: self.endpoint.clone(),
                model: self.model.clone(),
                cost_per_1k_tokens_usd: self.cost_per_1k_tokens_usd,
                timeout_ms: self.timeout_ms,
            })),
        }
    }
}

/// A reprocessed request, as the app receives it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reprocessed {
    /// The id the first response carried.
    pub id: String,
    /// When the device answered, Unix ms.
    pub created_unix_ms: i64,
    /// When the cloud answered, Unix ms.
    pub reprocessed_unix_ms: i64,
    /// The rule that asked for it.
    pub rule: String,
    /// The app's request body.
    pub request: Value,
    /// The device's answer: `{text, modelVersion}`.
    pub device: Value,
    /// The cloud's answer: `{target, model, text}`.
    pub cloud: Value,
    /// `{f1, agree}` (edgewise_core::agreement).
    pub agreement: Value,
}

/// The queue on disk.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    /// Woken when a request is queued.
    pub(crate) queued: Notify,
}

impl Queue {
    /// The queue under `dir` (created on first use).
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Queue {
            dir,
            queued: Notify::new(),
        }
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    fn done_dir(&self) -> PathBuf {
        self.dir.join("done")
    }

    /// A fresh sortable id.
    #[must_use]
    pub fn new_id() -> String {
        format!(
            "rp-{:013}-{:08x}",
            crate::telemetry::clock::now_unix_ms(),
            rand::random::<u32>()
        )
    }

    /// Keeps `pending` until the cloud has answered it.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn push(&self, pending: &Pending) -> std::io::Result<()> {
        let dir = self.pending_dir();
        std::fs::create_dir_all(&dir)?;
        let bytes = serde_json::to_vec(pending).map_err(std::io::Error::other)?;
        atomic_write(&dir.join(file_name(&pending.id)), &bytes, true)?;
        self.queued.notify_one();
        Ok(())
    }

    /// Requests waiting, oldest first.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn pending(&self) -> std::io::Result<Vec<Pending>> {
        list(&self.pending_dir())
    }

    /// Records the cloud's answer and forgets the pending request.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn complete(&self, done: &Reprocessed) -> std::io::Result<()> {
        let dir = self.done_dir();
        std::fs::create_dir_all(&dir)?;
        let bytes = serde_json::to_vec(done).map_err(std::io::Error::other)?;
        atomic_write(&dir.join(file_name(&done.id)), &bytes, true)?;
        match std::fs::remove_file(self.pending_dir().join(file_name(&done.id))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Reprocessed requests after `after` (an id), oldest first.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn done(&self, after: Option<&str>) -> std::io::Result<Vec<Reprocessed>> {
        let all: Vec<Reprocessed> = list(&self.done_dir())?;
        Ok(all
            .into_iter()
            .filter(|r| after.is_none_or(|a| r.id.as_str() > a))
            .collect())
    }

    /// Forgets a reprocessed request the app has taken; `false` if there was none.
    ///
    /// # Errors
    /// When it cannot be removed.
    pub fn forget(&self, id: &str) -> std::io::Result<bool> {
        if !valid_id(id) {
            return Ok(false);
        }
        match std::fs::remove_file(self.done_dir().join(file_name(id))) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Ids are ours (`rp-<digits>-<hex>`); anything else names no file.
fn valid_id(id: &str) -> bool {
    id.starts_with("rp-")
        && id[3..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn file_name(id: &str) -> String {
    format!("{id}.json")
}

fn list<T: serde::de::DeserializeOwned>(dir: &Path) -> std::io::Result<Vec<T>> {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for path in names {
        match read_json(&path) {
            Ok(Some(v)) => out.push(v),
            Ok(None) => {}
            // A file another writer is renaming is skipped; a corrupt one is left for people.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable reprocess file")
            }
        }
    }
    Ok(out)
}

/// The wait before trying the cloud again after the `failures`-th failure in a row.
#[must_use]
pub fn retry_after(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(7)).min(60_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str) -> Pending {
        Pending {
            id: id.into(),
            created_unix_ms: 1,
            endpoint: "chat".into(),
            body: serde_json::json!({"model": "m"}),
            rule: "r".into(),
            target: CloudTarget::default(),
            device_text: "device".into(),
            device_version: None,
        }
    }

    #[test]
    fn a_request_moves_from_pending_to_done_and_is_forgotten_when_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(dir.path().join("reprocess"));
        let (a, b) = (Queue::new_id(), Queue::new_id());
        q.push(&pending(&b)).expect("push");
        q.push(&pending(&a)).expect("push");
        let ids: Vec<String> = q
            .pending()
            .expect("list")
            .into_iter()
            .map(|p| p.id)
            .collect();
        let mut sorted = vec![a.clone(), b.clone()];
        sorted.sort();
        assert_eq!(ids, sorted, "oldest first");
        q.complete(&Reprocessed {
            id: a.clone(),
            created_unix_ms: 1,
            reprocessed_unix_ms: 2,
            rule: "r".into(),
            request: Value::Null,
            device: Value::Null,
            cloud: Value::Null,
            agreement: Value::Null,
        })
        .expect("complete");
        assert_eq!(q.pending().expect("list").len(), 1);
        assert_eq!(q.done(None).expect("done")[0].id, a);
        assert!(
            q.done(Some(&a)).expect("done").is_empty(),
            "after the cursor"
        );
        assert!(!q.forget("../../etc/passwd").expect("refused"));
        assert!(q.forget(&a).expect("forget"));
        assert!(!q.forget(&a).expect("gone"));
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        assert_eq!(retry_after(0), Duration::from_millis(500));
        assert_eq!(retry_after(1), Duration::from_secs(1));
        assert_eq!(retry_after(30), Duration::from_secs(60));
    }
}
