//! Resumable, verifying artifact download.
//!
//! Bytes go to `store/partial/<digest>` and through SHA-256 as they arrive (on a durable
//! store around the page cache, see [`crate::direct_io`]); a cut connection resumes with
//! `Range` from the bytes on disk (which are re-hashed first, so the digest always covers
//! the whole file). Only a complete file whose size, digest and (when a
//! publisher key is configured) signature check out is renamed into the store.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::VerifyingKey;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::RANGE;
use sha2::{Digest, Sha256};

use crate::direct_io::{ALIGN, DirectSink};
use crate::fsutil::sync_dir;
use crate::store::ContentStore;

/// What to fetch.
#[derive(Clone, Copy, Debug)]
pub struct Fetch<'a> {
    /// Presigned URL.
    pub url: &'a str,
    /// Expected SHA-256, lowercase hex.
    pub sha256: &'a str,
    /// Expected size.
    pub size: u64,
    /// Base64 ed25519 signature over
    /// [`artifact_signing_message`](edgewise_proto::identity::artifact_signing_message) of
    /// this model, version, variant and digest, if the publisher signed it.
    pub signature: Option<&'a str>,
    /// Model, version and variant the artifact is installed as: what the signature covers.
    pub signed_as: (&'a str, &'a str, &'a str),
    /// Publisher key; when set, a missing or bad signature is refused.
    pub publisher: Option<&'a VerifyingKey>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The connection broke or the server failed; the partial file is kept for resuming.
    #[error("download interrupted after {done} of {total} bytes: {message}")]
    Interrupted {
        /// Bytes on disk.
        done: u64,
        /// Expected size.
        total: u64,
        /// Cause.
        message: String,
    },
    /// The URL was refused (expired or tampered); ask the gateway for a new one.
    #[error("artifact URL refused with HTTP {0}; a fresh assignment is needed")]
    Refused(u16),
    /// The bytes are not what the assignment promised: never activated, never retried.
    #[error("{0}")]
    Corrupt(String),
    /// Local disk trouble.
    #[error("local storage: {0}")]
    Io(#[from] std::io::Error),
}

impl FetchError {
    /// Whether retrying the same assignment can help.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        matches!(self, FetchError::Corrupt(_))
    }
}

const CHUNK: usize = 1 << 20;
/// Written bytes between background flushes.
const FLUSH_EVERY: u64 = 64 << 20;

