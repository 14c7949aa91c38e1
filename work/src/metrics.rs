//! Prometheus metrics of the work engine (registered under `spokelet_work`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The engine's metrics. Clones share the same series.
#[derive(Debug, Clone)]
pub struct WorkMetrics {
    /// Drift corrections per work: how often the agent restored what someone else changed.
    pub drift_corrections: Family<Labels, Counter>,
    /// Manifest applies by result (created, updated, unchanged, skipped, failed) and kind.
    pub applies: Family<Labels, Counter>,
    /// One manifest's apply, in seconds (the write and the read it needed, not the queueing).
    pub apply_seconds: Histogram,
    /// Works by state: applied, failing, deleting, unreadable.
    pub works_by_state: Family<Labels, Gauge>,
    /// Reconciles by outcome (ok, failed).
    pub reconciles: Family<Labels, Counter>,
    /// Reconcile duration in seconds.
    pub reconcile_seconds: Histogram,
    /// Status updates published (only real changes are published).
    pub status_updates: Counter,
    /// Works currently held.
    pub works: Gauge,
    /// Recorded works the hub has not re-sent: kept running until their grace period ends.
    pub missing: Gauge,
    /// Works the hub holds that the agent cannot read (left as they are).
    pub unreadable: Gauge,
    /// Missing works evicted after their grace period.
    pub evictions: Counter,
}

impl Default for WorkMetrics {
    fn default() -> Self {
        WorkMetrics {
            drift_corrections: Family::default(),
            applies: Family::default(),
            // 1 ms to about 16 s: a no-op apply is sub-millisecond, a slow webhook seconds.
            apply_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            works_by_state: Family::default(),
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            status_updates: Counter::default(),
            works: Gauge::default(),
            missing: Gauge::default(),
            unreadable: Gauge::default(),
            evictions: Counter::default(),
        }
    }
}

impl WorkMetrics {
    /// Registers every metric in `registry` (the caller picks the prefix, `spokelet_work`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "drift_corrections",
            "Drift corrections per work",
            self.drift_corrections.clone(),
        );
        registry.register(
            "applies",
            "Manifest applies by result and kind",
            self.applies.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "One manifest's apply",
            self.apply_seconds.clone(),
        );
        registry.register("works_by_state", "Works by state", self.works_by_state.clone());
        registry.register(
            "reconciles",
            "Work reconciles by outcome",
            self.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Work reconcile duration",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "status_updates",
            "Status updates published",
            self.status_updates.clone(),
        );
        registry.register("works", "Works held by the engine", self.works.clone());
        registry.register(
            "missing_works",
            "Recorded works the hub has not re-sent, kept until their eviction grace period ends",
            self.missing.clone(),
        );
        registry.register(
            "unreadable_works",
            "Works the hub holds that the agent cannot read; their objects are left as they are",
            self.unreadable.clone(),
        );
        registry.register(
            "evictions",
            "Missing works cleaned up after their eviction grace period",
            self.evictions.clone(),
        );
    }

    /// Drops the per-work series of a work the engine no longer holds, so the series count
    /// follows the works held instead of every work ever seen.
    pub fn forget(&self, work: &str) {
        self.drift_corrections
            .remove(&vec![("work".to_string(), work.to_string())]);
    }

    /// Counts one drift correction of `work`.
    pub fn drift_corrected(&self, work: &str) {
        self.drift_corrections
            .get_or_create(&vec![("work".to_string(), work.to_string())])
            .inc();
    }

    /// Counts one apply of a `kind` with `result`.
    pub fn applied(&self, result: &str, kind: &str) {
        self.applies
            .get_or_create(&vec![
                ("result".to_string(), result.to_string()),
                ("kind".to_string(), kind.to_string()),
            ])
            .inc();
    }

    /// Applies counted with `result`, summed over `kinds`.
    pub fn applies_of(&self, result: &str, kinds: &[&str]) -> u64 {
        kinds
            .iter()
            .map(|kind| {
                self.applies
                    .get_or_create(&vec![
                        ("result".to_string(), result.to_string()),
                        ("kind".to_string(), (*kind).to_string()),
                    ])
                    .get()
            })
            .sum()
    }

    /// Sets the works-by-state gauges (every state, so one that emptied reads 0).
    pub fn set_states(&self, counts: &[(&str, i64)]) {
        for (state, n) in counts {
            self.works_by_state
                .get_or_create(&vec![("state".to_string(), (*state).to_string())])
                .set(*n);
        }
    }

    /// Counts one reconcile with `outcome`.
    pub fn reconciled(&self, outcome: &str, seconds: f64) {
        self.reconciles
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
        self.reconcile_seconds.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_prefix() {
        let mut root = Registry::with_prefix("spokelet");
        let m = WorkMetrics::default();
        m.register(root.sub_registry_with_prefix("work"));
        m.drift_corrected("w1");
        m.applied("created", "ConfigMap");
        m.set_states(&[("applied", 3), ("failing", 0)]);
        m.apply_seconds.observe(0.004);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &root).unwrap();
        assert!(
            out.contains("spokelet_work_drift_corrections_total{work=\"w1\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("spokelet_work_applies_total{result=\"created\",kind=\"ConfigMap\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("spokelet_work_works_by_state{state=\"applied\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("spokelet_work_works_by_state{state=\"failing\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("spokelet_work_apply_duration_seconds_count 1"),
            "{out}"
        );
    }
}
