//! What the transport remembers about the works the hub sent, and the status outbox.
//!
//! The sink (engine side) and the connection task share it: the sink stores statuses, the
//! publisher takes them out, and the event handlers record the works the hub delivers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use spokelet_proto::CloudEvent;
use tokio::sync::Notify;

use crate::cloudevents::{
    self, ReportBody, ReportPayload, ResourceVersion, SequenceIds, StatusHash, StatusKind, StatusTarget,
    WireMeta,
};
use crate::metrics::HubMetrics;
use crate::outbox::Outbox;
use spokelet_base::lock::lock;
use spokelet_work_api::conditions::status_hash;
use spokelet_work_api::source::{SinkError, StatusUpdate};

/// What we know about a work the hub sent.
#[derive(Debug, Clone, Default)]
pub(super) struct WorkInfo {
    /// Metadata echoed in status events.
    pub(super) meta: WireMeta,
    /// The `originalsource` to answer to.
    pub(super) original_source: String,
}

/// The latest status of one work.
#[derive(Debug, Clone)]
pub(super) struct Latest {
    /// As the engine gave it, with the uid filled in.
    update: StatusUpdate,
    /// The engine's hash, or one computed when it gave none.
    hash: String,
}

/// Bookkeeping shared by the sink and the connection task.
#[derive(Debug, Default)]
pub(super) struct Book {
    /// uid → generation of works delivered to the engine and not deleted: the resync list.
    pub(super) held: HashMap<String, i64>,
    /// uid → identity, kept until the work's final (deleted) status is out.
    pub(super) info: HashMap<String, WorkInfo>,
    /// name → uid, to address status updates that carry no uid.
    pub(super) names: HashMap<String, String>,
    /// uid → latest status (answers status resync requests).
    pub(super) latest: HashMap<String, Latest>,
    /// uid → kind of event to send, for the statuses waiting to be published.
    pub(super) outbox: Outbox<StatusKind>,
    /// Works with a Publish in flight: at most one per work, so each work's statuses reach the
    /// hub in order while different works' go out side by side.
    pub(super) sending: HashSet<String>,
    /// Outbox key ([`report_key`]) → the latest pool report (the ManagedCluster status, each
    /// node's inventory). They share the outbox with work statuses, so they are sent while
    /// connected and after a reconnect in the same way, latest only.
    pub(super) reports: HashMap<String, ReportPayload>,
}

/// Outbox key of a pool report. Work statuses are keyed by uid, which never contains `/`.
pub(super) fn report_key(body: &ReportBody) -> String {
    match body {
        ReportBody::ClusterStatus(_) => "report/cluster".to_string(),
        ReportBody::Node { name, .. } => format!("report/node/{name}"),
    }
}

impl Book {
    /// Queues `uid` (once); a resync response request does not downgrade a queued update.
    fn queue(&mut self, uid: &str, kind: StatusKind) {
        self.outbox.push_with(uid.to_string(), kind, |queued, kind| {
            if kind == StatusKind::Update {
                *queued = StatusKind::Update;
            }
        });
    }

    /// The hash of the latest status or report queued under `key`.
    fn latest_hash(&self, key: &str) -> Option<&str> {
        match self.latest.get(key) {
            Some(l) => Some(&l.hash),
            None => self.reports.get(key).map(|r| r.hash.as_str()),
        }
    }

    /// Forgets a deleted work entirely.
    fn forget(&mut self, uid: &str) {
        self.held.remove(uid);
        if let Some(i) = self.info.remove(uid)
            && self.names.get(&i.meta.name).is_some_and(|u| u == uid)
        {
            self.names.remove(&i.meta.name);
        }
        self.latest.remove(uid);
    }

    /// The works we hold with their generations, sorted by uid: the spec resync request.
    pub(super) fn held_versions(&self) -> Vec<ResourceVersion> {
        let mut v: Vec<ResourceVersion> = self
            .held
            .iter()
            .map(|(uid, g)| ResourceVersion {
                resource_id: uid.clone(),
                resource_version: *g,
            })
            .collect();
        v.sort_by(|a, b| a.resource_id.cmp(&b.resource_id));
        v
    }
}