/// Flushes written data to disk in the background while the download goes on, so the
/// fsync before activation only has the tail left to write instead of the whole artifact.
#[derive(Default)]
struct FlushBehind {
    pending: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl FlushBehind {
    async fn flush_behind(&mut self, file: &std::fs::File) -> std::io::Result<()> {
        // At most one flush in flight: waiting here bounds dirty data to about two windows.
        self.finish().await?;
        let clone = file.try_clone()?;
        self.pending = Some(tokio::task::spawn_blocking(move || clone.sync_data()));
        Ok(())
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        match self.pending.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

/// Downloads and verifies an artifact into the store, returning its path. A digest that
/// is already in the store is returned at once. Every body byte received is added to
/// `network_bytes`, interrupted attempts included.
///
/// # Errors
/// [`FetchError`]; see its variants for what is kept and what is retried.
pub async fn fetch(
    http: &reqwest::Client,
    store: &ContentStore,
    f: Fetch<'_>,
    mut progress: impl FnMut(u64, u64),
    network_bytes: &AtomicU64,
) -> Result<PathBuf, FetchError> {
    let lock = store.digest_lock(f.sha256);
    let _guard = lock.lock().await;
    let blob = store.blob_path(f.sha256);
    if blob.is_file() {
        progress(f.size, f.size);
        return Ok(blob);
    }
    let partial_path = store.partial_path(f.sha256);
    let (mut hasher, mut done) = rehash_partial(&partial_path, f.size)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial_path)?;
    let mut flusher = FlushBehind::default();
    if done < f.size {
        let mut request = http.get(f.url);
        if done > 0 {
            request = request.header(RANGE, format!("bytes={done}-"));
        }
        let interrupted = |done: u64, message: String| FetchError::Interrupted {
            done,
            total: f.size,
            message,
        };
        let response = request
            .send()
            .await
            .map_err(|e| interrupted(done, e.to_string()))?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT if done > 0 => {}
            StatusCode::OK => {
                if done > 0 {
                    // The server ignored Range: start over.
                    file.set_len(0)?;
                    hasher = Sha256::new();
                    done = 0;
                }
            }
            s if s == StatusCode::FORBIDDEN
                || s == StatusCode::UNAUTHORIZED
                || s == StatusCode::NOT_FOUND =>
            {
                return Err(FetchError::Refused(s.as_u16()));
            }
            s => return Err(interrupted(done, format!("HTTP {s}"))),
        }
        let mut body = response.bytes_stream();
        progress(done, f.size);
        // Durable stores write around the page cache when the filesystem allows it.
        let direct = if store.durable() {
            DirectSink::open(&partial_path, done)?
        } else {
            None
        };
        if let Some(mut sink) = direct {
            let mut received = 0u64;
            let outcome = loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        network_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if done + received + chunk.len() as u64 > f.size {
                            // Let the writer stop before the file is emptied.
                            let _ = sink.finish().await;
                            file.set_len(0)?;
                            return Err(FetchError::Corrupt(format!(
                                "artifact is larger than the assigned {} bytes",
                                f.size
                            )));
                        }
                        if let Err(e) = sink.write(&chunk, &mut hasher).await {
                            break Err(e.to_string());
                        }
                        let before = received;
                        received += chunk.len() as u64;
                        if received / CHUNK as u64 != before / CHUNK as u64 {
                            progress(done + received, f.size);
                        }
                    }
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Ok(()),
                }
            };
            // Everything received is written (and hashed) either way: an interrupted
            // download resumes from it.
            sink.finish().await?;
            done += received;
            if let Err(message) = outcome {
                return Err(interrupted(done, message));
            }
            progress(done, f.size);
        } else {
            let mut buffer = Vec::with_capacity(CHUNK);
            loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        network_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if done + (buffer.len() + chunk.len()) as u64 > f.size {
                            file.set_len(0)?;
                            return Err(FetchError::Corrupt(format!(
                                "artifact is larger than the assigned {} bytes",
                                f.size
                            )));
                        }
                        // Hashed after the copy, from memory this core just wrote (see
                        // `DirectSink::write`).
                        let at = buffer.len();
                        buffer.extend_from_slice(&chunk);
                        hasher.update(&buffer[at..]);
                        if buffer.len() >= CHUNK {
                            file.write_all(&buffer)?;
                            done += buffer.len() as u64;
                            buffer.clear();
                            progress(done, f.size);
                            if store.durable() && done % FLUSH_EVERY < CHUNK as u64 {
                                flusher.flush_behind(&file).await?;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        file.write_all(&buffer)?;
                        done += buffer.len() as u64;
                        return Err(interrupted(done, e.to_string()));
                    }
                    None => break,
                }
            }
            file.write_all(&buffer)?;
            done += buffer.len() as u64;
            progress(done, f.size);
        }
    }
    if done != f.size {
        return Err(FetchError::Interrupted {
            done,
            total: f.size,
            message: "the server closed the body early".into(),
        });
    }
    let digest = hasher.finalize();
    let actual = hex::encode(digest);
    if actual != f.sha256 {
        drop(file);
        std::fs::remove_file(&partial_path)?;
        return Err(FetchError::Corrupt(format!(
            "SHA-256 mismatch: expected {}, got {actual}",
            f.sha256
        )));
    }
    if let Some(key) = f.publisher {
        let verified = f.signature.is_some_and(|s| {
            edgewise_proto::identity::artifact_signature_valid(key, f.signed_as, &actual, s)
        });
        if !verified {
            drop(file);
            std::fs::remove_file(&partial_path)?;
            return Err(FetchError::Corrupt(
                "publisher signature missing or invalid for this artifact as this model, version and variant".into(),
            ));
        }
    }
    flusher.finish().await?;
    if store.durable() {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&partial_path, &blob)?;
    if store.durable()
        && let Some(dir) = blob.parent()
    {
        sync_dir(dir)?;
    }
    Ok(blob)
}

/// Hashes the bytes already on disk; discards a partial larger than the artifact. The
/// partial is first cut to a multiple of [`ALIGN`], so direct writes resume at an aligned
/// offset (at most 4 KiB is fetched again).
fn rehash_partial(path: &std::path::Path, size: u64) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len > size {
        drop(file);
        std::fs::remove_file(path)?;
        return Ok((hasher, 0));
    }
    if len % ALIGN != 0 {
        file.set_len(len - len % ALIGN)?;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok((hasher, done))
}
