//! The kustomize transformers spokelet applies to built objects: namespace, name prefix and
//! suffix (with the references to renamed objects), labels and annotations.
//!
//! Written here, not taken from kustomize (a Go program): only these few transformers are
//! needed, since the hub renders and the spoke only assembles. Where kustomize relies on its
//! built-in knowledge of kinds (which are cluster-scoped, where selectors and pod templates
//! are), this file holds the same knowledge as small tables.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

/// Built-in kinds that are cluster-scoped: the namespace transformer leaves them alone, as
/// kustomize does. A custom cluster-scoped kind does get a namespace here, and the engine drops
/// it again once discovery says the kind is cluster-scoped.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "CSIDriver",
    "CSINode",
    "VolumeAttachment",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
    "APIService",
    "Node",
    "CertificateSigningRequest",
    "FlowSchema",
    "PriorityLevelConfiguration",
];

/// Kinds whose name is fixed by their content (a CRD is `<plural>.<group>`) or which name a
/// namespace other objects refer to: kustomize does not prefix them either.
const NOT_RENAMED: &[&str] = &["CustomResourceDefinition", "Namespace", "APIService"];

/// Workloads with a `spec.selector.matchLabels` and a `spec.template`.
const SELECTING_WORKLOADS: &[&str] = &["Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"];

fn kind(obj: &Value) -> &str {
    obj.get("kind").and_then(Value::as_str).unwrap_or_default()
}

/// `Kind name` of an object, for messages.
pub fn describe(obj: &Value) -> String {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("?");
    format!("{kind} {name}")
}

/// Whether `obj` is of a built-in cluster-scoped kind.
pub fn is_cluster_scoped(obj: &Value) -> bool {
    CLUSTER_SCOPED.contains(&kind(obj))
}

fn metadata(obj: &mut Value) -> &mut Map<String, Value> {
    object_at(obj, &["metadata"])
}

/// The object at `path` under `obj`, created (as empty objects) where missing or not objects.
fn object_at<'a>(obj: &'a mut Value, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut cur = obj;
    for key in path {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else {
            unreachable!("made an object above")
        };
        cur = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    match cur {
        Value::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

/// Whether `path` exists under `obj` (so a transformer does not create a template or selector
/// an object never had).
fn has(obj: &Value, path: &[&str]) -> bool {
    let mut cur = obj;
    for key in path {
        match cur.get(key) {
            Some(v) => cur = v,
            None => return false,
        }
    }
    true
}

/// Sets the namespace of every namespaced object (kustomize's `namespace`, Flux's
/// `targetNamespace`), and of the ServiceAccount subjects of role bindings that named the
/// objects' old namespace or none.
pub fn set_namespace(objs: &mut [Value], namespace: &str) {
    for obj in objs.iter_mut() {
        if is_cluster_scoped(obj) {
            if matches!(kind(obj), "ClusterRoleBinding") {
                retarget_subjects(obj, None, namespace);
            }
            continue;
        }
        let old = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        metadata(obj).insert("namespace".into(), Value::String(namespace.to_string()));
        if kind(obj) == "RoleBinding" {
            retarget_subjects(obj, old.as_deref(), namespace);
        }
    }
}

/// Moves ServiceAccount subjects in namespace `old` (or with none) to `namespace`.
fn retarget_subjects(obj: &mut Value, old: Option<&str>, namespace: &str) {
    let Some(subjects) = obj.get_mut("subjects").and_then(Value::as_array_mut) else {
        return;
    };
    for s in subjects.iter_mut().filter(|s| kind(s) == "ServiceAccount") {
        let ns = s.get("namespace").and_then(Value::as_str);
        if (ns.is_none() || ns == old)
            && let Some(m) = s.as_object_mut()
        {
            m.insert("namespace".into(), Value::String(namespace.to_string()));
        }
    }
}

/// Renames every object (but the kinds in `NOT_RENAMED`) to `prefix + name + suffix`, and the
/// references to renamed objects that pods and role bindings make.
pub fn rename(objs: &mut [Value], prefix: &str, suffix: &str) {
    if prefix.is_empty() && suffix.is_empty() {
        return;
    }
    // (kind, old name) → new name, for the references below.
    let mut renamed: HashMap<(String, String), String> = HashMap::new();
    for obj in objs.iter_mut() {
        if NOT_RENAMED.contains(&kind(obj)) {
            continue;
        }
        let Some(old) = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            continue;
        };
        let new = format!("{prefix}{old}{suffix}");
        renamed.insert((kind(obj).to_string(), old), new.clone());
        metadata(obj).insert("name".into(), Value::String(new));
    }
    for obj in objs.iter_mut() {
        rename_references(obj, &renamed);
    }
}

/// Rewrites the names `obj` refers to that were renamed: ConfigMaps, Secrets,
/// ServiceAccounts and PersistentVolumeClaims of its pod spec, and the role and service
/// accounts of a role binding.
fn rename_references(obj: &mut Value, renamed: &HashMap<(String, String), String>) {
    let lookup = |k: &str, v: &Value| {
        v.as_str()
            .and_then(|name| renamed.get(&(k.to_string(), name.to_string())))
            .cloned()
    };
    let swap = |slot: Option<&mut Value>, k: &str| {
        if let Some(slot) = slot
            && let Some(new) = lookup(k, slot)
        {
            *slot = Value::String(new);
        }
    };
    match kind(obj) {
        "RoleBinding" | "ClusterRoleBinding" => {
            let role_kind = obj
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            swap(obj.pointer_mut("/roleRef/name"), &role_kind);
            if let Some(subjects) = obj.get_mut("subjects").and_then(Value::as_array_mut) {
                for s in subjects.iter_mut().filter(|s| kind(s) == "ServiceAccount") {
                    swap(s.get_mut("name"), "ServiceAccount");
                }
            }
        }
        _ => {
            if let Some(pod) = pod_spec(obj) {
                rename_in_pod(pod, &swap);
            }
        }
    }
}

/// The pod spec of a Pod, a workload's template or a CronJob's job template.
fn pod_spec(obj: &mut Value) -> Option<&mut Value> {
    let path = match kind(obj) {
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicationController" => {
            "/spec/template/spec"
        }
        _ => return None,
    };
    obj.pointer_mut(path)
}

