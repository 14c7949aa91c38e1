//! The status a work reports: per-manifest conditions and feedback, the work's own conditions,
//! the status of a deletion, and publishing it to the sink only when its hash changes.

use kube::ResourceExt;

use super::applier::Action;
use super::conditions::{FALSE, TRUE, cond, merge_conditions, now_rfc3339, types};
use super::context::ReconcileContext;
use super::failure::WorkFailure;
use super::feedback;
use super::manifestwork::{
    Condition, FeedbackValue, FieldValue, ManifestCondition, ManifestResourceMeta, ManifestResourceStatus,
    ManifestWork, ManifestWorkStatus, StatusFeedbackResult, UpdateStrategyType, ValueType,
};
use super::result::ManifestResult;
use super::source::{StatusSink, StatusUpdate};
use super::status_fit::{self, truncate};

/// Longest work-level condition message: a work with many failures still fits a status.
const MAX_MESSAGE: usize = 4096;

/// What the per-manifest pass tells the work-level conditions.
#[derive(Debug, Default)]
struct Tally {
    /// "#i Kind name: message" of each failed manifest.
    failed: Vec<String>,
    /// Manifests without a live object.
    unavailable: usize,
    /// "#i message" of each flapping manifest.
    flapping: Vec<String>,
}

/// The status of a reconciled work. Transition times are carried over from `prev` where a
/// condition did not change, so the same outcome gives the same status and hash.
pub(crate) fn build_status(
    generation: i64,
    results: &[ManifestResult],
    prune_errors: &[String],
    prev: &ManifestWorkStatus,
    now: &str,
) -> ManifestWorkStatus {
    let mut tally = Tally::default();
    let manifests = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let prev_conds = prev
                .resource_status
                .manifests
                .get(i)
                .map(|m| m.conditions.as_slice())
                .unwrap_or_default();
            manifest_status(i, r, generation, prev_conds, now, &mut tally)
        })
        .collect();
    let conds = work_conditions(&tally, results.len(), prune_errors, generation);
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, now),
        resource_status: ManifestResourceStatus { manifests },
    }
}

/// One manifest's entry: Applied, Available and StatusFeedbackSynced, and its feedback values.
fn manifest_status(
    i: usize,
    r: &ManifestResult,
    generation: i64,
    prev_conds: &[Condition],
    now: &str,
    tally: &mut Tally,
) -> ManifestCondition {
    let mut conds = vec![applied_condition(r, generation)];
    if let Some(e) = &r.error {
        tally
            .failed
            .push(format!("#{i} {} {}: {e}", r.meta.kind, display_name(&r.meta)));
    }
    let available = r.handled_available.unwrap_or(r.live.is_some());
    if !available {
        tally.unavailable += 1;
    }
    let mut values = match r.handled_available {
        Some(available) => {
            conds.push(handled_available(available, generation));
            Vec::new()
        }
        None => availability_and_feedback(r, generation, &mut conds),
    };
    values.extend(r.extra_values.iter().cloned());
    conds.extend(r.extra_conditions.iter().cloned());
    if r.drift_corrections > 0 {
        values.push(FeedbackValue {
            name: "DriftCorrections".into(),
            field_value: FieldValue {
                type_: ValueType::Integer,
                integer: Some(r.drift_corrections),
                ..Default::default()
            },
        });
    }
    if let Some(f) = &r.flapping {
        tally.flapping.push(format!("#{i} {f}"));
    }
    ManifestCondition {
        resource_meta: r.meta.clone(),
        status_feedback: StatusFeedbackResult { values },
        conditions: merge_conditions(prev_conds, conds, now),
    }
}

/// Available of an entry the expander handles: it has something to serve (for Flux: an
/// artifact, or applied objects).
fn handled_available(available: bool, generation: i64) -> Condition {
    if available {
        cond(
            types::AVAILABLE,
            TRUE,
            "ResourceAvailable",
            "Resource is available",
            generation,
        )
    } else {
        cond(
            types::AVAILABLE,
            FALSE,
            "ResourceNotAvailable",
            "Nothing fetched or applied yet",
            generation,
        )
    }
}

