//! External runtimes: formats the embedded runtime does not serve (or that a device prefers
//! to run elsewhere) are served by an OpenAI-compatible server on the device — llama.cpp's
//! `llama-server`, Ollama, vLLM — either one already running at a URL, or one the agent
//! starts per version from a command template and keeps alive.
//!
//! A started server is "loaded" once it answers `GET /v1/models` and a one-token
//! completion; if it exits, it is restarted with exponential backoff (0.5 s doubling to
//! 30 s) and requests meanwhile fail fast, so the data plane falls back as the policy says.
//! It is stopped when its version is switched away from and its last request has ended.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::{Piece, Prompt, RuntimeError, Sampling};

/// One external runtime, as the agent config's `[[runtime]]` names it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Name for `status` and logs (`llama-server`, `ollama`…).
    pub name: String,
    /// Artifact formats it serves; listing `gguf` here takes GGUF from the embedded runtime.
    pub formats: Vec<String>,
    /// A server already running: its OpenAI base URL (`http://127.0.0.1:11434/v1`).
    #[serde(default)]
    pub url: Option<String>,
    /// Or a server to start per version: argv with `{model}` (the artifact's path), `{port}`
    /// and `{addr}` (`127.0.0.1:{port}`) filled in; it must serve the OpenAI API under
    /// `/v1` there.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The `model` sent in requests (default: the model family's name).
    #[serde(default)]
    pub model: Option<String>,
    /// How long a start may take before the version is refused, seconds.
    #[serde(default = "default_ready_secs")]
    pub ready_timeout_secs: u64,
}

fn default_ready_secs() -> u64 {
    60
}

impl ExternalConfig {
    /// Whether this runtime serves artifacts of `format`.
    #[must_use]
    pub fn serves(&self, format: &str) -> bool {
        self.formats.iter().any(|f| f.eq_ignore_ascii_case(format))
    }

    /// The config's problem, if it has one (exactly one of `url` and `command`).
    #[must_use]
    pub fn problem(&self) -> Option<String> {
        match (&self.url, &self.command) {
            (Some(_), None) => None,
            (None, Some(c)) if !c.is_empty() => None,
            (None, Some(_)) => Some(format!("runtime {:?}: command is empty", self.name)),
            _ => Some(format!(
                "runtime {:?}: give exactly one of url and command",
                self.name
            )),
        }
    }
}

/// A running external server serving one version.
#[derive(Debug)]
pub struct External {
    /// `http://…/v1`.
    pub base_url: String,
    /// The config it runs from.
    pub name: String,
    model: String,
    http: reqwest::Client,
    healthy: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    stop: CancellationToken,
}

impl Drop for External {
    fn drop(&mut self) {
        // The supervisor kills the process it started.
        self.stop.cancel();
    }
}

impl External {
    /// Starts (or reaches) the server for the artifact at `path` and waits until it answers.
    ///
    /// # Errors
    /// [`RuntimeError::Load`] when it does not start or answer in time.
    pub async fn start(
        config: &ExternalConfig,
        family: &str,
        path: &Path,
    ) -> Result<Arc<External>, RuntimeError> {
        if let Some(p) = config.problem() {
            return Err(RuntimeError::Load(p));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| RuntimeError::Load(e.to_string()))?;
        let ready = Duration::from_secs(config.ready_timeout_secs.max(1));
        let healthy = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let base_url = match (&config.url, &config.command) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(template)) => {
                let port = free_port().map_err(|e| RuntimeError::Load(e.to_string()))?;
                let argv: Vec<String> = template
                    .iter()
                    .map(|a| {
                        a.replace("{model}", &path.display().to_string())
                            .replace("{addr}", &format!("127.0.0.1:{port}"))
                            .replace("{port}", &port.to_string())
                    })
                    .collect();
                let base = format!("http://127.0.0.1:{port}/v1");
                tokio::spawn(
                    supervise(
                        argv,
                        base.clone(),
                        http.clone(),
                        healthy.clone(),
                        pid.clone(),
                        stop.clone(),
                    )
                    .instrument(tracing::info_span!("external runtime", name = %config.name)),
                );
                base
            }
            (None, None) => return Err(RuntimeError::Load("no url or command".into())),
        };
        let external = Arc::new(External {
            base_url,
            name: config.name.clone(),
            model: config.model.clone().unwrap_or_else(|| family.to_owned()),
            http,
            healthy,
            pid,
            stop,
        });
        let answered = tokio::time::timeout(ready, async {
            loop {
                if answers(&external.http, &external.base_url).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if answered.is_err() {
            return Err(RuntimeError::Load(format!(
                "runtime {:?} did not answer at {} within {} s",
                config.name,
                external.base_url,
                ready.as_secs()
            )));
        }
        external.healthy.store(true, Ordering::Relaxed);
        Ok(external)
    }

    /// The pid of the process it started and runs now (0 for a URL, or while restarting).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Streams an answer from the server; fails at once while it is restarting.
    pub fn stream(&self, prompt: &Prompt, sampling: &Sampling) -> mpsc::Receiver<Piece> {
        let (tx, rx) = mpsc::channel(64);
        if !self.healthy.load(Ordering::Relaxed) {
            let _ = tx.try_send(Piece::Failed(RuntimeError::Generation(format!(
                "the external runtime {:?} is not running (restarting)",
                self.name
            ))));
            return rx;
        }
        let (path, body) = request_body(&self.model, prompt, sampling);
        let url = format!("{}/{path}", self.base_url);
        let chat = matches!(prompt, Prompt::Chat(_));
        let http = self.http.clone();
        tokio::spawn(async move {
            let sent = http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    super::remote::relay(resp, chat, "the external runtime", tx).await;
                }
                Ok(resp) => {
                    let _ = tx
                        .send(Piece::Failed(RuntimeError::Generation(format!(
                            "the external runtime answered HTTP {}",
                            resp.status().as_u16()
                        ))))
                        .await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Piece::Failed(RuntimeError::Generation(format!(
                            "the external runtime: {}",
                            super::remote::without_url(&e)
                        ))))
                        .await;
                }
            }
        });
        rx
    }
}

