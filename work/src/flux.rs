//! The Flux step of a reconcile: a work's `OCIRepository` and `Kustomization` manifests are
//! not sent to the API server. Their artifacts are fetched and built into plain manifests,
//! appended to the work's own, and the rest of the reconcile applies, records, prunes and
//! watches those like any other, so an object from an artifact is corrected as fast as an
//! inline one. The Flux entries' status gets a `Ready` condition and feedback values.
//!
//! [`expand`] runs before the reconcile's other steps, [`finish`] after the applies. What a
//! work's Flux objects fetched and built is kept in its [`FluxMemory`] between reconciles: a
//! reconcile caused by drift costs no registry request and no build, and a source is looked at
//! again only when its `interval` has passed.
//!
//! Never losing a workload: a failed pull or build keeps the last good build applied; with no
//! good build at all (after a restart, a suspended Kustomization, an unready dependency)
//! nothing of the work is pruned in that reconcile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use spokelet_artifact::registry::Pulled;
use spokelet_flux::build::{BuildError, BuildLimits, Overlay, build};
use spokelet_flux::health::{Health, health};
use spokelet_flux::objects::{
    self, FluxKind, FluxObject, KustomizationSpec, OciRepositorySpec, ReadRef, SpecError, duration,
};
/// Re-exported: the setting and the shared state live with the Flux crate.
pub use spokelet_flux::shared::{FluxObjects, FluxSupport};
pub use spokelet_flux::source::InsecureRegistries;
use spokelet_flux::substitute;
use tokio::time::Instant;

use super::conditions::{FALSE, TRUE, UNKNOWN, cond};
use super::context::ReconcileContext;
use super::failure::ManifestFailure;
use super::manifestwork::{FeedbackValue, FieldValue, Manifest, ManifestWork, ValueType};
use super::policy::{DENIED_REASON, Target};
use super::status::ManifestResult;
use super::validate::WorkLimits;

/// The labels Flux's kustomize-controller puts on what it applies; kept so tools that look
/// for them (and `kubectl get -l`) find objects from artifacts the same way.
pub const NAME_LABEL: &str = "kustomize.toolkit.fluxcd.io/name";
pub const NAMESPACE_LABEL: &str = "kustomize.toolkit.fluxcd.io/namespace";

/// How soon a failed source is looked at again (or its interval, when shorter): a registry
/// that was down is retried without waiting an interval of often many minutes.
const FAILED_SOURCE_RECHECK: Duration = Duration::from_secs(10);

/// What a work's Flux objects fetched and built, kept between its reconciles.
#[derive(Debug, Default)]
pub struct FluxMemory {
    /// By `namespace/name` of the OCIRepository.
    sources: HashMap<String, SourceMemory>,
    /// By `namespace/name` of the Kustomization.
    builds: HashMap<String, BuildMemory>,
}

#[derive(Debug)]
struct SourceMemory {
    /// The spec last fetched for: a changed spec is fetched again at once.
    spec: OciRepositorySpec,
    /// The last good artifact (kept through failures).
    pulled: Option<Pulled>,
    checked: Instant,
    /// Why the last fetch failed: (reason, message).
    error: Option<Failure>,
    /// The last fetch failed its signature verification.
    unverified: bool,
}

#[derive(Debug)]
struct BuildMemory {
    /// Hash of what the build came from (revision, spec, variables).
    key: String,
    /// Hash of the revision and spec alone: while it holds and the interval lasts, the build
    /// is reused without reading the variables again.
    source_key: String,
    /// The last good build.
    manifests: Arc<Vec<Manifest>>,
    revision: String,
    built: Instant,
    /// The revision whose objects were all applied (and healthy, with `wait`).
    last_applied: Option<String>,
    ready: bool,
}

