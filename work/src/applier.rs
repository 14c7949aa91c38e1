//! Writes one manifest to the spoke with its update strategy, skipping writes that would change
//! nothing (compared against the drift watcher's cache, so an unchanged re-apply costs no request).

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::Value;

use super::discovery::Resolved;
use super::drift::{DriftWatcher, Live};
use super::jsonpath::Step;
use super::manifestwork::{IgnoreFieldsCondition, UpdateStrategyType};
use super::object::{
    ObjKey, SPEC_HASH_ANNOTATION, desired_is_subset, get_path, has_owner, owner_refs, remove_path, set_path,
};

/// How many times an Update retries after a resourceVersion conflict before reporting it.
const CONFLICT_RETRIES: usize = 3;

/// Apply failures, carrying the API server's own message.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The API server refused the write (invalid, immutable field, conflict, forbidden ...).
    #[error("{message}")]
    Rejected {
        code: u16,
        /// Kubernetes reason (Invalid, Conflict, ...).
        reason: String,
        message: String,
    },
    /// Transport or decoding failure.
    #[error("{0}")]
    Client(String),
    /// ReadOnly object that does not exist.
    #[error("object {0} not found on the spoke")]
    NotFound(String),
}

impl From<kube::Error> for ApplyError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => ApplyError::Rejected {
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            },
            other => ApplyError::Client(other.to_string()),
        }
    }
}

impl ApplyError {
    /// Whether the API server refused the write because it would change an immutable field
    /// (422 Invalid, "field is immutable" in its message, as every built-in type words it).
    pub fn is_immutable_field(&self) -> bool {
        matches!(self, ApplyError::Rejected { code: 422, message, .. } if message.contains("immutable"))
    }

    /// Short CamelCase reason for conditions.
    pub fn reason(&self) -> &str {
        match self {
            ApplyError::Rejected { reason, .. } if !reason.is_empty() => reason,
            ApplyError::Rejected { .. } => "Rejected",
            ApplyError::Client(_) => "ClientError",
            ApplyError::NotFound(_) => "NotFound",
        }
    }
}

/// An ignoreFields path, parsed.
#[derive(Debug, Clone)]
pub struct IgnorePath {
    pub condition: IgnoreFieldsCondition,
    /// The path as written (for messages).
    pub raw: String,
    pub steps: Vec<Step>,
}

/// A manifest ready to apply.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Index in the work.
    pub ordinal: usize,
    /// The manifest's kind as discovery resolved it: plural and scope, for the API calls.
    pub resolved: Resolved,
    pub key: ObjKey,
    /// Object to write: namespace defaulted, our label/annotations added, no ownerReferences.
    pub desired: Value,
    pub strategy: UpdateStrategyType,
    /// The work's `serverSideApply.force`: take over fields other managers own instead of conflicting.
    pub force: bool,
    /// Field manager of server-side applies and creates: the work's, else the agent's, else `work-agent`.
    pub field_manager: String,
    pub ignore: Vec<IgnorePath>,
    /// Hash of the manifest as the hub sent it (see SPEC_HASH_ANNOTATION).
    pub spec_hash: String,
    /// A Kustomization's `force: true`: when the API server refuses the write because an
    /// immutable field changed, delete the object (only if this work owns it) and create it
    /// anew, as kustomize-controller does. Nothing else ever deletes in order to apply.
    pub recreate_on_immutable: bool,
    /// UIDs of objects the work adopted (they existed before it), which a recreation must not
    /// delete: adopted objects are released, never deleted (`--adopted-objects release`, the
    /// default). Empty when adopted objects may be deleted.
    pub adopted: std::sync::Arc<std::collections::HashSet<String>>,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The object was created.
    Created,
    /// The object was changed.
    Updated,
    /// Nothing to change; no write was sent.
    Unchanged,
    /// Not written by design (ReadOnly, or CreateOnly on an existing object).
    Skipped,
}

