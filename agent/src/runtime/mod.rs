//! The on-device runtime: which version of each model answers requests, loaded and warmed
//! before it is switched to, so a version that cannot serve never does.
//!
//! Each model has one slot holding the loaded version; a switch swaps the slot atomically.
//! Requests hold their version (an `Arc`) to the end, so in-flight ones finish on the old
//! version, which is freed when the last of them ends.

pub mod external;
pub mod gguf;
pub(crate) mod remote;
pub mod template;
pub mod tiny;
pub mod tokenizer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio::sync::mpsc;

pub use template::ChatMessage;

use edgewise_core::complexity::{self, ComplexityModel};
use external::{External, ExternalConfig};
use gguf::GgufModel;

/// What a model is asked.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// `/v1/completions`: text continued as is.
    Text(String),
    /// `/v1/chat/completions`: messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// How to decode.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 decodes greedily (deterministic).
    pub temperature: f64,
    /// Nucleus sampling mass, when sampling.
    pub top_p: Option<f64>,
    /// Seeds sampling.
    pub seed: u64,
    /// Generation ends before the first of these.
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 256,
            temperature: 0.0,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Tokens in and out of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens of the prompt, as the model's tokenizer counts them.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of turn or a stop sequence.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The client went away.
    Cancelled,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
        }
    }
}

/// Why the runtime could not serve.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("loading the model failed: {0}")]
    /// The file could not be read, compiled or warmed up.
    Load(String),
    #[error("tokenizer: {0}")]
    /// The tokenizer could not be built or used.
    Tokenizer(String),
    #[error("the prompt could not be rendered: {0}")]
    /// The chat template refused the messages.
    Prompt(String),
    #[error("generation failed: {0}")]
    /// A forward pass failed.
    Generation(String),
    #[error("the prompt has {tokens} tokens; the model's context holds {context}")]
    /// The prompt does not fit the model's context.
    ContextTooLong {
        /// Tokens of the prompt.
        tokens: usize,
        /// Tokens the model's context holds.
        context: usize,
    },
    #[error(
        "the model needs about {needed_mib} MiB and {available_mib} MiB are available; not loaded"
    )]
    /// Loading would exceed the device's memory.
    TooLarge {
        /// Estimated resident size.
        needed_mib: u64,
        /// What the device has free for it.
        available_mib: u64,
    },
    #[error("format {0:?} has no runtime on this device")]
    /// No runtime on this device serves the artifact's format.
    NoRuntime(String),
    #[error("model {0:?} is not being served on this device")]
    /// The model has no loaded version.
    NotServing(String),
}

impl RuntimeError {
    /// Whether the request itself is at fault (the client's error, not the device's): such
    /// a request is not retried elsewhere.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            RuntimeError::ContextTooLong { .. } | RuntimeError::Prompt(_)
        )
    }
}

/// A piece of an answer as it is generated.
#[derive(Debug)]
pub enum Piece {
    /// More text.
    Text(String),
    /// The end, with usage.
    Done(Usage, Finish),
    /// Generation failed.
    Failed(RuntimeError),
}

/// A loaded, warmed model version.
pub struct Loaded {
    /// Logical model name.
    pub model: String,
    /// Version loaded.
    pub version: String,
    /// The artifact file.
    pub path: PathBuf,
    /// Resident size, estimated from the file.
    pub bytes: u64,
    /// Requests started on this version.
    pub requests: AtomicU64,
    /// When it finished loading.
    pub loaded_at: jiff::Timestamp,
    engine: Engine,
}

/// What computes the answers.
enum Engine {
    /// In process (candle).
    Embedded(Arc<GgufModel>),
    /// A server on the device.
    External(Arc<External>),
    /// The learned router: it scores requests, it does not answer them.
    Classifier(Arc<ComplexityModel>),
}

impl Loaded {
    /// Runtime name, as `status` prints it.
    pub fn runtime(&self) -> String {
        match &self.engine {
            Engine::Embedded(_) => "embedded (candle, GGUF)".into(),
            Engine::External(e) => format!("external ({}, {})", e.name, e.base_url),
            Engine::Classifier(_) => "embedded (learned router)".into(),
        }
    }

    /// The process serving it, for an external runtime the agent started.
    pub fn process_id(&self) -> Option<u32> {
        match &self.engine {
            Engine::External(e) => Some(e.pid()).filter(|p| *p != 0),
            Engine::Embedded(_) | Engine::Classifier(_) => None,
        }
    }

    /// The request's complexity, if this version is the learned router.
    pub fn complexity(&self, text: &str) -> Option<f32> {
        match &self.engine {
            Engine::Classifier(c) => Some(c.score(text)),
            Engine::Embedded(_) | Engine::External(_) => None,
        }
    }