fn rename_in_pod(pod: &mut Value, swap: &dyn Fn(Option<&mut Value>, &str)) {
    swap(pod.get_mut("serviceAccountName"), "ServiceAccount");
    if let Some(volumes) = pod.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in volumes.iter_mut() {
            swap(v.pointer_mut("/configMap/name"), "ConfigMap");
            swap(v.pointer_mut("/secret/secretName"), "Secret");
            swap(
                v.pointer_mut("/persistentVolumeClaim/claimName"),
                "PersistentVolumeClaim",
            );
            if let Some(sources) = v.pointer_mut("/projected/sources").and_then(Value::as_array_mut) {
                for s in sources.iter_mut() {
                    swap(s.pointer_mut("/configMap/name"), "ConfigMap");
                    swap(s.pointer_mut("/secret/name"), "Secret");
                }
            }
        }
    }
    if let Some(secrets) = pod.get_mut("imagePullSecrets").and_then(Value::as_array_mut) {
        for s in secrets.iter_mut() {
            swap(s.get_mut("name"), "Secret");
        }
    }
    for list in ["containers", "initContainers"] {
        let Some(containers) = pod.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers.iter_mut() {
            if let Some(from) = c.get_mut("envFrom").and_then(Value::as_array_mut) {
                for f in from.iter_mut() {
                    swap(f.pointer_mut("/configMapRef/name"), "ConfigMap");
                    swap(f.pointer_mut("/secretRef/name"), "Secret");
                }
            }
            if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
                for e in env.iter_mut() {
                    swap(e.pointer_mut("/valueFrom/configMapKeyRef/name"), "ConfigMap");
                    swap(e.pointer_mut("/valueFrom/secretKeyRef/name"), "Secret");
                }
            }
        }
    }
}

/// Where labels go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelReach {
    /// Also into selectors (and so into templates, which must match them): `commonLabels`.
    pub selectors: bool,
    /// Also into pod templates.
    pub templates: bool,
}

/// Adds `labels` to every object's metadata, and where `reach` says to its selectors and
/// templates.
pub fn add_labels(objs: &mut [Value], labels: &BTreeMap<String, String>, reach: LabelReach) {
    if labels.is_empty() {
        return;
    }
    for obj in objs.iter_mut() {
        merge_into(object_at(obj, &["metadata", "labels"]), labels);
        let k = kind(obj).to_string();
        let templates = reach.templates || reach.selectors;
        if reach.selectors {
            if SELECTING_WORKLOADS.contains(&k.as_str()) {
                merge_into(object_at(obj, &["spec", "selector", "matchLabels"]), labels);
            }
            if k == "Service" && has(obj, &["spec"]) {
                merge_into(object_at(obj, &["spec", "selector"]), labels);
            }
        }
        if templates {
            for path in template_metadata_paths(&k) {
                if has(obj, &path[..path.len() - 1]) {
                    merge_into(object_at(obj, &[path, &["labels"]].concat()), labels);
                }
            }
        }
    }
}

