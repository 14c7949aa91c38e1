//! One reconcile of one work: record intent on the AppliedManifestWork, apply tier by tier,
//! prune what the work no longer has, read feedback, and build the status.
//!
//! The steps, each its own function below: check the size ([`validate`](super::validate)),
//! parse and resolve ([`prepare`](super::prepare)), open the record and record the intent
//! before any write ([`Ledger::open`]), then per tier: prepare, refuse duplicates and objects
//! claimed by other works, record the tier's intents, hold back flapping manifests, apply,
//! record UIDs; last, prune ([`prune`](super::prune)) and build the status
//! ([`status`](super::status)).

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use tokio::time::Instant;

use super::applied_work::{self, AppliedWorkError, RecordIdentity, owner_ref};
use super::applier::{Action, Applier, ApplyError, ApplyOutcome, Prepared};
use super::conditions::now_rfc3339;
use super::context::ReconcileContext;
use super::drift::Live;
use super::expand::{ExpandInput, Expansion};
use super::failure::{ManifestFailure, WorkFailure};
use super::history::WorkMemory;
use super::manifestwork::{
    AppliedManifestResourceMeta, AppliedManifestWork, AppliedManifestWorkSpec, ManifestWork,
    ManifestWorkStatus, UpdateStrategyType,
};
use super::object::{ObjKey, meta_str};
use super::order::plan;
use super::policy::Target;
use super::prepare::{self, KindSet, Unresolved};
use super::prune;
use super::result::ManifestResult;
use super::status::{build_status, whole_work_status};
use super::validate::{FirstSeen, ParsedManifest, check_limits};
use spokelet_base::lock::lock;

/// Result of a reconcile.
#[derive(Debug)]
pub(crate) struct Report {
    /// The new status (transition times merged with the previous one).
    pub status: ManifestWorkStatus,
    /// Whether something failed and a retry is due.
    pub failed: bool,
    /// Earliest instant a held-back drift correction may run.
    pub hold_until: Option<Instant>,
    /// The work's history, handed back to its slot.
    pub memory: WorkMemory,
    /// When the expander wants the work expanded again though nothing else changed.
    pub look_again_at: Option<Instant>,
}

/// Expands the work with the engine's expander (see `expand`), for [`reconcile`]. Called before
/// the reconcile's permit is taken: a slow expansion (a registry that answers slowly) then
/// holds up only expansions, never the reconciles of other works. None without an expander,
/// when the work has nothing for it, or when it is refused whole anyway (too large, an
/// unusable executor), which [`reconcile`] reports.
pub(crate) async fn expand(
    ctx: &ReconcileContext,
    work: &ManifestWork,
    memory: &mut WorkMemory,
) -> Option<Expansion> {
    let expander = ctx.expander.as_ref()?;
    check_limits(work, &ctx.cfg.limits).ok()?;
    let reader = ctx.executors.for_work(work, &ctx.client).ok()?;
    let input = ExpandInput {
        work,
        reader: &reader,
        policy: &ctx.cfg.policy,
        limits: ctx.cfg.limits,
    };
    expander.expand(input, &mut memory.expansion).await
}

