//! What one discovery of this node says and how it is written: the report, its NodeInventory
//! document, the NodeInventory kind and the role's field manager. Shared by both targets.

use kube::api::ApiResource;
use serde_json::{Value, json};

use crate::inventory::DiscoveryArgs;

/// The field manager of every write of the node role; owns exactly the labels it sets.
pub const FIELD_MANAGER: &str = "spokelet-node";

/// The NodeInventory kind (`deploy/crds/nodeinventories.spokelet.io.yaml`).
pub fn node_inventory_resource() -> ApiResource {
    ApiResource {
        group: "spokelet.io".into(),
        version: "v1alpha1".into(),
        api_version: "spokelet.io/v1alpha1".into(),
        kind: "NodeInventory".into(),
        plural: "nodeinventories".into(),
    }
}

/// What one discovery found that is worth writing; equal documents are not written again.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The inventory, as `spokelet inventory --output json` prints it.
    pub inventory: Value,
    /// The labels it implies (GFD / NFD compatible keys).
    pub labels: std::collections::BTreeMap<String, String>,
    /// GPUs found (NVML or PCI scan).
    pub gpu_count: usize,
    /// The node's health verdict, for the gauges.
    pub healthy: bool,
    /// Live GPU readings, for the gauges only.
    pub readings: GpuReadings,
}

/// Live GPU readings by GPU index: `(index, temperature °C, power draw mW)`. They change every
/// second, so they never make two reports differ (equality ignores them) and are not written;
/// they are exported as the `spokelet_node_gpu_*` gauges instead, as DCGM exports them.
#[derive(Debug, Clone, Default)]
pub struct GpuReadings(pub Vec<(u32, Option<u32>, Option<u32>)>);

impl PartialEq for GpuReadings {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Report {
    /// Discovers the node (off the async threads: it is blocking file and NVML I/O). None if
    /// discovery panicked, which it does not by design: then nothing is written, since an
    /// empty label set would remove every label from the node.
    pub async fn discover(args: &DiscoveryArgs) -> Option<Report> {
        let opts = args.discover_options();
        let inventory = match tokio::task::spawn_blocking(move || spokelet_hardware::discover(&opts)).await {
            Ok(inventory) => inventory,
            Err(e) => {
                tracing::error!(error = %e, "hardware discovery failed; nothing written this round");
                return None;
            }
        };
        let readings = inventory
            .gpus
            .devices
            .iter()
            .filter_map(|g| {
                let h = g.health.as_ref()?;
                Some((g.index, h.temperature_c, h.power_mw))
            })
            .collect();
        Some(Report {
            labels: spokelet_hardware::labels(&inventory),
            gpu_count: inventory.gpus.devices.len(),
            healthy: inventory.health.healthy,
            readings: GpuReadings(readings),
            inventory: serde_json::to_value(&inventory).unwrap_or(Value::Null),
        })
    }
}

/// The NodeInventory of `node` as written to the cluster and sent to the hub (the cluster's
/// copy adds its owner reference).
pub fn inventory_document(node: &str, report: &Report, observed: &str) -> Value {
    json!({
        "apiVersion": "spokelet.io/v1alpha1", "kind": "NodeInventory",
        "metadata": {"name": node},
        "spec": {"nodeName": node},
        "status": {
            "observedTime": observed,
            "agentVersion": env!("CARGO_PKG_VERSION"),
            "gpuCount": report.gpu_count,
            "labels": report.labels,
            "inventory": report.inventory,
        },
    })
}