/// Adds `annotations` to every object's metadata and its pod templates (as kustomize's
/// `commonAnnotations` does); `templates: false` for Flux's `commonMetadata`.
pub fn add_annotations(objs: &mut [Value], annotations: &BTreeMap<String, String>, templates: bool) {
    if annotations.is_empty() {
        return;
    }
    for obj in objs.iter_mut() {
        merge_into(object_at(obj, &["metadata", "annotations"]), annotations);
        if !templates {
            continue;
        }
        let k = kind(obj).to_string();
        for path in template_metadata_paths(&k) {
            if has(obj, &path[..path.len() - 1]) {
                merge_into(object_at(obj, &[path, &["annotations"]].concat()), annotations);
            }
        }
    }
}

/// The metadata paths of a kind's templates.
fn template_metadata_paths(kind: &str) -> Vec<&'static [&'static str]> {
    match kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicationController" => {
            vec![&["spec", "template", "metadata"]]
        }
        "CronJob" => vec![
            &["spec", "jobTemplate", "metadata"],
            &["spec", "jobTemplate", "spec", "template", "metadata"],
        ],
        _ => Vec::new(),
    }
}

fn merge_into(map: &mut Map<String, Value>, add: &BTreeMap<String, String>) {
    for (k, v) in add {
        map.insert(k.clone(), Value::String(v.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"serviceAccountName": "runner",
                                              "volumes": [{"name": "c", "configMap": {"name": "settings"}}],
                                              "containers": [{"name": "w", "envFrom": [{"secretRef": {"name": "token"}}]}]}}}})
    }

    #[test]
    fn namespace_skips_cluster_scoped_kinds_and_moves_binding_subjects() {
        let mut objs = vec![
            deployment(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "b"},
                   "subjects": [{"kind": "ServiceAccount", "name": "runner"},
                                {"kind": "ServiceAccount", "name": "other", "namespace": "kube-system"}]}),
        ];
        set_namespace(&mut objs, "team");
        assert_eq!(objs[0]["metadata"]["namespace"], "team");
        assert!(objs[1]["metadata"].get("namespace").is_none());
        assert_eq!(objs[2]["subjects"][0]["namespace"], "team");
        assert_eq!(objs[2]["subjects"][1]["namespace"], "kube-system");
    }

    #[test]
    fn rename_rewrites_references_to_renamed_objects_only() {
        let mut objs = vec![
            deployment(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}),
        ];
        rename(&mut objs, "p-", "-s");
        assert_eq!(objs[0]["metadata"]["name"], "p-web-s");
        assert_eq!(objs[1]["metadata"]["name"], "p-settings-s");
        let pod = &objs[0]["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "p-settings-s");
        assert_eq!(pod["serviceAccountName"], "p-runner-s");
        // The Secret is not part of the build: the reference stays.
        assert_eq!(pod["containers"][0]["envFrom"][0]["secretRef"]["name"], "token");
    }

    #[test]
    fn common_labels_reach_selectors_and_templates_plain_labels_do_not() {
        let labels: BTreeMap<_, _> = [("team".to_string(), "ml".to_string())].into();
        let mut common = vec![deployment()];
        add_labels(
            &mut common,
            &labels,
            LabelReach {
                selectors: true,
                templates: true,
            },
        );
        assert_eq!(common[0]["spec"]["selector"]["matchLabels"]["team"], "ml");
        assert_eq!(common[0]["spec"]["template"]["metadata"]["labels"]["team"], "ml");
        let mut plain = vec![deployment()];
        add_labels(&mut plain, &labels, LabelReach::default());
        assert_eq!(plain[0]["metadata"]["labels"]["team"], "ml");
        assert!(plain[0]["spec"]["selector"]["matchLabels"].get("team").is_none());
    }

    #[test]
    fn annotations_reach_templates_unless_told_not_to() {
        let ann: BTreeMap<_, _> = [("owner".to_string(), "hub".to_string())].into();
        let mut objs = vec![
            deployment(),
            json!({"kind": "ConfigMap", "metadata": {"name": "c"}}),
        ];
        add_annotations(&mut objs, &ann, true);
        assert_eq!(
            objs[0]["spec"]["template"]["metadata"]["annotations"]["owner"],
            "hub"
        );
        assert_eq!(objs[1]["metadata"]["annotations"]["owner"], "hub");
        assert!(objs[1].get("spec").is_none(), "no template is invented");
    }
}