/// Reconciles `work`, with its `expansion` from [`expand`]. Never returns an error: every
/// failure ends up in the status.
pub(crate) async fn reconcile(
    ctx: &ReconcileContext,
    work: &ManifestWork,
    prev: &ManifestWorkStatus,
    mut memory: WorkMemory,
    expansion: Option<Expansion>,
) -> Report {
    let generation = work.metadata.generation.unwrap_or(0);
    let now = now_rfc3339();
    if let Err(e) = check_limits(work, &ctx.cfg.limits) {
        return refused(prev, generation, &WorkFailure::TooLarge(e), &now, memory);
    }
    let writer = match ctx.executors.for_work(work, &ctx.client) {
        Ok(c) => c,
        Err(e) => return refused(prev, generation, &WorkFailure::Executor(e), &now, memory),
    };
    let expanded = expansion.as_ref().and_then(|x| x.expanded(work));
    let own = work.spec.workload.manifests.len();
    let work = expanded.as_ref().unwrap_or(work);
    let (results, mut parsed) = prepare::parse_manifests(work);
    if let Some(x) = &expansion {
        for (i, p) in parsed.iter_mut().enumerate() {
            if x.handled.contains(&i) {
                *p = None;
            }
        }
    }
    let crd_kinds = prepare::crd_kinds(&parsed);
    let ledger = match Ledger::open(ctx, work, &parsed, &crd_kinds, &mut memory.record).await {
        Ok(l) => l,
        Err(f) => return refused(prev, generation, &f, &now, memory),
    };
    let mut run = Run {
        ctx,
        applier: ctx.applier.with_client(writer.clone()),
        writer,
        work,
        name: work.name_any(),
        results,
        parsed,
        crd_kinds,
        memory,
        ledger,
        seen: FirstSeen::default(),
        desired: HashSet::new(),
        unresolved: Vec::new(),
        hold_until: None,
        pre_existing: HashSet::new(),
        adopted: Vec::new(),
        release_labelled: expansion
            .as_ref()
            .map(|x| x.release_labelled.clone())
            .unwrap_or_default(),
        recreate: expansion.as_ref().map(|x| x.recreate.clone()).unwrap_or_default(),
    };
    for (_tier, idxs) in run.tiers() {
        run.apply_tier(idxs).await;
    }
    run.record_adoptions().await;
    let keep_all = expansion.as_ref().is_some_and(|x| x.keep_all);
    let prune_errors = if keep_all { Vec::new() } else { run.prune().await };
    run.fill_drift_corrections();
    let look_again_at = expansion
        .as_ref()
        .and_then(|x| run.finish_expansion(x, generation));
    run.report(prev, generation, &prune_errors, &now, own, look_again_at)
}

/// How often an expansion still settling (a Kustomization waiting on its health checks) is
/// looked at again.
const SETTLING_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The report of a work refused as a whole.
fn refused(
    prev: &ManifestWorkStatus,
    generation: i64,
    failure: &WorkFailure,
    now: &str,
    memory: WorkMemory,
) -> Report {
    Report {
        status: whole_work_status(prev, generation, failure, now),
        failed: true,
        hold_until: None,
        memory,
        look_again_at: None,
    }
}

/// The work's record as this reconcile changes it.
struct Ledger {
    /// `<hubHash>-<work>`.
    name: String,
    /// The ownerReference every applied object gets (its uid is the record's).
    owner: OwnerReference,
    /// What the record lists now, as this reconcile has written it.
    entries: Vec<AppliedManifestResourceMeta>,
    /// Object → its position in `entries`, so each manifest's lookup is O(1) and a reconcile
    /// stays linear in the number of manifests (a work of thousands was quadratic).
    index: HashMap<ObjKey, usize>,
    /// What it listed when the reconcile began: pruning rewrites the record only if different.
    at_start: Vec<AppliedManifestResourceMeta>,
}

