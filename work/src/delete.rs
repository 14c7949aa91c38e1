//! Deleting a work from the spoke, honouring its deleteOption, and reporting its progress as the
//! work's status. Everything needed comes from the AppliedManifestWork, so a deletion interrupted
//! by a restart is finished by the next agent.

use std::collections::HashSet;
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::applied_work::{self, AppliedWorkError};
use super::context::ReconcileContext;
use super::executor::ExecutorError;
use super::manifestwork::{
    AppliedManifestResourceMeta, AppliedManifestWork, DeleteOption, DeletePropagationPolicy, ManifestWork,
    ManifestWorkStatus,
};
use super::object::{ObjKey, api_message};
use super::prune::{self, Mode, PruneError, PruneOutcome};
use super::schedule::RetryPolicy;
use super::source::{StatusSink, StatusUpdate};
use super::status::{deletion_status, publish, work_update};
use spokelet_base::lock::lock;

/// Deletion progress is polled from `POLL_MIN`, backing off to `POLL_MAX` while objects linger
/// (finalizers can take minutes), with the engine's one retry formula.
const POLL_MIN: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);
const POLL_JITTER: f64 = 0.2;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteError {
    /// Removing an object failed.
    #[error(transparent)]
    Prune(#[from] PruneError),
    /// Deleting the record failed.
    #[error(transparent)]
    Record(#[from] AppliedWorkError),
    /// The work's executor cannot be acted as; nothing is deleted with the agent's rights instead.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
}

/// Whether `e` matches one of the SelectivelyOrphan rules.
pub(crate) fn is_orphaned(option: &DeleteOption, e: &AppliedManifestResourceMeta) -> bool {
    match option.propagation_policy {
        DeletePropagationPolicy::Orphan => true,
        DeletePropagationPolicy::Foreground => false,
        DeletePropagationPolicy::SelectivelyOrphan => option
            .selectively_orphans
            .as_ref()
            .map(|s| {
                s.orphaning_rules.iter().any(|r| {
                    r.group == e.group
                        && r.resource == e.resource
                        && r.name == e.name
                        && r.namespace == e.namespace
                })
            })
            .unwrap_or(false),
    }
}

/// Deletes (or orphans) everything the work applied, waits until deleted objects are gone while
/// calling `progress(remaining, total)` whenever the count changes, then deletes the record.
/// Objects are removed through `writer` (the work's executor, or the agent itself); the record,
/// the agent's bookkeeping, through `client`.
pub(crate) async fn delete_work(
    client: &Client,
    writer: &Client,
    amw: &AppliedManifestWork,
    option: &DeleteOption,
    claimed_elsewhere: impl Fn(&ObjKey) -> bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), DeleteError> {
    let owner_uid = amw.uid().unwrap_or_default();
    let entries = applied_work::resources(amw);
    let mut waiting = Vec::new();
    for e in &entries {
        let mode = if is_orphaned(option, e) {
            Mode::Orphan
        } else {
            Mode::Delete
        };
        let out = prune::remove(writer, e, &owner_uid, claimed_elsewhere(&ObjKey::from(e)), mode).await?;
        if out == PruneOutcome::Deleted {
            waiting.push(e.clone());
        }
    }
    let total = waiting.len();
    let mut last = usize::MAX;
    let poll = RetryPolicy::new(POLL_MIN, POLL_MAX, POLL_JITTER);
    let mut polls = 0;
    loop {
        let mut still = Vec::new();
        for e in waiting {
            if prune::still_present(writer, &e).await? {
                still.push(e);
            }
        }
        waiting = still;
        if waiting.len() != last {
            last = waiting.len();
            progress(last, total);
        }
        if waiting.is_empty() {
            break;
        }
        polls += 1;
        tokio::time::sleep(poll.delay(polls)).await;
    }
    let api: Api<AppliedManifestWork> = Api::all(client.clone());
    applied_work::delete(&api, &amw.name_any()).await?;
    Ok(())
}

/// The engine's deletion task: deletes the work's objects as recorded, publishing `Deleting`
/// progress, then the final `Deleted` status. Returns whether everything is gone (record
/// included), the last status and the hash published.
///
/// `permit` (the engine's work-concurrency permit) is held only while the deletes are issued and
/// dropped before waiting for the objects to go: a stuck finalizer then stalls only its own work,
/// never the works queued behind the concurrency limit.
#[allow(clippy::too_many_arguments)] // One call site, the engine's; a struct would only rename them.
pub(crate) async fn run_delete(
    ctx: &ReconcileContext,
    name: &str,
    work: Option<&ManifestWork>,
    option: &DeleteOption,
    prev: &ManifestWorkStatus,
    published: Option<String>,
    sink: &dyn StatusSink,
    permit: Option<OwnedSemaphorePermit>,
) -> (bool, ManifestWorkStatus, Option<String>) {
    let mut report = Reporter {
        permit,
        ctx,
        sink,
        name,
        work,
        generation: work.and_then(|w| w.metadata.generation).unwrap_or(0),
        status: prev.clone(),
        published,
    };
    let span = tracing::info_span!("delete", work = %name);
    let ok = delete_recorded(ctx, name, option, &mut report)
        .instrument(span)
        .await;
    (ok, report.status, report.published)
}

/// Deletes what the record lists; false (with the failure reported) when it could not.
async fn delete_recorded(
    ctx: &ReconcileContext,
    name: &str,
    option: &DeleteOption,
    report: &mut Reporter<'_>,
) -> bool {
    let amw = match ctx.amw_api.get_opt(&ctx.record_name(name)).await {
        Ok(a) => a,
        Err(e) => {
            report.failed(&api_message(&e)).await;
            return false;
        }
    };
    if let Some(amw) = amw {
        if let Err(e) = delete_with_progress(ctx, name, &amw, option, report).await {
            report.failed(&e.to_string()).await;
            return false;
        }
        for e in applied_work::resources(&amw) {
            ctx.drift.record_delete(&ObjKey::from(&e));
        }
    }
    lock(&ctx.claims).retain_work(name, &HashSet::new());
    let status = deletion_status(&report.status, report.generation, Some((0, 0)), None);
    report.publish(status, true).await;
    tracing::info!(work = %name, policy = ?option.propagation_policy, "work deleted from the spoke");
    true
}

/// [`delete_work`], publishing each change of the count of objects still going away.
async fn delete_with_progress(
    ctx: &ReconcileContext,
    name: &str,
    amw: &AppliedManifestWork,
    option: &DeleteOption,
    report: &mut Reporter<'_>,
) -> Result<(), DeleteError> {
    // Decided once, up front: another work's claim (the claim table is not locked across the
    // deletion's awaits), an adopted object or one the policy protects is only released.
    let entries = applied_work::resources(amw);
    let mut claimed: HashSet<ObjKey> = {
        let claims = lock(&ctx.claims);
        entries
            .iter()
            .map(ObjKey::from)
            .filter(|k| claims.claimed_elsewhere(k, name))
            .collect()
    };
    let adopted = applied_work::adopted_uids(amw);
    for e in &entries {
        if prune::release_only(ctx, e, &adopted).await {
            claimed.insert(ObjKey::from(e));
        }
    }
    let writer = match report.work {
        Some(w) => ctx.executors.for_work(w, &ctx.client)?,
        // A record left by an earlier run: the executor it recorded, if any.
        None => ctx.executors.for_record(amw, &ctx.client)?,
    };
    // Progress is a latest value (left, total), not a queue: a slow publish skips steps.
    let (tx, mut rx) = tokio::sync::watch::channel(None::<(usize, usize)>);
    let del = delete_work(
        &ctx.client,
        &writer,
        amw,
        option,
        |k| claimed.contains(k),
        move |left, total| {
            tx.send_replace(Some((left, total)));
        },
    );
    tokio::pin!(del);
    loop {
        tokio::select! {
            r = &mut del => return r,
            Ok(()) = rx.changed() => {
                let Some((left, total)) = *rx.borrow_and_update() else { continue };
                // Every delete is issued: what is left is waiting, which needs no permit.
                report.permit.take();
                if left > 0 {
                    let status = deletion_status(&report.status, report.generation, Some((left, total)), None);
                    report.publish(status, false).await;
                }
            }
        }
    }
}

/// Publishes a deletion's statuses, each only once.
struct Reporter<'a> {
    ctx: &'a ReconcileContext,
    sink: &'a dyn StatusSink,
    name: &'a str,
    /// The desired work, when the engine still has it (not for a record left by an earlier run).
    work: Option<&'a ManifestWork>,
    generation: i64,
    /// Last status built.
    status: ManifestWorkStatus,
    /// Hash of the last status published.
    published: Option<String>,
    /// The engine's concurrency permit, until the deletes are issued (see [`run_delete`]).
    permit: Option<OwnedSemaphorePermit>,
}

impl Reporter<'_> {
    async fn publish(&mut self, status: ManifestWorkStatus, deleted: bool) {
        let update = match self.work {
            Some(w) => work_update(w, &status, deleted, self.ctx.cfg.max_status_bytes),
            None => StatusUpdate::new(self.name, self.generation, status.clone(), deleted),
        };
        self.published = publish(self.ctx, self.sink, &update, self.published.take()).await;
        self.status = status;
    }

    async fn failed(&mut self, error: &str) {
        let status = deletion_status(&self.status, self.generation, None, Some(error));
        self.publish(status, false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifestwork::{OrphaningRule, SelectivelyOrphan};

    fn e(name: &str) -> AppliedManifestResourceMeta {
        AppliedManifestResourceMeta {
            resource: "configmaps".into(),
            namespace: "n".into(),
            name: name.into(),
            version: "v1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn orphan_rules() {
        let fg = DeleteOption::default();
        assert!(!is_orphaned(&fg, &e("a")));
        let all = DeleteOption {
            propagation_policy: DeletePropagationPolicy::Orphan,
            ..Default::default()
        };
        assert!(is_orphaned(&all, &e("a")));
        let sel = DeleteOption {
            propagation_policy: DeletePropagationPolicy::SelectivelyOrphan,
            selectively_orphans: Some(SelectivelyOrphan {
                orphaning_rules: vec![OrphaningRule {
                    group: "".into(),
                    resource: "configmaps".into(),
                    name: "keep".into(),
                    namespace: "n".into(),
                }],
            }),
            ..Default::default()
        };
        assert!(is_orphaned(&sel, &e("keep")));
        assert!(!is_orphaned(&sel, &e("drop")));
    }
}