/// A condition as (status, reason, message).
type Cond = (&'static str, &'static str, String);
/// A failure as (reason, message).
type Failure = (&'static str, String);

/// The result of a Flux object in this reconcile, for its status entry.
#[derive(Debug)]
struct Native {
    kind: FluxKind,
    /// `namespace/name`.
    id: String,
    error: Option<Failure>,
    ready: Cond,
    values: Vec<FeedbackValue>,
    /// Whether it has something to serve (an artifact, applied objects): Available.
    usable: bool,
    /// A Kustomization's objects: their ordinals in the expanded work.
    objects: Range<usize>,
    /// Health-check every object (`wait`) or these (`healthChecks`: kind, namespace, name).
    wait: bool,
    health_checks: Vec<(String, String, String)>,
    revision: Option<String>,
    /// A source with `verify`: its SourceVerified condition (status, reason, message).
    verified: Option<Cond>,
}

/// The work's Flux objects in this reconcile.
#[derive(Debug, Default)]
pub struct Expansion {
    /// Manifests built from artifacts, appended after the work's own.
    pub built: Vec<Manifest>,
    /// By ordinal of the work's Flux manifests.
    natives: BTreeMap<usize, Native>,
    /// Nothing may be pruned in this reconcile: a Kustomization has no build to say what it
    /// wants.
    pub keep_all: bool,
    /// When a source or build is due to be looked at again.
    pub recheck_at: Option<Instant>,
    /// Kustomizations (name, namespace) with `prune: false`: what leaves their build is
    /// released, not deleted.
    pub no_prune: HashSet<(String, String)>,
    /// Ordinals (in the expanded work) of objects built by Kustomizations with `force: true`:
    /// an apply refused for an immutable field deletes and recreates them.
    pub recreate: HashSet<usize>,
}

impl Expansion {
    /// Ordinals of the work's manifests that are reconciled here, not sent to the API server.
    pub fn is_native(&self, ordinal: usize) -> bool {
        self.natives.contains_key(&ordinal)
    }

    /// `work` with the built manifests appended (None when nothing was built).
    pub fn expanded(&self, work: &ManifestWork) -> Option<ManifestWork> {
        if self.built.is_empty() {
            return None;
        }
        let mut w = work.clone();
        w.spec.workload.manifests.extend(self.built.iter().cloned());
        Some(w)
    }

    fn due(&mut self, at: Instant) {
        self.recheck_at = Some(self.recheck_at.map_or(at, |r| r.min(at)));
    }
}

/// Fetches and builds the work's Flux objects. None when it has none (or they pass through).
///
/// Every Secret and ConfigMap the Flux objects name is read as `reader`, the work's identity
/// (its executor when it names one, else the agent), and only after the write policy allowed
/// the Flux object and what it reads.
pub async fn expand(
    ctx: &ReconcileContext,
    work: &ManifestWork,
    reader: &Client,
    memory: &mut FluxMemory,
) -> Option<Expansion> {
    let support = ctx.flux.as_ref()?;
    let mut repos = Vec::new();
    let mut kustomizations = Vec::new();
    for (i, m) in work.spec.workload.manifests.iter().enumerate() {
        let Ok(v) = m.value() else { continue };
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        match FluxKind::of(&text("apiVersion"), &text("kind")) {
            Some(FluxKind::OciRepository) => repos.push((i, v)),
            Some(FluxKind::Kustomization) => kustomizations.push((i, v)),
            None => {}
        }
    }
    if repos.is_empty() && kustomizations.is_empty() {
        *memory = FluxMemory::default();
        return None;
    }
    let _expanding = support.expansions.clone().acquire_owned().await.ok();
    let name = work.metadata.name.clone().unwrap_or_default();
    let mut x = Expansion::default();
    let mut sources: HashMap<String, Option<Pulled>> = HashMap::new();
    let mut downloaded = false;
    for (i, v) in repos {
        let (native, pulled, new) = source_step(ctx, support, reader, &v, memory, &mut x).await;
        downloaded |= new;
        sources.insert(native.id.clone(), pulled);
        x.natives.insert(i, native);
    }
    let held = memory
        .sources
        .values()
        .filter_map(|s| s.pulled.as_ref())
        .map(|p| p.layer.clone())
        .collect();
    support.hold(&name, held, downloaded);
    let first_built = work.spec.workload.manifests.len();
    let limit = ctx.cfg.limits.max_manifests.saturating_sub(first_built);
    for (i, v) in kustomizations {
        let step = KustomizationStep {
            ctx,
            reader,
            sources: &sources,
            first_built,
            limit,
        };
        let native = step.run(&v, memory, &mut x).await;
        x.natives.insert(i, native);
    }
    // Forget what the work no longer has.
    let ids: HashSet<&String> = x.natives.values().map(|n| &n.id).collect();
    memory.sources.retain(|k, _| ids.contains(k));
    memory.builds.retain(|k, _| ids.contains(k));
    Some(x)
}

/// One OCIRepository: fetched when due. Returns its result, its artifact (the last good one
/// through failures) and whether a layer was downloaded.
async fn source_step(
    ctx: &ReconcileContext,
    support: &FluxSupport,
    reader: &Client,
    v: &Value,
    memory: &mut FluxMemory,
    x: &mut Expansion,
) -> (Native, Option<Pulled>, bool) {
    let mut native = Native::new(FluxKind::OciRepository, v);
    let repo = match objects::oci_repository(v) {
        Ok(r) => r,
        Err(e) => {
            native.fail(spec_reason(&e), e.to_string());
            return (native, None, false);
        }
    };
    if let Some(message) = refused_by_policy(ctx, FluxKind::OciRepository, &repo, &repo.spec.reads()) {
        native.fail(DENIED_REASON, message);
        return (native, None, false);
    }
    let fetcher = match &support.fetcher {
        Ok(f) => f,
        Err(e) => {
            native.fail("ArtifactCacheUnavailable", e.clone());
            return (native, None, false);
        }
    };
    let interval = duration(&repo.spec.interval, "interval").unwrap_or(Duration::from_secs(600));
    let now = Instant::now();
    let known = memory.sources.get(&native.id);
    let due = match known {
        None => true,
        Some(m) if m.spec != repo.spec => true,
        Some(m) if m.error.is_some() => now >= m.checked + interval.min(FAILED_SOURCE_RECHECK),
        Some(m) => now >= m.checked + interval,
    };
    let mut downloaded = false;
    if due && !(repo.spec.suspend && known.is_some_and(|m| m.pulled.is_some())) {
        // A changed spec (a `verify` just added, say) must not be satisfied by what the old
        // spec fetched: only its cached layer is reused.
        let last = known
            .filter(|m| m.spec == repo.spec)
            .and_then(|m| m.pulled.clone());
        let result = fetcher.fetch(reader, &repo, last.as_ref()).await;
        let entry = memory
            .sources
            .entry(native.id.clone())
            .or_insert_with(|| SourceMemory {
                spec: repo.spec.clone(),
                pulled: None,
                checked: now,
                error: None,
                unverified: false,
            });
        entry.spec = repo.spec.clone();
        entry.checked = now;
        match result {
            Ok(p) => {
                if entry.pulled.as_ref().map(|l| &l.revision) != Some(&p.revision) {
                    tracing::info!(source = %native.id, revision = %p.revision, downloaded = p.downloaded, "fetched artifact");
                }
                downloaded = p.downloaded;
                entry.pulled = Some(p);
                entry.error = None;
                entry.unverified = false;
            }
            Err(e) => {
                tracing::warn!(source = %native.id, error = %e, "cannot fetch artifact; keeping the last good one");
                entry.error = Some((e.reason(), e.to_string()));
                entry.unverified = e.is_verification();
            }
        }
    }
    let Some(m) = memory.sources.get(&native.id) else {
        return (native, None, false);
    };
    let wait = if m.error.is_some() {
        interval.min(FAILED_SOURCE_RECHECK)
    } else {
        interval
    };
    x.due(m.checked + wait);
    if repo.spec.verify.is_some() {
        native.verified = Some(match (&m.error, m.unverified) {
            (Some((reason, msg)), true) => (FALSE, *reason, msg.clone()),
            _ => match &m.pulled {
                Some(p) => (
                    TRUE,
                    "Succeeded",
                    format!("verified signature of revision {}", p.revision),
                ),
                None => (UNKNOWN, "Progressing", "not fetched yet".into()),
            },
        });
    }
    let pulled = m.pulled.clone();
    if let Some(p) = &pulled {
        native.usable = true;
        native.revision = Some(p.revision.clone());
        native.values.push(string_value("artifactRevision", &p.revision));
        native
            .values
            .push(string_value("artifactDigest", &p.manifest.to_string()));
    }
    match (&m.error, &pulled) {
        (Some((reason, msg)), Some(p)) => {
            native.fail(reason, format!("{msg}; still serving revision {}", p.revision))
        }
        (Some((reason, msg)), None) => native.fail(reason, msg.clone()),
        (None, Some(p)) if repo.spec.suspend => {
            native.ready = (
                TRUE,
                "Suspended",
                format!("suspended; serving revision {}", p.revision),
            );
        }
        (None, Some(p)) => {
            native.ready = (
                TRUE,
                "Succeeded",
                format!("stored artifact for revision '{}'", p.revision),
            );
        }
        (None, None) => native.ready = (UNKNOWN, "Suspended", "suspended before its first fetch".into()),
    }
    (native, pulled, downloaded)
}

/// What every Kustomization of a work is built with.
struct KustomizationStep<'a> {
    ctx: &'a ReconcileContext,
    /// The work's identity, for the variables' Secrets and ConfigMaps.
    reader: &'a Client,
    /// The work's sources' artifacts, by `namespace/name`.
    sources: &'a HashMap<String, Option<Pulled>>,
    /// The ordinal the first built manifest gets (after the work's own).
    first_built: usize,
    /// How many objects builds may still add within the work's manifest limit.
    limit: usize,
}

