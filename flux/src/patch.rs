//! Kustomize `patches` on a named target: JSON 6902 patches (a list of operations) and JSON
//! merge patches (an object). Strategic-merge patches are refused, since their list merging
//! by key needs each kind's schema and the hub is expected to render such changes.

use serde::Deserialize;
use serde_json::Value;

use crate::transform::describe;

/// Why a patch could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// A patch kustomize would apply as a strategic merge.
    #[error("{0}")]
    Strategic(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {message}")]
    Apply { what: String, message: String },
}

/// `patches[].target`: what a patch applies to. Every given field must match; `name` and
/// `namespace` are anchored regular expressions, as in kustomize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    pub group: Option<String>,
    pub version: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// `key=value` pairs separated by commas (set-based selectors are refused).
    pub label_selector: Option<String>,
    pub annotation_selector: Option<String>,
}

/// One entry of `patches`, its text already read (from `patch:` or the file `path:` names).
#[derive(Debug, Clone)]
pub struct PatchSpec {
    /// Where it came from, for messages: `kustomization.yaml patches[2]`.
    pub origin: String,
    pub text: String,
    pub target: Option<Target>,
}

/// A patch ready to apply.
#[derive(Debug, Clone)]
enum Operation {
    Json6902(json_patch::Patch),
    Merge(Value),
}

/// The largest an object may grow to under a patch (JSON bytes), checked after every operation:
/// JSON 6902 `copy` operations double an object each, so thirty of them in a few hundred bytes
/// of patch would ask for gigabytes. The work's own manifest budget (`--max-work-bytes`, 4 MiB by
/// default) is the same size.
pub const MAX_PATCHED_OBJECT_BYTES: usize = 4 * 1024 * 1024;

/// Applies `patch` to every object its target selects. A patch that selects nothing is an
/// error, as in kustomize: it is a mistake in the artifact.
pub fn apply(objs: &mut [Value], patch: &PatchSpec) -> Result<(), PatchError> {
    let origin = &patch.origin;
    let parsed: Value = serde_yaml::from_str(&patch.text)
        .map_err(|e| PatchError::Invalid(format!("{origin}: not YAML: {e}")))?;
    let (op, target) = match parsed {
        Value::Array(_) => {
            let p: json_patch::Patch = serde_json::from_value(parsed)
                .map_err(|e| PatchError::Invalid(format!("{origin}: not a JSON 6902 patch: {e}")))?;
            let target = patch
                .target
                .clone()
                .ok_or_else(|| PatchError::Invalid(format!("{origin}: a JSON 6902 patch needs a target")))?;
            (Operation::Json6902(p), target)
        }
        Value::Object(_) => {
            refuse_strategic(&parsed, origin)?;
            let target = match &patch.target {
                Some(t) => t.clone(),
                None => target_of(&parsed).ok_or_else(|| {
                    PatchError::Invalid(format!(
                        "{origin}: a merge patch without a target needs kind and metadata.name"
                    ))
                })?,
            };
            (Operation::Merge(parsed), target)
        }
        _ => {
            return Err(PatchError::Invalid(format!(
                "{origin}: a patch is a list or an object"
            )));
        }
    };
    let selector = Selector::new(&target, origin)?;
    let mut hits = 0;
    for obj in objs.iter_mut().filter(|o| selector.matches(o)) {
        hits += 1;
        let what = format!("{origin} on {}", describe(obj));
        match &op {
            Operation::Json6902(p) => apply_bounded(obj, p, &what)?,
            Operation::Merge(m) => {
                json_patch::merge(obj, m);
                check_size(obj, &what)?;
            }
        }
    }
    if hits == 0 {
        return Err(PatchError::Invalid(format!(
            "{origin}: its target matches no object"
        )));
    }
    Ok(())
}

/// A JSON 6902 patch, one operation at a time, the object's size checked after each.
fn apply_bounded(obj: &mut Value, patch: &json_patch::Patch, what: &str) -> Result<(), PatchError> {
    for op in &patch.0 {
        json_patch::patch(obj, &json_patch::Patch(vec![op.clone()])).map_err(|e| PatchError::Apply {
            what: what.to_string(),
            message: e.to_string(),
        })?;
        check_size(obj, what)?;
    }
    Ok(())
}

