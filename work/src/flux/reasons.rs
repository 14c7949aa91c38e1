//! What a Flux entry's conditions say, as typed values: a condition's status, Flux's reasons as
//! an enum, a condition, and why an entry failed.

use spokelet_flux::objects::SpecError;

use crate::conditions::{FALSE, TRUE, UNKNOWN};
use crate::policy::DENIED_REASON;

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::True => TRUE,
            Status::False => FALSE,
            Status::Unknown => UNKNOWN,
        }
    }
}

/// Why a Flux entry is as it is: Flux's reasons where Flux has one, spokelet's own otherwise.
/// Hubs and alerts match on the spelling ([`Reason::as_str`]), so it never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Not decided yet: the first reconcile, or health checks still waiting.
    Progressing,
    /// A source holds its artifact (and verified it, with `verify`).
    Succeeded,
    /// `suspend: true`: nothing is fetched, applied or pruned.
    Suspended,
    /// A `dependsOn` Kustomization of the same work is not ready.
    DependencyNotReady,
    /// The Kustomization's source has no artifact (or is not part of the work).
    ArtifactFailed,
    /// The build, or reading its variables, failed.
    BuildFailed,
    /// The artifact's kustomization uses a field the builder does not implement.
    UnsupportedKustomizeField,
    /// The work's identity may not read a variable's Secret or ConfigMap.
    Forbidden,
    /// Some built objects were not applied.
    ReconciliationFailed,
    /// Every built object is applied (and healthy, where checked).
    ReconciliationSucceeded,
    /// The Flux object itself is not valid.
    InvalidSpec,
    /// The Flux object sets a field spokelet does not implement.
    UnsupportedField,
    /// The agent's artifact cache could not be opened.
    ArtifactCacheUnavailable,
    /// The write policy refuses the object or what it reads.
    DeniedByPolicy,
    /// A fetch failed: the fetcher's own reason (Flux's, such as `OCIArtifactPullFailed`).
    Fetch(&'static str),
}

impl Reason {
    /// The condition reason as written.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Progressing => "Progressing",
            Reason::Succeeded => "Succeeded",
            Reason::Suspended => "Suspended",
            Reason::DependencyNotReady => "DependencyNotReady",
            Reason::ArtifactFailed => "ArtifactFailed",
            Reason::BuildFailed => "BuildFailed",
            Reason::UnsupportedKustomizeField => "UnsupportedKustomizeField",
            Reason::Forbidden => "Forbidden",
            Reason::ReconciliationFailed => "ReconciliationFailed",
            Reason::ReconciliationSucceeded => "ReconciliationSucceeded",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::UnsupportedField => "UnsupportedField",
            Reason::ArtifactCacheUnavailable => "ArtifactCacheUnavailable",
            Reason::DeniedByPolicy => DENIED_REASON,
            Reason::Fetch(reason) => reason,
        }
    }

    /// The reason of a Flux object that cannot be read.
    pub(crate) fn of_spec(e: &SpecError) -> Reason {
        match e {
            SpecError::Unsupported { .. } => Reason::UnsupportedField,
            SpecError::Invalid { .. } => Reason::InvalidSpec,
        }
    }
}

/// A condition of a Flux entry (`Ready`, `SourceVerified`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cond {
    pub(crate) status: Status,
    pub(crate) reason: Reason,
    pub(crate) message: String,
}

impl Cond {
    pub(crate) fn new(status: Status, reason: Reason, message: impl Into<String>) -> Cond {
        Cond {
            status,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn is_true(&self) -> bool {
        self.status == Status::True
    }
}

/// Why a Flux entry failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) reason: Reason,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(reason: Reason, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}