/// The OpenAI request for `prompt`: its path under `/v1` and body (streamed, with usage).
fn request_body(model: &str, prompt: &Prompt, s: &Sampling) -> (&'static str, Value) {
    let mut body = json!({
        "model": model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "seed": s.seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(p) = s.top_p {
        body["top_p"] = json!(p);
    }
    if !s.stop.is_empty() {
        body["stop"] = json!(s.stop);
    }
    match prompt {
        Prompt::Chat(messages) => {
            body["messages"] = messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            ("chat/completions", body)
        }
        Prompt::Text(text) => {
            body["prompt"] = json!(text);
            ("completions", body)
        }
    }
}

async fn answers(http: &reqwest::Client, base: &str) -> bool {
    let probe = http.get(format!("{base}/models")).send();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Keeps the server running until `stop`: starts it, marks it healthy once it answers,
/// and restarts it with backoff whenever it exits.
async fn supervise(
    argv: Vec<String>,
    base: String,
    http: reqwest::Client,
    healthy: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let spawned = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                warn!(command = %argv[0], error = %e, "starting the external runtime");
                failures += 1;
                if backoff(failures, &stop).await {
                    return;
                }
                continue;
            }
        };
        pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
        info!(pid = child.id().unwrap_or(0), "external runtime started");
        let mut up = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = child.kill().await;
                    pid.store(0, Ordering::Relaxed);
                    return;
                }
                exited = child.wait() => {
                    healthy.store(false, Ordering::Relaxed);
                    pid.store(0, Ordering::Relaxed);
                    warn!(status = ?exited.ok(), "the external runtime exited; restarting");
                    break;
                }
                // Polled only until it answers; then nothing wakes but an exit or a stop.
                () = tokio::time::sleep(Duration::from_millis(100)), if !up => {
                    if answers(&http, &base).await {
                        up = true;
                        failures = 0;
                        healthy.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        failures += 1;
        if backoff(failures, &stop).await {
            return;
        }
    }
}

/// Waits before the `failures`-th restart; `true` when stopped meanwhile.
async fn backoff(failures: u32, stop: &CancellationToken) -> bool {
    let wait = Duration::from_millis(250u64.saturating_mul(1 << failures.min(7)).min(30_000));
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_needs_exactly_one_of_url_and_command() {
        let mut c = ExternalConfig {
            name: "x".into(),
            formats: vec!["GGUF".into()],
            url: None,
            command: None,
            model: None,
            ready_timeout_secs: 1,
        };
        assert!(c.problem().is_some());
        c.url = Some("http://127.0.0.1:1/v1".into());
        assert!(c.problem().is_none());
        assert!(c.serves("gguf"));
        c.command = Some(vec!["server".into()]);
        assert!(c.problem().is_some());
    }

    #[test]
    fn requests_carry_the_prompt_and_sampling() {
        let s = Sampling {
            max_tokens: 3,
            stop: vec!["x".into()],
            ..Sampling::default()
        };
        let (path, body) = request_body("m", &Prompt::Text("hi".into()), &s);
        assert_eq!(path, "completions");
        assert_eq!(body["prompt"], "hi");
        assert_eq!(body["max_tokens"], 3);
        assert_eq!(body["stop"], json!(["x"]));
        assert_eq!(body["stream"], true);
    }
}
