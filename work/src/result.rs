//! What a reconcile found out about one manifest: the input of its status, written by the
//! apply steps and, for the entries it handles, by the engine's expander.

use std::sync::Arc;

use serde_json::Value;

use super::applier::Action;
use super::failure::ManifestFailure;
use super::manifestwork::{Condition, FeedbackRule, FeedbackValue, ManifestResourceMeta, UpdateStrategyType};

/// What a reconcile found out about one manifest, the input of its status.
#[derive(Debug, Default)]
pub struct ManifestResult {
    /// Identity as far as it is known (all of it once the kind resolved).
    pub meta: ManifestResourceMeta,
    /// Why it was not applied.
    pub error: Option<ManifestFailure>,
    /// Remarks appended to the Applied message (a defaulted namespace, an unusable path).
    pub notes: Vec<String>,
    /// The object as it is after the apply (or as cached while a flap hold lasts).
    pub live: Option<Arc<Value>>,
    /// Feedback rules of its manifest config.
    pub rules: Vec<FeedbackRule>,
    /// Rule problems found before apply (reported with the evaluation's own).
    pub rule_errors: Vec<String>,
    pub strategy: UpdateStrategyType,
    pub action: Option<Action>,
    /// Set while its drift corrections are held back: the message of the Degraded condition.
    pub flapping: Option<String>,
    /// Drift corrections so far (from the work's history).
    pub drift_corrections: i64,
    /// For an entry the engine's expander handles itself (see `expand`): whether it has
    /// something to serve, which stands for the live object it does not have.
    pub handled_available: Option<bool>,
    /// Conditions beyond Applied and Available (an expander's, such as Flux's `Ready`).
    pub extra_conditions: Vec<Condition>,
    /// Feedback values beyond the rules' (an expander's, such as Flux's revisions and counts).
    pub extra_values: Vec<FeedbackValue>,
}
