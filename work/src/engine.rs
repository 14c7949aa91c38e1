//! The work engine: takes works from a [`WorkSource`], keeps the spoke matching them, and sends
//! status to a [`StatusSink`] only when it changes.
//!
//! One loop owns every work's slot: its desired work, last status and history. A reconcile or
//! deletion runs as a task (at most one per work, bounded across works) that takes what it needs
//! from the slot and hands it back when done, so nothing per work is shared or locked. The loop's
//! events each have a named handler: a source event, a drift notification, a due timer, the
//! periodic resync, a finished task. Drift is debounced per work and failures are retried,
//! both on `schedule`'s timing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::absent_works::{AbsentWorks, Cleanup};
use super::applied_work;
use super::applier::Applier;
use super::claims::Claims;
use super::context::{ReconcileConfig, ReconcileContext};
use super::delete::run_delete;
use super::discovery::Resolver;
use super::drift::DriftWatcher;
use super::executor::{ClientFactory, ExecutorClients};
use super::expand::Expander;
use super::history::WorkMemory;
use super::manifestwork::{
    AppliedManifestWork, DEFAULT_FIELD_MANAGER, DeleteOption, ManifestWork, ManifestWorkStatus,
};
use super::metrics::WorkMetrics;
use super::object::ObjKey;
use super::policy::{AgentIdentity, Policy};
use super::reconcile::{self, Report};
use super::schedule::{Debouncer, FlapGuard, RetryPolicy};
use super::source::{Listing, StatusSink, StatusUpdate, WorkEvent, WorkRef, WorkSource};
pub use super::startup::EngineError;
use super::startup::{install_crd, load_records};
use super::status::{publish, unreadable_status, work_update};
use super::status_fit::DEFAULT_MAX_STATUS_BYTES;
use super::validate::{MAX_WORK_NAME, WorkLimits, check_subdomain};
use spokelet_base::deadline::sleep_until_opt;
use spokelet_base::lock::lock;

/// Jitter of the retry delays of failed reconciles and deletions: works that failed together
/// (the API server was down) do not all come back in the same instant.
const RETRY_JITTER: f64 = 0.2;

/// Defaults come from [`EngineConfig::new`]; `spokelet run` overrides some from its flags.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Hex SHA-256 of the hub address.
    pub hub_hash: String,
    /// HubHashes of other spellings of the same hub's address, whose records are adopted.
    pub legacy_hub_hashes: Vec<String>,
    /// Recorded on AppliedManifestWorks.
    pub agent_id: String,
    /// Default SSA field manager.
    pub field_manager: String,
    /// Full re-reconcile period (a backstop; drift is watched).
    pub resync_interval: Duration,
    /// Works reconciled at once.
    pub max_concurrent_works: usize,
    /// Manifests applied at once, across all works.
    pub max_concurrent_manifests: usize,
    /// What one work may be (size, manifests, JSONPaths, nesting); over a limit it is refused.
    pub limits: WorkLimits,
    /// Drift debounce: quiet period after the last change.
    pub debounce_quiet: Duration,
    /// Drift debounce: longest delay from the first change.
    pub debounce_max: Duration,
    /// First retry delay after a failed reconcile or deletion; doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Flap detection parameters, the start of every manifest's guard.
    pub flap: FlapGuard,
    /// How long to wait for a CRD applied by a work to become Established.
    pub crd_wait: Duration,
    /// How long a recorded work the hub has not re-sent is kept before its objects are cleaned
    /// up, counted from when the agent first found it missing on a connected, synced hub. OCM's
    /// work agent waits 60 minutes too: long enough for a hub restored from backup, or a hub
    /// still streaming its answer, to send the work again.
    pub eviction_grace: Duration,
    /// Which objects hub works may write (default: [`Policy::builtin`] for the default identity).
    pub policy: Arc<Policy>,
    /// Largest status published, in bytes of JSON; a larger one is summarised (see `status_fit`).
    pub max_status_bytes: usize,
    /// Release, rather than delete, objects that existed before the work that adopted them.
    pub release_adopted: bool,
    /// Makes clients impersonating works' executors; None fails works that name one.
    pub executor_clients: Option<ClientFactory>,
    /// The step that expands works before they are applied (see `expand`): the agent sets
    /// Flux's, `flux::FluxExpander`, unless Flux objects are to pass through. None (the
    /// default here) sends every manifest to the API server as it is.
    pub expander: Option<Arc<dyn Expander>>,
}

