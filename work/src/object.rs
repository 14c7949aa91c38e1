//! Object identity and the JSON helpers the applier uses to compare and merge objects.

use serde_json::{Map, Value};

use super::jsonpath::Step;
use super::manifestwork::AppliedManifestResourceMeta;

/// Label the agent puts on every object it writes, so drift watches can select only ours
/// server-side (watching every object of a kind and filtering by ownerReference client-side would
/// stream the whole cluster to us).
pub const MANAGED_LABEL: &str = "work.spokelet.io/managed";
/// Annotation holding the hash of the manifest last applied, so OnSpokeChange ignoreFields can tell
/// a hub-side change (apply the field) from a spoke-side one (leave it) after a restart too.
pub const SPEC_HASH_ANNOTATION: &str = "work.spokelet.io/spec-hash";

/// The API server's own message for an API error, else the error's text (kube's Display of an
/// API error embeds a debug dump of the whole Status).
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => other.to_string(),
    }
}

/// Version-independent identity of an object on the spoke.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    /// API group ("" for core).
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    pub name: String,
}

impl From<&AppliedManifestResourceMeta> for ObjKey {
    /// The object an AppliedManifestWork entry records (its version does not matter: one object
    /// is served under every version of its kind).
    fn from(e: &AppliedManifestResourceMeta) -> Self {
        ObjKey {
            group: e.group.clone(),
            resource: e.resource.clone(),
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        if self.namespace.is_empty() {
            write!(f, "{}{}/{}", self.resource, g, self.name)
        } else {
            write!(f, "{}{}/{}/{}", self.resource, g, self.namespace, self.name)
        }
    }
}

/// True when every value `desired` sets is present and equal in `live`. Top-level `apiVersion`,
/// `kind` and `status` and metadata other than labels/annotations are not compared: list items
/// from the server omit apiVersion/kind, status is not ours, and ownerReferences are checked apart.
pub fn desired_is_subset(desired: &Value, live: &Value) -> bool {
    let (Some(d), Some(l)) = (desired.as_object(), live.as_object()) else {
        return false;
    };
    for (k, dv) in d {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => continue,
            "metadata" => {
                for part in ["labels", "annotations"] {
                    if let Some(dm) = dv.get(part) {
                        let empty = Value::Object(Map::new());
                        let lm = live.get("metadata").and_then(|m| m.get(part)).unwrap_or(&empty);
                        if !subset(dm, lm) {
                            return false;
                        }
                    }
                }
            }
            _ => match l.get(k) {
                Some(lv) if subset(dv, lv) => {}
                // The server drops empty maps/lists (`data: {}`): absent equals empty.
                None if is_emptyish(dv) => {}
                _ => return false,
            },
        }
    }
    true
}

