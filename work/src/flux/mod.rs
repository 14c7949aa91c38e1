//! The Flux step of a reconcile: a work's `OCIRepository` and `Kustomization` manifests are
//! not sent to the API server. Their artifacts are fetched and built into plain manifests,
//! appended to the work's own, and the rest of the reconcile applies, records, prunes and
//! watches those like any other, so an object from an artifact is corrected as fast as an
//! inline one. The Flux entries' status gets a `Ready` condition and feedback values.
//!
//! By its steps: [`expand`] runs before the reconcile's other steps, each source through
//! `source_step` and each Kustomization through `kustomization_step` (its build in `build`);
//! [`finish`] after the applies (`readiness`: typed conditions, reasons as an enum). What a
//! work's Flux objects fetched and built is kept in its [`FluxMemory`] between reconciles: a
//! reconcile caused by drift costs no registry request and no build, and a source is looked at
//! again only when its `interval` has passed.
//!
//! Never losing a workload: a failed pull or build keeps the last good build applied; with no
//! good build at all (after a restart, a suspended Kustomization, an unready dependency)
//! nothing of the work is pruned in that reconcile.

mod build;
mod kustomization_step;
mod readiness;
mod source_step;

use std::collections::{BTreeMap, HashMap, HashSet};

use kube::Client;
use serde_json::Value;
use spokelet_artifact::registry::Pulled;
use spokelet_flux::objects::{FluxKind, FluxObject, ReadRef};
/// Re-exported: the setting and the shared state live with the Flux crate.
pub use spokelet_flux::shared::{FluxObjects, FluxSupport};
pub use spokelet_flux::source::InsecureRegistries;
use tokio::time::Instant;

use self::kustomization_step::{BuildMemory, KustomizationStep};
use self::readiness::Native;
use self::source_step::{SourceMemory, source_step};
use super::context::ReconcileContext;
use super::manifestwork::{Manifest, ManifestWork};
use super::policy::Target;
use super::status::ManifestResult;

/// The labels Flux's kustomize-controller puts on what it applies; kept so tools that look
/// for them (and `kubectl get -l`) find objects from artifacts the same way.
pub const NAME_LABEL: &str = "kustomize.toolkit.fluxcd.io/name";
pub const NAMESPACE_LABEL: &str = "kustomize.toolkit.fluxcd.io/namespace";

/// What a work's Flux objects fetched and built, kept between its reconciles.
#[derive(Debug, Default)]
pub struct FluxMemory {
    /// By `namespace/name` of the OCIRepository.
    sources: HashMap<String, SourceMemory>,
    /// By `namespace/name` of the Kustomization.
    builds: HashMap<String, BuildMemory>,
}

impl FluxMemory {
    /// Records whether Kustomization `id`'s build is ready; a ready build's revision is the
    /// applied one.
    fn built(&mut self, id: &str, ready: bool) {
        if let Some(b) = self.builds.get_mut(id) {
            b.ready = ready;
            if ready {
                b.last_applied = Some(b.revision.clone());
            }
        }
    }

    /// Kustomization `id`'s applied revision (if any) and the one last attempted.
    fn revisions(&self, id: &str) -> Option<(Option<String>, String)> {
        self.builds
            .get(id)
            .map(|b| (b.last_applied.clone(), b.revision.clone()))
    }
}

/// The work's Flux objects in this reconcile.
#[derive(Debug, Default)]
pub struct Expansion {
    /// Manifests built from artifacts, appended after the work's own.
    pub built: Vec<Manifest>,
    /// By ordinal of the work's Flux manifests.
    natives: BTreeMap<usize, Native>,
    /// Nothing may be pruned in this reconcile: a Kustomization has no build to say what it
    /// wants.
    pub keep_all: bool,
    /// When a source or build is due to be looked at again.
    pub recheck_at: Option<Instant>,
    /// Kustomizations (name, namespace) with `prune: false`: what leaves their build is
    /// released, not deleted.
    pub no_prune: HashSet<(String, String)>,
    /// Ordinals (in the expanded work) of objects built by Kustomizations with `force: true`:
    /// an apply refused for an immutable field deletes and recreates them.
    pub recreate: HashSet<usize>,
}

impl Expansion {
    /// Ordinals of the work's manifests that are reconciled here, not sent to the API server.
    pub fn is_native(&self, ordinal: usize) -> bool {
        self.natives.contains_key(&ordinal)
    }

