//! spokelet: the spoke-cluster agent library (configuration, telemetry, inventory, work engine).
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod artifact;
pub mod config;
pub mod daemon;
pub mod hub;
pub mod inventory;
pub mod kube_client;
pub(crate) mod leader;
pub mod node;
pub mod pool;
pub mod run;
pub(crate) mod shutdown;
pub mod telemetry;

pub use spokelet_base::duration;
pub(crate) use spokelet_base::{backoff, lock};
/// The engine, its own crate (`work/`), under the path the agent has always used for it.
pub use spokelet_work as work;
