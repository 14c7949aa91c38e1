//! One reconcile of one work: record intent on the AppliedManifestWork, apply tier by tier,
//! prune what the work no longer has, read feedback, and build the status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::applied_work::{self, applied_name, owner_ref};
use super::applier::{Action, Applier, ApplyError, ApplyOutcome, IgnorePath, Prepared};
use super::claims::Claims;
use super::conditions::{FALSE, TRUE, cond, merge_conditions, now_rfc3339, types};
use super::delete::is_orphaned;
use super::discovery::{DiscoveryError, Resolver};
use super::drift::{DriftWatcher, FlapGuard};
use super::feedback;
use super::jsonpath::JsonPath;
use super::manifestwork::{
    AppliedManifestResourceMeta, AppliedManifestWork, AppliedManifestWorkSpec, DEFAULT_FIELD_MANAGER,
    FeedbackRule, FeedbackValue, FieldValue, IgnoreFieldsCondition, ManifestCondition, ManifestConfigOption,
    ManifestResourceMeta, ManifestResourceStatus, ManifestWork, ManifestWorkStatus, StatusFeedbackResult,
    UpdateStrategyType, ValueType,
};
use super::metrics::WorkMetrics;
use super::object::{MANAGED_LABEL, ObjKey, SPEC_HASH_ANNOTATION, meta_str};
use super::order::plan;
use super::prune::{self, Mode, PruneOutcome, key_of};
use super::validate::{ParsedManifest, parse_manifest};

/// Engine settings a reconcile needs.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Hex SHA-256 of the hub address.
    pub hub_hash: String,
    /// This agent's id (recorded on AppliedManifestWorks).
    pub agent_id: String,
    /// Default field manager.
    pub field_manager: String,
    /// Largest work (JSON bytes of its manifests) accepted.
    pub max_work_bytes: usize,
    /// How long to wait for an applied CRD to become Established.
    pub crd_wait: Duration,
}

/// What every reconcile shares.
pub struct Shared {
    /// The one client.
    pub client: Client,
    /// Settings.
    pub cfg: ReconcileConfig,
    /// Discovery cache.
    pub resolver: Resolver,
    /// Drift cache and watches.
    pub drift: DriftWatcher,
    /// Manifest writer.
    pub applier: Applier,
    /// Who claims what.
    pub claims: Mutex<Claims>,
    /// Bounds concurrent manifest applies across all works.
    pub manifest_permits: Arc<Semaphore>,
    /// Metrics.
    pub metrics: WorkMetrics,
    /// Per (work, ordinal): the flap guard of drift corrections.
    pub flaps: Mutex<HashMap<(String, usize), FlapGuard>>,
    /// Template for new flap guards.
    pub flap_template: FlapGuard,
    /// Per (work, ordinal): drift corrections so far (reported as feedback value `DriftCorrections`).
    pub drift_counts: Mutex<HashMap<(String, usize), i64>>,
    /// Per (work, ordinal): content hash last applied successfully; a later write of the same
    /// content can only be undoing an outside change, i.e. a drift correction.
    pub applied_content: Mutex<HashMap<(String, usize), String>>,
    /// API of the records.
    pub amw_api: Api<AppliedManifestWork>,
    /// Last known copy of each record this agent wrote, so an unchanged reconcile costs no
    /// request. Only an optimisation: a miss (e.g. after a restart) reads the spoke.
    pub amw_cache: Mutex<HashMap<String, AppliedManifestWork>>,
}

impl Shared {
    fn cache_record(&self, amw: &AppliedManifestWork) {
        let mut copy = amw.clone();
        // Never read from the cache, and larger than the rest of the record.
        copy.metadata.managed_fields = None;
        if let Ok(mut c) = self.amw_cache.lock() {
            c.insert(copy.name_any(), copy);
        }
    }

