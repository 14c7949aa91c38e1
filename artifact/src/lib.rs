//! OCI artifacts: Flux-format layers checked against their digests and unpacked safely
//! (pulling, signatures and the cache come next).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod digest;
pub mod unpack;