impl EngineConfig {
    /// Defaults for a hub hash and agent id.
    pub fn new(hub_hash: impl Into<String>, agent_id: impl Into<String>) -> Self {
        EngineConfig {
            hub_hash: hub_hash.into(),
            legacy_hub_hashes: Vec::new(),
            agent_id: agent_id.into(),
            field_manager: DEFAULT_FIELD_MANAGER.into(),
            resync_interval: Duration::from_secs(300),
            max_concurrent_works: 48,
            max_concurrent_manifests: 96,
            limits: WorkLimits::default(),
            debounce_quiet: Duration::from_millis(20),
            debounce_max: Duration::from_millis(200),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            flap: FlapGuard::default(),
            crd_wait: Duration::from_secs(60),
            eviction_grace: Duration::from_secs(60 * 60),
            policy: Arc::new(Policy::builtin(&AgentIdentity::default())),
            max_status_bytes: DEFAULT_MAX_STATUS_BYTES,
            release_adopted: true,
            executor_clients: None,
            expander: None,
        }
    }
}

/// Per-work state, owned by the engine loop.
#[derive(Debug, Default)]
struct Slot {
    /// The latest desired work; None for a work known only from its spoke record (being deleted).
    /// Shared with the running task rather than copied: with a thousand works queued behind the
    /// concurrency limit, per-task copies were the agent's largest allocation.
    work: Option<Arc<ManifestWork>>,
    /// A reconcile or delete task is running (it holds `memory`).
    running: bool,
    /// Run again when the current task ends.
    rerun: bool,
    /// Deletion requested, with the option to delete by.
    delete: Option<DeleteOption>,
    /// Last status built (shared with the next task, for the same reason as `work`).
    status: Arc<ManifestWorkStatus>,
    /// Hash of the last status published.
    published: Option<String>,
    /// Consecutive failed reconciles or deletions: the retry delay's exponent.
    failures: u32,
    /// Per-manifest history and the cached record, lent to each reconcile.
    memory: WorkMemory,
    /// The hub's current version cannot be read: while set, nothing of the work is applied,
    /// pruned or deleted (its objects stay as they are); its runs only report why.
    unreadable: Option<Unreadable>,
    /// The delete option of the work's record, for a work deleted before a readable version
    /// arrived (its record is the only place that says how to delete it).
    recorded_option: Option<DeleteOption>,
}

/// Why a work's current version cannot be read, for its status.
#[derive(Debug, Clone)]
struct Unreadable {
    /// The hub uid, so the status reaches the right work even when the name is unsure.
    uid: Option<String>,
    generation: i64,
    reason: String,
}

/// What a finished task reports.
#[derive(Debug)]
enum Done {
    /// A reconcile finished; its report carries the work's history back.
    Reconciled {
        name: String,
        /// Boxed: a report (status and history) is many times the size of the other variant.
        report: Box<Report>,
        /// Hash of the status now published (unchanged if publishing failed).
        published: Option<String>,
    },
    /// The status of an unreadable work was published.
    Reported {
        name: String,
        status: Arc<ManifestWorkStatus>,
        published: Option<String>,
    },
    /// A deletion finished (or failed).
    Deleted {
        name: String,
        /// Whether everything was removed and the record deleted.
        ok: bool,
        status: Arc<ManifestWorkStatus>,
        published: Option<String>,
    },
}

