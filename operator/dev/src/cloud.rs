//! The dev stack's cloud: a tiny model behind the OpenAI API on loopback, the endpoint the
//! demo's RoutingPolicy names as its cloud target. It serves the full-precision original of
//! the demo's on-device models, so shadow agreement between them means something: a
//! quantised build agrees with it often, a damaged one rarely.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use edgewise_agent::openai::serve_model::ServeModel;
use edgewise_agent::runtime::Runtime;
use edgewise_agent::runtime::tiny::{self, GgmlDType, TinyModel};
use tokio_util::sync::CancellationToken;

/// The seed of the demo's models: the cloud's F32 original and the devices' builds.
pub const DEMO_MODEL_SEED: u64 = 7;
/// The model name the cloud answers under.
pub const CLOUD_MODEL: &str = "assistant-large";

/// Why the cloud did not start.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The model file could not be written.
    #[error("writing the cloud model: {0}")]
    Write(#[source] std::io::Error),
    /// The model could not be made or loaded.
    #[error("loading the cloud model: {0}")]
    Load(String),
    /// The address is taken.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Serves the cloud model on `addr` until `shutdown`; returns its `http://…/v1` base URL.
///
/// # Errors
/// [`CloudError`] naming what failed.
pub async fn start(
    dir: &Path,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<String, CloudError> {
    std::fs::create_dir_all(dir).map_err(CloudError::Write)?;
    let path = dir.join("assistant-large-f32.gguf");
    let bytes = tiny::bytes(TinyModel::new(DEMO_MODEL_SEED, GgmlDType::F32))
        .map_err(|e| CloudError::Load(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(CloudError::Write)?;
    let model = Runtime::new(None)
        .load(CLOUD_MODEL, "1", &path, "gguf")
        .await
        .map_err(|e| CloudError::Load(e.to_string()))?;
    let (listener, bound) = crate::listen(addr)
        .await
        .map_err(|source| CloudError::Listen { addr, source })?;
    let backend = Arc::new(ServeModel {
        name: CLOUD_MODEL.to_owned(),
        model,
    });
    tokio::spawn(async move {
        if let Err(e) = edgewise_agent::openai::serve(
            listener,
            edgewise_agent::openai::router(backend),
            shutdown,
        )
        .await
        {
            tracing::error!(error = %e, "the dev cloud stopped");
        }
    });
    Ok(format!("http://{bound}/v1"))
}
