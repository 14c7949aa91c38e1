//! The Kubernetes-API hub transport (classic klusterlet): watch ManifestWorks, write status, finalizer, lease.
//!
//! - Works: a watch on `ManifestWork`s in the namespace named after the cluster. Each list (first
//!   start and every re-list after a watch gap) ends with `InitDone`; works known before but not
//!   listed again were deleted while we were away and are reported as deletes. The first
//!   `InitDone` is the engine's `Synced(Complete)`: a list is evidence that a recorded work not
//!   in it was deleted. Objects are decoded one by one, so a work the agent cannot read is
//!   passed on as `Unreadable` (its objects are left alone and its status says why) instead of
//!   failing the whole list and stalling every other work; a status it cannot read is ignored
//!   (the agent overwrites it anyway). Deletes carry the object's uid, so a delete of an older
//!   work of the same name cannot delete the current one.
//! - Finalizer: live works get `cluster.open-cluster-management.io/manifest-work-cleanup`, so a
//!   deletion on the hub waits for our cleanup; it is removed after the final (`deleted`) status,
//!   also when the hub refuses that status: the cleanup on the spoke is done either way.
//! - Status: the `status` subresource (JSON merge patch of `status`), latest-per-work. Transient
//!   failures (hub unreachable, 5xx, 401/403/409/429) are retried with backoff; a status the hub
//!   rejects as invalid (400/413/422) is logged and dropped, as retrying the same body cannot
//!   succeed, and it must not hold up other works' statuses.
//! - Membership: the hub's ManagedCluster, watched by name; while the hub accepts the cluster
//!   the agent keeps its `ManagedClusterJoined` and `ManagedClusterConditionAvailable`
//!   conditions as OCM's registration agent does (`membership`).
//! - Lease: `managed-cluster-lease` (coordination.k8s.io/v1) in the cluster namespace, its
//!   `renewTime` read and replaced (RBAC: get, update; create where the hub has not created it)
//!   while the hub accepts the cluster, every `spec.leaseDurationSeconds` of the ManagedCluster
//!   jittered by up to a quarter (60 s by default), retried with backoff when that fails.
//! - Every retry loop (watch, status, lease) uses [`ExponentialBackoff`] and ends on shutdown, so
//!   a hub that is down at start or goes away mid-watch costs retries, never the transport.
//! - Client certificate: when the hub kubeconfig references `client-certificate` and
//!   `client-key` files, the client's TLS config serves them through
//!   [`ReloadingClientCert`](crate::tls::ReloadingClientCert), the same resolver the gRPC
//!   transport uses. Once the files change, the next request opens a new connection with the new
//!   certificate ([`hub_client`]); the watch finishes on the old connection and the engine is
//!   told nothing. A certificate embedded in the kubeconfig (`client-certificate-data`) is fixed
//!   until restart.
//!
//! The RBAC the agent needs on the hub is in `deploy/hub/agent-rbac.yaml`.
//!
//! - `client`: the hub kubeconfig, the client and its reloading client certificate.
//! - `works`: the watch on works and the cleanup finalizer.
//! - `status`: the status sink and the task that writes statuses.
//! - `membership`: the ManagedCluster followed, and its Joined/Available conditions.
//! - `lease`: the cluster lease renewal.
//! - `cluster`: the ManagedCluster's status (the pool's claims and capacity).

mod client;
mod cluster;
pub(crate) mod lease;
pub(crate) mod membership;
mod status;
mod works;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::client::{
    ClientCertSource, HubSecurity, HubTls, client_cert_source, client_from_kubeconfig,
    config_from_kubeconfig, gated_hub_client, hub_client, hub_tls_config,
};
use self::cluster::write_cluster_status;
pub use self::cluster::{KubeReportSink, managed_cluster_resource};
use self::lease::renew_lease;
use self::membership::{Membership, follow_cluster, keep_conditions};
pub use self::status::KubeStatusSink;
use self::status::{StatusQueue, write_statuses};
use self::works::{watch_works, work_resource};
use super::tls::TlsError;
use super::work_events::{EVENT_BUFFER, HubEvents};
use spokelet_base::backoff::ExponentialBackoff;
use spokelet_kube_client::KubeClientError;

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