/// Recursive subset: objects by key, arrays element-wise with equal length, numbers by value.
pub fn subset(d: &Value, l: &Value) -> bool {
    match (d, l) {
        (Value::Object(dm), Value::Object(lm)) => dm.iter().all(|(k, dv)| match lm.get(k) {
            Some(lv) => subset(dv, lv),
            // An explicit null or empty value in the manifest equals an omitted field on the server.
            None => is_emptyish(dv),
        }),
        (Value::Array(da), Value::Array(la)) => {
            da.len() == la.len() && da.iter().zip(la).all(|(a, b)| subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Null, _) => true,
        _ => d == l,
    }
}

fn is_emptyish(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Merges `overlay` into `base`: objects recursively, everything else replaced (lists included).
pub fn merge_into(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, ov) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_object() && ov.is_object() => merge_into(bv, ov),
                    _ => {
                        b.insert(k.clone(), ov.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Reads a simple path (fields and indices).
pub fn get_path<'a>(v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let mut cur = v;
    for s in steps {
        cur = match s {
            Step::Field(f) => cur.get(f.as_str())?,
            Step::Index(i) => {
                let a = cur.as_array()?;
                let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                a.get(usize::try_from(idx).ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// Writes a simple path, creating objects along fields; returns false if an index is out of range.
pub fn set_path(v: &mut Value, steps: &[Step], val: Value) -> bool {
    let Some((last, parents)) = steps.split_last() else {
        *v = val;
        return true;
    };
    let mut cur = v;
    for s in parents {
        cur = match s {
            Step::Field(f) => {
                if !cur.is_object() {
                    *cur = Value::Object(Map::new());
                }
                let Some(m) = cur.as_object_mut() else {
                    return false;
                };
                m.entry(f.clone()).or_insert_with(|| Value::Object(Map::new()))
            }
            Step::Index(i) => {
                let Some(a) = cur.as_array_mut() else { return false };
                let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                match usize::try_from(idx).ok().and_then(|u| a.get_mut(u)) {
                    Some(x) => x,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match last {
        Step::Field(f) => match cur.as_object_mut() {
            Some(m) => {
                m.insert(f.clone(), val);
                true
            }
            None => false,
        },
        Step::Index(i) => {
            let Some(a) = cur.as_array_mut() else { return false };
            let idx = if *i < 0 { a.len() as i64 + i } else { *i };
            match usize::try_from(idx).ok().and_then(|u| a.get_mut(u)) {
                Some(x) => {
                    *x = val;
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

/// Removes a simple path; returns whether something was removed.
pub fn remove_path(v: &mut Value, steps: &[Step]) -> bool {
    let Some((last, parents)) = steps.split_last() else {
        return false;
    };
    let mut cur = v;
    for s in parents {
        cur = match s {
            Step::Field(f) => match cur.get_mut(f.as_str()) {
                Some(x) => x,
                None => return false,
            },
            Step::Index(i) => match cur
                .as_array_mut()
                .and_then(|a| usize::try_from(*i).ok().and_then(|u| a.get_mut(u)))
            {
                Some(x) => x,
                None => return false,
            },
            _ => return false,
        };
    }
    match last {
        Step::Field(f) => cur.as_object_mut().is_some_and(|m| m.remove(f).is_some()),
        _ => false,
    }
}

/// Rewrites a Secret's `stringData` into `data` (base64), as the API server does on write, so
/// comparing the manifest with the live Secret works and an unchanged Secret is not rewritten.
pub fn normalize_secret(obj: &mut Value) {
    let Some(m) = obj.as_object_mut() else { return };
    let Some(Value::Object(sd)) = m.remove("stringData") else {
        return;
    };
    let data = m.entry("data").or_insert_with(|| Value::Object(Map::new()));
    if let Some(d) = data.as_object_mut() {
        for (k, v) in sd {
            let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            d.insert(k, Value::String(base64_encode(text.as_bytes())));
        }
    }
}

/// Standard base64 with padding (what the API server uses for Secret data).
pub fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads `metadata.<field>` as a string.
pub fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata")?.get(field)?.as_str()
}

pub fn owner_refs(v: &Value) -> Vec<Value> {
    v.get("metadata")
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether an object carries an ownerReference with this uid.
pub fn has_owner(v: &Value, uid: &str) -> bool {
    owner_refs(v)
        .iter()
        .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonpath::JsonPath;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_defaults() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "labels": {"a": "1"}},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let l = json!({"metadata": {"name": "x", "uid": "u", "labels": {"a": "1", "b": "2"}},
            "spec": {"replicas": 1, "progressDeadlineSeconds": 600,
              "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always"}]}}},
            "status": {}});
        assert!(desired_is_subset(&d, &l));
        let mut l2 = l.clone();
        l2["spec"]["replicas"] = json!(3);
        assert!(!desired_is_subset(&d, &l2));
        let mut l3 = l.clone();
        l3["metadata"]["labels"]["a"] = json!("9");
        assert!(!desired_is_subset(&d, &l3));
        let d2 = json!({"data": {"k": "v"}, "metadata": {"annotations": {}}});
        assert!(!desired_is_subset(&d2, &json!({"metadata": {}})));
        assert!(desired_is_subset(
            &d2,
            &json!({"metadata": {}, "data": {"k": "v"}})
        ));
    }

    #[test]
    fn merge_and_paths() {
        let mut b = json!({"spec": {"a": 1, "b": [1, 2]}, "x": 1});
        merge_into(&mut b, &json!({"spec": {"b": [3], "c": 2}}));
        assert_eq!(b, json!({"spec": {"a": 1, "b": [3], "c": 2}, "x": 1}));
        let p = JsonPath::parse(".spec.b[0]").unwrap();
        assert_eq!(get_path(&b, p.simple().unwrap()), Some(&json!(3)));
        assert!(set_path(&mut b, p.simple().unwrap(), json!(7)));
        assert_eq!(b["spec"]["b"][0], 7);
        let q = JsonPath::parse(".spec.new.deep").unwrap();
        assert!(set_path(&mut b, q.simple().unwrap(), json!("v")));
        assert_eq!(b["spec"]["new"]["deep"], "v");
        assert!(remove_path(&mut b, q.simple().unwrap()));
        assert!(!remove_path(&mut b, q.simple().unwrap()));
    }

    #[test]
    fn secret_string_data_becomes_data() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"t-17"), "dC0xNw==");
        let mut s = json!({"kind": "Secret", "data": {"a": "YQ=="}, "stringData": {"b": "b"}});
        normalize_secret(&mut s);
        assert_eq!(s, json!({"kind": "Secret", "data": {"a": "YQ==", "b": "Yg=="}}));
    }

    #[test]
    fn key_display() {
        let k = ObjKey {
            group: "apps".into(),
            resource: "deployments".into(),
            namespace: "ns".into(),
            name: "d".into(),
        };
        assert_eq!(k.to_string(), "deployments.apps/ns/d");
    }
}
