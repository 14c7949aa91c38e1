//! One spoke cluster per test binary, shared by its tests.
//!
//! Starting a control plane costs seconds, so tests that can share one do, and keep out of
//! each other's way with [`crate::unique_name`] namespaces and object names. The cluster
//! lives in a static and is never dropped: when the test process exits, its servers die
//! with it (`PR_SET_PDEATHSIG`) and the run directory's janitor deletes its files.

use tokio::sync::OnceCell;

use crate::{ClusterOptions, HarnessError, KubeCluster};

static SHARED_SPOKE: OnceCell<Result<KubeCluster, String>> = OnceCell::const_new();

/// The shared spoke (with controller-manager), started by the first caller.
///
/// If the start fails, every caller gets the same error instead of retrying a slow start;
/// if one of its servers has died since, the error names it and carries its log.
pub async fn try_shared_spoke() -> Result<&'static KubeCluster, HarnessError> {
    // Each test has its own runtime; the cell's lock works across runtimes, and the
    // cluster holds no runtime-bound state (clients are made per call).
    let started = SHARED_SPOKE
        .get_or_init(|| async {
            KubeCluster::start(ClusterOptions::spoke())
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    let cluster = started
        .as_ref()
        .map_err(|e| HarnessError::SharedClusterFailed(e.clone()))?;
    // A server that crashed under an earlier test fails every later one at once, with its
    // log, instead of each retrying against refused connections.
    cluster.check_running()?;
    Ok(cluster)
}

/// [`try_shared_spoke`] for tests: panics (fails the test) with the start error.
pub async fn shared_spoke() -> &'static KubeCluster {
    match try_shared_spoke().await {
        Ok(cluster) => cluster,
        Err(e) => panic!("{e}"),
    }
}
