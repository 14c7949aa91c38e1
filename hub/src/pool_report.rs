//! What the pool reporter hands a hub transport: the ManagedCluster status and per-node inventories, latest wins.
//!
//! A transport keeps only the newest report of each kind and delivers it when the hub is
//! reachable, so a report made while the hub is down is sent once, after the reconnect, and a
//! burst of changes costs one delivery. Calls return at once.

/// Takes pool reports for one hub transport.
pub trait PoolReportSink: Send + Sync + std::fmt::Debug {
    /// Queues the ManagedCluster's `status` (claims, capacity, allocatable, version).
    /// `resend`: deliver it even if it equals the last one (the slow heartbeat).
    fn cluster_status(&self, status: serde_json::Value, resend: bool);

    /// Queues one node's NodeInventory document, or its removal (`None`). A transport with no
    /// place for per-node documents (the Kubernetes hub: ManagedCluster has none) ignores it.
    fn node_inventory(&self, node: &str, document: Option<serde_json::Value>, resend: bool);
}
