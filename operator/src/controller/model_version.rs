//! ModelVersion: verify every variant in S3 — the object exists, its size matches and the
//! SHA-256 of its bytes (streamed, never buffered whole) equals the spec — and its publisher
//! signature against the namespace's publisher keys, once per generation; report how many
//! devices run it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgewise_core::variant::Variant;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::status::{Cond, conditions, write_status};
use super::{Context, Error};
use crate::crd::names::condition;
use crate::crd::{ModelVersion, ModelVersionPhase, ModelVersionStatus, VariantStatus};

/// Why a variant's artifact failed verification; the text goes into the variant's status.
#[derive(Debug, thiserror::Error)]
enum Unverified {
    #[error(transparent)]
    Uri(#[from] edgewise_core::variant::BadArtifactUri),
    #[error("{uri}: {detail}")]
    Head { uri: String, detail: String },
    #[error("size mismatch: object has {actual} bytes, spec says {declared}")]
    Size { actual: i64, declared: u64 },
    #[error("reading {uri}: {detail}")]
    Read { uri: String, detail: String },
    #[error("SHA-256 mismatch: spec says {declared}, object has {actual}")]
    Sha256 { declared: String, actual: String },
    #[error(
        "signature does not verify with any key of {PUBLISHERS} as this model, version and variant"
    )]
    Signature,
    #[error("unsigned, and {PUBLISHERS} says requireSigned")]
    Unsigned,
    #[error("{PUBLISHERS}: {0}")]
    Publishers(String),
}

/// The ConfigMap of a namespace naming its trusted publishers: `<publisher>: <base64
/// Ed25519 public key>` entries, and `requireSigned: "true"` to refuse unsigned variants.
pub const PUBLISHERS: &str = "edgewise-publishers";

/// A namespace's publisher keys and whether it requires signed artifacts.
#[derive(Debug, Default)]
struct Publishers {
    keys: Vec<(String, ed25519_dalek::VerifyingKey)>,
    require_signed: bool,
}

impl Publishers {
    /// From the ConfigMap's data; a bad entry is named (and fails every verification in the
    /// namespace until fixed, rather than silently trusting less).
    fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        use base64::Engine as _;
        let mut out = Publishers::default();
        for (name, value) in data {
            if name == "requireSigned" {
                out.require_signed = value.trim() == "true";
                continue;
            }
            let key = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| format!("{name} is not base64 of a 32-byte Ed25519 public key"))?;
            out.keys.push((name.clone(), key));
        }
        Ok(out)
    }

    /// Who signed `v` of `model` `version`: `Ok(Some(publisher))`, `Ok(None)` when unsigned
    /// (or signed with no keys to check it) and allowed.
    fn check(&self, model: &str, version: &str, v: &Variant) -> Result<Option<String>, Unverified> {
        let signature = v.artifact.signature.as_deref().filter(|s| !s.is_empty());
        match signature {
            None if self.require_signed => Err(Unverified::Unsigned),
            None => Ok(None),
            Some(_) if self.keys.is_empty() && self.require_signed => Err(Unverified::Unsigned),
            Some(_) if self.keys.is_empty() => Ok(None),
            Some(sig) => self
                .keys
                .iter()
                .find(|(_, key)| {
                    edgewise_proto::identity::artifact_signature_valid(
                        key,
                        (model, version, &v.name),
                        &v.artifact.sha256,
                        sig,
                    )
                })
                .map(|(name, _)| Some(name.clone()))
                .ok_or(Unverified::Signature),
        }
    }
}

/// The publishers of `namespace` (none when it has no such ConfigMap).
async fn publishers(ctx: &Context, namespace: &str) -> Result<Result<Publishers, String>, Error> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(ctx.client.clone(), namespace);
    Ok(match api.get_opt(PUBLISHERS).await? {
        None => Ok(Publishers::default()),
        Some(cm) => Publishers::from_data(&cm.data.unwrap_or_default()),
    })
}

