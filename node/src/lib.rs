//! `spokelet node`: keeps this node's hardware labels and its `NodeInventory` current as the
//! hardware changes, writing only when something changed; or, on a machine without Kubernetes
//! (`--hub-config`), reports the same inventory straight to the hub over gRPC.
//!
//! - `kube_target`: the Node's labels and the NodeInventory on the cluster's API server.
//! - `hub_target`: the bare-metal node service's reports to the hub.
//!
//! Discovery runs every `--rediscover-interval` (1 s: a few hundred small sysfs reads and one
//! NVML session, a few milliseconds), so a change reaches the API server within about a
//! second. Each write is a server-side apply with the field manager `spokelet-node`: the
//! Node's labels spokelet set and no longer finds are removed by the API server itself, and
//! labels anyone else set are never touched. An unchanged inventory costs no request at all,
//! except one re-apply every `--resync-interval` that repairs a hand edit.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod command;
mod hub_target;
pub mod inventory;
mod kube_target;
mod report;
mod role;

pub use kube_target::NodeWriter;
pub use report::{FIELD_MANAGER, GpuReadings, Report, inventory_document, node_inventory_resource};
pub use role::{NodeArgs, NodeError, run};
