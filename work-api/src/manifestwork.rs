//! The ManifestWork API (`work.open-cluster-management.io/v1`) as the hub sends it, and the
//! status we send back. Field names follow the wire contract exactly (camelCase JSON).

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// API group of ManifestWork and AppliedManifestWork.
pub const GROUP: &str = "work.open-cluster-management.io";
/// API version of ManifestWork and AppliedManifestWork.
pub const VERSION: &str = "v1";
/// Field manager used for server-side apply when a work does not name one.
pub const DEFAULT_FIELD_MANAGER: &str = "work-agent";

/// Desired state of a ManifestWork: the objects to apply and how.
///
/// This and the other wire types here mirror OCM's `work.open-cluster-management.io/v1` API
/// field for field; a field is documented only where a default or this agent's handling of it
/// needs saying.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "work.open-cluster-management.io",
    version = "v1",
    kind = "ManifestWork",
    namespaced,
    status = "ManifestWorkStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkSpec {
    /// The objects to apply. Defaulted so a work with no workload is valid (it applies nothing).
    #[serde(default)]
    pub workload: ManifestsTemplate,
    /// What to do with applied objects when the work is deleted; absent means Foreground.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_option: Option<DeleteOption>,
    /// Per-resource settings (update strategy, feedback rules), matched by resource identifier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest_configs: Vec<ManifestConfigOption>,
    /// Identity to apply as. Parsed so round-trips are lossless; impersonation is not done yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ManifestWorkExecutor>,
}

/// OCM's wrapper around the manifest list (`spec.workload`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestsTemplate {
    /// Whole Kubernetes objects, kept as raw JSON because they can be of any kind.
    #[serde(default)]
    pub manifests: Vec<Manifest>,
}

impl ManifestsTemplate {
    /// Size of the workload as JSON (`{"manifests":[...]}`), computed from the manifests' texts
    /// without serializing anything.
    pub fn json_len(&self) -> usize {
        self.manifests.iter().map(|m| m.as_json().len()).sum::<usize>()
            + self.manifests.len().saturating_sub(1) // the commas between manifests
            + r#"{"manifests":[]}"#.len()
    }
}

/// One raw Kubernetes object inside a work (OCM inlines a RawExtension, so it is the object itself).
///
/// Held as compact JSON text, not as a parsed `serde_json::Value`: a parsed tree costs several
/// times the bytes of its text, and the agent keeps every work it applies for as long as the
/// work exists, so with a thousand works the trees were the largest thing in memory. The text is
/// parsed only when the work is reconciled. Object keys are sorted (serde_json's map is ordered),
/// so equal objects have equal text and `==` compares content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest(Box<str>);

impl Manifest {
    /// The object, parsed afresh on each call.
    pub fn value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The compact JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

impl From<serde_json::Value> for Manifest {
    fn from(v: serde_json::Value) -> Self {
        // Serializing a Value cannot fail (its keys are strings); "null" is the unreachable fallback.
        Manifest(
            serde_json::to_string(&v)
                .unwrap_or_else(|_| "null".into())
                .into_boxed_str(),
        )
    }
}

impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Manifest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a Value, so YAML (file source) and JSON (hubs) both work.
        serde_json::Value::deserialize(deserializer).map(Manifest::from)
    }
}

/// How a work's objects are treated when the work is deleted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeleteOption {
    /// Foreground (default), Orphan or SelectivelyOrphan.
    #[serde(default)]
    pub propagation_policy: DeletePropagationPolicy,
    /// The objects to leave behind under SelectivelyOrphan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selectively_orphans: Option<SelectivelyOrphan>,
    /// Delete the work this long after it completes. Carried for the hub; the engine does not act on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Deletion policy values, spelled as on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletePropagationPolicy {
    /// Delete everything the work applied and wait until it is gone.
    #[default]
    Foreground,
    /// Leave everything on the spoke.
    Orphan,
    /// Leave the objects matching the orphaning rules, delete the rest.
    SelectivelyOrphan,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SelectivelyOrphan {
    /// Objects matching any rule are left behind.
    #[serde(default)]
    pub orphaning_rules: Vec<OrphaningRule>,
}

/// Identifies one object to orphan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OrphaningRule {
    /// API group ("" for core).
    #[serde(default)]
    pub group: String,
    /// Plural resource name, e.g. `configmaps`.
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub name: String,
    /// Object namespace ("" for cluster-scoped).
    #[serde(default)]
    pub namespace: String,
}

