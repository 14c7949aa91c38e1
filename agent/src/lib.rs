//! spokelet: the spoke-cluster agent library (configuration, telemetry, inventory, work engine).
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
pub mod config;
pub mod connect;
pub mod daemon;
pub(crate) mod leader;
pub mod pool;
pub mod run;

pub use spokelet_base::duration;
pub(crate) use spokelet_base::{backoff, lock};
/// The hub transports, their own crate (`hub/`), under the path the agent has always used.
pub use spokelet_hub as hub;
/// The kube clients and the write gate, their own crate (`kube-client/`), under the path the
/// agent has always used for them.
pub use spokelet_kube_client as kube_client;
/// The node role, its own crate (`node/`); the discovery command with it.
pub use spokelet_node as node;
pub use spokelet_node::inventory;
/// The admin endpoint and logging, shared by every long-running command (`runtime/`).
pub use spokelet_runtime::{admin, telemetry};
/// The engine, its own crate (`work/`), under the path the agent has always used for it.
pub use spokelet_work as work;
