//! The Kubernetes-API hub transport (classic klusterlet): watch ManifestWorks, write status, finalizer, lease.
//!
//! - Works: a watch on `ManifestWork`s in the namespace named after the cluster. Each list (first
//!   start and every re-list after a watch gap) ends with `InitDone`; works known before but not
//!   listed again were deleted while we were away and are reported as deletes. The first
//!   `InitDone` is the engine's `Synced`. Objects are decoded one by one, so a work the agent
//!   cannot read is logged and skipped instead of failing the whole list and stalling every
//!   other work; a status it cannot read is ignored (the agent overwrites it anyway).
//! - Finalizer: live works get `cluster.open-cluster-management.io/manifest-work-cleanup`, so a
//!   deletion on the hub waits for our cleanup; it is removed after the final (`deleted`) status,
//!   also when the hub refuses that status: the cleanup on the spoke is done either way.
//! - Status: the `status` subresource (JSON merge patch of `status`), latest-per-work. Transient
//!   failures (hub unreachable, 5xx, 401/403/409/429) are retried with backoff; a status the hub
//!   rejects as invalid (400/413/422) is logged and dropped, as retrying the same body cannot
//!   succeed, and it must not hold up other works' statuses.
//! - Lease: `managed-cluster-lease` (coordination.k8s.io/v1) in the cluster namespace, read and
//!   replaced (RBAC: get, create, update) every lease duration (60 s by default), retried with
//!   backoff when that fails.
//! - Every retry loop (watch, status, lease) uses [`ExponentialBackoff`] and ends on shutdown, so
//!   a hub that is down at start or goes away mid-watch costs retries, never the transport.
//!
//! The RBAC the agent needs on the hub is in `deploy/hub/agent-rbac.yaml`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::ExponentialBackoff;
use crate::work::manifestwork::{GROUP, ManifestWork, VERSION};
use crate::work::source::{SinkError, StatusSink, StatusUpdate, WorkEvent, WorkRef, WorkSource};

/// Finalizer that keeps a hub work until the agent has cleaned up after it.
pub const CLEANUP_FINALIZER: &str = "cluster.open-cluster-management.io/manifest-work-cleanup";
/// Name of the lease the agent renews in its cluster namespace.
pub const LEASE_NAME: &str = "managed-cluster-lease";
/// Default lease duration (the hub marks the cluster unknown after 5 missed durations).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(60);
/// First retry delay of every retry loop; doubles up to [`KubeHubOptions::retry_max`].
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Jitter of the retry delays.
const RETRY_JITTER: f64 = 0.5;
/// Attempts at removing the finalizer when the work keeps changing under us (409 Conflict).
const FINALIZER_CONFLICT_ATTEMPTS: u32 = 5;

/// Kubernetes-hub transport failures.
#[derive(Debug, thiserror::Error)]
pub enum KubeHubError {
    /// The hub kubeconfig cannot be read or used.
    #[error("hub kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built or a request failed.
    #[error("hub API: {0}")]
    Api(#[from] kube::Error),
}

/// Reads a hub kubeconfig (client-certificate authentication) into a client configuration.
pub async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config, KubeHubError> {
    crate::work::http2::config_from_file(path)
        .await
        .map_err(|source| KubeHubError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
}

/// Builds a hub client from a kubeconfig (client-certificate authentication).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, KubeHubError> {
    Ok(kube::Client::try_from(config_from_kubeconfig(path).await?)?)
}

/// Settings of the Kubernetes-hub transport.
#[derive(Clone)]
pub struct KubeHubOptions {
    /// Client for the hub API server.
    pub client: kube::Client,
    /// Our cluster name: the namespace our works live in.
    pub cluster_name: String,
    /// Our agent id (the lease holder identity).
    pub agent_id: String,
    /// Lease duration, also the renew interval.
    pub lease_duration: Duration,
    /// Largest retry delay of the watch, status writes and lease renewals.
    pub retry_max: Duration,
}

impl std::fmt::Debug for KubeHubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeHubOptions")
            .field("cluster_name", &self.cluster_name)
            .field("agent_id", &self.agent_id)
            .field("lease_duration", &self.lease_duration)
            .finish()
    }
}