/// Settings for the manifests a resource identifier matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestConfigOption {
    pub resource_identifier: ResourceIdentifier,
    /// Status values to read back from the applied object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feedback_rules: Vec<FeedbackRule>,
    /// How to write the object; absent means Update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<UpdateStrategy>,
    /// Custom condition rules. Carried for round-trips; CEL is not evaluated by this agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub condition_rules: Vec<ConditionRule>,
    /// Poll or Watch. Feedback here always comes from the watch cache when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_scrape_type: Option<String>,
}

/// Identifies a manifest by group, plural resource, name and namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ResourceIdentifier {
    /// API group ("" for core).
    #[serde(default)]
    pub group: String,
    /// Plural resource name.
    #[serde(default)]
    pub resource: String,
    /// Object name; `*` matches any.
    #[serde(default)]
    pub name: String,
    /// Object namespace; `*` matches any, "" means cluster-scoped.
    #[serde(default)]
    pub namespace: String,
}

/// How an object is written to the spoke.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// The strategy; absent means Update.
    #[serde(rename = "type", default)]
    pub type_: UpdateStrategyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_side_apply: Option<ServerSideApplyConfig>,
}

/// Update strategy values, spelled as on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateStrategyType {
    /// Create, or replace the fields the manifest sets (the default).
    #[default]
    Update,
    /// Create if absent; never touch an existing object.
    CreateOnly,
    /// Server-side apply with a field manager.
    ServerSideApply,
    /// Never write; only read status feedback.
    ReadOnly,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSideApplyConfig {
    /// Take fields over from other managers instead of failing with a conflict.
    #[serde(default)]
    pub force: bool,
    /// Field manager name; empty means `work-agent`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field_manager: String,
    /// Fields the agent must not overwrite on the spoke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_fields: Vec<IgnoreField>,
}

/// A set of JSON paths the agent leaves alone under a condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreField {
    /// When to ignore the paths; default OnSpokePresent.
    #[serde(default)]
    pub condition: IgnoreFieldsCondition,
    /// JSON paths such as `.spec.replicas`.
    #[serde(default)]
    pub json_paths: Vec<String>,
}

/// When ignoreFields apply.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IgnoreFieldsCondition {
    /// Once the object exists on the spoke, never write these fields again.
    #[default]
    OnSpokePresent,
    /// Do not revert spoke-side changes of these fields, but do apply hub-side changes.
    OnSpokeChange,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRule {
    #[serde(rename = "type")]
    pub type_: FeedbackType,
    /// The paths to read for JSONPaths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json_paths: Vec<JsonPath>,
}

/// Feedback rule kinds, spelled as on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FeedbackType {
    /// The per-kind well-known values (Deployment ReadyReplicas, ...).
    #[default]
    WellKnownStatus,
    /// User-given JSON paths.
    #[serde(rename = "JSONPaths")]
    JsonPaths,
}

/// One named JSON path to read.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JsonPath {
    /// The feedback value name.
    pub name: String,
    /// Only read when the object has this version; empty means any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Kubernetes JSONPath, e.g. `.status.readyReplicas`.
    pub path: String,
}

/// A custom condition rule (carried, not evaluated).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionRule {
    /// Condition type to set.
    #[serde(default)]
    pub condition: String,
    /// WellKnownConditions or CEL.
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cel_expressions: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// CEL expression producing the message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message_expression: String,
}

/// Who applies the manifests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkExecutor {
    /// The subject to impersonate.
    #[serde(default)]
    pub subject: ManifestWorkExecutorSubject,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkExecutorSubject {
    /// Only `ServiceAccount` is defined.
    #[serde(rename = "type", default)]
    pub type_: String,
    /// The service account when type is ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ManifestWorkSubjectServiceAccount>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkSubjectServiceAccount {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

/// A metav1.Condition. Times are RFC 3339 strings so hashing the status is byte-stable.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Applied`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// The work generation this condition describes (omitted when 0, as metav1 does).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed_generation: i64,
    /// When status last changed (not when the message changed).
    #[serde(default)]
    pub last_transition_time: String,
    /// CamelCase machine-readable reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Status of a work as the agent reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWorkStatus {
    /// Work-level conditions: Applied, Available, Progressing, Degraded, Deleting, Deleted.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Per-manifest status, one entry per manifest in ordinal order.
    #[serde(default)]
    pub resource_status: ManifestResourceStatus,
}

/// Wrapper OCM uses around the per-manifest list.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestResourceStatus {
    #[serde(default)]
    pub manifests: Vec<ManifestCondition>,
}

/// Status of one manifest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestCondition {
    pub resource_meta: ManifestResourceMeta,
    #[serde(default)]
    pub status_feedback: StatusFeedbackResult,
    /// Applied, Available, StatusFeedbackSynced.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Identity of a manifest's object. No omitempty on the wire, so every field is always written.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestResourceMeta {
    /// Index of the manifest in `workload.manifests`.
    pub ordinal: i32,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
    /// Plural resource (empty when discovery could not resolve the kind).
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

