//! Checks a work before anything is sent to the API server: its size, each manifest's required
//! fields, and objects named twice, with messages that say exactly what is wrong.

use std::collections::HashMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::manifestwork::ManifestWork;
use super::object::ObjKey;
use super::order::split_api_version;

/// Why a manifest or a whole work is refused before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The manifest's text is not JSON (possible only for works built outside serde).
    #[error("manifest is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// A manifest must be a JSON object.
    #[error("manifest is not an object")]
    NotObject,
    /// Fields every object needs, listed together so one status shows all that is wrong.
    #[error("manifest is missing {}", .0.join(", "))]
    Missing(Vec<&'static str>),
    /// The agent must know an object's name before creating it, to record and prune it.
    #[error("metadata.generateName is not supported: every manifest needs a fixed name")]
    GenerateName,
    /// An apiVersion with more than one `/` or no version.
    #[error("apiVersion {0:?} is not of the form [group/]version")]
    ApiVersion(String),
    /// The work's manifests add up to more than the limit.
    #[error(
        "work is {size} bytes of manifests, over the {limit} byte limit; nothing was applied and previously applied objects are left as they were"
    )]
    TooLarge {
        /// JSON bytes of all manifests.
        size: usize,
        /// `--max-work-bytes`.
        limit: usize,
    },
    /// More manifests than the limit: the record of their objects must fit in one API object.
    #[error(
        "work has {count} manifests, over the limit of {limit}; nothing was applied and previously applied objects are left as they were"
    )]
    TooManyManifests { count: usize, limit: usize },
    /// More JSONPaths (feedback rules and ignored fields together) than the limit: each is
    /// parsed and evaluated on every reconcile.
    #[error(
        "work names {count} JSONPaths in its feedback rules and ignored fields, over the limit of {limit}; nothing was applied and previously applied objects are left as they were"
    )]
    TooManyJsonPaths { count: usize, limit: usize },
    /// A manifest nested deeper than the limit: every step that walks it (hashing, merging,
    /// comparing) would recurse that deep.
    #[error(
        "manifest #{ordinal} nests {depth} levels deep, over the limit of {limit}; nothing was applied and previously applied objects are left as they were"
    )]
    TooDeep {
        ordinal: usize,
        depth: usize,
        limit: usize,
    },
    /// A name, namespace, group or version that cannot go into a request path as it is.
    #[error("{field} {value:?} is not valid: {why}")]
    BadName {
        field: &'static str,
        /// The value, cut to 100 characters (it may be hostile and long).
        value: String,
        why: &'static str,
    },
    /// Two manifests of one work name the same object; the first one is applied.
    #[error("manifest #{ordinal} is the same object as manifest #{first} ({key}); only #{first} is applied")]
    Duplicate {
        /// The later manifest, which is not applied.
        ordinal: usize,
        /// The manifest that is applied.
        first: usize,
        /// The object both name.
        key: ObjKey,
    },
}

/// Re-exported: the rule lives with the work wire, which the transports share.
pub use spokelet_work_api::names::MAX_WORK_NAME;
use spokelet_work_api::names::{label_fault, subdomain_fault};

fn bad(field: &'static str, value: &str, why: &'static str) -> ValidateError {
    ValidateError::BadName {
        field,
        value: value.chars().take(100).collect(),
        why,
    }
}

/// An object name as the API server takes it in a path: at most 253 characters, not `.` or
/// `..`, no `/` or `%` (the server's own rule for every kind; DNS rules vary by kind and are the
/// server's to apply).
pub fn check_object_name(field: &'static str, name: &str) -> Result<(), ValidateError> {
    if name.len() > 253 {
        return Err(bad(field, name, "longer than 253 characters"));
    }
    if name == "." || name == ".." {
        return Err(bad(field, name, "may not be '.' or '..'"));
    }
    if name.contains(['/', '%']) || name.chars().any(char::is_control) {
        return Err(bad(field, name, "may not contain '/', '%' or control characters"));
    }
    Ok(())
}

