//! Where models live on the device.
//!
//! - [`ContentStore`]: verified artifacts under `store/sha256/<digest>` (written once, never
//!   modified) and resumable partial downloads under `store/partial/<digest>`. The simulator
//!   shares one among its devices, so downloads of a digest are serialised per digest.
//! - [`ModelState`]: which install is active per model and which is kept for rollback, in
//!   one JSON file replaced atomically. Activation is that replacement, so a crash leaves
//!   either the old or the new version active, and the artifact it names is always complete
//!   (it was renamed into the store before the state could point at it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::fsutil::{atomic_write, read_json};

/// One installed model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Install {
    /// Version.
    pub version: String,
    /// Variant.
    pub variant: String,
    /// Format.
    pub format: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Path of the artifact.
    pub path: PathBuf,
    /// ModelRollout (`namespace/name`) that assigned it; tags its telemetry.
    #[serde(default)]
    pub rollout: String,
}

/// Active and previous install of one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// Serving now.
    pub active: Install,
    /// Kept on disk for instant rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Install>,
}

/// The persisted state of every model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsFile {
    /// By model family.
    #[serde(default)]
    pub models: BTreeMap<String, Slots>,
    /// Digests that failed verification, with the reason: never retried.
    #[serde(default)]
    pub failed: BTreeMap<String, String>,
}

/// Verified artifacts and partial downloads, by digest.
#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    durable: bool,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ContentStore {
    /// Opens (creating) the store under `root`.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn open(root: &Path, durable: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("sha256"))?;
        std::fs::create_dir_all(root.join("partial"))?;
        Ok(ContentStore {
            root: root.to_owned(),
            durable,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// Whether fsyncs are on.
    #[must_use]
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// Path of a verified artifact.
    #[must_use]
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    /// Path of a partial download.
    #[must_use]
    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.root.join("partial").join(sha256)
    }

    /// Whether a verified artifact is present.
    #[must_use]
    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// A lock that serialises work on one digest (one download at a time per artifact).
    #[must_use]
    pub fn digest_lock(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(sha256.to_owned())
            .or_default()
            .clone()
    }

    /// Removes artifacts and partials not in `keep`. Only for a store owned by one device.
    ///
    /// # Errors
    /// I/O errors while listing or removing.
    pub fn collect(&self, keep: &HashSet<String>) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for dir in ["sha256", "partial"] {
            for entry in std::fs::read_dir(self.root.join(dir))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    std::fs::remove_file(entry.path())?;
                    removed.push(name);
                }
            }
        }
        Ok(removed)
    }
}

/// Per-device model state, optionally persisted.
#[derive(Debug)]
pub struct ModelState {
    path: Option<PathBuf>,
    durable: bool,
    file: Mutex<ModelsFile>,
}

impl ModelState {
    /// In memory only (simulated devices).
    #[must_use]
    pub fn ephemeral() -> Self {
        ModelState {
            path: None,
            durable: false,
            file: Mutex::new(ModelsFile::default()),
        }
    }

    /// Loads `path` (an absent file is an empty state). Installs whose artifact is missing
    /// are dropped, so a hand-deleted store cannot leave a dangling active version.
    ///
    /// # Errors
    /// When the file is unreadable or not valid JSON.
    pub fn load(path: &Path, durable: bool) -> std::io::Result<Self> {
        let mut file: ModelsFile = read_json(path)?.unwrap_or_default();
        file.models.retain(|_, slots| slots.active.path.is_file());
        for slots in file.models.values_mut() {
            if slots.previous.as_ref().is_some_and(|p| !p.path.is_file()) {
                slots.previous = None;
            }
        }
        Ok(ModelState {
            path: Some(path.to_owned()),
            durable,
            file: Mutex::new(file),
        })
    }

    fn update<R>(&self, f: impl FnOnce(&mut ModelsFile) -> R) -> std::io::Result<R> {
        let mut guard = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = guard.clone();
        let out = f(&mut next);
        if let Some(path) = &self.path {
            let bytes = serde_json::to_vec_pretty(&next).map_err(std::io::Error::other)?;
            atomic_write(path, &bytes, self.durable)?;
        }
        *guard = next;
        Ok(out)
    }

