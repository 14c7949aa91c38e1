//! When the engine looks at a work again: the debounce of drift notifications, the hold of a
//! manifest that keeps flapping, and the retry delay of a failed reconcile or deletion.
//!
//! Pure timing logic, apart from the watches that produce the notifications (`drift`), as
//! kube-runtime keeps its scheduler apart from its watcher; every function takes `now`, so tests
//! run on paused tokio time.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use spokelet_base::backoff::ExponentialBackoff;

/// The delay before trying again after consecutive failures: the one back-off of the engine,
/// shared by failed reconciles, failed deletions, deletion waits and flap holds, so all of them
/// double the same way and carry the same jitter. Built on [`ExponentialBackoff`].
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// The formula; never advanced here, the failure count belongs to the caller.
    backoff: ExponentialBackoff,
}

impl RetryPolicy {
    /// Delays from `base` doubling to `max`, spread by `jitter` (a ratio, 0 for exact delays).
    pub fn new(base: Duration, max: Duration, jitter: f64) -> Self {
        RetryPolicy {
            backoff: ExponentialBackoff::new(base, max, jitter),
        }
    }

    /// The same policy with another jitter.
    pub fn jittered(&self, jitter: f64) -> Self {
        let (base, max) = self.bounds();
        RetryPolicy::new(base, max, jitter)
    }

    /// The delay after `failures` consecutive failures (1 for the first failure: `base`).
    pub fn delay(&self, failures: u32) -> Duration {
        self.backoff.delay_for(failures.saturating_sub(1))
    }

    /// `(base, max)` before jitter.
    fn bounds(&self) -> (Duration, Duration) {
        self.backoff.bounds()
    }
}

/// Trailing-edge debounce: a key fires `quiet` after its last touch, but never later than
/// `max_wait` after its first, so a constantly changing object is still looked at.
#[derive(Debug)]
pub struct Debouncer<K> {
    /// Quiet period after the last change.
    quiet: Duration,
    /// Upper bound from the first change.
    max_wait: Duration,
    /// Pending keys: (first touch, deadline).
    pending: HashMap<K, (Instant, Instant)>,
}

impl<K: Hash + Eq + Clone> Debouncer<K> {
    pub fn new(quiet: Duration, max_wait: Duration) -> Self {
        Debouncer {
            quiet,
            max_wait,
            pending: HashMap::new(),
        }
    }

    /// Records a change of `key` at `now`.
    pub fn touch(&mut self, key: K, now: Instant) {
        let (quiet, max_wait) = (self.quiet, self.max_wait);
        let e = self.pending.entry(key).or_insert((now, now + quiet));
        e.1 = (now + quiet).min(e.0 + max_wait);
    }