fn applied_condition(r: &ManifestResult, generation: i64) -> Condition {
    let notes = if r.notes.is_empty() {
        String::new()
    } else {
        format!("; {}", r.notes.join("; "))
    };
    if let Some(e) = &r.error {
        return cond(
            types::APPLIED,
            FALSE,
            e.reason(),
            format!("{e}{notes}"),
            generation,
        );
    }
    let base = match (r.strategy, r.action) {
        (UpdateStrategyType::ReadOnly, _) => "Read-only: status feedback only, never written",
        (UpdateStrategyType::CreateOnly, Some(Action::Skipped)) => {
            "CreateOnly: the object exists and is left as it is"
        }
        _ => "Apply manifest complete",
    };
    cond(
        types::APPLIED,
        TRUE,
        "AppliedManifestComplete",
        format!("{base}{notes}"),
        generation,
    )
}

/// Pushes the Available and (with rules) StatusFeedbackSynced conditions; returns the values.
fn availability_and_feedback(
    r: &ManifestResult,
    generation: i64,
    conds: &mut Vec<Condition>,
) -> Vec<FeedbackValue> {
    let Some(live) = &r.live else {
        conds.push(cond(
            types::AVAILABLE,
            FALSE,
            "ResourceNotAvailable",
            "Resource is not available",
            generation,
        ));
        if !r.rules.is_empty() {
            let msg = if r.rule_errors.is_empty() {
                "the object is not available".to_string()
            } else {
                r.rule_errors.join("; ")
            };
            conds.push(cond(
                types::FEEDBACK_SYNCED,
                FALSE,
                "StatusFeedbackSyncFailed",
                msg,
                generation,
            ));
        }
        return Vec::new();
    };
    conds.push(cond(
        types::AVAILABLE,
        TRUE,
        "ResourceAvailable",
        "Resource is available",
        generation,
    ));
    let fb = feedback::evaluate(&r.rules, &r.meta.group, &r.meta.kind, &r.meta.version, live);
    let mut errs = r.rule_errors.clone();
    for e in fb.errors {
        if !errs.contains(&e) {
            errs.push(e);
        }
    }
    if !r.rules.is_empty() {
        conds.push(if errs.is_empty() {
            cond(
                types::FEEDBACK_SYNCED,
                TRUE,
                "StatusFeedbackSynced",
                "",
                generation,
            )
        } else {
            cond(
                types::FEEDBACK_SYNCED,
                FALSE,
                "StatusFeedbackSyncFailed",
                errs.join("; "),
                generation,
            )
        });
    }
    fb.values
}

/// The work's Applied, Available, Progressing and Degraded conditions.
fn work_conditions(tally: &Tally, n: usize, prune_errors: &[String], generation: i64) -> Vec<Condition> {
    let failed = &tally.failed;
    let applied = if failed.is_empty() {
        cond(
            types::APPLIED,
            TRUE,
            "AppliedManifestWorkComplete",
            "Apply manifest work complete",
            generation,
        )
    } else {
        let msg = format!(
            "{} of {n} manifests failed to apply: {}",
            failed.len(),
            failed.join("; ")
        );
        cond(
            types::APPLIED,
            FALSE,
            "AppliedManifestWorkFailed",
            truncate(msg, MAX_MESSAGE),
            generation,
        )
    };
    let available = if tally.unavailable == 0 {
        cond(
            types::AVAILABLE,
            TRUE,
            "ResourcesAvailable",
            "All resources are available",
            generation,
        )
    } else {
        let msg = format!("{} of {n} resources are not available", tally.unavailable);
        cond(types::AVAILABLE, FALSE, "ResourcesNotAvailable", msg, generation)
    };
    let progressing = if failed.is_empty() && prune_errors.is_empty() {
        cond(
            types::PROGRESSING,
            FALSE,
            "AppliedManifestWorkComplete",
            "All manifests are applied",
            generation,
        )
    } else {
        cond(
            types::PROGRESSING,
            TRUE,
            "ApplyRetrying",
            "Failed manifests are retried with back-off",
            generation,
        )
    };
    vec![
        applied,
        available,
        progressing,
        degraded_condition(tally, n, prune_errors, generation),
    ]
}

/// Degraded: flapping first (it explains failures that follow), then failures, then pruning.
fn degraded_condition(tally: &Tally, n: usize, prune_errors: &[String], generation: i64) -> Condition {
    if !tally.flapping.is_empty() {
        let msg = truncate(tally.flapping.join("; "), MAX_MESSAGE);
        cond(types::DEGRADED, TRUE, "DriftFlapping", msg, generation)
    } else if !tally.failed.is_empty() {
        let msg = format!("{} of {n} manifests failed to apply", tally.failed.len());
        cond(types::DEGRADED, TRUE, "ApplyFailed", msg, generation)
    } else if !prune_errors.is_empty() {
        let msg = truncate(prune_errors.join("; "), MAX_MESSAGE);
        cond(types::DEGRADED, TRUE, "PruneFailed", msg, generation)
    } else {
        cond(types::DEGRADED, FALSE, "AsExpected", "", generation)
    }
}

