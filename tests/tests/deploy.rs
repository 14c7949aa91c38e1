//! The install in `deploy/kubernetes/`: every overlay renders with `kubectl kustomize` and is
//! accepted by the real API server (server-side dry-run apply), and what it renders keeps the
//! promises the manifests make: pinned images, RuntimeDefault seccomp, probes and resource
//! requests on every container, read-only host mounts, the node role never holding the
//! engine's identity (outside the single-node overlay), and a comment on every RBAC rule.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use spokelet_e2e::{Binary, ClusterOptions, KubeCluster, shared_spoke};

const OVERLAYS: &[&str] = &[
    "grpc-hub",
    "kube-hub",
    "kube-hub-bootstrap",
    "grpc-hub-bootstrap",
    "gpu-nodes",
    "single-node",
];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The suite's kubectl (the servers' release, built by tests/env/install.sh).
fn kubectl_path() -> PathBuf {
    Binary::Kubectl.find().unwrap_or_else(|e| panic!("{e}"))
}

fn kubectl() -> std::process::Command {
    std::process::Command::new(kubectl_path())
}

/// `kubectl apply --server-side -f -` of `text` (with `extra` flags) as the deploy test's
/// field manager.
async fn kubectl_apply(kubeconfig: &Path, extra: &[&str], text: &str) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "--server-side", "--field-manager=deploy-test"])
        .args(extra)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

/// `kubectl kustomize DIR`, as YAML documents.
fn render(dir: &Path) -> (String, Vec<Value>) {
    let out = kubectl()
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl (tests/env/install.sh checks for it): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap()).unwrap()
        })
        .filter(|v: &Value| !v.is_null())
        .collect();
    (text, docs)
}

fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
        .map(|d| {
            let name = format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            );
            (name, &d["spec"]["template"]["spec"])
        })
        .collect()
}

fn check_promises(overlay: &str, docs: &[Value]) {
    let pods = pod_specs(docs);
    assert!(!pods.is_empty(), "{overlay}: no workloads rendered");
    for (name, spec) in &pods {
        let what = format!("{overlay} {name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{what}"
        );
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
        for c in spec["containers"].as_array().unwrap() {
            let image = c["image"].as_str().unwrap();
            assert!(
                image.contains('@') || (image.contains(':') && !image.ends_with(":latest")),
                "{what}: image {image} is not pinned"
            );
            assert!(image.contains('/'), "{what}: image {image} names no registry");
            for probe in ["livenessProbe", "readinessProbe"] {
                assert!(c[probe].is_object(), "{what} {}: no {probe}", c["name"]);
            }
            assert!(
                c["resources"]["requests"]["memory"].is_string(),
                "{what}: no memory request"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{what}: no memory limit"
            );
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{what}");
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let volume = spec["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap();
                if volume["hostPath"].is_object() {
                    assert_eq!(
                        m["readOnly"], true,
                        "{what}: host mount {} is writable",
                        m["name"]
                    );
                }
            }
        }
        if name == "DaemonSet/spokelet-node" && overlay != "single-node" {
            assert_eq!(
                spec["serviceAccountName"], "spokelet-node",
                "{what}: the node role holds its own identity only"
            );
        }
    }
    let engine = pods.iter().find(|(n, _)| n == "Deployment/spokelet-engine");
    if overlay == "single-node" {
        assert!(engine.is_none(), "single-node runs no engine Deployment");
        let (_, ds) = pods.iter().find(|(n, _)| n == "DaemonSet/spokelet-node").unwrap();
        let mut names: Vec<&str> = ds["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, vec!["engine", "node"]);
    } else {
        let (_, spec) = engine.expect("the engine Deployment");
        let c = &spec["containers"][0];
        let leader = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "SPOKELET_LEADER_ELECT");
        assert_eq!(
            leader.map(|e| &e["value"]),
            Some(&Value::from("true")),
            "{overlay}: engine without leader election"
        );
    }
}

/// Every rule of every Role and ClusterRole in the base has a comment right above it.
#[test]
fn every_rbac_rule_says_why() {
    for file in ["engine-rbac.yaml", "node-rbac.yaml"] {
        let text = std::fs::read_to_string(deploy().join("base").join(file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                assert!(
                    i > 0 && lines[i - 1].trim_start().starts_with('#'),
                    "{file} line {}: a rule without a comment saying why",
                    i + 1
                );
            }
        }
    }
    let hub = std::fs::read_to_string(deploy().join("../hub/agent-rbac.yaml")).unwrap();
    let lines: Vec<&str> = hub.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            assert!(
                lines[i - 1].trim_start().starts_with('#'),
                "hub rbac line {}",
                i + 1
            );
        }
    }
}