    /// Records a key that must fire no earlier than `at` (a back-off).
    pub fn schedule_at(&mut self, key: K, at: Instant) {
        let e = self.pending.entry(key).or_insert((at, at));
        e.1 = e.1.max(at);
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(_, d)| *d).min()
    }

    /// Removes and returns the keys due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Vec<K> {
        let due: Vec<K> = self
            .pending
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.pending.remove(k);
        }
        due
    }

    /// Drops `key`'s pending deadline, whether it came from a touch or a back-off.
    pub fn cancel(&mut self, key: &K) {
        self.pending.remove(key);
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Detects a field that keeps flipping (someone else keeps changing what we keep restoring) and
/// backs off exponentially instead of fighting.
#[derive(Debug, Clone)]
pub struct FlapGuard {
    /// Corrections counted within this window.
    window: Duration,
    /// This many corrections within `window` means flapping.
    threshold: usize,
    /// The hold after each consecutive flap: the engine's one back-off formula.
    backoff: RetryPolicy,
    /// Times of recent corrections.
    history: VecDeque<Instant>,
    /// Consecutive back-offs so far (reset after a quiet window).
    strikes: u32,
    /// No corrections before this instant.
    blocked_until: Option<Instant>,
}

impl Default for FlapGuard {
    /// 5 corrections within 60 s is flapping; holds from 1 s doubling to 5 min, jittered by 20 %
    /// so objects that flapped together are not all corrected again in the same instant.
    fn default() -> Self {
        FlapGuard::new(
            Duration::from_secs(60),
            5,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )
        .jittered(0.2)
    }
}

impl FlapGuard {
    /// `threshold` corrections within `window` is flapping; holds start at `base` and double up
    /// to `max_backoff`, exactly (see [`FlapGuard::jittered`]).
    pub fn new(window: Duration, threshold: usize, base: Duration, max_backoff: Duration) -> Self {
        FlapGuard {
            window,
            threshold,
            backoff: RetryPolicy::new(base, max_backoff, 0.0),
            history: VecDeque::new(),
            strikes: 0,
            blocked_until: None,
        }
    }

    /// The same guard with holds spread by `jitter` (a ratio) either way.
    pub fn jittered(mut self, jitter: f64) -> Self {
        self.backoff = self.backoff.jittered(jitter);
        self
    }

    fn expire(&mut self, now: Instant) {
        while self
            .history
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.history.pop_front();
        }
        if self.history.is_empty() && self.blocked_until.is_none_or(|b| now >= b + self.window) {
            self.strikes = 0;
        }
    }

    /// Ok if a correction may happen now, else the instant it may.
    pub fn check(&mut self, now: Instant) -> Result<(), Instant> {
        self.expire(now);
        match self.blocked_until {
            Some(until) if now < until => Err(until),
            _ => Ok(()),
        }
    }

    /// Records a correction made at `now`; returns the back-off end if this made it flapping.
    pub fn record(&mut self, now: Instant) -> Option<Instant> {
        self.expire(now);
        self.history.push_back(now);
        if self.history.len() >= self.threshold {
            self.strikes += 1;
            let until = now + self.backoff.delay(self.strikes);
            self.blocked_until = Some(until);
            self.history.clear();
            return Some(until);
        }
        None
    }

    /// Whether the guard is (or recently was) backing off: reported as Degraded.
    pub fn is_flapping(&self, now: Instant) -> bool {
        self.strikes > 0 && self.blocked_until.is_some_and(|b| now < b + self.window)
    }

    /// Consecutive back-offs.
    pub fn strikes(&self) -> u32 {
        self.strikes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_doubles_from_the_first_failure() {
        let p = RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(2), 0.0);
        let got: Vec<u128> = (1..=6).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(got, vec![200, 400, 800, 1600, 2000, 2000]);
        // Jitter stays within its ratio.
        let j = p.jittered(0.5);
        for n in 1..=6 {
            let d = j.delay(n).as_secs_f64();
            let want = p.delay(n).as_secs_f64();
            assert!(
                d >= want * 0.5 - 1e-9 && d <= want * 1.5 + 1e-9,
                "{n}: {d} vs {want}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_trailing_with_cap() {
        let mut d = Debouncer::new(Duration::from_millis(50), Duration::from_millis(200));
        let t0 = Instant::now();
        d.touch("a", t0);
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(50)));
        tokio::time::advance(Duration::from_millis(40)).await;
        d.touch("a", Instant::now());
        assert!(d.take_due(Instant::now()).is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(90)));
        // Keep touching: the cap fires it 200 ms after the first touch.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(30)).await;
            d.touch("a", Instant::now());
            if Instant::now() >= t0 + Duration::from_millis(200) {
                break;
            }
        }
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(200)));
        tokio::time::sleep_until(t0 + Duration::from_millis(200)).await;
        assert_eq!(d.take_due(Instant::now()), vec!["a"]);
        assert!(d.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_until_deadline_fires_once() {
        let mut d = Debouncer::new(Duration::from_millis(30), Duration::from_millis(100));
        d.touch(1, Instant::now());
        d.touch(2, Instant::now() + Duration::from_millis(10));
        let first = d.next_deadline().unwrap();
        tokio::time::sleep_until(first).await;
        assert_eq!(d.take_due(Instant::now()), vec![1]);
        tokio::time::sleep_until(d.next_deadline().unwrap()).await;
        assert_eq!(d.take_due(Instant::now()), vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn flap_guard_backs_off_exponentially_and_recovers() {
        let mut g = FlapGuard::new(
            Duration::from_secs(10),
            3,
            Duration::from_secs(1),
            Duration::from_secs(8),
        );
        let t0 = Instant::now();
        assert!(g.check(t0).is_ok());
        assert!(g.record(t0).is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(g.record(Instant::now()).is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        let until = g
            .record(Instant::now())
            .expect("third correction in window flaps");
        assert_eq!(until, Instant::now() + Duration::from_secs(1));
        assert!(g.is_flapping(Instant::now()));
        assert_eq!(g.check(Instant::now()), Err(until));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.check(Instant::now()).is_ok());
        // Flapping again right away doubles the back-off.
        for _ in 0..2 {
            assert!(g.record(Instant::now()).is_none());
        }
        let until2 = g.record(Instant::now()).unwrap();
        assert_eq!(until2, Instant::now() + Duration::from_secs(2));
        // Capped.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(9)).await;
            let _ = g.check(Instant::now());
            for _ in 0..2 {
                g.record(Instant::now());
            }
            if let Some(u) = g.record(Instant::now()) {
                assert!(u <= Instant::now() + Duration::from_secs(8));
            }
        }
        // A quiet period resets everything.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(g.check(Instant::now()).is_ok());
        assert!(!g.is_flapping(Instant::now()));
        assert_eq!(g.strikes(), 0);
    }
}