#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub action: Action,
    /// The object as it is now, for feedback and the UID.
    pub live: Arc<Value>,
    /// Remarks for the condition message (e.g. an ignoreFields path that matches nothing).
    pub notes: Vec<String>,
    /// The object existed before this work wrote it (someone else created it): the work
    /// adopted it, and by default releases rather than deletes it when letting go.
    pub pre_existing: bool,
}

/// Applies manifests. Cheap to clone: it shares one client and the drift cache.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    /// Cache of our live objects; also told about our own writes.
    drift: DriftWatcher,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").finish_non_exhaustive()
    }
}

impl Applier {
    pub fn new(client: Client, drift: DriftWatcher) -> Self {
        Applier { client, drift }
    }

    /// The same applier writing through `client` (a work's executor), sharing the drift cache.
    pub fn with_client(&self, client: Client) -> Self {
        Applier {
            client,
            drift: self.drift.clone(),
        }
    }

    fn api(&self, p: &Prepared) -> Api<DynamicObject> {
        if p.resolved.namespaced {
            Api::namespaced_with(self.client.clone(), &p.key.namespace, &p.resolved.ar)
        } else {
            Api::all_with(self.client.clone(), &p.resolved.ar)
        }
    }

    async fn get(&self, p: &Prepared) -> Result<Option<Arc<Value>>, ApplyError> {
        self.api(p)
            .get_opt(&p.key.name)
            .await?
            .map(|mut o| {
                o.metadata.managed_fields = None;
                serde_json::to_value(o).map(Arc::new)
            })
            .transpose()
            .map_err(|e| ApplyError::Client(e.to_string()))
    }

    /// Current object: the cache when it knows, else the server.
    async fn current(&self, p: &Prepared) -> Result<Option<Arc<Value>>, ApplyError> {
        match self.drift.lookup(&p.key) {
            Live::Present(v) => Ok(Some(v)),
            Live::Absent if p.strategy != UpdateStrategyType::ReadOnly => Ok(None),
            _ => self.get(p).await,
        }
    }

    fn done(
        &self,
        p: &Prepared,
        action: Action,
        mut obj: DynamicObject,
        notes: Vec<String>,
    ) -> Result<ApplyOutcome, ApplyError> {
        let pre_existing = written_by_others(&obj, &p.field_manager);
        // managedFields is often half an object's size and nothing downstream reads it.
        obj.metadata.managed_fields = None;
        let v = serde_json::to_value(obj).map_err(|e| ApplyError::Client(e.to_string()))?;
        self.drift.record_write(&p.key, &v);
        Ok(ApplyOutcome {
            pre_existing,
            action,
            live: Arc::new(v),
            notes,
        })
    }

    /// Applies one manifest, owned by `owner`; with [`Prepared::recreate_on_immutable`], an
    /// object whose immutable fields changed is recreated.
    pub async fn apply(&self, p: &Prepared, owner: &OwnerReference) -> Result<ApplyOutcome, ApplyError> {
        match self.apply_strategy(p, owner).await {
            Err(e) if p.recreate_on_immutable && e.is_immutable_field() => self.recreate(p, owner, e).await,
            done => done,
        }
    }

