//! The Compute Pool's inventory: each NodeInventory summarised, and the totals the platform places work by.
//!
//! Only the fields the summary needs are read from each document, each with a default, so a
//! node agent of another version (a field more or less) still counts. A document that cannot
//! be read at all counts as an unhealthy node with the reason `InventoryUnreadable`: a node the
//! pool cannot vouch for must not be offered for work.
//!
//! A document is written by a node agent, so it is not trusted further than its Node: its CPUs,
//! memory and GPUs are cut to what the Node's kubelet reports as capacity (where it reports
//! one), and a node claiming more is unhealthy with `InventoryExceedsNodeCapacity`. Every sum
//! saturates instead of wrapping.

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
        self.gpus_by_model.values().fold(0, |t, n| t.saturating_add(*n))
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

/// What a Node's kubelet reports as its capacity (`status.capacity`); what a NodeInventory may
/// claim at most. `None` where the kubelet reports nothing (no GPU device plugin, say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCapacity {
    /// `cpu`, whole hardware threads.
    pub cpus: Option<u64>,
    /// `memory`, bytes.
    pub memory_bytes: Option<u64>,
    /// `nvidia.com/gpu`.
    pub gpus: Option<u64>,
}

impl NodeCapacity {
    /// Reads a Node's `status.capacity` map (Kubernetes quantities).
    pub fn from_capacity<'a>(capacity: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut c = NodeCapacity::default();
        for (key, value) in capacity {
            let quantity = parse_quantity(value);
            match key {
                "cpu" => c.cpus = quantity,
                "memory" => c.memory_bytes = quantity,
                "nvidia.com/gpu" => c.gpus = quantity,
                _ => {}
            }
        }
        c
    }
}

