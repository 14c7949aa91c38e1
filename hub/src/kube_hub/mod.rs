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
mod error;
pub(crate) mod lease;
pub(crate) mod membership;
mod options;
mod retry;
mod status;
mod works;

use std::sync::Arc;

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
pub use self::error::KubeHubError;
pub use self::lease::LEASE_NAME;
use self::lease::renew_lease;
use self::membership::{Membership, follow_cluster, keep_conditions};
pub use self::options::{DEFAULT_LEASE_DURATION, KubeHubOptions};
pub use self::status::KubeStatusSink;
use self::status::{StatusQueue, write_statuses};
pub use self::works::CLEANUP_FINALIZER;
use self::works::{watch_works, work_resource};
use super::work_events::{EVENT_BUFFER, HubEvents};

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