impl Ledger {
    /// Opens (creating if needed) the work's record and records, in one write, the intent to
    /// apply what it does not list yet; a record created here already lists it.
    async fn open(
        ctx: &ReconcileContext,
        work: &ManifestWork,
        parsed: &[Option<ParsedManifest>],
        crd_kinds: &KindSet,
        cache: &mut Option<AppliedManifestWork>,
    ) -> Result<Ledger, WorkFailure> {
        let name = work.name_any();
        let candidates = prepare::intent_candidates(ctx, work, parsed, crd_kinds).await;
        let spec = AppliedManifestWorkSpec {
            hub_hash: ctx.cfg.hub_hash.clone(),
            agent_id: ctx.cfg.agent_id.clone(),
            manifest_work_name: name.clone(),
        };
        let record = ctx.record_name(&name);
        let uid = work.uid().unwrap_or_default();
        // Checked already (an unusable executor refuses the work before this).
        let executor = super::executor::identity(work).ok().flatten();
        let identity = RecordIdentity {
            delete_option: work.spec.delete_option.as_ref(),
            hub_uid: &uid,
            executor: executor.as_ref().map(|e| e.user.as_str()),
        };
        let amw = applied_work::open(&ctx.amw_api, &record, spec, identity, &candidates, cache)
            .await
            .map_err(WorkFailure::Record)?;
        let entries = applied_work::resources(&amw);
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (ObjKey::from(e), i))
            .collect();
        let mut ledger = Ledger {
            name: record,
            owner: owner_ref(&amw),
            at_start: entries.clone(),
            entries,
            index,
        };
        let upfront: Vec<_> = candidates
            .into_iter()
            .filter(|c| !ledger.lists(&ObjKey::from(c)))
            .collect();
        ledger
            .record(ctx, upfront, cache)
            .await
            .map_err(WorkFailure::Intent)?;
        Ok(ledger)
    }

    fn lists(&self, key: &ObjKey) -> bool {
        self.index.contains_key(key)
    }

    /// The entry of `key`, if the record lists it.
    fn entry_mut(&mut self, key: &ObjKey) -> Option<&mut AppliedManifestResourceMeta> {
        let i = *self.index.get(key)?;
        self.entries.get_mut(i)
    }

    /// Adds `new` entries and writes the record (nothing to do when there are none).
    async fn record(
        &mut self,
        ctx: &ReconcileContext,
        new: Vec<AppliedManifestResourceMeta>,
        cache: &mut Option<AppliedManifestWork>,
    ) -> Result<(), AppliedWorkError> {
        if new.is_empty() {
            return Ok(());
        }
        for e in new {
            let key = ObjKey::from(&e);
            if self.index.contains_key(&key) {
                continue;
            }
            self.index.insert(key, self.entries.len());
            self.entries.push(e);
        }
        applied_work::write_and_cache(&ctx.amw_api, &self.name, &self.entries, cache).await
    }
}

/// The state of one reconcile between its steps.
struct Run<'a> {
    ctx: &'a ReconcileContext,
    /// The client the work's objects are written with: the agent's, or its executor's.
    writer: kube::Client,
    /// The applier writing through `writer`.
    applier: Applier,
    work: &'a ManifestWork,
    name: String,
    /// One per manifest, by ordinal: what goes into the status.
    results: Vec<ManifestResult>,
    /// One per manifest; None where it failed to parse.
    parsed: Vec<Option<ParsedManifest>>,
    crd_kinds: KindSet,
    memory: WorkMemory,
    ledger: Ledger,
    /// The first manifest naming each object.
    seen: FirstSeen,
    /// Objects this work wants (so pruning keeps them).
    desired: HashSet<ObjKey>,
    /// `(group, name)` of manifests whose kind did not resolve: possibly objects the record
    /// lists, so they are not pruned until the kind resolves.
    unresolved: Vec<(String, String)>,
    /// Earliest end of a flap hold.
    hold_until: Option<Instant>,
    /// Ordinals whose object existed before the work wrote it.
    pre_existing: HashSet<usize>,
    /// UIDs of objects adopted in this reconcile (first recorded now, and pre-existing).
    adopted: Vec<String>,
    /// Objects released, not deleted, when they leave the work (see
    /// `prune::Owner::release_labelled`).
    release_labelled: Vec<BTreeMap<String, String>>,
    /// Ordinals whose objects may be deleted and recreated when an immutable field changes
    /// (see `Expansion::recreate`).
    recreate: HashSet<usize>,
}

