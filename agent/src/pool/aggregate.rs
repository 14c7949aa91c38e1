//! The Compute Pool's inventory: each NodeInventory summarised, and the totals the platform places work by.
//!
//! Only the fields the summary needs are read from each document, each with a default, so a
//! node agent of another version (a field more or less) still counts. A document that cannot
//! be read at all counts as an unhealthy node with the reason `InventoryUnreadable`: a node the
//! pool cannot vouch for must not be offered for work.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one node contributes to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    /// The node's name (the NodeInventory's name).
    pub name: String,
    /// Eligible for work: the node's own health verdict.
    pub healthy: bool,
    /// Why not, as `Code` or `Code:subject` (`GpuEccUncorrectable:gpu3`); empty when healthy.
    pub reasons: Vec<String>,
    /// Hardware threads.
    pub cpus: u64,
    /// RAM in bytes.
    pub memory_bytes: u64,
    /// Physical GPUs by product name.
    pub gpus_by_model: BTreeMap<String, u64>,
    /// Framebuffer of all its GPUs, in bytes.
    pub gpu_memory_bytes: u64,
    /// MIG devices by profile (`1g.10gb`).
    pub mig_by_profile: BTreeMap<String, u64>,
    /// Has an RDMA port that is up (ACTIVE): it can take part in RDMA collectives now.
    pub rdma_capable: bool,
}

impl NodeSummary {
    /// Physical GPUs on the node.
    pub fn gpus(&self) -> u64 {
        self.gpus_by_model.values().sum()
    }
}

/// The pool's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolTotals {
    /// Nodes with a NodeInventory.
    pub nodes: u64,
    /// Of those, healthy.
    pub healthy_nodes: u64,
    /// Of those, with an RDMA port up.
    pub rdma_nodes: u64,
    /// Hardware threads, all nodes.
    pub cpus: u64,
    /// Hardware threads of the healthy nodes (the `allocatable` CPUs).
    pub healthy_cpus: u64,
    /// RAM in bytes, all nodes.
    pub memory_bytes: u64,
    /// RAM in bytes of the healthy nodes.
    pub healthy_memory_bytes: u64,
    /// Physical GPUs, all nodes.
    pub gpus: u64,
    /// Physical GPUs of the healthy nodes (the `allocatable` `nvidia.com/gpu`).
    pub healthy_gpus: u64,
    /// GPUs by product name, all nodes.
    pub gpus_by_model: BTreeMap<String, u64>,
    /// GPU framebuffer in bytes, all nodes.
    pub gpu_memory_bytes: u64,
    /// MIG devices by profile, all nodes.
    pub mig_by_profile: BTreeMap<String, u64>,
}

/// The pool: every node, by name, and the totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolInventory {
    /// Per node, sorted by name.
    pub nodes: Vec<NodeSummary>,
    /// Sums over `nodes`.
    pub totals: PoolTotals,
}

impl PoolInventory {
    /// The pool of these `(node name, NodeInventory status)` pairs, in any order.
    pub fn from_statuses<'a>(statuses: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>) -> Self {
        let mut nodes: Vec<NodeSummary> = statuses
            .into_iter()
            .map(|(name, status)| summarise(name, status))
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let totals = total(&nodes);
        PoolInventory { nodes, totals }
    }

    /// The nodes that are not healthy.
    pub fn unhealthy(&self) -> impl Iterator<Item = &NodeSummary> {
        self.nodes.iter().filter(|n| !n.healthy)
    }
}

