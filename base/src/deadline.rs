//! Waiting for a deadline that may not be set: the engine loop and the gRPC session both select
//! on "the next timer, if any".

use tokio::time::Instant;

/// Sleeps until `at`, or for ever when there is no deadline (a `select!` branch that never
/// fires).
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_and_none_never_does() {
        let at = Instant::now() + Duration::from_secs(5);
        sleep_until_opt(Some(at)).await;
        assert_eq!(Instant::now(), at);
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until_opt(None)).await;
        assert!(never.is_err(), "no deadline, no wake");
    }
}
