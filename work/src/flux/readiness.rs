//! What a Flux entry's status says: its conditions as typed values with reasons as an enum, and
//! [`finish`], which judges each entry after the applies from its own outcome and, for a
//! Kustomization, from its objects'.

use std::ops::Range;

use serde_json::Value;
use spokelet_flux::health::{Health, health};
use spokelet_flux::objects::FluxKind;

use super::memory::FluxMemory;
use super::reasons::{Cond, Failure, Reason, Status};
use crate::conditions::cond;
use crate::failure::ManifestFailure;
use crate::manifestwork::{FeedbackValue, FieldValue, ValueType};
use crate::result::ManifestResult;

/// The result of a Flux object in this reconcile, for its status entry.
#[derive(Debug)]
pub(crate) struct Native {
    pub(crate) kind: FluxKind,
    /// `namespace/name`.
    pub(crate) id: String,
    pub(crate) error: Option<Failure>,
    pub(crate) ready: Cond,
    pub(crate) values: Vec<FeedbackValue>,
    /// Whether it has something to serve (an artifact, applied objects): Available.
    pub(crate) usable: bool,
    /// A Kustomization's objects: their ordinals in the expanded work.
    pub(crate) objects: Range<usize>,
    /// Health-check every object (`wait`) or these (`healthChecks`: kind, namespace, name).
    pub(crate) wait: bool,
    pub(crate) health_checks: Vec<(String, String, String)>,
    pub(crate) revision: Option<String>,
    /// A source with `verify`: its SourceVerified condition.
    pub(crate) verified: Option<Cond>,
}

impl Native {
    pub(crate) fn new(kind: FluxKind, v: &Value) -> Native {
        let text = |p: &str| v.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty());
        let id = format!(
            "{}/{}",
            text("/metadata/namespace").unwrap_or("default"),
            text("/metadata/name").unwrap_or_default()
        );
        Native {
            kind,
            id,
            error: None,
            ready: Cond::new(Status::Unknown, Reason::Progressing, "reconciliation in progress"),
            values: Vec::new(),
            usable: false,
            objects: 0..0,
            wait: false,
            health_checks: Vec::new(),
            revision: None,
            verified: None,
        }
    }

    /// Fails the entry: `Ready` false with the failure's reason.
    pub(crate) fn fail(&mut self, failure: Failure) {
        self.ready = Cond::new(Status::False, failure.reason, failure.message.clone());
        self.error = Some(failure);
    }
}

pub(crate) fn string_value(name: &str, value: &str) -> FeedbackValue {
    FeedbackValue {
        name: name.into(),
        field_value: FieldValue {
            type_: ValueType::String,
            string: Some(value.into()),
            ..Default::default()
        },
    }
}

fn integer_value(name: &str, value: i64) -> FeedbackValue {
    FeedbackValue {
        name: name.into(),
        field_value: FieldValue {
            type_: ValueType::Integer,
            integer: Some(value),
            ..Default::default()
        },
    }
}

/// After the applies: each Flux entry's result from its own outcome and, for a
/// Kustomization, from its objects' (applied, healthy). Updates the memory's applied revision
/// and readiness, and returns whether a Kustomization is still progressing (to look again).
pub(crate) fn finish(
    natives: &std::collections::BTreeMap<usize, Native>,
    results: &mut [ManifestResult],
    memory: &mut FluxMemory,
    generation: i64,
) -> bool {
    let mut progressing = false;
    for (&i, n) in natives {
        let (ready, error, values) = if n.kind == FluxKind::Kustomization {
            kustomization_result(n, results, memory, &mut progressing)
        } else {
            (n.ready.clone(), n.error.clone(), n.values.clone())
        };
        let Some(r) = results.get_mut(i) else {
            continue;
        };
        write_result(r, n, &ready, error, values, generation);
    }
    progressing
}

