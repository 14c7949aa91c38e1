//! Why a manifest, or a whole work, was not applied: typed, each knowing the condition reason
//! it is reported under, so status never carries a reason string typed by hand.

use super::applied_work::AppliedWorkError;
use super::applier::ApplyError;
use super::claims::ClaimConflict;
use super::discovery::DiscoveryError;
use super::executor::ExecutorError;
use super::policy::{DENIED_REASON, Denied};
use super::validate::ValidateError;

/// One manifest's failure; reported on its `Applied=False` condition.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFailure {
    /// The manifest is malformed, or names an object an earlier manifest names too.
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    /// Another work applies the same object with different content.
    #[error(transparent)]
    Conflict(#[from] ClaimConflict),
    /// Its kind is not served, or discovery failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The record could not take the intent to apply it, so it was not written (a crash after
    /// an unrecorded write would leave an object nobody prunes). One message for the whole tier.
    #[error("cannot record intent before applying: {0}")]
    Intent(String),
    /// The API server refused the write, or the request failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A CRD was applied but not Established within `crd_wait` (60 s by default).
    #[error("{0}")]
    CrdNotEstablished(#[source] AppliedWorkError),
    /// The spoke's policy does not let hub works write this object.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// An entry the engine's expander handles itself failed (for Flux: a fetch, verification,
    /// build, or its objects); the reason is the expander's.
    #[error("{message}")]
    Expansion { reason: &'static str, message: String },
}

impl ManifestFailure {
    /// The condition reason (CamelCase, stable: hubs and alerts match on it).
    pub fn reason(&self) -> &str {
        match self {
            ManifestFailure::Invalid(ValidateError::Duplicate { .. }) => "DuplicateManifest",
            ManifestFailure::Invalid(_) => "InvalidManifest",
            ManifestFailure::Conflict(_) => "ConflictingWork",
            ManifestFailure::Discovery(DiscoveryError::UnknownKind { .. }) => "UnknownKind",
            ManifestFailure::Discovery(_) => "DiscoveryFailed",
            ManifestFailure::Intent(_) => "AppliedManifestWorkFailed",
            ManifestFailure::Apply(e) => e.reason(),
            ManifestFailure::CrdNotEstablished(_) => "CRDNotEstablished",
            ManifestFailure::Denied(_) => DENIED_REASON,
            ManifestFailure::Expansion { reason, .. } => reason,
        }
    }
}

/// A failure of the whole work: nothing of it was applied this time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkFailure {
    /// Larger than `--max-work-bytes` (JSON bytes of its manifests) or `--max-manifests`.
    #[error(transparent)]
    TooLarge(ValidateError),
    /// The record could not be read or created.
    #[error("{0}")]
    Record(#[source] AppliedWorkError),
    /// The work's executor cannot be acted as.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// The record could not take the intent to apply the work's objects.
    #[error("cannot record the resources about to be applied: {0}")]
    Intent(#[source] AppliedWorkError),
}

impl WorkFailure {
    /// The condition reason; as stable as [`ManifestFailure::reason`]'s.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            WorkFailure::TooLarge(ValidateError::TooManyManifests { .. }) => "TooManyManifests",
            WorkFailure::TooLarge(ValidateError::TooManyJsonPaths { .. }) => "TooManyJsonPaths",
            WorkFailure::TooLarge(ValidateError::TooDeep { .. }) => "WorkTooDeep",
            WorkFailure::TooLarge(_) => "WorkTooLarge",
            WorkFailure::Record(_) | WorkFailure::Intent(_) => "AppliedManifestWorkFailed",
            WorkFailure::Executor(_) => "ExecutorUnusable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_the_cause() {
        let dup = ManifestFailure::Invalid(ValidateError::Duplicate {
            ordinal: 1,
            first: 0,
            key: Default::default(),
        });
        assert_eq!(dup.reason(), "DuplicateManifest");
        assert_eq!(
            ManifestFailure::Invalid(ValidateError::NotObject).reason(),
            "InvalidManifest"
        );
        let unknown = DiscoveryError::UnknownKind {
            api_version: "x/v1".into(),
            kind: "K".into(),
        };
        assert_eq!(ManifestFailure::Discovery(unknown).reason(), "UnknownKind");
        let rejected = ApplyError::Rejected {
            code: 422,
            reason: "Invalid".into(),
            message: "field is immutable".into(),
        };
        let f = ManifestFailure::Apply(rejected);
        assert_eq!(
            (f.reason(), f.to_string().as_str()),
            ("Invalid", "field is immutable")
        );
        let big = WorkFailure::TooLarge(ValidateError::TooLarge { size: 9, limit: 1 });
        assert_eq!(big.reason(), "WorkTooLarge");
        assert!(big.to_string().contains("byte limit"));
    }
}