impl Done {
    fn name(&self) -> &str {
        match self {
            Done::Reconciled { name, .. } | Done::Reported { name, .. } | Done::Deleted { name, .. } => name,
        }
    }
}

/// The engine. Build with [`WorkEngine::new`], then [`WorkEngine::run`].
pub struct WorkEngine {
    ctx: Arc<ReconcileContext>,
    cfg: EngineConfig,
    /// Drift notifications from the watcher.
    drift_rx: mpsc::Receiver<ObjKey>,
    /// Stops the drift watches when the engine ends.
    watch_cancel: CancellationToken,
    /// Readiness: true once every work from the source's initial sync has been reconciled once.
    ready_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for WorkEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkEngine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl WorkEngine {
    /// An engine on one shared client.
    pub fn new(client: Client, cfg: EngineConfig, metrics: WorkMetrics) -> Self {
        let (tx, drift_rx) = mpsc::channel(super::drift::NOTIFY_BUFFER);
        let watch_cancel = CancellationToken::new();
        let claims = Arc::new(Mutex::new(Claims::default()));
        let drift = DriftWatcher::new(client.clone(), tx, watch_cancel.clone(), claims.clone());
        let ctx = ReconcileContext {
            client: client.clone(),
            cfg: ReconcileConfig {
                hub_hash: cfg.hub_hash.clone(),
                legacy_hub_hashes: cfg.legacy_hub_hashes.clone(),
                agent_id: cfg.agent_id.clone(),
                field_manager: cfg.field_manager.clone(),
                limits: cfg.limits,
                crd_wait: cfg.crd_wait,
                flap: cfg.flap.clone(),
                policy: cfg.policy.clone(),
                max_status_bytes: cfg.max_status_bytes,
                release_adopted: cfg.release_adopted,
            },
            resolver: Resolver::new(client.clone()),
            applier: Applier::new(client.clone(), drift.clone()),
            drift,
            claims,
            manifest_permits: Arc::new(Semaphore::new(cfg.max_concurrent_manifests.max(1))),
            metrics,
            amw_api: Api::all(client.clone()),
            record_names: Mutex::new(HashMap::new()),
            executors: ExecutorClients::new(cfg.executor_clients.clone()),
            expander: cfg.expander.clone(),
        };
        let (ready_tx, _) = watch::channel(false);
        WorkEngine {
            ctx: Arc::new(ctx),
            cfg,
            drift_rx,
            watch_cancel,
            ready_tx,
        }
    }

    /// Readiness signal: becomes true once the initial works are reconciled.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Runs until `shutdown` is cancelled (then finishes in-flight tasks) or the source ends.
    pub async fn run(
        self,
        mut source: impl WorkSource,
        sink: Arc<dyn StatusSink>,
        shutdown: CancellationToken,
    ) -> Result<(), EngineError> {
        if !install_crd(&self.ctx, &shutdown).await? {
            return Ok(());
        }
        let Some(records) = load_records(&self.ctx, &shutdown).await? else {
            // Shut down while the spoke was still answering that it is not ready.
            return Ok(());
        };
        let WorkEngine {
            ctx,
            cfg,
            mut drift_rx,
            watch_cancel,
            ready_tx,
        } = self;
        let mut resync = tokio::time::interval_at(Instant::now() + cfg.resync_interval, cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lp = EngineLoop::new(ctx, &cfg, ready_tx, sink, records);
        loop {
            let next = earliest(
                earliest(lp.timers.next_deadline(), lp.absent.next_deadline()),
                lp.rechecks.next_deadline(),
            );
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = lp.done_rx.recv() => lp.on_task_done(done),
                Some(key) = drift_rx.recv() => lp.on_drift(&key),
                _ = sleep_until_opt(next) => lp.on_timer(),
                _ = resync.tick() => lp.on_resync(),
                ev = source.next_event(), if lp.source_open => lp.on_source_event(ev),
                Some(res) = lp.tasks.join_next(), if !lp.tasks.is_empty() => log_task_end(res),
            }
            lp.ctx.metrics.works.set(lp.slots.len() as i64);
            lp.count_states();
        }
        lp.drain().await;
        watch_cancel.cancel();
        Ok(())
    }
}

/// The engine loop's state and its event handlers.
struct EngineLoop {
    ctx: Arc<ReconcileContext>,
    /// When the works-by-state gauges were last counted: at most once a second, since counting
    /// walks every slot and the loop turns once per event.
    states_counted: Option<Instant>,
    sink: Arc<dyn StatusSink>,
    slots: HashMap<String, Slot>,
    /// Due reconciles: debounced drift, retries, flap holds.
    timers: Debouncer<String>,
    /// When works are due to be expanded again (`Report::look_again_at`: for Flux, a source's
    /// interval). Apart from `timers` because those keep the later of two deadlines (a
    /// back-off), while a recheck replaces the previous one.
    rechecks: Debouncer<String>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Recorded works the hub has not delivered, and when they are cleaned up.
    absent: AbsentWorks,
    /// The first `Synced` has been seen (readiness is computed once, from the first sync).
    synced_once: bool,
    /// Works of the initial sync still to finish their first reconcile (then: ready).
    initial: Option<HashSet<String>>,
    source_open: bool,
    ready_tx: watch::Sender<bool>,
    /// `max_concurrent_works` permits, taken by reconciles and deletions alike.
    work_permits: Arc<Semaphore>,
    /// Cancelled at shutdown: deletions waiting on finalizers stop there (their record stays on
    /// the spoke, so the next agent finishes them) instead of holding up the exit.
    stopping: CancellationToken,
    retry: RetryPolicy,
}

impl EngineLoop {
    fn new(
        ctx: Arc<ReconcileContext>,
        cfg: &EngineConfig,
        ready_tx: watch::Sender<bool>,
        sink: Arc<dyn StatusSink>,
        records: HashMap<String, AppliedManifestWork>,
    ) -> Self {
        // Unbounded by type, bounded in fact: each task sends one `Done` and there is at most
        // one task per work.
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        EngineLoop {
            ctx,
            states_counted: None,
            sink,
            slots: HashMap::new(),
            timers: Debouncer::new(cfg.debounce_quiet, cfg.debounce_max),
            rechecks: Debouncer::new(Duration::ZERO, Duration::ZERO),
            tasks: JoinSet::new(),
            done_tx,
            done_rx,
            absent: AbsentWorks::new(records, cfg.eviction_grace),
            synced_once: false,
            initial: None,
            source_open: true,
            ready_tx,
            work_permits: Arc::new(Semaphore::new(cfg.max_concurrent_works.max(1))),
            stopping: CancellationToken::new(),
            retry: RetryPolicy::new(cfg.retry_base, cfg.retry_max, RETRY_JITTER),
        }
    }