    /// Tokens `prompt` takes with this version's tokenizer.
    pub fn count_tokens(&self, prompt: &Prompt) -> Result<usize, RuntimeError> {
        match &self.engine {
            Engine::Embedded(e) => e.tokens(prompt).map(|t| t.len()),
            Engine::External(_) => Err(RuntimeError::Tokenizer(
                "an external runtime counts its own tokens".into(),
            )),
            Engine::Classifier(_) => Err(RuntimeError::Tokenizer(
                "the learned router has no tokenizer".into(),
            )),
        }
    }

    /// Generates on a blocking thread (or the external server); pieces arrive on the
    /// receiver. Dropping the receiver stops generation at the next token.
    pub fn stream(self: &Arc<Self>, prompt: Prompt, sampling: Sampling) -> mpsc::Receiver<Piece> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let engine = match &self.engine {
            Engine::Embedded(e) => e.clone(),
            Engine::External(e) => return e.stream(&prompt, &sampling),
            Engine::Classifier(_) => {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(Piece::Failed(RuntimeError::NoRuntime(format!(
                    "{} (the learned router scores requests; it does not answer them)",
                    complexity::ARTIFACT_FORMAT
                ))));
                return rx;
            }
        };
        let (tx, rx) = mpsc::channel(64);
        // The version stays loaded until this request ends, even if switched away from.
        let keep = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = engine.generate(&prompt, &sampling, |text| {
                tx.blocking_send(Piece::Text(text.to_owned())).is_ok()
            });
            let last = match result {
                Ok((usage, finish)) => Piece::Done(usage, finish),
                Err(e) => Piece::Failed(e),
            };
            let _ = tx.blocking_send(last);
            drop(keep);
        });
        rx
    }

    /// The whole answer.
    pub async fn complete(
        self: &Arc<Self>,
        prompt: Prompt,
        sampling: Sampling,
    ) -> Result<(String, Usage, Finish), RuntimeError> {
        let mut rx = self.stream(prompt, sampling);
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Done(u, f) => return Ok((text, u, f)),
                Piece::Failed(e) => return Err(e),
            }
        }
        Err(RuntimeError::Generation(
            "the generator ended without a result".into(),
        ))
    }
}

/// One served model, for `status`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServedModel {
    /// Logical model name.
    pub model: String,
    /// Version loaded.
    pub version: String,
    /// Which runtime serves it.
    pub runtime: String,
    /// Estimated resident memory.
    pub memory_bytes: u64,
    /// Requests served since it loaded.
    pub requests: u64,
    /// When it loaded (RFC 3339).
    pub loaded_at: String,
    /// The process of an external runtime the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_id: Option<u32>,
}

/// Every model's serving slot.
#[derive(Default)]
pub struct Runtime {
    slots: RwLock<HashMap<String, Arc<ArcSwapOption<Loaded>>>>,
    /// Memory the runtime may use; `None` asks the system what is available.
    memory_limit: Option<u64>,
    /// Weights shared with other runtimes of this process (simulated devices).
    engines: Option<Arc<SharedEngines>>,
    /// Servers on the device for the formats they list.
    external: Vec<ExternalConfig>,
}

/// Loaded weights by artifact path, shared by the runtimes of many simulated devices in one
/// process: a content-addressed path is the same bytes, so it is read and compiled once.
/// Each device still loads, warms and switches its own versions.
#[derive(Debug, Default)]
pub struct SharedEngines(std::sync::Mutex<HashMap<PathBuf, std::sync::Weak<GgufModel>>>);

impl SharedEngines {
    async fn get_or_load(&self, path: &Path) -> Result<Arc<GgufModel>, RuntimeError> {
        if let Some(e) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .and_then(std::sync::Weak::upgrade)
        {
            return Ok(e);
        }
        let engine = Arc::new(load_engine(path).await?);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), Arc::downgrade(&engine));
        Ok(engine)
    }
}

async fn load_engine(path: &Path) -> Result<GgufModel, RuntimeError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || GgufModel::load(&p))
        .await
        .map_err(|e| RuntimeError::Load(e.to_string()))?
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("serving", &self.status())
            .field("memory_limit", &self.memory_limit)
            .finish()
    }
}

/// Resident size of a model relative to its file: weights plus KV cache and scratch.
const RESIDENT_FACTOR: f64 = 1.25;

impl Runtime {
    /// A runtime allowed `memory_limit` bytes (`None`: what the system has available).
    pub fn new(memory_limit: Option<u64>) -> Self {
        Runtime {
            slots: RwLock::default(),
            memory_limit,
            engines: None,
            external: Vec::new(),
        }
    }

    /// This runtime, with external runtimes for the formats they list (before the
    /// embedded one).
    #[must_use]
    pub fn with_external(mut self, external: Vec<ExternalConfig>) -> Self {
        self.external = external;
        self
    }

    /// A runtime that shares loaded weights with the others given the same `engines`.
    pub fn sharing(memory_limit: Option<u64>, engines: Arc<SharedEngines>) -> Self {
        Runtime {
            engines: Some(engines),
            ..Runtime::new(memory_limit)
        }
    }