/// The part of a NodeInventory's status the summary reads. These mirror the hardware crate's
/// serialized names field for field (`spokelet inventory --output json`); each defaults, so a
/// field a node agent of another version lacks reads as absent instead of failing the node.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct StatusDoc {
    inventory: Option<InventoryDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct InventoryDoc {
    cpu: CpuDoc,
    memory: MemoryDoc,
    gpus: GpusDoc,
    rdma: Vec<RdmaDoc>,
    /// Absent from node agents older than health reporting.
    health: Option<HealthDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CpuDoc {
    threads: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct MemoryDoc {
    total_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GpusDoc {
    devices: Vec<GpuDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct GpuDoc {
    name: String,
    memory_bytes: Option<u64>,
    mig_devices: Vec<MigDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MigDoc {
    profile: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RdmaDoc {
    ports: Vec<PortDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PortDoc {
    state: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HealthDoc {
    healthy: bool,
    reasons: Vec<ReasonDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReasonDoc {
    code: String,
    subject: String,
}

/// One node's summary from its NodeInventory status.
fn summarise(name: &str, status: &serde_json::Value) -> NodeSummary {
    let mut node = NodeSummary {
        name: name.to_string(),
        healthy: false,
        reasons: Vec::new(),
        cpus: 0,
        memory_bytes: 0,
        gpus_by_model: BTreeMap::new(),
        gpu_memory_bytes: 0,
        mig_by_profile: BTreeMap::new(),
        rdma_capable: false,
    };
    let inventory = match serde_json::from_value::<StatusDoc>(status.clone()) {
        Ok(StatusDoc { inventory: Some(i) }) => i,
        Ok(StatusDoc { inventory: None }) => {
            node.reasons.push("InventoryNotReported".into());
            return node;
        }
        Err(_) => {
            node.reasons.push("InventoryUnreadable".into());
            return node;
        }
    };
    node.cpus = inventory.cpu.threads;
    node.memory_bytes = inventory.memory.total_bytes.unwrap_or(0);
    for gpu in &inventory.gpus.devices {
        let model = if gpu.name.is_empty() { "unknown" } else { &gpu.name };
        *node.gpus_by_model.entry(model.to_string()).or_default() += 1;
        node.gpu_memory_bytes = node
            .gpu_memory_bytes
            .saturating_add(gpu.memory_bytes.unwrap_or(0));
        for mig in &gpu.mig_devices {
            if let Some(p) = &mig.profile {
                *node.mig_by_profile.entry(p.clone()).or_default() += 1;
            }
        }
    }
    node.rdma_capable = inventory
        .rdma
        .iter()
        .flat_map(|d| &d.ports)
        .any(|p| p.state.as_deref() == Some("ACTIVE"));
    match inventory.health {
        Some(h) => {
            node.healthy = h.healthy && h.reasons.is_empty();
            node.reasons = h
                .reasons
                .iter()
                .map(|r| match r.subject.as_str() {
                    "" => r.code.clone(),
                    s => format!("{}:{s}", r.code),
                })
                .collect();
        }
        // An older node agent: its health is unknown, so it is not offered for work.
        None => node.reasons.push("HealthNotReported".into()),
    }
    node
}

/// Sums the nodes.
fn total(nodes: &[NodeSummary]) -> PoolTotals {
    let mut t = PoolTotals::default();
    for n in nodes {
        t.nodes += 1;
        t.cpus += n.cpus;
        t.memory_bytes = t.memory_bytes.saturating_add(n.memory_bytes);
        t.gpus += n.gpus();
        t.gpu_memory_bytes = t.gpu_memory_bytes.saturating_add(n.gpu_memory_bytes);
        for (model, count) in &n.gpus_by_model {
            *t.gpus_by_model.entry(model.clone()).or_default() += count;
        }
        for (profile, count) in &n.mig_by_profile {
            *t.mig_by_profile.entry(profile.clone()).or_default() += count;
        }
        if n.rdma_capable {
            t.rdma_nodes += 1;
        }
        if n.healthy {
            t.healthy_nodes += 1;
            t.healthy_cpus += n.cpus;
            t.healthy_memory_bytes = t.healthy_memory_bytes.saturating_add(n.memory_bytes);
            t.healthy_gpus += n.gpus();
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(gpus: &[(&str, u64)], healthy: bool, rdma: &str) -> serde_json::Value {
        let devices: Vec<_> = gpus
            .iter()
            .map(|(n, m)| json!({"name": n, "memoryBytes": m, "migDevices": []}))
            .collect();
        let reasons = if healthy {
            json!([])
        } else {
            json!([{"code": "GpuEccUncorrectable", "subject": "gpu0", "message": "3 errors"}])
        };
        json!({"inventory": {
            "cpu": {"threads": 64}, "memory": {"totalBytes": 1000},
            "gpus": {"devices": devices},
            "rdma": [{"name": "mlx5_0", "ports": [{"port": 1, "state": rdma}]}],
            "health": {"healthy": healthy, "reasons": reasons},
        }})
    }

    #[test]
    fn totals_count_models_memory_rdma_and_health() {
        let a = node(&[("H100", 80), ("H100", 80)], true, "ACTIVE");
        let b = node(&[("A100", 40)], false, "DOWN");
        let c = json!({"inventory": {"cpu": {"threads": 8}}});
        let pool = PoolInventory::from_statuses([("b", &b), ("a", &a), ("c", &c)]);
        assert_eq!(
            pool.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        let t = &pool.totals;
        assert_eq!((t.nodes, t.healthy_nodes, t.rdma_nodes), (3, 1, 1));
        assert_eq!((t.gpus, t.healthy_gpus, t.gpu_memory_bytes), (3, 2, 200));
        assert_eq!(
            t.gpus_by_model,
            BTreeMap::from([("A100".into(), 1), ("H100".into(), 2)])
        );
        assert_eq!((t.cpus, t.healthy_cpus), (136, 64));
        assert_eq!(pool.nodes[1].reasons, ["GpuEccUncorrectable:gpu0"]);
        // No health section: unknown, so not offered for work.
        assert!(!pool.nodes[2].healthy);
        assert_eq!(pool.nodes[2].reasons, ["HealthNotReported"]);
    }

    #[test]
    fn unreadable_documents_are_unhealthy_nodes() {
        let bad = json!({"inventory": {"cpu": {"threads": "many"}}});
        let none = json!({});
        let pool = PoolInventory::from_statuses([("x", &bad), ("y", &none)]);
        assert_eq!(pool.totals.nodes, 2);
        assert_eq!(pool.totals.healthy_nodes, 0);
        assert_eq!(pool.nodes[0].reasons, ["InventoryUnreadable"]);
        assert_eq!(pool.nodes[1].reasons, ["InventoryNotReported"]);
    }
}