    /// Counts the works by state for the metrics, at most once a second.
    fn count_states(&mut self) {
        if self
            .states_counted
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.states_counted = Some(Instant::now());
        let (mut applied, mut failing, mut deleting, mut unreadable) = (0, 0, 0, 0);
        for slot in self.slots.values() {
            if slot.unreadable.is_some() {
                unreadable += 1;
            } else if slot.delete.is_some() || slot.work.is_none() {
                deleting += 1;
            } else if slot.failures > 0 {
                failing += 1;
            } else {
                applied += 1;
            }
        }
        self.ctx.metrics.set_states(&[
            ("applied", applied),
            ("failing", failing),
            ("deleting", deleting),
            ("unreadable", unreadable),
        ]);
    }

    /// A task finished: take its result, count it towards readiness, start what is pending.
    fn on_task_done(&mut self, done: Done) {
        let name = done.name().to_string();
        match done {
            Done::Reconciled {
                name,
                report,
                published,
            } => self.finish_reconcile(&name, *report, published),
            Done::Deleted {
                name,
                ok,
                status,
                published,
            } => self.finish_delete(&name, ok, status, published),
            Done::Reported {
                name,
                status,
                published,
            } => {
                if let Some(slot) = self.slots.get_mut(&name) {
                    slot.running = false;
                    slot.status = status;
                    slot.published = published;
                }
            }
        }
        if let Some(init) = self.initial.as_mut() {
            init.remove(&name);
            if init.is_empty() {
                self.initial = None;
                self.mark_ready();
            }
        }
        self.start(&name);
    }

