//! `spokelet node` as a real process against the real API server: the NodeInventory CRD from
//! `deploy/crds/` installed, a Node object, and a copy of the HGX fixture tree as the host's
//! `/sys`. Labels and the NodeInventory appear, follow edits of the tree (an RDMA port going
//! down, SR-IOV switched off: a label updated, one removed), leave labels set by others alone,
//! and an unchanged node costs no write.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use spokelet::node::node_inventory_resource;
use spokelet_e2e::{eventually_with, shared_spoke, unique_name};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/tests/fixtures/hgx-h100")
}

/// Installs the project's NodeInventory CRD (create or keep) and waits until it is served.
async fn install_crd(client: &kube::Client) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/nodeinventories.spokelet.io.yaml"),
    )
    .unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("the NodeInventory CRD was refused: {e}"),
    }
    eventually_with(
        "the NodeInventory CRD is served",
        300,
        Duration::from_millis(100),
        || {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &node_inventory_resource());
            async move {
                api.list(&Default::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await
    .unwrap();
}

async fn labels(client: &kube::Client, node: &str) -> std::collections::BTreeMap<String, String> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.get(node).await.unwrap().metadata.labels.unwrap_or_default()
}

async fn inventory(client: &kube::Client, node: &str) -> Option<DynamicObject> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &node_inventory_resource());
    api.get_opt(node).await.unwrap()
}

/// Waits until the node's labels satisfy `check`; returns how long it took.
async fn wait_labels(
    client: &kube::Client,
    node: &str,
    what: &str,
    check: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> Duration {
    let start = Instant::now();
    let check = &check;
    eventually_with(what, 300, Duration::from_millis(50), || async move {
        let l = labels(client, node).await;
        if check(&l) { Ok(()) } else { Err(format!("{l:?}")) }
    })
    .await
    .unwrap();
    start.elapsed()
}

/// Paths where `a` and `b` differ (numbers compared by value: 400 and 400.0 are one number).
fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x
                .keys()
                .chain(y.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                diff(
                    &format!("{path}.{k}"),
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), p, q, out);
            }
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} != {b}")),
    }
}

/// A user holding exactly the `spokelet-node` ClusterRole of `deploy/kubernetes/base/node-rbac.yaml`.
async fn node_role_user(
    spoke: &spokelet_e2e::KubeCluster,
    client: &kube::Client,
) -> spokelet_e2e::UserCredentials {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/node-rbac.yaml"),
    )
    .unwrap();
    let role: ClusterRole = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|v| v["kind"] == "ClusterRole")
        .map(|v| serde_yaml::from_value(v).unwrap())
        .expect("a ClusterRole in node-rbac.yaml");
    let name = unique_name("spokelet-node-test");
    let mut role = role;
    role.metadata.name = Some(name.clone());
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    spoke.issue_user(&name, &[]).unwrap()
}

fn set_all(root: &Path, name: &str, contents: &str) {
    let out = std::process::Command::new("find")
        .arg(root.join("sys/devices"))
        .args(["-name", name])
        .output()
        .unwrap();
    for path in String::from_utf8(out.stdout).unwrap().lines() {
        std::fs::write(path, contents).unwrap();
    }
}

