//! The node role's writes to its cluster: the Node's labels and the NodeInventory, server-side applied.

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;

use crate::report::{FIELD_MANAGER, Report, inventory_document, node_inventory_resource};

/// Writes one node's labels and NodeInventory.
#[derive(Clone)]
pub struct NodeWriter {
    /// The Node whose labels are written.
    nodes: Api<k8s_openapi::api::core::v1::Node>,
    /// NodeInventories (cluster-scoped, named after the node).
    inventories: Api<DynamicObject>,
    /// This node's name.
    node: String,
}

impl std::fmt::Debug for NodeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWriter")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeWriter {
    pub fn new(client: Client, node: &str) -> NodeWriter {
        NodeWriter {
            nodes: Api::all(client.clone()),
            inventories: Api::all_with(client, &node_inventory_resource()),
            node: node.to_string(),
        }
    }

    /// Applies the labels to the Node, then the NodeInventory (owned by the Node, so it goes
    /// when the Node is deleted).
    pub async fn write(&self, report: &Report, observed: &str) -> Result<(), kube::Error> {
        // force: these keys are spokelet's to set, even if another tool set one of them once.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": report.labels},
        });
        let applied = self
            .nodes
            .patch(&self.node, &params, &Patch::Apply(&node))
            .await?;
        let uid = applied.metadata.uid.unwrap_or_default();
        let mut inventory = inventory_document(&self.node, report, observed);
        inventory["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}]);
        self.inventories
            .patch(&self.node, &params, &Patch::Apply(&inventory))
            .await?;
        Ok(())
    }
}