    /// Every work of the first sync has been reconciled once: the engine is ready, and from now
    /// on an artifact-cache entry no work holds is really unused.
    fn mark_ready(&self) {
        self.ready_tx.send_replace(true);
        if let Some(x) = &self.ctx.expander {
            x.engine_ready();
        }
    }

    /// An object of ours changed outside the agent: look at the works claiming it, debounced.
    fn on_drift(&mut self, key: &ObjKey) {
        let owners = lock(&self.ctx.claims).owners(key);
        let now = Instant::now();
        for (work, _) in owners {
            if self
                .slots
                .get(&work)
                .is_some_and(|s| s.work.is_some() && s.delete.is_none() && s.unreadable.is_none())
            {
                self.timers.touch(work, now);
            }
        }
    }

    /// Debounced drift, retries and flap holds that are due, and evictions.
    fn on_timer(&mut self) {
        let now = Instant::now();
        for name in self.timers.take_due(now) {
            self.rerun(&name);
        }
        for name in self.rechecks.take_due(now) {
            self.rerun(&name);
        }
        for cleanup in self.absent.due(now) {
            self.clean_up(cleanup);
        }
    }

    /// A recorded work the hub no longer has (see `absent_works`): delete it as its record says.
    fn clean_up(&mut self, c: Cleanup) {
        if c.evicted {
            self.ctx.metrics.evictions.inc();
        }
        self.ctx.metrics.missing.set(self.absent.missing_count() as i64);
        self.slots.entry(c.work.clone()).or_default().delete = Some(c.option);
        self.rerun(&c.work);
    }

    /// The periodic backstop: every work once more.
    fn on_resync(&mut self) {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in names {
            self.rerun(&name);
        }
    }

    fn on_source_event(&mut self, ev: Option<WorkEvent>) {
        match ev {
            None => {
                tracing::info!("work source ended");
                self.source_open = false;
            }
            Some(WorkEvent::Upsert(w)) => self.on_upsert(*w),
            Some(WorkEvent::Delete(r)) => self.on_delete(r),
            Some(WorkEvent::Unreadable {
                work,
                generation,
                reason,
            }) => self.on_unreadable(work, generation, reason),
            Some(WorkEvent::Synced(listing)) => self.on_synced(listing),
            Some(WorkEvent::Disconnected) => self.absent.disconnected(),
        }
    }

    /// Takes a recorded work off the absent ones (the hub has it after all).
    fn found(&mut self, name: &str) -> Option<AppliedManifestWork> {
        let (amw, was_missing) = self.absent.found(name)?;
        if was_missing {
            self.ctx.metrics.missing.set(self.absent.missing_count() as i64);
            tracing::info!(work = %name, "missing work is back from the hub; nothing was deleted");
        }
        Some(amw)
    }

