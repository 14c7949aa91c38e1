//! OCI artifacts: Flux-format layers packed reproducibly, checked against their digests,
//! unpacked safely and kept in a content-addressed cache pushed to and pulled from
//! registries, cosign signatures checked before anything is unpacked.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod capped;
pub mod digest;
pub mod pack;
pub mod registry;
pub mod retry;
pub mod signature;
pub mod unpack;
