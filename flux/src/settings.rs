//! What every reconcile shares for Flux objects: the `--flux-objects` setting, the fetcher over
//! the one artifact cache, and which layers each work's sources hold, so that garbage
//! collection never removes a layer in use.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::digest::Digest;
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_base::lock::lock;
use tokio::sync::Semaphore;

use crate::source::{InsecureRegistries, SourceFetcher};

/// What the agent does with Flux objects in works (`--flux-objects`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FluxObjects {
    /// Reconciled by the agent: artifacts cached in `cache`, unpacked within `unpack`, from
    /// plain-HTTP or local registries only as `insecure` allows.
    Native {
        cache: PathBuf,
        unpack: UnpackLimits,
        insecure: InsecureRegistries,
    },
    /// Sent to the API server like any other object, for spokes that run Flux themselves.
    Passthrough,
}

/// What reconciles share for Flux objects.
pub struct FluxSupport {
    /// The fetcher, or why the artifact cache cannot be used (every Flux object then fails
    /// with that message; the agent and other works carry on).
    pub fetcher: Result<SourceFetcher, String>,
    /// Layers each work's sources hold, so garbage collection keeps them.
    in_use: Mutex<HashMap<String, HashSet<Digest>>>,
    /// Set once the engine has reconciled every work of its first sync: before that a work
    /// not yet reconciled could still want a layer nobody has claimed.
    collect: AtomicBool,
    /// Bounds the works whose Flux objects are fetched and built at once. This is apart from
    /// the engine's reconcile permits, and taken before one: sources that answer slowly hold
    /// up other works' fetches at worst, never the reconciles of works without Flux objects.
    pub expansions: Arc<Semaphore>,
}

/// Works whose Flux objects are fetched and built at once.
pub const MAX_CONCURRENT_EXPANSIONS: usize = 16;

impl std::fmt::Debug for FluxSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxSupport").finish_non_exhaustive()
    }
}

impl FluxSupport {
    /// Support for `mode`, or None for passthrough.
    pub fn new(mode: &FluxObjects) -> Option<FluxSupport> {
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
            .map_err(|e| format!("the artifact cache {} cannot be used: {e}", cache.display()));
        if let Err(e) = &fetcher {
            tracing::error!(error = %e, "Flux objects in works will fail until the agent can use its artifact cache");
        }
        Some(FluxSupport {
            fetcher,
            in_use: Mutex::new(HashMap::new()),
            collect: AtomicBool::new(false),
            expansions: Arc::new(Semaphore::new(MAX_CONCURRENT_EXPANSIONS)),
        })
    }

    /// Allows garbage collection from now on (the engine's initial works are reconciled).
    pub fn allow_collection(&self) {
        self.collect.store(true, Ordering::Relaxed);
    }

    /// A work is gone: its layers are no longer held.
    pub fn forget(&self, work: &str) {
        lock(&self.in_use).remove(work);
    }

    /// Records the layers `work` holds; when one was downloaded, removes the cache entries no
    /// work holds.
    pub fn hold(&self, work: &str, layers: HashSet<Digest>, downloaded: bool) {
        let all: HashSet<Digest> = {
            let mut in_use = lock(&self.in_use);
            in_use.insert(work.to_string(), layers);
            if !downloaded || !self.collect.load(Ordering::Relaxed) {
                return;
            }
            in_use.values().flatten().cloned().collect()
        };
        if let Ok(f) = &self.fetcher {
            f.collect_garbage(all);
        }
    }
}