    /// Forgets a cached record (after deleting it, or when a write to it failed).
    pub fn forget_record(&self, name: &str) {
        if let Ok(mut c) = self.amw_cache.lock() {
            c.remove(name);
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Result of a reconcile.
#[derive(Debug, Clone)]
pub struct Report {
    /// The new status (transition times merged with the previous one).
    pub status: ManifestWorkStatus,
    /// Whether something failed and a retry is due.
    pub failed: bool,
    /// Earliest instant a held-back drift correction may run.
    pub hold_until: Option<Instant>,
}

/// Per-manifest outcome while reconciling.
#[derive(Debug, Default, Clone)]
struct ManifestResult {
    /// Identity for status.
    meta: ManifestResourceMeta,
    /// Error (reason, message) if not applied.
    error: Option<(String, String)>,
    /// Remarks for the Applied message.
    notes: Vec<String>,
    /// Object after apply.
    live: Option<Arc<Value>>,
    /// Feedback rules.
    rules: Vec<FeedbackRule>,
    /// Feedback rule errors found before apply.
    rule_errors: Vec<String>,
    /// Strategy.
    strategy: UpdateStrategyType,
    /// What the apply did.
    action: Option<Action>,
    /// Whether this manifest is flapping (backing off).
    flapping: Option<String>,
}

fn matches_id(cfg: &ManifestConfigOption, group: &str, resource: &str, ns: &str, name: &str) -> bool {
    let id = &cfg.resource_identifier;
    id.group == group
        && id.resource == resource
        && (id.name == name || id.name == "*")
        && (id.namespace == ns || id.namespace == "*")
}

/// The AppliedManifestWork record for a work.
pub fn record_name(shared: &Shared, work: &str) -> String {
    applied_name(&shared.cfg.hub_hash, work)
}

/// Reconciles `work`. Never returns an error: every failure ends up in the status.
pub async fn reconcile(shared: &Shared, work: &ManifestWork, prev: &ManifestWorkStatus) -> Report {
    let name = work.name_any();
    let generation = work.metadata.generation.unwrap_or(0);
    let now = now_rfc3339();
    let manifests = &work.spec.workload.manifests;
    let size = work.spec.workload.json_len();
    if size > shared.cfg.max_work_bytes {
        let msg = format!(
            "work is {size} bytes of manifests, over the {} byte limit; nothing was applied and previously applied objects are left as they were",
            shared.cfg.max_work_bytes
        );
        return whole_work_failure(prev, generation, "WorkTooLarge", msg, &now);
    }
    let mut results: Vec<ManifestResult> = (0..manifests.len())
        .map(|i| ManifestResult {
            meta: ManifestResourceMeta {
                ordinal: i as i32,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let mut parsed: Vec<Option<ParsedManifest>> = Vec::with_capacity(manifests.len());
    for (i, m) in manifests.iter().enumerate() {
        let value = m.value().map_err(|e| format!("manifest is not valid JSON: {e}"));
        match value.and_then(|v| parse_manifest(&v)) {
            Ok(p) => {
                let r = &mut results[i].meta;
                r.group = p.group.clone();
                r.version = p.version.clone();
                r.kind = p.kind.clone();
                r.name = p.name.clone();
                r.namespace = p.namespace.clone().unwrap_or_default();
                parsed.push(Some(p));
            }
            Err(e) => {
                results[i].error = Some(("InvalidManifest".into(), e));
                parsed.push(None);
            }
        }
    }
    // CRDs in this work, by (group, kind) they define, so CRs of them get a moment to resolve.
    let crd_kinds: HashSet<(String, String)> = parsed
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
        .collect();

    // Everything that can be named now: the intent to record before writing. Custom resources
    // of CRDs in this work cannot be resolved yet; the per-tier step below records those.
    let mut candidates: Vec<AppliedManifestResourceMeta> = Vec::new();
    for p in parsed.iter().flatten() {
        if crd_kinds.contains(&(p.group.clone(), p.kind.clone())) {
            continue;
        }
        let Ok(res) = shared.resolver.resolve(&p.group, &p.version, &p.kind).await else {
            continue;
        };
        let namespace = if res.namespaced {
            p.namespace.clone().unwrap_or_else(|| "default".to_string())
        } else {
            String::new()
        };
        let read_only = work
            .spec
            .manifest_configs
            .iter()
            .find(|c| matches_id(c, &p.group, &res.ar.plural, &namespace, &p.name))
            .and_then(|c| c.update_strategy.as_ref())
            .is_some_and(|s| s.type_ == UpdateStrategyType::ReadOnly);
        let key = ObjKey {
            group: p.group.clone(),
            resource: res.ar.plural.clone(),
            namespace,
            name: p.name.clone(),
        };
        if read_only || candidates.iter().any(|e| key_of(e) == key) {
            continue;
        }
        candidates.push(AppliedManifestResourceMeta {
            group: key.group,
            resource: key.resource,
            name: key.name,
            namespace: key.namespace,
            version: res.ar.version.clone(),
            uid: String::new(),
        });
    }

    let amw_name = record_name(shared, &name);
    let spec = AppliedManifestWorkSpec {
        hub_hash: shared.cfg.hub_hash.clone(),
        agent_id: shared.cfg.agent_id.clone(),
        manifest_work_name: name.clone(),
    };
    let wanted_option = work.spec.delete_option.clone().unwrap_or_default();
    let cached = shared
        .amw_cache
        .lock()
        .ok()
        .and_then(|c| c.get(&amw_name).cloned())
        .filter(|a| applied_work::recorded_delete_option(a) == wanted_option);
    let amw = match cached {
        Some(a) => a,
        // A record created here already lists the candidates (one write, not two).
        None => match applied_work::ensure(
            &shared.amw_api,
            &amw_name,
            spec,
            work.spec.delete_option.as_ref(),
            &candidates,
        )
        .await
        {
            Ok(a) => {
                shared.cache_record(&a);
                a
            }
            Err(e) => {
                return whole_work_failure(
                    prev,
                    generation,
                    "AppliedManifestWorkFailed",
                    e.to_string(),
                    &now,
                );
            }
        },
    };
    let owner = owner_ref(&amw);
    let mut recorded = applied_work::resources(&amw);
    let recorded_at_start = recorded.clone();

    // Record, in one write, the intent to apply what the record does not list yet.
    let upfront: Vec<AppliedManifestResourceMeta> = candidates
        .into_iter()
        .filter(|c| !recorded.iter().any(|e| key_of(e) == key_of(c)))
        .collect();
    if !upfront.is_empty() {
        recorded.extend(upfront);
        match applied_work::write_resources(&shared.amw_api, &amw_name, &recorded).await {
            Ok(a) => shared.cache_record(&a),
            Err(e) => {
                shared.forget_record(&amw_name);
                let msg = format!("cannot record the resources about to be applied: {e}");
                return whole_work_failure(prev, generation, "AppliedManifestWorkFailed", msg, &now);
            }
        }
    }

    let mut seen: HashMap<ObjKey, usize> = HashMap::new();
    let mut desired_keys: HashSet<ObjKey> = HashSet::new();
    let mut unresolved: Vec<(String, String)> = Vec::new();
    let mut hold_until: Option<Instant> = None;
    let tiers = plan(
        parsed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.group.as_str(), p.kind.as_str()))),
    );

    for (_tier, idxs) in tiers {
        let mut batch: Vec<Prepared> = Vec::new();
        for i in idxs {
            let Some(p) = parsed[i].as_ref() else { continue };
            match prepare(shared, &name, i, p, work, &crd_kinds, &mut results[i]).await {
                Ok(prep) => {
                    if let Some(j) = seen.get(&prep.key) {
                        results[i].error = Some((
                            "DuplicateManifest".into(),
                            format!(
                                "manifest #{i} is the same object as manifest #{j} ({}); only #{j} is applied",
                                prep.key
                            ),
                        ));
                        continue;
                    }
                    seen.insert(prep.key.clone(), i);
                    if prep.strategy != UpdateStrategyType::ReadOnly {
                        let claim = shared
                            .claims
                            .lock()
                            .map(|mut c| c.claim(&prep.key, &name, i, &p.content_hash));
                        if let Ok(Err(other)) = claim {
                            results[i].error = Some((
                                "ConflictingWork".into(),
                                format!(
                                    "{} is already applied by work {other:?} with different content; this work leaves it alone",
                                    prep.key
                                ),
                            ));
                            continue;
                        }
                        desired_keys.insert(prep.key.clone());
                    }
                    batch.push(prep);
                }
                Err(unres) => {
                    if let Some(u) = unres {
                        unresolved.push(u);
                    }
                }
            }
        }
        // Record intent before writing, so a crash between write and record loses nothing.
        let intents: Vec<AppliedManifestResourceMeta> = batch
            .iter()
            .filter(|p| p.strategy != UpdateStrategyType::ReadOnly)
            .filter(|p| !recorded.iter().any(|e| key_of(e) == p.key))
            .map(|p| entry_for(p, ""))
            .collect();
        if !intents.is_empty() {
            recorded.extend(intents);
            match applied_work::write_resources(&shared.amw_api, &amw_name, &recorded).await {
                Ok(a) => shared.cache_record(&a),
                Err(e) => {
                    shared.forget_record(&amw_name);
                    for p in &batch {
                        results[p.ordinal].error = Some((
                            "AppliedManifestWorkFailed".into(),
                            format!("cannot record intent before applying: {e}"),
                        ));
                    }
                    continue;
                }
            }
        }
        // Flap guard: hold back corrections of manifests that keep flipping.
        let instant = Instant::now();
        for p in batch.iter_mut() {
            let key = (name.clone(), p.ordinal);
            if let Ok(mut flaps) = shared.flaps.lock() {
                let g = flaps.entry(key).or_insert_with(|| shared.flap_template.clone());
                if let Err(until) = g.check(instant) {
                    hold_until = Some(hold_until.map_or(until, |h: Instant| h.min(until)));
                    results[p.ordinal].flapping = Some(flap_message(&p.key, g.strikes()));
                    if let super::drift::Live::Present(v) = shared.drift.lookup(&p.key) {
                        results[p.ordinal].live = Some(v);
                    }
                }
            }
        }
        let futs = batch
            .iter()
            .filter(|p| results[p.ordinal].flapping.is_none())
            .map(|p| {
                let owner = owner.clone();
                async move {
                    let _permit = shared.manifest_permits.acquire().await;
                    (p.ordinal, shared.applier.apply(p, &owner).await)
                }
            });
        let outcomes: Vec<(usize, Result<ApplyOutcome, ApplyError>)> = futures::future::join_all(futs).await;
        for (i, out) in outcomes {
            let Some(p) = batch.iter().find(|p| p.ordinal == i) else {
                continue;
            };
            match out {
                Ok(o) => {
                    shared.metrics.applied(match o.action {
                        Action::Created => "created",
                        Action::Updated => "updated",
                        Action::Unchanged => "unchanged",
                        Action::Skipped => "skipped",
                    });
                    note_correction(shared, &name, p, o.action, &mut results[i], &mut hold_until);
                    results[i].notes.extend(o.notes.iter().cloned());
                    results[i].action = Some(o.action);
                    if p.resolved.ar.group == "apiextensions.k8s.io"
                        && p.resolved.ar.kind == "CustomResourceDefinition"
                        && let Err(e) =
                            applied_work::wait_established(&shared.client, &p.key.name, shared.cfg.crd_wait)
                                .await
                    {
                        results[i].error = Some(("CRDNotEstablished".into(), e.to_string()));
                    }
                    results[i].live = Some(o.live);
                }
                Err(e) => {
                    shared.metrics.applied("failed");
                    // A cached kind the server no longer serves (its CRD was deleted): look again next time.
                    if matches!(e, ApplyError::Rejected { code: 404, .. }) {
                        shared.resolver.forget(&kube::api::GroupVersionKind::gvk(
                            &p.resolved.ar.group,
                            &p.resolved.ar.version,
                            &p.resolved.ar.kind,
                        ));
                    }
                    results[i].error = Some((e.reason().to_string(), e.to_string()));
                }
            }
        }
        // Replace intents with UIDs for what got applied.
        for p in &batch {
            if p.strategy == UpdateStrategyType::ReadOnly {
                continue;
            }
            let uid = results[p.ordinal]
                .live
                .as_deref()
                .and_then(|l| meta_str(l, "uid"))
                .map(str::to_string);
            if let Some(uid) = uid
                && let Some(e) = recorded.iter_mut().find(|e| key_of(e) == p.key)
            {
                *e = entry_for(p, &uid);
            }
        }
    }

    // Prune what the record lists but the work no longer has.
    let mut prune_errors = Vec::new();
    let owner_uid = amw.uid().unwrap_or_default();
    let mut kept = Vec::new();
    for e in recorded {
        let key = key_of(&e);
        if desired_keys.contains(&key) {
            kept.push(e);
            continue;
        }
        // A manifest that failed to resolve might be this very object: keep it until it resolves.
        if unresolved.iter().any(|(g, n)| *g == e.group && *n == e.name) {
            kept.push(e);
            continue;
        }
        let elsewhere = shared
            .claims
            .lock()
            .map(|c| c.claimed_elsewhere(&key, &name))
            .unwrap_or(true);
        match prune::remove(&shared.client, &e, &owner_uid, elsewhere, Mode::Delete).await {
            Ok(out) => {
                tracing::info!(work = %name, object = %key, outcome = ?out, "pruned object no longer in the work");
                if out != PruneOutcome::NotOurs {
                    shared.drift.record_delete(&key);
                }
            }
            Err(err) => {
                prune_errors.push(err.to_string());
                kept.push(e);
            }
        }
    }
    if kept != recorded_at_start {
        match applied_work::write_resources(&shared.amw_api, &amw_name, &kept).await {
            Ok(a) => shared.cache_record(&a),
            Err(e) => {
                shared.forget_record(&amw_name);
                prune_errors.push(format!("cannot update the applied-resource record: {e}"));
            }
        }
    }
    if let Ok(mut c) = shared.claims.lock() {
        c.retain_work(&name, &desired_keys);
    }
    let counts = shared.drift_counts.lock().map(|c| c.clone()).unwrap_or_default();
    let status = build_status(&name, generation, &results, &prune_errors, &counts, prev, &now);
    let failed = results.iter().any(|r| r.error.is_some()) || !prune_errors.is_empty();
    Report {
        status,
        failed,
        hold_until,
    }
}

/// Stable (per back-off step) message for a flapping object, so status is not re-sent per flip.
fn flap_message(key: &ObjKey, strikes: u32) -> String {
    format!(
        "{key} keeps being changed on the spoke; corrections are paused with exponential back-off (step {strikes})"
    )
}

fn entry_for(p: &Prepared, uid: &str) -> AppliedManifestResourceMeta {
    AppliedManifestResourceMeta {
        group: p.key.group.clone(),
        resource: p.key.resource.clone(),
        name: p.key.name.clone(),
        namespace: p.key.namespace.clone(),
        version: p.resolved.ar.version.clone(),
        uid: uid.to_string(),
    }
}

/// Counts a write of already-applied content as a drift correction, and feeds the flap guard.
fn note_correction(
    shared: &Shared,
    work: &str,
    p: &Prepared,
    action: Action,
    r: &mut ManifestResult,
    hold: &mut Option<Instant>,
) {
    let key = (work.to_string(), p.ordinal);
    let content = p.spec_hash.clone();
    let before = shared
        .applied_content
        .lock()
        .ok()
        .and_then(|mut m| m.insert(key.clone(), content.clone()));
    if !matches!(action, Action::Created | Action::Updated) || before.as_deref() != Some(content.as_str()) {
        return;
    }
    shared.metrics.drift_corrected(work);
    if let Ok(mut c) = shared.drift_counts.lock() {
        *c.entry(key.clone()).or_insert(0) += 1;
    }
    tracing::info!(work, object = %p.key, "corrected drift");
    if let Ok(mut flaps) = shared.flaps.lock() {
        let g = flaps.entry(key).or_insert_with(|| shared.flap_template.clone());
        if let Some(until) = g.record(Instant::now()) {
            let secs = until.saturating_duration_since(Instant::now()).as_secs().max(1);
            tracing::warn!(work, object = %p.key, backoff_s = secs, "object keeps being changed on the spoke; backing off corrections");
            r.flapping = Some(flap_message(&p.key, g.strikes()));
            *hold = Some(hold.map_or(until, |h| h.min(until)));
        }
    }
}

/// Resolves and prepares one manifest. Err(Some((group, name))) marks an unresolved kind.
async fn prepare(
    shared: &Shared,
    work_name: &str,
    i: usize,
    p: &ParsedManifest,
    work: &ManifestWork,
    crd_kinds: &HashSet<(String, String)>,
    r: &mut ManifestResult,
) -> Result<Prepared, Option<(String, String)>> {
    let _ = work_name;
    let mut resolved = shared.resolver.resolve(&p.group, &p.version, &p.kind).await;
    // A CRD applied moments ago in this same work may take a moment to show in discovery.
    if matches!(resolved, Err(DiscoveryError::UnknownKind { .. }))
        && crd_kinds.contains(&(p.group.clone(), p.kind.clone()))
    {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            resolved = shared.resolver.resolve(&p.group, &p.version, &p.kind).await;
            if resolved.is_ok() {
                break;
            }
        }
    }
    let resolved = match resolved {
        Ok(x) => x,
        Err(e) => {
            let reason = if matches!(e, DiscoveryError::UnknownKind { .. }) {
                "UnknownKind"
            } else {
                "DiscoveryFailed"
            };
            r.error = Some((reason.into(), e.to_string()));
            return Err(Some((p.group.clone(), p.name.clone())));
        }
    };
    r.meta.resource = resolved.ar.plural.clone();
    let namespace = if resolved.namespaced {
        match &p.namespace {
            Some(ns) => ns.clone(),
            None => {
                r.notes.push(
                    "metadata.namespace was not set; defaulted to \"default\" (as kubectl does)".into(),
                );
                "default".to_string()
            }
        }
    } else {
        if p.namespace.is_some() {
            r.notes.push(format!(
                "{} is cluster-scoped; metadata.namespace was ignored",
                p.kind
            ));
        }
        String::new()
    };
    r.meta.namespace = namespace.clone();
    let config = work
        .spec
        .manifest_configs
        .iter()
        .find(|c| matches_id(c, &p.group, &resolved.ar.plural, &namespace, &p.name));
    let strategy = config.and_then(|c| c.update_strategy.as_ref());
    let strategy_type = strategy.map(|s| s.type_).unwrap_or_default();
    let ssa = strategy.and_then(|s| s.server_side_apply.as_ref());
    let field_manager = ssa
        .map(|s| s.field_manager.clone())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| {
            if shared.cfg.field_manager.is_empty() {
                DEFAULT_FIELD_MANAGER.into()
            } else {
                shared.cfg.field_manager.clone()
            }
        });
    let mut ignore = Vec::new();
    for f in ssa.map(|s| s.ignore_fields.as_slice()).unwrap_or_default() {
        for raw in &f.json_paths {
            match JsonPath::parse(raw) {
                Ok(jp) => match jp.simple() {
                    Some(steps) => ignore.push(IgnorePath { condition: f.condition, raw: raw.clone(), steps: steps.to_vec() }),
                    None => r.notes.push(format!("ignoreFields path {raw} uses wildcards or filters, which ignoreFields cannot address; it was not applied")),
                },
                Err(e) => r.notes.push(format!("ignoreFields {e}; it was not applied")),
            }
        }
    }
    if let Some(c) = config {
        r.rules = c.feedback_rules.clone();
        r.rule_errors = feedback::validate_rules(&c.feedback_rules);
    }
    r.strategy = strategy_type;
    let mut desired = p.obj.clone();
    if p.group.is_empty() && p.kind == "Secret" {
        super::object::normalize_secret(&mut desired);
    }
    if let Some(meta) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        if resolved.namespaced {
            meta.insert("namespace".into(), Value::String(namespace.clone()));
        } else {
            meta.remove("namespace");
        }
        meta.remove("ownerReferences");
        meta.remove("resourceVersion");
        meta.remove("uid");
        if strategy_type != UpdateStrategyType::ReadOnly {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(l) = labels.as_object_mut() {
                l.insert(MANAGED_LABEL.into(), Value::String("true".into()));
            }
            if ignore
                .iter()
                .any(|ip| ip.condition == IgnoreFieldsCondition::OnSpokeChange)
            {
                let ann = meta
                    .entry("annotations")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(a) = ann.as_object_mut() {
                    a.insert(SPEC_HASH_ANNOTATION.into(), Value::String(p.content_hash.clone()));
                }
            }
        }
    }
    let key = ObjKey {
        group: p.group.clone(),
        resource: resolved.ar.plural.clone(),
        namespace,
        name: p.name.clone(),
    };
    Ok(Prepared {
        ordinal: i,
        resolved,
        key,
        desired,
        strategy: strategy_type,
        force: ssa.map(|s| s.force).unwrap_or(false),
        field_manager,
        ignore,
        spec_hash: p.content_hash.clone(),
    })
}

