//! Recorded works the hub has not delivered, and the evidence that decides their fate: a
//! complete listing without them deletes them; a hub that only goes quiet leaves them running,
//! `missing`, until the eviction grace has passed on a synced hub.
//!
//! Pure bookkeeping, apart from the engine loop that acts on it (as the drift debounce lives in
//! `schedule`): every method takes `now`, so the decisions are unit-tested on paused time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::applied_work;
use super::manifestwork::{AppliedManifestWork, DeleteOption};
use super::schedule::Debouncer;
use super::source::Listing;

/// A recorded work to clean up, with the delete option its record carries.
#[derive(Debug, Clone)]
pub(crate) struct Cleanup {
    pub(crate) work: String,
    pub(crate) option: DeleteOption,
    /// Evicted after the grace period (counted apart from works the hub deleted).
    pub(crate) evicted: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct AbsentWorks {
    /// Recorded works the source has not delivered yet. On a complete listing they are deleted
    /// (the hub has no such work); when the source only goes quiet they become `missing`.
    undelivered: HashMap<String, AppliedManifestWork>,
    /// Recorded works a synced hub did not re-send: kept running and reported, and evicted when
    /// their deadline in `evictions` passes while the hub is synced.
    missing: HashMap<String, AppliedManifestWork>,
    /// Eviction deadlines of the `missing` works.
    evictions: Debouncer<String>,
    /// Missing works whose deadline passed while the hub was away: evicted once it has synced
    /// again and still not re-sent them.
    overdue: HashSet<String>,
    /// How long a missing work is kept (see `EngineConfig::eviction_grace`).
    grace: Duration,
    /// The source is connected and has synced since it last connected: only then is an
    /// absence evidence.
    hub_synced: bool,
}

impl AbsentWorks {
    /// The records a previous run left, by work name; none is delivered yet.
    pub(crate) fn new(records: HashMap<String, AppliedManifestWork>, grace: Duration) -> Self {
        AbsentWorks {
            undelivered: records,
            missing: HashMap::new(),
            evictions: Debouncer::new(Duration::ZERO, Duration::ZERO),
            overdue: HashSet::new(),
            grace,
            hub_synced: false,
        }
    }

    /// How many works are missing (for the gauge).
    pub(crate) fn missing_count(&self) -> usize {
        self.missing.len()
    }

    /// The hub delivered (or named) `work` after all: its record, if it was absent, and whether
    /// it had been counted missing.
    pub(crate) fn found(&mut self, work: &str) -> Option<(AppliedManifestWork, bool)> {
        if let Some(amw) = self.undelivered.remove(work) {
            return Some((amw, false));
        }
        let amw = self.missing.remove(work)?;
        self.evictions.cancel(&work.to_string());
        self.overdue.remove(work);
        Some((amw, true))
    }

    /// The record of an absent work.
    pub(crate) fn record(&self, work: &str) -> Option<&AppliedManifestWork> {
        self.undelivered.get(work).or_else(|| self.missing.get(work))
    }

    /// The absent work whose record carries hub uid `uid`.
    pub(crate) fn named_by_uid(&self, uid: &str) -> Option<&str> {
        self.undelivered
            .iter()
            .chain(self.missing.iter())
            .find(|(_, amw)| applied_work::recorded_hub_uid(amw) == Some(uid))
            .map(|(name, _)| name.as_str())
    }

    /// The source delivered all it has. A complete listing is evidence that every absent work
    /// is gone from the hub; a quiet source only starts their grace. Overdue works go now.
    pub(crate) fn synced(&mut self, listing: Listing, now: Instant) -> Vec<Cleanup> {
        self.hub_synced = true;
        let mut out = match listing {
            Listing::Complete => self.all_gone(),
            Listing::Quiet => {
                self.mark_missing(now);
                Vec::new()
            }
        };
        let overdue: Vec<String> = self.overdue.drain().collect();
        out.extend(overdue.iter().filter_map(|w| self.evict(w)));
        out
    }

    /// The hub is lost: no eviction until it has synced again.
    pub(crate) fn disconnected(&mut self) {
        if self.hub_synced && !self.missing.is_empty() {
            tracing::info!(
                missing = self.missing.len(),
                "hub lost; no evictions until it has synced again"
            );
        }
        self.hub_synced = false;
    }

    /// When the next eviction is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.evictions.next_deadline()
    }