/// A DNS-1123 label (namespaces): lower-case letters, digits and '-', alphanumeric at both
/// ends, at most 63 characters.
pub fn check_label(field: &'static str, value: &str) -> Result<(), ValidateError> {
    label_fault(value).map_or(Ok(()), |why| Err(bad(field, value, why)))
}

/// A DNS-1123 subdomain of at most `max` characters (work names).
pub fn check_subdomain(field: &'static str, value: &str, max: usize) -> Result<(), ValidateError> {
    subdomain_fault(value, max).map_or(Ok(()), |why| Err(bad(field, value, why)))
}

/// An API group or version: lower-case letters, digits, '-' and '.' only (they go into paths).
fn check_api_part(field: &'static str, value: &str) -> Result<(), ValidateError> {
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok || value.len() > 253 || value.starts_with('.') || value.contains("..") {
        return Err(bad(
            field,
            value,
            "may hold only a-z, 0-9, '-' and '.' (not leading, not doubled)",
        ));
    }
    Ok(())
}

/// What one work may be, checked before anything of it is applied; over any limit the work is
/// refused whole and its objects are left as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkLimits {
    /// Largest work, in JSON bytes of its manifests. Default 4 MiB, the hub's default message
    /// limit: larger works cannot come from a real hub anyway.
    pub max_work_bytes: usize,
    /// Most manifests. 5,000 keeps the work's record (about 150 bytes per object) well inside
    /// the API server's 1.5 MiB request limit.
    pub max_manifests: usize,
    /// Most JSONPaths in the work's feedback rules and ignored fields together.
    pub max_json_paths: usize,
    /// Deepest nesting of a manifest (objects and arrays). Kubernetes objects nest a dozen or so
    /// levels; a large CRD's schema some 40.
    pub max_json_depth: usize,
}

impl Default for WorkLimits {
    fn default() -> Self {
        WorkLimits {
            max_work_bytes: 4 * 1024 * 1024,
            max_manifests: 5_000,
            max_json_paths: 512,
            max_json_depth: 100,
        }
    }
}

/// Refuses a work over any of `limits`.
pub fn check_limits(work: &ManifestWork, limits: &WorkLimits) -> Result<(), ValidateError> {
    let count = work.spec.workload.manifests.len();
    if count > limits.max_manifests {
        return Err(ValidateError::TooManyManifests {
            count,
            limit: limits.max_manifests,
        });
    }
    let size = work.spec.workload.json_len();
    if size > limits.max_work_bytes {
        return Err(ValidateError::TooLarge {
            size,
            limit: limits.max_work_bytes,
        });
    }
    let paths = json_path_count(work);
    if paths > limits.max_json_paths {
        return Err(ValidateError::TooManyJsonPaths {
            count: paths,
            limit: limits.max_json_paths,
        });
    }
    for (ordinal, m) in work.spec.workload.manifests.iter().enumerate() {
        let depth = json_depth(m.as_json());
        if depth > limits.max_json_depth {
            return Err(ValidateError::TooDeep {
                ordinal,
                depth,
                limit: limits.max_json_depth,
            });
        }
    }
    Ok(())
}

/// JSONPaths a work names: its feedback rules' and its ignored fields'.
fn json_path_count(work: &ManifestWork) -> usize {
    work.spec
        .manifest_configs
        .iter()
        .map(|c| {
            let feedback: usize = c.feedback_rules.iter().map(|r| r.json_paths.len()).sum();
            let ignored: usize = c
                .update_strategy
                .as_ref()
                .and_then(|u| u.server_side_apply.as_ref())
                .map_or(0, |s| s.ignore_fields.iter().map(|f| f.json_paths.len()).sum());
            feedback + ignored
        })
        .sum()
}

/// Deepest nesting of objects and arrays in JSON `text`, read from its brackets without
/// parsing (so without recursion, whatever the depth). Brackets inside strings do not count.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The first manifest seen for each object of one work, to refuse later ones naming it again.
#[derive(Debug, Default)]
pub struct FirstSeen {
    /// Object → ordinal of the first manifest naming it.
    by_key: HashMap<ObjKey, usize>,
}