impl KubeHubOptions {
    /// Defaults around a client.
    pub fn new(client: kube::Client, cluster_name: &str, agent_id: &str) -> Self {
        KubeHubOptions {
            client,
            cluster_name: cluster_name.to_string(),
            agent_id: agent_id.to_string(),
            lease_duration: DEFAULT_LEASE_DURATION,
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The running transport.
#[derive(Debug)]
pub struct KubeHub {
    /// Work events for the engine.
    pub source: KubeWorkSource,
    /// Status from the engine.
    pub sink: KubeStatusSink,
    /// Watch, status writer and lease tasks; they end after shutdown.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Work events from the hub's watch; `next_event` is cancel-safe.
#[derive(Debug)]
pub struct KubeWorkSource {
    /// Fed by the watch task; unbounded so the watch never stalls behind a busy engine.
    rx: mpsc::UnboundedReceiver<WorkEvent>,
}

impl WorkSource for KubeWorkSource {
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>> {
        Box::pin(self.rx.recv())
    }
}

/// Status sink writing the `status` subresource; returns at once, writes in the background.
#[derive(Debug, Clone)]
pub struct KubeStatusSink {
    /// Shared with the writer task.
    shared: Arc<Outbox>,
}

impl StatusSink for KubeStatusSink {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        let mut q = lock(&self.shared.queue);
        let name = update.name.clone();
        // `latest` holds a name exactly while `order` does (both change under this lock).
        if q.latest.insert(name.clone(), update).is_none() {
            q.order.push_back(name);
        }
        drop(q);
        self.shared.ready.notify_one();
        Box::pin(async { Ok(()) })
    }
}

/// Latest status per work, in arrival order.
#[derive(Debug, Default)]
struct Queue {
    /// name → latest update not yet written.
    latest: HashMap<String, StatusUpdate>,
    /// Names waiting, each once.
    order: VecDeque<String>,
}

/// The status outbox.
#[derive(Debug, Default)]
struct Outbox {
    /// Pending writes; a std mutex, never held across an await.
    queue: Mutex<Queue>,
    /// Wakes the writer.
    ready: Notify,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KubeHub {
    /// Starts the watch, status writer and lease tasks. Must be called inside a tokio runtime.
    /// Nothing here needs the hub to be up: each task retries until it is, or until shutdown.
    pub fn start(opts: KubeHubOptions, shutdown: CancellationToken) -> KubeHub {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox::default());
        let span = tracing::info_span!("hub", transport = "kube", cluster = %opts.cluster_name);
        // Untyped, so one object the agent cannot decode fails alone (see `decode_work`).
        let works: Api<DynamicObject> =
            Api::namespaced_with(opts.client.clone(), &opts.cluster_name, &work_resource());
        let tasks = vec![
            tokio::spawn(
                watch_works(works.clone(), tx, opts.retry_max, shutdown.clone()).instrument(span.clone()),
            ),
            tokio::spawn(
                write_statuses(works, outbox.clone(), opts.retry_max, shutdown.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(renew_lease(opts, shutdown).instrument(span)),
        ];
        KubeHub {
            source: KubeWorkSource { rx },
            sink: KubeStatusSink { shared: outbox },
            tasks,
        }
    }
}

/// The ManifestWork resource, for untyped requests.
fn work_resource() -> ApiResource {
    ApiResource {
        group: GROUP.to_string(),
        version: VERSION.to_string(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: "ManifestWork".to_string(),
        plural: "manifestworks".to_string(),
    }
}

/// The backoff of every retry loop here, up to `max`.
fn retry_backoff(max: Duration) -> ExponentialBackoff {
    ExponentialBackoff::new(RETRY_MIN, max, RETRY_JITTER)
}

/// Sleeps for the next backoff delay; false when shutdown came first.
async fn pause(backoff: &mut ExponentialBackoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(backoff.next_delay()) => true,
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
    /// Works whose deletion was passed on (a delete is delivered once).
    deleting: HashSet<String>,
    /// Names listed in the current (re-)list.
    listing: Option<HashSet<String>>,
    /// The first list is complete.
    synced: bool,
}

impl WatchState {
    /// Passes a deletion on, once.
    fn deleted(&mut self, name: String, tx: &mpsc::UnboundedSender<WorkEvent>) {
        self.known.remove(&name);
        if self.deleting.insert(name.clone()) {
            tracing::info!(work = %name, "work deleted on the hub");
            let _ = tx.send(WorkEvent::Delete(WorkRef { name }));
        }
    }
}

/// Watches the cluster namespace and turns changes into work events. Errors (hub down, watch
/// expired, connection cut) are retried with backoff; the watcher re-lists after a gap.
async fn watch_works(
    api: Api<DynamicObject>,
    tx: mpsc::UnboundedSender<WorkEvent>,
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
        match ev {
            Event::Init => st.listing = Some(HashSet::new()),
            Event::InitApply(obj) => {
                if let (Some(l), Some(name)) = (st.listing.as_mut(), obj.metadata.name.clone()) {
                    l.insert(name);
                }
                on_apply(&api, obj, &mut st, &tx).await;
            }
            Event::InitDone => {
                if let Some(seen) = st.listing.take() {
                    let gone: Vec<String> = st.known.keys().filter(|n| !seen.contains(*n)).cloned().collect();
                    for name in gone {
                        st.deleted(name, &tx);
                    }
                }
                if !st.synced {
                    st.synced = true;
                    tracing::info!(works = st.known.len(), "initial list of hub works complete");
                    let _ = tx.send(WorkEvent::Synced);
                }
            }
            Event::Apply(obj) => on_apply(&api, obj, &mut st, &tx).await,
            Event::Delete(obj) => {
                if let Some(name) = obj.metadata.name {
                    st.deleted(name, &tx);
                }
            }
        }
    }
}

/// A created or changed work: deliver it (or its deletion) and make sure it has our finalizer.
async fn on_apply(
    api: &Api<DynamicObject>,
    obj: DynamicObject,
    st: &mut WatchState,
    tx: &mpsc::UnboundedSender<WorkEvent>,
) {
    let Some(name) = obj.metadata.name.clone() else {
        return;
    };
    if obj.metadata.deletion_timestamp.is_some() {
        st.deleted(name, tx);
        return;
    }
    let generation = obj.metadata.generation.unwrap_or(0);
    if st.known.get(&name) == Some(&generation) && has_finalizer(&obj.metadata) {
        // Our own status or finalizer write echoed back: nothing new for the engine.
        return;
    }
    let mut work = match decode_work(&obj) {
        Ok(w) => w,
        Err(e) => {
            // Not taken on: no finalizer, no event. A fixed version arrives as a new event.
            tracing::error!(work = %name, generation, error = %e, "cannot read the work from the hub; skipped");
            return;
        }
    };
    // A work re-created under the same name after a delete is live again.
    st.deleting.remove(&name);
    if !has_finalizer(&obj.metadata) {
        add_finalizer(api, &name, &obj.metadata).await;
    }
    if st.known.get(&name) == Some(&generation) {
        return;
    }
    st.known.insert(name.clone(), generation);
    // managedFields are large and meaningless to the engine.
    work.metadata.managed_fields = None;
    tracing::info!(work = %name, generation, "work from the hub");
    let _ = tx.send(WorkEvent::Upsert(Box::new(work)));
}

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

/// Writes queued statuses; after a deleted work's final status, removes the finalizer.
async fn write_statuses(
    api: Api<DynamicObject>,
    outbox: Arc<Outbox>,
    retry_max: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = retry_backoff(retry_max);
    loop {
        let next = {
            let mut q = lock(&outbox.queue);
            q.order.pop_front().and_then(|n| q.latest.remove(&n))
        };
        let Some(update) = next else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = outbox.ready.notified() => continue,
            }
        };
        match write_one(&api, &update).await {
            Ok(()) => backoff.reset(),
            Err(e) => {
                tracing::warn!(work = %update.name, error = %e, attempt = backoff.attempts() + 1,
                    "status write to the hub failed; retrying");
                {
                    let mut q = lock(&outbox.queue);
                    // Keep a newer update if one arrived meanwhile. Requeued at the back, so
                    // one work the hub keeps refusing does not hold up the others.
                    if !q.latest.contains_key(&update.name) {
                        q.order.push_back(update.name.clone());
                        q.latest.insert(update.name.clone(), update);
                    }
                }
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// The API status code of a failed request, if the server answered.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether an API error means the object is gone.
fn is_not_found(e: &kube::Error) -> bool {
    api_code(e) == Some(404)
}

/// Whether the hub refused the request body itself: sending it again cannot succeed.
fn is_rejected(e: &kube::Error) -> bool {
    matches!(api_code(e), Some(400 | 413 | 422))
}

/// One status write (and the finalizer removal for a deleted work).
async fn write_one(api: &Api<DynamicObject>, u: &StatusUpdate) -> Result<(), kube::Error> {
    // Merge patch of `status` through the status subresource: the spec and metadata are not
    // ours, and the status subresource ignores everything but `status` anyway.
    let patch = serde_json::json!({ "status": u.status });
    match api
        .patch_status(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => tracing::debug!(work = %u.name, hash = %u.status_hash, "status written to the hub"),
        // Already gone (no finalizer held it): nothing left to report to.
        Err(e) if is_not_found(&e) => return Ok(()),
        // Dropped: the engine sends a new status on the next change. The final status of a
        // deleted work still releases the work below, as the cleanup is done either way.
        Err(e) if is_rejected(&e) => {
            tracing::error!(work = %u.name, error = %e, deleted = u.deleted, "the hub rejected the work's status; dropped")
        }
        Err(e) => return Err(e),
    }
    if u.deleted {
        remove_finalizer(api, &u.name).await?;
    }
    Ok(())
}

/// Removes our finalizer, so the hub can finish deleting the work.
async fn remove_finalizer(api: &Api<DynamicObject>, name: &str) -> Result<(), kube::Error> {
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

/// `metav1.MicroTime` wire format of now.
fn micro_time_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = crate::work::conditions::now_rfc3339();
    // now_rfc3339 is `YYYY-MM-DDTHH:MM:SSZ`; MicroTime adds six fractional digits.
    format!("{}.{:06}Z", secs.trim_end_matches('Z'), d.subsec_micros())
}

/// Lease failures.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("cannot build the lease: {0}")]
    Build(#[from] serde_json::Error),
}

/// Renews the cluster lease every lease duration, creating it if the hub has none; a failed
/// renewal is retried with backoff (at most a lease duration apart).
async fn renew_lease(opts: KubeHubOptions, shutdown: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(opts.client.clone(), &opts.cluster_name);
    let secs = i32::try_from(opts.lease_duration.as_secs())
        .unwrap_or(i32::MAX)
        .max(1);
    let mut backoff = retry_backoff(opts.retry_max.min(opts.lease_duration));
    loop {
        let wait = match renew_once(&api, &opts, secs).await {
            Ok(()) => {
                tracing::debug!("cluster lease renewed");
                backoff.reset();
                opts.lease_duration
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "cannot renew the cluster lease; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One renewal: get and replace (guarded by resourceVersion), or create when absent.
async fn renew_once(api: &Api<Lease>, opts: &KubeHubOptions, secs: i32) -> Result<(), LeaseError> {
    let spec = serde_json::json!({
        "holderIdentity": opts.agent_id,
        "leaseDurationSeconds": secs,
        "renewTime": micro_time_now(),
    });
    match api.get(LEASE_NAME).await {
        Ok(lease) => {
            let mut value = serde_json::to_value(&lease)?;
            if let Some(map) = value.as_object_mut() {
                let current = map.entry("spec").or_insert_with(|| serde_json::json!({}));
                if let (Some(current), Some(new)) = (current.as_object_mut(), spec.as_object()) {
                    current.extend(new.clone());
                }
            }
            let lease: Lease = serde_json::from_value(value)?;
            api.replace(LEASE_NAME, &PostParams::default(), &lease).await?;
        }
        Err(e) if is_not_found(&e) => {
            let lease: Lease = serde_json::from_value(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": opts.cluster_name},
                "spec": spec,
            }))?;
            api.create(&PostParams::default(), &lease).await?;
            tracing::info!("cluster lease created");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_time_has_six_fraction_digits() {
        let t = micro_time_now();
        assert_eq!(t.len(), "2024-01-01T00:00:00.000000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.contains('.'));
    }

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

    #[test]
    fn only_refused_bodies_are_dropped() {
        let api = |code| {
            kube::Error::Api(
                serde_json::from_value(
                    serde_json::json!({"status": "Failure", "code": code, "message": "m"}),
                )
                .unwrap(),
            )
        };
        for code in [400, 413, 422] {
            assert!(is_rejected(&api(code)), "{code}");
        }
        for code in [401, 403, 404, 409, 429, 500, 503] {
            assert!(!is_rejected(&api(code)), "{code}");
        }
        assert!(is_not_found(&api(404)));
    }

    #[tokio::test]
    async fn sink_keeps_latest_per_work() {
        let sink = KubeStatusSink {
            shared: Arc::new(Outbox::default()),
        };
        for generation in [1, 2] {
            let u = StatusUpdate {
                name: "w".into(),
                namespace: None,
                uid: None,
                generation,
                status: Default::default(),
                status_hash: String::new(),
                deleted: false,
            };
            sink.publish(u).await.unwrap();
        }
        let q = lock(&sink.shared.queue);
        assert_eq!(q.order.len(), 1);
        assert_eq!(q.latest["w"].generation, 2);
    }
}
