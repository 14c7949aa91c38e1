//! Removing one applied object on behalf of a work: deleted with a UID precondition, or — when
//! another work still claims it, or it is being orphaned — only stripped of this work's ownerReference.

use std::collections::{BTreeMap, HashSet};

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions, PropagationPolicy};
use serde_json::{Value, json};

use super::context::ReconcileContext;
use super::discovery::api_resource_for;
use super::manifestwork::AppliedManifestResourceMeta;
use super::object::{MANAGED_LABEL, ObjKey, owner_refs};
use spokelet_base::lock::lock;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PruneError {
    /// The API call failed.
    #[error("removing {key}: {}", super::object::api_message(source))]
    Api {
        key: String,
        #[source]
        source: kube::Error,
    },
}

/// What happened to the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PruneOutcome {
    /// Already gone.
    Gone,
    /// Delete requested (it may linger while finalizers run).
    Deleted,
    /// Left in place with this work's ownerReference removed.
    Released,
    /// Not ours (recreated by someone else under the same name, or never applied): untouched.
    NotOurs,
}

/// The work whose objects are pruned: its name, its record's UID and the UIDs it adopted.
#[allow(missing_debug_implementations)] // kube's Client has no Debug.
pub(crate) struct Owner<'a> {
    /// The client the work writes with (its executor's, when it names one).
    pub client: &'a Client,
    pub work: &'a str,
    pub uid: &'a str,
    pub adopted: &'a HashSet<String>,
    /// Label sets (see `Expansion::release_labelled`): an object carrying every label of one
    /// is released, never deleted, when it leaves the work (for Flux: the objects of a
    /// Kustomization with `prune: false`). While any is set, an object whose labels are not in
    /// the drift cache is released too: when in doubt, keep it.
    pub release_labelled: &'a [BTreeMap<String, String>],
}

/// Whether `key` carries every label of one of `sets`, as far as the drift cache knows
/// (unknown counts as yes).
fn released_by_labels(ctx: &ReconcileContext, key: &ObjKey, sets: &[BTreeMap<String, String>]) -> bool {
    if sets.is_empty() {
        return false;
    }
    let live = match ctx.drift.lookup(key) {
        super::drift::Live::Present(v) => v,
        super::drift::Live::Absent => return false,
        super::drift::Live::Unknown => return true,
    };
    let labels = live.pointer("/metadata/labels");
    sets.iter().any(|set| {
        set.iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v.as_str()))
    })
}

/// Whether letting go of `e` may only release it, never delete it: the work adopted it (unless
/// the agent is set to delete adopted objects, as OCM's agent does), or the policy protects it.
/// Pruning and work deletion both decide here.
pub(crate) async fn release_only(
    ctx: &ReconcileContext,
    e: &AppliedManifestResourceMeta,
    adopted: &HashSet<String>,
) -> bool {
    if ctx.cfg.release_adopted && !e.uid.is_empty() && adopted.contains(&e.uid) {
        return true;
    }
    match ctx.policy_denies(e).await {
        Some(denied) => {
            tracing::warn!(object = %ObjKey::from(e), %denied, "protected object released, not deleted");
            true
        }
        None => false,
    }
}

/// How to remove an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Delete unless another work still claims it.
    Delete,
    /// Leave it; only drop our ownerReference (and our label if no other work owns it).
    Orphan,
}

/// Prunes the record's `entries` the work no longer wants (`desired`): each is deleted or
/// released ([`remove`]), except entries that may be the object of a manifest whose kind did not
/// resolve (`unresolved`: group and name), kept until it does. Returns the entries the record
/// keeps (wanted, unresolved, or failed to remove) and the failures.
pub(crate) async fn prune_unlisted(
    ctx: &ReconcileContext,
    owner: &Owner<'_>,
    entries: Vec<AppliedManifestResourceMeta>,
    desired: &HashSet<ObjKey>,
    unresolved: &[(String, String)],
) -> (Vec<AppliedManifestResourceMeta>, Vec<String>) {
    let mut kept = Vec::new();
    let mut errors = Vec::new();
    // A set, so pruning stays linear however many manifests did not resolve.
    let unresolved: HashSet<(&str, &str)> =
        unresolved.iter().map(|(g, n)| (g.as_str(), n.as_str())).collect();
    let (work, owner_uid) = (owner.work, owner.uid);
    for e in entries {
        let key = ObjKey::from(&e);
        let maybe_unresolved = unresolved.contains(&(e.group.as_str(), e.name.as_str()));
        if desired.contains(&key) || maybe_unresolved {
            kept.push(e);
            continue;
        }
        let elsewhere = lock(&ctx.claims).claimed_elsewhere(&key, work);
        let mode = if released_by_labels(ctx, &key, owner.release_labelled)
            || release_only(ctx, &e, owner.adopted).await
        {
            Mode::Orphan
        } else {
            Mode::Delete
        };
        match remove(owner.client, &e, owner_uid, elsewhere, mode).await {
            Ok(out) => {
                tracing::info!(work, object = %key, outcome = ?out, "pruned object no longer in the work");
                if out != PruneOutcome::NotOurs {
                    ctx.drift.record_delete(&key);
                }
            }
            Err(err) => {
                errors.push(err.to_string());
                kept.push(e);
            }
        }
    }
    (kept, errors)
}

