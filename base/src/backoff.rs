//! Jittered exponential backoff: the one delay formula of every retry in the agent (hub
//! reconnects, status and lease retries, failed reconciles, drift-flap holds, deletion waits).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with proportional jitter, in the style of linkerd2-proxy.
///
/// Each call to [`ExponentialBackoff::next_delay`] doubles the base delay up to `max`
/// and then spreads it by up to `jitter` (a ratio) in either direction, so a fleet of
/// agents that lost the hub at the same moment does not reconnect in lock-step.
#[derive(Debug, Clone)]
pub struct ExponentialBackoff {
    /// First delay after a success; small so a blip costs little.
    min: Duration,
    /// Ceiling for the un-jittered delay; bounds how long a recovered hub waits for us.
    max: Duration,
    /// Fraction (0.0..=1.0) of the delay that is randomised in either direction.
    jitter: f64,
    /// Failures since the last reset; the exponent.
    attempt: u32,
}

impl ExponentialBackoff {
    /// A backoff from `min` doubling up to `max`, jittered by `jitter` (clamped to 0..=1).
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            min,
            max: max.max(min),
            jitter: if jitter.is_finite() {
                jitter.clamp(0.0, 1.0)
            } else {
                0.0
            },
            attempt: 0,
        }
    }

    /// The delay to wait before the next attempt; advances the exponent.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay_for(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The jittered delay before retry number `attempt` (0 for the first), without advancing:
    /// for callers that keep the failure count themselves, such as the work engine, whose count
    /// lives in each work's slot.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let delay = self.base_delay(attempt);
        if self.jitter == 0.0 {
            return delay;
        }
        let spread = delay.as_secs_f64() * self.jitter;
        let offset = rand::rng().random_range(-spread..=spread);
        Duration::from_secs_f64((delay.as_secs_f64() + offset).max(0.0))
    }

    /// Forget past failures: the next delay is `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// `(min, max)`: the first delay and the ceiling, before jitter.
    pub fn bounds(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }

    /// Number of delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// `min * 2^attempt`, saturating at `max`, before jitter.
    fn base_delay(&self, attempt: u32) -> Duration {
        // 2^31 already overflows any sane Duration; cap the shift to avoid overflow.
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// Sleep for the next backoff delay (a `tokio::time` sleep, so tests can pause time).
pub async fn sleep(backoff: &mut ExponentialBackoff) -> Duration {
    let delay = backoff.next_delay();
    tokio::time::sleep(delay).await;
    delay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_without_jitter() {
        let mut b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.0);
        let got: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn delay_for_matches_next_delay_without_advancing() {
        let mut b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.0);
        assert_eq!(b.delay_for(3), Duration::from_millis(800));
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(), b.delay_for(0));
    }

    #[test]
    fn jitter_stays_within_its_ratio() {
        let mut b = ExponentialBackoff::new(Duration::from_millis(500), Duration::from_secs(30), 0.5);
        for attempt in 0..40u32 {
            let base = (500f64 * 2f64.powi(attempt.min(31) as i32)).min(30_000.0);
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(
                d >= base * 0.5 - 1e-6 && d <= base * 1.5 + 1e-6,
                "attempt {attempt}: {d} vs {base}"
            );
        }
    }

    #[test]
    fn jitter_actually_varies() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut b = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.5);
            seen.insert(b.next_delay().as_micros());
        }
        assert!(seen.len() > 1, "20 jittered delays were all equal: {seen:?}");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30), 0.0);
        b.attempt = u32::MAX - 1;
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        assert_eq!(b.next_delay(), Duration::from_secs(30));
    }

    #[test]
    fn nonsense_jitter_is_clamped() {
        let mut b = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_millis(10), f64::NAN);
        // max below min is raised to min; NaN jitter means none.
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_delay_in_virtual_time() {
        let mut b = ExponentialBackoff::new(Duration::from_secs(2), Duration::from_secs(60), 0.0);
        let start = tokio::time::Instant::now();
        sleep(&mut b).await;
        sleep(&mut b).await;
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }
}
