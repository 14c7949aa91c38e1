//! The work engine: takes works from a [`WorkSource`], keeps the spoke matching them, and sends
//! status to a [`StatusSink`] only when it changes.
//!
//! One task per work reconcile (at most one in flight per work, bounded across works); a single
//! loop owns all per-work state, so there are no locks around it. Drift notifications are
//! debounced per work; failures retry with exponential back-off; a periodic resync is a backstop.

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
use super::conditions::status_hash;
use super::delete;
use super::discovery::Resolver;
use super::drift::{Debouncer, DriftWatcher, FlapGuard};
use super::manifestwork::{
    AppliedManifestWork, DEFAULT_FIELD_MANAGER, DeleteOption, ManifestWork, ManifestWorkStatus,
};
use super::metrics::WorkMetrics;
use super::object::ObjKey;
use super::prune::key_of;
use super::reconcile::{self, ReconcileConfig, Report, Shared};
use super::source::{StatusSink, StatusUpdate, WorkEvent, WorkSource};

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

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Hex SHA-256 of the hub address.
    pub hub_hash: String,
    /// Agent id.
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
    /// First retry delay after a failed reconcile; doubles up to `retry_max`.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Flap detection parameters.
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
    /// A reconcile or delete task is running.
    running: bool,
    /// Run again when the current task ends.
    rerun: bool,
    /// Delete requested.
    delete: Option<DeleteOption>,
    /// Last status built (shared with the next task, for the same reason as `work`).
    status: Arc<ManifestWorkStatus>,
    /// Hash of the last status published.
    published: Option<String>,
    /// Consecutive failed reconciles (retry back-off).
    failures: u32,
}

/// What a finished task reports.
#[derive(Debug)]
enum Done {
    /// A reconcile finished.
    Reconciled {
        /// Work name.
        name: String,
        /// Its outcome and new status.
        report: Report,
        /// Hash of the status now published (unchanged if publishing failed).
        published: Option<String>,
    },
    /// A deletion finished (or failed).
    Deleted {
        /// Work name.
        name: String,
        /// Whether everything was removed and the record deleted.
        ok: bool,
        /// Last status built.
        status: Arc<ManifestWorkStatus>,
        /// Hash of the status now published.
        published: Option<String>,
    },
}

