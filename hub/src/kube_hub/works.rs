//! The watch on the cluster namespace's works, and the cleanup finalizer that makes a deletion
//! on the hub wait for the agent.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::retry::{api_code, is_not_found, pause, retry_backoff};
use spokelet_work_api::manifestwork::{GROUP, ManifestWork, VERSION};
use spokelet_work_api::source::{Listing, WorkEvent, WorkRef};

/// Finalizer that keeps a hub work until the agent has cleaned up after it.
pub const CLEANUP_FINALIZER: &str = "cluster.open-cluster-management.io/manifest-work-cleanup";

/// Attempts at removing the finalizer when the work keeps changing under us (409 Conflict).
const FINALIZER_CONFLICT_ATTEMPTS: u32 = 5;

/// The ManifestWork resource, for untyped requests.
pub(super) fn work_resource() -> ApiResource {
    ApiResource {
        group: GROUP.to_string(),
        version: VERSION.to_string(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: "ManifestWork".to_string(),
        plural: "manifestworks".to_string(),
    }
}

/// Decodes a hub object into a work. A status the agent cannot read does not keep the work from
/// the engine: the agent overwrites the status anyway, so it is dropped and decoding retried.
fn decode_work(obj: &DynamicObject) -> Result<ManifestWork, serde_json::Error> {
    let mut value = serde_json::to_value(obj)?;
    if let Some(map) = value.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| format!("{GROUP}/{VERSION}").into());
        map.entry("kind").or_insert_with(|| "ManifestWork".into());
    }
    match serde_json::from_value::<ManifestWork>(value.clone()) {
        Ok(w) => Ok(w),
        Err(e) => {
            let had_status = value
                .as_object_mut()
                .is_some_and(|m| m.remove("status").is_some());
            if had_status && let Ok(w) = serde_json::from_value::<ManifestWork>(value) {
                tracing::warn!(work = %obj.metadata.name.as_deref().unwrap_or_default(), error = %e,
                    "ignoring the work's unreadable status on the hub; it is overwritten by the next status");
                return Ok(w);
            }
            Err(e)
        }
    }
}

/// What the watch loop remembers between events.
#[derive(Default)]
struct WatchState {
    /// Works delivered and not deleted, with the generation last delivered (so our own status
    /// writes, which the watch echoes, are not re-delivered).
    known: HashMap<String, i64>,
    /// Works whose deletion was passed on (a delete is delivered once); a name leaves when its
    /// object is gone from the hub or re-created, so the set holds only works being deleted.
    deleting: HashSet<String>,
    /// Names listed in the current (re-)list.
    listing: Option<HashSet<String>>,
    /// The first list is complete.
    synced: bool,
}

impl WatchState {
    /// Passes a deletion on, once. `uid` is the deleted object's, when known: the engine then
    /// refuses it if the work it holds under that name is another one.
    async fn deleted(&mut self, name: String, uid: Option<String>, tx: &mpsc::Sender<WorkEvent>) {
        self.known.remove(&name);
        if self.deleting.insert(name.clone()) {
            tracing::info!(work = %name, "work deleted on the hub");
            let _ = tx.send(WorkEvent::Delete(WorkRef { name, uid })).await;
        }
    }

    /// A (re-)list is complete: works known but not listed were deleted while the watch was
    /// away; the first complete list is the engine's `Synced`.
    async fn list_done(&mut self, tx: &mpsc::Sender<WorkEvent>) {
        if let Some(seen) = self.listing.take() {
            let gone: Vec<String> = self
                .known
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect();
            for name in gone {
                self.deleted(name, None, tx).await;
            }
        }
        if !self.synced {
            self.synced = true;
            tracing::info!(works = self.known.len(), "initial list of hub works complete");
            // A list is complete: every work the hub has is in it, the unreadable ones too.
            let _ = tx.send(WorkEvent::Synced(Listing::Complete)).await;
        }
    }
}

/// Watches the cluster namespace and turns changes into work events. Errors (hub down, watch
/// expired, connection cut) are retried with backoff; the watcher re-lists after a gap.
pub(super) async fn watch_works(
    api: Api<DynamicObject>,
    tx: mpsc::Sender<WorkEvent>,
    retry_max: Duration,
    shutdown: CancellationToken,
) {
    let stream = watcher::watcher(api.clone(), watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let mut backoff = retry_backoff(retry_max);
    let mut st = WatchState::default();
    loop {
        let ev = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = stream.next() => ev,
        };
        let ev = match ev {
            None => return,
            Some(Err(e)) => {
                // The watcher retries on the next poll; the backoff is ours to apply.
                tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "hub watch failed; retrying");
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
                continue;
            }
            Some(Ok(ev)) => ev,
        };
        backoff.reset();
        on_event(&api, ev, &mut st, &tx).await;
    }
}

/// One watch event.
async fn on_event(
    api: &Api<DynamicObject>,
    ev: Event<DynamicObject>,
    st: &mut WatchState,
    tx: &mpsc::Sender<WorkEvent>,
) {
    match ev {
        Event::Init => st.listing = Some(HashSet::new()),
        Event::InitApply(obj) => {
            if let (Some(l), Some(name)) = (st.listing.as_mut(), obj.metadata.name.clone()) {
                l.insert(name);
            }
            on_apply(api, obj, st, tx).await;
        }
        Event::InitDone => st.list_done(tx).await,
        Event::Apply(obj) => on_apply(api, obj, st, tx).await,
        Event::Delete(obj) => {
            if let Some(name) = obj.metadata.name {
                st.deleted(name.clone(), obj.metadata.uid, tx).await;
                // Gone from the hub: no later event can ask for this deletion again.
                st.deleting.remove(&name);
            }
        }
    }
}

