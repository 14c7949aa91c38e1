//! The AppliedManifestWork: the spoke-side record that makes the agent restart-safe. Its CRD is
//! installed by the agent; its status lists every object a work applied (with UIDs), and applied
//! objects carry an ownerReference to it.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::manifestwork::{
    AppliedManifestResourceMeta, AppliedManifestWork, AppliedManifestWorkSpec, DeleteOption,
};

/// The CRD, exactly as shipped in `deploy/crds/`.
pub const CRD_YAML: &str =
    include_str!("../../deploy/crds/appliedmanifestworks.work.open-cluster-management.io.yaml");
pub const CRD_NAME: &str = "appliedmanifestworks.work.open-cluster-management.io";
/// Annotation carrying the work's delete option, so a work whose hub copy is gone can still be
/// deleted the way it asked after a restart.
pub const DELETE_OPTION_ANNOTATION: &str = "work.spokelet.io/delete-option";
/// Annotation carrying, on a freshly created record, the resources the agent is about to apply.
/// It lets the first apply of a work record its intent in the create itself (the status
/// subresource cannot be set on create), saving one write per new work; once the status has been
/// written it is the only source and this annotation is ignored.
pub const INTENT_ANNOTATION: &str = "work.spokelet.io/intended-resources";
/// Annotation carrying the uid of the hub work a record belongs to: after a restart it lets the
/// agent ask a CloudEvents hub about exactly the works it holds (so the hub answers the ones it
/// deleted with explicit deletes), and lets a delete be checked against the work it names.
pub const HUB_UID_ANNOTATION: &str = "work.spokelet.io/hub-uid";
/// Annotation carrying the user a work's executor is impersonated as
/// (`system:serviceaccount:<namespace>:<name>`): a work deleted after a restart, known only from
/// its record, is then still deleted with its executor's rights, never the agent's.
pub const EXECUTOR_ANNOTATION: &str = "work.spokelet.io/executor";
/// Annotation listing the UIDs of objects the work adopted (they existed before it), as a JSON
/// array: by default such an object is released, not deleted, when the work lets go of it.
pub const ADOPTED_ANNOTATION: &str = "work.spokelet.io/adopted-uids";
/// Largest intent carried in the create's annotation. The API server refuses an object whose
/// annotations total over 256 KiB; a larger intent (a work of thousands of manifests) is written
/// to the status right after the create instead, one write more.
pub const MAX_INTENT_ANNOTATION: usize = 128 * 1024;
/// Field manager the agent uses for its own bookkeeping objects.
pub const BOOKKEEPING_MANAGER: &str = "spokelet";

