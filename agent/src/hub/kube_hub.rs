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
//! - Client certificate: when the hub kubeconfig references `client-certificate` and
//!   `client-key` files, the client's TLS config serves them through [`ReloadingClientCert`], the
//!   same resolver the gRPC transport uses. Once the files change, the next request opens a new
//!   connection with the new certificate ([`hub_client`]); the watch finishes on the old
//!   connection and the engine is told nothing. A certificate embedded in the kubeconfig
//!   (`client-certificate-data`) is fixed until restart.
//!
//! The RBAC the agent needs on the hub is in `deploy/hub/agent-rbac.yaml`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::client::ConfigExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::tls::{PemSource, ReloadingClientCert, TlsError};
use crate::backoff::ExponentialBackoff;
use crate::kube_client::{Http2ClientError, IdentityVersion};
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
    /// The HTTP/2 client for the hub could not be built.
    #[error("hub client: {0}")]
    Client(#[from] Http2ClientError),
    /// The client certificate files the hub kubeconfig names cannot be loaded.
    #[error("hub client certificate: {0}")]
    ClientCert(#[from] TlsError),
}

/// Reads a hub kubeconfig (client-certificate authentication) into a client configuration.
pub async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config, KubeHubError> {
    crate::kube_client::config_from_file(path)
        .await
        .map_err(|source| KubeHubError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
}

/// Builds a hub client from a kubeconfig (client-certificate authentication); see [`hub_client`].
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, KubeHubError> {
    hub_client(config_from_kubeconfig(path).await?, path)
}

/// Builds the hub client for `config`, read from the kubeconfig at `kubeconfig`: one HTTP/2
/// connection (the watch, status writes and lease share it) whose client certificate follows
/// rotation when the kubeconfig names it by file (see [`hub_tls_config`]). Once the certificate
/// files change, the next request opens a new connection that presents the new certificate;
/// the watch carries on over the old connection until it ends, and the engine is told nothing.
pub fn hub_client(config: kube::Config, kubeconfig: &Path) -> Result<kube::Client, KubeHubError> {
    let HubTls {
        config: tls,
        identity,
    } = hub_tls_config(&config, kubeconfig)?;
    let identity_version = identity.map(|identity| -> IdentityVersion {
        // `current` re-reads the files if they changed (logging the reload), `loads` counts it.
        Arc::new(move || {
            let _ = identity.current();
            identity.loads()
        })
    });
    Ok(crate::kube_client::client_with_tls(
        config,
        tls,
        identity_version,
    )?)
}

/// Where the hub kubeconfig's client certificate comes from: it decides whether rotation on disk
/// can be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCertSource {
    /// `client-certificate` and `client-key` files (absolute paths): re-read when they change.
    Files {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
    /// Certificate or key embedded (`client-certificate-data` / `client-key-data`, which kube
    /// prefers over files): loaded once, so rotating it needs a restart.
    Embedded,
    /// No client certificate in the kubeconfig, or one an exec plugin issues (kube's own client
    /// config handles both; a half-configured pair is refused by kube with its own error).
    Other,
}

/// Reads where the client certificate of `auth` comes from. Relative paths are relative to
/// `kubeconfig_dir`, the directory of the kubeconfig file, as kube and kubectl resolve them.
pub fn client_cert_source(auth: &kube::config::AuthInfo, kubeconfig_dir: &Path) -> ClientCertSource {
    // An exec plugin's certificate wins over the user's in kube; it is not ours to reload.
    if auth.exec.is_some() {
        return ClientCertSource::Other;
    }
    if auth.client_certificate_data.is_some() || auth.client_key_data.is_some() {
        return ClientCertSource::Embedded;
    }
    match (&auth.client_certificate, &auth.client_key) {
        (Some(cert), Some(key)) => ClientCertSource::Files {
            cert: kubeconfig_dir.join(cert),
            key: kubeconfig_dir.join(key),
        },
        _ => ClientCertSource::Other,
    }
}

/// The TLS side of the hub client.
#[derive(Debug)]
pub struct HubTls {
    /// Kube's own TLS config for the kubeconfig (so CA and server verification are exactly
    /// what the kubeconfig says), with `identity` as its client-certificate resolver if set.
    pub config: rustls::ClientConfig,
    /// The client certificate from the kubeconfig's files, re-read when they change; None when
    /// the kubeconfig embeds it or has none ([`ClientCertSource`]).
    pub identity: Option<Arc<ReloadingClientCert>>,
}

/// The TLS config of the hub client: kube's own for `config`, with the client certificate served
/// by a [`ReloadingClientCert`] over the kubeconfig's certificate and key files when it names
/// files. The resolver checks the files' stamps when asked (each handshake, and each request
/// through [`hub_client`]; no background task) and logs a reload as "hub client certificate
/// reloaded", as it does for the gRPC transport.
pub fn hub_tls_config(config: &kube::Config, kubeconfig: &Path) -> Result<HubTls, KubeHubError> {
    let mut tls = config.rustls_client_config()?;
    // `Path::join` keeps absolute paths as they are, so already-resolved paths pass unchanged.
    let dir = kubeconfig.parent().unwrap_or(Path::new(""));
    let identity = match client_cert_source(&config.auth_info, dir) {
        ClientCertSource::Files { cert, key } => {
            tracing::debug!(cert = %cert.display(), key = %key.display(),
                "hub client certificate is reloaded from its files when they change");
            // The signer must come from the provider the rest of the config uses.
            let provider = tls.crypto_provider().clone();
            let identity = Arc::new(ReloadingClientCert::new(
                PemSource::File(cert),
                PemSource::File(key),
                provider,
            )?);
            tls.client_auth_cert_resolver = identity.clone();
            // A resumed TLS 1.3 session sends no certificate: the server keeps the identity of
            // the session it resumes, so a new connection would still be the old certificate.
            // Connections to the hub are few (one HTTP/2 connection), so full handshakes cost nothing.
            tls.resumption = rustls::client::Resumption::disabled();
            Some(identity)
        }
        ClientCertSource::Embedded => {
            tracing::info!(
                kubeconfig = %kubeconfig.display(),
                "the hub kubeconfig embeds the client certificate (client-certificate-data); rotating it \
                 needs a restart, or client-certificate and client-key file paths to reload it on rotation"
            );
            None
        }
        ClientCertSource::Other => None,
    };
    Ok(HubTls {
        config: tls,
        identity,
    })
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

    /// A kubeconfig for the hub with `user` as its user entry (client certificate and key as
    /// file paths or embedded data), trusting the test certificate as CA.
    fn kubeconfig_yaml(user: serde_json::Value) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(include_str!("testdata/client.crt"));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "hub", "cluster": {
                "server": "https://127.0.0.1:6443", "certificate-authority-data": ca}}],
            "users": [{"name": "agent", "user": user}],
            "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent"}}],
            "current-context": "hub",
        })
        .to_string()
    }

    #[tokio::test]
    async fn client_certificate_files_are_resolved_against_the_kubeconfig_directory() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("tls.crt"), include_str!("testdata/client.crt")).unwrap();
        std::fs::write(certs.join("tls.key"), include_str!("testdata/client.key")).unwrap();
        let path = dir.path().join("hub.kubeconfig");
        let user = serde_json::json!({"client-certificate": "certs/tls.crt", "client-key": "certs/tls.key"});
        std::fs::write(&path, kubeconfig_yaml(user)).unwrap();

        // Through the reader the agent uses, from another working directory than the kubeconfig's.
        let config = config_from_kubeconfig(&path).await.unwrap();
        let want = ClientCertSource::Files {
            cert: certs.join("tls.crt"),
            key: certs.join("tls.key"),
        };
        assert_eq!(client_cert_source(&config.auth_info, dir.path()), want);
        // Relative paths not resolved by the reader are resolved here; absolute ones are kept.
        let relative = kube::config::AuthInfo {
            client_certificate: Some("certs/tls.crt".into()),
            client_key: Some(certs.join("tls.key").display().to_string()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&relative, dir.path()), want);

        // The client's TLS config serves the files through the reloading resolver.
        let HubTls {
            config: tls,
            identity,
        } = hub_tls_config(&config, &path).unwrap();
        assert_eq!(identity.map(|i| i.loads()), Some(1));
        // No session resumption: it would carry the old certificate's identity to new connections.
        assert!(
            format!("{:?}", tls.resumption).contains("NoClientSessionStorage"),
            "{:?}",
            tls.resumption
        );
        let resolver = format!("{:?}", tls.client_auth_cert_resolver);
        assert!(resolver.contains("ReloadingClientCert"), "{resolver}");
        assert!(resolver.contains("tls.crt"), "{resolver}");
        let served = tls.client_auth_cert_resolver.resolve(&[], &[]).unwrap();
        let pem = include_str!("testdata/client.crt");
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(served.cert[0], der);
        hub_client(config, &path).unwrap();

        // A missing file fails at start-up, naming the file.
        std::fs::remove_file(certs.join("tls.key")).unwrap();
        let config = config_from_kubeconfig(&path).await.unwrap();
        let err = hub_tls_config(&config, &path).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
    }

    #[test]
    fn embedded_or_missing_client_certificates_are_not_reloaded() {
        let dir = Path::new("/etc/spokelet");
        let embedded = kube::config::AuthInfo {
            client_certificate_data: Some("Y2VydA==".into()),
            client_key_data: Some("a2V5".to_string().into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&embedded, dir), ClientCertSource::Embedded);
        // kube prefers embedded data over a file: the file is not what is presented.
        let both = kube::config::AuthInfo {
            client_certificate: Some("tls.crt".into()),
            client_key: Some("tls.key".into()),
            client_key_data: Some("a2V5".to_string().into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&both, dir), ClientCertSource::Embedded);
        assert_eq!(
            client_cert_source(&kube::config::AuthInfo::default(), dir),
            ClientCertSource::Other
        );
        let half = kube::config::AuthInfo {
            client_certificate: Some("tls.crt".into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&half, dir), ClientCertSource::Other);
    }

    #[tokio::test]
    async fn embedded_client_certificate_keeps_kubes_identity() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.kubeconfig");
        let user = serde_json::json!({
            "client-certificate-data": b64(include_str!("testdata/client.crt")),
            "client-key-data": b64(include_str!("testdata/client.key")),
        });
        std::fs::write(&path, kubeconfig_yaml(user)).unwrap();
        let config = config_from_kubeconfig(&path).await.unwrap();
        let HubTls {
            config: tls,
            identity,
        } = hub_tls_config(&config, &path).unwrap();
        assert!(identity.is_none());
        let resolver = format!("{:?}", tls.client_auth_cert_resolver);
        assert!(!resolver.contains("ReloadingClientCert"), "{resolver}");
        assert!(tls.client_auth_cert_resolver.has_certs());
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
