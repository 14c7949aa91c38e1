//! One `Kustomization` of a work: built from its source's artifact when anything it depends on
//! changed (else its last build is reused), its objects appended to the expansion, and the last
//! good build kept applied through failures.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use spokelet_artifact::registry::Pulled;
use spokelet_flux::build::BuildLimits;
use spokelet_flux::objects::{self, FluxKind, FluxObject, KustomizationSpec};
use tokio::time::Instant;

use super::build::{NAME_LABEL, NAMESPACE_LABEL};
use super::build::{build_key, build_objects, variables};
use super::memory::{BuildMemory, FluxMemory};
use super::readiness::Native;
use super::reasons::{Cond, Failure, Reason, Status};
use super::step::{Step, append, refused_by_policy};
use crate::expand::Expansion;

/// What every Kustomization of a work is built with.
pub(super) struct KustomizationStep<'a> {
    /// The work, its identity (for the variables' Secrets and ConfigMaps) and its limits.
    pub(super) step: &'a Step<'a>,
    /// The work's sources' artifacts, by `namespace/name`.
    pub(super) sources: &'a HashMap<String, Option<Pulled>>,
    /// The ordinal the first built manifest gets (after the work's own).
    pub(super) first_built: usize,
    /// How many objects builds may still add within the work's manifest limit.
    pub(super) limit: usize,
}

/// What a Kustomization's build step came to.
enum Attempt {
    Built(BuildMemory),
    Failed(Failure),
    /// Suspended, or waiting on a dependency: nothing is applied or pruned.
    Held(Reason, String),
}

