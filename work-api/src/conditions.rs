//! Condition bookkeeping (metav1.Condition semantics) and the status hash.

use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

use super::manifestwork::{Condition, ManifestWorkStatus};

/// Work and manifest condition types.
pub mod types {
    /// All manifests were applied.
    pub const APPLIED: &str = "Applied";
    /// All applied objects exist on the spoke.
    pub const AVAILABLE: &str = "Available";
    /// The agent is still working towards the desired state.
    pub const PROGRESSING: &str = "Progressing";
    /// Something keeps the work from its desired state.
    pub const DEGRADED: &str = "Degraded";
    /// Deletion of the work's objects is in progress.
    pub const DELETING: &str = "Deleting";
    /// The work's objects are cleaned up (last status of a deleted work).
    pub const DELETED: &str = "Deleted";
    /// Status feedback could be read for a manifest.
    pub const FEEDBACK_SYNCED: &str = "StatusFeedbackSynced";
}

/// The values of a condition's `status`.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Builds a condition with no transition time; `merge_conditions` fills it.
pub fn cond(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        observed_generation: generation,
        last_transition_time: String::new(),
        reason: reason.to_string(),
        message: message.into(),
    }
}

/// Returns `new` with each condition's lastTransitionTime taken from `old` when its status did not
/// change, and `now` when it did (or it is new). This keeps the status, and therefore its hash,
/// unchanged when nothing real changed.
pub fn merge_conditions(old: &[Condition], mut new: Vec<Condition>, now: &str) -> Vec<Condition> {
    for c in &mut new {
        match old.iter().find(|o| o.type_ == c.type_) {
            Some(o) if o.status == c.status && !o.last_transition_time.is_empty() => {
                c.last_transition_time = o.last_transition_time.clone();
            }
            _ => c.last_transition_time = now.to_string(),
        }
    }
    new
}

pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Hex SHA-256 of the JSON of a work status: the `statushash` the hub transport sends.
/// Serialisation is deterministic (struct field order, lists in ordinal/rule order, no maps).
pub fn status_hash(status: &ManifestWorkStatus) -> String {
    let bytes = serde_json::to_vec(status).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Now as RFC 3339 with second precision (metav1.Time's wire format).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifestwork::ManifestWorkStatus;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn transition_time_kept_when_status_same() {
        let old = merge_conditions(&[], vec![cond("Applied", TRUE, "A", "m", 1)], "t1");
        assert_eq!(old[0].last_transition_time, "t1");
        let same = merge_conditions(&old, vec![cond("Applied", TRUE, "A", "other msg", 2)], "t2");
        assert_eq!(same[0].last_transition_time, "t1");
        let flipped = merge_conditions(&same, vec![cond("Applied", FALSE, "B", "m", 2)], "t3");
        assert_eq!(flipped[0].last_transition_time, "t3");
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let mut s = ManifestWorkStatus {
            conditions: merge_conditions(&[], vec![cond("Applied", TRUE, "A", "m", 1)], "t"),
            ..Default::default()
        };
        let h1 = status_hash(&s);
        assert_eq!(h1, status_hash(&s.clone()));
        assert_eq!(h1.len(), 64);
        s.conditions[0].message = "changed".into();
        assert_ne!(h1, status_hash(&s));
    }
}
