//! What every spokelet crate shares: the one retry back-off, the one lock policy, the duration
//! notation and the wait for an optional deadline.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod deadline;
pub mod duration;
pub mod lock;
