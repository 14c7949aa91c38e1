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

use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::applied_work::{self, AppliedWorkError};
use super::applier::Applier;
use super::claims::Claims;
use super::context::{ReconcileConfig, ReconcileContext};
use super::delete::run_delete;
use super::discovery::Resolver;
use super::drift::DriftWatcher;
use super::history::WorkMemory;
use super::manifestwork::{
    AppliedManifestWork, DEFAULT_FIELD_MANAGER, DeleteOption, ManifestWork, ManifestWorkStatus,
};
use super::metrics::WorkMetrics;
use super::object::ObjKey;
use super::reconcile::{self, Report};
use super::schedule::{Debouncer, FlapGuard, RetryPolicy};
use super::source::{StatusSink, WorkEvent, WorkRef, WorkSource};
use super::status::{publish, work_update};
use spokelet_base::lock::lock;

/// Jitter of the retry delays of failed reconciles and deletions: works that failed together
/// (the API server was down) do not all come back in the same instant.
const RETRY_JITTER: f64 = 0.2;

/// Engine failures (only start-up can fail; per-work problems go to status).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Installing the AppliedManifestWork CRD failed.
    #[error("installing the AppliedManifestWork CRD: {0}")]
    Crd(#[source] AppliedWorkError),
    /// Listing existing AppliedManifestWorks failed.
    #[error("listing AppliedManifestWorks: {0}")]
    List(#[source] kube::Error),
}

/// Defaults come from [`EngineConfig::new`]; `spokelet run` overrides some from its flags.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Hex SHA-256 of the hub address.
    pub hub_hash: String,
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
    /// Largest work accepted (JSON bytes of its manifests). Default 4 MiB, the hub's default
    /// message limit: larger works cannot come from a real hub anyway.
    pub max_work_bytes: usize,
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
}

impl EngineConfig {
    /// Defaults for a hub hash and agent id.
    pub fn new(hub_hash: impl Into<String>, agent_id: impl Into<String>) -> Self {
        EngineConfig {
            hub_hash: hub_hash.into(),
            agent_id: agent_id.into(),
            field_manager: DEFAULT_FIELD_MANAGER.into(),
            resync_interval: Duration::from_secs(300),
            max_concurrent_works: 48,
            max_concurrent_manifests: 96,
            max_work_bytes: 4 * 1024 * 1024,
            debounce_quiet: Duration::from_millis(20),
            debounce_max: Duration::from_millis(200),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            flap: FlapGuard::default(),
            crd_wait: Duration::from_secs(60),
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
            Done::Reconciled { name, .. } | Done::Deleted { name, .. } => name,
        }
    }
}