/// State shared between the handles and the task.
#[derive(Debug)]
pub(super) struct Shared {
    /// This cluster's name on the hub: events for another cluster are ignored.
    pub(super) cluster: String,
    /// The `source` of our status events.
    agent_id: String,
    /// Hands out each status event's `sequenceid`, monotonic across restarts.
    seq: SequenceIds,
    /// Taken through [`lock`], never across an await.
    pub(super) book: Mutex<Book>,
    /// Wakes the publisher when the outbox gains an entry.
    pub(super) outbox_ready: Notify,
    /// Synced was emitted at least once.
    pub(super) synced: AtomicBool,
    /// The options' metrics: clones share the series `/metrics` shows.
    pub(super) metrics: HubMetrics,
}

/// A status event ready to send.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) uid: String,
    pub(super) kind: StatusKind,
    /// The status hash in the event; a different latest hash means a newer status arrived.
    pub(super) hash: String,
    /// The final status of a deleted work: once it is out, the work is forgotten.
    deleted: bool,
    pub(super) event: CloudEvent,
}

impl Shared {
    /// Nothing known or queued yet.
    pub(super) fn new(cluster: &str, agent_id: &str, metrics: HubMetrics) -> Self {
        Shared {
            cluster: cluster.to_string(),
            agent_id: agent_id.to_string(),
            seq: SequenceIds::default(),
            book: Mutex::new(Book::default()),
            outbox_ready: Notify::new(),
            synced: AtomicBool::new(false),
            metrics,
        }
    }

    /// Holds the works of the spoke's records at version 0, so the first resync request asks
    /// the hub about each: it re-sends the ones it has and answers the others with deletes.
    pub(super) fn hold_recorded(&self, recorded: &[super::options::RecordedWork]) {
        let mut book = lock(&self.book);
        for r in recorded {
            book.held.entry(r.uid.clone()).or_insert(0);
            let info = book.info.entry(r.uid.clone()).or_default();
            info.meta.name.clone_from(&r.name);
            info.meta.uid.clone_from(&r.uid);
            info.meta.namespace.clone_from(&self.cluster);
            book.names.insert(r.name.clone(), r.uid.clone());
        }
    }

