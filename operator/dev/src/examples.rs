//! What `examples/` needs from the dev stack, so `kubectl apply -f examples/` works as
//! shipped: the bucket and artifacts its ModelVersion names, and devices in the segments its
//! rollout selects (server-side labels, from the bootstrap token each device enrols with).
//!
//! The artifacts are placeholder bytes, made here and the same at every start, so the
//! example can carry their real SHA-256 and size.

use sha2::{Digest, Sha256};

/// The bucket `examples/modelversion.yaml` points at.
pub const BUCKET: &str = "edgewise-models";

/// `(key, size)` of each example artifact.
pub const ARTIFACTS: &[(&str, usize)] = &[
    ("assistant/2.1.0/assistant-q4_k_m.gguf", 3 << 20),
    ("assistant/2.1.0/assistant-int8.onnx", 1 << 20),
];

/// The labels of each segment the simulated fleet is split into (round robin), beside
/// `cluster: dev` which every dev device has.
pub const SEGMENTS: &[(&str, &[(&str, &str)])] = &[
    ("eu-beta", &[("region", "eu"), ("channel", "beta")]),
    ("eu-stable", &[("region", "eu"), ("channel", "stable")]),
    ("us-beta", &[("region", "us"), ("channel", "beta")]),
    ("apac-stable", &[("region", "apac"), ("channel", "stable")]),
];

/// The bytes of an example artifact: a SHA-256 counter stream seeded by its key.
#[must_use]
pub fn artifact(key: &str, size: usize) -> Vec<u8> {
    let seed = Sha256::digest(key.as_bytes());
    let mut out = Vec::with_capacity(size + 32);
    let mut block = 0u64;
    while out.len() < size {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(block.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        block += 1;
    }
    out.truncate(size);
    out
}

/// An upload that failed.
#[derive(Debug, thiserror::Error)]
#[error("uploading s3://{BUCKET}/{key}: {detail}")]
pub struct PublishError {
    /// The object key.
    pub key: &'static str,
    /// What the store said.
    pub detail: String,
}

/// Creates the bucket and uploads the artifacts it lacks.
///
/// # Errors
/// [`PublishError`] for an upload the store refused.
pub async fn publish(s3: &aws_sdk_s3::Client) -> Result<(), PublishError> {
    // An existing bucket answers BucketAlreadyOwnedByYou; nothing to do then.
    let _ = s3.create_bucket().bucket(BUCKET).send().await;
    for (key, size) in ARTIFACTS {
        if s3
            .head_object()
            .bucket(BUCKET)
            .key(*key)
            .send()
            .await
            .is_ok()
        {
            continue;
        }
        s3.put_object()
            .bucket(BUCKET)
            .key(*key)
            .body(artifact(key, *size).into())
            .send()
            .await
            .map_err(|e| PublishError {
                key,
                detail: edgewise_operator::s3::describe(&e),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_the_same_at_every_start_and_differ_from_each_other() {
        let (key, size) = ARTIFACTS[1];
        let a = artifact(key, size);
        assert_eq!(a.len(), size);
        assert_eq!(a, artifact(key, size));
        assert_ne!(a[..64], artifact(ARTIFACTS[0].0, 64)[..]);
    }
}