#[tokio::test]
async fn every_overlay_renders_keeps_its_promises_and_the_api_server_accepts_it() {
    let spoke = shared_spoke().await;
    // The namespace must exist for a dry run of the objects in it (a dry run creates nothing).
    let namespace =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "spokelet-system"}});
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(spoke.client());
    match api
        .create(&Default::default(), &serde_json::from_value(namespace).unwrap())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating spokelet-system: {e}"),
    }
    for overlay in OVERLAYS {
        let (text, docs) = render(&deploy().join("overlays").join(overlay));
        check_promises(overlay, &docs);
        let out = kubectl_apply(spoke.kubeconfig_path(), &["--dry-run=server"], &text).await;
        assert!(
            out.status.success(),
            "{overlay}: the API server refused it:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            applied.lines().filter(|l| l.contains("(server dry run)")).count(),
            docs.len(),
            "{overlay}: {applied}"
        );
    }
}

/// The grpc-hub overlay with `component` added, rendered.
fn render_with_component(component: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    // kustomize takes only relative paths: climb from the scratch directory to `/`.
    let up = "../".repeat(dir.path().canonicalize().unwrap().components().count() - 1);
    let repo = deploy().canonicalize().unwrap();
    let relative = |p: &str| format!("{up}{}/{p}", repo.display().to_string().trim_start_matches('/'));
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\ncomponents: [{}]\n",
            relative("overlays/grpc-hub"),
            relative(component)
        ),
    )
    .unwrap();
    render(dir.path()).1
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().filter_map(|d| d["kind"].as_str()).collect()
}

/// The node role's admission policy is in every overlay (the base), and the component for servers
/// before 1.30 removes it, and only it.
#[test]
fn every_overlay_carries_the_node_policy_and_the_before_1_30_component_removes_it() {
    for overlay in OVERLAYS {
        let (_, docs) = render(&deploy().join("overlays").join(overlay));
        let kinds = kinds(&docs);
        assert!(
            kinds.contains(&"ValidatingAdmissionPolicy"),
            "{overlay}: {kinds:?}"
        );
        assert!(
            kinds.contains(&"ValidatingAdmissionPolicyBinding"),
            "{overlay}: {kinds:?}"
        );
    }
    let (_, with) = render(&deploy().join("overlays/grpc-hub"));
    let without = render_with_component("components/before-1.30");
    let kinds = kinds(&without);
    assert!(
        !kinds.iter().any(|k| k.starts_with("ValidatingAdmissionPolicy")),
        "{kinds:?}"
    );
    assert_eq!(without.len(), with.len() - 2);
}

