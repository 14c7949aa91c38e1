//! The work engine: applies ManifestWorks to the spoke and keeps them applied.
//!
//! Data flow: a [`source::WorkSource`] yields works; the [`engine::WorkEngine`] reconciles each
//! ([`reconcile`]: validate, order, apply, prune, feedback) recording ownership on the spoke in an
//! AppliedManifestWork ([`applied_work`]); the [`drift::DriftWatcher`] reports outside changes to
//! what was applied; status goes to a [`source::StatusSink`] whenever its hash changes. Before
//! a work is applied, the engine's [`expand::Expander`] (if it has one) may turn some of its
//! manifests into others: with the `flux` feature, [`flux::FluxExpander`] fetches and builds
//! Flux's `OCIRepository` and `Kustomization`.
//!
//! A crate of its own so that the engine cannot reach into the hub transports or the command
//! line: it knows works only through [`source::WorkSource`] and [`source::StatusSink`].
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod absent_works;
pub mod applied_work;
pub mod applier;
pub mod claims;
pub(crate) mod context;
pub(crate) mod delete;
pub(crate) mod discovery;
pub(crate) mod drift;
pub mod engine;
pub mod executor;
pub mod expand;
pub(crate) mod failure;
pub mod feedback;
#[cfg(feature = "flux")]
pub mod flux;
pub(crate) mod history;
pub mod jsonpath;
pub mod metrics;
pub mod object;
pub(crate) mod order;
pub mod policy;
pub mod prepare;
pub(crate) mod prune;
pub(crate) mod reconcile;
pub(crate) mod result;
pub mod schedule;
pub(crate) mod startup;
pub(crate) mod status;
pub(crate) mod status_fit;
pub mod validate;

/// Re-exported: the work wire lives in `spokelet-work-api`, shared with the hub transports.
pub use spokelet_work_api::{conditions, manifestwork, source};

pub use manifestwork::{ManifestBundle, ManifestWork, ManifestWorkSpec, ManifestWorkStatus};
pub use source::{Listing, StatusSink, StatusUpdate, WorkEvent, WorkRef, WorkSource};

/// Re-exported so transports and tests can stop an engine without depending on tokio-util.
pub use tokio_util::sync::CancellationToken;