impl KustomizationStep<'_> {
    /// One Kustomization: built when anything it depends on changed, its manifests appended
    /// to `x.built`.
    pub(super) async fn run(&self, v: &Value, memory: &mut FluxMemory, x: &mut Expansion) -> Native {
        let mut native = Native::new(FluxKind::Kustomization, v);
        let ks = match self.accepted(v) {
            Ok(ks) => ks,
            Err(failure) => {
                native.fail(failure);
                x.keep_all = true;
                return native;
            }
        };
        if !ks.spec.prune {
            // What leaves the build is released, not deleted: its objects carry these labels.
            x.release_labelled.push(BTreeMap::from([
                (NAME_LABEL.to_string(), ks.name.clone()),
                (NAMESPACE_LABEL.to_string(), ks.namespace.clone()),
            ]));
        }
        native.wait = ks.spec.wait;
        native.health_checks = health_checks(&ks);
        let attempt = self.attempt(&ks, memory).await;
        self.take(attempt, &ks, memory, x, &mut native);
        if ks.spec.force {
            x.recreate.extend(native.objects.clone());
        }
        native
    }

    /// The Kustomization, once read and allowed by the policy.
    fn accepted(&self, v: &Value) -> Result<FluxObject<KustomizationSpec>, Failure> {
        let ks = objects::kustomization(v).map_err(|e| Failure::new(Reason::of_spec(&e), e.to_string()))?;
        if let Some(message) = refused_by_policy(
            self.step.input.policy,
            FluxKind::Kustomization,
            &ks,
            &ks.spec.reads(),
        ) {
            return Err(Failure::new(Reason::DeniedByPolicy, message));
        }
        Ok(ks)
    }

    /// Takes the attempt's outcome into the expansion, the entry and the memory.
    fn take(
        &self,
        attempt: Attempt,
        ks: &FluxObject<KustomizationSpec>,
        memory: &mut FluxMemory,
        x: &mut Expansion,
        native: &mut Native,
    ) {
        let retry = retry_interval(&ks.spec);
        match attempt {
            Attempt::Built(b) => {
                native.revision = Some(b.revision.clone());
                x.look_again_by(b.built + ks.spec.interval);
                append(x, native, &b.manifests, self.first_built);
                // The applied revision stays until the new build is applied; readiness only
                // while the build is the same.
                let prev = memory.builds.remove(&native.id);
                let (last_applied, ready) =
                    prev.map_or((None, false), |p| (p.last_applied, p.key == b.key && p.ready));
                let kept = BuildMemory {
                    last_applied,
                    ready,
                    ..b
                };
                memory.builds.insert(native.id.clone(), kept);
            }
            Attempt::Failed(failure) => {
                x.look_again_by(Instant::now() + retry);
                match memory.builds.get(&native.id) {
                    Some(last) => {
                        let (revision, manifests) = (last.revision.clone(), last.manifests.clone());
                        native.revision = Some(revision.clone());
                        append(x, native, &manifests, self.first_built);
                        let message = format!(
                            "{}; the objects of revision {revision} stay applied",
                            failure.message
                        );
                        native.fail(Failure::new(failure.reason, message));
                    }
                    None => {
                        x.keep_all = true;
                        native.fail(failure);
                    }
                }
            }
            Attempt::Held(reason, message) => {
                let status = if reason == Reason::Suspended {
                    Status::Unknown
                } else {
                    x.look_again_by(Instant::now() + retry);
                    Status::False
                };
                x.keep_all = true;
                native.ready = Cond::new(status, reason, message);
            }
        }
    }

    /// Builds the Kustomization, or reuses its last build while nothing it depends on changed.
    async fn attempt(&self, ks: &FluxObject<KustomizationSpec>, memory: &FluxMemory) -> Attempt {
        if let Some((reason, message)) = held(ks, memory) {
            return Attempt::Held(reason, message);
        }
        let pulled = match source_of(ks, self.sources) {
            Ok(p) => p,
            Err(failure) => return Attempt::Failed(failure),
        };
        let id = format!("{}/{}", ks.namespace, ks.name);
        // Within its interval, a build of the same revision and spec is reused without reading
        // the variables' ConfigMaps and Secrets again (Flux too reads them once per interval),
        // so a reconcile caused by drift costs no request here.
        let source_key = build_key(&pulled.revision, ks, &None);
        let last = memory.builds.get(&id);
        if let Some(last) = last
            && last.source_key == source_key
            && Instant::now() < last.built + ks.spec.interval
        {
            return Attempt::Built(last.again(last.built));
        }
        let vars = match variables(self.step.input.reader, ks).await {
            Ok(v) => v,
            Err(failure) => return Attempt::Failed(failure),
        };
        let key = build_key(&pulled.revision, ks, &vars);
        if let Some(last) = last.filter(|l| l.key == key) {
            // The interval passed and nothing changed: the same objects, a new interval.
            return Attempt::Built(last.again(Instant::now()));
        }
        let limits = BuildLimits {
            max_objects: self.limit,
            ..BuildLimits::default()
        };
        match build_objects(ks, pulled.dir.clone(), vars, limits, self.step.input.limits).await {
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
                let reason = if e.is_unsupported() {
                    Reason::UnsupportedKustomizeField
                } else {
                    Reason::BuildFailed
                };
                Attempt::Failed(Failure::new(reason, e.to_string()))
            }
        }
    }
}

/// How soon a failed or waiting Kustomization is looked at again: `retryInterval`, else its
/// `interval`, as Flux does.
fn retry_interval(spec: &KustomizationSpec) -> Duration {
    spec.retry_interval.unwrap_or(spec.interval)
}

/// `healthChecks` as (kind, namespace, name), the namespace defaulting to the Kustomization's.
fn health_checks(ks: &FluxObject<KustomizationSpec>) -> Vec<(String, String, String)> {
    ks.spec
        .health_checks
        .iter()
        .map(|h| {
            let ns = h.namespace.clone().unwrap_or_else(|| ks.namespace.clone());
            (h.kind.clone().unwrap_or_default(), ns, h.name.clone())
        })
        .collect()
}