    /// The evictions due at `now`; with the hub away they wait, overdue, for its next sync.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Cleanup> {
        let due = self.evictions.take_due(now);
        if !self.hub_synced {
            self.overdue.extend(due);
            return Vec::new();
        }
        due.iter().filter_map(|w| self.evict(w)).collect()
    }

    fn all_gone(&mut self) -> Vec<Cleanup> {
        self.evictions = Debouncer::new(Duration::ZERO, Duration::ZERO);
        self.overdue.clear();
        let gone: Vec<(String, AppliedManifestWork)> =
            self.undelivered.drain().chain(self.missing.drain()).collect();
        gone.into_iter()
            .map(|(work, amw)| {
                tracing::info!(work = %work, "the hub's complete list omits the work; cleaning up its recorded resources");
                Cleanup {
                    option: applied_work::recorded_delete_option(&amw),
                    work,
                    evicted: false,
                }
            })
            .collect()
    }

    fn mark_missing(&mut self, now: Instant) {
        let deadline = now + self.grace;
        for (work, amw) in self.undelivered.drain() {
            tracing::warn!(work = %work, grace = ?self.grace,
                "recorded work not re-sent by the hub; kept running, and cleaned up only if still missing after the grace period");
            self.evictions.schedule_at(work.clone(), deadline);
            self.missing.insert(work, amw);
        }
    }

    fn evict(&mut self, work: &str) -> Option<Cleanup> {
        let amw = self.missing.remove(work)?;
        tracing::warn!(work = %work, grace = ?self.grace,
            "work still missing from the hub after the eviction grace period; cleaning up its recorded resources");
        Some(Cleanup {
            work: work.to_string(),
            option: applied_work::recorded_delete_option(&amw),
            evicted: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3600);

    fn record(work: &str, uid: &str) -> AppliedManifestWork {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "work.open-cluster-management.io/v1",
            "kind": "AppliedManifestWork",
            "metadata": {"name": format!("hub-{work}"),
                "annotations": {applied_work::HUB_UID_ANNOTATION: uid}},
            "spec": {"hubHash": "hub", "agentID": "a", "manifestWorkName": work},
        }))
        .unwrap()
    }

    fn book(works: &[&str]) -> AbsentWorks {
        let records = works
            .iter()
            .map(|w| (w.to_string(), record(w, &format!("uid-{w}"))))
            .collect();
        AbsentWorks::new(records, GRACE)
    }

    fn names(c: &[Cleanup]) -> Vec<&str> {
        let mut v: Vec<&str> = c.iter().map(|c| c.work.as_str()).collect();
        v.sort();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_listing_deletes_what_it_omits_and_a_quiet_one_deletes_nothing() {
        let mut quiet = book(&["a", "b"]);
        assert!(quiet.synced(Listing::Quiet, Instant::now()).is_empty());
        assert_eq!(quiet.missing_count(), 2);
        let mut complete = book(&["a", "b"]);
        assert!(complete.found("a").is_some());
        let gone = complete.synced(Listing::Complete, Instant::now());
        assert_eq!(names(&gone), ["b"]);
        assert!(!gone[0].evicted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_work_is_evicted_only_after_the_grace_on_a_synced_hub() {
        let mut b = book(&["a"]);
        let start = Instant::now();
        b.synced(Listing::Quiet, start);
        assert_eq!(b.next_deadline(), Some(start + GRACE));
        tokio::time::advance(GRACE - Duration::from_secs(1)).await;
        assert!(b.due(Instant::now()).is_empty(), "not before the grace");
        tokio::time::advance(Duration::from_secs(1)).await;
        let evicted = b.due(Instant::now());
        assert_eq!(names(&evicted), ["a"]);
        assert!(evicted[0].evicted);
        assert_eq!(b.missing_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_passing_while_the_hub_is_away_waits_for_its_next_sync() {
        let mut b = book(&["a"]);
        b.synced(Listing::Quiet, Instant::now());
        b.disconnected();
        tokio::time::advance(GRACE * 2).await;
        assert!(b.due(Instant::now()).is_empty(), "no eviction without a hub");
        assert_eq!(b.missing_count(), 1, "kept, overdue");
        let evicted = b.synced(Listing::Quiet, Instant::now());
        assert_eq!(names(&evicted), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_work_sent_again_is_never_evicted() {
        let mut b = book(&["a"]);
        b.synced(Listing::Quiet, Instant::now());
        let (_, was_missing) = b.found("a").unwrap();
        assert!(was_missing);
        tokio::time::advance(GRACE * 2).await;
        assert!(b.due(Instant::now()).is_empty());
        assert!(b.synced(Listing::Complete, Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_absent_work_is_found_by_its_hub_uid() {
        let b = book(&["a", "b"]);
        assert_eq!(b.named_by_uid("uid-b"), Some("b"));
        assert_eq!(b.named_by_uid("uid-c"), None);
        assert!(b.record("a").is_some());
    }
}