#[derive(Debug, thiserror::Error)]
pub enum AppliedWorkError {
    /// The embedded CRD does not parse (a build defect).
    #[error("embedded AppliedManifestWork CRD is invalid: {0}")]
    BadCrd(#[from] serde_yaml::Error),
    /// An API call failed.
    #[error("AppliedManifestWork {name}: {}", super::object::api_message(source))]
    Api {
        /// The record's name, or the CRD's when installing it.
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The CRD was not Established within the wait's limit (30 s for [`install_crd`]).
    #[error("CRD {0} did not become Established")]
    NotEstablished(String),
}

/// Hex SHA-256 of the hub address (or name, for the file source), as given.
pub fn hub_hash(hub: &str) -> String {
    hex::encode(Sha256::digest(hub.as_bytes()))
}

/// A hub address in one spelling, so `https://Hub:443/`, `https://hub` and `hub:443` name one
/// hub (and one set of records): scheme and host lower-cased, the default port written out, a
/// trailing `/` dropped. A name that is not a URL (the file source's hub name) is kept as it is.
pub fn normalise_hub_address(address: &str) -> String {
    let trimmed = address.trim();
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None if trimmed.contains(':') => ("https".to_string(), trimmed),
        None => return trimmed.to_string(),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let authority = authority.to_ascii_lowercase();
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let default_port = if scheme == "http" { 80 } else { 443 };
    let authority = if has_port {
        authority
    } else {
        format!("{authority}:{default_port}")
    };
    format!("{scheme}://{authority}{path}")
}

/// The hubHash of a hub address: of its normalised spelling.
pub fn hub_hash_of_address(address: &str) -> String {
    hub_hash(&normalise_hub_address(address))
}

/// The hubHash an earlier agent used for `address` (its text as given), when it differs from
/// [`hub_hash_of_address`]: records under it are this hub's too, and are adopted.
pub fn legacy_hub_hash(address: &str) -> Option<String> {
    let old = hub_hash(address);
    (old != hub_hash_of_address(address)).then_some(old)
}

/// `<hubHash>-<workName>`.
pub fn applied_name(hub_hash: &str, work: &str) -> String {
    format!("{hub_hash}-{work}")
}

/// Installs (server-side applies) the CRD and waits until it is Established.
pub async fn install_crd(client: &Client) -> Result<(), AppliedWorkError> {
    let crd: CustomResourceDefinition = serde_yaml::from_str(CRD_YAML)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        CRD_NAME,
        &PatchParams::apply(BOOKKEEPING_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(|source| AppliedWorkError::Api {
        name: CRD_NAME.into(),
        source,
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    wait_established(client, CRD_NAME, Duration::from_secs(30)).await?;
    wait_served(client, deadline).await
}

/// Waits until the records can be listed. A newly Established CRD's storage may still be
/// initialising (Kubernetes 1.3x answers `429 storage is (re)initializing` for a moment), and
/// on a loaded API server its CRD handler, which reads CRDs from an informer, may not have seen
/// the CRD yet and answers 404 though the CRD says Established. The engine's first request is
/// that list: a transient answer must not stop the agent.
async fn wait_served(client: &Client, deadline: tokio::time::Instant) -> Result<(), AppliedWorkError> {
    let api: Api<AppliedManifestWork> = Api::all(client.clone());
    loop {
        match api
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s))
                if matches!(s.code, 404 | 429 | 503) && tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(reason = %s.message, "AppliedManifestWork storage not ready yet");
            }
            Err(source) => {
                return Err(AppliedWorkError::Api {
                    name: CRD_NAME.into(),
                    source,
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a CRD says `Established=True`: its kinds are served.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

/// Polls a CRD until its Established condition is True, or `limit` passes.
pub async fn wait_established(client: &Client, name: &str, limit: Duration) -> Result<(), AppliedWorkError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let crd = api.get(name).await.map_err(|source| AppliedWorkError::Api {
            name: name.into(),
            source,
        })?;
        if is_established(&crd) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AppliedWorkError::NotEstablished(name.into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a record says about its work besides the resources: how to delete it and which hub work
/// it belongs to. Kept current on every open.
#[derive(Debug, Clone, Copy)]
pub struct RecordIdentity<'a> {
    pub delete_option: Option<&'a DeleteOption>,
    /// The hub work's uid (empty when the source gave none).
    pub hub_uid: &'a str,
    /// The user the work's executor is impersonated as; None when it writes with the agent's
    /// rights.
    pub executor: Option<&'a str>,
}

impl RecordIdentity<'_> {
    /// The annotations a record of this identity carries; None: the record must not carry it.
    fn annotations(&self) -> Vec<(&'static str, Option<String>)> {
        let option =
            serde_json::to_string(&self.delete_option.cloned().unwrap_or_default()).unwrap_or_default();
        let mut v = vec![
            (DELETE_OPTION_ANNOTATION, Some(option)),
            (EXECUTOR_ANNOTATION, self.executor.map(str::to_string)),
        ];
        // A hub uid once recorded is kept: a source that gives none has not changed the work.
        if !self.hub_uid.is_empty() {
            v.push((HUB_UID_ANNOTATION, Some(self.hub_uid.to_string())));
        }
        v
    }

    /// Whether `amw` already carries these annotations (and none it must not).
    fn matches(&self, amw: &AppliedManifestWork) -> bool {
        self.annotations()
            .iter()
            .all(|(k, v)| amw.annotations().get(*k) == v.as_ref())
    }
}

/// Gets the record for a work, creating it if absent, and keeps its identity annotations current.
/// A record created here lists `intent` (the resources about to be applied) until its status is
/// first written; an existing record is returned as it is.
pub async fn ensure(
    api: &Api<AppliedManifestWork>,
    name: &str,
    spec: AppliedManifestWorkSpec,
    identity: RecordIdentity<'_>,
    intent: &[AppliedManifestResourceMeta],
) -> Result<AppliedManifestWork, AppliedWorkError> {
    let err = |source| AppliedWorkError::Api {
        name: name.into(),
        source,
    };
    let annotations = identity.annotations();
    // Create first: on a cold start that is the only request; an existing record answers 409.
    let mut amw = AppliedManifestWork::new(name, spec);
    for (k, v) in &annotations {
        if let Some(v) = v {
            amw.annotations_mut().insert((*k).into(), v.clone());
        }
    }
    if !intent.is_empty()
        && let Ok(text) = serde_json::to_string(intent)
        && text.len() <= MAX_INTENT_ANNOTATION
    {
        amw.annotations_mut().insert(INTENT_ANNOTATION.into(), text);
    }
    match api.create(&PostParams::default(), &amw).await {
        Ok(o) => return Ok(o),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(err(e)),
    }
    let existing = api.get(name).await.map_err(err)?;
    if !identity.matches(&existing) {
        // A merge patch: null removes an annotation the record must not carry any more.
        let map: serde_json::Map<String, serde_json::Value> = annotations
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.map_or(serde_json::Value::Null, Into::into)))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": map}});
        return api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(err);
    }
    Ok(existing)
}

/// The record for a work, from `cache` when it still carries the identity wanted, else read or
/// created on the spoke ([`ensure`]) and remembered in `cache`.
pub async fn open(
    api: &Api<AppliedManifestWork>,
    name: &str,
    spec: AppliedManifestWorkSpec,
    identity: RecordIdentity<'_>,
    intent: &[AppliedManifestResourceMeta],
    cache: &mut Option<AppliedManifestWork>,
) -> Result<AppliedManifestWork, AppliedWorkError> {
    if let Some(cached) = cache.as_ref().filter(|a| identity.matches(a)) {
        return Ok(cached.clone());
    }
    let result = ensure(api, name, spec, identity, intent).await;
    remember(cache, result.as_ref().ok());
    result
}

/// Replaces the record's resource list and keeps `cache` true to the spoke: the record as
/// written, or nothing when the write failed (the next reconcile then reads the spoke). Every
/// change of a record's resources goes through here, so the copy can never go stale.
pub async fn write_and_cache(
    api: &Api<AppliedManifestWork>,
    name: &str,
    resources: &[AppliedManifestResourceMeta],
    cache: &mut Option<AppliedManifestWork>,
) -> Result<(), AppliedWorkError> {
    let version = cache.as_ref().and_then(|a| a.metadata.resource_version.clone());
    let result = write_resources(api, name, resources, version).await;
    remember(cache, result.as_ref().ok());
    result.map(|_| ())
}

/// Keeps a copy of `amw` in `cache` (None forgets). `managedFields` are dropped: never read from
/// the copy, and larger than the rest of the record.
fn remember(cache: &mut Option<AppliedManifestWork>, amw: Option<&AppliedManifestWork>) {
    *cache = amw.map(|a| {
        let mut copy = a.clone();
        copy.metadata.managed_fields = None;
        copy
    });
}

/// Replaces the applied-resource list (merge patch on the status subresource). With the
/// `resource_version` the list was read at, the write fails (409) if anyone changed the record
/// since, instead of replacing entries it never saw; the reconcile then reads it afresh.
async fn write_resources(
    api: &Api<AppliedManifestWork>,
    name: &str,
    resources: &[AppliedManifestResourceMeta],
    resource_version: Option<String>,
) -> Result<AppliedManifestWork, AppliedWorkError> {
    let mut patch = serde_json::json!({"status": {"appliedResources": resources}});
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({"resourceVersion": rv});
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| AppliedWorkError::Api {
            name: name.into(),
            source,
        })
}

/// The records of one hub on the spoke (the CRD must be installed; a missing CRD reads as none).
pub async fn list_for_hub(
    api: &Api<AppliedManifestWork>,
    hub_hashes: &[String],
) -> Result<Vec<AppliedManifestWork>, kube::Error> {
    let list = match api.list(&kube::api::ListParams::default()).await {
        Ok(l) => l,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(list
        .items
        .into_iter()
        .filter(|a| hub_hashes.contains(&a.spec.hub_hash))
        .collect())
}

/// Deletes the record (objects still owned by it are then garbage-collected).
pub async fn delete(api: &Api<AppliedManifestWork>, name: &str) -> Result<(), AppliedWorkError> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(AppliedWorkError::Api {
            name: name.into(),
            source,
        }),
    }
}

/// The ownerReference applied objects carry.
pub fn owner_ref(amw: &AppliedManifestWork) -> OwnerReference {
    OwnerReference {
        api_version: AppliedManifestWork::api_version(&()).into_owned(),
        kind: AppliedManifestWork::kind(&()).into_owned(),
        name: amw.name_any(),
        uid: amw.uid().unwrap_or_default(),
        // Not a controller reference: several works may own one object.
        controller: None,
        block_owner_deletion: None,
    }
}

/// The delete option recorded on a record (Foreground when absent or unreadable).
pub fn recorded_delete_option(amw: &AppliedManifestWork) -> DeleteOption {
    amw.annotations()
        .get(DELETE_OPTION_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// The UIDs of the objects a record's work adopted.
pub fn adopted_uids(amw: &AppliedManifestWork) -> std::collections::HashSet<String> {
    amw.annotations()
        .get(ADOPTED_ANNOTATION)
        .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Adds `uids` to the record's adopted objects (one metadata write) and keeps `cache` true.
pub async fn add_adopted(
    api: &Api<AppliedManifestWork>,
    name: &str,
    uids: &[String],
    cache: &mut Option<AppliedManifestWork>,
) -> Result<(), AppliedWorkError> {
    let mut all: Vec<String> = cache
        .as_ref()
        .map(adopted_uids)
        .unwrap_or_default()
        .into_iter()
        .collect();
    all.extend(uids.iter().cloned());
    all.sort();
    all.dedup();
    let text = serde_json::to_string(&all).unwrap_or_default();
    let patch = serde_json::json!({"metadata": {"annotations": {ADOPTED_ANNOTATION: text}}});
    let result = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| AppliedWorkError::Api {
            name: name.into(),
            source,
        });
    remember(cache, result.as_ref().ok());
    result.map(|_| ())
}

/// The executor user recorded on a record, if any.
pub fn recorded_executor(amw: &AppliedManifestWork) -> Option<&str> {
    amw.annotations().get(EXECUTOR_ANNOTATION).map(String::as_str)
}

/// The hub uid recorded on a record, if any.
pub fn recorded_hub_uid(amw: &AppliedManifestWork) -> Option<&str> {
    amw.annotations()
        .get(HUB_UID_ANNOTATION)
        .map(String::as_str)
        .filter(|u| !u.is_empty())
}

/// The applied resources of a record: its status once written, before that the intent it was
/// created with (entries without UIDs).
pub fn resources(amw: &AppliedManifestWork) -> Vec<AppliedManifestResourceMeta> {
    match &amw.status {
        Some(s) => s.applied_resources.clone(),
        None => amw
            .annotations()
            .get(INTENT_ANNOTATION)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifestwork::AppliedManifestWorkStatus;

    #[test]
    fn crd_parses_and_matches_type() {
        let crd: CustomResourceDefinition = serde_yaml::from_str(CRD_YAML).unwrap();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.kind, "AppliedManifestWork");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert_eq!(AppliedManifestWork::plural(&()), "appliedmanifestworks");
    }

    #[test]
    fn resources_come_from_status_once_written_else_from_intent() {
        let entry = |name: &str| AppliedManifestResourceMeta {
            group: String::new(),
            resource: "configmaps".into(),
            name: name.into(),
            namespace: "default".into(),
            version: "v1".into(),
            uid: String::new(),
        };
        let spec = AppliedManifestWorkSpec {
            hub_hash: "h".into(),
            agent_id: "a".into(),
            manifest_work_name: "w".into(),
        };
        let mut amw = AppliedManifestWork::new("h-w", spec);
        assert!(resources(&amw).is_empty());
        amw.annotations_mut().insert(
            INTENT_ANNOTATION.into(),
            serde_json::to_string(&[entry("a"), entry("b")]).unwrap(),
        );
        assert_eq!(resources(&amw), vec![entry("a"), entry("b")]);
        // A written status wins, even an empty one (everything pruned since).
        amw.status = Some(AppliedManifestWorkStatus::default());
        assert!(resources(&amw).is_empty());
        amw.status = Some(AppliedManifestWorkStatus {
            applied_resources: vec![entry("c")],
            ..Default::default()
        });
        assert_eq!(resources(&amw), vec![entry("c")]);
        // Garbage in the annotation reads as nothing recorded, never as a failure.
        amw.status = None;
        amw.annotations_mut()
            .insert(INTENT_ANNOTATION.into(), "not json".into());
        assert!(resources(&amw).is_empty());
    }

    #[test]
    fn hub_addresses_in_any_spelling_share_one_hash() {
        let one = hub_hash_of_address("https://hub.example:443");
        for spelling in [
            "https://hub.example",
            "https://HUB.example:443/",
            "HTTPS://hub.example/",
            "hub.example:443",
        ] {
            assert_eq!(hub_hash_of_address(spelling), one, "{spelling}");
        }
        assert_ne!(hub_hash_of_address("https://hub.example:6443"), one);
        assert_ne!(hub_hash_of_address("http://hub.example"), one);
        assert_eq!(normalise_hub_address("https://[::1]"), "https://[::1]:443");
        assert_eq!(
            normalise_hub_address("https://h:6443/prefix/"),
            "https://h:6443/prefix"
        );
        assert_eq!(normalise_hub_address("local"), "local");
        assert_eq!(
            legacy_hub_hash("https://hub.example/"),
            Some(hub_hash("https://hub.example/"))
        );
        assert_eq!(legacy_hub_hash("https://hub.example:443"), None);
    }

    #[test]
    fn names() {
        let h = hub_hash("local");
        assert_eq!(h.len(), 64);
        assert_eq!(applied_name(&h, "w1"), format!("{h}-w1"));
    }
}