/// Why the Kustomization is not built now, if it is not: suspended, or a dependency of the
/// same work not ready.
fn held(ks: &FluxObject<KustomizationSpec>, memory: &FluxMemory) -> Option<(Reason, String)> {
    if ks.spec.suspend {
        let message = "suspended: nothing is applied or pruned until it is resumed";
        return Some((Reason::Suspended, message.into()));
    }
    ks.spec.depends_on.iter().find_map(|dep| {
        let dep_id = format!(
            "{}/{}",
            dep.namespace.as_deref().unwrap_or(&ks.namespace),
            dep.name
        );
        let ready = memory.builds.get(&dep_id).is_some_and(|b| b.ready);
        (!ready).then(|| {
            let message =
                format!("dependency Kustomization {dep_id} is not ready (it must be in the same work)");
            (Reason::DependencyNotReady, message)
        })
    })
}

/// The artifact of the Kustomization's source, from the work's own sources.
fn source_of<'a>(
    ks: &FluxObject<KustomizationSpec>,
    sources: &'a HashMap<String, Option<Pulled>>,
) -> Result<&'a Pulled, Failure> {
    let source_id = format!(
        "{}/{}",
        ks.spec.source_ref.namespace.as_deref().unwrap_or(&ks.namespace),
        ks.spec.source_ref.name
    );
    match sources.get(&source_id) {
        None => Err(Failure::new(
            Reason::ArtifactFailed,
            format!("OCIRepository {source_id} is not part of this work"),
        )),
        Some(None) => Err(Failure::new(
            Reason::ArtifactFailed,
            format!("OCIRepository {source_id} has no artifact yet"),
        )),
        Some(Some(p)) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ks(spec: Value) -> FluxObject<KustomizationSpec> {
        let v = serde_json::json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": "app", "namespace": "apps"}, "spec": spec});
        objects::kustomization(&v).unwrap()
    }

    fn ready_build(ready: bool) -> BuildMemory {
        BuildMemory {
            key: "k".into(),
            source_key: "s".into(),
            manifests: Arc::default(),
            revision: "v1".into(),
            built: Instant::now(),
            last_applied: None,
            ready,
        }
    }

    #[test]
    fn a_failed_build_is_retried_at_its_retry_interval_else_its_interval() {
        let base = serde_json::json!({"sourceRef": {"kind": "OCIRepository", "name": "app"}, "prune": true});
        let mut with_retry = base.clone();
        with_retry["interval"] = "10m".into();
        with_retry["retryInterval"] = "30s".into();
        assert_eq!(retry_interval(&ks(with_retry).spec), Duration::from_secs(30));
        let mut without = base;
        without["interval"] = "10m".into();
        assert_eq!(retry_interval(&ks(without).spec), Duration::from_secs(600));
    }

    #[test]
    fn a_kustomization_waits_while_suspended_or_its_dependency_is_not_ready() {
        let spec = |extra: Value| {
            let mut s = serde_json::json!({"sourceRef": {"kind": "OCIRepository", "name": "app"},
                "interval": "1m", "prune": true});
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            ks(s)
        };
        let mut memory = FluxMemory::default();
        let suspended = spec(serde_json::json!({"suspend": true}));
        assert_eq!(held(&suspended, &memory).map(|h| h.0), Some(Reason::Suspended));
        let dependent = spec(serde_json::json!({"dependsOn": [{"name": "crds"}]}));
        assert_eq!(
            held(&dependent, &memory).map(|h| h.0),
            Some(Reason::DependencyNotReady)
        );
        memory.builds.insert("apps/crds".into(), ready_build(false));
        assert!(held(&dependent, &memory).is_some(), "built, not ready");
        memory.builds.insert("apps/crds".into(), ready_build(true));
        assert!(held(&dependent, &memory).is_none());
    }

    #[test]
    fn a_kustomization_names_a_source_of_its_own_work_with_an_artifact() {
        let k = ks(
            serde_json::json!({"sourceRef": {"kind": "OCIRepository", "name": "app"},
            "interval": "1m", "prune": true}),
        );
        let mut sources = HashMap::new();
        let e = source_of(&k, &sources).unwrap_err();
        assert!(e.message.contains("not part of this work"), "{e:?}");
        sources.insert("apps/app".to_string(), None);
        let e = source_of(&k, &sources).unwrap_err();
        assert_eq!(e.reason, Reason::ArtifactFailed);
        assert!(e.message.contains("no artifact yet"), "{e:?}");
    }
}
