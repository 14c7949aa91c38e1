//! Preparing a work's manifests for apply: parse each, resolve its kind, find its manifest
//! config, and build the object to write and the record entries that name it.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use super::applier::{IgnorePath, Prepared};
use super::context::ReconcileContext;
use super::discovery::{DiscoveryError, Resolved};
use super::failure::ManifestFailure;
use super::feedback;
use super::jsonpath::JsonPath;
use super::manifestwork::{
    AppliedManifestResourceMeta, DEFAULT_FIELD_MANAGER, IgnoreFieldsCondition, ManifestConfigOption,
    ManifestResourceMeta, ManifestWork, ServerSideApplyConfig, UpdateStrategyType,
};
use super::object::{MANAGED_LABEL, ObjKey, SPEC_HASH_ANNOTATION, normalize_secret};
use super::policy::Target;
use super::result::ManifestResult;
use super::validate::{ParsedManifest, ValidateError, parse_manifest};

/// How often, and how many times, a kind defined by a CRD of the same work is looked up again:
/// discovery can lag a just-established CRD by a few seconds.
const CRD_DISCOVERY_RETRY: Duration = Duration::from_millis(100);
const CRD_DISCOVERY_ATTEMPTS: u32 = 50;

/// `(group, kind)` pairs, such as the kinds the CRDs of a work define.
pub type KindSet = HashSet<(String, String)>;

/// A manifest whose kind could not be resolved. Its object may be one the record lists, so
/// pruning must keep record entries of this group and name until the kind resolves.
#[derive(Debug)]
pub struct Unresolved {
    pub group: String,
    pub name: String,
    pub error: DiscoveryError,
}

/// Parses every manifest of `work`: a result per manifest (its identity filled in, or its
/// failure), and the parsed manifest where it is valid.
pub fn parse_manifests(work: &ManifestWork) -> (Vec<ManifestResult>, Vec<Option<ParsedManifest>>) {
    let manifests = &work.spec.workload.manifests;
    let mut results = Vec::with_capacity(manifests.len());
    let mut parsed = Vec::with_capacity(manifests.len());
    for (i, m) in manifests.iter().enumerate() {
        let mut r = ManifestResult {
            meta: ManifestResourceMeta {
                ordinal: i as i32,
                ..Default::default()
            },
            ..Default::default()
        };
        let value = m.value().map_err(ValidateError::NotJson);
        match value.and_then(|v| parse_manifest(&v)) {
            Ok(p) => {
                r.meta.group = p.group.clone();
                r.meta.version = p.version.clone();
                r.meta.kind = p.kind.clone();
                r.meta.name = p.name.clone();
                r.meta.namespace = p.namespace.clone().unwrap_or_default();
                parsed.push(Some(p));
            }
            Err(e) => {
                r.error = Some(ManifestFailure::Invalid(e));
                parsed.push(None);
            }
        }
        results.push(r);
    }
    (results, parsed)
}