/// The node role's admission policy, enforced by the real API server: the node role's token,
/// bound to a pod on node `a`, may change labels under spokelet's prefixes on Node `a`, and
/// nothing on Node `b`, nor its own Node's spec (a taint), other labels or annotations.
#[tokio::test]
async fn the_api_server_enforces_own_node_only_for_the_node_roles_token() {
    // A cluster of its own: the policy and its binding are cluster-wide.
    let cluster = KubeCluster::start(ClusterOptions {
        name: "own-node".into(),
        ..ClusterOptions::hub()
    })
    .await
    .unwrap();
    let admin = cluster.client();
    // The node role's identity, rights and the policy, exactly as the install renders them.
    let wanted = |d: &Value| {
        let (kind, name) = (
            d["kind"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap_or(""),
        );
        matches!(
            kind,
            "Namespace" | "ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding"
        ) || (matches!(kind, "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding")
            && name == "spokelet-node")
    };
    let (_, docs) = render(&deploy().join("overlays/grpc-hub"));
    let docs: Vec<Value> = docs.into_iter().filter(wanted).collect();
    assert_eq!(docs.len(), 6, "{docs:#?}");
    let text = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let out = kubectl_apply(cluster.kubeconfig_path(), &[], &text).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Two Nodes (no kubelet needed) and a pod of the node role scheduled on `a`.
    let nodes: Api<Node> = Api::all(admin.clone());
    for name in ["node-a", "node-b"] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }
    // The API server's own admission adds the not-ready taint: the specs as created.
    let mut specs_before = Vec::new();
    for name in ["node-a", "node-b"] {
        specs_before.push(nodes.get(name).await.unwrap().spec);
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "spokelet-system");
    let pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "spokelet-node-a"},
                "spec": {"nodeName": "node-a", "serviceAccountName": "spokelet-node",
                         "containers": [{"name": "node", "image": "registry.invalid/spokelet:test"}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    // The pod's token, as the kubelet would get it: bound to the pod, so it names the node.
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "spokelet-node-a",
                                    "uid": pod.metadata.uid}},
    }))
    .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "spokelet-system");
    let token = accounts
        .create_token_request("spokelet-node", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut config = cluster.admin().kube_config();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let as_node_role: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());

    let patch = |node: &'static str, body: Value| {
        let api = as_node_role.clone();
        async move {
            api.patch(node, &PatchParams::default(), &Patch::Merge(body))
                .await
        }
    };
    // A new policy takes a moment to reach the admission plugin: wait until a dry run of a
    // refused change is refused (with the policy's own message), then test for real.
    let policies: Api<kube::api::DynamicObject> = Api::all_with(
        admin.clone(),
        &kube::api::ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: "ValidatingAdmissionPolicy".into(),
            plural: "validatingadmissionpolicies".into(),
        },
    );
    spokelet_e2e::eventually("the node role's admission policy in force", || {
        let (api, policies) = (as_node_role.clone(), policies.clone());
        async move {
            let body = json!({"metadata": {"labels": {"spokelet.io/test": "probe"}}});
            match api
                .patch(
                    "node-b",
                    &PatchParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &Patch::Merge(body),
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.message.contains("spokelet-node") => Ok(()),
                other => {
                    let status = policies
                        .get("spokelet-node-own-node-only")
                        .await
                        .map(|p| p.data["status"].to_string())
                        .unwrap_or_else(|e| e.to_string());
                    Err(format!("dry run: {other:?}; policy status: {status}"))
                }
            }
        }
    })
    .await
    .unwrap();
    patch(
        "node-a",
        json!({"metadata": {"labels": {"spokelet.io/test": "own", "nvidia.com/gpu.count": "8"}}}),
    )
    .await
    .expect("the node role may set spokelet's labels on its own Node");
    let refused = [
        (
            "node-b",
            json!({"metadata": {"labels": {"spokelet.io/test": "other"}}}),
            "may write only the Node it runs on",
        ),
        (
            "node-b",
            json!({"spec": {"taints": [{"key": "evil", "effect": "NoSchedule"}]}}),
            "may write only the Node it runs on",
        ),
        (
            "node-a",
            json!({"spec": {"taints": [{"key": "evil", "effect": "NoSchedule"}]}}),
            "may not change a Node's spec",
        ),
        (
            "node-a",
            json!({"spec": {"unschedulable": true}}),
            "may not change a Node's spec",
        ),
        (
            "node-a",
            json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
            "may change only labels under",
        ),
        (
            "node-a",
            json!({"metadata": {"labels": {"spokelet.io/test": null}, "annotations": {"x": "y"}}}),
            "may not change a Node's annotations",
        ),
    ];
    for (node, body, why) in refused {
        match patch(node, body.clone()).await {
            Err(kube::Error::Api(s)) => {
                assert!(matches!(s.code, 403 | 422), "{node} {body}: {s:?}");
                assert!(s.message.contains(why), "{node} {body}: {s:?}");
            }
            other => panic!("the node role changed {node} with {body}: {other:?}"),
        }
    }
    // Nothing refused landed.
    let (a, b) = (
        nodes.get("node-a").await.unwrap(),
        nodes.get("node-b").await.unwrap(),
    );
    assert!(
        !b.metadata
            .labels
            .clone()
            .unwrap_or_default()
            .contains_key("spokelet.io/test")
    );
    for (node, spec_before) in [(&a, &specs_before[0]), (&b, &specs_before[1])] {
        assert_eq!(&node.spec, spec_before, "no taint, no cordon");
        assert!(
            node.metadata.annotations.is_none(),
            "{:?}",
            node.metadata.annotations
        );
    }
    let labels = a.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("spokelet.io/test").map(String::as_str), Some("own"));
    assert!(!labels.contains_key("node-role.kubernetes.io/control-plane"));
    cluster.stop().await;
}