#[tokio::test]
async fn labels_and_node_inventory_follow_the_hardware_and_leave_other_labels_alone() {
    let spoke = shared_spoke().await;
    let client = spoke.client();
    install_crd(&client).await;
    let node = unique_name("gpu-node");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut n: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "labels": {"team": "ml", "kubernetes.io/hostname": node}},
    }))
    .unwrap();
    n = nodes.create(&PostParams::default(), &n).await.unwrap();
    assert!(n.metadata.uid.is_some());

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("host");
    let copied = std::process::Command::new("cp")
        .args([
            "-a",
            &fixture().display().to_string(),
            &root.display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(copied.success());
    // The node role runs with nothing but the ClusterRole the install gives it.
    let user = node_role_user(spoke, &client).await;
    let log = scratch.path().join("node.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spokelet"))
        .args(["node", "--node-name", &node, "--no-nvml"])
        .args(["--root", &root.display().to_string()])
        .args(["--kubeconfig", &user.kubeconfig_path().display().to_string()])
        .args(["--rediscover-interval", "200ms", "--admin-addr", "127.0.0.1:0"])
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    wait_labels(&client, &node, "the hardware labels", |l| {
        l.get("spokelet.io/gpu.count").map(String::as_str) == Some("8")
    })
    .await;
    let first = labels(&client, &node).await;
    assert_eq!(
        first.get("team").map(String::as_str),
        Some("ml"),
        "another's label kept"
    );
    assert_eq!(
        first.get("spokelet.io/rdma.ports-active").map(String::as_str),
        Some("7")
    );
    assert_eq!(
        first
            .get("feature.node.kubernetes.io/network-sriov.configured")
            .map(String::as_str),
        Some("true")
    );
    // The NodeInventory is written right after the labels.
    let inv = eventually_with(
        "the NodeInventory is written",
        300,
        Duration::from_millis(50),
        || async { inventory(&client, &node).await.ok_or("not yet") },
    )
    .await
    .unwrap();
    assert_eq!(inv.data["spec"]["nodeName"], node.as_str());
    assert_eq!(inv.data["status"]["gpuCount"], 8);
    assert_eq!(
        inv.data["status"]["inventory"]["gpus"]["devices"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    assert_eq!(inv.data["status"]["labels"]["spokelet.io/gpu.count"], "8");
    // The CRD's schema holds every field discovery reports: nothing was pruned on the way in.
    let local = spokelet_hardware::discover(&spokelet_hardware::DiscoverOptions {
        root: root.clone(),
        nvml: spokelet_hardware::NvmlSource::Disabled,
    });
    let mut differences = Vec::new();
    diff(
        "",
        &inv.data["status"]["inventory"],
        &serde_json::to_value(&local).unwrap(),
        &mut differences,
    );
    assert!(
        differences.is_empty(),
        "pruned or changed by the API server: {differences:?}"
    );
    let owner = &inv.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", node.as_str())
    );

    // Nothing changes: no write (the resourceVersions stay) over many discoveries.
    let (node_rv, inv_rv) = (
        nodes.get(&node).await.unwrap().metadata.resource_version,
        inv.metadata.resource_version.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(nodes.get(&node).await.unwrap().metadata.resource_version, node_rv);
    assert_eq!(
        inventory(&client, &node).await.unwrap().metadata.resource_version,
        inv_rv
    );

    // An RDMA port goes down: the count label follows.
    let port = std::process::Command::new("find")
        .arg(root.join("sys/devices"))
        .args(["-path", "*infiniband/mlx5_1/ports/1/state"])
        .output()
        .unwrap();
    let port = String::from_utf8(port.stdout).unwrap();
    std::fs::write(port.trim(), "1: DOWN\n").unwrap();
    let took = wait_labels(&client, &node, "ports-active drops to 6", |l| {
        l.get("spokelet.io/rdma.ports-active").map(String::as_str) == Some("6")
    })
    .await;
    println!("RDMA port down -> label: {took:?}");

    // SR-IOV switched off: its label is removed, the others stay, and so does the team's.
    set_all(&root, "sriov_numvfs", "0\n");
    let took = wait_labels(&client, &node, "sriov.configured removed", |l| {
        !l.contains_key("feature.node.kubernetes.io/network-sriov.configured")
    })
    .await;
    println!("SR-IOV off -> label removed: {took:?}");
    let last = labels(&client, &node).await;
    assert_eq!(last.get("team").map(String::as_str), Some("ml"));
    assert_eq!(last.get("spokelet.io/gpu.count").map(String::as_str), Some("8"));
    // The NodeInventory is written right after the labels.
    eventually_with(
        "the NodeInventory follows",
        300,
        Duration::from_millis(50),
        || async {
            let inv = inventory(&client, &node).await.unwrap();
            let labels = &inv.data["status"]["labels"];
            if labels
                .get("feature.node.kubernetes.io/network-sriov.configured")
                .is_none()
            {
                Ok(())
            } else {
                Err(labels.to_string())
            }
        },
    )
    .await
    .unwrap();

    child.start_kill().unwrap();
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("cannot write"), "{text}");
    nodes.delete(&node, &Default::default()).await.unwrap();
}
