//! The expansion seam: a step that turns some of a work's manifests into others before the apply; Flux's `OCIRepository` and `Kustomization` are its one implementation.
//!
//! An [`Expander`] is asked to expand each work before the work's reconcile takes a permit, so
//! a slow expansion (a registry that answers slowly) holds up only expansions, never the
//! reconciles of other works. It returns an [`Expansion`]: the manifests it built, which of the
//! work's own manifests it handled itself (those are not sent to the API server), and how the
//! rest of the reconcile treats what it built. The reconcile then applies, records, prunes and
//! watches the built manifests like any other, and after the applies hands every result back
//! to [`Expander::finish`], which writes the status of the handled entries from their objects'.
//!
//! What an expander remembers about a work between reconciles is kept in the work's slot, in
//! its [`ExpanderMemory`], moved in and out of each reconcile with the rest of the work's
//! history and dropped with it: nothing per work is shared, nor cleaned up by hand.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::manifestwork::{Manifest, ManifestWork};
use super::policy::Policy;
/// Re-exported: the per-manifest result an expander writes its entries' status into.
pub use super::result::ManifestResult;
use super::validate::WorkLimits;

/// A processing step that expands works before they are applied.
pub trait Expander: Send + Sync + std::fmt::Debug {
    /// Expands `input.work`; None when it has nothing for this expander (its memory is then
    /// cleared). Any failure belongs in the handled entries' results, never an error here.
    fn expand<'a>(
        &'a self,
        input: ExpandInput<'a>,
        memory: &'a mut ExpanderMemory,
    ) -> BoxFuture<'a, Option<Expansion>>;

    /// After the applies: the handled entries' results, from their own outcome and their built
    /// objects' (`results` holds every ordinal of the expanded work). True while something is
    /// still settling (a health check waiting), so the engine looks again soon.
    fn finish(
        &self,
        x: &Expansion,
        results: &mut [ManifestResult],
        memory: &mut ExpanderMemory,
        generation: i64,
    ) -> bool;

    /// Every work of the engine's first sync has been reconciled once (an expander may then
    /// trust that what no work holds is unused).
    fn engine_ready(&self) {}
}

/// What an expander gets to expand one work.
#[allow(missing_debug_implementations)] // kube's Client has no Debug.
pub struct ExpandInput<'a> {
    /// The work, as the hub sent it.
    pub work: &'a ManifestWork,
    /// The work's identity (its executor when it names one, else the agent): whatever the
    /// expansion reads from the spoke is read as it.
    pub reader: &'a kube::Client,
    /// The write policy: what an expansion reads is held to the rules of what a work writes.
    pub policy: &'a Policy,
    /// The work's limits; built manifests count against `max_manifests`.
    pub limits: WorkLimits,
}

/// One work's expansion, for the rest of its reconcile.
#[derive(Debug, Default)]
pub struct Expansion {
    /// Manifests built, appended after the work's own.
    pub built: Vec<Manifest>,
    /// Ordinals of the work's own manifests the expander handles itself: they are not sent to
    /// the API server, and their result is the expander's (see [`Expander::finish`]).
    pub handled: BTreeSet<usize>,
    /// Nothing of the work may be pruned in this reconcile: some entry has nothing to say what
    /// it wants (no good build yet, suspended), so what the record lists is kept.
    pub keep_all: bool,
    /// Label sets: an object that leaves the work while carrying every label of one of them is
    /// released (ownerReference and label removed), never deleted. Whenever any is set, an
    /// object whose labels are not known either is released: when in doubt, keep it.
    pub release_labelled: Vec<BTreeMap<String, String>>,
    /// Ordinals (in the expanded work) whose objects may be deleted and created again when an
    /// apply is refused for an immutable field.
    pub recreate: HashSet<usize>,
    /// When the expander wants the work expanded again though nothing else changed (a source's
    /// interval, a failed fetch's retry).
    pub look_again_at: Option<Instant>,
    /// The expander's own account of this expansion, read back by its [`Expander::finish`].
    pub detail: Detail,
}

impl Expansion {
    /// `work` with the built manifests appended (None when nothing was built).
    pub fn expanded(&self, work: &ManifestWork) -> Option<ManifestWork> {
        if self.built.is_empty() {
            return None;
        }
        let mut w = work.clone();
        w.spec.workload.manifests.extend(self.built.iter().cloned());
        Some(w)
    }

    /// Asks to be expanded again at `at` at the latest.
    pub fn look_again_by(&mut self, at: Instant) {
        self.look_again_at = Some(self.look_again_at.map_or(at, |r| r.min(at)));
    }
}

/// A value of the expander's own type, carried through the engine without the engine knowing
/// it (type-erased, as `http::Extensions` carries a layer's data through a request).
#[derive(Default)]
pub struct Detail(Option<Box<dyn Any + Send + Sync>>);

impl Detail {
    /// A detail holding `value`.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Detail(Some(Box::new(value)))
    }

    /// The value, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_ref()?.downcast_ref()
    }
}

impl std::fmt::Debug for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Detail(..)"
        } else {
            "Detail(none)"
        })
    }
}

/// What an expander remembers about one work between its reconciles, kept in the work's slot.
#[derive(Default)]
pub struct ExpanderMemory(Option<Box<dyn Any + Send + Sync>>);

impl ExpanderMemory {
    /// The memory as a `T`, started empty the first time (or after it held another type).
    pub fn get<T: Any + Send + Sync + Default>(&mut self) -> &mut T {
        if !self.0.as_ref().is_some_and(|b| b.is::<T>()) {
            self.0 = Some(Box::new(T::default()));
        }
        match self.0.as_mut().and_then(|b| b.downcast_mut::<T>()) {
            Some(t) => t,
            // Set to a `T` just above.
            None => unreachable!("expander memory of the wrong type"),
        }
    }

    /// Forgets everything (the work no longer has anything for the expander).
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

impl std::fmt::Debug for ExpanderMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ExpanderMemory(..)"
        } else {
            "ExpanderMemory(empty)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Counter(u32);

    #[test]
    fn memory_keeps_its_value_and_starts_again_for_another_type() {
        let mut m = ExpanderMemory::default();
        m.get::<Counter>().0 += 2;
        assert_eq!(m.get::<Counter>(), &Counter(2));
        // Another type replaces it, empty.
        assert_eq!(m.get::<String>(), "");
        assert_eq!(m.get::<Counter>(), &Counter(0));
        m.get::<Counter>().0 = 5;
        m.clear();
        assert_eq!(m.get::<Counter>(), &Counter(0));
    }

    #[test]
    fn detail_gives_back_only_its_own_type() {
        let d = Detail::new(Counter(7));
        assert_eq!(d.get::<Counter>(), Some(&Counter(7)));
        assert_eq!(d.get::<String>(), None);
        assert_eq!(Detail::default().get::<Counter>(), None);
    }

    #[test]
    fn the_earliest_look_again_wins() {
        let mut x = Expansion::default();
        let now = Instant::now();
        x.look_again_by(now + std::time::Duration::from_secs(10));
        x.look_again_by(now + std::time::Duration::from_secs(3));
        x.look_again_by(now + std::time::Duration::from_secs(7));
        assert_eq!(x.look_again_at, Some(now + std::time::Duration::from_secs(3)));
    }
}
