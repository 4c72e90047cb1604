//! One shutdown path for every long-running command: a token cancelled on SIGINT or SIGTERM,
//! and a tracker of the tasks a command spawned, drained for a bounded grace period.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, info, warn};

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd, `kill`).
#[must_use]
pub fn on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("interrupted: shutting down"),
            () = term => info!("SIGTERM: shutting down"),
        }
        stop.cancel();
    });
    shutdown
}

/// The tasks a command runs, each in the span that names what it works on, so that a
/// shutdown can wait for them instead of dropping them mid-write.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
}

impl Tasks {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` in `span` and tracks it.
    pub fn spawn<F>(&self, span: Span, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task.instrument(span));
    }

    /// Tracks a task spawned elsewhere (a server's accept loop) until it ends.
    pub fn track<T: Send + 'static>(&self, handle: tokio::task::JoinHandle<T>) {
        self.tracker.spawn(async move {
            let _ = handle.await;
        });
    }

    /// Waits for every tracked task to end, at most `grace`; says how many were cut off.
    /// Call after cancelling the shutdown token the tasks watch.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        let drained = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if drained {
            info!("every task stopped");
        } else {
            warn!(
                still_running = self.tracker.len(),
                grace_secs = grace.as_secs(),
                "grace period over: stopping with tasks still running"
            );
        }
        drained
    }
}

/// Builds a runtime, runs `main` on it and turns its outcome into an exit code, printing
/// an error as `name: error`. Shared by every binary of the control plane.
pub fn run_main<F, E>(name: &str, main: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
