//! Publishing a model version: each variant's file goes to S3 (multipart above one part,
//! hashed while it is read, so a large model is read once), optionally signed, and the
//! ModelVersion naming them is built from what was uploaded. `kubectl edgewise publish`
//! creates it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use edgewise_core::variant::{Artifact, ModelFormat, Requirements, Variant};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::crd::{ModelVersion, ModelVersionSpec};

/// Bytes per multipart part (S3's minimum is 5 MiB, except the last).
pub const PART_BYTES: usize = 8 << 20;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A `--variant` value that does not parse.
    #[error("--variant {value}: {problem}")]
    Variant {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A local file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store refused an upload.
    #[error("uploading s3://{bucket}/{key}: {detail}")]
    Upload {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What the store said.
        detail: String,
    },
    /// The signing key file.
    #[error("signing key {}: {problem}", path.display())]
    SigningKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

/// One variant to publish: `NAME=FILE[,format=F][,platforms=os/arch;…][,min-memory-mib=N]
/// [,accelerators=npu;…][,min-agent-version=V]`.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantFile {
    /// Variant name.
    pub name: String,
    /// The file to upload.
    pub path: PathBuf,
    /// Its format (from the extension unless given).
    pub format: ModelFormat,
    /// What a device needs to get it.
    pub requires: Requirements,
}

fn format_of(path: &Path) -> Option<ModelFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "gguf" => ModelFormat::Gguf,
        "onnx" => ModelFormat::Onnx,
        "tflite" => ModelFormat::Tflite,
        "mlmodel" | "mlpackage" | "mlmodelc" => ModelFormat::Coreml,
        "safetensors" => ModelFormat::Safetensors,
        "pte" => ModelFormat::Executorch,
        _ => return None,
    })
}

impl FromStr for VariantFile {
    type Err = PublishError;

    fn from_str(value: &str) -> Result<Self, PublishError> {
        let bad = |problem: &str| PublishError::Variant {
            value: value.to_owned(),
            problem: problem.to_owned(),
        };
        let mut parts = value.split(',');
        let (name, file) = parts
            .next()
            .and_then(|p| p.split_once('='))
            .ok_or_else(|| bad("expected NAME=FILE"))?;
        if let Err(problems) = edgewise_core::names::dns_label(name) {
            return Err(bad(&format!("variant name: {}", problems.join("; "))));
        }
        let path = PathBuf::from(file);
        let mut format = format_of(&path);
        let mut requires = Requirements::default();
        let list = |v: &str| v.split(';').map(str::to_owned).collect::<Vec<_>>();
        for option in parts {
            let (key, v) = option
                .split_once('=')
                .ok_or_else(|| bad(&format!("{option}: expected key=value")))?;
            match key {
                "format" => {
                    format = Some(
                        serde_json::from_value(serde_json::Value::String(v.to_owned()))
                            .map_err(|_| bad(&format!("unknown format {v}")))?,
                    );
                }
                "platforms" => requires.platforms = list(v),
                "accelerators" => requires.accelerators = list(v),
                "min-memory-mib" => {
                    requires.min_memory_mib =
                        Some(v.parse().map_err(|_| bad("min-memory-mib is a number"))?);
                }
                "min-agent-version" => requires.min_agent_version = Some(v.to_owned()),
                other => {
                    return Err(bad(&format!(
                        "unknown option {other}; use format, platforms, accelerators, min-memory-mib or min-agent-version"
                    )));
                }
            }
        }
        let format = format.ok_or_else(|| {
            bad("cannot tell the format from the file name; add format=gguf (or onnx, tflite…)")
        })?;
        Ok(VariantFile {
            name: name.to_owned(),
            path,
            format,
            requires,
        })
    }
}

/// Reads an ed25519 signing key: base64 of its 32-byte seed.
///
/// # Errors
/// [`PublishError::SigningKey`] when the file is unreadable or not such a key.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, PublishError> {
    let problem = |problem: String| PublishError::SigningKey {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| problem(format!("not base64: {e}")))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| problem(format!("{} bytes; an ed25519 seed has 32", b.len())))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Progress of one upload: bytes sent of the total.
pub trait Progress {
    /// Called after each part.
    fn sent(&mut self, variant: &str, done: u64, total: u64);
}

impl<F: FnMut(&str, u64, u64)> Progress for F {
    fn sent(&mut self, variant: &str, done: u64, total: u64) {
        self(variant, done, total);
    }
}

/// Fills `buf` from `file` as far as it can; the bytes read (0 at the end).
async fn fill(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let read = file.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
    }
    Ok(n)
}