impl FirstSeen {
    /// Records manifest `ordinal` as naming `key`, or refuses it if an earlier one did.
    pub fn check(&mut self, key: &ObjKey, ordinal: usize) -> Result<(), ValidateError> {
        if let Some(&first) = self.by_key.get(key) {
            return Err(ValidateError::Duplicate {
                ordinal,
                first,
                key: key.clone(),
            });
        }
        self.by_key.insert(key.clone(), ordinal);
        Ok(())
    }
}

/// A manifest that has the fields every object needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedManifest {
    /// API group ("" for core).
    pub group: String,
    pub version: String,
    pub kind: String,
    /// metadata.name.
    pub name: String,
    /// metadata.namespace as given (None when absent or empty).
    pub namespace: Option<String>,
    /// The whole manifest, unchanged.
    pub obj: Value,
    /// Hash of the manifest as given (see SPEC_HASH_ANNOTATION and claims).
    pub content_hash: String,
}

/// Checks one manifest's required fields (reporting all missing ones together) and splits its
/// apiVersion into group and version.
pub fn parse_manifest(v: &Value) -> Result<ParsedManifest, ValidateError> {
    let Some(o) = v.as_object() else {
        return Err(ValidateError::NotObject);
    };
    let str_field = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").trim().to_string();
    let api_version = str_field("apiVersion");
    let kind = str_field("kind");
    let meta = o.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut missing = Vec::new();
    if api_version.is_empty() {
        missing.push("apiVersion");
    }
    if kind.is_empty() {
        missing.push("kind");
    }
    if name.is_empty() {
        missing.push("metadata.name");
    }
    if !missing.is_empty() {
        return Err(ValidateError::Missing(missing));
    }
    if meta.and_then(|m| m.get("generateName")).is_some() {
        return Err(ValidateError::GenerateName);
    }
    let (group, version) = split_api_version(&api_version);
    if version.is_empty() || api_version.matches('/').count() > 1 {
        return Err(ValidateError::ApiVersion(api_version));
    }
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    check_object_name("metadata.name", &name)?;
    if let Some(ns) = &namespace {
        check_label("metadata.namespace", ns)?;
    }
    check_api_part("apiVersion group", group)?;
    check_api_part("apiVersion version", version)?;
    let content_hash = hex::encode(&Sha256::digest(serde_json::to_vec(v).unwrap_or_default())[..16]);
    Ok(ParsedManifest {
        group: group.to_string(),
        version: version.to_string(),
        kind,
        name,
        namespace,
        obj: v.clone(),
        content_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn work_with(manifests: Vec<serde_json::Value>, configs: serde_json::Value) -> ManifestWork {
        serde_json::from_value(json!({
            "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
            "metadata": {"name": "w"},
            "spec": {"workload": {"manifests": manifests}, "manifestConfigs": configs},
        }))
        .unwrap()
    }

    #[test]
    fn json_paths_are_counted_across_feedback_rules_and_ignored_fields() {
        let id = json!({"group": "", "resource": "configmaps", "name": "c", "namespace": "n"});
        let configs = json!([
            {"resourceIdentifier": id, "feedbackRules": [{"type": "JSONPaths",
                "jsonPaths": [{"name": "a", "path": ".a"}, {"name": "b", "path": ".b"}]}]},
            {"resourceIdentifier": id, "updateStrategy": {"type": "ServerSideApply",
                "serverSideApply": {"ignoreFields": [{"jsonPaths": [".c", ".d", ".e"]}]}}},
        ]);
        let w = work_with(vec![], configs);
        let mut limits = WorkLimits {
            max_json_paths: 5,
            ..WorkLimits::default()
        };
        assert!(check_limits(&w, &limits).is_ok());
        limits.max_json_paths = 4;
        let e = check_limits(&w, &limits).unwrap_err();
        assert!(
            matches!(e, ValidateError::TooManyJsonPaths { count: 5, limit: 4 }),
            "{e}"
        );
        assert!(e.to_string().contains("nothing was applied"), "{e}");
    }

    #[test]
    fn a_manifest_nested_too_deep_refuses_the_work_naming_it() {
        let mut deep = json!("leaf");
        for _ in 0..10 {
            deep = json!({"x": [deep]});
        }
        let cm = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});
        // Two levels per step, plus the manifest and its `data`.
        let w = work_with(vec![cm(json!({})), cm(deep)], json!([]));
        let mut limits = WorkLimits {
            max_json_depth: 21,
            ..WorkLimits::default()
        };
        assert!(check_limits(&w, &limits).is_ok());
        limits.max_json_depth = 20;
        let e = check_limits(&w, &limits).unwrap_err();
        assert!(
            matches!(
                e,
                ValidateError::TooDeep {
                    ordinal: 1,
                    depth: 21,
                    limit: 20
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn brackets_in_strings_do_not_count_towards_depth() {
        assert_eq!(json_depth(r#"{"a":"[[[{{{","b":"\\\"[["}"#), 1);
        assert_eq!(json_depth(r#"[[],[[1]]]"#), 3);
        assert_eq!(json_depth("7"), 0);
    }

    #[test]
    fn missing_fields_listed() {
        let e = parse_manifest(&json!({"metadata": {}})).unwrap_err().to_string();
        assert_eq!(e, "manifest is missing apiVersion, kind, metadata.name");
        let e = parse_manifest(&json!({"apiVersion": "v1", "kind": "ConfigMap"}))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "manifest is missing metadata.name");
        assert!(parse_manifest(&json!("str")).is_err());
        assert!(
            parse_manifest(&json!({"apiVersion": "a/b/c", "kind": "K", "metadata": {"name": "n"}})).is_err()
        );
        assert!(
            parse_manifest(
                &json!({"apiVersion": "v1", "kind": "K", "metadata": {"generateName": "n-", "name": "x"}})
            )
            .is_err()
        );
    }

    #[test]
    fn a_second_manifest_for_one_object_is_refused() {
        let key = ObjKey {
            group: String::new(),
            resource: "configmaps".into(),
            namespace: "n".into(),
            name: "a".into(),
        };
        let mut seen = FirstSeen::default();
        assert!(seen.check(&key, 0).is_ok());
        let e = seen.check(&key, 3).unwrap_err().to_string();
        assert_eq!(
            e,
            "manifest #3 is the same object as manifest #0 (configmaps/n/a); only #0 is applied"
        );
    }

    #[test]
    fn names_that_cannot_go_into_a_path_are_refused_before_any_request() {
        let m = |name: &str, ns: &str| {
            parse_manifest(
                &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}}),
            )
        };
        for (name, ns) in [
            ("..", "ok"),
            ("a/b", "ok"),
            ("a%2f", "ok"),
            ("ok", "Bad_NS"),
            ("ok", "../x"),
            ("ok", "-a"),
        ] {
            let e = m(name, ns).unwrap_err();
            assert!(matches!(e, ValidateError::BadName { .. }), "{name} {ns}: {e}");
        }
        assert!(m(&"n".repeat(254), "ok").is_err());
        // RBAC names may hold ':'; the server decides per kind.
        assert!(m("system:aggregate-to-view", "ok").is_ok());
        let bad_group =
            parse_manifest(&json!({"apiVersion": "../v1", "kind": "K", "metadata": {"name": "n"}}));
        assert!(bad_group.is_err());
        assert!(check_subdomain("work name", "model-server.v1", MAX_WORK_NAME).is_ok());
        for w in ["", "UPPER", "a/b", "-a", &"w".repeat(MAX_WORK_NAME + 1)] {
            assert!(check_subdomain("work name", w, MAX_WORK_NAME).is_err(), "{w}");
        }
    }

    #[test]
    fn parses_groups_and_namespace() {
        let p = parse_manifest(&json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": ""}})).unwrap();
        assert_eq!(
            (p.group.as_str(), p.version.as_str(), p.namespace),
            ("apps", "v1", None)
        );
        let p = parse_manifest(
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}),
        )
        .unwrap();
        assert_eq!((p.group.as_str(), p.namespace.as_deref()), ("", Some("x")));
        assert_eq!(p.content_hash.len(), 32);
    }
}
