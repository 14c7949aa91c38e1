//! Retrying registry requests the registry asked us to repeat (HTTP 429 and 5xx), with the
//! agent's one jittered backoff.

use std::future::Future;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use spokelet_base::backoff::ExponentialBackoff;

/// How often and how patiently one registry request is repeated.
///
/// Only answers in which the registry itself says "later" are retried here: 429 (rate limited)
/// and 5xx (overloaded or restarting). A refused connection or a timeout is not: the source's
/// `retryInterval` already covers a registry that is down, and retrying it inside the pull
/// would only hold the work's reconcile (and its drift corrections) longer.
///
/// `Retry-After` cannot be honoured exactly: oci-client 0.18 turns the response into an error
/// without its headers. The floor of the backoff for a 429 is therefore a full second, the
/// common value registries send, and doubling from there.
#[derive(Debug, Clone)]
pub struct PullRetry {
    /// Attempts in all, the first included; 1 turns retrying off.
    pub attempts: u32,
    /// Delay before the second attempt after a 5xx, doubling after each further failure.
    pub first_delay: Duration,
    /// Delay before the second attempt after a 429 (rate limits reset in seconds, not ms).
    pub first_delay_rate_limited: Duration,
    /// Ceiling of any one delay before jitter; keeps a pull well inside Flux's 60 s timeout.
    pub max_delay: Duration,
}

impl Default for PullRetry {
    fn default() -> Self {
        PullRetry {
            // 1 + 3 retries: 0.5 + 1 + 2 s after 5xx, 1 + 2 + 4 s after 429, about 7 s at most.
            attempts: 4,
            first_delay: Duration::from_millis(500),
            first_delay_rate_limited: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
        }
    }
}

/// Why a failed request is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// HTTP 429, or an error envelope with code `TOOMANYREQUESTS`.
    RateLimited,
    /// HTTP 5xx.
    ServerBusy(u16),
}

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transient::RateLimited => f.write_str("still rate limited (HTTP 429)"),
            Transient::ServerBusy(code) => write!(f, "still failing with HTTP {code}"),
        }
    }
}

/// Whether `err` is an answer the registry wants repeated later.
pub fn transient(err: &OciDistributionError) -> Option<Transient> {
    match err {
        OciDistributionError::ServerError { code: 429, .. } => Some(Transient::RateLimited),
        OciDistributionError::ServerError { code, .. } if (500..=599).contains(code) => {
            Some(Transient::ServerBusy(*code))
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| e.code == OciErrorCode::Toomanyrequests) =>
        {
            Some(Transient::RateLimited)
        }
        _ => None,
    }
}

impl PullRetry {
    /// No retries: every request is made once.
    pub fn none() -> PullRetry {
        PullRetry {
            attempts: 1,
            ..PullRetry::default()
        }
    }

    /// Runs `request` until it succeeds, fails for good, or the attempts are spent; `what`
    /// names the request in the log.
    pub async fn run<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, OciDistributionError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let mut attempt = 1;
        loop {
            let err = match request().await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            let Some(kind) = transient(&err).filter(|_| attempt < self.attempts) else {
                return Err(err);
            };
            let delay = self.delay(kind, attempt - 1);
            tracing::warn!(
                request = what,
                ?kind,
                attempt,
                ?delay,
                "registry asked to retry later"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// The jittered delay before retry number `retry` (0 for the first).
    fn delay(&self, kind: Transient, retry: u32) -> Duration {
        let first = match kind {
            Transient::RateLimited => self.first_delay_rate_limited,
            Transient::ServerBusy(_) => self.first_delay,
        };
        // A quarter either way: enough to spread agents that were throttled together.
        ExponentialBackoff::new(first, self.max_delay, 0.25).delay_for(retry)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn server_error(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "https://registry.test/v2/app/manifests/v1".to_string(),
            message: String::new(),
        }
    }

    /// A request that fails with `code` the first `failures` times, then succeeds.
    fn flaky(
        failures: u32,
        code: u16,
    ) -> (
        Arc<AtomicU32>,
        impl FnMut() -> std::future::Ready<Result<u32, OciDistributionError>>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let request = move || {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(if n <= failures {
                Err(server_error(code))
            } else {
                Ok(n)
            })
        };
        (calls, request)
    }

    #[test]
    fn only_429_and_5xx_are_transient() {
        assert_eq!(transient(&server_error(429)), Some(Transient::RateLimited));
        assert_eq!(transient(&server_error(503)), Some(Transient::ServerBusy(503)));
        assert_eq!(transient(&server_error(404)), None);
        assert_eq!(transient(&server_error(401)), None);
        let envelope: oci_client::errors::OciEnvelope = serde_json::from_str(
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down","detail":null}]}"#,
        )
        .expect("envelope");
        let err = OciDistributionError::RegistryError {
            envelope,
            url: String::new(),
        };
        assert_eq!(transient(&err), Some(Transient::RateLimited));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_request_waits_at_least_a_second_and_then_succeeds() {
        let (calls, request) = flaky(2, 429);
        let start = tokio::time::Instant::now();
        let got = PullRetry::default()
            .run("test", request)
            .await
            .expect("third try");
        assert_eq!(got, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // 1 s and 2 s, each jittered by at most a quarter.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(2250), "waited only {waited:?}");
        assert!(waited <= Duration::from_millis(3750), "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_after_the_attempts_and_the_last_error_is_returned() {
        let (calls, request) = flaky(10, 503);
        let err = PullRetry::default()
            .run("test", request)
            .await
            .expect_err("gives up");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(matches!(err, OciDistributionError::ServerError { code: 503, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_repeated() {
        let (calls, request) = flaky(10, 404);
        PullRetry::default().run("test", request).await.expect_err("404");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (calls, request) = flaky(10, 429);
        PullRetry::none()
            .run("test", request)
            .await
            .expect_err("no retries");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