    /// A new or changed work: reconcile it if its spec or generation changed.
    fn on_upsert(&mut self, w: ManifestWork) {
        let name = w.name_any();
        // The name goes into the record's name and every request path about it.
        if let Err(e) = check_subdomain("work name", &name, MAX_WORK_NAME) {
            let r = WorkRef {
                name: name.clone(),
                uid: w.uid(),
            };
            self.on_unreadable(r, w.metadata.generation.unwrap_or(0), e.to_string());
            return;
        }
        self.found(&name);
        let slot = self.slots.entry(name.clone()).or_default();
        let was_unreadable = readable_again(slot, &self.ctx.metrics);
        if was_unreadable {
            tracing::info!(work = %name, "work is readable again");
        }
        let changed = was_unreadable
            || slot
                .work
                .as_ref()
                .is_none_or(|old| old.spec != w.spec || old.metadata.generation != w.metadata.generation);
        // Re-created while being deleted: applied again once the deletion ends.
        slot.delete = None;
        slot.work = Some(Arc::new(w));
        if changed {
            slot.failures = 0;
            self.rerun(&name);
        }
    }

    /// The hub deleted a work: delete it as its (or its record's) delete option says, unless the
    /// delete names a different work (another uid) than the one held under that name.
    fn on_delete(&mut self, r: WorkRef) {
        if let (Some(uid), Some(held)) = (r.uid.as_deref(), self.held_uid(&r.name))
            && uid != held
        {
            tracing::warn!(work = %r.name, delete_for = %uid, held = %held,
                "delete names another work than the one held under this name; ignored");
            return;
        }
        let amw = self.found(&r.name);
        let slot = self.slots.entry(r.name.clone()).or_default();
        let option = slot
            .work
            .as_ref()
            .and_then(|w| w.spec.delete_option.clone())
            .or_else(|| amw.as_ref().map(applied_work::recorded_delete_option))
            .or_else(|| slot.recorded_option.clone())
            .unwrap_or_default();
        readable_again(slot, &self.ctx.metrics);
        slot.delete = Some(option);
        self.timers.cancel(&r.name);
        self.rerun(&r.name);
    }

    /// The hub uid of the work held under `name`: the delivered work's, else its record's.
    fn held_uid(&self, name: &str) -> Option<String> {
        if let Some(uid) = self
            .slots
            .get(name)
            .and_then(|s| s.work.as_ref())
            .and_then(|w| w.uid())
        {
            return Some(uid);
        }
        self.absent
            .record(name)
            .and_then(applied_work::recorded_hub_uid)
            .map(str::to_string)
    }

    /// The hub holds a work the source cannot read: leave its objects exactly as they are (no
    /// apply, prune or delete), keep its record off the eviction path, and say why in its status.
    fn on_unreadable(&mut self, r: WorkRef, generation: i64, reason: String) {
        let name = self.recorded_name(&r);
        tracing::error!(work = %name, generation, %reason, "the hub's version of the work cannot be read; its objects are left as they are");
        let amw = self.found(&name);
        let slot = self.slots.entry(name.clone()).or_default();
        if slot.unreadable.is_none() {
            self.ctx.metrics.unreadable.inc();
        }
        slot.unreadable = Some(Unreadable {
            uid: r.uid,
            generation,
            reason,
        });
        if let Some(amw) = amw {
            slot.recorded_option = Some(applied_work::recorded_delete_option(&amw));
        }
        self.timers.cancel(&name);
        self.rerun(&name);
    }

    /// The name a ref's work is recorded under: its own, or that of the record carrying its
    /// uid (an unreadable event may not say the name right).
    fn recorded_name(&self, r: &WorkRef) -> String {
        if self.slots.contains_key(&r.name) || self.absent.record(&r.name).is_some() {
            return r.name.clone();
        }
        let Some(uid) = r.uid.as_deref() else {
            return r.name.clone();
        };
        self.absent.named_by_uid(uid).unwrap_or(&r.name).to_string()
    }

    /// The source delivered all it has. On a complete listing, records it did not deliver are
    /// of works the hub deleted, and are cleaned up; when it only went quiet they are missing,
    /// kept and evicted after the grace period. The engine is ready once the works of the first
    /// sync have been reconciled once.
    fn on_synced(&mut self, listing: Listing) {
        let cleanups = self.absent.synced(listing, Instant::now());
        self.ctx.metrics.missing.set(self.absent.missing_count() as i64);
        for cleanup in cleanups {
            self.clean_up(cleanup);
        }
        if std::mem::replace(&mut self.synced_once, true) {
            return;
        }
        let pending: HashSet<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.running || s.rerun)
            .map(|(n, _)| n.clone())
            .collect();
        if pending.is_empty() {
            self.mark_ready();
        } else {
            self.initial = Some(pending);
        }
    }