/// Refuses an object grown past [`MAX_PATCHED_OBJECT_BYTES`].
fn check_size(obj: &Value, what: &str) -> Result<(), PatchError> {
    // Counted by writing into a sink that only adds up lengths: nothing is allocated.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > MAX_PATCHED_OBJECT_BYTES {
                return Err(std::io::Error::other("too large"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, obj) {
        Ok(()) => Ok(()),
        Err(_) => Err(PatchError::Apply {
            what: what.to_string(),
            message: format!("the patched object grows past {MAX_PATCHED_OBJECT_BYTES} bytes"),
        }),
    }
}

/// Refuses what only a strategic merge would do: its `$patch`-style directives, and lists of
/// objects (which a strategic merge merges by key and a merge patch replaces whole).
fn refuse_strategic(v: &Value, origin: &str) -> Result<(), PatchError> {
    match v {
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| k.starts_with('$')) {
                return Err(PatchError::Strategic(format!(
                    "{origin}: {k} is a strategic-merge directive; strategic-merge patches are not supported (use a JSON 6902 patch)"
                )));
            }
            m.values().try_for_each(|v| refuse_strategic(v, origin))
        }
        Value::Array(items) if items.iter().any(Value::is_object) => Err(PatchError::Strategic(format!(
            "{origin}: a list of objects in an object patch is merged by key under strategic merge, which is not supported (use a JSON 6902 patch)"
        ))),
        _ => Ok(()),
    }
}

/// The target a merge patch names by its own kind and name.
fn target_of(patch: &Value) -> Option<Target> {
    let kind = patch.get("kind")?.as_str()?.to_string();
    let name = patch.pointer("/metadata/name")?.as_str()?.to_string();
    Some(Target {
        kind: Some(kind),
        name: Some(regex::escape(&name)),
        namespace: patch
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(regex::escape),
        ..Target::default()
    })
}

/// A compiled target.
struct Selector {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    name: Option<regex::Regex>,
    namespace: Option<regex::Regex>,
    labels: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
}