impl Run<'_> {
    /// Ordinals of the valid manifests, tier by tier.
    fn tiers(&self) -> Vec<(super::order::Tier, Vec<usize>)> {
        plan(
            self.parsed
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.group.as_str(), p.kind.as_str()))),
        )
    }

    /// Prepares, records and applies one tier's manifests.
    async fn apply_tier(&mut self, idxs: Vec<usize>) {
        let batch = self.prepare_tier(idxs).await;
        if let Err(e) = self.record_intents(&batch).await {
            for p in &batch {
                self.results[p.ordinal].error = Some(ManifestFailure::Intent(e.to_string()));
            }
            return;
        }
        self.hold_flapping(&batch);
        let outcomes = self.apply_batch(&batch).await;
        let by_ordinal: HashMap<usize, &Prepared> = batch.iter().map(|p| (p.ordinal, p)).collect();
        for (i, out) in outcomes {
            if let Some(p) = by_ordinal.get(&i) {
                self.take_outcome(p, out).await;
            }
        }
        self.record_uids(&batch);
    }

    /// Prepares each manifest of the tier, leaving out duplicates and objects claimed by another
    /// work with different content.
    async fn prepare_tier(&mut self, idxs: Vec<usize>) -> Vec<Prepared> {
        let mut batch = Vec::new();
        // What a `force: true` recreation must not delete: the objects the work adopted.
        let adopted = if self.ctx.cfg.release_adopted && idxs.iter().any(|i| self.recreate.contains(i)) {
            let mut uids = self
                .memory
                .record
                .as_ref()
                .map(applied_work::adopted_uids)
                .unwrap_or_default();
            uids.extend(self.adopted.iter().cloned());
            std::sync::Arc::new(uids)
        } else {
            std::sync::Arc::default()
        };
        for i in idxs {
            let Some(p) = self.parsed[i].as_ref() else {
                continue;
            };
            let r = &mut self.results[i];
            let mut prep = match prepare::prepare(self.ctx, i, p, self.work, &self.crd_kinds, r).await {
                Ok(prep) => prep,
                Err(Unresolved { group, name, error }) => {
                    r.error = Some(ManifestFailure::Discovery(error));
                    self.unresolved.push((group, name));
                    continue;
                }
            };
            prep.recreate_on_immutable = self.recreate.contains(&i);
            if prep.recreate_on_immutable {
                prep.adopted = adopted.clone();
            }
            if let Err(e) = self.seen.check(&prep.key, i) {
                r.error = Some(e.into());
                continue;
            }
            let target = Target::new(&p.group, &p.kind, &prep.key.namespace, &p.name);
            if let Err(denied) = self.ctx.cfg.policy.check(&target) {
                r.error = Some(denied.into());
                // Kept as it is: an object recorded before the policy refused it is not pruned.
                self.desired.insert(prep.key.clone());
                continue;
            }
            if prep.strategy != UpdateStrategyType::ReadOnly {
                let claim = lock(&self.ctx.claims).claim(&prep.key, &self.name, i, &p.content_hash);
                if let Err(conflict) = claim {
                    r.error = Some(conflict.into());
                    continue;
                }
                self.desired.insert(prep.key.clone());
            }
            batch.push(prep);
        }
        batch
    }

    /// Records the intent to write what the record does not list yet, before writing it, so a
    /// crash between write and record loses nothing.
    async fn record_intents(&mut self, batch: &[Prepared]) -> Result<(), AppliedWorkError> {
        let intents: Vec<_> = batch
            .iter()
            .filter(|p| p.strategy != UpdateStrategyType::ReadOnly)
            .filter(|p| !self.ledger.lists(&p.key))
            .map(|p| prepare::entry(&p.key, &p.resolved.ar.version, ""))
            .collect();
        self.ledger
            .record(self.ctx, intents, &mut self.memory.record)
            .await
    }

    /// Holds back manifests whose corrections keep flipping; they report the cached object.
    fn hold_flapping(&mut self, batch: &[Prepared]) {
        let now = Instant::now();
        for p in batch {
            let history = self.memory.manifest(p.ordinal, &self.ctx.cfg.flap);
            let Err(until) = history.flap.check(now) else {
                continue;
            };
            let strikes = history.flap.strikes();
            self.hold(until);
            let r = &mut self.results[p.ordinal];
            r.flapping = Some(flap_message(&p.key, strikes));
            if let Live::Present(v) = self.ctx.drift.lookup(&p.key) {
                r.live = Some(v);
            }
        }
    }

    /// Applies the tier's manifests that are not held, concurrently within the shared bound.
    async fn apply_batch(&self, batch: &[Prepared]) -> Vec<(usize, Result<ApplyOutcome, ApplyError>)> {
        let ctx = self.ctx;
        let owner = &self.ledger.owner;
        let applier = &self.applier;
        let futs = batch
            .iter()
            .filter(|p| self.results[p.ordinal].flapping.is_none())
            .map(|p| async move {
                let _permit = ctx.manifest_permits.acquire().await;
                let started = std::time::Instant::now();
                let out = applier.apply(p, owner).await;
                ctx.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
                (p.ordinal, out)
            });
        futures::future::join_all(futs).await
    }

    /// Takes one apply's outcome into the manifest's result and history.
    async fn take_outcome(&mut self, p: &Prepared, out: Result<ApplyOutcome, ApplyError>) {
        let ctx = self.ctx;
        let i = p.ordinal;
        let o = match out {
            Ok(o) => o,
            Err(e) => {
                ctx.metrics.applied("failed", &p.resolved.ar.kind);
                // A cached kind the server no longer serves (its CRD was deleted): look again next time.
                if matches!(e, ApplyError::Rejected { code: 404, .. }) {
                    let ar = &p.resolved.ar;
                    ctx.resolver.forget(&kube::api::GroupVersionKind::gvk(
                        &ar.group,
                        &ar.version,
                        &ar.kind,
                    ));
                }
                self.results[i].error = Some(e.into());
                return;
            }
        };
        ctx.metrics.applied(action_label(o.action), &p.resolved.ar.kind);
        self.note_correction(p, o.action);
        if o.pre_existing {
            self.pre_existing.insert(i);
        }
        let r = &mut self.results[i];
        r.notes.extend(o.notes.iter().cloned());
        r.action = Some(o.action);
        let ar = &p.resolved.ar;
        if ar.group == "apiextensions.k8s.io"
            && ar.kind == "CustomResourceDefinition"
            && let Err(e) = applied_work::wait_established(&ctx.client, &p.key.name, ctx.cfg.crd_wait).await
        {
            r.error = Some(ManifestFailure::CrdNotEstablished(e));
        }
        r.live = Some(o.live);
    }

    /// Counts a write of already-applied content as a drift correction, and feeds the flap guard.
    fn note_correction(&mut self, p: &Prepared, action: Action) {
        let work = self.name.as_str();
        let history = self.memory.manifest(p.ordinal, &self.ctx.cfg.flap);
        let before = history.applied_content.replace(p.spec_hash.clone());
        if !matches!(action, Action::Created | Action::Updated)
            || before.as_deref() != Some(p.spec_hash.as_str())
        {
            return;
        }
        self.ctx.metrics.drift_corrected(work);
        history.drift_corrections += 1;
        tracing::info!(work, object = %p.key, "corrected drift");
        let Some(until) = history.flap.record(Instant::now()) else {
            return;
        };
        let strikes = history.flap.strikes();
        let secs = until.saturating_duration_since(Instant::now()).as_secs().max(1);
        tracing::warn!(work, object = %p.key, backoff_s = secs, "object keeps being changed on the spoke; backing off corrections");
        self.results[p.ordinal].flapping = Some(flap_message(&p.key, strikes));
        self.hold(until);
    }

    /// Replaces the tier's intents with the UIDs of what got applied.
    fn record_uids(&mut self, batch: &[Prepared]) {
        for p in batch
            .iter()
            .filter(|p| p.strategy != UpdateStrategyType::ReadOnly)
        {
            let uid = self.results[p.ordinal]
                .live
                .as_deref()
                .and_then(|l| meta_str(l, "uid"))
                .map(str::to_string);
            if let Some(uid) = uid
                && let Some(e) = self.ledger.entry_mut(&p.key)
            {
                // First recorded now, and someone else's before: adopted.
                if e.uid.is_empty() && self.pre_existing.contains(&p.ordinal) {
                    tracing::info!(work = %self.name, object = %p.key, "adopted an object that existed before the work");
                    self.adopted.push(uid.clone());
                }
                *e = prepare::entry(&p.key, &p.resolved.ar.version, &uid);
            }
        }
    }

    /// Records the objects adopted in this reconcile on the record, so letting go of them
    /// releases them (also after a restart).
    async fn record_adoptions(&mut self) {
        if self.adopted.is_empty() {
            return;
        }
        let ctx = self.ctx;
        let written = applied_work::add_adopted(
            &ctx.amw_api,
            &self.ledger.name,
            &self.adopted,
            &mut self.memory.record,
        )
        .await;
        if let Err(e) = written {
            tracing::warn!(work = %self.name, error = %e, "cannot record adopted objects; retried on the next reconcile");
        }
    }

    /// Prunes what the record lists but the work no longer has, rewrites the record if that
    /// changed it, and drops this work's other claims. Returns the prune failures.
    async fn prune(&mut self) -> Vec<String> {
        let entries = std::mem::take(&mut self.ledger.entries);
        let owner_uid = self.ledger.owner.uid.clone();
        let mut adopted = self
            .memory
            .record
            .as_ref()
            .map(applied_work::adopted_uids)
            .unwrap_or_default();
        adopted.extend(self.adopted.iter().cloned());
        let (kept, mut errors) = prune::prune_unlisted(
            self.ctx,
            &prune::Owner {
                client: &self.writer,
                work: &self.name,
                uid: &owner_uid,
                adopted: &adopted,
                release_labelled: &self.release_labelled,
            },
            entries,
            &self.desired,
            &self.unresolved,
        )
        .await;
        if kept != self.ledger.at_start {
            let ctx = self.ctx;
            let written = applied_work::write_and_cache(
                &ctx.amw_api,
                &self.ledger.name,
                &kept,
                &mut self.memory.record,
            );
            if let Err(e) = written.await {
                errors.push(format!("cannot update the applied-resource record: {e}"));
            }
        }
        lock(&self.ctx.claims).retain_work(&self.name, &self.desired);
        errors
    }

    /// Every manifest's drift corrections from the history (before the expander's entries sum
    /// those of their objects).
    fn fill_drift_corrections(&mut self) {
        for (i, r) in self.results.iter_mut().enumerate() {
            r.drift_corrections = self.memory.drift_corrections(i);
        }
    }

    /// The expander's entries' results from their objects'; returns when the work is due again.
    fn finish_expansion(&mut self, x: &Expansion, generation: i64) -> Option<Instant> {
        let expander = self.ctx.expander.as_ref()?;
        let settling = expander.finish(x, &mut self.results, &mut self.memory.expansion, generation);
        if !settling {
            return x.look_again_at;
        }
        // Still settling (health checks waiting): look again soon, as Flux polls them.
        let soon = Instant::now() + SETTLING_RECHECK;
        Some(x.look_again_at.map_or(soon, |r| r.min(soon)))
    }

    /// The report: the status from the results of the work's own `own` manifests (objects
    /// built from artifacts are reported through their Kustomization's entry), and the
    /// history handed back.
    fn report(
        mut self,
        prev: &ManifestWorkStatus,
        generation: i64,
        prune_errors: &[String],
        now: &str,
        own: usize,
        look_again_at: Option<Instant>,
    ) -> Report {
        let failed = self.results.iter().any(|r| r.error.is_some()) || !prune_errors.is_empty();
        self.results.truncate(own);
        let status = build_status(generation, &self.results, prune_errors, prev, now);
        Report {
            status,
            failed,
            hold_until: self.hold_until,
            memory: self.memory,
            look_again_at,
        }
    }

    /// Keeps the earliest hold.
    fn hold(&mut self, until: Instant) {
        self.hold_until = Some(self.hold_until.map_or(until, |h| h.min(until)));
    }
}

/// The metric label of an apply's action.
fn action_label(action: Action) -> &'static str {
    match action {
        Action::Created => "created",
        Action::Updated => "updated",
        Action::Unchanged => "unchanged",
        Action::Skipped => "skipped",
    }
}

/// Stable (per back-off step) message for a flapping object, so status is not re-sent per flip.
fn flap_message(key: &ObjKey, strikes: u32) -> String {
    format!(
        "{key} keeps being changed on the spoke; corrections are paused with exponential back-off (step {strikes})"
    )
}