    /// Takes a reconcile's report into its slot and schedules a retry or hold it asks for.
    fn finish_reconcile(&mut self, name: &str, report: Report, published: Option<String>) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.running = false;
        slot.status = Arc::new(report.status);
        slot.published = published;
        slot.memory = report.memory;
        if report.failed {
            slot.failures = slot.failures.saturating_add(1);
            let delay = self.retry.delay(slot.failures);
            self.timers.schedule_at(name.to_string(), Instant::now() + delay);
        } else {
            slot.failures = 0;
        }
        if let Some(until) = report.hold_until {
            self.timers.schedule_at(name.to_string(), until);
        }
        self.rechecks.cancel(&name.to_string());
        if let Some(at) = report.look_again_at {
            self.rechecks.schedule_at(name.to_string(), at);
        }
    }

    /// Takes a deletion's result: the slot goes (with its history) once the work is gone,
    /// unless the work was re-created meanwhile; a failed deletion is retried.
    fn finish_delete(
        &mut self,
        name: &str,
        ok: bool,
        status: Arc<ManifestWorkStatus>,
        published: Option<String>,
    ) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.running = false;
        slot.status = status;
        slot.published = published;
        if ok && slot.delete.is_some() {
            self.slots.remove(name);
            self.ctx.metrics.forget(name);
            // Its expander's memory (and what that held) went with the slot.
            self.rechecks.cancel(&name.to_string());
        } else if !ok {
            slot.failures = slot.failures.saturating_add(1);
            let delay = self.retry.delay(slot.failures);
            self.timers.schedule_at(name.to_string(), Instant::now() + delay);
        } else {
            // Deleted, then re-created meanwhile: apply it again.
            slot.rerun = true;
        }
    }

    /// Marks a work to run again and starts it unless a task for it is running.
    fn rerun(&mut self, name: &str) {
        if let Some(s) = self.slots.get_mut(name) {
            s.rerun = true;
        }
        self.start(name);
    }

    /// Starts the slot's pending task if it has one and none is running.
    fn start(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        if slot.running || !slot.rerun {
            return;
        }
        slot.rerun = false;
        if let Some(u) = slot.unreadable.clone()
            && slot.delete.is_none()
        {
            // Known but unreadable: its objects are left alone; the run only reports why.
            slot.running = true;
            let status = unreadable_status(&slot.status, u.generation, &u.reason);
            let update = StatusUpdate {
                uid: u.uid,
                ..StatusUpdate::new(name, u.generation, status, false)
            };
            self.spawn_report(name, update);
            return;
        }
        if let Some(option) = slot.delete.clone() {
            slot.running = true;
            // The record is about to go: a later reconcile of a re-created work reads it afresh.
            slot.memory.record = None;
            self.spawn_delete(name, option);
        } else if slot.work.is_some() {
            slot.running = true;
            self.spawn_reconcile(name);
        }
    }

    /// Publishes a status the loop built (an unreadable work's) as the slot's task. It takes no
    /// permit: it applies nothing.
    fn spawn_report(&mut self, name: &str, update: StatusUpdate) {
        let Some(slot) = self.slots.get(name) else { return };
        let (ctx, sink, done_tx) = (self.ctx.clone(), self.sink.clone(), self.done_tx.clone());
        let published = slot.published.clone();
        let name = name.to_string();
        self.tasks.spawn(async move {
            let published = publish(&ctx, sink.as_ref(), &update, published).await;
            let status = Arc::new(update.status);
            let _ = done_tx.send(Done::Reported {
                name,
                status,
                published,
            });
        });
    }

    /// Spawns the deletion of a work. Each task waits for a permit first and only then builds
    /// its (large) future, boxed: a task queued behind the concurrency limit costs a few words,
    /// not a full future, which matters when a thousand works change at once.
    fn spawn_delete(&mut self, name: &str, option: DeleteOption) {
        let Some(slot) = self.slots.get(name) else { return };
        let (ctx, sink, done_tx) = (self.ctx.clone(), self.sink.clone(), self.done_tx.clone());
        let (permits, stopping) = (self.work_permits.clone(), self.stopping.clone());
        let (work, prev, published) = (slot.work.clone(), slot.status.clone(), slot.published.clone());
        let name = name.to_string();
        self.tasks.spawn(async move {
            let permit = permits.acquire_owned().await.ok();
            let deletion = Box::pin(run_delete(
                &ctx,
                &name,
                work.as_deref(),
                &option,
                &prev,
                published,
                sink.as_ref(),
                permit,
            ));
            let (ok, status, published) = tokio::select! {
                r = deletion => r,
                _ = stopping.cancelled() => {
                    tracing::info!(work = %name, "shutting down mid-deletion; the next start resumes it");
                    return;
                }
            };
            let status = Arc::new(status);
            let _ = done_tx.send(Done::Deleted {
                name,
                ok,
                status,
                published,
            });
        });
    }

    /// Spawns a reconcile, lending it the work's history (see [`EngineLoop::spawn_delete`] on
    /// the permit-first shape).
    fn spawn_reconcile(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let Some(work) = slot.work.clone() else { return };
        let memory = std::mem::take(&mut slot.memory);
        let (prev, published) = (slot.status.clone(), slot.published.clone());
        let (ctx, sink, done_tx) = (self.ctx.clone(), self.sink.clone(), self.done_tx.clone());
        let permits = self.work_permits.clone();
        let name = name.to_string();
        let generation = work.metadata.generation.unwrap_or(0);
        let span = tracing::info_span!("reconcile", work = %name, generation);
        let stopping = self.stopping.clone();
        let task = async move {
            let mut memory = memory;
            // Outside the permit (see `reconcile::expand`); a stopping engine does not wait for
            // a slow registry.
            let expansion = tokio::select! {
                x = reconcile::expand(&ctx, &work, &mut memory) => x,
                () = stopping.cancelled() => return,
            };
            let _permit = permits.acquire_owned().await;
            let t0 = std::time::Instant::now();
            let report = Box::pin(reconcile::reconcile(&ctx, &work, &prev, memory, expansion)).await;
            let outcome = if report.failed { "failed" } else { "ok" };
            ctx.metrics.reconciled(outcome, t0.elapsed().as_secs_f64());
            let update = work_update(&work, &report.status, false, ctx.cfg.max_status_bytes);
            let published = Box::pin(publish(&ctx, sink.as_ref(), &update, published)).await;
            let report = Box::new(report);
            let _ = done_tx.send(Done::Reconciled {
                name,
                report,
                published,
            });
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// Shutdown: take nothing new, let in-flight applies finish, leave long deletions.
    async fn drain(mut self) {
        self.stopping.cancel();
        tracing::info!(
            in_flight = self.tasks.len(),
            "work engine stopping; finishing in-flight work"
        );
        while let Some(res) = self.tasks.join_next().await {
            log_task_end(res);
        }
    }
}

fn log_task_end(res: Result<(), tokio::task::JoinError>) {
    if let Err(e) = res {
        tracing::error!(error = %e, "work task ended abnormally");
    }
}

/// Clears a slot's unreadable mark (a readable version or a delete came), keeping the gauge
/// true; whether it was set.
fn readable_again(slot: &mut Slot, metrics: &WorkMetrics) -> bool {
    let was = slot.unreadable.take().is_some();
    if was {
        metrics.unreadable.dec();
    }
    was
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
