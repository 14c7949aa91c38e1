//! The work wire between a hub transport and the engine: OCM's ManifestWork types, conditions and their hash, and the source and sink traits.
//!
//! A crate of its own so that a hub transport (and the node binary, which links one) knows
//! works without linking the engine that applies them: the transports depend on this crate,
//! the engine (`spokelet-work`) on this crate too, and neither on the other.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod conditions;
pub mod manifestwork;
pub mod names;
pub mod source;