impl Selector {
    fn new(t: &Target, origin: &str) -> Result<Selector, PatchError> {
        let anchored = |field: &str, re: &Option<String>| {
            re.as_ref()
                .map(|re| {
                    regex::Regex::new(&format!("^(?:{re})$"))
                        .map_err(|e| PatchError::Invalid(format!("{origin}: target.{field}: {e}")))
                })
                .transpose()
        };
        Ok(Selector {
            group: t.group.clone(),
            version: t.version.clone(),
            kind: t.kind.clone(),
            name: anchored("name", &t.name)?,
            namespace: anchored("namespace", &t.namespace)?,
            labels: pairs(t.label_selector.as_deref(), "labelSelector", origin)?,
            annotations: pairs(t.annotation_selector.as_deref(), "annotationSelector", origin)?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
        let text = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let has_all = |p: &str, want: &[(String, String)]| {
            want.iter()
                .all(|(k, v)| obj.pointer(p).and_then(|m| m.get(k)).and_then(Value::as_str) == Some(v))
        };
        self.group.as_deref().is_none_or(|g| g == group)
            && self.version.as_deref().is_none_or(|v| v == version)
            && self.kind.as_deref().is_none_or(|k| k == text("/kind"))
            && self
                .name
                .as_ref()
                .is_none_or(|re| re.is_match(text("/metadata/name")))
            && self
                .namespace
                .as_ref()
                .is_none_or(|re| re.is_match(text("/metadata/namespace")))
            && has_all("/metadata/labels", &self.labels)
            && has_all("/metadata/annotations", &self.annotations)
    }
}

/// `a=b,c=d` as pairs; anything but equality is refused rather than misread.
fn pairs(selector: Option<&str>, field: &str, origin: &str) -> Result<Vec<(String, String)>, PatchError> {
    let Some(s) = selector else {
        return Ok(Vec::new());
    };
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .filter(|(k, v)| !k.ends_with('!') && !v.starts_with('='))
                .ok_or_else(|| {
                    PatchError::Invalid(format!(
                        "{origin}: target.{field} {s:?}: only key=value selectors are supported"
                    ))
                })?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objs() -> Vec<Value> {
        vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"tier": "front"}},
                   "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "w", "image": "a"}]}}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}, "data": {"a": "1"}}),
        ]
    }

    fn spec(text: &str, target: Option<Target>) -> PatchSpec {
        PatchSpec {
            origin: "patches[0]".into(),
            text: text.into(),
            target,
        }
    }

    #[test]
    fn a_patch_that_doubles_an_object_thirty_times_stops_at_the_size_limit() {
        let mut o = objs();
        let t = Target {
            kind: Some("ConfigMap".into()),
            ..Target::default()
        };
        o[1]["data"]["a"] = json!("x".repeat(1024));
        let ops: String = (0..30)
            .map(|i| format!("- op: copy\n  from: /data\n  path: /data/d{i}\n"))
            .collect();
        let err = apply(&mut o, &spec(&ops, Some(t))).unwrap_err();
        assert!(err.to_string().contains("grows past"), "{err}");
    }

    #[test]
    fn a_json_6902_patch_changes_only_its_target() {
        let mut o = objs();
        let t = Target {
            kind: Some("Deployment".into()),
            name: Some("web".into()),
            ..Target::default()
        };
        apply(
            &mut o,
            &spec("- op: replace\n  path: /spec/replicas\n  value: 3\n", Some(t)),
        )
        .unwrap();
        assert_eq!(o[0]["spec"]["replicas"], 3);
        assert_eq!(o[1]["data"]["a"], "1");
    }

    #[test]
    fn a_merge_patch_finds_its_target_by_its_own_kind_and_name() {
        let mut o = objs();
        apply(
            &mut o,
            &spec("kind: ConfigMap\nmetadata:\n  name: web\ndata:\n  b: '2'\n", None),
        )
        .unwrap();
        assert_eq!(o[1]["data"], json!({"a": "1", "b": "2"}));
    }

    #[test]
    fn label_selected_targets_and_group_match() {
        let mut o = objs();
        let t = Target {
            group: Some("apps".into()),
            label_selector: Some("tier=front".into()),
            ..Target::default()
        };
        apply(&mut o, &spec("spec:\n  replicas: 5\n", Some(t))).unwrap();
        assert_eq!(o[0]["spec"]["replicas"], 5);
    }

    #[test]
    fn strategic_merge_patches_are_refused_by_name() {
        let mut o = objs();
        let e = apply(
            &mut o,
            &spec("kind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n      - name: w\n        image: b\n", None),
        )
        .unwrap_err();
        assert!(matches!(e, PatchError::Strategic(_)), "{e}");
        let e = apply(
            &mut o,
            &spec("kind: ConfigMap\nmetadata:\n  name: web\n$patch: delete\n", None),
        )
        .unwrap_err();
        assert!(e.to_string().contains("$patch"), "{e}");
    }

    #[test]
    fn a_patch_that_matches_nothing_or_fails_says_so() {
        let mut o = objs();
        let none = Target {
            kind: Some("Service".into()),
            ..Target::default()
        };
        let e = apply(&mut o, &spec("- op: remove\n  path: /spec\n", Some(none))).unwrap_err();
        assert!(e.to_string().contains("matches no object"), "{e}");
        let cm = Target {
            kind: Some("ConfigMap".into()),
            ..Target::default()
        };
        let e = apply(&mut o, &spec("- op: remove\n  path: /nope\n", Some(cm))).unwrap_err();
        assert!(e.to_string().contains("ConfigMap web"), "{e}");
        let e = apply(
            &mut o,
            &spec(
                "- op: remove\n  path: /x\n",
                Some(Target {
                    label_selector: Some("a in (b)".into()),
                    ..Target::default()
                }),
            ),
        )
        .unwrap_err();
        assert!(e.to_string().contains("key=value"), "{e}");
    }
}
