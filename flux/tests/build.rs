//! Assembling unpacked artifact directories into objects, as the engine's Flux step does.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::{Value, json};
use spokelet_flux::build::{BuildError, BuildLimits, Overlay, build};

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

fn names(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn cm(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n")
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      volumes:
      - name: settings
        configMap: {name: settings}
      containers:
      - name: web
        image: nginx
";

#[test]
fn a_plain_directory_is_every_yaml_file_below_it_in_lexical_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "app/b.yaml", &format!("{}---\n{}", cm("b1"), cm("b2")));
    write(root, "app/a.yml", &cm("a"));
    write(root, "app/sub/c.yaml", &cm("c"));
    write(root, "app/README.md", "not yaml: [");
    write(
        root,
        "app/list.json",
        &json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}]})
        .to_string(),
    );
    write(root, "other/x.yaml", &cm("x"));
    let objs = build(root, "./app", &Overlay::default(), &BuildLimits::default()).unwrap();
    assert_eq!(
        names(&objs),
        [
            "ConfigMap/a",
            "ConfigMap/b1",
            "ConfigMap/b2",
            "Secret/s",
            "ConfigMap/c"
        ]
    );
}

#[test]
fn a_kustomization_assembles_resources_namespace_names_labels_annotations_and_patches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "base/deploy.yaml", DEPLOYMENT);
    write(root, "base/settings.yaml", &cm("settings"));
    write(
        root,
        "base/kustomization.yaml",
        "resources: [deploy.yaml, settings.yaml]\n",
    );
    write(
        root,
        "prod/replicas.yaml",
        "- op: replace\n  path: /spec/replicas\n  value: 3\n",
    );
    write(
        root,
        "prod/kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../base]
namespace: prod
namePrefix: team-
nameSuffix: -v2
commonLabels: {team: ml}
labels:
- pairs: {tier: front}
commonAnnotations: {owner: hub}
patches:
- path: replicas.yaml
  target: {kind: Deployment, name: web}
- patch: |
    kind: ConfigMap
    metadata: {name: settings}
    data: {extra: 'yes'}
",
    );
    let objs = build(root, "prod", &Overlay::default(), &BuildLimits::default()).unwrap();
    assert_eq!(
        names(&objs),
        ["Deployment/team-web-v2", "ConfigMap/team-settings-v2"]
    );
    let d = &objs[0];
    assert_eq!(d["metadata"]["namespace"], "prod");
    assert_eq!(
        d["spec"]["replicas"], 3,
        "patched before the rename, by the original name"
    );
    assert_eq!(
        d["spec"]["selector"]["matchLabels"],
        json!({"app": "web", "team": "ml"})
    );
    assert_eq!(d["metadata"]["labels"], json!({"team": "ml", "tier": "front"}));
    assert!(d["spec"]["template"]["metadata"]["labels"].get("tier").is_none());
    assert_eq!(d["spec"]["template"]["metadata"]["annotations"]["owner"], "hub");
    assert_eq!(
        d["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"],
        "team-settings-v2"
    );
    assert_eq!(objs[1]["data"], json!({"k": "v", "extra": "yes"}));
}

#[test]
fn the_flux_overlay_comes_last_and_only_touches_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "deploy.yaml", DEPLOYMENT);
    write(
        root,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    let overlay = Overlay {
        target_namespace: Some("apps".into()),
        labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
        annotations: BTreeMap::from([("note".to_string(), "x".to_string())]),
        patches: vec![
            json!({"patch": "- op: add\n  path: /spec/paused\n  value: true\n",
                             "target": {"kind": "Deployment"}}),
        ],
        ..Overlay::default()
    };
    let objs = build(root, "", &overlay, &BuildLimits::default()).unwrap();
    let d = &objs[0];
    assert_eq!(d["metadata"]["namespace"], "apps");
    assert_eq!(d["spec"]["paused"], true);
    assert_eq!(d["metadata"]["labels"], json!({"env": "prod"}));
    assert!(d["spec"]["selector"]["matchLabels"].get("env").is_none());
    assert!(d["spec"]["template"]["metadata"].get("annotations").is_none());
    assert!(
        objs[1]["metadata"].get("namespace").is_none(),
        "a Namespace gets none"
    );
}