/// A Kubernetes quantity (`64`, `63500m`, `263824Mi`, `1G`) as a whole number, rounded down;
/// `None` for anything else (then nothing is clamped by it). Written here, not taken from a
/// crate: k8s-openapi keeps quantities as strings, and only these suffixes occur in capacity.
fn parse_quantity(text: &str) -> Option<u64> {
    const SUFFIXES: &[(&str, u128, u128)] = &[
        ("Ki", 1 << 10, 1),
        ("Mi", 1 << 20, 1),
        ("Gi", 1 << 30, 1),
        ("Ti", 1 << 40, 1),
        ("Pi", 1 << 50, 1),
        ("Ei", 1 << 60, 1),
        ("m", 1, 1000),
        ("k", 1_000, 1),
        ("M", 1_000_000, 1),
        ("G", 1_000_000_000, 1),
        ("T", 1_000_000_000_000, 1),
        ("P", 1_000_000_000_000_000, 1),
        ("E", 1_000_000_000_000_000_000, 1),
    ];
    let (digits, mul, div) = SUFFIXES
        .iter()
        .find_map(|(suffix, mul, div)| text.strip_suffix(suffix).map(|d| (d, *mul, *div)))
        .unwrap_or((text, 1, 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u128 = digits.parse().ok()?;
    u64::try_from(n.checked_mul(mul)? / div).ok()
}

impl PoolInventory {
    /// The pool of these `(node name, NodeInventory status)` pairs, in any order, with no Node
    /// capacity to hold them to.
    pub fn from_statuses<'a>(statuses: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>) -> Self {
        Self::from_nodes(statuses.into_iter().map(|(name, status)| (name, status, None)))
    }

    /// The pool of these `(node name, NodeInventory status, the Node's capacity)`, in any order.
    pub fn from_nodes<'a>(
        nodes: impl IntoIterator<Item = (&'a str, &'a serde_json::Value, Option<&'a NodeCapacity>)>,
    ) -> Self {
        let mut nodes: Vec<NodeSummary> = nodes
            .into_iter()
            .map(|(name, status, capacity)| {
                let mut node = summarise(name, status);
                if let Some(capacity) = capacity {
                    clamp(&mut node, capacity);
                }
                node
            })
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
        bump(node.gpus_by_model.entry(model.to_string()).or_default(), 1);
        node.gpu_memory_bytes = node
            .gpu_memory_bytes
            .saturating_add(gpu.memory_bytes.unwrap_or(0));
        for mig in &gpu.mig_devices {
            if let Some(p) = &mig.profile {
                bump(node.mig_by_profile.entry(p.clone()).or_default(), 1);
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

/// Adds without wrapping: a document may say anything.
fn bump(total: &mut u64, n: u64) {
    *total = total.saturating_add(n);
}

/// Holds a node's figures to its Node's capacity; a node that claimed more is unhealthy.
fn clamp(node: &mut NodeSummary, capacity: &NodeCapacity) {
    let mut over = Vec::new();
    if let Some(cpus) = capacity.cpus.filter(|c| node.cpus > *c) {
        node.cpus = cpus;
        over.push("cpu");
    }
    if let Some(bytes) = capacity.memory_bytes.filter(|m| node.memory_bytes > *m) {
        node.memory_bytes = bytes;
        over.push("memory");
    }
    let gpus = node.gpus();
    if let Some(allowed) = capacity.gpus.filter(|g| gpus > *g) {
        // Kept model by model in name order until the Node's count is reached.
        let mut left = allowed;
        for count in node.gpus_by_model.values_mut() {
            *count = (*count).min(left);
            left -= *count;
        }
        node.gpus_by_model.retain(|_, c| *c > 0);
        // The framebuffer shrinks with the GPUs kept.
        node.gpu_memory_bytes =
            u64::try_from(u128::from(node.gpu_memory_bytes) * u128::from(allowed) / u128::from(gpus))
                .unwrap_or(u64::MAX);
        over.push("nvidia.com/gpu");
    }
    if !over.is_empty() {
        node.healthy = false;
        node.reasons
            .push(format!("InventoryExceedsNodeCapacity:{}", over.join(",")));
    }
}

/// Sums the nodes.
fn total(nodes: &[NodeSummary]) -> PoolTotals {
    let mut t = PoolTotals::default();
    for n in nodes {
        bump(&mut t.nodes, 1);
        bump(&mut t.cpus, n.cpus);
        bump(&mut t.memory_bytes, n.memory_bytes);
        bump(&mut t.gpus, n.gpus());
        bump(&mut t.gpu_memory_bytes, n.gpu_memory_bytes);
        for (model, count) in &n.gpus_by_model {
            bump(t.gpus_by_model.entry(model.clone()).or_default(), *count);
        }
        for (profile, count) in &n.mig_by_profile {
            bump(t.mig_by_profile.entry(profile.clone()).or_default(), *count);
        }
        if n.rdma_capable {
            bump(&mut t.rdma_nodes, 1);
        }
        if n.healthy {
            bump(&mut t.healthy_nodes, 1);
            bump(&mut t.healthy_cpus, n.cpus);
            bump(&mut t.healthy_memory_bytes, n.memory_bytes);
            bump(&mut t.healthy_gpus, n.gpus());
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
    fn sums_saturate_instead_of_wrapping() {
        let huge = json!({"inventory": {"cpu": {"threads": u64::MAX}, "memory": {"totalBytes": u64::MAX},
            "gpus": {"devices": [{"name": "H100", "memoryBytes": u64::MAX}, {"name": "H100", "memoryBytes": u64::MAX}]},
            "health": {"healthy": true, "reasons": []}}});
        let pool = PoolInventory::from_statuses([("a", &huge), ("b", &huge)]);
        let t = &pool.totals;
        assert_eq!(
            (t.cpus, t.memory_bytes, t.gpu_memory_bytes),
            (u64::MAX, u64::MAX, u64::MAX)
        );
        assert_eq!((t.healthy_cpus, t.gpus), (u64::MAX, 4));
    }

    #[test]
    fn a_node_claiming_more_than_its_capacity_is_cut_to_it_and_unhealthy() {
        let doc = node(&[("H100", 80), ("H100", 80), ("A100", 40)], true, "ACTIVE");
        let cap = NodeCapacity::from_capacity([
            ("cpu", "32"),
            ("memory", "1Ki"),
            ("nvidia.com/gpu", "2"),
            ("pods", "110"),
        ]);
        assert_eq!(
            cap,
            NodeCapacity {
                cpus: Some(32),
                memory_bytes: Some(1024),
                gpus: Some(2)
            }
        );
        let pool = PoolInventory::from_nodes([("a", &doc, Some(&cap))]);
        let n = &pool.nodes[0];
        assert_eq!((n.cpus, n.memory_bytes, n.gpus()), (32, 1000, 2));
        assert_eq!(
            n.gpus_by_model,
            BTreeMap::from([("A100".into(), 1), ("H100".into(), 1)])
        );
        assert_eq!(n.gpu_memory_bytes, 133);
        assert!(!n.healthy);
        assert_eq!(n.reasons, ["InventoryExceedsNodeCapacity:cpu,nvidia.com/gpu"]);
        assert_eq!(pool.totals.healthy_gpus, 0);
        // Within capacity, or a capacity the kubelet does not report: untouched.
        let roomy = NodeCapacity::from_capacity([("cpu", "64"), ("memory", "64Gi")]);
        let pool = PoolInventory::from_nodes([("a", &doc, Some(&roomy))]);
        assert!(pool.nodes[0].healthy && pool.nodes[0].gpus() == 3);
    }

    #[test]
    fn quantities_parse_as_capacity_writes_them() {
        for (text, want) in [
            ("64", Some(64)),
            ("63500m", Some(63)),
            ("263824Mi", Some(263_824 << 20)),
            ("1G", Some(1_000_000_000)),
            ("16Ei", None),
            ("", None),
            ("1.5Gi", None),
            ("-1", None),
            ("Mi", None),
        ] {
            assert_eq!(parse_quantity(text), want, "{text}");
        }
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