/// The engine. Build with [`WorkEngine::new`], then [`WorkEngine::run`].
pub struct WorkEngine {
    /// What reconciles share.
    shared: Arc<Shared>,
    /// Engine settings.
    cfg: EngineConfig,
    /// Drift notifications from the watcher.
    drift_rx: mpsc::UnboundedReceiver<ObjKey>,
    /// Stops the drift watches when the engine ends.
    watch_cancel: CancellationToken,
    /// Cancelled at shutdown: deletions waiting on finalizers stop there (their record stays on
    /// the spoke, so the next agent finishes them) instead of holding up the exit.
    stopping: CancellationToken,
    /// Readiness: true once every work from the source's initial sync has been reconciled once.
    ready_tx: watch::Sender<bool>,
    /// Bounds concurrent work reconciles.
    work_permits: Arc<Semaphore>,
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
        let shared = Shared {
            client: client.clone(),
            cfg: ReconcileConfig {
                hub_hash: cfg.hub_hash.clone(),
                agent_id: cfg.agent_id.clone(),
                field_manager: cfg.field_manager.clone(),
                max_work_bytes: cfg.max_work_bytes,
                crd_wait: cfg.crd_wait,
            },
            resolver: Resolver::new(client.clone()),
            applier: Applier::new(client.clone(), drift.clone()),
            drift,
            claims: Mutex::new(Claims::default()),
            manifest_permits: Arc::new(Semaphore::new(cfg.max_concurrent_manifests.max(1))),
            metrics,
            flaps: Mutex::new(HashMap::new()),
            flap_template: cfg.flap.clone(),
            drift_counts: Mutex::new(HashMap::new()),
            applied_content: Mutex::new(HashMap::new()),
            amw_api: Api::all(client),
            amw_cache: Mutex::new(HashMap::new()),
        };
        let (ready_tx, _) = watch::channel(false);
        WorkEngine {
            work_permits: Arc::new(Semaphore::new(cfg.max_concurrent_works.max(1))),
            shared: Arc::new(shared),
            cfg,
            drift_rx,
            watch_cancel,
            stopping: CancellationToken::new(),
            ready_tx,
        }
    }

    /// Readiness signal: becomes true once the initial works are reconciled.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Runs until `shutdown` is cancelled (then finishes in-flight tasks) or the source ends.
    pub async fn run(
        mut self,
        mut source: impl WorkSource,
        sink: Arc<dyn StatusSink>,
        shutdown: CancellationToken,
    ) -> Result<(), EngineError> {
        applied_work::install_crd(&self.shared.client)
            .await
            .map_err(EngineError::Crd)?;
        // Records of this hub left by a previous run: claims, and works to clean up if the source
        // no longer has them.
        let mut orphans: HashMap<String, AppliedManifestWork> = HashMap::new();
        let list = self
            .shared
            .amw_api
            .list(&ListParams::default())
            .await
            .map_err(EngineError::List)?;
        for amw in list.items {
            if amw.spec.hub_hash != self.cfg.hub_hash {
                continue;
            }
            let work = amw.spec.manifest_work_name.clone();
            if let Ok(mut c) = self.shared.claims.lock() {
                for e in applied_work::resources(&amw) {
                    c.preload(&key_of(&e), &work);
                }
            }
            orphans.insert(work, amw);
        }

        let mut slots: HashMap<String, Slot> = HashMap::new();
        let mut timers: Debouncer<String> = Debouncer::new(self.cfg.debounce_quiet, self.cfg.debounce_max);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut tasks = JoinSet::new();
        let mut source_open = true;
        let mut initial: Option<HashSet<String>> = None;
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.cfg.resync_interval,
            self.cfg.resync_interval,
        );
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let next = timers.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = done_rx.recv() => {
                    let name = match &done { Done::Reconciled { name, .. } | Done::Deleted { name, .. } => name.clone() };
                    self.finish(&mut slots, &mut timers, done);
                    if let Some(init) = initial.as_mut() {
                        init.remove(&name);
                        if init.is_empty() {
                            initial = None;
                            self.ready_tx.send_replace(true);
                        }
                    }
                    self.start(&mut slots, &name, &mut tasks, &done_tx, &sink);
                }
                Some(key) = self.drift_rx.recv() => {
                    let owners = self.shared.claims.lock().map(|c| c.owners(&key)).unwrap_or_default();
                    let now = Instant::now();
                    for (work, _) in owners {
                        if slots.get(&work).is_some_and(|s| s.work.is_some() && s.delete.is_none()) {
                            timers.touch(work, now);
                        }
                    }
                }
                _ = sleep_until_opt(next) => {
                    for name in timers.take_due(Instant::now()) {
                        if let Some(s) = slots.get_mut(&name) {
                            s.rerun = true;
                        }
                        self.start(&mut slots, &name, &mut tasks, &done_tx, &sink);
                    }
                }
                _ = resync.tick() => {
                    let names: Vec<String> = slots.keys().cloned().collect();
                    for name in names {
                        if let Some(s) = slots.get_mut(&name) {
                            s.rerun = true;
                        }
                        self.start(&mut slots, &name, &mut tasks, &done_tx, &sink);
                    }
                }
                ev = source.next_event(), if source_open => match ev {
                    None => {
                        tracing::info!("work source ended");
                        source_open = false;
                    }
                    Some(WorkEvent::Upsert(w)) => {
                        let name = w.name_any();
                        orphans.remove(&name);
                        let slot = slots.entry(name.clone()).or_default();
                        let changed = slot.work.as_ref().is_none_or(|old| old.spec != w.spec || old.metadata.generation != w.metadata.generation);
                        if slot.delete.is_some() {
                            // Re-created while being deleted: apply again once deletion ends.
                            slot.delete = None;
                        }
                        slot.work = Some(Arc::from(w));
                        if changed {
                            slot.rerun = true;
                            slot.failures = 0;
                            self.start(&mut slots, &name, &mut tasks, &done_tx, &sink);
                        }
                    }
                    Some(WorkEvent::Delete(r)) => {
                        let amw = orphans.remove(&r.name);
                        let option = slots
                            .get(&r.name)
                            .and_then(|s| s.work.as_ref())
                            .and_then(|w| w.spec.delete_option.clone())
                            .or_else(|| amw.as_ref().map(applied_work::recorded_delete_option))
                            .unwrap_or_default();
                        let slot = slots.entry(r.name.clone()).or_default();
                        slot.delete = Some(option);
                        slot.rerun = true;
                        timers.cancel(&r.name);
                        self.start(&mut slots, &r.name, &mut tasks, &done_tx, &sink);
                    }
                    Some(WorkEvent::Synced) => {
                        // Records whose work the source no longer has: delete as recorded.
                        for (name, amw) in orphans.drain() {
                            tracing::info!(work = %name, "work is gone from the source; cleaning up its recorded resources");
                            let slot = slots.entry(name.clone()).or_default();
                            slot.delete = Some(applied_work::recorded_delete_option(&amw));
                            slot.rerun = true;
                            self.start(&mut slots, &name, &mut tasks, &done_tx, &sink);
                        }
                        let pending: HashSet<String> = slots.iter().filter(|(_, s)| s.running || s.rerun).map(|(n, _)| n.clone()).collect();
                        if pending.is_empty() {
                            self.ready_tx.send_replace(true);
                        } else {
                            initial = Some(pending);
                        }
                    }
                },
                Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "work task ended abnormally");
                    }
                }
            }
            self.shared.metrics.works.set(slots.len() as i64);
        }
        // Shutdown: take nothing new, let in-flight applies finish, leave long deletions.
        self.stopping.cancel();
        tracing::info!(
            in_flight = tasks.len(),
            "work engine stopping; finishing in-flight work"
        );
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "work task ended abnormally");
            }
        }
        self.watch_cancel.cancel();
        Ok(())
    }

    /// Applies a finished task's result to its slot.
    fn finish(&self, slots: &mut HashMap<String, Slot>, timers: &mut Debouncer<String>, done: Done) {
        match done {
            Done::Reconciled {
                name,
                report,
                published,
            } => {
                let Some(slot) = slots.get_mut(&name) else { return };
                slot.running = false;
                slot.status = Arc::new(report.status);
                slot.published = published;
                if report.failed {
                    slot.failures = slot.failures.saturating_add(1);
                    let factor = 2u32.saturating_pow(slot.failures.saturating_sub(1).min(16));
                    let delay = self.cfg.retry_base.saturating_mul(factor).min(self.cfg.retry_max);
                    timers.schedule_at(name.clone(), Instant::now() + delay);
                } else {
                    slot.failures = 0;
                }
                if let Some(until) = report.hold_until {
                    timers.schedule_at(name, until);
                }
            }
            Done::Deleted {
                name,
                ok,
                status,
                published,
            } => {
                let Some(slot) = slots.get_mut(&name) else { return };
                slot.running = false;
                slot.status = status;
                slot.published = published;
                if ok && slot.delete.is_some() {
                    slots.remove(&name);
                    for m in [&self.shared.flaps] {
                        if let Ok(mut f) = m.lock() {
                            f.retain(|(w, _), _| w != &name);
                        }
                    }
                    if let Ok(mut c) = self.shared.drift_counts.lock() {
                        c.retain(|(w, _), _| w != &name);
                    }
                    if let Ok(mut c) = self.shared.applied_content.lock() {
                        c.retain(|(w, _), _| w != &name);
                    }
                } else if !ok {
                    slot.failures = slot.failures.saturating_add(1);
                    let delay = self
                        .cfg
                        .retry_base
                        .saturating_mul(2u32.saturating_pow(slot.failures.min(8)))
                        .min(self.cfg.retry_max);
                    timers.schedule_at(name, Instant::now() + delay);
                } else {
                    // Deleted, then re-created meanwhile: apply it again.
                    slot.rerun = true;
                }
            }
        }
    }

    /// Starts the slot's pending task if it has one and none is running.
    fn start(
        &self,
        slots: &mut HashMap<String, Slot>,
        name: &str,
        tasks: &mut JoinSet<()>,
        done_tx: &mpsc::UnboundedSender<Done>,
        sink: &Arc<dyn StatusSink>,
    ) {
        let Some(slot) = slots.get_mut(name) else { return };
        if slot.running || !slot.rerun {
            return;
        }
        slot.rerun = false;
        slot.running = true;
        let shared = self.shared.clone();
        let sink = sink.clone();
        let done_tx = done_tx.clone();
        let permits = self.work_permits.clone();
        let prev = slot.status.clone();
        let published = slot.published.clone();
        let name = name.to_string();
        // Each task waits for a permit first and only then builds its (large) reconcile or delete
        // future, boxed: a task queued behind the concurrency limit costs a few words, not a full
        // future, which matters when a thousand works change at once.
        if let Some(option) = slot.delete.clone() {
            let work = slot.work.clone();
            let stopping = self.stopping.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let deletion = Box::pin(run_delete(
                    &shared,
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
                let _ = done_tx.send(Done::Deleted {
                    name,
                    ok,
                    status: Arc::new(status),
                    published,
                });
            });
            return;
        }
        let Some(work) = slot.work.clone() else {
            slot.running = false;
            return;
        };
        let generation = work.metadata.generation.unwrap_or(0);
        let span = tracing::info_span!("reconcile", work = %name, generation);
        tasks.spawn(
            async move {
                let _permit = permits.acquire_owned().await;
                let t0 = std::time::Instant::now();
                let report = Box::pin(reconcile::reconcile(&shared, &work, &prev)).await;
                shared.metrics.reconciled(
                    if report.failed { "failed" } else { "ok" },
                    t0.elapsed().as_secs_f64(),
                );
                let published = Box::pin(publish(
                    &shared,
                    sink.as_ref(),
                    &work_update(&work, &report.status, false),
                    published,
                ))
                .await;
                let _ = done_tx.send(Done::Reconciled {
                    name,
                    report,
                    published,
                });
            }
            .instrument(span),
        );
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn work_update(work: &ManifestWork, status: &ManifestWorkStatus, deleted: bool) -> StatusUpdate {
    StatusUpdate {
        name: work.name_any(),
        namespace: work.namespace(),
        uid: work.uid(),
        generation: work.metadata.generation.unwrap_or(0),
        status: status.clone(),
        status_hash: status_hash(status),
        deleted,
    }
}

/// Publishes if the status hash differs from the last published one; returns the hash now published.
async fn publish(
    shared: &Shared,
    sink: &dyn StatusSink,
    update: &StatusUpdate,
    last: Option<String>,
) -> Option<String> {
    if last.as_deref() == Some(update.status_hash.as_str()) {
        return last;
    }
    match sink.publish(update.clone()).await {
        Ok(()) => {
            shared.metrics.status_updates.inc();
            Some(update.status_hash.clone())
        }
        Err(e) => {
            tracing::warn!(work = %update.name, error = %e, "status not delivered; will retry on next change or resync");
            last
        }
    }
}

async fn run_delete(
    shared: &Shared,
    name: &str,
    work: Option<&ManifestWork>,
    option: &DeleteOption,
    prev: &ManifestWorkStatus,
    mut published: Option<String>,
    sink: &dyn StatusSink,
) -> (bool, ManifestWorkStatus, Option<String>) {
    let span = tracing::info_span!("delete", work = %name);
    async move {
        let generation = work.and_then(|w| w.metadata.generation).unwrap_or(0);
        let mk = |status: &ManifestWorkStatus, deleted: bool| match work {
            Some(w) => work_update(w, status, deleted),
            None => StatusUpdate {
                name: name.to_string(),
                namespace: None,
                uid: None,
                generation,
                status: status.clone(),
                status_hash: status_hash(status),
                deleted,
            },
        };
        let record = reconcile::record_name(shared, name);
        shared.forget_record(&record);
        let amw = match shared.amw_api.get_opt(&record).await {
            Ok(a) => a,
            Err(e) => {
                let st = reconcile::deletion_status(prev, generation, None, Some(&super::object::api_message(&e)));
                published = publish(shared, sink, &mk(&st, false), published).await;
                return (false, st, published);
            }
        };
        let mut status = prev.clone();
        if let Some(amw) = amw {
            let (tx, mut rx) = mpsc::unbounded_channel::<(usize, usize)>();
            let claims_snapshot: Vec<(ObjKey, bool)> = applied_work::resources(&amw)
                .iter()
                .map(|e| {
                    let k = key_of(e);
                    let other = shared.claims.lock().map(|c| c.claimed_elsewhere(&k, name)).unwrap_or(true);
                    (k, other)
                })
                .collect();
            let elsewhere = move |k: &ObjKey| claims_snapshot.iter().any(|(kk, o)| kk == k && *o);
            let del = delete::delete_work(&shared.client, &amw, option, elsewhere, move |left, total| {
                let _ = tx.send((left, total));
            });
            tokio::pin!(del);
            let result = loop {
                tokio::select! {
                    r = &mut del => break r,
                    Some((left, total)) = rx.recv() => {
                        if left > 0 {
                            status = reconcile::deletion_status(&status, generation, Some((left, total)), None);
                            published = publish(shared, sink, &mk(&status, false), published.clone()).await;
                        }
                    }
                }
            };
            if let Err(e) = result {
                status = reconcile::deletion_status(&status, generation, None, Some(&e.to_string()));
                published = publish(shared, sink, &mk(&status, false), published).await;
                return (false, status, published);
            }
            for e in applied_work::resources(&amw) {
                shared.drift.record_delete(&key_of(&e));
            }
        }
        if let Ok(mut c) = shared.claims.lock() {
            c.retain_work(name, &HashSet::new());
        }
        status = reconcile::deletion_status(&status, generation, Some((0, 0)), None);
        published = publish(shared, sink, &mk(&status, true), published).await;
        tracing::info!(work = %name, policy = ?option.propagation_policy, "work deleted from the spoke");
        (true, status, published)
    }
    .instrument(span)
    .await
}
