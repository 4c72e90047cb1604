//! Works through the desired assignments: download, verify, activate, report. One model at
//! a time; a new assignment for the model being downloaded interrupts the download (the
//! partial file stays for a later resume).

use std::sync::Arc;
use std::time::Duration;

use edgewise_proto::fleet::{ModelAssignment, ModelEventKind, ModelState as WireState};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::device::Device;
use crate::download::{Fetch, FetchError, fetch};
use crate::router::ModelsView;
use crate::runtime::Loaded;
use crate::store::Install;

/// Transient download failures retried before waiting for a fresh assignment.
const ATTEMPTS: u32 = 8;

/// Runs until `shutdown`.
#[tracing::instrument(name = "installer", skip_all, fields(device = %device.device_id))]
pub async fn run(device: Arc<Device>, http: reqwest::Client, shutdown: CancellationToken) {
    let mut desired = device.desired.subscribe();
    loop {
        let wanted = desired.borrow_and_update().clone();
        for (model, assignment) in &wanted {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = install(&device, &http, model, assignment) => {}
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Start over with the new desired set; a download in flight is dropped
                    // here and resumes from its partial file if still wanted.
                    break;
                }
            }
        }
        if desired.has_changed().unwrap_or(false) {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = desired.changed() => if changed.is_err() { return },
        }
    }
}

async fn install(device: &Device, http: &reqwest::Client, model: &str, a: &ModelAssignment) {
    if !a.unsupported_reason.is_empty() {
        device.report(
            model,
            a,
            WireState::Unsupported,
            0,
            a.unsupported_reason.clone(),
        );
        return;
    }
    let started = std::time::Instant::now();
    let current = device.state.snapshot().models.get(model).cloned();
    if current
        .as_ref()
        .is_some_and(|s| s.active.sha256 == a.sha256)
    {
        device.report(model, a, WireState::Active, a.size_bytes, String::new());
        return;
    }
    if let Some(reason) = device.state.failed(&a.sha256) {
        device.report(model, a, WireState::Failed, 0, reason);
        return;
    }
    if current
        .as_ref()
        .and_then(|s| s.previous.as_ref())
        .is_some_and(|p| p.sha256 == a.sha256)
    {
        // Rolling back to the version kept on disk: no download.
        let previous = current.as_ref().and_then(|s| s.previous.clone());
        let loaded = match previous {
            Some(p) => match prepare(device, model, &p).await {
                Ok(l) => l,
                Err(reason) => {
                    install_failed(device, model, a, started, reason).await;
                    return;
                }
            },
            None => None,
        };
        match device.state.rollback(model) {
            Ok(_) => {
                serve(device, loaded);
                info!(%model, version = %a.version, "rolled back to the previous version");
                publish(device);
                device.report(model, a, WireState::Active, a.size_bytes, String::new());
                device
                    .record_model_event(ModelEventKind::RolledBack, model, a, 0, 0, String::new())
                    .await;
            }
            Err(e) => device.report(model, a, WireState::Failed, 0, format!("rollback: {e}")),
        }
        return;
    }
    let fetch_spec = Fetch {
        url: &a.url,
        sha256: &a.sha256,
        size: a.size_bytes,
        signature: Some(a.signature.as_str()),
        signed_as: (model, &a.version, &a.variant),
        publisher: device.publisher.as_ref(),
    };
    device
        .record_model_event(
            ModelEventKind::DownloadStarted,
            model,
            a,
            0,
            0,
            String::new(),
        )
        .await;
    let mut last_reported = 0u64;
    let step = (a.size_bytes / 20).max(1);
    let mut attempt = 0;
    let path = loop {
        attempt += 1;
        let result = fetch(
            http,
            &device.content,
            fetch_spec,
            |done, total| {
                if done == total || done >= last_reported + step || done < last_reported {
                    last_reported = done;
                    device.report(model, a, WireState::Downloading, done, String::new());
                }
            },
            &device.stats.artifact_bytes,
        )
        .await;
        match result {
            Ok(path) => break path,
            Err(e) if e.is_permanent() => {
                warn!(%model, version = %a.version, error = %e, "artifact refused; never activated");
                if let Err(io) = device.state.mark_failed(&a.sha256, &e.to_string()) {
                    warn!(error = %io, "recording the failed digest");
                }
                install_failed(device, model, a, started, e.to_string()).await;
                return;
            }
            Err(FetchError::Refused(code)) => {
                device.report(
                    model,
                    a,
                    WireState::Failed,
                    0,
                    format!("artifact URL refused (HTTP {code}); reconnecting for a fresh one"),
                );
                device.refresh.notify_one();
                return;
            }
            Err(e) => {
                if let FetchError::Interrupted { done, .. } = &e {
                    device.report(model, a, WireState::Downloading, *done, e.to_string());
                }
                if attempt >= ATTEMPTS {
                    install_failed(device, model, a, started, e.to_string()).await;
                    return;
                }
                // Short, growing pauses: the store is usually just a blip away.
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt * attempt))).await;
            }
        }
    };
    device
        .record_model_event(
            ModelEventKind::Downloaded,
            model,
            a,
            elapsed_ms(started),
            a.size_bytes,
            String::new(),
        )
        .await;
    let install = Install {
        version: a.version.clone(),
        variant: a.variant.clone(),
        format: a.format.clone(),
        sha256: a.sha256.clone(),
        size_bytes: a.size_bytes,
        path,
        rollout: a.rollout.clone(),
    };
    // Loaded and warmed before it is activated: a version that cannot serve never does.
    let loaded = match prepare(device, model, &install).await {
        Ok(l) => l,
        Err(reason) => {
            warn!(%model, version = %a.version, error = %reason, "the runtime refused the artifact; never activated");
            if let Err(io) = device.state.mark_failed(&a.sha256, &reason) {
                warn!(error = %io, "recording the failed digest");
            }
            install_failed(device, model, a, started, reason).await;
            return;
        }
    };
    match device.state.activate(model, install) {
        Ok(_) => {
            serve(device, loaded);
            info!(%model, version = %a.version, variant = %a.variant, "activated");
            publish(device);
            device.report(model, a, WireState::Active, a.size_bytes, String::new());
            device
                .record_model_event(
                    ModelEventKind::Activated,
                    model,
                    a,
                    elapsed_ms(started),
                    0,
                    String::new(),
                )
                .await;
            if device.collect_garbage {
                // Keep what is installed and what is still wanted (its partial may resume).
                let mut keep = device.state.referenced();
                keep.extend(device.desired.borrow().values().map(|a| a.sha256.clone()));
                if let Err(e) = device.content.collect(&keep) {
                    warn!(error = %e, "collecting old artifacts");
                }
            }
        }
        Err(e) => install_failed(device, model, a, started, format!("activation: {e}")).await,
    }
}

