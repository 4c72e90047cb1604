//! What `examples/` needs from the dev stack, so `kubectl apply -f examples/` works as
//! shipped: the bucket and artifacts its ModelVersion names, and devices in the segments its
//! rollout selects (server-side labels, from the bootstrap token each device enrols with).
//!
//! The artifacts are made here, the same at every start, so the example can carry their real
//! SHA-256 and size: the GGUF variant is a real (tiny) model the devices' embedded runtime
//! serves; the ONNX variant is placeholder bytes (no device runtime here runs ONNX, so
//! devices install it and report synthetic traffic for it).

use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
use sha2::{Digest, Sha256};

/// The bucket `examples/modelversion.yaml` points at.
pub const BUCKET: &str = "edgewise-models";

/// The key of each example artifact.
pub const ARTIFACTS: &[&str] = &[
    "assistant/2.1.0/assistant-q4_0.gguf",
    "assistant/2.1.0/assistant-int8.onnx",
];

/// Size of the placeholder artifacts.
const PLACEHOLDER_BYTES: usize = 1 << 20;

/// The seed of the example's tiny model.
pub const EXAMPLE_MODEL_SEED: u64 = 21;

/// The labels of each segment the simulated fleet is split into (round robin), beside
/// `cluster: dev` which every dev device has.
pub const SEGMENTS: &[(&str, &[(&str, &str)])] = &[
    ("eu-beta", &[("region", "eu"), ("channel", "beta")]),
    ("eu-stable", &[("region", "eu"), ("channel", "stable")]),
    ("us-beta", &[("region", "us"), ("channel", "beta")]),
    ("apac-stable", &[("region", "apac"), ("channel", "stable")]),
];

/// The bytes of an example artifact: a tiny model for `.gguf` keys, else a SHA-256 counter
/// stream seeded by its key.
///
/// # Errors
/// When the model cannot be written.
pub fn artifact(key: &str) -> Result<Vec<u8>, candle_core::Error> {
    if key.ends_with(".gguf") {
        return tiny::bytes(TinyModel::new(EXAMPLE_MODEL_SEED, GgmlDType::Q4_0));
    }
    let seed = Sha256::digest(key.as_bytes());
    let mut out = Vec::with_capacity(PLACEHOLDER_BYTES + 32);
    let mut block = 0u64;
    while out.len() < PLACEHOLDER_BYTES {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(block.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        block += 1;
    }
    out.truncate(PLACEHOLDER_BYTES);
    Ok(out)
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
    for key in ARTIFACTS {
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
            .body(
                artifact(key)
                    .map_err(|e| PublishError {
                        key,
                        detail: e.to_string(),
                    })?
                    .into(),
            )
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
        let a = artifact(ARTIFACTS[1]).expect("bytes");
        assert_eq!(a.len(), PLACEHOLDER_BYTES);
        assert_eq!(a, artifact(ARTIFACTS[1]).expect("bytes"));
        let model = artifact(ARTIFACTS[0]).expect("a model");
        assert_eq!(model, artifact(ARTIFACTS[0]).expect("a model"));
        assert_eq!(&model[..4], b"GGUF");
    }

    #[test]
    fn the_example_carries_each_artifacts_digest_and_size() {
        let example = include_str!("../../../examples/modelversion.yaml");
        for key in ARTIFACTS {
            let bytes = artifact(key).expect("bytes");
            let digest = hex::encode(Sha256::digest(&bytes));
            assert!(
                example.contains(&format!("s3://{BUCKET}/{key}"))
                    && example.contains(&digest)
                    && example.contains(&format!("sizeBytes: {}", bytes.len())),
                "examples/modelversion.yaml must name {key} with sha256 {digest} and sizeBytes {}",
                bytes.len()
            );
        }
    }
}
