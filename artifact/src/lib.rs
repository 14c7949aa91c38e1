//! OCI artifacts: Flux-format layers checked against their digests and unpacked safely
//! and kept in a content-addressed cache (pulling and signatures come next).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod digest;
pub mod unpack;
