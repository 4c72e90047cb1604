//! What one device should run: per model, the rollout that targets it, the version its
//! cohort gets and the variant its facts allow; and the routing policy that applies.
//!
//! A pure function of the snapshot and the device, so every replica computes the same.

use std::collections::BTreeMap;

use edgewise_core::cohort::bucket;
use edgewise_core::variant::{Artifact, DeviceFacts, ModelFormat, NoVariantFits, choose_variant};
use kube::ResourceExt;

use super::snapshot::{FleetSnapshot, PolicyEntry};
use crate::crd::{ModelRollout, ModelVersionPhase};
use crate::telemetry::ingest::Reported;

/// The device as targeting sees it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceContext<'a> {
    /// Device id.
    pub device_id: &'a str,
    /// Targeting labels (server-side and `self.`-prefixed).
    pub labels: &'a BTreeMap<String, String>,
    /// Reported facts.
    pub facts: &'a DeviceFacts,
}

/// The variant a device should install.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredVariant {
    /// Variant name.
    pub name: String,
    /// Format.
    pub format: ModelFormat,
    /// Where and what.
    pub artifact: Artifact,
}

/// One model the device should run.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredModel {
    /// Version.
    pub version: String,
    /// `namespace/name` of the deciding rollout.
    pub rollout: String,
    /// Whether the device is in the canary cohort.
    pub canary: bool,
    /// The variant, or why none fits.
    pub variant: Result<DesiredVariant, NoVariantFits>,
}

/// The policy the device should run.
#[derive(Clone, Debug)]
pub struct DesiredPolicy {
    /// `namespace/name`.
    pub source: String,
    /// The entry (version and wire form).
    pub entry: PolicyEntry,
}

/// Everything a device should run.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// By model family.
    pub models: BTreeMap<String, DesiredModel>,
    /// Routing policy, if any applies.
    pub policy: Option<DesiredPolicy>,
}

/// The salt of a rollout's cohort: `namespace/name`.
#[must_use]
pub fn cohort_salt(rollout: &ModelRollout) -> String {
    format!(
        "{}/{}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any()
    )
}

/// Whether `device_id`, enrolled with the server-side `labels`, may report telemetry of
/// `version` of `model` under `rollout` (`namespace/name`): the rollout must select the
/// device by the labels it cannot forge (requirements on self-reported `self.` keys count
/// as met, since a device can claim any), and a rollout's canary version speaks only for
/// the devices of its canary cohort (by the same bucket the gateway assigned them), so a
/// device outside it cannot move the canary's gates. A variant must be one the version's
/// ModelVersion lists. Rollouts this snapshot does not know (late events of a deleted one)
/// pass. `Err` says why not.
///
/// # Errors
/// The reason the event is refused.
pub fn may_report(
    snapshot: &FleetSnapshot,
    device_id: &str,
    labels: &BTreeMap<String, String>,
    reported: &Reported<'_>,
) -> Result<(), String> {
    let Reported {
        rollout,
        model,
        version,
        variant,
    } = *reported;
    // `rollout` is `namespace/name`: the snapshot's key, and the cohort salt.
    let Some(r) = rollout
        .split_once('/')
        .and_then(|(ns, name)| snapshot.rollouts.get(&(ns.to_owned(), name.to_owned())))
    else {
        return Ok(());
    };
    if r.spec.model != model {
        return Err(format!(
            "rollout {rollout} rolls out model {}, not {model}",
            r.spec.model
        ));
    }
    let unforgeable = |key: &str| !key.starts_with(super::auth::SELF_LABEL_PREFIX);
    if !r.spec.selector.matches_where(labels, unforgeable) {
        return Err(format!(
            "rollout {rollout} does not select this device (by the labels it enrolled with)"
        ));
    }
    let namespace = r.namespace().unwrap_or_default();
    let listed = snapshot.model_versions.iter().find_map(|((ns, _), mv)| {
        (*ns == namespace && mv.spec.model == model && mv.spec.version == version)
            .then(|| mv.spec.variants.iter().any(|v| v.name == variant))
    });
    if !variant.is_empty() && listed == Some(false) {
        return Err(format!(
            "variant {variant} is not a variant of {model} {version}"
        ));
    }
    let Some(state) = r.status.as_ref().map(|s| &s.state) else {
        return Ok(());
    };
    let is_canary = state.canary_version.as_deref() == Some(version)
        && state.stable_version.as_deref() != Some(version);
    if is_canary && state.version_for(bucket(rollout, device_id)) != Some(version) {
        return Err(format!(
            "version {version} is the canary of {rollout} and this device is not in its cohort"
        ));
    }
    Ok(())
}

