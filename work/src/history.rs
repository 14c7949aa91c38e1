//! What the engine remembers about a work between two of its reconciles.
//!
//! It lives in the work's slot in the engine loop and is moved into the reconcile task and back
//! with its report, as the previous status is: at most one task per work runs, so nothing here
//! is shared or locked, and it goes away with the slot when the work is deleted.

use std::collections::HashMap;

use super::manifestwork::AppliedManifestWork;
use super::schedule::FlapGuard;

#[derive(Debug, Clone)]
pub(crate) struct ManifestHistory {
    /// Its drift corrections and the hold when they come too often.
    pub flap: FlapGuard,
    /// Drift corrections so far, reported as the feedback value `DriftCorrections`.
    pub drift_corrections: i64,
    /// Content hash last applied successfully. A later write of the same content can only be
    /// undoing an outside change, which is how a write is known to be a drift correction.
    pub applied_content: Option<String>,
}

/// Everything a reconcile takes from the work's slot and hands back.
#[derive(Debug, Default)]
pub(crate) struct WorkMemory {
    /// By manifest ordinal. Keyed by ordinal, not object, as status is: a manifest that changes
    /// its object keeps its history, the way OCM reports it.
    pub manifests: HashMap<usize, ManifestHistory>,
    /// Last copy of the work's AppliedManifestWork this agent wrote or read (no
    /// `managedFields`), so an unchanged reconcile costs no request. None before the first read
    /// and after a failed write: the spoke then has the truth and is read again.
    pub record: Option<AppliedManifestWork>,
    /// What the engine's expander remembers about it (for Flux: what its sources fetched and
    /// its Kustomizations built).
    pub expansion: super::expand::ExpanderMemory,
}

impl WorkMemory {
    /// The history of manifest `ordinal`, started from `template` the first time.
    pub(crate) fn manifest(&mut self, ordinal: usize, template: &FlapGuard) -> &mut ManifestHistory {
        self.manifests.entry(ordinal).or_insert_with(|| ManifestHistory {
            flap: template.clone(),
            drift_corrections: 0,
            applied_content: None,
        })
    }

    /// Drift corrections of manifest `ordinal` so far (0 before it has a history).
    pub(crate) fn drift_corrections(&self, ordinal: usize) -> i64 {
        self.manifests.get(&ordinal).map_or(0, |h| h.drift_corrections)
    }
}