/// Checks one variant's artifact: present, of the declared size, with the declared SHA-256
/// (streamed, never buffered whole).
async fn verify(s3: &aws_sdk_s3::Client, v: &Variant) -> Result<(), Unverified> {
    let uri = &v.artifact.uri;
    let (bucket, key) = v.artifact.location()?;
    let head = match s3.head_object().bucket(bucket).key(key).send().await {
        Ok(head) => head,
        Err(e) => {
            // A HEAD answer has no body to say which is missing: ask about the bucket.
            let missing = e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
            let detail = if missing && s3.head_bucket().bucket(bucket).send().await.is_err() {
                format!("bucket {bucket} does not exist")
            } else if missing {
                format!("no object {key} in bucket {bucket}")
            } else {
                crate::s3::describe(&e)
            };
            return Err(Unverified::Head {
                uri: uri.clone(),
                detail,
            });
        }
    };
    let size = head.content_length().unwrap_or(-1);
    if u64::try_from(size).ok() != Some(v.artifact.size_bytes) {
        return Err(Unverified::Size {
            actual: size,
            declared: v.artifact.size_bytes,
        });
    }
    let read = |detail: String| Unverified::Read {
        uri: uri.clone(),
        detail,
    };
    let mut body = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| read(crate::s3::describe(&e)))?
        .body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.try_next().await.map_err(|e| read(e.to_string()))? {
        hasher.update(&chunk);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != v.artifact.sha256 {
        return Err(Unverified::Sha256 {
            declared: v.artifact.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

#[instrument(skip_all, fields(model_version = %super::key(mv.as_ref())))]
pub(super) async fn reconcile(mv: Arc<ModelVersion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = mv.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<ModelVersion> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = mv.metadata.generation;
    let current = mv.status.clone().unwrap_or_default();
    let devices = match (&ctx.gateway, &ctx.clickhouse) {
        (Some(gw), _) => Some(
            gw.registry()
                .devices()
                .iter()
                .filter(|d| d.active_version(&mv.spec.model) == Some(mv.spec.version.as_str()))
                .count() as u64,
        ),
        // The `controller` role: from the devices' latest status in ClickHouse.
        (None, Some(ch)) => crate::telemetry::gates::version_skew(ch, &mv.spec.model)
            .await?
            .into_iter()
            .find(|(v, _)| *v == mv.spec.version)
            .map(|(_, n)| n)
            .or(Some(0)),
        (None, None) => None,
    };
    let done = current.observed_generation == generation
        && matches!(
            current.phase,
            Some(ModelVersionPhase::Ready | ModelVersionPhase::Failed)
        );
    if done {
        // Verified for this generation: only the device count moves.
        let status = ModelVersionStatus { devices, ..current };
        write_status(&api, mv.as_ref(), status).await?;
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    let mut obj = mv.as_ref().clone();
    if current.phase != Some(ModelVersionPhase::Verifying) {
        let verifying = ModelVersionStatus {
            phase: Some(ModelVersionPhase::Verifying),
            devices,
            ..current.clone()
        };
        if let Some(written) = write_status(&api, &obj, verifying).await? {
            obj = written;
        }
        ctx.event(
            mv.as_ref(),
            "VerificationStarted",
            format!("checking {} variant(s) in S3", mv.spec.variants.len()),
            false,
        )
        .await;
    }
    let publishers = publishers(&ctx, &ns).await?;
    let mut results = Vec::new();
    for v in &mv.spec.variants {
        // The signature first: it costs nothing next to hashing the artifact.
        let r = match &publishers {
            Err(e) => Err(Unverified::Publishers(e.clone())),
            Ok(p) => p.check(&mv.spec.model, &mv.spec.version, v),
        };
        let r = match r {
            Ok(signed_by) => verify(&ctx.s3, v).await.map(|()| signed_by),
            Err(e) => Err(e),
        };
        results.push(match r {
            Ok(signed_by) => VariantStatus {
                name: v.name.clone(),
                verified: true,
                message: None,
                signed_by,
            },
            Err(e) => VariantStatus {
                name: v.name.clone(),
                verified: false,
                message: Some(e.to_string()),
                signed_by: None,
            },
        });
    }
    let ok = results.iter().filter(|r| r.verified).count();
    let all = ok == results.len();
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.message.as_ref().map(|m| format!("{}: {m}", r.name)))
        .collect();
    let (phase, reason, message) = if all {
        (
            ModelVersionPhase::Ready,
            "ArtifactsVerified",
            format!("{ok} variant(s) verified"),
        )
    } else {
        (
            ModelVersionPhase::Failed,
            "VerificationFailed",
            failures.join("; "),
        )
    };
    let previous = obj.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let status = ModelVersionStatus {
        observed_generation: generation,
        phase: Some(phase),
        verified: Some(format!("{ok}/{}", results.len())),
        variants: results,
        devices,
        conditions: conditions(
            previous,
            vec![
                Cond {
                    type_: condition::VERIFIED,
                    ok: all,
                    reason,
                    message: message.clone(),
                },
                Cond {
                    type_: condition::READY,
                    ok: all,
                    reason,
                    message: message.clone(),
                },
            ],
            generation,
        ),
    };
    if write_status(&api, &obj, status).await?.is_some() {
        ctx.event(mv.as_ref(), reason, message, !all).await;
    }
    Ok(Action::requeue(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer as _, SigningKey};
    use edgewise_core::variant::{Artifact, Requirements};

    use super::*;

    fn variant(signature: Option<String>) -> Variant {
        Variant {
            name: "cpu".into(),
            artifact: Artifact {
                uri: "s3://b/k".into(),
                sha256: "ab".repeat(32),
                size_bytes: 1,
                signature,
            },
            format: edgewise_core::variant::ModelFormat::Gguf,
            requires: Requirements::default(),
        }
    }

    fn signed(key: &SigningKey, version: &str) -> Option<String> {
        use base64::Engine as _;
        let message = edgewise_proto::identity::artifact_signing_message(
            "m",
            version,
            "cpu",
            &"ab".repeat(32),
        );
        Some(base64::engine::general_purpose::STANDARD.encode(key.sign(&message).to_bytes()))
    }

    fn data(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn publishers_name_the_signer_refuse_forgeries_and_may_require_a_signature() {
        use base64::Engine as _;
        let (acme, other) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let b64 = |k: &SigningKey| {
            base64::engine::general_purpose::STANDARD.encode(k.verifying_key().as_bytes())
        };
        let trusting = Publishers::from_data(&data(&[("acme", b64(&acme))])).expect("parses");
        assert_eq!(
            trusting
                .check("m", "1.0.0", &variant(signed(&acme, "1.0.0")))
                .expect("verifies"),
            Some("acme".to_owned())
        );
        // Another key, or acme's signature of another version (a replay): refused.
        for v in [signed(&other, "1.0.0"), signed(&acme, "0.9.0")] {
            assert!(matches!(
                trusting.check("m", "1.0.0", &variant(v)),
                Err(Unverified::Signature)
            ));
        }
        assert_eq!(
            trusting
                .check("m", "1.0.0", &variant(None))
                .expect("allowed"),
            None
        );
        let strict = Publishers::from_data(&data(&[
            ("acme", b64(&acme)),
            ("requireSigned", "true".into()),
        ]))
        .expect("parses");
        assert!(matches!(
            strict.check("m", "1.0.0", &variant(None)),
            Err(Unverified::Unsigned)
        ));
        let bad = Publishers::from_data(&data(&[("typo", "not a key".into())])).expect_err("named");
        assert!(bad.contains("typo"), "{bad}");
    }
}
