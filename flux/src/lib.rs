//! Flux's `OCIRepository` and `Kustomization` handled natively: the spec types and the fields
//! refused by name ([`objects`]), artifacts fetched with their Secrets ([`source`]), a
//! directory assembled into plain objects ([`build`], with [`transform`] and [`patch`]),
//! variables substituted ([`substitute`]) and the health of what was applied ([`health`]).
//!
//! It knows nothing of works: the engine's `flux` step turns a work's Flux objects into
//! manifests with these pieces and applies them like any other.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod build;
pub mod health;
pub mod objects;
pub mod patch;
pub mod settings;
pub mod source;
pub mod substitute;
pub mod transform;
