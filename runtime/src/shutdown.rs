//! Drain-style graceful shutdown: on SIGTERM, signal every task, then wait a grace period.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// The OS refused to install a signal handler.
    #[error("cannot install a handler for {signal}: {source}")]
    Signal {
        /// `"SIGTERM"` or `"SIGINT"`.
        signal: &'static str,
        source: std::io::Error,
    },
}

/// How a drained run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending<T> {
    /// The task finished by itself before any signal.
    Finished(T),
    /// A signal arrived and the task finished within the grace period.
    Drained(T),
    /// A signal arrived and the task was still running when the grace period ran out.
    GraceExpired,
}

/// Resolves when SIGTERM (the kubelet, systemd) or SIGINT (Ctrl-C) arrives.
pub async fn signal() -> Result<&'static str, ShutdownError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| ShutdownError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| ShutdownError::Signal {
        signal: "SIGINT",
        source,
    })?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Run `task` until it finishes or `trigger` resolves; on trigger, cancel `token` so every
/// component starts draining, then give the task `grace` to finish what is in flight.
///
/// The grace period exists because a half-written apply is worse than a late exit, but an
/// agent that never exits blocks node drains and rollouts.
pub async fn drain<T, F, S>(task: F, trigger: S, token: CancellationToken, grace: Duration) -> Ending<T>
where
    F: Future<Output = T>,
    S: Future<Output = ()>,
{
    tokio::pin!(task);
    tokio::select! {
        out = &mut task => return Ending::Finished(out),
        () = trigger => {}
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutdown requested; draining");
    token.cancel();
    match tokio::time::timeout(grace, task).await {
        Ok(out) => Ending::Drained(out),
        Err(_) => Ending::GraceExpired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_task_needs_no_signal() {
        let token = CancellationToken::new();
        let out = drain(
            async { 7 },
            std::future::pending(),
            token.clone(),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(out, Ending::Finished(7));
        assert!(!token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn signal_cancels_and_waits_for_the_drain() {
        let token = CancellationToken::new();
        let watched = token.clone();
        let task = async move {
            watched.cancelled().await;
            // In-flight work takes a while to finish after the signal.
            tokio::time::sleep(Duration::from_secs(3)).await;
            "drained"
        };
        let trigger = tokio::time::sleep(Duration::from_secs(1));
        let out = drain(task, trigger, token.clone(), Duration::from_secs(10)).await;
        assert_eq!(out, Ending::Drained("drained"));
        assert!(token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_task_is_abandoned_after_grace() {
        let token = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let out: Ending<()> = drain(
            std::future::pending(),
            tokio::time::sleep(Duration::from_secs(1)),
            token,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(out, Ending::GraceExpired);
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }
}
