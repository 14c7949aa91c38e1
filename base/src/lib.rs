//! What every spokelet crate shares: the one retry back-off, the one lock policy and the
//! duration notation.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod duration;
pub mod lock;