/// The kinds the CRDs among `parsed` define, so custom resources of them get a moment to appear
/// in discovery.
pub fn crd_kinds(parsed: &[Option<ParsedManifest>]) -> KindSet {
    parsed
        .iter()
        .flatten()
        .filter(|p| p.group == "apiextensions.k8s.io" && p.kind == "CustomResourceDefinition")
        .filter_map(|p| {
            let spec = p.obj.get("spec")?;
            Some((
                spec.get("group")?.as_str()?.to_string(),
                spec.get("names")?.get("kind")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Everything that can be named before anything is written: the intent recorded first. Custom
/// resources of CRDs in this work cannot be resolved yet, and ReadOnly objects are never ours;
/// both are left out (each tier records its own intents as well).
pub async fn intent_candidates(
    ctx: &ReconcileContext,
    work: &ManifestWork,
    parsed: &[Option<ParsedManifest>],
    crd_kinds: &KindSet,
) -> Vec<AppliedManifestResourceMeta> {
    let mut candidates: Vec<AppliedManifestResourceMeta> = Vec::new();
    // A set beside the list keeps this linear in the number of manifests.
    let mut seen: HashSet<ObjKey> = HashSet::new();
    for p in parsed.iter().flatten() {
        if crd_kinds.contains(&(p.group.clone(), p.kind.clone())) {
            continue;
        }
        let Ok(res) = ctx.resolver.resolve(&p.group, &p.version, &p.kind).await else {
            continue;
        };
        let namespace = if res.namespaced {
            p.namespace.clone().unwrap_or_else(|| "default".to_string())
        } else {
            String::new()
        };
        let key = object_key(p, &res, namespace);
        let target = Target::new(&p.group, &p.kind, &key.namespace, &p.name);
        if ctx.cfg.policy.check(&target).is_err() {
            // Never applied, so never recorded.
            continue;
        }
        let read_only = config_for(work, &key)
            .and_then(|c| c.update_strategy.as_ref())
            .is_some_and(|s| s.type_ == UpdateStrategyType::ReadOnly);
        if read_only || !seen.insert(key.clone()) {
            continue;
        }
        candidates.push(entry(&key, &res.ar.version, ""));
    }
    candidates
}

/// Resolves and prepares one manifest, filling in `r`'s resource, namespace, notes, strategy
/// and feedback rules along the way.
pub async fn prepare(
    ctx: &ReconcileContext,
    i: usize,
    p: &ParsedManifest,
    work: &ManifestWork,
    crd_kinds: &KindSet,
    r: &mut ManifestResult,
) -> Result<Prepared, Unresolved> {
    let resolved = resolve_kind(ctx, p, crd_kinds)
        .await
        .map_err(|error| Unresolved {
            group: p.group.clone(),
            name: p.name.clone(),
            error,
        })?;
    r.meta.resource = resolved.ar.plural.clone();
    let namespace = namespace_for(p, &resolved, &mut r.notes);
    r.meta.namespace = namespace.clone();
    let key = object_key(p, &resolved, namespace);
    let config = config_for(work, &key);
    let strategy = config.and_then(|c| c.update_strategy.as_ref());
    let strategy_type = strategy.map(|s| s.type_).unwrap_or_default();
    let ssa = strategy.and_then(|s| s.server_side_apply.as_ref());
    let ignore = ignore_paths(ssa, &mut r.notes);
    if let Some(c) = config {
        r.rules = c.feedback_rules.clone();
        r.rule_errors = feedback::validate_rules(&c.feedback_rules);
    }
    r.strategy = strategy_type;
    let desired = desired_object(p, &resolved, &key.namespace, strategy_type, &ignore);
    Ok(Prepared {
        ordinal: i,
        field_manager: field_manager(ctx, ssa),
        force: ssa.is_some_and(|s| s.force),
        resolved,
        key,
        desired,
        strategy: strategy_type,
        ignore,
        spec_hash: p.content_hash.clone(),
        recreate_on_immutable: false,
        adopted: Default::default(),
    })
}

/// The record entry naming `key` (`uid` empty for an intent not yet applied).
pub fn entry(key: &ObjKey, version: &str, uid: &str) -> AppliedManifestResourceMeta {
    AppliedManifestResourceMeta {
        group: key.group.clone(),
        resource: key.resource.clone(),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        version: version.to_string(),
        uid: uid.to_string(),
    }
}

/// Discovery of the manifest's kind; a kind defined by a CRD of the same work is given a few
/// seconds to appear.
async fn resolve_kind(
    ctx: &ReconcileContext,
    p: &ParsedManifest,
    crd_kinds: &KindSet,
) -> Result<Resolved, DiscoveryError> {
    let mut resolved = ctx.resolver.resolve(&p.group, &p.version, &p.kind).await;
    if matches!(resolved, Err(DiscoveryError::UnknownKind { .. }))
        && crd_kinds.contains(&(p.group.clone(), p.kind.clone()))
    {
        for _ in 0..CRD_DISCOVERY_ATTEMPTS {
            tokio::time::sleep(CRD_DISCOVERY_RETRY).await;
            resolved = ctx.resolver.resolve(&p.group, &p.version, &p.kind).await;
            if resolved.is_ok() {
                break;
            }
        }
    }
    resolved
}

/// The namespace the object goes to, noting a default or an ignored namespace in `notes`.
fn namespace_for(p: &ParsedManifest, resolved: &Resolved, notes: &mut Vec<String>) -> String {
    if !resolved.namespaced {
        if p.namespace.is_some() {
            notes.push(format!(
                "{} is cluster-scoped; metadata.namespace was ignored",
                p.kind
            ));
        }
        return String::new();
    }
    match &p.namespace {
        Some(ns) => ns.clone(),
        None => {
            notes.push("metadata.namespace was not set; defaulted to \"default\" (as kubectl does)".into());
            "default".to_string()
        }
    }
}

fn object_key(p: &ParsedManifest, resolved: &Resolved, namespace: String) -> ObjKey {
    ObjKey {
        group: p.group.clone(),
        resource: resolved.ar.plural.clone(),
        namespace,
        name: p.name.clone(),
    }
}

/// The first manifest config whose resource identifier matches the object.
fn config_for<'a>(work: &'a ManifestWork, key: &ObjKey) -> Option<&'a ManifestConfigOption> {
    work.spec.manifest_configs.iter().find(|c| matches_id(c, key))
}

/// Whether a manifest config's resource identifier names `key` (`*` matches any name or namespace).
fn matches_id(cfg: &ManifestConfigOption, key: &ObjKey) -> bool {
    let id = &cfg.resource_identifier;
    id.group == key.group
        && id.resource == key.resource
        && (id.name == key.name || id.name == "*")
        && (id.namespace == key.namespace || id.namespace == "*")
}

/// The strategy's field manager, else the agent's, else OCM's default.
fn field_manager(ctx: &ReconcileContext, ssa: Option<&ServerSideApplyConfig>) -> String {
    ssa.map(|s| s.field_manager.clone())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| {
            if ctx.cfg.field_manager.is_empty() {
                DEFAULT_FIELD_MANAGER.into()
            } else {
                ctx.cfg.field_manager.clone()
            }
        })
}

/// The ignoreFields paths that can be honoured; the others are explained in `notes`.
fn ignore_paths(ssa: Option<&ServerSideApplyConfig>, notes: &mut Vec<String>) -> Vec<IgnorePath> {
    let mut ignore = Vec::new();
    for f in ssa.map(|s| s.ignore_fields.as_slice()).unwrap_or_default() {
        for raw in &f.json_paths {
            match JsonPath::parse(raw) {
                Ok(jp) => match jp.simple() {
                    Some(steps) => ignore.push(IgnorePath {
                        condition: f.condition,
                        raw: raw.clone(),
                        steps: steps.to_vec(),
                    }),
                    None => notes.push(format!("ignoreFields path {raw} uses wildcards or filters, which ignoreFields cannot address; it was not applied")),
                },
                Err(e) => notes.push(format!("ignoreFields {e}; it was not applied")),
            }
        }
    }
    ignore
}

/// The object to write: namespace set or removed, fields only the server may set removed, and
/// (unless ReadOnly) the managed label and, for OnSpokeChange, the spec-hash annotation added.
fn desired_object(
    p: &ParsedManifest,
    resolved: &Resolved,
    namespace: &str,
    strategy: UpdateStrategyType,
    ignore: &[IgnorePath],
) -> Value {
    let mut desired = p.obj.clone();
    if p.group.is_empty() && p.kind == "Secret" {
        normalize_secret(&mut desired);
    }
    let Some(meta) = desired.get_mut("metadata").and_then(Value::as_object_mut) else {
        return desired;
    };
    if resolved.namespaced {
        meta.insert("namespace".into(), Value::String(namespace.to_string()));
    } else {
        meta.remove("namespace");
    }
    for server_owned in ["ownerReferences", "resourceVersion", "uid"] {
        meta.remove(server_owned);
    }
    if strategy == UpdateStrategyType::ReadOnly {
        return desired;
    }
    insert_in(meta, "labels", MANAGED_LABEL, "true".into());
    if ignore
        .iter()
        .any(|ip| ip.condition == IgnoreFieldsCondition::OnSpokeChange)
    {
        insert_in(meta, "annotations", SPEC_HASH_ANNOTATION, p.content_hash.clone());
    }
    desired
}

/// Sets `meta[map][key] = value`, creating the map if needed.
fn insert_in(meta: &mut serde_json::Map<String, Value>, map: &str, key: &str, value: String) {
    let m = meta
        .entry(map)
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = m.as_object_mut() {
        m.insert(key.into(), Value::String(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_identifier_wildcards() {
        let mut c = ManifestConfigOption::default();
        c.resource_identifier.group = "apps".into();
        c.resource_identifier.resource = "deployments".into();
        c.resource_identifier.name = "*".into();
        c.resource_identifier.namespace = "ns".into();
        let key = |ns: &str| ObjKey {
            group: "apps".into(),
            resource: "deployments".into(),
            namespace: ns.into(),
            name: "x".into(),
        };
        assert!(matches_id(&c, &key("ns")));
        assert!(!matches_id(&c, &key("other")));
    }
}