/// Kubernetes-hub transport failures.
#[derive(Debug, thiserror::Error)]
pub enum KubeHubError {
    /// The hub kubeconfig cannot be read or used.
    #[error("hub kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig path as given.
        path: String,
        /// Why kube could not read or use it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built or a request failed.
    #[error("hub API: {0}")]
    Api(#[from] kube::Error),
    /// The HTTP/2 client for the hub could not be built.
    #[error("hub client: {0}")]
    Client(#[from] KubeClientError),
    /// The client certificate files the hub kubeconfig names cannot be loaded.
    #[error("hub client certificate: {0}")]
    ClientCert(#[from] TlsError),
    /// The hub kubeconfig names an `http://` server and `--insecure-plaintext` is not set.
    #[error(
        "hub server {server} is plain http; refusing to send credentials and works unencrypted (set --insecure-plaintext to allow it)"
    )]
    Plaintext {
        /// The server URL.
        server: String,
    },
    /// The hub kubeconfig sets `insecure-skip-tls-verify` and `--hub-insecure-skip-tls-verify`
    /// is not set.
    #[error(
        "hub kubeconfig {kubeconfig} sets insecure-skip-tls-verify; refusing a hub whose certificate is not verified (set certificate-authority, or --hub-insecure-skip-tls-verify to allow it)"
    )]
    Unverified {
        /// The kubeconfig path.
        kubeconfig: String,
    },
    /// The hub kubeconfig names no CA and the system has no roots.
    #[error(
        "the hub kubeconfig names no certificate-authority and the system has no CA certificates to verify the hub with"
    )]
    NoRoots,
    /// The TLS configuration could not be built.
    #[error("hub TLS: {0}")]
    Tls(rustls::Error),
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
    /// Lease duration and renew interval on a hub that serves no ManagedCluster to the agent;
    /// an OCM hub's ManagedCluster sets its own (`spec.leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// The spoke's API server, probed for the ManagedCluster's `Available` condition; without
    /// one only `Joined` is kept.
    pub spoke: Option<kube::Client>,
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
            spoke: None,
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The running transport.
#[derive(Debug)]
pub struct KubeHub {
    /// Work events from the watch, for the engine; `recv` is cancel-safe.
    pub source: HubEvents,
    /// Takes the engine's statuses and returns at once; a background task writes them.
    pub sink: KubeStatusSink,
    /// Takes the pool's ManagedCluster status; a background task writes it.
    pub reports: KubeReportSink,
    /// Watch, status writer, ManagedCluster status, membership and lease tasks; they end after
    /// shutdown.
    pub tasks: Vec<JoinHandle<()>>,
}

impl KubeHub {
    /// Starts the watch, status writer and lease tasks. Must be called inside a tokio runtime.
    /// Nothing here needs the hub to be up: each task retries until it is, or until shutdown.
    pub fn start(opts: KubeHubOptions, shutdown: CancellationToken) -> KubeHub {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let queue = Arc::new(StatusQueue::default());
        let (reports_tx, reports_rx) = tokio::sync::watch::channel(None);
        let (membership_tx, membership_rx) = tokio::sync::watch::channel(Membership::Pending);
        let span = tracing::info_span!("hub", transport = "kube", cluster = %opts.cluster_name);
        // Untyped, so one object the agent cannot decode fails alone (see `decode_work`).
        let works: Api<DynamicObject> =
            Api::namespaced_with(opts.client.clone(), &opts.cluster_name, &work_resource());
        let tasks = vec![
            tokio::spawn(
                watch_works(works.clone(), tx, opts.retry_max, shutdown.clone()).instrument(span.clone()),
            ),
            tokio::spawn(
                write_statuses(works, queue.clone(), opts.retry_max, shutdown.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(
                write_cluster_status(
                    opts.client.clone(),
                    opts.cluster_name.clone(),
                    reports_rx,
                    opts.retry_max,
                    shutdown.clone(),
                )
                .instrument(span.clone()),
            ),
            tokio::spawn(
                follow_cluster(
                    opts.client.clone(),
                    opts.cluster_name.clone(),
                    membership_tx,
                    opts.retry_max,
                    shutdown.clone(),
                )
                .instrument(span.clone()),
            ),
            tokio::spawn(
                keep_conditions(
                    opts.client.clone(),
                    opts.cluster_name.clone(),
                    opts.spoke.clone(),
                    membership_rx.clone(),
                    shutdown.clone(),
                )
                .instrument(span.clone()),
            ),
            tokio::spawn(renew_lease(opts, membership_rx, shutdown).instrument(span)),
        ];
        KubeHub {
            source: rx,
            sink: KubeStatusSink { queue },
            reports: KubeReportSink { latest: reports_tx },
            tasks,
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
