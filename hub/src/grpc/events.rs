//! What each event from the hub does: spec changes go to the engine, status resync requests
//! queue answers, and a work whose spec event cannot be decoded goes to the engine as
//! `Unreadable` (its objects are left alone, its status says why).

use kube::ResourceExt;
use spokelet_proto::{CloudEvent, MANIFEST_BUNDLES};

use super::book::WorkInfo;
use super::session::Runner;
use crate::cloudevents::{self, CodecError, Incoming, SpecEvent, WireMeta};
use spokelet_base::lock::lock;
use spokelet_work_api::source::{WorkEvent, WorkRef};

impl Runner {
    /// Handles one event: whether it was a spec event (which extends the sync quiet period), and
    /// the work event it gives the engine, which the caller sends (waiting when the engine's
    /// channel is full: backpressure, not an unbounded backlog).
    pub(super) fn handle_event(&self, ev: &CloudEvent) -> (bool, Option<WorkEvent>) {
        let m = &self.opts.metrics;
        match cloudevents::decode(ev, &self.shared.cluster) {
            Ok(Incoming::Heartbeat) => {
                m.event("heartbeat");
                (false, None)
            }
            Ok(Incoming::StatusResync(hashes)) => {
                m.event("status.resync_request");
                let n = self.shared.answer_status_resync(&hashes);
                tracing::debug!(hub_hashes = hashes.len(), answering = n, "status resync request");
                (false, None)
            }
            Ok(Incoming::Spec(spec)) => {
                // Decoded events have one of the known types, so the label set stays small.
                let kind = ev
                    .r#type
                    .strip_prefix(MANIFEST_BUNDLES)
                    .unwrap_or("")
                    .trim_start_matches('.');
                m.event(if spec.deleted && !kind.ends_with(cloudevents::action::DELETE) {
                    "spec.deletion_timestamp"
                } else {
                    kind
                });
                (true, self.handle_spec(spec))
            }
            Err(e @ CodecError::WrongCluster { .. }) => {
                m.event("ignored");
                tracing::warn!(id = %ev.id, error = %e, "ignoring event for another cluster");
                (false, None)
            }
            Err(e) => {
                m.event("invalid");
                tracing::warn!(id = %ev.id, r#type = %ev.r#type, error = %e, "invalid event from the hub; skipped");
                // Only a work's own spec event that fails to decode says something about that work;
                // an event type we do not know (perhaps newer than us) must not fail a good work.
                let about_the_work = !matches!(e, CodecError::UnknownType(_));
                let event = match cloudevents::identify(ev) {
                    Some((uid, version)) if about_the_work => {
                        Some(self.report_unreadable(ev, &uid, version, &e))
                    }
                    _ => None,
                };
                // A broken spec event is still activity in the resync window.
                (ev.r#type.contains(".spec."), event)
            }
        }
    }

    /// Passes a spec change to the engine and records it.
    fn handle_spec(&self, spec: SpecEvent) -> Option<WorkEvent> {
        if spec.deleted {
            self.handle_delete(spec)
        } else {
            self.handle_upsert(spec)
        }
    }

    /// A work deleted on the hub: it leaves the resync list, and its identity is kept (or taken
    /// from the event) so its final status can still be addressed. The work is the one the
    /// event's resource id names: the name we hold for that id wins over the event's, and the
    /// engine refuses a delete whose id is not the id of the work it holds under that name.
    fn handle_delete(&self, spec: SpecEvent) -> Option<WorkEvent> {
        let uid = spec.resource_id.clone();
        let mut book = lock(&self.shared.book);
        let name = book
            .info
            .get(&uid)
            .map(|i| i.meta.name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| spec.name.clone());
        book.held.remove(&uid);
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            tracing::warn!(resource_id = %uid, "delete for a work we do not know and whose name the event lacks");
            return None;
        };
        let info = book.info.entry(uid.clone()).or_default();
        info.meta.name.clone_from(&name);
        info.meta.uid.clone_from(&uid);
        if info.meta.namespace.is_empty() {
            info.meta.namespace.clone_from(&self.shared.cluster);
        }
        if info.original_source.is_empty() {
            info.original_source = spec.original_source;
        }
        book.names.insert(name.clone(), uid.clone());
        drop(book);
        tracing::info!(work = %name, resource_id = %uid, "work deleted on the hub");
        Some(WorkEvent::Delete(WorkRef { name, uid: Some(uid) }))
    }

    /// A created or changed work, unless it is older than the version we hold.
    fn handle_upsert(&self, spec: SpecEvent) -> Option<WorkEvent> {
        let uid = spec.resource_id.clone();
        let mut book = lock(&self.shared.book);
        let work = spec.work?;
        if let Some(&have) = book.held.get(&uid)
            && spec.resource_version != 0
            && spec.resource_version < have
        {
            tracing::debug!(resource_id = %uid, have, got = spec.resource_version, "stale work version; ignored");
            return None;
        }
        let name = work.name_any();
        book.held.insert(uid.clone(), spec.resource_version);
        book.names.insert(name.clone(), uid.clone());
        book.info.insert(
            uid.clone(),
            WorkInfo {
                meta: WireMeta {
                    name: name.clone(),
                    namespace: work.namespace().unwrap_or_default(),
                    uid: uid.clone(),
                    generation: spec.resource_version,
                    labels: work.labels().clone(),
                    annotations: work.annotations().clone(),
                },
                original_source: spec.original_source,
            },
        );
        drop(book);
        tracing::info!(work = %name, resource_id = %uid, generation = spec.resource_version, "work from the hub");
        Some(WorkEvent::Upsert(work))
    }

    /// Passes a work whose spec event could not be decoded to the engine as unreadable, and
    /// keeps its identity so the engine's status about it can be addressed.
    fn report_unreadable(&self, ev: &CloudEvent, uid: &str, version: i64, err: &CodecError) -> WorkEvent {
        let name = {
            let mut book = lock(&self.shared.book);
            let known = book
                .info
                .get(uid)
                .map(|i| i.meta.name.clone())
                .filter(|n| !n.is_empty());
            let name = known
                .or_else(|| cloudevents::identify_name(ev))
                .unwrap_or_else(|| uid.to_string());
            let info = book.info.entry(uid.to_string()).or_default();
            if info.meta.name.is_empty() {
                info.meta.name.clone_from(&name);
                info.meta.uid = uid.to_string();
                info.meta.namespace.clone_from(&self.shared.cluster);
            }
            if info.original_source.is_empty() {
                info.original_source.clone_from(&ev.source);
            }
            book.names.insert(name.clone(), uid.to_string());
            name
        };
        WorkEvent::Unreadable {
            work: WorkRef {
                name,
                uid: Some(uid.to_string()),
            },
            generation: version,
            reason: format!("event {} rejected (InvalidManifestBundle): {err}", ev.r#type),
        }
    }
}