/// Uploads one file to `s3://bucket/key`, returning its SHA-256 (hex) and size.
///
/// # Errors
/// [`PublishError::Io`] for the file, [`PublishError::Upload`] for the store (a multipart
/// upload that fails is aborted, leaving no parts behind).
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    variant: &str,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<(String, u64), PublishError> {
    let io = |source| PublishError::Io {
        path: path.to_owned(),
        source,
    };
    let failed = |detail: String| PublishError::Upload {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        detail,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let total = file.metadata().await.map_err(io)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; PART_BYTES];
    let first = fill(&mut file, &mut buf).await.map_err(io)?;
    hasher.update(&buf[..first]);
    if (first as u64) == total {
        // One part: a plain PUT.
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(buf[..first].to_vec()))
            .send()
            .await
            .map_err(|e| failed(crate::s3::describe(&e)))?;
        progress.sent(variant, total, total);
        return Ok((hex::encode(hasher.finalize()), total));
    }
    let id = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| failed(crate::s3::describe(&e)))?
        .upload_id
        .unwrap_or_default();
    let parts = async {
        let mut parts = Vec::new();
        let (mut n, mut done) = (first, 0u64);
        while n > 0 {
            let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
            let sent = s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&id)
                .part_number(number)
                .body(ByteStream::from(buf[..n].to_vec()))
                .send()
                .await
                .map_err(|e| failed(crate::s3::describe(&e)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(sent.e_tag)
                    .build(),
            );
            done += n as u64;
            progress.sent(variant, done, total);
            n = fill(&mut file, &mut buf).await.map_err(io)?;
            hasher.update(&buf[..n]);
        }
        Ok::<_, PublishError>(parts)
    }
    .await;
    let completed = match parts {
        Ok(parts) => s3
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| failed(crate::s3::describe(&e)))
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = completed {
        let _ = s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .send()
            .await;
        return Err(e);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// What to publish.
#[derive(Debug)]
pub struct Publication {
    /// Model family.
    pub model: String,
    /// Semantic version.
    pub version: String,
    /// Bucket to upload to.
    pub bucket: String,
    /// Key prefix (default `MODEL/VERSION`).
    pub prefix: Option<String>,
    /// The variants.
    pub variants: Vec<VariantFile>,
    /// Signs each artifact's digest when given.
    pub signing_key: Option<SigningKey>,
}

/// Uploads every variant and returns the ModelVersion that names them (not yet created).
///
/// # Errors
/// [`PublishError`] for the first file or upload that fails.
pub async fn publish(
    s3: &aws_sdk_s3::Client,
    p: &Publication,
    progress: &mut dyn Progress,
) -> Result<ModelVersion, PublishError> {
    let prefix = p
        .prefix
        .clone()
        .unwrap_or_else(|| format!("{}/{}", p.model, p.version));
    let mut variants = Vec::new();
    for v in &p.variants {
        let file_name = v
            .path
            .file_name()
            .map_or_else(|| v.name.clone(), |f| f.to_string_lossy().into_owned());
        let key = format!("{}/{file_name}", prefix.trim_end_matches('/'));
        let (sha256, size) = upload(s3, &p.bucket, &key, &v.name, &v.path, progress).await?;
        // What the agent verifies: ed25519 over this model, version, variant and digest.
        let signature = p.signing_key.as_ref().map(|k| {
            let message = edgewise_proto::identity::artifact_signing_message(
                &p.model, &p.version, &v.name, &sha256,
            );
            base64::engine::general_purpose::STANDARD.encode(k.sign(&message).to_bytes())
        });
        variants.push(Variant {
            name: v.name.clone(),
            artifact: Artifact {
                uri: format!("s3://{}/{key}", p.bucket),
                sha256,
                size_bytes: size,
                signature,
            },
            format: v.format,
            requires: v.requires.clone(),
        });
    }
    let mut mv = ModelVersion::new(
        &format!("{}-{}", p.model, p.version),
        ModelVersionSpec {
            model: p.model.clone(),
            version: p.version.clone(),
            variants,
            deprecated: None,
        },
    );
    mv.metadata.labels = Some([("edgewise.dev/model".to_owned(), p.model.clone())].into());
    Ok(mv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_values_name_the_file_the_format_and_the_requirements() {
        let v: VariantFile =
            "cpu-int8=out/model.onnx,platforms=linux/arm64;android/arm64,min-memory-mib=3072"
                .parse()
                .expect("parses");
        assert_eq!(v.name, "cpu-int8");
        assert_eq!(v.format, ModelFormat::Onnx);
        assert_eq!(v.requires.platforms, ["linux/arm64", "android/arm64"]);
        assert_eq!(v.requires.min_memory_mib, Some(3072));
        let g: VariantFile = "q4=weights.bin,format=gguf".parse().expect("parses");
        assert_eq!(g.format, ModelFormat::Gguf);
    }

    #[test]
    fn bad_variant_values_say_what_to_write() {
        for (value, words) in [
            ("model.onnx", "NAME=FILE"),
            ("Bad_Name=m.onnx", "variant name"),
            ("x=weights.bin", "add format="),
            ("x=m.onnx,colour=red", "unknown option colour"),
            ("x=m.onnx,min-memory-mib=lots", "is a number"),
        ] {
            let err = value
                .parse::<VariantFile>()
                .expect_err("refused")
                .to_string();
            assert!(err.contains(words), "{value}: {err}");
        }
    }
}