/// Loads `install` into the device's runtime when one serves its format, without serving
/// it yet; `Ok(None)` when nothing on the device runs that format.
async fn prepare(
    device: &Device,
    model: &str,
    install: &Install,
) -> Result<Option<Arc<Loaded>>, String> {
    let Some(rt) = &device.runtime else {
        return Ok(None);
    };
    if !rt.serves(&install.format) {
        return Ok(None);
    }
    rt.load(model, &install.version, &install.path, &install.format)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Switches new requests to `loaded`; requests in flight finish on the version before.
fn serve(device: &Device, loaded: Option<Arc<Loaded>>) {
    if let (Some(rt), Some(l)) = (&device.runtime, loaded) {
        info!(model = %l.model, version = %l.version, "serving");
        rt.switch(l);
    }
}

/// Loads every active model the runtime serves, at start (in the background: routing and
/// sync do not wait for it).
pub async fn load_active(device: Arc<Device>) {
    for (model, slots) in device.state.snapshot().models {
        match prepare(&device, &model, &slots.active).await {
            Ok(l) => serve(&device, l),
            Err(e) => {
                warn!(%model, version = %slots.active.version, error = %e, "loading the active version")
            }
        }
    }
}

/// Tells the gateway the install failed and records why in the model events.
async fn install_failed(
    device: &Device,
    model: &str,
    a: &ModelAssignment,
    started: std::time::Instant,
    error: String,
) {
    device.report(model, a, WireState::Failed, 0, error.clone());
    device
        .record_model_event(
            ModelEventKind::InstallFailed,
            model,
            a,
            elapsed_ms(started),
            0,
            error,
        )
        .await;
}

fn elapsed_ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn publish(device: &Device) {
    device
        .router
        .set_models(ModelsView::from_state(&device.state.snapshot()));
}
