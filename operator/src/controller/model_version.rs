//! ModelVersion: verify every variant in S3 — the object exists, its size matches and the
//! SHA-256 of its bytes (streamed, never buffered whole) equals the spec — once per
//! generation; report how many devices run it.

use std::sync::Arc;
use std::time::Duration;

use edgewise_core::variant::Variant;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Context, Error, condition};
use crate::crd::{ModelVersion, ModelVersionPhase, VariantStatus};

/// Checks one variant's artifact; `Err` says what is wrong.
async fn verify(s3: &aws_sdk_s3::Client, v: &Variant) -> Result<(), String> {
    let (bucket, key) = v.artifact.location().map_err(|e| e.to_string())?;
    let head = s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| {
            format!(
                "{} not found or unreadable: {}",
                v.artifact.uri,
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        })?;
    let size = head.content_length().unwrap_or(-1);
    if u64::try_from(size).ok() != Some(v.artifact.size_bytes) {
        return Err(format!(
            "size mismatch: object has {size} bytes, spec says {}",
            v.artifact.size_bytes
        ));
    }
    let mut body = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| {
            format!(
                "reading {}: {}",
                v.artifact.uri,
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        })?
        .body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| format!("reading {}: {e}", v.artifact.uri))?
    {
        hasher.update(&chunk);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != v.artifact.sha256 {
        return Err(format!(
            "SHA-256 mismatch: spec says {}, object has {actual}",
            v.artifact.sha256
        ));
    }
    Ok(())
}

pub(super) async fn reconcile(mv: Arc<ModelVersion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = mv.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<ModelVersion> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = mv.metadata.generation;
    let status = mv.status.clone().unwrap_or_default();
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
    let done = status.observed_generation == generation
        && matches!(
            status.phase,
            Some(ModelVersionPhase::Ready | ModelVersionPhase::Failed)
        );
    if done {
        // Verified for this generation: only the device count moves.
        let desired = json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "status": {"devices": devices}});
        super::apply_status(&api, &mv.name_any(), mv.status.as_ref(), desired).await?;
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    if status.phase != Some(ModelVersionPhase::Verifying) {
        let verifying = json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion", "status": {"phase": "Verifying"}});
        super::apply_status(&api, &mv.name_any(), mv.status.as_ref(), verifying).await?;
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
            message: r.err(),
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
            "Ready",
            "ArtifactsVerified",
            format!("{ok} variant(s) verified"),
        )
    } else {
        ("Failed", "VerificationFailed", failures.join("; "))
    };
    ctx.event(mv.as_ref(), reason, message.clone(), !all).await;
    let desired = json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelVersion",
        "status": {
            "observedGeneration": generation,
            "phase": phase,
            "verified": format!("{ok}/{}", results.len()),
            "variants": results,
            "devices": devices,
            "conditions": [condition("Verified", all, reason, &message, generation)],
        }
    });
    super::apply_status(&api, &mv.name_any(), mv.status.as_ref(), desired).await?;
    Ok(Action::requeue(Duration::from_secs(15)))
}
