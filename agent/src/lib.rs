//! spokelet: the spoke-cluster agent library (configuration, telemetry, inventory, work engine).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod hub;
pub mod inventory;
pub mod kube_client;
pub mod lock;
pub mod run;
pub mod shutdown;
pub mod telemetry;
pub mod work;