    /// Deletes the object `p` names and creates it from `p`, after `refused` (an immutable
    /// field). Only an object this work owns is deleted, and only the very one that was read
    /// (a uid precondition): one replaced meanwhile by someone else is left alone. An object
    /// still terminating (finalizers) makes the create fail; the work's retry creates it later.
    async fn recreate(
        &self,
        p: &Prepared,
        owner: &OwnerReference,
        refused: ApplyError,
    ) -> Result<ApplyOutcome, ApplyError> {
        let Some(live) = self.get(p).await? else {
            return self.create_plain(p, owner).await;
        };
        if !has_owner(&live, &owner.uid) {
            return Err(ApplyError::Client(format!(
                "{refused}; not recreated: the object was not created by this work"
            )));
        }
        let uid = live
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(str::to_string);
        if uid.as_ref().is_some_and(|u| p.adopted.contains(u)) {
            return Err(ApplyError::Client(format!(
                "{refused}; not recreated: the work adopted this object (it existed before the work), and adopted objects are released, never deleted"
            )));
        }
        let dp = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid,
                resource_version: None,
            }),
            // Its dependents (a Job's pods) go with it, as they would with kubectl replace --force.
            propagation_policy: Some(kube::api::PropagationPolicy::Background),
            ..Default::default()
        };
        tracing::info!(object = %p.key, reason = %refused, "recreating: an immutable field changed");
        match self.api(p).delete(&p.key.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let mut out = match self.create_plain(p, owner).await {
            Ok(out) => out,
            Err(ApplyError::Rejected { code: 409, .. }) => {
                return Err(ApplyError::Client(format!(
                    "{}: deleted to recreate it (an immutable field changed), still terminating; created on the next attempt",
                    p.key
                )));
            }
            Err(e) => return Err(e),
        };
        out.notes.push(format!("recreated: {refused}"));
        Ok(out)
    }

    /// Writes one manifest with its update strategy.
    async fn apply_strategy(&self, p: &Prepared, owner: &OwnerReference) -> Result<ApplyOutcome, ApplyError> {
        if p.strategy != UpdateStrategyType::ReadOnly {
            self.drift.ensure_watch(&p.resolved.ar);
        }
        match p.strategy {
            UpdateStrategyType::ReadOnly => match self.current(p).await? {
                Some(live) => Ok(ApplyOutcome {
                    pre_existing: false,
                    action: Action::Skipped,
                    live,
                    notes: vec![],
                }),
                None => Err(ApplyError::NotFound(p.key.to_string())),
            },
            UpdateStrategyType::CreateOnly => match self.current(p).await? {
                Some(live) => Ok(ApplyOutcome {
                    pre_existing: !has_owner(&live, &owner.uid),
                    action: Action::Skipped,
                    live,
                    notes: vec![],
                }),
                None => self.create_or_existing(p, owner).await,
            },
            UpdateStrategyType::Update => {
                let live = match self.drift.lookup(&p.key) {
                    Live::Present(v) => Some(v),
                    Live::Absent => None,
                    // Cold path: try the create straight away (one request); AlreadyExists falls back.
                    Live::Unknown => return self.create_or_existing(p, owner).await,
                };
                match live {
                    None => self.create_or_existing(p, owner).await,
                    Some(live) => self.update(p, owner, live).await,
                }
            }
            UpdateStrategyType::ServerSideApply => {
                let live = match self.drift.lookup(&p.key) {
                    Live::Present(v) => Some(v),
                    Live::Absent => None,
                    Live::Unknown if !p.ignore.is_empty() => self.get(p).await?,
                    Live::Unknown => None,
                };
                self.server_side_apply(p, owner, live).await
            }
        }
    }

    async fn create_or_existing(
        &self,
        p: &Prepared,
        owner: &OwnerReference,
    ) -> Result<ApplyOutcome, ApplyError> {
        let (obj, pp) = create_request(p, owner)?;
        match self.api(p).create(&pp, &obj).await {
            Ok(o) => self.done(p, Action::Created, o, vec![]),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let live = self
                    .get(p)
                    .await?
                    .ok_or_else(|| ApplyError::Client(format!("{} vanished during create", p.key)))?;
                if p.strategy == UpdateStrategyType::CreateOnly {
                    return Ok(ApplyOutcome {
                        pre_existing: !has_owner(&live, &owner.uid),
                        action: Action::Skipped,
                        live,
                        notes: vec![],
                    });
                }
                self.update(p, owner, live).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Create with no fallback (used when an update finds the object gone).
    async fn create_plain(&self, p: &Prepared, owner: &OwnerReference) -> Result<ApplyOutcome, ApplyError> {
        let (obj, pp) = create_request(p, owner)?;
        let o = self.api(p).create(&pp, &obj).await?;
        self.done(p, Action::Created, o, vec![])
    }

    async fn update(
        &self,
        p: &Prepared,
        owner: &OwnerReference,
        mut live: Arc<Value>,
    ) -> Result<ApplyOutcome, ApplyError> {
        for attempt in 0..=CONFLICT_RETRIES {
            let mut desired = p.desired.clone();
            let notes = overlay_ignored(&mut desired, Some(&live), &p.ignore, &p.spec_hash);
            if desired_is_subset(&desired, &live) && has_owner(&live, &owner.uid) {
                return Ok(ApplyOutcome {
                    pre_existing: false,
                    action: Action::Unchanged,
                    live,
                    notes,
                });
            }
            let mut merged = (*live).clone();
            super::object::merge_into(&mut merged, &desired);
            let mut refs = owner_refs(&live);
            if !has_owner(&live, &owner.uid) {
                refs.push(owner_value(owner));
            }
            set_owner_refs(&mut merged, refs);
            if let Some(m) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("managedFields");
            }
            if let Some(m) = merged.as_object_mut() {
                m.remove("status");
            }
            let obj: DynamicObject =
                serde_json::from_value(merged).map_err(|e| ApplyError::Client(e.to_string()))?;
            let pp = PostParams {
                dry_run: false,
                field_manager: Some(p.field_manager.clone()),
            };
            match self.api(p).replace(&p.key.name, &pp, &obj).await {
                Ok(o) => return self.done(p, Action::Updated, o, notes),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < CONFLICT_RETRIES => {
                    live = match self.get(p).await? {
                        Some(v) => v,
                        None => return self.create_plain(p, owner).await,
                    };
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return self.create_plain(p, owner).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApplyError::Client(format!(
            "{}: too many update conflicts",
            p.key
        )))
    }

    async fn server_side_apply(
        &self,
        p: &Prepared,
        owner: &OwnerReference,
        live: Option<Arc<Value>>,
    ) -> Result<ApplyOutcome, ApplyError> {
        let mut desired = p.desired.clone();
        let notes = overlay_ignored(&mut desired, live.as_deref(), &p.ignore, &p.spec_hash);
        if let Some(live) = &live
            && desired_is_subset(&desired, live)
            && has_owner(live, &owner.uid)
        {
            return Ok(ApplyOutcome {
                pre_existing: false,
                action: Action::Unchanged,
                live: live.clone(),
                notes,
            });
        }
        // Every work applies with the same field manager by default, so keep the other works'
        // ownerReferences in our applied set or SSA would drop them.
        let mut refs = vec![owner_value(owner)];
        if let Some(live) = &live {
            for r in owner_refs(live) {
                let is_amw = r.get("kind").and_then(Value::as_str) == Some(AMW_KIND);
                let uid = r.get("uid").and_then(Value::as_str);
                if is_amw && uid != Some(owner.uid.as_str()) {
                    refs.push(r);
                }
            }
        }
        set_owner_refs(&mut desired, refs);
        let mut pp = PatchParams::apply(&p.field_manager);
        pp.force = p.force;
        let o = self
            .api(p)
            .patch(&p.key.name, &pp, &Patch::Apply(&desired))
            .await?;
        // SSA does not say whether it created; no known live object is the best guess.
        let action = if live.is_none() {
            Action::Created
        } else {
            Action::Updated
        };
        self.done(p, action, o, notes)
    }
}

/// Whether someone other than the agent wrote the object's spec: a managedFields entry of another
/// field manager (status writers such as controllers do not count). On an object this work never
/// recorded with a UID, that means it existed before the work.
fn written_by_others(obj: &DynamicObject, ours: &str) -> bool {
    obj.metadata.managed_fields.iter().flatten().any(|m| {
        let status_only = m.subresource.as_deref().is_some_and(|s| !s.is_empty());
        let manager = m.manager.as_deref().unwrap_or("");
        !status_only && manager != ours && manager != super::manifestwork::DEFAULT_FIELD_MANAGER
    })
}

/// Kind of the owner objects, used to recognise other works' ownerReferences.
const AMW_KIND: &str = "AppliedManifestWork";

/// Makes `desired` leave ignored fields as they are on the spoke: their live value is copied in
/// (so SSA keeps owning them without changing them) or, when absent live, they are dropped.
/// Returns notes for paths that exist nowhere.
pub fn overlay_ignored(
    desired: &mut Value,
    live: Option<&Value>,
    ignore: &[IgnorePath],
    spec_hash: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    let hub_changed = live
        .and_then(|l| l.get("metadata"))
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(SPEC_HASH_ANNOTATION))
        .and_then(Value::as_str)
        != Some(spec_hash);
    for ip in ignore {
        let in_desired = get_path(desired, &ip.steps).is_some();
        let live_v = live.and_then(|l| get_path(l, &ip.steps)).cloned();
        if !in_desired && live_v.is_none() {
            notes.push(format!(
                "ignoreFields path {} matches nothing in the manifest or on the spoke",
                ip.raw
            ));
            continue;
        }
        let Some(_) = live else { continue };
        let applies = match ip.condition {
            IgnoreFieldsCondition::OnSpokePresent => true,
            IgnoreFieldsCondition::OnSpokeChange => !hub_changed,
        };
        if !applies {
            continue;
        }
        match live_v {
            Some(v) => {
                set_path(desired, &ip.steps, v);
            }
            None => {
                remove_path(desired, &ip.steps);
            }
        }
    }
    notes
}

fn owner_value(o: &OwnerReference) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

fn set_owner_refs(obj: &mut Value, refs: Vec<Value>) {
    if let Some(m) = obj.as_object_mut() {
        let meta = m
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(mm) = meta.as_object_mut() {
            mm.insert("ownerReferences".into(), Value::Array(refs));
        }
    }
}

/// The object and parameters of a create: the desired manifest owned by the AppliedManifestWork.
fn create_request(p: &Prepared, owner: &OwnerReference) -> Result<(DynamicObject, PostParams), ApplyError> {
    let mut body = p.desired.clone();
    set_owner_refs(&mut body, vec![owner_value(owner)]);
    let obj: DynamicObject = serde_json::from_value(body).map_err(|e| ApplyError::Client(e.to_string()))?;
    let pp = PostParams {
        dry_run: false,
        field_manager: Some(p.field_manager.clone()),
    };
    Ok((obj, pp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonpath::JsonPath;
    use serde_json::json;

    fn ip(cond: IgnoreFieldsCondition, p: &str) -> IgnorePath {
        IgnorePath {
            condition: cond,
            raw: p.into(),
            steps: JsonPath::parse(p).unwrap().simple().unwrap().to_vec(),
        }
    }

    #[test]
    fn on_spoke_present_keeps_live_value() {
        let mut d = json!({"spec": {"replicas": 1, "x": 1}});
        let live = json!({"metadata": {}, "spec": {"replicas": 5, "x": 1}});
        let notes = overlay_ignored(
            &mut d,
            Some(&live),
            &[ip(IgnoreFieldsCondition::OnSpokePresent, ".spec.replicas")],
            "h",
        );
        assert!(notes.is_empty());
        assert_eq!(d["spec"]["replicas"], 5);
        assert!(desired_is_subset(&d, &live));
    }

    #[test]
    fn on_spoke_change_applies_hub_changes() {
        let rule = [ip(IgnoreFieldsCondition::OnSpokeChange, ".spec.replicas")];
        // Same hub spec as last applied: the spoke's change stays.
        let live =
            json!({"metadata": {"annotations": {SPEC_HASH_ANNOTATION: "h1"}}, "spec": {"replicas": 5}});
        let mut d = json!({"spec": {"replicas": 1}});
        overlay_ignored(&mut d, Some(&live), &rule, "h1");
        assert_eq!(d["spec"]["replicas"], 5);
        // The hub changed the manifest: its value wins.
        let mut d = json!({"spec": {"replicas": 2}});
        overlay_ignored(&mut d, Some(&live), &rule, "h2");
        assert_eq!(d["spec"]["replicas"], 2);
    }

    #[test]
    fn missing_path_is_noted() {
        let mut d = json!({"spec": {}});
        let notes = overlay_ignored(
            &mut d,
            Some(&json!({"spec": {}})),
            &[ip(IgnoreFieldsCondition::OnSpokePresent, ".spec.nope")],
            "h",
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains(".spec.nope"));
    }
}