/// Status of a work refused as a whole (too large, record unavailable).
pub(crate) fn whole_work_status(
    prev: &ManifestWorkStatus,
    generation: i64,
    failure: &WorkFailure,
    now: &str,
) -> ManifestWorkStatus {
    let reason = failure.reason();
    let msg = failure.to_string();
    let conds = vec![
        cond(types::APPLIED, FALSE, reason, msg.clone(), generation),
        cond(types::AVAILABLE, FALSE, reason, "nothing was applied", generation),
        cond(
            types::PROGRESSING,
            FALSE,
            reason,
            "the work cannot be applied as it is",
            generation,
        ),
        cond(types::DEGRADED, TRUE, reason, msg, generation),
    ];
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, now),
        resource_status: ManifestResourceStatus::default(),
    }
}

/// Reason of the `Applied=False` condition of a work the source cannot read.
pub(crate) const UNREADABLE_REASON: &str = "UnreadableWork";

/// Status of a work the hub holds but the agent cannot read: the manifests' last statuses as they
/// were (their objects are left alone) and conditions saying why nothing is applied.
pub(crate) fn unreadable_status(
    prev: &ManifestWorkStatus,
    generation: i64,
    reason: &str,
) -> ManifestWorkStatus {
    let msg = truncate(
        format!(
            "the hub's version of this work cannot be read, so its objects are left as they are: {reason}"
        ),
        MAX_MESSAGE,
    );
    let conds = vec![
        cond(types::APPLIED, FALSE, UNREADABLE_REASON, msg.clone(), generation),
        cond(
            types::PROGRESSING,
            FALSE,
            UNREADABLE_REASON,
            "waiting for a readable version from the hub",
            generation,
        ),
        cond(types::DEGRADED, TRUE, UNREADABLE_REASON, msg, generation),
    ];
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, &now_rfc3339()),
        resource_status: prev.resource_status.clone(),
    }
}

/// Status of a work while (and after) it is deleted: `remaining` is (left, total) of the
/// objects being deleted, `(0, _)` once all are gone.
pub(crate) fn deletion_status(
    prev: &ManifestWorkStatus,
    generation: i64,
    remaining: Option<(usize, usize)>,
    error: Option<&str>,
) -> ManifestWorkStatus {
    let now = now_rfc3339();
    let mut conds: Vec<_> = prev
        .conditions
        .iter()
        .filter(|c| c.type_ != types::DELETING && c.type_ != types::DELETED)
        .cloned()
        .collect();
    match (remaining, error) {
        (_, Some(e)) => conds.push(cond(types::DELETING, TRUE, "DeletionFailed", e, generation)),
        (Some((left, total)), None) if left > 0 => conds.push(cond(
            types::DELETING,
            TRUE,
            "ManifestsDeleting",
            format!("{left} of {total} resources still being deleted"),
            generation,
        )),
        _ => {
            for type_ in [types::DELETING, types::DELETED] {
                let status = if type_ == types::DELETED { TRUE } else { FALSE };
                let msg = "All resources are deleted or orphaned";
                conds.push(cond(type_, status, "ManifestsDeleted", msg, generation));
            }
        }
    }
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, &now),
        resource_status: prev.resource_status.clone(),
    }
}

/// The sink's view of a work's status.
/// The status is fitted to `max_bytes` first ([`status_fit::fit`]): summarised, never dropped.
pub(crate) fn work_update(
    work: &ManifestWork,
    status: &ManifestWorkStatus,
    deleted: bool,
    max_bytes: usize,
) -> StatusUpdate {
    let generation = work.metadata.generation.unwrap_or(0);
    let status = status_fit::fit(status.clone(), max_bytes);
    StatusUpdate {
        namespace: work.namespace(),
        uid: work.uid(),
        ..StatusUpdate::new(work.name_any(), generation, status, deleted)
    }
}