/// A created or changed work: deliver it (or its deletion) and make sure it has our finalizer.
async fn on_apply(
    api: &Api<DynamicObject>,
    obj: DynamicObject,
    st: &mut WatchState,
    tx: &mpsc::Sender<WorkEvent>,
) {
    let Some(name) = obj.metadata.name.clone() else {
        return;
    };
    if obj.metadata.deletion_timestamp.is_some() {
        st.deleted(name, obj.metadata.uid.clone(), tx).await;
        return;
    }
    let generation = obj.metadata.generation.unwrap_or(0);
    if st.known.get(&name) == Some(&generation) && has_finalizer(&obj.metadata) {
        // Our own status or finalizer write echoed back: nothing new for the engine.
        return;
    }
    // A work re-created under the same name after a delete is live again.
    st.deleting.remove(&name);
    if !has_finalizer(&obj.metadata) {
        // Readable or not, it is a work of ours: a deletion on the hub waits for our cleanup.
        add_finalizer(api, &name, &obj.metadata).await;
    }
    let mut work = match decode_work(&obj) {
        Ok(w) => w,
        Err(e) => {
            // Known but unreadable: the engine leaves its objects alone and reports why. A
            // fixed version comes with a new generation.
            tracing::error!(work = %name, generation, error = %e, "cannot read the work from the hub");
            st.known.insert(name.clone(), generation);
            let _ = tx
                .send(WorkEvent::Unreadable {
                    work: WorkRef {
                        name,
                        uid: obj.metadata.uid.clone(),
                    },
                    generation,
                    reason: e.to_string(),
                })
                .await;
            return;
        }
    };
    if st.known.get(&name) == Some(&generation) {
        return;
    }
    st.known.insert(name.clone(), generation);
    // managedFields are large and meaningless to the engine.
    work.metadata.managed_fields = None;
    tracing::info!(work = %name, generation, "work from the hub");
    let _ = tx.send(WorkEvent::Upsert(Box::new(work))).await;
}

/// Whether the work carries our cleanup finalizer (kept until our cleanup is done).
fn has_finalizer(meta: &kube::api::ObjectMeta) -> bool {
    meta.finalizers
        .as_deref()
        .is_some_and(|f| f.iter().any(|f| f == CLEANUP_FINALIZER))
}

/// Adds our finalizer. A failure is logged only: the echo of any later change, or the re-list
/// after a watch gap, brings the work through `on_apply` again, which tries again.
async fn add_finalizer(api: &Api<DynamicObject>, name: &str, meta: &kube::api::ObjectMeta) {
    let mut finalizers = meta.finalizers.clone().unwrap_or_default();
    finalizers.push(CLEANUP_FINALIZER.to_string());
    // A merge patch replaces the whole list; resourceVersion makes it fail (409) on a concurrent
    // change instead of dropping someone else's finalizer. The watch then brings the new version.
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": meta.resource_version}
    });
    match api
        .patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => tracing::debug!(work = %name, "cleanup finalizer added"),
        Err(e) => {
            tracing::warn!(work = %name, error = %e, "cannot add the cleanup finalizer; retried on the next change")
        }
    }
}

/// Removes our finalizer, so the hub can finish deleting the work.
pub(super) async fn remove_finalizer(api: &Api<DynamicObject>, name: &str) -> Result<(), kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let meta = match api.get_metadata(name).await {
            Ok(m) => m.metadata,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !has_finalizer(&meta) {
            return Ok(());
        }
        let rest: Vec<&String> = meta
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != CLEANUP_FINALIZER)
            .collect();
        // As in `add_finalizer`: the whole list, guarded by resourceVersion.
        let patch = serde_json::json!({
            "metadata": {"finalizers": rest, "resourceVersion": meta.resource_version}
        });
        match api
            .patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(work = %name, "cleanup finished; finalizer removed");
                return Ok(());
            }
            Err(e) if is_not_found(&e) => return Ok(()),
            // Changed meanwhile (another finalizer, a status write): read it again.
            Err(e) if api_code(&e) == Some(409) && attempt < FINALIZER_CONFLICT_ATTEMPTS => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn decodes_works_and_tolerates_an_unreadable_status() {
        let spec =
            serde_json::json!({"workload": {"manifests": [{"apiVersion": "v1", "kind": "ConfigMap"}]}});
        // List items may come without apiVersion/kind.
        let w = decode_work(&dynamic(
            serde_json::json!({"metadata": {"name": "w"}, "spec": spec}),
        ))
        .unwrap();
        assert_eq!(w.spec.workload.manifests.len(), 1);
        // A status entry without resourceMeta: the work is still delivered, without that status.
        let odd = serde_json::json!({"resourceStatus": {"manifests": [{"conditions": []}]}});
        let w = decode_work(&dynamic(
            serde_json::json!({"metadata": {"name": "w"}, "spec": spec, "status": odd}),
        ))
        .unwrap();
        assert!(w.status.is_none());
        assert_eq!(w.spec.workload.manifests.len(), 1);
        // No spec: not a work the agent can act on.
        assert!(decode_work(&dynamic(serde_json::json!({"metadata": {"name": "w"}}))).is_err());
    }
}
