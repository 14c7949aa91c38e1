//! The ManagedCluster's status on the hub: the pool reporter's latest status, merge-patched into the `status` subresource.
//!
//! Only the fields spokelet reports are sent (`clusterClaims`, `capacity`, `allocatable`,
//! `version`); the hub's own conditions are left alone. A JSON merge patch replaces
//! `clusterClaims` whole (the CRD declares it an atomic list) and merges the resource maps key
//! by key, and every report carries all the keys spokelet owns, so nothing stale survives.
//! The ManagedCluster itself is the hub's to create (it is how a hub accepts a cluster): when it
//! does not exist yet, the status waits and is retried with backoff.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::retry::{api_code, is_not_found, pause, retry_backoff};
use crate::pool_report::PoolReportSink;

/// The ManagedCluster kind (cluster-scoped, `cluster.open-cluster-management.io/v1`).
pub fn managed_cluster_resource() -> ApiResource {
    ApiResource {
        group: "cluster.open-cluster-management.io".into(),
        version: "v1".into(),
        api_version: "cluster.open-cluster-management.io/v1".into(),
        kind: "ManagedCluster".into(),
        plural: "managedclusters".into(),
    }
}

/// Report sink of the Kubernetes hub: keeps the newest ManagedCluster status for the writer.
#[derive(Debug, Clone)]
pub struct KubeReportSink {
    /// The newest status and whether it must be written even if unchanged (a heartbeat).
    pub(super) latest: watch::Sender<Option<(serde_json::Value, bool)>>,
}

impl PoolReportSink for KubeReportSink {
    fn cluster_status(&self, status: serde_json::Value, resend: bool) {
        self.latest.send_replace(Some((status, resend)));
    }

    /// A ManagedCluster has no place for per-node documents: the totals and the unhealthy
    /// nodes travel in its claims.
    fn node_inventory(&self, _node: &str, _document: Option<serde_json::Value>, _resend: bool) {}
}

/// Writes each new status to `managedclusters/<cluster>/status`, skipping one equal to the last
/// written unless it is a heartbeat; failures are retried with backoff until a newer status
/// replaces the one that failed, or shutdown.
pub(super) async fn write_cluster_status(
    client: kube::Client,
    cluster: String,
    mut latest: watch::Receiver<Option<(serde_json::Value, bool)>>,
    retry_max: std::time::Duration,
    shutdown: CancellationToken,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &managed_cluster_resource());
    let mut written: Option<serde_json::Value> = None;
    let mut backoff = retry_backoff(retry_max);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = latest.changed() => if changed.is_err() { return },
        }
        loop {
            let Some((status, resend)) = latest.borrow_and_update().clone() else {
                break;
            };
            if !resend && written.as_ref() == Some(&status) {
                break;
            }
            match write_once(&api, &cluster, &status).await {
                Ok(()) => {
                    tracing::debug!("ManagedCluster status written");
                    backoff.reset();
                    written = Some(status);
                    break;
                }
                Err(e) => {
                    let code = api_code(&e);
                    if is_not_found(&e) {
                        tracing::warn!(cluster = %cluster, "the hub has no ManagedCluster {cluster} yet (the hub creates it when it accepts the cluster); status retried");
                    } else if matches!(code, Some(400 | 413 | 422)) {
                        // The same body cannot succeed; the next report (a change or the
                        // heartbeat) is tried afresh.
                        tracing::error!(error = %e, "the hub refused the ManagedCluster status; dropped until the next report");
                        break;
                    } else {
                        tracing::warn!(error = %e, "cannot write the ManagedCluster status; retrying");
                    }
                    tokio::select! {
                        ok = pause(&mut backoff, &shutdown) => if !ok { return },
                        // A newer status goes next, without waiting out the backoff.
                        changed = latest.changed() => if changed.is_err() { return },
                    }
                    // The loop re-reads the latest: the same status to retry, or a newer one.
                }
            }
        }
    }
}

/// One merge patch of the status subresource.
async fn write_once(
    api: &Api<DynamicObject>,
    cluster: &str,
    status: &serde_json::Value,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "status": status });
    api.patch_status(cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
