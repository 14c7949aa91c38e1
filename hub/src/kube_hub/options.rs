//! The Kubernetes-hub transport's settings.

use std::time::Duration;

/// Default lease duration (the hub marks the cluster unknown after 5 missed durations).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(60);

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
