//! Presigned artifact URLs. A URL is the same for every device, so one is signed per
//! artifact and reused until half its lifetime is spent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::presigning::PresigningConfig;
use edgewise_core::variant::Artifact;

/// A URL and its expiry (Unix ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedUrl {
    /// The presigned GET URL.
    pub url: String,
    /// When it stops working, Unix milliseconds.
    pub expires_at_unix_ms: i64,
}

/// Why a URL could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The artifact URI is not `s3://bucket/key`.
    #[error(transparent)]
    Uri(#[from] edgewise_core::variant::BadArtifactUri),
    /// The presigning configuration is invalid (expiry out of range).
    #[error("presigning: {0}")]
    Config(String),
}

/// Signs and caches artifact URLs.
#[derive(Debug)]
pub struct Presigner {
    client: aws_sdk_s3::Client,
    ttl: Duration,
    cache: Mutex<HashMap<String, SignedUrl>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Presigner {
    /// URLs valid for `ttl` (S3 allows up to 7 days).
    #[must_use]
    pub fn new(client: aws_sdk_s3::Client, ttl: Duration) -> Self {
        Presigner {
            client,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A GET URL for the artifact, valid for at least half the TTL.
    ///
    /// # Errors
    /// [`Error`] when the URI or the expiry is invalid.
    pub async fn url(&self, artifact: &Artifact) -> Result<SignedUrl, Error> {
        let now = now_ms();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&artifact.uri)
            .filter(|u| u.expires_at_unix_ms - now > ttl_ms / 2)
        {
            return Ok(hit.clone());
        }
        let (bucket, key) = artifact.location()?;
        let config =
            PresigningConfig::expires_in(self.ttl).map_err(|e| Error::Config(e.to_string()))?;
        let request = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        let signed = SignedUrl {
            url: request.uri().to_owned(),
            expires_at_unix_ms: now + ttl_ms,
        };
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(artifact.uri.clone(), signed.clone());
        Ok(signed)
    }
}
