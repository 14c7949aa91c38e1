//! Property tests with hostile generators for the kustomize build and the YAML it reads:
//! random artifact trees of kustomizations (resources that climb out, include themselves or fan
//! out, patches of every kind, unknown fields) and YAML files (anchors and aliases, lists,
//! scalars, broken syntax), each built within small limits. Whatever the tree: no panic, a
//! typed result, and never more objects than the limit.

use std::path::Path;

use proptest::prelude::*;
use spokelet_flux::build::{BuildLimits, Overlay, build};

fn limits() -> BuildLimits {
    BuildLimits {
        max_objects: 50,
        max_file_bytes: 64 * 1024,
        max_nesting: 6,
        max_reads: 200,
        max_total_bytes: 256 * 1024,
        max_duration: std::time::Duration::from_secs(20),
    }
}

const DIRS: &[&str] = &["a", "b", "a/c", "b/d"];

/// A `resources` entry: a sibling, a parent, the directory itself, a climb out, a remote URL,
/// a file.
fn resource() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "../a",
            "../b",
            "./c",
            ".",
            "..",
            "../../..",
            "/etc",
            "c",
            "x.yaml",
            "https://example.com/x",
            "d",
            "../a/c"
        ])
        .prop_map(String::from),
        "[a-z./]{0,12}",
    ]
}

fn patch() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("- patch: |\n    - op: copy\n      from: /data\n      path: /data/x\n  target: {kind: ConfigMap}\n".to_string()),
        Just("- patch: |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: cm}\n    data: {k: v}\n".to_string()),
        Just("- patch: |\n    $patch: delete\n    kind: ConfigMap\n".to_string()),
        Just("- path: missing.yaml\n".to_string()),
        Just("- patch: '[1, 2'\n".to_string()),
    ]
}

fn kustomization() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(resource(), 0..5),
        proptest::option::of(patch()),
        proptest::option::of("[a-z-]{0,10}"),
        any::<bool>(),
    )
        .prop_map(|(resources, patch, namespace, unknown)| {
            let list = resources
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let mut text = format!("resources: [{list}]\n");
            if let Some(p) = patch {
                text.push_str("patches:\n");
                text.push_str(&p);
            }
            if let Some(ns) = namespace {
                text.push_str(&format!("namespace: \"{ns}\"\n"));
            }
            if unknown {
                text.push_str("images: [{name: x}]\n");
            }
            text
        })
}

/// A YAML file: objects, Lists, aliases (a small bomb among them), scalars, broken syntax.
fn yaml_file() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(|n| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {n}}}\ndata: {{k: v}}\n")),
        Just("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: l1}}\n- 3\n".to_string()),
        Just("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n".to_string()),
        Just("just a string\n".to_string()),
        Just("{{{{ not yaml".to_string()),
        Just("---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: twice}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: twice}\n".to_string()),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// A tree: per directory, a kustomization or not, and a few YAML files.
fn tree() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(
        (
            prop::sample::select(DIRS.to_vec()),
            proptest::option::of(kustomization()),
            proptest::collection::vec(yaml_file(), 0..3),
        ),
        1..5,
    )
    .prop_map(|dirs| {
        let mut files = Vec::new();
        for (dir, k, yamls) in dirs {
            if let Some(k) = k {
                files.push((format!("{dir}/kustomization.yaml"), k));
            }
            for (i, y) in yamls.into_iter().enumerate() {
                files.push((format!("{dir}/f{i}.yaml"), y));
            }
        }
        files
    })
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_artifact_tree_builds_within_its_limits_or_fails_with_a_reason(files in tree(), start in prop::sample::select(DIRS.to_vec())) {
        let tmp = tempfile::tempdir().unwrap();
        for dir in DIRS {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        for (rel, text) in &files {
            write(tmp.path(), rel, text);
        }
        let limits = limits();
        match build(tmp.path(), start, &Overlay::default(), &limits) {
            Ok(objs) => prop_assert!(objs.len() <= limits.max_objects),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
