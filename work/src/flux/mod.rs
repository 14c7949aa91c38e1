//! The Flux expander: a work's `OCIRepository` and `Kustomization` manifests are not sent to
//! the API server. Their artifacts are fetched and built into plain manifests, appended to the
//! work's own, and the rest of the reconcile applies, records, prunes and watches those like
//! any other (see `expand`, the seam this plugs into), so an object from an artifact is
//! corrected as fast as an inline one. The Flux entries' status gets a `Ready` condition and
//! feedback values.
//!
//! By its steps: [`FluxExpander`]'s expand runs each source through `source_step` and each
//! Kustomization through `kustomization_step` (its build in `build`), with what they share in
//! `step`; its finish, after the applies, judges each entry (`readiness`; the typed conditions
//! and reasons are in `reasons`). What a work's Flux objects fetched and built is kept in its
//! `FluxMemory` (`memory`) between reconciles: a
//! reconcile caused by drift costs no registry request and no build, and a source is looked at
//! again only when its `interval` has passed.
//!
//! Never losing a workload: a failed pull or build keeps the last good build applied; with no
//! good build at all (after a restart, a suspended Kustomization, an unready dependency)
//! nothing of the work is pruned in that reconcile.

mod build;
mod kustomization_step;
mod memory;
mod readiness;
mod reasons;
mod source_step;
mod step;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use spokelet_artifact::registry::Pulled;
use spokelet_flux::objects::FluxKind;
/// Re-exported: the agent's setting lives with the Flux crate.
pub use spokelet_flux::settings::FluxObjects;
pub use spokelet_flux::source::InsecureRegistries;

pub use self::build::{NAME_LABEL, NAMESPACE_LABEL};
use self::kustomization_step::KustomizationStep;
use self::memory::FluxMemory;
use self::readiness::Native;
use self::source_step::source_step;
use self::step::Step;
use self::support::FluxSupport;
use crate::expand::{Detail, ExpandInput, Expander, ExpanderMemory, Expansion};
use crate::manifestwork::ManifestWork;
use crate::result::ManifestResult;

/// Flux's `OCIRepository` and `Kustomization` as the engine's [`Expander`].
#[derive(Debug)]
pub struct FluxExpander {
    support: FluxSupport,
}

impl FluxExpander {
    /// The expander for `mode`; None for passthrough (Flux objects then go to the API server
    /// like any other).
    pub fn for_setting(mode: &FluxObjects) -> Option<Arc<dyn Expander>> {
        let support = FluxSupport::new(mode)?;
        Some(Arc::new(FluxExpander { support }))
    }
}

impl Expander for FluxExpander {
    fn expand<'a>(
        &'a self,
        input: ExpandInput<'a>,
        memory: &'a mut ExpanderMemory,
    ) -> BoxFuture<'a, Option<Expansion>> {
        Box::pin(async move {
            let (repos, kustomizations) = flux_manifests(input.work);
            if repos.is_empty() && kustomizations.is_empty() {
                // Nothing to expand: the memory (and its holds) go, and a work that never had
                // Flux objects costs no allocation here.
                memory.clear();
                return None;
            }
            let found = FluxManifests {
                repos,
                kustomizations,
            };
            Some(expand(&self.support, &input, found, memory.get::<FluxMemory>()).await)
        })
    }

    fn finish(
        &self,
        x: &Expansion,
        results: &mut [ManifestResult],
        memory: &mut ExpanderMemory,
        generation: i64,
    ) -> bool {
        let Some(natives) = x.detail.get::<Natives>() else {
            return false;
        };
        readiness::finish(natives, results, memory.get::<FluxMemory>(), generation)
    }

    fn engine_ready(&self) {
        self.support.allow_collection();
    }
}

/// The work's Flux entries in this reconcile, by ordinal: the expansion's [`Detail`].
type Natives = BTreeMap<usize, Native>;

/// Fetches and builds the work's Flux objects (`found`, at least one).
///
/// Every Secret and ConfigMap the Flux objects name is read as `input.reader`, the work's
/// identity, and only after the write policy allowed the Flux object and what it reads.
async fn expand(
    support: &FluxSupport,
    input: &ExpandInput<'_>,
    found: FluxManifests,
    memory: &mut FluxMemory,
) -> Expansion {
    let work = input.work;
    let FluxManifests {
        repos,
        kustomizations,
    } = found;
    let _expanding = support.expansions.clone().acquire_owned().await.ok();
    let step = Step { support, input };
    let mut x = Expansion::default();
    let mut natives = Natives::new();
    let mut sources: HashMap<String, Option<Pulled>> = HashMap::new();
    let mut downloaded = false;
    for (i, v) in repos {
        let (native, pulled, new) = source_step(&step, &v, memory, &mut x).await;
        downloaded |= new;
        sources.insert(native.id.clone(), pulled);
        natives.insert(i, native);
    }
    let held = memory
        .sources
        .values()
        .filter_map(|s| s.pulled.as_ref())
        .map(|p| p.layer.clone())
        .collect();
    support.hold(&mut memory.hold, held, downloaded);
    let first_built = work.spec.workload.manifests.len();
    let ks_step = KustomizationStep {
        step: &step,
        sources: &sources,
        first_built,
        limit: input.limits.max_manifests.saturating_sub(first_built),
    };
    for (i, v) in kustomizations {
        let native = ks_step.run(&v, memory, &mut x).await;
        natives.insert(i, native);
    }
    // Forget what the work no longer has.
    let ids: HashSet<&String> = natives.values().map(|n| &n.id).collect();
    memory.sources.retain(|k, _| ids.contains(k));
    memory.builds.retain(|k, _| ids.contains(k));
    x.handled = natives.keys().copied().collect();
    x.detail = Detail::new(natives);
    x
}

/// The work's OCIRepository and Kustomization manifests, by ordinal.
type Ordinals = Vec<(usize, Value)>;

/// The work's Flux manifests, found once per reconcile.
struct FluxManifests {
    repos: Ordinals,
    kustomizations: Ordinals,
}

fn flux_manifests(work: &ManifestWork) -> (Ordinals, Ordinals) {
    let mut repos = Vec::new();
    let mut kustomizations = Vec::new();
    for (i, m) in work.spec.workload.manifests.iter().enumerate() {
        let Ok(v) = m.value() else { continue };
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        match FluxKind::of(&text("apiVersion"), &text("kind")) {
            Some(FluxKind::OciRepository) => repos.push((i, v)),
            Some(FluxKind::Kustomization) => kustomizations.push((i, v)),
            None => {}
        }
    }
    (repos, kustomizations)
}
