//! The retry loops' shared pieces: one backoff, the pause between tries, and reading an API error.

use std::time::Duration;

use spokelet_base::backoff::ExponentialBackoff;
use tokio_util::sync::CancellationToken;

/// First retry delay of every retry loop; doubles up to `KubeHubOptions::retry_max`.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Jitter of the retry delays.
const RETRY_JITTER: f64 = 0.5;

/// The API status code of a failed request, if the server answered.
pub(super) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether an API error means the object is gone.
pub(super) fn is_not_found(e: &kube::Error) -> bool {
    api_code(e) == Some(404)
}

/// The backoff of every retry loop here, up to `max`.
pub(super) fn retry_backoff(max: Duration) -> ExponentialBackoff {
    ExponentialBackoff::new(RETRY_MIN, max, RETRY_JITTER)
}

/// Sleeps for the next backoff delay; false when shutdown came first.
pub(super) async fn pause(backoff: &mut ExponentialBackoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(backoff.next_delay()) => true,
    }
}