    /// A copy of the state.
    #[must_use]
    pub fn snapshot(&self) -> ModelsFile {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The active install of `model`.
    #[must_use]
    pub fn active(&self, model: &str) -> Option<Install> {
        self.snapshot().models.get(model).map(|s| s.active.clone())
    }

    /// Makes `install` active; the old active one becomes `previous`.
    ///
    /// # Errors
    /// When the state file cannot be written; the old state then stays in force.
    pub fn activate(&self, model: &str, install: Install) -> std::io::Result<Option<Install>> {
        self.update(|f| {
            if f.models
                .get(model)
                .is_some_and(|s| s.active.sha256 == install.sha256)
            {
                return None; // already active: keep the true previous
            }
            let previous = f.models.get(model).map(|s| s.active.clone());
            let replaced = f.models.insert(
                model.to_owned(),
                Slots {
                    active: install,
                    previous: previous.clone(),
                },
            );
            replaced
                .and_then(|s| s.previous)
                .filter(|old| Some(old) != previous.as_ref())
        })
    }

    /// Re-activates the previous install of `model`.
    ///
    /// # Errors
    /// When the state file cannot be written.
    pub fn rollback(&self, model: &str) -> std::io::Result<bool> {
        self.update(|f| match f.models.get_mut(model) {
            Some(slots) => match slots.previous.take() {
                Some(prev) => {
                    slots.previous = Some(std::mem::replace(&mut slots.active, prev));
                    true
                }
                None => false,
            },
            None => false,
        })
    }

    /// Records a digest that must never be activated.
    ///
    /// # Errors
    /// When the state file cannot be written.
    pub fn mark_failed(&self, sha256: &str, reason: &str) -> std::io::Result<()> {
        self.update(|f| {
            f.failed.insert(sha256.to_owned(), reason.to_owned());
        })
    }

    /// Why a digest failed before, if it did.
    #[must_use]
    pub fn failed(&self, sha256: &str) -> Option<String> {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed
            .get(sha256)
            .cloned()
    }

    /// Digests the state refers to (active and previous).
    #[must_use]
    pub fn referenced(&self) -> HashSet<String> {
        self.snapshot()
            .models
            .values()
            .flat_map(|s| std::iter::once(&s.active).chain(s.previous.as_ref()))
            .map(|i| i.sha256.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(dir: &Path, version: &str, sha: &str) -> Install {
        let path = dir.join(sha);
        std::fs::write(&path, version).expect("write");
        Install {
            version: version.into(),
            variant: "cpu".into(),
            format: "onnx".into(),
            sha256: sha.into(),
            size_bytes: 5,
            path,
            rollout: "ns/r".into(),
        }
    }

    /// `m` at 1.0.0 (`aa`), then 2.0.0 (`bb`).
    fn two_versions(state: &ModelState, dir: &Path) {
        state
            .activate("m", install(dir, "1.0.0", "aa"))
            .expect("activates");
        state
            .activate("m", install(dir, "2.0.0", "bb"))
            .expect("activates");
    }

    #[test]
    fn activation_keeps_the_previous_version_and_rollback_swaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = ModelState::load(&dir.path().join("models.json"), true).expect("loads");
        two_versions(&state, dir.path());
        let reloaded = ModelState::load(&dir.path().join("models.json"), true).expect("reloads");
        assert_eq!(
            reloaded.active("m").map(|i| i.version),
            Some("2.0.0".into())
        );
        assert!(reloaded.rollback("m").expect("rolls back"));
        assert_eq!(
            reloaded.active("m").map(|i| i.version),
            Some("1.0.0".into())
        );
        assert_eq!(
            reloaded.referenced(),
            HashSet::from(["aa".to_owned(), "bb".to_owned()])
        );
    }

    #[test]
    fn reactivating_the_same_digest_keeps_the_true_previous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = ModelState::ephemeral();
        two_versions(&state, dir.path());
        state
            .activate("m", install(dir.path(), "2.0.0", "bb"))
            .expect("again");
        let snap = state.snapshot();
        assert_eq!(
            snap.models["m"]
                .previous
                .as_ref()
                .map(|p| p.version.as_str()),
            Some("1.0.0")
        );
    }

    #[test]
    fn installs_whose_artifact_vanished_are_dropped_on_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("models.json");
        let state = ModelState::load(&path, false).expect("loads");
        let i = install(dir.path(), "1.0.0", "aa");
        state.activate("m", i.clone()).expect("activates");
        std::fs::remove_file(&i.path).expect("rm");
        assert!(
            ModelState::load(&path, false)
                .expect("reloads")
                .active("m")
                .is_none()
        );
    }

    #[test]
    fn collect_removes_only_unreferenced_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path(), false).expect("opens");
        for d in ["keep", "drop"] {
            std::fs::write(store.blob_path(d), d).expect("write");
        }
        std::fs::write(store.partial_path("half"), "x").expect("write");
        let mut removed = store
            .collect(&HashSet::from(["keep".to_owned()]))
            .expect("collects");
        removed.sort();
        assert_eq!(removed, ["drop", "half"]);
        assert!(store.has_blob("keep"));
    }
}