/// A Kustomization's `Ready`, failure and feedback values from its objects' outcome; records
/// in `memory` whether its build is ready and which revision is applied.
fn kustomization_result(
    n: &Native,
    results: &[ManifestResult],
    memory: &mut FluxMemory,
    progressing: &mut bool,
) -> (Cond, Option<Failure>, Vec<FeedbackValue>) {
    let mut values = n.values.clone();
    let (mut ready, mut error) = (n.ready.clone(), n.error.clone());
    if !n.objects.is_empty() && n.error.is_none() {
        let outcome = objects_outcome(n, results);
        values.push(integer_value("inventoryCount", n.objects.len() as i64));
        values.push(integer_value("driftCorrections", outcome.drift_corrections));
        let waiting;
        (ready, error, waiting) = judge(n, &outcome);
        *progressing |= waiting;
        memory.built(&n.id, ready.is_true());
    }
    // Also while failing: which revision is applied, and which was tried.
    if let Some((applied, attempted)) = memory.revisions(&n.id) {
        if let Some(rev) = applied {
            values.push(string_value("lastAppliedRevision", &rev));
        }
        values.push(string_value("lastAttemptedRevision", &attempted));
    }
    (ready, error, values)
}

/// Writes an entry's conditions and values into its manifest result.
fn write_result(
    r: &mut ManifestResult,
    n: &Native,
    ready: &Cond,
    error: Option<Failure>,
    mut values: Vec<FeedbackValue>,
    generation: i64,
) {
    values.push(string_value("ready", ready.status.as_str()));
    r.error = error.map(|f| ManifestFailure::Expansion {
        reason: f.reason.as_str(),
        message: f.message,
    });
    r.notes
        .push("reconciled by spokelet itself, not sent to the API server".into());
    let condition = |type_: &str, c: &Cond| {
        cond(
            type_,
            c.status.as_str(),
            c.reason.as_str(),
            c.message.clone(),
            generation,
        )
    };
    r.extra_conditions = vec![condition("Ready", ready)];
    if let Some(verified) = &n.verified {
        r.extra_conditions.push(condition("SourceVerified", verified));
    }
    r.extra_values = values;
    r.handled_available = Some(n.usable);
}

/// A Kustomization's Ready condition and failure from its objects' outcome, and whether its
/// health checks still wait.
fn judge(n: &Native, outcome: &ObjectsOutcome) -> (Cond, Option<Failure>, bool) {
    match (&outcome.failed, &outcome.waiting) {
        (Some(msg), _) => (
            Cond::new(Status::False, Reason::ReconciliationFailed, msg.clone()),
            Some(Failure::new(Reason::ReconciliationFailed, msg.clone())),
            false,
        ),
        (None, Some(msg)) => (
            Cond::new(Status::False, Reason::Progressing, msg.clone()),
            None,
            true,
        ),
        (None, None) => {
            let rev = n.revision.clone().unwrap_or_default();
            let message = format!("Applied revision: {rev}");
            (
                Cond::new(Status::True, Reason::ReconciliationSucceeded, message),
                None,
                false,
            )
        }
    }
}

/// What a Kustomization's objects did in this reconcile.
struct ObjectsOutcome {
    /// Why some were not applied.
    failed: Option<String>,
    /// What the health checks still wait for.
    waiting: Option<String>,
    drift_corrections: i64,
}

fn objects_outcome(n: &Native, results: &[ManifestResult]) -> ObjectsOutcome {
    let objs = results.get(n.objects.clone()).unwrap_or_default();
    let failures: Vec<String> = objs
        .iter()
        .filter_map(|r| {
            let e = r.error.as_ref()?;
            Some(format!("{} {}: {e}", r.meta.kind, display(r)))
        })
        .collect();
    let failed = (!failures.is_empty()).then(|| {
        format!(
            "{} of {} objects not applied: {}",
            failures.len(),
            objs.len(),
            first_five(&failures)
        )
    });
    let waiting = health_waits(n, objs);
    let waiting = (!waiting.is_empty()).then(|| {
        format!(
            "{} of the checked objects are not ready: {}",
            waiting.len(),
            first_five(&waiting)
        )
    });
    ObjectsOutcome {
        failed,
        waiting,
        drift_corrections: objs.iter().map(|r| r.drift_corrections).sum(),
    }
}