#[test]
fn unsupported_kustomize_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (field, text) in [
        (
            "configMapGenerator",
            "configMapGenerator:\n- name: x\n  literals: [a=b]\n",
        ),
        ("images", "images:\n- name: nginx\n  newTag: '2'\n"),
        (
            "resources: https://example.com/x.yaml",
            "resources: [https://example.com/x.yaml]\n",
        ),
    ] {
        write(root, "k/kustomization.yaml", text);
        let e = build(root, "k", &Overlay::default(), &BuildLimits::default()).unwrap_err();
        assert!(e.is_unsupported(), "{field}: {e}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    write(root, "s/deploy.yaml", DEPLOYMENT);
    write(
        root,
        "s/kustomization.yaml",
        "resources: [deploy.yaml]\npatches:\n- patch: |\n    kind: Deployment\n    metadata: {name: web}\n    spec:\n      template:\n        spec:\n          containers:\n          - {name: web, image: b}\n",
    );
    let e = build(root, "s", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(
        e.is_unsupported() && e.to_string().contains("strategic merge"),
        "{e}"
    );
}

#[test]
fn paths_never_leave_the_artifact() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("artifact");
    write(outer.path(), "secret.yaml", &cm("outside"));
    write(&root, "k/kustomization.yaml", "resources: [../../secret.yaml]\n");
    let e = build(&root, "k", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(
        matches!(e, BuildError::Path { .. }) && e.to_string().contains("climbs out"),
        "{e}"
    );
    write(&root, "k/kustomization.yaml", "resources: [/etc/passwd]\n");
    let e = build(&root, "k", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    let e = build(&root, "../", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(e.to_string().contains("climbs out"), "{e}");
    let e = build(&root, "missing", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn broken_artifacts_fail_with_where_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a/x.yaml", &format!("{}---\nkind: [unclosed\n", cm("ok")));
    let e = build(root, "a", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(e.to_string().contains("a/x.yaml: document 2"), "{e}");
    write(root, "b/x.yaml", &format!("{}---\n{}", cm("same"), cm("same")));
    let e = build(root, "b", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(matches!(e, BuildError::Duplicate(_)), "{e}");
    write(
        root,
        "c/x.yaml",
        &format!("{}---\n{}---\n{}", cm("1"), cm("2"), cm("3")),
    );
    let small = BuildLimits {
        max_objects: 2,
        ..BuildLimits::default()
    };
    let e = build(root, "c", &Overlay::default(), &small).unwrap_err();
    assert!(matches!(e, BuildError::TooManyObjects { limit: 2 }), "{e}");
    // Including itself is a cycle, named as one (it used to end only at the depth limit).
    write(root, "loop/kustomization.yaml", "resources: [.]\n");
    let e = build(root, "loop", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(matches!(e, BuildError::Cycle { .. }), "{e}");
    // A chain deeper than the limit, without a cycle.
    for level in 0..20 {
        write(
            root,
            &format!("deep/l{level}/kustomization.yaml"),
            &format!("resources: [../l{}]\n", level + 1),
        );
    }
    write(root, "deep/l20/kustomization.yaml", "resources: []\n");
    let e = build(root, "deep/l0", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(matches!(e, BuildError::TooDeep { .. }), "{e}");
}

/// A small artifact whose kustomizations fan out (17 levels, each listing the next four times:
/// 4^16 visits, all within the depth limit and producing no object) is refused by the read
/// budget instead of running for ever.
#[test]
fn a_fan_out_of_resources_is_refused_by_the_read_budget() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for level in 0..17 {
        let resources = if level == 16 {
            "resources: []\n".to_string()
        } else {
            let next = format!("../d{}", level + 1);
            format!("resources: [{next}, {next}, {next}, {next}]\n")
        };
        write(root, &format!("d{level}/kustomization.yaml"), &resources);
    }
    let e = build(root, "d0", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert_eq!(e, BuildError::TooManyReads { limit: 10_000 }, "{e}");
}

/// Kustomizations that include each other are a cycle, named as one.
#[test]
fn kustomizations_including_each_other_are_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a/kustomization.yaml", "resources: [../b]\n");
    write(root, "b/kustomization.yaml", "resources: [../a]\n");
    let e = build(root, "a", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(matches!(&e, BuildError::Cycle { path } if path == "a"), "{e}");
}

/// The bytes of all files together are bounded, not only each file's.
#[test]
fn the_bytes_of_one_build_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let padding = format!("# {}\n", "x".repeat(1000));
    for i in 0..10 {
        write(
            root,
            &format!("app/cm{i}.yaml"),
            &format!("{padding}apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm{i}}}\n"),
        );
    }
    let limits = BuildLimits {
        max_total_bytes: 5_000,
        ..BuildLimits::default()
    };
    let e = build(root, "app", &Overlay::default(), &limits).unwrap_err();
    assert_eq!(e, BuildError::TooManyBytes { limit: 5_000 }, "{e}");
    let objs = build(root, "app", &Overlay::default(), &BuildLimits::default()).unwrap();
    assert_eq!(objs.len(), 10);
}

/// A YAML billion-laughs (nine levels of aliases each repeating the last nine times, about 2 KB)
/// is refused by the YAML reader's alias budget, not expanded.
#[test]
fn a_yaml_alias_bomb_is_refused_not_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut text = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: lol}\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    for w in names.windows(2) {
        let (prev, next) = (w[0], w[1]);
        let refs = vec![format!("*{prev}"); 9].join(",");
        text.push_str(&format!("{next}: &{next} [{refs}]\n"));
    }
    write(root, "bomb/cm.yaml", &text);
    let e = build(root, "bomb", &Overlay::default(), &BuildLimits::default()).unwrap_err();
    assert!(matches!(e, BuildError::Yaml { .. }), "{e}");
    assert!(e.to_string().contains("repetition limit"), "{e}");
}
