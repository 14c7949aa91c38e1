//! Keeps a work's status within the size a hub accepts: long texts are truncated first, then
//! the manifest list is summarised, so a status is never dropped for its size.
//!
//! A gRPC hub refuses messages over 4 MiB and a Kubernetes hub's etcd requests over 1.5 MiB; a
//! status refused for its size would leave the hub with nothing, so the agent shrinks it instead.

use super::conditions::types;
use super::manifestwork::{Condition, ManifestCondition, ManifestWorkStatus};

/// Default status size limit in bytes of JSON: under both hubs' limits with room for the
/// event's other fields.
pub(crate) const DEFAULT_MAX_STATUS_BYTES: usize = 1024 * 1024;

/// Longest condition message or feedback string kept once a status is over its limit.
const SHRUNK_TEXT: usize = 1024;

/// Reason of the work condition that says the status was summarised.
pub(crate) const SUMMARISED_REASON: &str = "StatusSummarised";

/// `status` as it is when its JSON fits in `max` bytes; else with texts truncated; else with
/// only the manifests not applied listed (and, if even that is too large, none), and a
/// `StatusSummarised` note on the work's `Applied` condition saying how many were left out.
pub(crate) fn fit(mut status: ManifestWorkStatus, max: usize) -> ManifestWorkStatus {
    if size(&status) <= max {
        return status;
    }
    shrink_texts(&mut status);
    if size(&status) <= max {
        return status;
    }
    let total = status.resource_status.manifests.len();
    status.resource_status.manifests.retain(|m| !applied(m));
    if size(&status) > max {
        status.resource_status.manifests.clear();
    }
    let listed = status.resource_status.manifests.len();
    note_summary(&mut status.conditions, listed, total, max);
    status
}

/// Bytes of the status's JSON.
fn size(status: &ManifestWorkStatus) -> usize {
    serde_json::to_vec(status).map(|v| v.len()).unwrap_or(usize::MAX)
}

/// Truncates every condition message and feedback string to [`SHRUNK_TEXT`].
fn shrink_texts(status: &mut ManifestWorkStatus) {
    for c in &mut status.conditions {
        shrink(&mut c.message);
    }
    for m in &mut status.resource_status.manifests {
        for c in &mut m.conditions {
            shrink(&mut c.message);
        }
        for v in &mut m.status_feedback.values {
            if let Some(s) = v.field_value.string.as_mut() {
                shrink(s);
            }
        }
    }
}

/// Cuts `s` to [`SHRUNK_TEXT`] in place.
fn shrink(s: &mut String) {
    *s = truncate(std::mem::take(s), SHRUNK_TEXT);
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn applied(m: &ManifestCondition) -> bool {
    m.conditions
        .iter()
        .any(|c| c.type_ == types::APPLIED && c.status == "True")
}

/// Appends the summary to the work's Applied condition message (the condition hubs show).
fn note_summary(conditions: &mut [Condition], listed: usize, total: usize, max: usize) {
    let note = format!(
        "{SUMMARISED_REASON}: the full status is over {max} bytes; {listed} of {total} manifests listed (those not applied)"
    );
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == types::APPLIED) {
        c.message = if c.message.is_empty() {
            note
        } else {
            format!("{}; {note}", c.message)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{FALSE, TRUE, cond};
    use crate::manifestwork::{FeedbackValue, FieldValue, ManifestResourceMeta, ValueType};

    fn manifest(ordinal: i32, applied: bool, feedback: &str) -> ManifestCondition {
        let status = if applied { TRUE } else { FALSE };
        ManifestCondition {
            resource_meta: ManifestResourceMeta {
                ordinal,
                ..Default::default()
            },
            status_feedback: crate::manifestwork::StatusFeedbackResult {
                values: vec![FeedbackValue {
                    name: "v".into(),
                    field_value: FieldValue {
                        type_: ValueType::String,
                        string: Some(feedback.to_string()),
                        ..Default::default()
                    },
                }],
            },
            conditions: vec![cond(types::APPLIED, status, "R", "m", 1)],
        }
    }

    fn status(manifests: Vec<ManifestCondition>) -> ManifestWorkStatus {
        let mut s = ManifestWorkStatus {
            conditions: vec![cond(types::APPLIED, FALSE, "R", "some failed", 1)],
            ..Default::default()
        };
        s.resource_status.manifests = manifests;
        s
    }

    #[test]
    fn a_status_that_fits_is_unchanged() {
        let s = status(vec![manifest(0, true, "x")]);
        assert_eq!(fit(s.clone(), DEFAULT_MAX_STATUS_BYTES), s);
    }

    #[test]
    fn long_texts_are_truncated_first() {
        let s = status(vec![manifest(0, true, &"x".repeat(100_000))]);
        let fitted = fit(s, 10_000);
        let v = fitted.resource_status.manifests[0].status_feedback.values[0]
            .field_value
            .string
            .as_deref()
            .unwrap();
        assert!(v.len() <= SHRUNK_TEXT + 3, "{}", v.len());
        assert_eq!(fitted.resource_status.manifests.len(), 1, "nothing left out yet");
    }

    #[test]
    fn a_status_still_too_large_lists_only_what_is_not_applied_and_says_so() {
        let manifests = (0..2000).map(|i| manifest(i, i % 100 != 0, "value")).collect();
        let fitted = fit(status(manifests), 20_000);
        assert!(size(&fitted) <= 20_000, "{}", size(&fitted));
        assert_eq!(fitted.resource_status.manifests.len(), 20);
        assert!(fitted.resource_status.manifests.iter().all(|m| !applied(m)));
        let c = &fitted.conditions[0];
        assert!(c.message.contains("20 of 2000 manifests"), "{}", c.message);
    }

    #[test]
    fn when_even_the_failures_do_not_fit_none_are_listed_but_the_status_remains() {
        let manifests = (0..5000).map(|i| manifest(i, false, "value")).collect();
        let fitted = fit(status(manifests), 4_000);
        assert!(fitted.resource_status.manifests.is_empty());
        assert!(
            fitted.conditions[0].message.contains("0 of 5000"),
            "{}",
            fitted.conditions[0].message
        );
    }
}
