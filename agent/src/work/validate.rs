//! Checks a raw manifest before anything is sent to the API server, with messages that say
//! exactly what is wrong.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::order::split_api_version;

/// A manifest that has the fields every object needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedManifest {
    /// API group ("" for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// metadata.name.
    pub name: String,
    /// metadata.namespace as given (None when absent or empty).
    pub namespace: Option<String>,
    /// The object.
    pub obj: Value,
    /// Hash of the manifest as given (see SPEC_HASH_ANNOTATION and claims).
    pub content_hash: String,
}

/// Validates one manifest.
pub fn parse_manifest(v: &Value) -> Result<ParsedManifest, String> {
    let Some(o) = v.as_object() else {
        return Err("manifest is not an object".into());
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
        return Err(format!("manifest is missing {}", missing.join(", ")));
    }
    if meta.and_then(|m| m.get("generateName")).is_some() {
        return Err("metadata.generateName is not supported: every manifest needs a fixed name".into());
    }
    let (group, version) = split_api_version(&api_version);
    if version.is_empty() || api_version.matches('/').count() > 1 {
        return Err(format!(
            "apiVersion {api_version:?} is not of the form [group/]version"
        ));
    }
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
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

    #[test]
    fn missing_fields_listed() {
        let e = parse_manifest(&json!({"metadata": {}})).unwrap_err();
        assert_eq!(e, "manifest is missing apiVersion, kind, metadata.name");
        let e = parse_manifest(&json!({"apiVersion": "v1", "kind": "ConfigMap"})).unwrap_err();
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