/// The engine. Build with [`WorkEngine::new`], then [`WorkEngine::run`].
pub struct WorkEngine {
    ctx: Arc<ReconcileContext>,
    cfg: EngineConfig,
    /// Drift notifications from the watcher.
    drift_rx: mpsc::UnboundedReceiver<ObjKey>,
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
        let (tx, drift_rx) = mpsc::unbounded_channel();
        let watch_cancel = CancellationToken::new();
        let drift = DriftWatcher::new(client.clone(), tx, watch_cancel.clone());
        let ctx = ReconcileContext {
            client: client.clone(),
            cfg: ReconcileConfig {
                hub_hash: cfg.hub_hash.clone(),
                agent_id: cfg.agent_id.clone(),
                field_manager: cfg.field_manager.clone(),
                max_work_bytes: cfg.max_work_bytes,
                crd_wait: cfg.crd_wait,
                flap: cfg.flap.clone(),
            },
            resolver: Resolver::new(client.clone()),
            applier: Applier::new(client.clone(), drift.clone()),
            drift,
            claims: Mutex::new(Claims::default()),
            manifest_permits: Arc::new(Semaphore::new(cfg.max_concurrent_manifests.max(1))),
            metrics,
            amw_api: Api::all(client),
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
        applied_work::install_crd(&self.ctx.client)
            .await
            .map_err(EngineError::Crd)?;
        let orphans = load_records(&self.ctx).await?;
        let WorkEngine {
            ctx,
            cfg,
            mut drift_rx,
            watch_cancel,
            ready_tx,
        } = self;
        let mut resync = tokio::time::interval_at(Instant::now() + cfg.resync_interval, cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lp = EngineLoop::new(ctx, &cfg, ready_tx, sink, orphans);
        loop {
            let next = lp.timers.next_deadline();
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
        }
        lp.drain().await;
        watch_cancel.cancel();
        Ok(())
    }
}

/// Records of this hub left by a previous run, by work name: their objects are claimed, and
/// works the source no longer has are cleaned up once it has synced.
async fn load_records(ctx: &ReconcileContext) -> Result<HashMap<String, AppliedManifestWork>, EngineError> {
    let list = ctx
        .amw_api
        .list(&ListParams::default())
        .await
        .map_err(EngineError::List)?;
    let mut orphans = HashMap::new();
    for amw in list.items {
        if amw.spec.hub_hash != ctx.cfg.hub_hash {
            continue;
        }
        let work = amw.spec.manifest_work_name.clone();
        let mut claims = lock(&ctx.claims);
        for e in applied_work::resources(&amw) {
            claims.preload(&ObjKey::from(&e), &work);
        }
        drop(claims);
        orphans.insert(work, amw);
    }
    Ok(orphans)
}

/// The engine loop's state and its event handlers.
struct EngineLoop {
    ctx: Arc<ReconcileContext>,
    sink: Arc<dyn StatusSink>,
    slots: HashMap<String, Slot>,
    /// Due reconciles: debounced drift, retries, flap holds.
    timers: Debouncer<String>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Recorded works not (yet) delivered by the source; deleted once it has synced.
    orphans: HashMap<String, AppliedManifestWork>,
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
        orphans: HashMap<String, AppliedManifestWork>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        EngineLoop {
            ctx,
            sink,
            slots: HashMap::new(),
            timers: Debouncer::new(cfg.debounce_quiet, cfg.debounce_max),
            tasks: JoinSet::new(),
            done_tx,
            done_rx,
            orphans,
            initial: None,
            source_open: true,
            ready_tx,
            work_permits: Arc::new(Semaphore::new(cfg.max_concurrent_works.max(1))),
            stopping: CancellationToken::new(),
            retry: RetryPolicy::new(cfg.retry_base, cfg.retry_max, RETRY_JITTER),
        }
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
        }
        if let Some(init) = self.initial.as_mut() {
            init.remove(&name);
            if init.is_empty() {
                self.initial = None;
                self.ready_tx.send_replace(true);
            }
        }
        self.start(&name);
    }

    /// An object of ours changed outside the agent: look at the works claiming it, debounced.
    fn on_drift(&mut self, key: &ObjKey) {
        let owners = lock(&self.ctx.claims).owners(key);
        let now = Instant::now();
        for (work, _) in owners {
            if self
                .slots
                .get(&work)
                .is_some_and(|s| s.work.is_some() && s.delete.is_none())
            {
                self.timers.touch(work, now);
            }
        }
    }

    /// Debounced drift, retries and flap holds that are due.
    fn on_timer(&mut self) {
        for name in self.timers.take_due(Instant::now()) {
            self.rerun(&name);
        }
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
            Some(WorkEvent::Synced) => self.on_synced(),
        }
    }

    /// A new or changed work: reconcile it if its spec or generation changed.
    fn on_upsert(&mut self, w: ManifestWork) {
        let name = w.name_any();
        self.orphans.remove(&name);
        let slot = self.slots.entry(name.clone()).or_default();
        let changed = slot
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

    /// The hub deleted a work: delete it as its (or its record's) delete option says.
    fn on_delete(&mut self, r: WorkRef) {
        let amw = self.orphans.remove(&r.name);
        let option = self
            .slots
            .get(&r.name)
            .and_then(|s| s.work.as_ref())
            .and_then(|w| w.spec.delete_option.clone())
            .or_else(|| amw.as_ref().map(applied_work::recorded_delete_option))
            .unwrap_or_default();
        self.slots.entry(r.name.clone()).or_default().delete = Some(option);
        self.timers.cancel(&r.name);
        self.rerun(&r.name);
    }

    /// The source delivered all it has: records it did not deliver are cleaned up, and the
    /// engine is ready once the works it did deliver have been reconciled once.
    fn on_synced(&mut self) {
        let orphans: Vec<(String, AppliedManifestWork)> = self.orphans.drain().collect();
        for (name, amw) in orphans {
            tracing::info!(work = %name, "work is gone from the source; cleaning up its recorded resources");
            self.slots.entry(name.clone()).or_default().delete =
                Some(applied_work::recorded_delete_option(&amw));
            self.rerun(&name);
        }
        let pending: HashSet<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.running || s.rerun)
            .map(|(n, _)| n.clone())
            .collect();
        if pending.is_empty() {
            self.ready_tx.send_replace(true);
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
            let _permit = permits.acquire_owned().await;
            let deletion = Box::pin(run_delete(
                &ctx,
                &name,
                work.as_deref(),
                &option,
                &prev,
                published,
                sink.as_ref(),
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
        let task = async move {
            let _permit = permits.acquire_owned().await;
            let t0 = std::time::Instant::now();
            let report = Box::pin(reconcile::reconcile(&ctx, &work, &prev, memory)).await;
            let outcome = if report.failed { "failed" } else { "ok" };
            ctx.metrics.reconciled(outcome, t0.elapsed().as_secs_f64());
            let update = work_update(&work, &report.status, false);
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
