//! A Kustomization's build: its postBuild variables read as the work's identity, the artifact
//! built, substituted and labelled as Flux's kustomize-controller labels what it applies, and
//! held to the work's own limits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use spokelet_flux::build::{BuildError, BuildLimits, Overlay, build};
use spokelet_flux::objects::{FluxObject, KustomizationSpec};
use spokelet_flux::substitute;

use super::reasons::{Failure, Reason};
use crate::manifestwork::Manifest;
use crate::validate::WorkLimits;

/// The labels Flux's kustomize-controller puts on what it applies; kept so tools that look
/// for them (and `kubectl get -l`) find objects from artifacts the same way.
pub const NAME_LABEL: &str = "kustomize.toolkit.fluxcd.io/name";
pub const NAMESPACE_LABEL: &str = "kustomize.toolkit.fluxcd.io/namespace";

/// Builds (in a blocking task: it reads files), substitutes and labels the objects.
pub(super) async fn build_objects(
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
        let depth = crate::validate::json_depth(&text);
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
pub(super) async fn variables(
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
                return Err(Failure::new(
                    Reason::BuildFailed,
                    format!("postBuild.substituteFrom {} {} not found", from.kind, from.name),
                ));
            }
            Err(e) => {
                let reason = match &e {
                    kube::Error::Api(s) if s.code == 403 => Reason::Forbidden,
                    _ => Reason::BuildFailed,
                };
                return Err(Failure::new(
                    reason,
                    format!("postBuild.substituteFrom {} {}: {e}", from.kind, from.name),
                ));
            }
        }
    }
    vars.extend(post.substitute.clone());
    substitute::check_names(&vars).map_err(|e| Failure::new(Reason::BuildFailed, e.to_string()))?;
    Ok(Some(vars))
}

/// What a build depends on, hashed: a change of any part builds again.
pub(super) fn build_key(
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