/// Publishes `update` unless its hash is `last`, the one published before; returns the hash
/// published now (still `last` when the sink failed: the next change or resync sends again).
pub(crate) async fn publish(
    ctx: &ReconcileContext,
    sink: &dyn StatusSink,
    update: &StatusUpdate,
    last: Option<String>,
) -> Option<String> {
    if last.as_deref() == Some(update.status_hash.as_str()) {
        return last;
    }
    match sink.publish(update.clone()).await {
        Ok(()) => {
            ctx.metrics.status_updates.inc();
            Some(update.status_hash.clone())
        }
        Err(e) => {
            tracing::warn!(work = %update.name, error = %e, "status not delivered; will retry on next change or resync");
            last
        }
    }
}

fn display_name(m: &ManifestResourceMeta) -> String {
    if m.namespace.is_empty() {
        m.name.clone()
    } else {
        format!("{}/{}", m.namespace, m.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::applier::ApplyError;
    use crate::conditions::find;
    use crate::failure::ManifestFailure;
    use std::sync::Arc;

    fn ok(i: usize, kind: &str) -> ManifestResult {
        ManifestResult {
            meta: ManifestResourceMeta {
                ordinal: i as i32,
                kind: kind.into(),
                name: format!("n{i}"),
                version: "v1".into(),
                ..Default::default()
            },
            live: Some(Arc::new(serde_json::json!({"status": {"readyReplicas": 2}}))),
            ..Default::default()
        }
    }

    fn rejected(reason: &str, message: &str) -> ManifestFailure {
        ManifestFailure::Apply(ApplyError::Rejected {
            code: 422,
            reason: reason.into(),
            message: message.into(),
        })
    }

    #[test]
    fn status_conditions_transitions() {
        let results = vec![ok(0, "ConfigMap"), ok(1, "ConfigMap")];
        let s1 = build_status(3, &results, &[], &ManifestWorkStatus::default(), "t1");
        let applied = find(&s1.conditions, "Applied").unwrap();
        assert_eq!(
            (applied.status.as_str(), applied.observed_generation),
            ("True", 3)
        );
        assert_eq!(find(&s1.conditions, "Degraded").unwrap().status, "False");
        // Same outcome later: identical status, identical hash.
        let s2 = build_status(3, &results, &[], &s1, "t2");
        assert_eq!(
            crate::conditions::status_hash(&s1),
            crate::conditions::status_hash(&s2)
        );
        // A failure flips Applied and Degraded with a per-manifest message.
        let mut bad = vec![ok(0, "ConfigMap"), ok(1, "ConfigMap")];
        bad[1].error = Some(rejected("Invalid", "field is immutable"));
        bad[1].live = None;
        let s3 = build_status(3, &bad, &[], &s2, "t3");
        let a = find(&s3.conditions, "Applied").unwrap();
        assert_eq!(
            (a.status.as_str(), a.last_transition_time.as_str()),
            ("False", "t3")
        );
        assert!(a.message.contains("field is immutable"), "{}", a.message);
        assert_eq!(find(&s3.conditions, "Degraded").unwrap().status, "True");
        assert_eq!(find(&s3.conditions, "Progressing").unwrap().status, "True");
        let m1 = &s3.resource_status.manifests[1];
        assert_eq!(find(&m1.conditions, "Applied").unwrap().reason, "Invalid");
        assert_eq!(find(&m1.conditions, "Available").unwrap().status, "False");
    }

    #[test]
    fn drift_count_is_feedback() {
        let mut results = vec![ok(0, "ConfigMap")];
        results[0].drift_corrections = 4;
        let s = build_status(1, &results, &[], &ManifestWorkStatus::default(), "t");
        let v = &s.resource_status.manifests[0].status_feedback.values[0];
        assert_eq!(
            (v.name.as_str(), v.field_value.integer),
            ("DriftCorrections", Some(4))
        );
    }

    #[test]
    fn deletion_progress_then_deleted() {
        let s = deletion_status(&ManifestWorkStatus::default(), 2, Some((3, 5)), None);
        let d = find(&s.conditions, "Deleting").unwrap();
        assert_eq!(d.status, "True");
        assert!(d.message.contains("3 of 5"));
        let s = deletion_status(&s, 2, Some((0, 5)), None);
        assert_eq!(find(&s.conditions, "Deleted").unwrap().status, "True");
        assert_eq!(find(&s.conditions, "Deleted").unwrap().reason, "ManifestsDeleted");
        assert_eq!(find(&s.conditions, "Deleting").unwrap().status, "False");
    }
}