/// Feedback values of one manifest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusFeedbackResult {
    /// Values in rule order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<FeedbackValue>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackValue {
    /// Name from the rule (or the well-known name).
    pub name: String,
    pub field_value: FieldValue,
}

/// A typed feedback value: exactly one of the optional fields is set, matching `type_`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FieldValue {
    /// Which field is set.
    #[serde(rename = "type")]
    pub type_: ValueType,
    /// Set for Integer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integer: Option<i64>,
    /// Set for String.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    /// Set for Boolean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boolean: Option<bool>,
    /// Set for JsonRaw (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_raw: Option<String>,
}

/// Feedback value types, spelled as on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueType {
    /// 64-bit integer.
    #[default]
    Integer,
    String,
    Boolean,
    /// Raw JSON of an object or list.
    JsonRaw,
}

/// The gRPC (CloudEvents) payload of a work spec. Note the wire spelling `executer`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestBundle {
    #[serde(default)]
    pub manifests: Vec<Manifest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_option: Option<DeleteOption>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest_configs: Vec<ManifestConfigOption>,
    /// Executor, spelled `executer` on this wire.
    #[serde(rename = "executer", default, skip_serializing_if = "Option::is_none")]
    pub executer: Option<ManifestWorkExecutor>,
}

/// The gRPC (CloudEvents) payload of a work status: the resource list is flattened.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestBundleStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub resource_status: Vec<ManifestCondition>,
}

impl From<&ManifestWorkStatus> for ManifestBundleStatus {
    fn from(s: &ManifestWorkStatus) -> Self {
        ManifestBundleStatus {
            conditions: s.conditions.clone(),
            resource_status: s.resource_status.manifests.clone(),
        }
    }
}

impl ManifestBundle {
    /// The work spec this bundle carries; the transport supplies the work's metadata.
    pub fn into_spec(self) -> ManifestWorkSpec {
        ManifestWorkSpec {
            workload: ManifestsTemplate {
                manifests: self.manifests,
            },
            delete_option: self.delete_option,
            manifest_configs: self.manifest_configs,
            executor: self.executer,
        }
    }
}

impl From<&ManifestWorkSpec> for ManifestBundle {
    fn from(s: &ManifestWorkSpec) -> Self {
        ManifestBundle {
            manifests: s.workload.manifests.clone(),
            delete_option: s.delete_option.clone(),
            manifest_configs: s.manifest_configs.clone(),
            executer: s.executor.clone(),
        }
    }
}

/// Spec of the spoke-side record of a work.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "work.open-cluster-management.io",
    version = "v1",
    kind = "AppliedManifestWork",
    status = "AppliedManifestWorkStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct AppliedManifestWorkSpec {
    /// Hex SHA-256 of the hub address, so works of different hubs never collide.
    #[serde(default)]
    pub hub_hash: String,
    /// The agent that applied the work.
    #[serde(default, rename = "agentID")]
    pub agent_id: String,
    /// Name of the ManifestWork on the hub.
    #[serde(default)]
    pub manifest_work_name: String,
}

/// Status of an AppliedManifestWork: everything needed to finish or undo the work after a restart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedManifestWorkStatus {
    /// What the work applied (or is about to apply: entries with an empty uid are intents).
    #[serde(default)]
    pub applied_resources: Vec<AppliedManifestResourceMeta>,
    /// When eviction of the work's resources started, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_start_time: Option<String>,
}

/// One applied object. Empty strings are omitted on the wire (as OCM's omitempty does): the
/// API server rejects them as nulls in the structural schema of a merge-patched list.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct AppliedManifestResourceMeta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Plural resource.
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub name: String,
    /// Object namespace ("" for cluster-scoped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// API version it was applied with.
    #[serde(default)]
    pub version: String,
    /// UID at apply time; empty while the apply is in flight (an intent recorded ahead of the write).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// Labels are BTreeMaps in k8s-openapi; re-exported so callers need not import it.