/// Computes what a device should run.
#[must_use]
pub fn desired_for(snapshot: &FleetSnapshot, device: DeviceContext<'_>) -> Desired {
    let mut models = BTreeMap::new();
    // Oldest rollout first, so it wins a model for devices its selector shares with a newer one.
    let mut rollouts: Vec<&ModelRollout> = snapshot
        .rollouts
        .values()
        .map(AsRef::as_ref)
        .filter(|r| r.spec.selector.matches(device.labels))
        .collect();
    rollouts.sort_by(|a, b| {
        (a.metadata.creation_timestamp.as_ref(), cohort_salt(a))
            .cmp(&(b.metadata.creation_timestamp.as_ref(), cohort_salt(b)))
    });
    for rollout in rollouts {
        if models.contains_key(&rollout.spec.model) {
            continue;
        }
        if let Some(desired) = model_for(snapshot, rollout, device) {
            models.insert(rollout.spec.model.clone(), desired);
        }
    }
    Desired {
        models,
        policy: policy_for(snapshot, device.labels),
    }
}

fn model_for(
    snapshot: &FleetSnapshot,
    rollout: &ModelRollout,
    device: DeviceContext<'_>,
) -> Option<DesiredModel> {
    let state = &rollout.status.as_ref()?.state;
    let salt = cohort_salt(rollout);
    let chosen = state.version_for(bucket(&salt, device.device_id))?;
    let stable = state.stable_version.as_deref();
    let namespace = rollout.namespace().unwrap_or_default();
    let ready = |version: &str| {
        snapshot.model_versions.iter().find_map(|((ns, _), mv)| {
            (ns == &namespace
                && mv.spec.model == rollout.spec.model
                && mv.spec.version == version
                && mv.status.as_ref().and_then(|s| s.phase) == Some(ModelVersionPhase::Ready))
            .then_some(mv)
        })
    };
    // A canary whose ModelVersion is not Ready (not verified, or failed) is never assigned:
    // its cohort stays on the stable version.
    let (version, mv) = match ready(chosen) {
        Some(mv) => (chosen, mv),
        None => {
            let stable = stable?;
            (stable, ready(stable)?)
        }
    };
    let canary = state.canary_version.as_deref() == Some(version) && stable != Some(version);
    let variant = choose_variant(&mv.spec.variants, device.facts).map(|i| {
        let v = &mv.spec.variants[i];
        DesiredVariant {
            name: v.name.clone(),
            format: v.format,
            artifact: v.artifact.clone(),
        }
    });
    Some(DesiredModel {
        version: version.to_owned(),
        rollout: salt,
        canary,
        variant,
    })
}

fn policy_for(
    snapshot: &FleetSnapshot,
    labels: &BTreeMap<String, String>,
) -> Option<DesiredPolicy> {
    snapshot
        .policies
        .iter()
        .filter(|(_, p)| p.object.spec.policy.selector.matches(labels))
        // Highest priority wins; among equals the oldest, then the first by name.
        .min_by(|(ka, a), (kb, b)| {
            b.object
                .spec
                .policy
                .priority
                .cmp(&a.object.spec.policy.priority)
                .then_with(|| {
                    a.object
                        .metadata
                        .creation_timestamp
                        .cmp(&b.object.metadata.creation_timestamp)
                })
                .then_with(|| ka.cmp(kb))
        })
        .map(|((ns, name), entry)| DesiredPolicy {
            source: format!("{ns}/{name}"),
            entry: entry.clone(),
        })
}