impl KustomizationStep<'_> {
    /// One Kustomization: built from its source's artifact when anything it depends on changed,
    /// its manifests appended to `x.built`.
    async fn run(&self, v: &Value, memory: &mut FluxMemory, x: &mut Expansion) -> Native {
        let (ctx, first_built) = (self.ctx, self.first_built);
        let mut native = Native::new(FluxKind::Kustomization, v);
        let ks = match objects::kustomization(v) {
            Ok(k) => k,
            Err(e) => {
                native.fail(spec_reason(&e), e.to_string());
                x.keep_all = true;
                return native;
            }
        };
        if let Some(message) = refused_by_policy(ctx, FluxKind::Kustomization, &ks, &ks.spec.reads()) {
            native.fail(DENIED_REASON, message);
            x.keep_all = true;
            return native;
        }
        if !ks.spec.prune {
            x.no_prune.insert((ks.name.clone(), ks.namespace.clone()));
        }
        let force = ks.spec.force;
        native.wait = ks.spec.wait;
        native.health_checks = ks
            .spec
            .health_checks
            .iter()
            .map(|h| {
                let ns = h.namespace.clone().unwrap_or_else(|| ks.namespace.clone());
                (h.kind.clone().unwrap_or_default(), ns, h.name.clone())
            })
            .collect();
        let retry = ks
            .spec
            .retry_interval
            .as_deref()
            .and_then(|r| duration(r, "retryInterval").ok())
            .unwrap_or_else(|| duration(&ks.spec.interval, "interval").unwrap_or(Duration::from_secs(600)));
        let attempt = attempt(ctx, self.reader, &ks, self.sources, memory, self.limit).await;
        let entry = memory.builds.get(&native.id);
        match attempt {
            Attempt::Built(b) => {
                native.revision = Some(b.revision.clone());
                let interval = duration(&ks.spec.interval, "interval").unwrap_or(Duration::from_secs(600));
                x.due(b.built + interval);
                append(x, &mut native, &b.manifests, first_built);
                // The applied revision stays until the new build is applied; readiness only while
                // the build is the same.
                let prev = memory.builds.remove(&native.id);
                let (last_applied, ready) =
                    prev.map_or((None, false), |p| (p.last_applied, p.key == b.key && p.ready));
                memory.builds.insert(
                    native.id.clone(),
                    BuildMemory {
                        last_applied,
                        ready,
                        ..b
                    },
                );
            }
            Attempt::Failed { reason, message } => {
                x.due(Instant::now() + retry);
                match entry {
                    Some(last) => {
                        let last_revision = last.revision.clone();
                        let manifests = last.manifests.clone();
                        native.revision = Some(last_revision.clone());
                        append(x, &mut native, &manifests, first_built);
                        native.fail(
                            reason,
                            format!("{message}; the objects of revision {last_revision} stay applied"),
                        );
                    }
                    None => {
                        x.keep_all = true;
                        native.fail(reason, message);
                    }
                }
            }
            Attempt::Held { reason, message } => {
                // Suspended, or waiting on a dependency: nothing is applied or pruned.
                if reason != "Suspended" {
                    x.due(Instant::now() + retry);
                }
                x.keep_all = true;
                native.ready = (
                    if reason == "Suspended" { UNKNOWN } else { FALSE },
                    reason,
                    message,
                );
            }
        }
        if force {
            x.recreate.extend(native.objects.clone());
        }
        native
    }
}

