//! What every long-running spokelet command shares: logging, the admin endpoint, and serving a component with a drained shutdown.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
