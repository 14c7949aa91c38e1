//! What a work's Flux objects fetched and built, kept in the work's slot between its
//! reconciles: each source's last good artifact and each Kustomization's last good build, and
//! the hold on the cache layers they use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use spokelet_artifact::registry::Pulled;
use spokelet_flux::objects::OciRepositorySpec;
use tokio::time::Instant;

use super::reasons::Failure;
use super::support::LayerHold;
use crate::manifestwork::Manifest;

/// What a work's Flux objects fetched and built, kept between its reconciles.
#[derive(Debug, Default)]
pub(crate) struct FluxMemory {
    /// By `namespace/name` of the OCIRepository.
    pub(super) sources: HashMap<String, SourceMemory>,
    /// By `namespace/name` of the Kustomization.
    pub(super) builds: HashMap<String, BuildMemory>,
    /// The cache layers its sources use, kept from garbage collection while it lives.
    pub(super) hold: Option<LayerHold>,
}

impl FluxMemory {
    /// Records whether Kustomization `id`'s build is ready; a ready build's revision is the
    /// applied one.
    pub(super) fn built(&mut self, id: &str, ready: bool) {
        if let Some(b) = self.builds.get_mut(id) {
            b.ready = ready;
            if ready {
                b.last_applied = Some(b.revision.clone());
            }
        }
    }

    /// Kustomization `id`'s applied revision (if any) and the one last attempted.
    pub(super) fn revisions(&self, id: &str) -> Option<(Option<String>, String)> {
        self.builds
            .get(id)
            .map(|b| (b.last_applied.clone(), b.revision.clone()))
    }
}

/// How soon a failed source is looked at again (or its interval, when shorter): a registry
/// that was down is retried without waiting an interval of often many minutes.
pub(super) const FAILED_SOURCE_RECHECK: Duration = Duration::from_secs(10);

/// What a source fetched, kept between the work's reconciles.
#[derive(Debug)]
pub(super) struct SourceMemory {
    /// The spec last fetched for: a changed spec is fetched again at once.
    pub(super) spec: OciRepositorySpec,
    /// The last good artifact (kept through failures).
    pub(super) pulled: Option<Pulled>,
    pub(super) checked: Instant,
    /// Why the last fetch failed.
    pub(super) error: Option<Failure>,
    /// The last fetch failed its signature verification.
    pub(super) unverified: bool,
}

impl SourceMemory {
    /// How long after its last look the source is looked at again: its interval, or sooner
    /// after a failure.
    pub(super) fn wait(&self) -> Duration {
        if self.error.is_some() {
            self.spec.interval.min(FAILED_SOURCE_RECHECK)
        } else {
            self.spec.interval
        }
    }
}

/// A Kustomization's last build, kept between the work's reconciles.
#[derive(Debug)]
pub(super) struct BuildMemory {
    /// Hash of what the build came from (revision, spec, variables).
    pub(super) key: String,
    /// Hash of the revision and spec alone: while it holds and the interval lasts, the build
    /// is reused without reading the variables again.
    pub(super) source_key: String,
    /// The last good build.
    pub(super) manifests: Arc<Vec<Manifest>>,
    pub(super) revision: String,
    pub(super) built: Instant,
    /// The revision whose objects were all applied (and healthy, with `wait`).
    pub(super) last_applied: Option<String>,
    pub(super) ready: bool,
}

impl BuildMemory {
    /// The same objects again, built at `built`, not yet applied.
    pub(super) fn again(&self, built: Instant) -> BuildMemory {
        BuildMemory {
            key: self.key.clone(),
            source_key: self.source_key.clone(),
            manifests: self.manifests.clone(),
            revision: self.revision.clone(),
            built,
            last_applied: None,
            ready: false,
        }
    }
}
