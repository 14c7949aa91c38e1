//! Bounded polling for things that happen asynchronously in a real cluster (garbage
//! collection, RBAC caches, namespace deletion).
//!
//! Tests never assert on elapsed time: they retry a check a bounded number of times and,
//! when it never passes, fail with what was expected and the last thing observed.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::HarnessError;

/// How often [`eventually`] checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How many checks [`eventually`] makes: generous, so a loaded machine does not fail a
/// test that would pass given a little longer.
pub const POLL_ATTEMPTS: u32 = 1500;

/// Runs `check` until it returns `Ok`, at most [`POLL_ATTEMPTS`] times, [`POLL_INTERVAL`]
/// apart. `Err(reason)` means "not yet"; the last reason ends up in the error.
pub async fn eventually<T, E, F, Fut>(what: &str, check: F) -> Result<T, HarnessError>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    eventually_with(what, POLL_ATTEMPTS, POLL_INTERVAL, check).await
}

/// [`eventually`] with an explicit number of attempts and interval.
pub async fn eventually_with<T, E, F, Fut>(
    what: &str,
    attempts: u32,
    interval: Duration,
    mut check: F,
) -> Result<T, HarnessError>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut last = String::from("never checked");
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(interval).await;
        }
        match check().await {
            Ok(value) => return Ok(value),
            Err(reason) => last = reason.to_string(),
        }
    }
    Err(HarnessError::NotReached {
        what: what.to_string(),
        attempts,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_until_ok_and_reports_the_last_reason() {
        let mut n = 0;
        let value = eventually_with("n reaches 3", 10, Duration::ZERO, || {
            n += 1;
            let current = n;
            async move {
                if current >= 3 {
                    Ok(current)
                } else {
                    Err(format!("n={current}"))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);

        let err = eventually_with("never", 4, Duration::ZERO, || async { Err::<(), _>("nope") })
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("never") && text.contains("4") && text.contains("nope"),
            "{text}"
        );
    }
}