/// Why the write policy refuses a Flux object or a Secret or ConfigMap it reads, if it does.
/// What a Flux object reads is held to the rules of what a work writes: a work may not have
/// the agent read (and substitute, or send to a registry) what it could not write itself.
fn refused_by_policy<S>(
    ctx: &ReconcileContext,
    kind: FluxKind,
    obj: &FluxObject<S>,
    reads: &[ReadRef],
) -> Option<String> {
    let (ns, name) = (obj.namespace.as_str(), obj.name.as_str());
    let policy = &ctx.cfg.policy;
    if let Err(d) = policy.check(&Target::new(kind.group(), kind.name(), ns, name)) {
        return Some(format!("{} {ns}/{name}: {d}", kind.name()));
    }
    reads.iter().find_map(|r| {
        policy
            .check(&Target::new("", r.kind, ns, &r.name))
            .err()
            .map(|d| {
                format!(
                    "{} {ns}/{} ({} of {} {name}): {d}",
                    r.kind,
                    r.name,
                    r.field,
                    kind.name()
                )
            })
    })
}

/// Appends a build's manifests to the expansion as the Kustomization's objects.
fn append(x: &mut Expansion, native: &mut Native, manifests: &[Manifest], first_built: usize) {
    let start = first_built + x.built.len();
    x.built.extend(manifests.iter().cloned());
    native.objects = start..first_built + x.built.len();
    native.usable = true;
}

