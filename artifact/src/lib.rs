//! OCI artifacts: Flux-format sources unpacked safely (pulling and verifying come next).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod unpack;