/// Status for a work rejected as a whole (too large, record unavailable).
fn whole_work_failure(
    prev: &ManifestWorkStatus,
    generation: i64,
    reason: &str,
    msg: String,
    now: &str,
) -> Report {
    let conds = vec![
        cond(types::APPLIED, FALSE, reason, msg.clone(), generation),
        cond(types::AVAILABLE, FALSE, reason, "nothing was applied", generation),
        cond(
            types::PROGRESSING,
            FALSE,
            reason,
            "the work cannot be applied as it is",
            generation,
        ),
        cond(types::DEGRADED, TRUE, reason, msg, generation),
    ];
    let status = ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, now),
        resource_status: ManifestResourceStatus::default(),
    };
    Report {
        status,
        failed: true,
        hold_until: None,
    }
}

fn build_status(
    work: &str,
    generation: i64,
    results: &[ManifestResult],
    prune_errors: &[String],
    counts: &HashMap<(String, usize), i64>,
    prev: &ManifestWorkStatus,
    now: &str,
) -> ManifestWorkStatus {
    let mut manifests = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    let mut unavailable = 0usize;
    let mut flapping = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let mut conds = Vec::new();
        let notes = if r.notes.is_empty() {
            String::new()
        } else {
            format!("; {}", r.notes.join("; "))
        };
        match &r.error {
            Some((reason, msg)) => {
                conds.push(cond(
                    types::APPLIED,
                    FALSE,
                    reason,
                    format!("{msg}{notes}"),
                    generation,
                ));
                failed.push(format!("#{i} {} {}: {msg}", r.meta.kind, display_name(&r.meta)));
            }
            None => {
                let base = match (r.strategy, r.action) {
                    (UpdateStrategyType::ReadOnly, _) => "Read-only: status feedback only, never written",
                    (UpdateStrategyType::CreateOnly, Some(Action::Skipped)) => {
                        "CreateOnly: the object exists and is left as it is"
                    }
                    _ => "Apply manifest complete",
                };
                conds.push(cond(
                    types::APPLIED,
                    TRUE,
                    "AppliedManifestComplete",
                    format!("{base}{notes}"),
                    generation,
                ));
            }
        }
        let values = match &r.live {
            Some(live) => {
                conds.push(cond(
                    types::AVAILABLE,
                    TRUE,
                    "ResourceAvailable",
                    "Resource is available",
                    generation,
                ));
                let fb = feedback::evaluate(&r.rules, &r.meta.group, &r.meta.kind, &r.meta.version, live);
                let mut errs = r.rule_errors.clone();
                for e in fb.errors {
                    if !errs.contains(&e) {
                        errs.push(e);
                    }
                }
                if !r.rules.is_empty() {
                    if errs.is_empty() {
                        conds.push(cond(
                            types::FEEDBACK_SYNCED,
                            TRUE,
                            "StatusFeedbackSynced",
                            "",
                            generation,
                        ));
                    } else {
                        conds.push(cond(
                            types::FEEDBACK_SYNCED,
                            FALSE,
                            "StatusFeedbackSyncFailed",
                            errs.join("; "),
                            generation,
                        ));
                    }
                }
                fb.values
            }
            None => {
                unavailable += 1;
                conds.push(cond(
                    types::AVAILABLE,
                    FALSE,
                    "ResourceNotAvailable",
                    "Resource is not available",
                    generation,
                ));
                if !r.rules.is_empty() {
                    let msg = if r.rule_errors.is_empty() {
                        "the object is not available".to_string()
                    } else {
                        r.rule_errors.join("; ")
                    };
                    conds.push(cond(
                        types::FEEDBACK_SYNCED,
                        FALSE,
                        "StatusFeedbackSyncFailed",
                        msg,
                        generation,
                    ));
                }
                Vec::new()
            }
        };
        let mut values = values;
        if let Some(n) = counts.get(&(work.to_string(), i)).filter(|n| **n > 0) {
            values.push(FeedbackValue {
                name: "DriftCorrections".into(),
                field_value: FieldValue {
                    type_: ValueType::Integer,
                    integer: Some(*n),
                    ..Default::default()
                },
            });
        }
        if let Some(f) = &r.flapping {
            flapping.push(format!("#{i} {f}"));
        }
        let prev_conds = prev
            .resource_status
            .manifests
            .get(i)
            .map(|m| m.conditions.as_slice())
            .unwrap_or_default();
        manifests.push(ManifestCondition {
            resource_meta: r.meta.clone(),
            status_feedback: StatusFeedbackResult { values },
            conditions: merge_conditions(prev_conds, conds, now),
        });
    }
    let n = results.len();
    let mut conds = Vec::new();
    if failed.is_empty() {
        conds.push(cond(
            types::APPLIED,
            TRUE,
            "AppliedManifestWorkComplete",
            "Apply manifest work complete",
            generation,
        ));
    } else {
        conds.push(cond(
            types::APPLIED,
            FALSE,
            "AppliedManifestWorkFailed",
            truncate(
                format!(
                    "{} of {n} manifests failed to apply: {}",
                    failed.len(),
                    failed.join("; ")
                ),
                4096,
            ),
            generation,
        ));
    }
    if unavailable == 0 {
        conds.push(cond(
            types::AVAILABLE,
            TRUE,
            "ResourcesAvailable",
            "All resources are available",
            generation,
        ));
    } else {
        conds.push(cond(
            types::AVAILABLE,
            FALSE,
            "ResourcesNotAvailable",
            format!("{unavailable} of {n} resources are not available"),
            generation,
        ));
    }
    if failed.is_empty() && prune_errors.is_empty() {
        conds.push(cond(
            types::PROGRESSING,
            FALSE,
            "AppliedManifestWorkComplete",
            "All manifests are applied",
            generation,
        ));
    } else {
        conds.push(cond(
            types::PROGRESSING,
            TRUE,
            "ApplyRetrying",
            "Failed manifests are retried with back-off",
            generation,
        ));
    }
    if !flapping.is_empty() {
        conds.push(cond(
            types::DEGRADED,
            TRUE,
            "DriftFlapping",
            truncate(flapping.join("; "), 4096),
            generation,
        ));
    } else if !failed.is_empty() {
        conds.push(cond(
            types::DEGRADED,
            TRUE,
            "ApplyFailed",
            format!("{} of {n} manifests failed to apply", failed.len()),
            generation,
        ));
    } else if !prune_errors.is_empty() {
        conds.push(cond(
            types::DEGRADED,
            TRUE,
            "PruneFailed",
            truncate(prune_errors.join("; "), 4096),
            generation,
        ));
    } else {
        conds.push(cond(types::DEGRADED, FALSE, "AsExpected", "", generation));
    }
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, now),
        resource_status: ManifestResourceStatus { manifests },
    }
}