    fn slot(&self, model: &str) -> Arc<ArcSwapOption<Loaded>> {
        if let Some(s) = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return s.clone();
        }
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(model.to_owned())
            .or_default()
            .clone()
    }

    /// Whether this device has a runtime for artifacts of `format`.
    pub fn serves(&self, format: &str) -> bool {
        self.external.iter().any(|e| e.serves(format))
            || format.eq_ignore_ascii_case("gguf")
            || format == complexity::ARTIFACT_FORMAT
    }

    /// The learned router in force, if one is loaded.
    pub fn classifier(&self) -> Option<Arc<Loaded>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .filter_map(|s| s.load_full())
            .find(|l| matches!(l.engine, Engine::Classifier(_)))
    }

    fn available(&self) -> u64 {
        let loaded: u64 = self.status().iter().map(|m| m.memory_bytes).sum();
        match self.memory_limit {
            Some(limit) => limit.saturating_sub(loaded),
            None => {
                let mut sys = sysinfo::System::new();
                sys.refresh_memory();
                sys.available_memory()
            }
        }
    }

    /// Loads and warms `version` of `model` from `path` without serving it yet. Refused
    /// when it would not fit in memory.
    pub async fn load(
        &self,
        model: &str,
        version: &str,
        path: &Path,
        format: &str,
    ) -> Result<Arc<Loaded>, RuntimeError> {
        if !self.serves(format) {
            return Err(RuntimeError::NoRuntime(format.to_owned()));
        }
        let size = std::fs::metadata(path)
            .map_err(|e| RuntimeError::Load(format!("{}: {e}", path.display())))?
            .len();
        let needed = (size as f64 * RESIDENT_FACTOR) as u64;
        let available = self.available();
        if needed > available {
            return Err(RuntimeError::TooLarge {
                needed_mib: needed.div_ceil(1 << 20),
                available_mib: available >> 20,
            });
        }
        if format == complexity::ARTIFACT_FORMAT {
            return self.load_classifier(model, version, path, needed).await;
        }
        let engine = match (
            self.external.iter().find(|e| e.serves(format)),
            &self.engines,
        ) {
            (Some(config), _) => Engine::External(External::start(config, model, path).await?),
            (None, Some(shared)) => Engine::Embedded(shared.get_or_load(path).await?),
            (None, None) => Engine::Embedded(Arc::new(load_engine(path).await?)),
        };
        let loaded = Arc::new(Loaded {
            model: model.to_owned(),
            version: version.to_owned(),
            path: path.to_owned(),
            bytes: needed,
            requests: AtomicU64::new(0),
            loaded_at: jiff::Timestamp::now(),
            engine,
        });
        // A warm-up token proves the weights compute before any request depends on them.
        let warm = Sampling {
            max_tokens: 1,
            ..Sampling::default()
        };
        loaded
            .complete(Prompt::Text("hello".into()), warm)
            .await
            .map_err(|e| RuntimeError::Load(format!("warm-up failed: {e}")))?;
        loaded.requests.store(0, Ordering::Relaxed);
        Ok(loaded)
    }

    /// Loads the learned router at `path`; its warm-up is one scored request.
    async fn load_classifier(
        &self,
        model: &str,
        version: &str,
        path: &Path,
        bytes: u64,
    ) -> Result<Arc<Loaded>, RuntimeError> {
        let raw = tokio::fs::read(path)
            .await
            .map_err(|e| RuntimeError::Load(format!("{}: {e}", path.display())))?;
        let classifier = ComplexityModel::from_json(&raw)
            .map_err(|e| RuntimeError::Load(format!("{}: {e}", path.display())))?;
        if !classifier.score("hello").is_finite() {
            return Err(RuntimeError::Load(
                "warm-up: the score is not a number".into(),
            ));
        }
        Ok(Arc::new(Loaded {
            model: model.to_owned(),
            version: version.to_owned(),
            path: path.to_owned(),
            bytes,
            requests: AtomicU64::new(0),
            loaded_at: jiff::Timestamp::now(),
            engine: Engine::Classifier(Arc::new(classifier)),
        }))
    }

    /// Serves `loaded` for new requests from now on; returns the version it replaced.
    pub fn switch(&self, loaded: Arc<Loaded>) -> Option<Arc<Loaded>> {
        self.slot(&loaded.model.clone()).swap(Some(loaded))
    }

    /// Stops serving `model`.
    pub fn unload(&self, model: &str) -> Option<Arc<Loaded>> {
        self.slot(model).swap(None)
    }

    /// The version answering `model` now.
    pub fn serving(&self, model: &str) -> Option<Arc<Loaded>> {
        self.slot(model).load_full()
    }

    /// What is loaded, per model.
    pub fn status(&self) -> Vec<ServedModel> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ServedModel> = slots
            .values()
            .filter_map(|s| s.load_full())
            .map(|l| ServedModel {
                model: l.model.clone(),
                version: l.version.clone(),
                runtime: l.runtime(),
                process_id: l.process_id(),
                memory_bytes: l.bytes,
                requests: l.requests.load(Ordering::Relaxed),
                loaded_at: l.loaded_at.to_string(),
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}