fn api(client: &Client, e: &AppliedManifestResourceMeta) -> Api<DynamicObject> {
    let ar = api_resource_for(&e.group, &e.version, &e.resource);
    if e.namespace.is_empty() {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), &e.namespace, &ar)
    }
}

/// Removes one entry. `owner_uid` is this work's AppliedManifestWork UID; `claimed_elsewhere` says
/// whether another work still wants the object.
pub(crate) async fn remove(
    client: &Client,
    e: &AppliedManifestResourceMeta,
    owner_uid: &str,
    claimed_elsewhere: bool,
    mode: Mode,
) -> Result<PruneOutcome, PruneError> {
    let err = |source| PruneError::Api {
        key: ObjKey::from(e).to_string(),
        source,
    };
    let api = api(client, e);
    let Some(live) = api.get_opt(&e.name).await.map_err(err)? else {
        return Ok(PruneOutcome::Gone);
    };
    let live_uid = live.metadata.uid.clone().unwrap_or_default();
    let ours = live
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|r| r.iter().any(|o| o.uid == owner_uid));
    // Recorded UID differs: the object was recreated by someone else; never delete it.
    if !e.uid.is_empty() && e.uid != live_uid {
        if ours {
            release(&api, &live, owner_uid).await.map_err(err)?;
        }
        return Ok(PruneOutcome::NotOurs);
    }
    // Intent entries (no UID) are only acted on if the object really carries our reference.
    if e.uid.is_empty() && !ours {
        return Ok(PruneOutcome::NotOurs);
    }
    // The live object decides, not only our claims: another record (of any hub, or one this
    // agent has not loaded) owning it means this work only lets go of it.
    let owned_by_another_work = live.metadata.owner_references.iter().flatten().any(|o| {
        o.kind == "AppliedManifestWork"
            && o.uid != owner_uid
            && o.api_version.starts_with(super::manifestwork::GROUP)
    });
    if claimed_elsewhere || owned_by_another_work || mode == Mode::Orphan {
        release(&api, &live, owner_uid).await.map_err(err)?;
        return Ok(PruneOutcome::Released);
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(live_uid),
            resource_version: None,
        }),
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(&e.name, &dp).await {
        Ok(_) => Ok(PruneOutcome::Deleted),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(PruneOutcome::Gone),
        // UID precondition failed: someone replaced it in between; not ours any more.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(PruneOutcome::NotOurs),
        Err(e) => Err(err(e)),
    }
}

/// Drops `owner_uid` from the object's ownerReferences (resourceVersion-guarded), and our label
/// too when no other AppliedManifestWork owns it, so our drift watch stops seeing it.
async fn release(api: &Api<DynamicObject>, live: &DynamicObject, owner_uid: &str) -> Result<(), kube::Error> {
    let v = serde_json::to_value(live).unwrap_or(Value::Null);
    let refs: Vec<Value> = owner_refs(&v)
        .into_iter()
        .filter(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid))
        .collect();
    let other_works = refs
        .iter()
        .any(|r| r.get("kind").and_then(Value::as_str) == Some("AppliedManifestWork"));
    let mut meta = json!({
        "resourceVersion": live.metadata.resource_version,
        "ownerReferences": refs,
    });
    if !other_works {
        meta["labels"] = json!({ MANAGED_LABEL: null });
    }
    let name = live.metadata.name.clone().unwrap_or_default();
    match api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": meta })),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether an entry's object still exists with the recorded UID (or, for intents, at all).
pub(crate) async fn still_present(
    client: &Client,
    e: &AppliedManifestResourceMeta,
) -> Result<bool, PruneError> {
    let live = api(client, e)
        .get_metadata_opt(&e.name)
        .await
        .map_err(|source| PruneError::Api {
            key: ObjKey::from(e).to_string(),
            source,
        })?;
    Ok(match live {
        None => false,
        Some(o) => e.uid.is_empty() || o.metadata.uid.as_deref() == Some(e.uid.as_str()),
    })
}