fn display_name(m: &ManifestResourceMeta) -> String {
    if m.namespace.is_empty() {
        m.name.clone()
    } else {
        format!("{}/{}", m.namespace, m.name)
    }
}

fn truncate(mut s: String, max: usize) -> String {
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

/// Status of a work while (and after) it is deleted.
pub fn deletion_status(
    prev: &ManifestWorkStatus,
    generation: i64,
    remaining: Option<(usize, usize)>,
    error: Option<&str>,
) -> ManifestWorkStatus {
    let now = now_rfc3339();
    let mut conds: Vec<_> = prev
        .conditions
        .iter()
        .filter(|c| c.type_ != types::DELETING && c.type_ != types::DELETED)
        .cloned()
        .collect();
    match (remaining, error) {
        (_, Some(e)) => conds.push(cond(types::DELETING, TRUE, "DeletionFailed", e, generation)),
        (Some((left, total)), None) if left > 0 => conds.push(cond(
            types::DELETING,
            TRUE,
            "ManifestsDeleting",
            format!("{left} of {total} resources still being deleted"),
            generation,
        )),
        _ => {
            conds.push(cond(
                types::DELETING,
                FALSE,
                "ManifestsDeleted",
                "All resources are deleted or orphaned",
                generation,
            ));
            conds.push(cond(
                types::DELETED,
                TRUE,
                "ManifestsDeleted",
                "All resources are deleted or orphaned",
                generation,
            ));
        }
    }
    ManifestWorkStatus {
        conditions: merge_conditions(&prev.conditions, conds, &now),
        resource_status: prev.resource_status.clone(),
    }
}

/// Whether an entry would be orphaned (re-exported for the engine's logs).
pub fn orphaned(option: &super::manifestwork::DeleteOption, e: &AppliedManifestResourceMeta) -> bool {
    is_orphaned(option, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::conditions::find;

    fn ok(i: usize, kind: &str) -> ManifestResult {
        ManifestResult {
            meta: ManifestResourceMeta {
                ordinal: i as i32,
                kind: kind.into(),
                name: format!("n{i}"),
                version: "v1".into(),
                ..Default::default()
            },
            live: Some(Arc::new(serde_json::json!({"status": {"readyReplicas": 2}}))),
            ..Default::default()
        }
    }

    #[test]
    fn status_conditions_transitions() {
        let results = vec![ok(0, "ConfigMap"), ok(1, "ConfigMap")];
        let s1 = build_status(
            "w",
            3,
            &results,
            &[],
            &HashMap::new(),
            &ManifestWorkStatus::default(),
            "t1",
        );
        let applied = find(&s1.conditions, "Applied").unwrap();
        assert_eq!(
            (applied.status.as_str(), applied.observed_generation),
            ("True", 3)
        );
        assert_eq!(find(&s1.conditions, "Degraded").unwrap().status, "False");
        // Same outcome later: identical status, identical hash.
        let s2 = build_status("w", 3, &results, &[], &HashMap::new(), &s1, "t2");
        assert_eq!(
            crate::work::conditions::status_hash(&s1),
            crate::work::conditions::status_hash(&s2)
        );
        // A failure flips Applied and Degraded with a per-manifest message.
        let mut bad = results.clone();
        bad[1].error = Some(("Invalid".into(), "field is immutable".into()));
        bad[1].live = None;
        let s3 = build_status("w", 3, &bad, &[], &HashMap::new(), &s2, "t3");
        let a = find(&s3.conditions, "Applied").unwrap();
        assert_eq!(
            (a.status.as_str(), a.last_transition_time.as_str()),
            ("False", "t3")
        );
        assert!(a.message.contains("field is immutable"), "{}", a.message);
        assert_eq!(find(&s3.conditions, "Degraded").unwrap().status, "True");
        assert_eq!(find(&s3.conditions, "Progressing").unwrap().status, "True");
        let m1 = &s3.resource_status.manifests[1];
        assert_eq!(find(&m1.conditions, "Applied").unwrap().reason, "Invalid");
        assert_eq!(find(&m1.conditions, "Available").unwrap().status, "False");
    }

    #[test]
    fn drift_count_is_feedback() {
        let results = vec![ok(0, "ConfigMap")];
        let mut counts = HashMap::new();
        counts.insert(("w".to_string(), 0), 4);
        let s = build_status(
            "w",
            1,
            &results,
            &[],
            &counts,
            &ManifestWorkStatus::default(),
            "t",
        );
        let v = &s.resource_status.manifests[0].status_feedback.values[0];
        assert_eq!(
            (v.name.as_str(), v.field_value.integer),
            ("DriftCorrections", Some(4))
        );
    }

    #[test]
    fn deletion_progress_then_deleted() {
        let s = deletion_status(&ManifestWorkStatus::default(), 2, Some((3, 5)), None);
        let d = find(&s.conditions, "Deleting").unwrap();
        assert_eq!(d.status, "True");
        assert!(d.message.contains("3 of 5"));
        let s = deletion_status(&s, 2, Some((0, 5)), None);
        assert_eq!(find(&s.conditions, "Deleted").unwrap().status, "True");
        assert_eq!(find(&s.conditions, "Deleted").unwrap().reason, "ManifestsDeleted");
    }

    #[test]
    fn resource_identifier_wildcards() {
        let mut c = ManifestConfigOption::default();
        c.resource_identifier.group = "apps".into();
        c.resource_identifier.resource = "deployments".into();
        c.resource_identifier.name = "*".into();
        c.resource_identifier.namespace = "ns".into();
        assert!(matches_id(&c, "apps", "deployments", "ns", "x"));
        assert!(!matches_id(&c, "apps", "deployments", "other", "x"));
    }
}
