//! What every spokelet crate shares: the one retry back-off and the one lock policy.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod lock;