    /// Stores the latest status of a work and queues it for publishing.
    pub(super) fn enqueue_status(&self, mut update: StatusUpdate) -> Result<(), SinkError> {
        let mut book = lock(&self.book);
        let uid = match update.uid.clone().filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => match book.names.get(&update.name) {
                Some(u) => u.clone(),
                None => {
                    // Without a uid there is no resourceid to address the hub with.
                    tracing::warn!(work = %update.name, "status for a work the hub never sent; not publishing it");
                    return Ok(());
                }
            },
        };
        update.uid = Some(uid.clone());
        let hash = if update.status_hash.is_empty() {
            status_hash(&update.status)
        } else {
            update.status_hash.clone()
        };
        book.latest.insert(uid.clone(), Latest { update, hash });
        book.queue(&uid, StatusKind::Update);
        self.set_outbox_gauge(&book);
        drop(book);
        self.outbox_ready.notify_one();
        Ok(())
    }

    /// Stores the latest pool report of its kind and queues it; an identical report already
    /// delivered or queued is not queued again (`resend` forces it, for heartbeats).
    pub(super) fn enqueue_report(&self, body: ReportBody, resend: bool) {
        let key = report_key(&body);
        let report = ReportPayload::of(&self.cluster, &body);
        let mut book = lock(&self.book);
        if !resend && book.reports.get(&key).is_some_and(|r| r.hash == report.hash) {
            return;
        }
        book.reports.insert(key.clone(), report);
        book.queue(&key, StatusKind::Update);
        self.set_outbox_gauge(&book);
        drop(book);
        self.outbox_ready.notify_one();
    }

    /// Takes the next queued status and builds its event.
    /// Works with a Publish in flight are left queued (see `Book::sending`); call
    /// [`Shared::finished`] when the send is over, whatever its outcome.
    pub(super) fn next_outgoing(&self) -> Option<Outgoing> {
        let mut book = lock(&self.book);
        let mut skipped = Vec::new();
        let found = loop {
            let Some((uid, kind)) = book.outbox.pop() else {
                break None;
            };
            if book.sending.contains(&uid) {
                skipped.push((uid, kind));
                continue;
            }
            let Some(latest) = book.latest.get(&uid).cloned() else {
                if let Some(report) = book.reports.get(&uid) {
                    let event =
                        cloudevents::report_event(&self.agent_id, &self.cluster, report, self.seq.next());
                    let (hash, deleted) = (report.hash.clone(), report.gone);
                    book.sending.insert(uid.clone());
                    break Some(Outgoing {
                        uid,
                        kind,
                        hash,
                        deleted,
                        event,
                    });
                }
                continue;
            };
            let event = self.status_event(&book, &uid, kind, &latest);
            book.sending.insert(uid.clone());
            break Some(Outgoing {
                uid,
                kind,
                hash: latest.hash,
                deleted: latest.update.deleted,
                event,
            });
        };
        // Back in their places, first in line: they go as soon as their work's send is over.
        for (uid, kind) in skipped.into_iter().rev() {
            book.outbox.retry_front(uid, kind);
        }
        self.set_outbox_gauge(&book);
        found
    }

    /// A send of `uid` is over (delivered, refused or put back): its next status may go.
    pub(super) fn finished(&self, uid: &str) {
        let waiting = {
            let mut book = lock(&self.book);
            book.sending.remove(uid);
            book.outbox.contains(uid)
        };
        if waiting {
            self.outbox_ready.notify_one();
        }
    }

    /// The status event of `latest`, addressed with what the hub told us about the work and
    /// falling back to what the engine said for a work the hub never described.
    fn status_event(&self, book: &Book, uid: &str, kind: StatusKind, latest: &Latest) -> CloudEvent {
        let info = book.info.get(uid).cloned().unwrap_or_default();
        let mut meta = info.meta;
        if meta.name.is_empty() {
            meta.name = latest.update.name.clone();
        }
        if meta.namespace.is_empty() {
            meta.namespace = latest.update.namespace.clone().unwrap_or_default();
        }
        meta.uid = uid.to_string();
        meta.generation = latest.update.generation;
        let target = StatusTarget {
            agent_id: &self.agent_id,
            cluster: &self.cluster,
            resource_id: uid,
            resource_version: latest.update.generation,
            original_source: &info.original_source,
            meta: &meta,
            sequence_id: self.seq.next(),
        };
        cloudevents::status_event(kind, &target, &latest.update.status, &latest.hash)
    }

    /// Shows how many works wait to be published.
    fn set_outbox_gauge(&self, book: &Book) {
        self.metrics
            .outbox
            .set(i64::try_from(book.outbox.len()).unwrap_or(i64::MAX));
    }

    /// Offers a refused status again after `delay`, at the back of the outbox, unless a newer
    /// status of the work was queued meanwhile (that one is sent in its place).
    pub(super) fn defer(self: &Arc<Self>, out: &Outgoing, delay: std::time::Duration) {
        let (shared, uid, kind, hash) = (self.clone(), out.uid.clone(), out.kind, out.hash.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut book = lock(&shared.book);
            let still_latest = book.latest_hash(&uid) == Some(hash.as_str());
            if still_latest && !book.outbox.contains(&uid) {
                book.outbox.retry_back(uid, kind);
                shared.set_outbox_gauge(&book);
                drop(book);
                shared.outbox_ready.notify_one();
            }
        });
    }

    /// Records a successful publish (the send is over, as with [`Shared::finished`]): a deleted
    /// work whose final status is out is forgotten.
    pub(super) fn published(&self, out: &Outgoing) {
        {
            let mut book = lock(&self.book);
            let still_latest = book.latest_hash(&out.uid) == Some(out.hash.as_str());
            if out.deleted && still_latest && !book.outbox.contains(&out.uid) {
                book.forget(&out.uid);
                // A node's removal, once out, needs no memory either.
                book.reports.remove(&out.uid);
            }
        }
        self.finished(&out.uid);
    }

    /// Nothing queued and nothing in flight.
    pub(super) fn idle(&self) -> bool {
        // One lock: next_outgoing pops and marks the send under it too.
        let book = lock(&self.book);
        book.outbox.is_empty() && book.sending.is_empty()
    }

    /// Queues resync responses for works whose status hash the hub does not have.
    pub(super) fn answer_status_resync(&self, hub: &[StatusHash]) -> usize {
        let mut book = lock(&self.book);
        let want: HashMap<&str, &str> = hub
            .iter()
            .map(|h| (h.resource_id.as_str(), h.status_hash.as_str()))
            .collect();
        let stale: Vec<String> = book
            .latest
            .iter()
            .filter(|(uid, l)| hub.is_empty() || want.get(uid.as_str()) != Some(&l.hash.as_str()))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &stale {
            book.queue(uid, StatusKind::ResyncResponse);
        }
        drop(book);
        if !stale.is_empty() {
            self.outbox_ready.notify_one();
        }
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spokelet_work_api::manifestwork::{Condition, ManifestWorkStatus};

    fn shared() -> Shared {
        Shared {
            cluster: "c1".into(),
            agent_id: "a".into(),
            seq: SequenceIds::default(),
            book: Mutex::new(Book::default()),
            outbox_ready: Notify::new(),
            synced: AtomicBool::new(false),
            metrics: HubMetrics::default(),
        }
    }

    fn update(uid: &str, reason: &str, deleted: bool) -> StatusUpdate {
        let status = ManifestWorkStatus {
            conditions: vec![Condition {
                type_: "Applied".into(),
                status: "True".into(),
                reason: reason.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        StatusUpdate {
            name: format!("w-{uid}"),
            namespace: None,
            uid: Some(uid.into()),
            generation: 1,
            status_hash: String::new(),
            status,
            deleted,
        }
    }

    #[test]
    fn outbox_keeps_only_the_latest_per_work() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        s.enqueue_status(update("u2", "A", false)).unwrap();
        s.enqueue_status(update("u1", "B", false)).unwrap();
        let a = s.next_outgoing().unwrap();
        let b = s.next_outgoing().unwrap();
        assert!(s.next_outgoing().is_none());
        assert_eq!((a.uid.as_str(), b.uid.as_str()), ("u1", "u2"));
        let want = status_hash(&update("u1", "B", false).status);
        assert_eq!(a.hash, want);
    }

    #[test]
    fn failed_send_is_requeued_unless_superseded() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        let a = s.next_outgoing().unwrap();
        lock(&s.book).outbox.retry_front(a.uid.clone(), a.kind);
        // Not handed out again while its first send is still in flight.
        assert!(s.next_outgoing().is_none());
        s.finished(&a.uid);
        let again = s.next_outgoing().unwrap();
        assert_eq!(again.hash, a.hash);
        // A newer status while in flight: published once more with the new content.
        s.enqueue_status(update("u1", "B", false)).unwrap();
        s.published(&again);
        let next = s.next_outgoing().unwrap();
        assert_ne!(next.hash, again.hash);
        assert!(s.next_outgoing().is_none());
    }

    #[test]
    fn works_go_out_side_by_side_but_each_one_in_order() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        s.enqueue_status(update("u2", "A", false)).unwrap();
        let first = s.next_outgoing().unwrap();
        // u1's newer status waits for u1's send; u2 goes meanwhile.
        s.enqueue_status(update("u1", "B", false)).unwrap();
        assert_eq!(s.next_outgoing().unwrap().uid, "u2");
        assert!(s.next_outgoing().is_none());
        assert!(!s.idle());
        s.published(&first);
        let second = s.next_outgoing().unwrap();
        assert_eq!(second.uid, "u1");
        assert_ne!(second.hash, first.hash);
    }

    #[test]
    fn pool_reports_go_latest_only_and_unchanged_ones_not_at_all() {
        let s = shared();
        let status = |gpus: u32| serde_json::json!({"capacity": {"nvidia.com/gpu": gpus.to_string()}});
        s.enqueue_report(ReportBody::ClusterStatus(status(8)), false);
        s.enqueue_report(ReportBody::ClusterStatus(status(7)), false);
        let out = s.next_outgoing().unwrap();
        assert!(s.next_outgoing().is_none(), "one report per kind");
        assert_eq!(
            out.event.r#type,
            "cluster.open-cluster-management.io.v1.managedclusters.status.update_request"
        );
        let data: serde_json::Value = match &out.event.data {
            Some(spokelet_proto::Data::BinaryData(b)) => serde_json::from_slice(b).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(data["status"], status(7), "the latest");
        assert_eq!(data["metadata"]["name"], "c1");
        s.published(&out);
        // The same again: nothing queued, unless it is a heartbeat.
        s.enqueue_report(ReportBody::ClusterStatus(status(7)), false);
        assert!(s.next_outgoing().is_none());
        s.enqueue_report(ReportBody::ClusterStatus(status(7)), true);
        let beat = s.next_outgoing().unwrap();
        assert_eq!(beat.hash, out.hash);
        s.published(&beat);
        // A node's removal goes out once, and then it is forgotten.
        s.enqueue_report(
            ReportBody::Node {
                name: "n1".into(),
                document: Some(serde_json::json!({})),
            },
            false,
        );
        s.published(&s.next_outgoing().unwrap());
        s.enqueue_report(
            ReportBody::Node {
                name: "n1".into(),
                document: None,
            },
            false,
        );
        let gone = s.next_outgoing().unwrap();
        assert!(
            gone.event
                .r#type
                .ends_with("nodeinventories.status.delete_request")
        );
        assert!(gone.deleted);
        s.published(&gone);
        assert!(!lock(&s.book).reports.contains_key("report/node/n1"));
    }

    #[test]
    fn deleted_work_is_forgotten_after_its_final_status() {
        let s = shared();
        lock(&s.book).held.insert("u1".into(), 1);
        s.enqueue_status(update("u1", "Deleted", true)).unwrap();
        let out = s.next_outgoing().unwrap();
        assert!(out.deleted);
        s.published(&out);
        let book = lock(&s.book);
        assert!(book.latest.is_empty() && book.held.is_empty());
    }

    #[test]
    fn status_resync_answers_only_differing_hashes() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        s.enqueue_status(update("u2", "A", false)).unwrap();
        while let Some(o) = s.next_outgoing() {
            s.published(&o);
        }
        let h1 = lock(&s.book).latest["u1"].hash.clone();
        let n = s.answer_status_resync(&[
            StatusHash {
                resource_id: "u1".into(),
                status_hash: h1,
            },
            StatusHash {
                resource_id: "u2".into(),
                status_hash: "old".into(),
            },
        ]);
        assert_eq!(n, 1);
        let o = s.next_outgoing().unwrap();
        assert_eq!(o.uid, "u2");
        assert_eq!(o.kind, StatusKind::ResyncResponse);
        assert!(o.event.r#type.ends_with("status.resync_response"));
        assert_eq!(s.answer_status_resync(&[]), 2);
    }

    #[test]
    fn status_without_uid_uses_the_name_or_is_dropped() {
        let s = shared();
        let mut u = update("u1", "A", false);
        u.uid = None;
        s.enqueue_status(u.clone()).unwrap();
        assert!(s.next_outgoing().is_none());
        lock(&s.book).names.insert(u.name.clone(), "u9".into());
        s.enqueue_status(u).unwrap();
        assert_eq!(s.next_outgoing().unwrap().uid, "u9");
    }
}
