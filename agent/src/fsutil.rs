//! Crash-safe file updates: write a temporary file, fsync it, rename it over the target,
//! fsync the directory. A crash at any point leaves the old or the new content, never a
//! torn file.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically. With `durable` off (the simulator) the fsyncs
/// are skipped: the rename is still atomic, only power-loss durability is given up.
///
/// # Errors
/// Any I/O error; the old content is then untouched.
pub fn atomic_write(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes a rename or create in `dir` durable.
///
/// # Errors
/// Any I/O error.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist.
///
/// # Errors
/// I/O errors other than absence, and parse errors (with the path).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// State files hold the device key and credential: only the agent's user reads them.
    #[test]
    fn state_files_are_private_to_the_agents_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.json");
        atomic_write(&path, b"{}", false).expect("writes");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}