pub type Labels = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_uses_executer_spelling() {
        let b = ManifestBundle {
            executer: Some(ManifestWorkExecutor::default()),
            ..Default::default()
        };
        let j = serde_json::to_value(&b).unwrap();
        assert!(j.get("executer").is_some());
        assert!(j.get("executor").is_none());
    }

    #[test]
    fn parses_full_work() {
        let y = r#"
apiVersion: work.open-cluster-management.io/v1
kind: ManifestWork
metadata: {name: w, namespace: c1}
spec:
  workload:
    manifests:
      - {apiVersion: v1, kind: ConfigMap, metadata: {name: a, namespace: default}}
  deleteOption:
    propagationPolicy: SelectivelyOrphan
    selectivelyOrphans:
      orphaningRules: [{group: "", resource: configmaps, name: a, namespace: default}]
  manifestConfigs:
    - resourceIdentifier: {group: apps, resource: deployments, name: d, namespace: default}
      updateStrategy:
        type: ServerSideApply
        serverSideApply:
          force: true
          ignoreFields: [{condition: OnSpokeChange, jsonPaths: [".spec.replicas"]}]
      feedbackRules:
        - type: JSONPaths
          jsonPaths: [{name: ready, path: .status.readyReplicas}]
"#;
        let w: ManifestWork = serde_yaml::from_str(y).unwrap();
        let cfg = &w.spec.manifest_configs[0];
        let ssa = cfg.update_strategy.as_ref().unwrap();
        assert_eq!(ssa.type_, UpdateStrategyType::ServerSideApply);
        assert_eq!(
            ssa.server_side_apply.as_ref().unwrap().ignore_fields[0].condition,
            IgnoreFieldsCondition::OnSpokeChange
        );
        assert_eq!(cfg.feedback_rules[0].type_, FeedbackType::JsonPaths);
        assert_eq!(
            w.spec.delete_option.unwrap().propagation_policy,
            DeletePropagationPolicy::SelectivelyOrphan
        );
        let back = serde_json::to_value(&w.spec.manifest_configs[0]).unwrap();
        assert_eq!(back["feedbackRules"][0]["type"], "JSONPaths");
        assert_eq!(
            back["feedbackRules"][0]["jsonPaths"][0]["path"],
            ".status.readyReplicas"
        );
    }

    #[test]
    fn status_wire_names() {
        let s = ManifestWorkStatus {
            conditions: vec![Condition {
                type_: "Applied".into(),
                status: "True".into(),
                observed_generation: 2,
                ..Default::default()
            }],
            resource_status: ManifestResourceStatus {
                manifests: vec![ManifestCondition {
                    resource_meta: ManifestResourceMeta {
                        ordinal: 0,
                        ..Default::default()
                    },
                    status_feedback: StatusFeedbackResult {
                        values: vec![FeedbackValue {
                            name: "x".into(),
                            field_value: FieldValue {
                                type_: ValueType::JsonRaw,
                                json_raw: Some("{}".into()),
                                ..Default::default()
                            },
                        }],
                    },
                    conditions: vec![],
                }],
            },
        };
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["conditions"][0]["observedGeneration"], 2);
        let m = &j["resourceStatus"]["manifests"][0];
        assert_eq!(m["resourceMeta"]["group"], "");
        assert_eq!(m["statusFeedback"]["values"][0]["fieldValue"]["type"], "JsonRaw");
        assert_eq!(m["statusFeedback"]["values"][0]["fieldValue"]["jsonRaw"], "{}");
        let b = serde_json::to_value(ManifestBundleStatus::from(&s)).unwrap();
        assert!(b["resourceStatus"].is_array());
    }

    #[test]
    fn manifest_keeps_content_and_sizes_match_serialization() {
        let a = serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "a"}, "data": {"k": "ü"}});
        let b = serde_json::json!({"apiVersion": "v1", "metadata": {"name": "a"}, "kind": "ConfigMap", "data": {"k": "ü"}});
        // Same object, keys in another order: equal manifests, and the content survives.
        assert_eq!(Manifest::from(a.clone()), Manifest::from(b));
        assert_eq!(Manifest::from(a.clone()).value().unwrap(), a);
        let from_yaml: Manifest =
            serde_yaml::from_str("{apiVersion: v1, kind: ConfigMap, metadata: {name: a}, data: {k: ü}}")
                .unwrap();
        assert_eq!(from_yaml, Manifest::from(a.clone()));
        for n in 0..3 {
            let t = ManifestsTemplate {
                manifests: (0..n).map(|_| Manifest::from(a.clone())).collect(),
            };
            assert_eq!(
                t.json_len(),
                serde_json::to_vec(&t).unwrap().len(),
                "{n} manifests"
            );
        }
    }

    #[test]
    fn applied_work_spec_agent_id_spelling() {
        let j = serde_json::to_value(AppliedManifestWorkSpec {
            hub_hash: "h".into(),
            agent_id: "a".into(),
            manifest_work_name: "w".into(),
        })
        .unwrap();
        assert_eq!(j["agentID"], "a");
        assert_eq!(j["hubHash"], "h");
        assert_eq!(j["manifestWorkName"], "w");
    }
}
