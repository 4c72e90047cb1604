//! ModelVersion: verify every variant in S3 — the object exists, its size matches and the
//! SHA-256 of its bytes (streamed, never buffered whole) equals the spec — once per
//! generation; report how many devices run it.

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
    let mut results = Vec::new();
    for v in &mv.spec.variants {
        let r = verify(&ctx.s3, v).await;
        results.push(VariantStatus {
            name: v.name.clone(),
            verified: r.is_ok(),
            message: r.err().map(|e| e.to_string()),
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
