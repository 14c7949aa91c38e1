//! What every work's Flux expansion shares: the fetcher over the one artifact cache, the bound on
//! expansions at once, and the layers each work's sources hold, so that garbage collection never
//! removes a layer in use.
//!
//! A work's hold is a [`LayerHold`] kept in its Flux memory, in the work's slot: dropped with the
//! slot (the work deleted) or when the work has no Flux objects any more, it lets go of its
//! layers by itself, so nothing is keyed by work name or cleaned up by hand.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use spokelet_artifact::cache::{ArtifactCache, CacheError};
use spokelet_artifact::digest::Digest;
use spokelet_base::lock::lock;
use spokelet_flux::settings::FluxObjects;
use spokelet_flux::source::SourceFetcher;
use tokio::sync::Semaphore;

/// Works whose Flux objects are fetched and built at once.
pub(crate) const MAX_CONCURRENT_EXPANSIONS: usize = 16;

/// The artifact cache cannot be used: every Flux object fails with this, the agent and other
/// works carry on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the artifact cache {} cannot be used: {source}", dir.display())]
pub(crate) struct CacheUnavailable {
    dir: PathBuf,
    source: Arc<CacheError>,
}

/// What Flux expansions share.
pub(crate) struct FluxSupport {
    /// The fetcher, or why the artifact cache cannot be used.
    pub(crate) fetcher: Result<SourceFetcher, CacheUnavailable>,
    /// Layers held by each live [`LayerHold`].
    pins: Arc<LayerPins>,
    /// Set once the engine has reconciled every work of its first sync: before that a work
    /// not yet reconciled could still want a layer nobody has claimed.
    collect: AtomicBool,
    /// Bounds the works whose Flux objects are fetched and built at once. This is apart from
    /// the engine's reconcile permits, and taken before one: sources that answer slowly hold
    /// up other works' fetches at worst, never the reconciles of works without Flux objects.
    pub(crate) expansions: Arc<Semaphore>,
}

impl std::fmt::Debug for FluxSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxSupport").finish_non_exhaustive()
    }
}

impl FluxSupport {
    /// Support for `mode`, or None for passthrough.
    pub(crate) fn new(mode: &FluxObjects) -> Option<FluxSupport> {
        let FluxObjects::Native {
            cache,
            unpack,
            insecure,
        } = mode
        else {
            return None;
        };
        let fetcher = ArtifactCache::open(cache)
            .map(|c| SourceFetcher::new(c, *unpack, insecure.clone()))
            .map_err(|e| CacheUnavailable {
                dir: cache.clone(),
                source: Arc::new(e),
            });
        if let Err(e) = &fetcher {
            tracing::error!(error = %e, "Flux objects in works will fail until the agent can use its artifact cache");
        }
        Some(FluxSupport {
            fetcher,
            pins: Arc::default(),
            collect: AtomicBool::new(false),
            expansions: Arc::new(Semaphore::new(MAX_CONCURRENT_EXPANSIONS)),
        })
    }

    /// Allows garbage collection from now on (the engine's initial works are reconciled).
    pub(crate) fn allow_collection(&self) {
        self.collect.store(true, Ordering::Relaxed);
    }

    /// Sets what `hold` keeps (a new hold the first time); when a layer was downloaded,
    /// removes the cache entries nothing holds.
    pub(crate) fn hold(&self, hold: &mut Option<LayerHold>, layers: HashSet<Digest>, downloaded: bool) {
        let id = match hold {
            Some(h) => h.id,
            None => hold.insert(LayerHold::new(&self.pins)).id,
        };
        let all: HashSet<Digest> = {
            let mut held = lock(&self.pins.held);
            held.insert(id, layers);
            if !downloaded || !self.collect.load(Ordering::Relaxed) {
                return;
            }
            held.values().flatten().cloned().collect()
        };
        if let Ok(f) = &self.fetcher {
            f.collect_garbage(all);
        }
    }
}

/// The layers held, by hold. Locked only for a map update, never across an await.
#[derive(Debug, Default)]
struct LayerPins {
    held: Mutex<HashMap<u64, HashSet<Digest>>>,
    /// The next hold's id: ids are never reused, so a work created again under the same name
    /// never shares its predecessor's hold.
    next: AtomicU64,
}

/// One work's hold on the layers its sources use; dropping it lets go of them.
#[derive(Debug)]
pub(crate) struct LayerHold {
    pins: Arc<LayerPins>,
    id: u64,
}

impl LayerHold {
    fn new(pins: &Arc<LayerPins>) -> LayerHold {
        LayerHold {
            pins: pins.clone(),
            id: pins.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Drop for LayerHold {
    fn drop(&mut self) {
        lock(&self.pins.held).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[tokio::test]
    async fn a_hold_keeps_its_layers_until_dropped() {
        let cache = tempfile::tempdir().unwrap();
        let support = FluxSupport::new(&FluxObjects::Native {
            cache: cache.path().to_path_buf(),
            unpack: Default::default(),
            insecure: Default::default(),
        })
        .unwrap();
        let mut a = None;
        let mut b = None;
        support.hold(&mut a, HashSet::from([digest(1)]), false);
        support.hold(&mut b, HashSet::from([digest(2)]), false);
        assert_eq!(lock(&support.pins.held).len(), 2);
        // Holding again replaces what the same hold kept.
        support.hold(&mut a, HashSet::from([digest(3)]), false);
        let held: HashSet<Digest> = lock(&support.pins.held).values().flatten().cloned().collect();
        assert_eq!(held, HashSet::from([digest(2), digest(3)]));
        drop(a);
        let held: HashSet<Digest> = lock(&support.pins.held).values().flatten().cloned().collect();
        assert_eq!(held, HashSet::from([digest(2)]));
        drop(b);
        assert!(lock(&support.pins.held).is_empty());
    }

    #[test]
    fn passthrough_has_no_support() {
        assert!(FluxSupport::new(&FluxObjects::Passthrough).is_none());
    }
}
