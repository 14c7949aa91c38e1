//! Where works come from and where status goes: the engine is independent of any hub transport.

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::manifestwork::{ManifestWork, ManifestWorkStatus};

/// A change of the desired works.
#[derive(Debug, Clone)]
pub enum WorkEvent {
    /// A work was created or changed (the full work; the engine diffs it).
    Upsert(Box<ManifestWork>),
    /// The hub deleted a work: clean it up as its deleteOption says. This is the evidence the
    /// engine deletes on; when the ref carries a uid it must be the work's.
    Delete(WorkRef),
    /// The hub holds a work the source cannot read. Its objects stay exactly as they are (never
    /// applied, pruned or deleted on this evidence) and its status says why.
    Unreadable {
        work: WorkRef,
        /// The generation the unreadable version claims (0 when unknown).
        generation: i64,
        /// What is wrong with it, for the status message.
        reason: String,
    },
    /// The source has delivered every work it currently has (see [`Listing`] for what that
    /// proves about the recorded works it did not deliver).
    Synced(Listing),
    /// The source lost its hub: missing works are not evicted until it has synced again, so a
    /// hub outage never counts towards their grace period's end.
    Disconnected,
}

/// What a [`WorkEvent::Synced`] proves about recorded works the source did not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// The source read a complete list (a Kubernetes list, a directory): a recorded work absent
    /// from it was deleted on the hub, and is cleaned up now.
    Complete,
    /// The source only went quiet (CloudEvents has no end-of-resync marker, so a slow hub looks
    /// the same as a hub without the work): an absent work is *missing*, kept running and
    /// reported, and evicted only after the engine's grace period.
    Quiet,
}

/// Names a work in an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRef {
    pub name: String,
    /// The work's uid on the hub, when the source knows it (the CloudEvents `resourceid`).
    pub uid: Option<String>,
}

impl WorkRef {
    /// A ref by name only.
    pub fn named(name: impl Into<String>) -> Self {
        WorkRef {
            name: name.into(),
            uid: None,
        }
    }
}

/// A status update for one work.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub name: String,
    /// Hub namespace of the work (the cluster namespace), when the source gave one.
    pub namespace: Option<String>,
    /// Work UID on the hub (the CloudEvents `resourceid`).
    pub uid: Option<String>,
    /// Work generation the status describes (the CloudEvents `resourceversion`).
    pub generation: i64,
    pub status: ManifestWorkStatus,
    /// Hex SHA-256 of the status JSON (the CloudEvents `statushash`).
    pub status_hash: String,
    /// True on the last update of a deleted work (its conditions include `Deleted=True`).
    pub deleted: bool,
}

impl StatusUpdate {
    /// An update for the work `name` (no hub namespace or uid known), its hash computed here so
    /// every update carries the one hash sinks compare and hubs receive.
    pub fn new(name: impl Into<String>, generation: i64, status: ManifestWorkStatus, deleted: bool) -> Self {
        StatusUpdate {
            name: name.into(),
            namespace: None,
            uid: None,
            generation,
            status_hash: super::conditions::status_hash(&status),
            status,
            deleted,
        }
    }
}

/// Failure to deliver a status update.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink could not deliver; the engine logs it and sends again on the next change or resync.
    #[error("status sink: {0}")]
    Failed(String),
}

/// A stream of work events. `next_event` must be cancel-safe: the engine polls it in a `select!`.
pub trait WorkSource: Send {
    /// The next event; None when the source has ended.
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>>;
}

/// Receives status updates. Called at most once per actual change of a work's status.
/// Debug is a supertrait so holders of an `Arc<dyn StatusSink>` can derive Debug.
pub trait StatusSink: Send + Sync + std::fmt::Debug {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>>;
}

impl WorkSource for mpsc::Receiver<WorkEvent> {
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>> {
        Box::pin(self.recv())
    }
}

impl WorkSource for mpsc::UnboundedReceiver<WorkEvent> {
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>> {
        Box::pin(self.recv())
    }
}

impl StatusSink for mpsc::UnboundedSender<StatusUpdate> {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        let r = self.send(update).map_err(|e| SinkError::Failed(e.to_string()));
        Box::pin(async move { r })
    }
}

/// A sink that only logs (useful when no hub wants status).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogSink;

impl StatusSink for LogSink {
    fn publish(&self, u: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        log_status(&u);
        Box::pin(async { Ok(()) })
    }
}

/// Logs a one-line summary of a status update.
pub fn log_status(u: &StatusUpdate) {
    let summary: Vec<String> = u
        .status
        .conditions
        .iter()
        .map(|c| format!("{}={}({})", c.type_, c.status, c.reason))
        .collect();
    let failed: Vec<String> = u
        .status
        .resource_status
        .manifests
        .iter()
        .filter_map(|m| {
            m.conditions
                .iter()
                .find(|c| c.type_ == "Applied" && c.status != "True")
                .map(|c| {
                    format!(
                        "#{} {} {}: {}",
                        m.resource_meta.ordinal, m.resource_meta.kind, m.resource_meta.name, c.message
                    )
                })
        })
        .collect();
    tracing::info!(
        work = %u.name,
        generation = u.generation,
        status_hash = %u.status_hash,
        deleted = u.deleted,
        conditions = %summary.join(" "),
        failures = %failed.join("; "),
        "work status"
    );
}