    /// `work` with the built manifests appended (None when nothing was built).
    pub fn expanded(&self, work: &ManifestWork) -> Option<ManifestWork> {
        if self.built.is_empty() {
            return None;
        }
        let mut w = work.clone();
        w.spec.workload.manifests.extend(self.built.iter().cloned());
        Some(w)
    }

    fn due(&mut self, at: Instant) {
        self.recheck_at = Some(self.recheck_at.map_or(at, |r| r.min(at)));
    }
}

/// Fetches and builds the work's Flux objects. None when it has none (or they pass through).
///
/// Every Secret and ConfigMap the Flux objects name is read as `reader`, the work's identity
/// (its executor when it names one, else the agent), and only after the write policy allowed
/// the Flux object and what it reads.
pub async fn expand(
    ctx: &ReconcileContext,
    work: &ManifestWork,
    reader: &Client,
    memory: &mut FluxMemory,
) -> Option<Expansion> {
    let support = ctx.flux.as_ref()?;
    let (repos, kustomizations) = flux_manifests(work);
    if repos.is_empty() && kustomizations.is_empty() {
        *memory = FluxMemory::default();
        return None;
    }
    let _expanding = support.expansions.clone().acquire_owned().await.ok();
    let name = work.metadata.name.clone().unwrap_or_default();
    let mut x = Expansion::default();
    let mut sources: HashMap<String, Option<Pulled>> = HashMap::new();
    let mut downloaded = false;
    for (i, v) in repos {
        let (native, pulled, new) = source_step(ctx, support, reader, &v, memory, &mut x).await;
        downloaded |= new;
        sources.insert(native.id.clone(), pulled);
        x.natives.insert(i, native);
    }
    let held = memory
        .sources
        .values()
        .filter_map(|s| s.pulled.as_ref())
        .map(|p| p.layer.clone())
        .collect();
    support.hold(&name, held, downloaded);
    let first_built = work.spec.workload.manifests.len();
    let step = KustomizationStep {
        ctx,
        reader,
        sources: &sources,
        first_built,
        limit: ctx.cfg.limits.max_manifests.saturating_sub(first_built),
    };
    for (i, v) in kustomizations {
        let native = step.run(&v, memory, &mut x).await;
        x.natives.insert(i, native);
    }
    // Forget what the work no longer has.
    let ids: HashSet<&String> = x.natives.values().map(|n| &n.id).collect();
    memory.sources.retain(|k, _| ids.contains(k));
    memory.builds.retain(|k, _| ids.contains(k));
    Some(x)
}

/// The work's OCIRepository and Kustomization manifests, by ordinal.
type Ordinals = Vec<(usize, Value)>;

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

/// After the applies: each Flux entry's result (see `readiness`); whether a Kustomization is
/// still progressing (to look again soon).
pub fn finish(
    x: &Expansion,
    results: &mut [ManifestResult],
    memory: &mut FluxMemory,
    generation: i64,
) -> bool {
    readiness::finish(&x.natives, results, memory, generation)
}

/// Why the write policy refuses a Flux object or a Secret or ConfigMap it reads, if it does.
/// What a Flux object reads is held to the rules of what a work writes: a work may not have
/// the agent read (and substitute, or send to a registry) what it could not write itself.
fn refused_by_policy<S>(
    ctx: &ReconcileContext,
    kind: FluxKind,
    obj: &FluxObject<S>,
    reads: &[ReadRef],
) -> Option<String> {
    let (ns, name) = (obj.namespace.as_str(), obj.name.as_str());
    let policy = &ctx.cfg.policy;
    if let Err(d) = policy.check(&Target::new(kind.group(), kind.name(), ns, name)) {
        return Some(format!("{} {ns}/{name}: {d}", kind.name()));
    }
    reads.iter().find_map(|r| {
        policy
            .check(&Target::new("", r.kind, ns, &r.name))
            .err()
            .map(|d| {
                format!(
                    "{} {ns}/{} ({} of {} {name}): {d}",
                    r.kind,
                    r.name,
                    r.field,
                    kind.name()
                )
            })
    })
}

/// Appends a build's manifests to the expansion as the Kustomization's objects.
fn append(x: &mut Expansion, native: &mut Native, manifests: &[Manifest], first_built: usize) {
    let start = first_built + x.built.len();
    x.built.extend(manifests.iter().cloned());
    native.objects = start..first_built + x.built.len();
    native.usable = true;
}