/// What the health checks (`wait`, `healthChecks`) still wait for.
fn health_waits(n: &Native, objs: &[ManifestResult]) -> Vec<String> {
    let mut waiting = Vec::new();
    for r in objs {
        let wanted = n.wait
            || n.health_checks.iter().any(|(k, ns, name)| {
                (k.is_empty() || *k == r.meta.kind)
                    && *name == r.meta.name
                    && (r.meta.namespace.is_empty() || *ns == r.meta.namespace)
            });
        if !wanted {
            continue;
        }
        match r.live.as_deref().map(|live| health(&r.meta.kind, live)) {
            Some(Health::Ready) => {}
            Some(Health::Progressing(m)) | Some(Health::Failed(m)) => {
                waiting.push(format!("{} {}: {m}", r.meta.kind, display(r)));
            }
            None => waiting.push(format!("{} {}: not applied", r.meta.kind, display(r))),
        }
    }
    for (k, ns, name) in &n.health_checks {
        let found = objs
            .iter()
            .any(|r| (k.is_empty() || *k == r.meta.kind) && *name == r.meta.name);
        if !found {
            waiting.push(format!(
                "health check {k} {ns}/{name} names no object of this Kustomization"
            ));
        }
    }
    waiting
}

fn first_five(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
    shown.join("; ")
}

fn display(r: &ManifestResult) -> String {
    if r.meta.namespace.is_empty() {
        r.meta.name.clone()
    } else {
        format!("{}/{}", r.meta.namespace, r.meta.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DENIED_REASON;

    fn outcome(failed: Option<&str>, waiting: Option<&str>) -> ObjectsOutcome {
        ObjectsOutcome {
            failed: failed.map(String::from),
            waiting: waiting.map(String::from),
            drift_corrections: 0,
        }
    }

    #[test]
    fn a_kustomization_is_judged_failed_then_waiting_then_ready() {
        let mut n = Native::new(FluxKind::Kustomization, &serde_json::json!({}));
        n.revision = Some("v1@sha256:ab".into());
        let (ready, error, waiting) = judge(&n, &outcome(Some("1 of 2 objects not applied"), Some("x")));
        assert_eq!(ready.reason, Reason::ReconciliationFailed);
        assert_eq!(error.unwrap().reason, Reason::ReconciliationFailed);
        assert!(!waiting, "a failure is not waited on");
        let (ready, error, waiting) = judge(&n, &outcome(None, Some("Deployment a: 0/1 ready")));
        assert_eq!((ready.status, ready.reason), (Status::False, Reason::Progressing));
        assert!(error.is_none() && waiting);
        let (ready, _, waiting) = judge(&n, &outcome(None, None));
        assert_eq!(
            ready,
            Cond::new(
                Status::True,
                Reason::ReconciliationSucceeded,
                "Applied revision: v1@sha256:ab"
            )
        );
        assert!(!waiting);
    }

    #[test]
    fn reasons_are_spelled_as_flux_and_the_policy_spell_them() {
        assert_eq!(Reason::DeniedByPolicy.as_str(), DENIED_REASON);
        assert_eq!(
            Reason::Fetch("OCIArtifactPullFailed").as_str(),
            "OCIArtifactPullFailed"
        );
        assert_eq!(
            Reason::ReconciliationSucceeded.as_str(),
            "ReconciliationSucceeded"
        );
        let mut n = Native::new(
            FluxKind::OciRepository,
            &serde_json::json!({"metadata": {"name": "app"}}),
        );
        assert_eq!(n.id, "default/app");
        n.fail(Failure::new(Reason::ArtifactFailed, "no artifact"));
        assert_eq!(n.ready.status, Status::False);
        assert_eq!(n.error.as_ref().map(|f| f.reason), Some(Reason::ArtifactFailed));
    }
}