/// What a Kustomization's build step came to.
enum Attempt {
    Built(BuildMemory),
    Failed { reason: &'static str, message: String },
    Held { reason: &'static str, message: String },
}

/// Builds the Kustomization, or reuses its last build while nothing it depends on changed.
async fn attempt(
    ctx: &ReconcileContext,
    reader: &Client,
    ks: &FluxObject<KustomizationSpec>,
    sources: &HashMap<String, Option<Pulled>>,
    memory: &FluxMemory,
    limit: usize,
) -> Attempt {
    let id = format!("{}/{}", ks.namespace, ks.name);
    if ks.spec.suspend {
        return Attempt::Held {
            reason: "Suspended",
            message: "suspended: nothing is applied or pruned until it is resumed".into(),
        };
    }
    for dep in &ks.spec.depends_on {
        let dep_id = format!(
            "{}/{}",
            dep.namespace.as_deref().unwrap_or(&ks.namespace),
            dep.name
        );
        if !memory.builds.get(&dep_id).is_some_and(|b| b.ready) {
            return Attempt::Held {
                reason: "DependencyNotReady",
                message: format!(
                    "dependency Kustomization {dep_id} is not ready (it must be in the same work)"
                ),
            };
        }
    }
    let source_id = format!(
        "{}/{}",
        ks.spec.source_ref.namespace.as_deref().unwrap_or(&ks.namespace),
        ks.spec.source_ref.name
    );
    let pulled = match sources.get(&source_id) {
        None => {
            return Attempt::Failed {
                reason: "ArtifactFailed",
                message: format!("OCIRepository {source_id} is not part of this work"),
            };
        }
        Some(None) => {
            return Attempt::Failed {
                reason: "ArtifactFailed",
                message: format!("OCIRepository {source_id} has no artifact yet"),
            };
        }
        Some(Some(p)) => p,
    };
    // Within its interval, a build of the same revision and spec is reused without reading
    // the variables' ConfigMaps and Secrets again (Flux too reads them once per interval), so
    // a reconcile caused by drift costs no request here.
    let source_key = build_key(&pulled.revision, ks, &None);
    let interval = duration(&ks.spec.interval, "interval").unwrap_or(Duration::from_secs(600));
    let last = memory.builds.get(&id);
    let reuse = |last: &BuildMemory, built: Instant| BuildMemory {
        key: last.key.clone(),
        source_key: last.source_key.clone(),
        manifests: last.manifests.clone(),
        revision: last.revision.clone(),
        built,
        last_applied: None,
        ready: false,
    };
    if let Some(last) = last
        && last.source_key == source_key
        && Instant::now() < last.built + interval
    {
        return Attempt::Built(reuse(last, last.built));
    }
    let vars = match variables(reader, ks).await {
        Ok(v) => v,
        Err((reason, message)) => return Attempt::Failed { reason, message },
    };
    let key = build_key(&pulled.revision, ks, &vars);
    if let Some(last) = last.filter(|l| l.key == key) {
        // The interval passed and nothing changed: the same objects, a new interval.
        return Attempt::Built(reuse(last, Instant::now()));
    }
    let limits = BuildLimits {
        max_objects: limit,
        ..BuildLimits::default()
    };
    match build_objects(ks, pulled.dir.clone(), vars, limits, ctx.cfg.limits).await {
        Ok(manifests) => {
            tracing::info!(kustomization = %id, revision = %pulled.revision, objects = manifests.len(), "built");
            Attempt::Built(BuildMemory {
                key,
                source_key,
                manifests: Arc::new(manifests),
                revision: pulled.revision.clone(),
                built: Instant::now(),
                last_applied: None,
                ready: false,
            })
        }
        Err(e) => {
            tracing::warn!(kustomization = %id, error = %e, "build failed");
            Attempt::Failed {
                reason: if e.is_unsupported() {
                    "UnsupportedKustomizeField"
                } else {
                    "BuildFailed"
                },
                message: e.to_string(),
            }
        }
    }
}

/// Builds (in a blocking task: it reads files), substitutes and labels the objects.
async fn build_objects(
    ks: &FluxObject<KustomizationSpec>,
    dir: PathBuf,
    vars: Option<BTreeMap<String, String>>,
    limits: BuildLimits,
    work_limits: WorkLimits,
) -> Result<Vec<Manifest>, BuildError> {
    let spec = &ks.spec;
    let meta = spec.common_metadata.clone().unwrap_or_default();
    let overlay = Overlay {
        target_namespace: spec.target_namespace.clone(),
        name_prefix: spec.name_prefix.clone(),
        name_suffix: spec.name_suffix.clone(),
        labels: meta.labels,
        annotations: meta.annotations,
        patches: spec.patches.clone(),
    };
    let path = spec.path.clone().unwrap_or_default();
    let (name, namespace) = (ks.name.clone(), ks.namespace.clone());
    let task = tokio::task::spawn_blocking(move || {
        let mut objs = build(&dir, &path, &overlay, &limits)?;
        if let Some(vars) = &vars {
            substitute::substitute_objects(&mut objs, vars).map_err(|e| BuildError::Read {
                file: "postBuild".into(),
                message: e.to_string(),
            })?;
        }
        for o in &mut objs {
            label(o, &name, &namespace);
        }
        check_built(&objs, &work_limits)?;
        Ok(objs.into_iter().map(Manifest::from).collect())
    });
    task.await.unwrap_or_else(|e| {
        Err(BuildError::Read {
            file: "build".into(),
            message: format!("the build task failed: {e}"),
        })
    })
}

/// Holds what a build made to the work's own limits, as if the hub had sent it inline: each
/// object's nesting (`--max-json-depth`) and the bytes of them all (`--max-work-bytes`).
fn check_built(objs: &[Value], limits: &WorkLimits) -> Result<(), BuildError> {
    let mut bytes = 0usize;
    for (i, obj) in objs.iter().enumerate() {
        let text = obj.to_string();
        let depth = super::validate::json_depth(&text);
        if depth > limits.max_json_depth {
            return Err(BuildError::OverWorkLimit(format!(
                "built object {i} ({}) nests {depth} levels deep, over the limit of {}",
                describe(obj),
                limits.max_json_depth
            )));
        }
        bytes = bytes.saturating_add(text.len());
        if bytes > limits.max_work_bytes {
            return Err(BuildError::OverWorkLimit(format!(
                "the built objects are over the work's {} byte limit",
                limits.max_work_bytes
            )));
        }
    }
    Ok(())
}

/// `kind/name` of an object, for messages.
fn describe(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Adds Flux's ownership labels.
fn label(obj: &mut Value, name: &str, namespace: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let labels = meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(l) = labels.as_object_mut() {
        l.insert(NAME_LABEL.into(), Value::String(name.into()));
        l.insert(NAMESPACE_LABEL.into(), Value::String(namespace.into()));
    }
}

/// The postBuild variables: `substituteFrom` in order (later ones win), then `substitute`
/// over them, as Flux does. None without a postBuild. Read as `reader`, the work's identity; a
/// read it may not make fails with the API server's `Forbidden`.
async fn variables(
    reader: &Client,
    ks: &FluxObject<KustomizationSpec>,
) -> Result<Option<BTreeMap<String, String>>, Failure> {
    let Some(post) = &ks.spec.post_build else {
        return Ok(None);
    };
    let mut vars = BTreeMap::new();
    for from in &post.substitute_from {
        let found = match from.kind.as_str() {
            "ConfigMap" => {
                let api: Api<ConfigMap> = Api::namespaced(reader.clone(), &ks.namespace);
                api.get_opt(&from.name)
                    .await
                    .map(|c| c.map(|c| c.data.unwrap_or_default().into_iter().collect::<Vec<_>>()))
            }
            _ => {
                let api: Api<Secret> = Api::namespaced(reader.clone(), &ks.namespace);
                api.get_opt(&from.name).await.map(|s| {
                    s.map(|s| {
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                            .collect()
                    })
                })
            }
        };
        match found {
            Ok(Some(pairs)) => vars.extend(pairs),
            Ok(None) if from.optional => {}
            Ok(None) => {
                return Err((
                    "BuildFailed",
                    format!("postBuild.substituteFrom {} {} not found", from.kind, from.name),
                ));
            }
            Err(e) => {
                let reason = match &e {
                    kube::Error::Api(s) if s.code == 403 => "Forbidden",
                    _ => "BuildFailed",
                };
                return Err((
                    reason,
                    format!("postBuild.substituteFrom {} {}: {e}", from.kind, from.name),
                ));
            }
        }
    }
    vars.extend(post.substitute.clone());
    substitute::check_names(&vars).map_err(|e| ("BuildFailed", e.to_string()))?;
    Ok(Some(vars))
}

/// What a build depends on, hashed: a change of any part builds again.
fn build_key(
    revision: &str,
    ks: &FluxObject<KustomizationSpec>,
    vars: &Option<BTreeMap<String, String>>,
) -> String {
    let mut h = Sha256::new();
    h.update(revision.as_bytes());
    h.update([0]);
    h.update(format!("{:?}", ks.spec).as_bytes());
    h.update([0]);
    h.update(format!("{vars:?}").as_bytes());
    hex::encode(h.finalize())
}

fn spec_reason(e: &SpecError) -> &'static str {
    match e {
        SpecError::Unsupported { .. } => "UnsupportedField",
        SpecError::Invalid { .. } => "InvalidSpec",
    }
}

impl Native {
    fn new(kind: FluxKind, v: &Value) -> Native {
        let text = |p: &str| v.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty());
        let id = format!(
            "{}/{}",
            text("/metadata/namespace").unwrap_or("default"),
            text("/metadata/name").unwrap_or_default()
        );
        Native {
            kind,
            id,
            error: None,
            ready: (UNKNOWN, "Progressing", "reconciliation in progress".into()),
            values: Vec::new(),
            usable: false,
            objects: 0..0,
            wait: false,
            health_checks: Vec::new(),
            revision: None,
            verified: None,
        }
    }

    fn fail(&mut self, reason: &'static str, message: String) {
        self.ready = (FALSE, reason, message.clone());
        self.error = Some((reason, message));
    }
}

fn string_value(name: &str, value: &str) -> FeedbackValue {
    FeedbackValue {
        name: name.into(),
        field_value: FieldValue {
            type_: ValueType::String,
            string: Some(value.into()),
            ..Default::default()
        },
    }
}

fn integer_value(name: &str, value: i64) -> FeedbackValue {
    FeedbackValue {
        name: name.into(),
        field_value: FieldValue {
            type_: ValueType::Integer,
            integer: Some(value),
            ..Default::default()
        },
    }
}

/// After the applies: each Flux entry's result from its own outcome and, for a
/// Kustomization, from its objects' (applied, healthy). Updates the memory's applied revision
/// and readiness, and returns whether a Kustomization is still progressing (to look again).
pub fn finish(
    x: &Expansion,
    results: &mut [ManifestResult],
    memory: &mut FluxMemory,
    generation: i64,
) -> bool {
    let mut progressing = false;
    for (&i, n) in &x.natives {
        let mut native_values = n.values.clone();
        let mut error = n.error.clone();
        let mut ready = n.ready.clone();
        if n.kind == FluxKind::Kustomization {
            if !n.objects.is_empty() && n.error.is_none() {
                let outcome = objects_outcome(n, results);
                native_values.push(integer_value("inventoryCount", n.objects.len() as i64));
                native_values.push(integer_value("driftCorrections", outcome.drift_corrections));
                (ready, error, progressing) = judge(n, &outcome, progressing);
                if let Some(b) = memory.builds.get_mut(&n.id) {
                    b.ready = ready.0 == TRUE;
                    if b.ready {
                        b.last_applied = Some(b.revision.clone());
                    }
                }
            }
            // Also while failing: which revision is applied, and which was tried.
            if let Some(b) = memory.builds.get(&n.id) {
                if let Some(rev) = &b.last_applied {
                    native_values.push(string_value("lastAppliedRevision", rev));
                }
                native_values.push(string_value("lastAttemptedRevision", &b.revision));
            }
        }
        native_values.push(string_value("ready", ready.0));
        let Some(r) = results.get_mut(i) else {
            continue;
        };
        r.error = error.map(|(reason, message)| ManifestFailure::Flux { reason, message });
        r.notes
            .push("reconciled by spokelet itself, not sent to the API server".into());
        r.extra_conditions = vec![cond("Ready", ready.0, ready.1, ready.2, generation)];
        if let Some((status, reason, message)) = &n.verified {
            r.extra_conditions.push(cond(
                "SourceVerified",
                status,
                reason,
                message.clone(),
                generation,
            ));
        }
        r.extra_values = native_values;
        r.native_available = Some(n.usable);
    }
    progressing
}

/// A Kustomization's Ready condition and failure from its objects' outcome; `progressing`
/// comes back set when health checks still wait.
fn judge(n: &Native, outcome: &ObjectsOutcome, progressing: bool) -> (Cond, Option<Failure>, bool) {
    match (&outcome.failed, &outcome.waiting) {
        (Some(msg), _) => (
            (FALSE, "ReconciliationFailed", msg.clone()),
            Some(("ReconciliationFailed", msg.clone())),
            progressing,
        ),
        (None, Some(msg)) => ((FALSE, "Progressing", msg.clone()), None, true),
        (None, None) => {
            let rev = n.revision.clone().unwrap_or_default();
            (
                (
                    TRUE,
                    "ReconciliationSucceeded",
                    format!("Applied revision: {rev}"),
                ),
                None,
                progressing,
            )
        }
    }
}

/// What a Kustomization's objects did in this reconcile.
struct ObjectsOutcome {
    /// Why some were not applied.
    failed: Option<String>,
    /// What the health checks still wait for.
    waiting: Option<String>,
    drift_corrections: i64,
}

fn objects_outcome(n: &Native, results: &[ManifestResult]) -> ObjectsOutcome {
    let objs = results.get(n.objects.clone()).unwrap_or_default();
    let failures: Vec<String> = objs
        .iter()
        .filter_map(|r| {
            let e = r.error.as_ref()?;
            Some(format!("{} {}: {e}", r.meta.kind, display(r)))
        })
        .collect();
    let failed = (!failures.is_empty()).then(|| {
        let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
        format!(
            "{} of {} objects not applied: {}",
            failures.len(),
            objs.len(),
            shown.join("; ")
        )
    });
    let mut waiting = Vec::new();
    for r in objs {
        let wanted = n.wait
            || n.health_checks.iter().any(|(k, ns, name)| {
                (k.is_empty() || *k == r.meta.kind)
                    && *name == r.meta.name
                    && (r.meta.namespace.is_empty() || *ns == r.meta.namespace)
            });
        if !wanted {
            continue;
        }
        match r.live.as_deref().map(|live| health(&r.meta.kind, live)) {
            Some(Health::Ready) => {}
            Some(Health::Progressing(m)) | Some(Health::Failed(m)) => {
                waiting.push(format!("{} {}: {m}", r.meta.kind, display(r)));
            }
            None => waiting.push(format!("{} {}: not applied", r.meta.kind, display(r))),
        }
    }
    for (k, ns, name) in &n.health_checks {
        let found = objs
            .iter()
            .any(|r| (k.is_empty() || *k == r.meta.kind) && *name == r.meta.name);
        if !found {
            waiting.push(format!(
                "health check {k} {ns}/{name} names no object of this Kustomization"
            ));
        }
    }
    let waiting = (!waiting.is_empty()).then(|| {
        let shown: Vec<&str> = waiting.iter().take(5).map(String::as_str).collect();
        format!(
            "{} of the checked objects are not ready: {}",
            waiting.len(),
            shown.join("; ")
        )
    });
    ObjectsOutcome {
        failed,
        waiting,
        drift_corrections: objs.iter().map(|r| r.drift_corrections).sum(),
    }
}

fn display(r: &ManifestResult) -> String {
    if r.meta.namespace.is_empty() {
        r.meta.name.clone()
    } else {
        format!("{}/{}", r.meta.namespace, r.meta.name)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn built_objects_are_held_to_the_works_size_and_nesting() {
        let limits = WorkLimits {
            max_work_bytes: 200,
            max_json_depth: 5,
            ..WorkLimits::default()
        };
        let small = json!({"kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        assert_eq!(check_built(std::slice::from_ref(&small), &limits), Ok(()));
        let deep = json!({"kind": "ConfigMap", "metadata": {"name": "deep"}, "data": {"a": [[[[["x"]]]]]}});
        let err = check_built(&[deep], &limits).unwrap_err().to_string();
        assert!(
            err.contains("ConfigMap/deep") && err.contains("levels deep"),
            "{err}"
        );
        let many = vec![small; 10];
        let err = check_built(&many, &limits).unwrap_err().to_string();
        assert!(err.contains("200 byte limit"), "{err}");
    }
}
