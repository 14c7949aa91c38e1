//! The Compute Pool's inventory and health in OCM's shapes, end to end.
//!
//! Real node roles (in-process, each on its own copy of a fixture tree; the GPU node with the
//! fake NVML library, whose state file plays the hardware) write NodeInventories to a real
//! spoke API server. The engine sums them into ClusterClaims on the spoke (OCM's own
//! ClusterClaim CRD installed) and into the ManagedCluster's status on a real hub API server
//! (OCM's own ManagedCluster CRD: the API server validates every field written), or publishes
//! that status to the CloudEvents test hub. The bare-metal node service reports to the test hub
//! directly. Each test changes the hardware (an ECC error count raised, a GPU removed, a link
//! down) and waits for the hub to follow, checks that an unchanged pool is not rewritten
//! (resourceVersions, event counts), and that a hub outage loses no final state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use spokelet::hub::kube_hub::managed_cluster_resource;
use spokelet::pool::spoke_claims::cluster_claim_resource;
use spokelet_e2e::cloudevents_hub::{HubPki, Received, TestHub, TestHubOptions};
use spokelet_e2e::fixtures::{copy_fixture, healthy_hgx};
use spokelet_e2e::ocm_hub::{
    MANAGED_CLUSTER_CRD_FILE, accept_managed_cluster, install_ocm_crd, onboard_cluster, start_ocm_hub,
    start_pool_spoke,
};
use spokelet_e2e::{ClusterOptions, KubeCluster, eventually_with, unique_name};
use spokelet_hardware::testing::{ShimState, ShimVariant, build_nvml_shim, write_shim_state};

mod support;
use support::{Agent, GrpcAgentArgs, write};

const CLUSTER_STATUS: &str = "cluster.open-cluster-management.io.v1.managedclusters.status.update_request";
const NODE_UPDATE: &str = "io.spokelet.nodes.v1alpha1.nodeinventories.status.update_request";

/// Waits (polling every 50 ms, up to the harness's 5 minutes: the bound is a hang detector, not
/// a speed limit, and four pools starting at once on a small CI machine can take a while) for
/// `check` to give a value; returns it and how long it took.
async fn until<T, F, Fut>(what: &str, check: F) -> (T, Duration)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let v = eventually_with(what, 6000, Duration::from_millis(50), check)
        .await
        .unwrap();
    (v, start.elapsed())
}

/// A spoke with two nodes: `gpu-node` (the HGX fixture and the fake NVML: 8 H100s, 8 RDMA
/// ports) and `cpu-node` (the plain VM fixture), each with its node role running.
struct Pool {
    spoke: KubeCluster,
    client: kube::Client,
    /// The GPU node's host tree.
    gpu_root: PathBuf,
    /// The CPU node's host tree.
    cpu_root: PathBuf,
    /// The fake NVML the GPU node loads; its state file is next to it.
    shim: PathBuf,
    nodes: Vec<Agent>,
    _scratch: tempfile::TempDir,
}

impl Pool {
    async fn start() -> Pool {
        let spoke = start_pool_spoke().await.unwrap();
        let client = spoke.client();
        let scratch = tempfile::tempdir().unwrap();
        let gpu_root = scratch.path().join("gpu-host");
        let cpu_root = scratch.path().join("cpu-host");
        healthy_hgx(&gpu_root).unwrap();
        copy_fixture("plain-vm", &cpu_root).unwrap();
        let shim = build_nvml_shim(ShimVariant::H100, &scratch.path().join("nvml")).unwrap();
        let mut nodes = Vec::new();
        for (name, root, nvml) in [
            ("gpu-node", &gpu_root, Some(&shim)),
            ("cpu-node", &cpu_root, None),
        ] {
            let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            Api::<Node>::all(client.clone())
                .create(&PostParams::default(), &node)
                .await
                .unwrap();
            let kubeconfig = spoke.kubeconfig_path().display().to_string();
            let root = root.display().to_string();
            let mut argv = vec![
                "spokelet",
                "node",
                "--node-name",
                name,
                "--root",
                &root,
                "--kubeconfig",
                &kubeconfig,
                "--rediscover-interval",
                "200ms",
                "--admin-addr",
                "127.0.0.1:0",
            ];
            let lib = nvml.map(|p| p.display().to_string());
            match &lib {
                Some(lib) => argv.extend(["--nvml-library", lib.as_str()]),
                None => argv.push("--no-nvml"),
            }
            nodes.push(Agent::start(&argv));
        }
        Pool {
            spoke,
            client,
            gpu_root,
            cpu_root,
            shim,
            nodes,
            _scratch: scratch,
        }
    }

    /// Changes what the fake NVML reports from the next discovery on.
    fn set_gpus(&self, state: &ShimState) {
        write_shim_state(&self.shim, state).unwrap();
    }

    /// Takes the CPU node's NIC link down (administratively still up).
    fn cpu_link_down(&self) {
        std::fs::write(self.cpu_root.join("sys/class/net/eth0/operstate"), "down\n").unwrap();
    }

    /// Takes one of the GPU node's RDMA ports down.
    #[allow(dead_code)]
    fn gpu_rdma_port_down(&self) {
        let out = std::process::Command::new("find")
            .arg(self.gpu_root.join("sys/devices"))
            .args(["-path", "*infiniband/mlx5_1/ports/1/state"])
            .output()
            .unwrap();
        let port = String::from_utf8(out.stdout).unwrap();
        std::fs::write(port.trim(), "1: DOWN\n").unwrap();
    }

    /// The spoke's ClusterClaims: name → (value, resourceVersion, labels).
    async fn claims(&self) -> BTreeMap<String, (String, String, BTreeMap<String, String>)> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &cluster_claim_resource());
        api.list(&ListParams::default())
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    (
                        c.data["spec"]["value"].as_str().unwrap_or_default().to_string(),
                        c.metadata.resource_version.clone().unwrap_or_default(),
                        c.metadata.labels.clone().unwrap_or_default(),
                    ),
                )
            })
            .collect()
    }

    async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
        drop(self.spoke);
    }
}

/// The claims of a ManagedCluster status (or of the status in a CloudEvent) by name.
fn claim_map(status: &Value) -> BTreeMap<String, String> {
    status["clusterClaims"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or_default().to_string(),
                        c["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `status` has the claim `name` = `value`.
fn has_claim(status: &Value, name: &str, value: &str) -> bool {
    claim_map(status).get(name).map(String::as_str) == Some(value)
}

/// Every claim fits the schema (1..=253 name, 1..=1024 value) and OCM's names are there.
fn check_claims_schema(status: &Value) {
    let claims = claim_map(status);
    for (name, value) in &claims {
        assert!((1..=253).contains(&name.len()), "{name}");
        assert!((1..=1024).contains(&value.len()), "{name}={value}");
    }
    for ocm in [
        "kubeversion.open-cluster-management.io",
        "platform.open-cluster-management.io",
        "product.open-cluster-management.io",
    ] {
        assert!(claims.contains_key(ocm), "{ocm} missing: {claims:?}");
    }
    assert!(
        claims.len() <= 20,
        "a stock registration agent carries at most 20 custom claims"
    );
}

/// The ManagedCluster's status on the hub.
async fn hub_status(api: &Api<DynamicObject>, cluster: &str) -> (Value, String) {
    let mc = api.get(cluster).await.unwrap();
    (
        mc.data.get("status").cloned().unwrap_or(Value::Null),
        mc.metadata.resource_version.unwrap_or_default(),
    )
}

#[tokio::test]
async fn pool_inventory_reaches_cluster_claims_and_the_managed_cluster_status_on_a_kubernetes_hub() {
    let (hub, admin) = start_ocm_hub().await.unwrap();
    install_ocm_crd(&admin, MANAGED_CLUSTER_CRD_FILE).await.unwrap();
    let cluster = unique_name("pool");
    // The hub accepts the cluster: it creates the ManagedCluster (the agent never does).
    let clusters: Api<DynamicObject> = Api::all_with(admin.clone(), &managed_cluster_resource());
    accept_managed_cluster(&admin, &cluster).await.unwrap();
    let identity = onboard_cluster(&hub, &admin, &cluster).await.unwrap();
    let pool = Pool::start().await;

    let hub_kubeconfig = identity.kubeconfig_path().display().to_string();
    let kubeconfig = pool.spoke.kubeconfig_path().display().to_string();
    let engine = Agent::start(&[
        "spokelet",
        "run",
        "--hub-transport",
        "kube",
        "--hub-kubeconfig",
        &hub_kubeconfig,
        "--cluster-name",
        &cluster,
        "--kubeconfig",
        &kubeconfig,
        "--admin-addr",
        "127.0.0.1:0",
        "--pool-heartbeat",
        "1h",
    ]);

    // Both nodes in, all healthy: claims, capacity and allocatable on the hub.
    let (status, took) = until("the pool's status on the hub", || async {
        let (s, _) = hub_status(&clusters, &cluster).await;
        if has_claim(&s, "node.count.spokelet.io", "2")
            && has_claim(&s, "node.healthy.count.spokelet.io", "2")
        {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    println!("first report on the hub: {took:?}");
    check_claims_schema(&status);
    assert!(has_claim(&status, "gpu.count.spokelet.io", "8"), "{status}");
    assert!(
        has_claim(&status, "gpu.product.spokelet.io", "NVIDIA H100 80GB HBM3=8"),
        "{status}"
    );
    assert!(has_claim(&status, "node.rdma.count.spokelet.io", "1"), "{status}");
    assert!(
        !claim_map(&status).contains_key("node.unhealthy.spokelet.io"),
        "{status}"
    );
    assert_eq!(status["capacity"]["nvidia.com/gpu"], "8", "{status}");
    assert_eq!(status["allocatable"]["nvidia.com/gpu"], "8", "{status}");
    assert!(
        status["version"]["kubernetes"]
            .as_str()
            .unwrap()
            .starts_with("v1."),
        "{status}"
    );
    let claims = claim_map(&status);
    assert_eq!(
        claims["kubeversion.open-cluster-management.io"],
        status["version"]["kubernetes"].as_str().unwrap()
    );

    // The same claims on the spoke, as ClusterClaims (OCM's names excepted: a stock
    // registration agent makes those itself), labelled as spokelet's.
    let (spoke_claims, _) = until("the ClusterClaims on the spoke", || async {
        let c = pool.claims().await;
        match c.get("gpu.count.spokelet.io") {
            Some((v, _, _)) if v == "8" => Ok(c),
            _ => Err(format!("{c:?}")),
        }
    })
    .await;
    for (name, (value, _, labels)) in &spoke_claims {
        assert!(name.ends_with(".spokelet.io"), "{name}");
        assert_eq!(claims.get(name), Some(value), "{name}");
        assert_eq!(
            labels.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some("spokelet")
        );
    }
    assert_eq!(
        spoke_claims.len(),
        claims.keys().filter(|k| k.ends_with(".spokelet.io")).count()
    );

    // Nothing changes for a while (discovery every 200 ms): nothing is rewritten.
    let (_, rv) = hub_status(&clusters, &cluster).await;
    let before: BTreeMap<_, _> = spoke_claims
        .iter()
        .map(|(k, (_, rv, _))| (k.clone(), rv.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hub_status(&clusters, &cluster).await.1,
        rv,
        "ManagedCluster rewritten"
    );
    let after: BTreeMap<_, _> = pool
        .claims()
        .await
        .into_iter()
        .map(|(k, (_, rv, _))| (k, rv))
        .collect();
    assert_eq!(before, after, "ClusterClaims rewritten");

    // Someone else's ClusterClaims: one for the hub, one marked spoke-only. The next report
    // carries the first beside spokelet's, as OCM's registration agent would.
    let claim_api: Api<DynamicObject> = Api::all_with(pool.client.clone(), &cluster_claim_resource());
    for (name, labels) in [
        ("region.example.com", json!({})),
        (
            "secret.example.com",
            json!({"open-cluster-management.io/spoke-only": ""}),
        ),
    ] {
        let claim: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cluster.open-cluster-management.io/v1alpha1", "kind": "ClusterClaim",
            "metadata": {"name": name, "labels": labels}, "spec": {"value": "eu-1"}}))
        .unwrap();
        claim_api.create(&PostParams::default(), &claim).await.unwrap();
    }

    // An uncorrectable ECC error on GPU 3: the node is unhealthy, its GPUs not allocatable.
    pool.set_gpus(&ShimState {
        ecc_uncorrected: BTreeMap::from([(3, 2)]),
        ..ShimState::default()
    });
    let (status, took) = until("the ECC error on the hub", || async {
        let (s, _) = hub_status(&clusters, &cluster).await;
        if has_claim(&s, "node.healthy.count.spokelet.io", "1") {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    println!("ECC error -> hub (kube): {took:?}");
    assert!(has_claim(&status, "region.example.com", "eu-1"), "{status}");
    assert!(!claim_map(&status).contains_key("secret.example.com"), "{status}");
    assert!(has_claim(&status, "gpu.count.spokelet.io", "8"), "{status}");
    let unhealthy = &claim_map(&status)["node.unhealthy.spokelet.io"];
    assert!(unhealthy.starts_with("gpu-node:"), "{unhealthy}");
    assert!(unhealthy.contains("GpuEccUncorrectable:gpu3"), "{unhealthy}");
    assert_eq!(status["allocatable"]["nvidia.com/gpu"], "0", "{status}");
    assert_eq!(status["capacity"]["nvidia.com/gpu"], "8", "{status}");
    assert!(
        has_claim(&status, "gpu.healthy.count.spokelet.io", "0"),
        "{status}"
    );

    // A GPU falls off the bus (NVML lists 7 of the 8 on PCI): capacity follows.
    pool.set_gpus(&ShimState {
        gpus: Some(7),
        ..ShimState::default()
    });
    let (status, took) = until("a GPU removed, on the hub", || async {
        let (s, _) = hub_status(&clusters, &cluster).await;
        if s["capacity"]["nvidia.com/gpu"] == "7" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    println!("GPU removed -> hub (kube): {took:?}");
    assert!(has_claim(&status, "gpu.count.spokelet.io", "7"), "{status}");
    assert!(
        claim_map(&status)["node.unhealthy.spokelet.io"].contains("GpuNotVisibleToNvml"),
        "{status}"
    );
    let c = pool.claims().await;
    assert_eq!(c["gpu.count.spokelet.io"].0, "7");

    // Back to 8 healthy GPUs, then the CPU node's link goes down.
    pool.set_gpus(&ShimState::default());
    pool.cpu_link_down();
    let (status, took) = until("the CPU node's link down, on the hub", || async {
        let (s, _) = hub_status(&clusters, &cluster).await;
        let unhealthy = claim_map(&s)
            .get("node.unhealthy.spokelet.io")
            .cloned()
            .unwrap_or_default();
        if unhealthy.starts_with("cpu-node:") && !unhealthy.contains("gpu-node") {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    println!("link down -> hub (kube): {took:?}");
    assert!(
        claim_map(&status)["node.unhealthy.spokelet.io"].contains("NicLinkDown:eth0"),
        "{status}"
    );
    assert_eq!(status["allocatable"]["nvidia.com/gpu"], "8", "{status}");

    engine.stop().await;
    pool.stop().await;
    drop(hub);
}

/// The latest received event of `type_` (optionally for `resource`), with its JSON data.
fn latest(hub: &TestHub, type_: &str, resource: Option<&str>) -> Option<(Received, Value)> {
    hub.received()
        .into_iter()
        .rev()
        .filter(|r| r.event.r#type == type_)
        .find(|r| resource.is_none_or(|id| r.ext("resourceid").as_deref() == Some(id)))
        .and_then(|r| {
            let data = r.json()?;
            Some((r, data))
        })
}

#[tokio::test]
async fn pool_status_and_node_inventories_reach_a_grpc_hub_and_survive_its_outage() {
    let pool = Pool::start().await;
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let cluster = unique_name("pool");
    let args = GrpcAgentArgs::new(&pki, &hub, &cluster, pool.spoke.kubeconfig_path());
    let engine = Agent::start(&args.with(&["--pool-heartbeat", "1h"]));

    let ((ev, data), took) = until("the ManagedCluster status event", || async {
        match latest(&hub, CLUSTER_STATUS, None) {
            Some((r, d)) if has_claim(&d["status"], "node.count.spokelet.io", "2") => Ok((r, d)),
            other => Err(format!("{:?}", other.map(|o| o.1))),
        }
    })
    .await;
    println!("first report on the hub (grpc): {took:?}");
    assert_eq!(ev.ext("clustername").as_deref(), Some(cluster.as_str()));
    assert_eq!(ev.ext("resourceid").as_deref(), Some(cluster.as_str()));
    assert!(ev.ext("statushash").is_some_and(|h| h.len() == 64));
    assert_eq!(
        ev.client_cn.as_deref(),
        Some(cluster.as_str()),
        "over the mTLS identity"
    );
    assert_eq!(data["kind"], "ManagedCluster");
    assert_eq!(data["metadata"]["name"], cluster.as_str());
    check_claims_schema(&data["status"]);
    assert_eq!(data["status"]["capacity"]["nvidia.com/gpu"], "8");
    // Each node's inventory too, as spokelet's own data type.
    for node in ["gpu-node", "cpu-node"] {
        let (r, d) = latest(&hub, NODE_UPDATE, Some(node)).unwrap_or_else(|| panic!("no event for {node}"));
        assert_eq!(r.ext("clustername").as_deref(), Some(cluster.as_str()));
        assert_eq!(
            (d["kind"].as_str(), d["metadata"]["name"].as_str()),
            (Some("NodeInventory"), Some(node))
        );
        assert_eq!(d["status"]["inventory"]["health"]["healthy"], true, "{d}");
    }

    // Unchanged: no event at all (the heartbeat is an hour away).
    let quiet_from = hub.received_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let extra: Vec<String> = hub
        .received_since(quiet_from)
        .iter()
        .map(|r| r.event.r#type.clone())
        .collect();
    assert!(extra.is_empty(), "an unchanged pool sent {extra:?}");

    // A change reaches the hub.
    pool.set_gpus(&ShimState {
        ecc_uncorrected: BTreeMap::from([(5, 1)]),
        ..ShimState::default()
    });
    let (_, took) = until("the ECC error over gRPC", || async {
        match latest(&hub, CLUSTER_STATUS, None) {
            Some((_, d)) if has_claim(&d["status"], "node.healthy.count.spokelet.io", "1") => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.1))),
        }
    })
    .await;
    println!("ECC error -> hub (grpc): {took:?}");
    let (_, d) = latest(&hub, NODE_UPDATE, Some("gpu-node")).unwrap();
    assert_eq!(d["status"]["inventory"]["health"]["healthy"], false, "{d}");

    // The hub goes away; the hardware changes twice meanwhile; the hub comes back and gets
    // the final state.
    hub.stop().await;
    pool.set_gpus(&ShimState {
        gpus: Some(7),
        ..ShimState::default()
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    pool.set_gpus(&ShimState {
        gpus: Some(6),
        ..ShimState::default()
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let outage_end = hub.received_count();
    hub.restart().await.unwrap();
    let (_, took) = until("the final state after the outage", || async {
        match latest(&hub, CLUSTER_STATUS, None) {
            Some((_, d)) if d["status"]["capacity"]["nvidia.com/gpu"] == "6" => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.1["status"]["capacity"].clone()))),
        }
    })
    .await;
    println!("hub back -> final state: {took:?}");
    // Latest wins: the intermediate 7 was never sent after the reconnect.
    let resent: Vec<Value> = hub
        .received_since(outage_end)
        .iter()
        .filter(|r| r.event.r#type == CLUSTER_STATUS)
        .filter_map(|r| r.json())
        .collect();
    assert!(
        resent
            .iter()
            .all(|d| d["status"]["capacity"]["nvidia.com/gpu"] != "7"),
        "{resent:?}"
    );
    let (_, d) = latest(&hub, NODE_UPDATE, Some("gpu-node")).unwrap();
    assert_eq!(d["status"]["gpuCount"], 6, "{d}");

    // What travelled over gRPC is a ManagedCluster status OCM's own CRD accepts as it is.
    let (_, data) = latest(&hub, CLUSTER_STATUS, None).unwrap();
    accepted_by_ocm_crd(&cluster, &data["status"]).await;

    engine.stop().await;
    pool.stop().await;
    hub.stop().await;
}

/// Writes `status` into a ManagedCluster on a real API server with OCM's CRD, and checks the
/// server kept every field (a structural schema prunes unknown ones).
async fn accepted_by_ocm_crd(cluster: &str, status: &Value) {
    let api_server = KubeCluster::start(ClusterOptions::hub()).await.unwrap();
    let admin = api_server.client();
    install_ocm_crd(&admin, MANAGED_CLUSTER_CRD_FILE).await.unwrap();
    accept_managed_cluster(&admin, cluster).await.unwrap();
    let clusters: Api<DynamicObject> = Api::all_with(admin, &managed_cluster_resource());
    let written = clusters
        .patch_status(
            cluster,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("OCM's ManagedCluster CRD refused the status: {e}\n{status}"));
    assert_eq!(&written.data["status"], status, "pruned or changed by the schema");
}

#[tokio::test]
async fn bare_metal_node_service_reports_to_the_hub_with_heartbeats_and_through_an_outage() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("host");
    healthy_hgx(&root).unwrap();
    let shim = build_nvml_shim(ShimVariant::H100, &scratch.path().join("nvml")).unwrap();
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let cluster = unique_name("bare-metal");
    let identity = pki
        .client(&cluster, &["system:open-cluster-management:managed-clusters"])
        .unwrap();
    let dir = scratch.path();
    // The reference-format hub config file, as the systemd unit uses it.
    let config = format!(
        "url: {}\ncaFile: {}\nclientCertFile: {}\nclientKeyFile: {}\n",
        hub.url(),
        write(dir, "ca.crt", pki.serving_ca.cert_pem()),
        write(dir, "tls.crt", &identity.cert_pem),
        write(dir, "tls.key", &identity.key_pem),
    );
    let config = write(dir, "hub.yaml", &config);
    let (root_s, shim_s) = (root.display().to_string(), shim.display().to_string());
    let node = Agent::start(&[
        "spokelet",
        "node",
        "--hub-config",
        &config,
        "--cluster-name",
        &cluster,
        "--node-name",
        "bm-1",
        "--root",
        &root_s,
        "--nvml-library",
        &shim_s,
        "--rediscover-interval",
        "200ms",
        "--resync-interval",
        "2s",
        "--admin-addr",
        "127.0.0.1:0",
    ]);

    let ((ev, d), took) = until("the node service's first report", || async {
        latest(&hub, NODE_UPDATE, Some("bm-1")).ok_or_else(|| "none yet".to_string())
    })
    .await;
    println!("node service first report: {took:?}");
    assert_eq!(ev.ext("clustername").as_deref(), Some(cluster.as_str()));
    assert_eq!(ev.event.source, "spokelet-node-bm-1");
    assert_eq!(ev.client_cn.as_deref(), Some(cluster.as_str()));
    assert_eq!(d["status"]["gpuCount"], 8, "{d}");
    assert_eq!(d["status"]["inventory"]["health"]["healthy"], true, "{d}");
    assert!(
        hub.subscriptions().iter().any(|s| s.data_type == "io.spokelet.nodes.v1alpha1.nodeinventories"
            && s.cluster_name == cluster),
        "subscribed for heartbeats under spokelet's data type"
    );

    // Unchanged for 5 s with a 2 s heartbeat: a heartbeat or two, identical, nothing else.
    let hash = ev.ext("statushash");
    let from = hub.received_count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = hub.received_since(from);
    assert!(
        (1..=3).contains(&sent.len()),
        "{} events while unchanged",
        sent.len()
    );
    assert!(
        sent.iter()
            .all(|r| r.event.r#type == NODE_UPDATE && r.ext("statushash") == hash)
    );

    // An ECC error: reported unhealthy with the reason.
    write_shim_state(
        &shim,
        &ShimState {
            ecc_uncorrected: BTreeMap::from([(0, 4)]),
            ..ShimState::default()
        },
    )
    .unwrap();
    let (d, took) = until("the ECC error from the node service", || async {
        match latest(&hub, NODE_UPDATE, Some("bm-1")) {
            Some((_, d)) if d["status"]["inventory"]["health"]["healthy"] == false => Ok(d),
            _ => Err("still healthy".to_string()),
        }
    })
    .await;
    println!("ECC error -> hub (node service): {took:?}");
    let reasons = d["status"]["inventory"]["health"]["reasons"].to_string();
    assert!(
        reasons.contains("GpuEccUncorrectable") && reasons.contains("gpu0"),
        "{reasons}"
    );

    // Outage: the GPU is removed while the hub is down; the report arrives after it returns.
    hub.stop().await;
    write_shim_state(
        &shim,
        &ShimState {
            gpus: Some(7),
            ..ShimState::default()
        },
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    hub.restart().await.unwrap();
    let (_, took) = until("the final state after the outage", || async {
        match latest(&hub, NODE_UPDATE, Some("bm-1")) {
            Some((_, d)) if d["status"]["gpuCount"] == 7 => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.1["status"]["gpuCount"].clone()))),
        }
    })
    .await;
    println!("hub back -> node service final state: {took:?}");

    node.stop().await;
    hub.stop().await;
}

/// A NodeInventory is a node agent's word, not the pool's: one without a live Node of its name
/// owning it counts for nothing, one claiming more than its Node's capacity is cut to it and
/// unhealthy, and the CRD refuses a document past its bounds.
#[tokio::test]
async fn the_pool_counts_only_inventories_their_node_owns_held_to_its_capacity() {
    use spokelet::node::node_inventory_resource;
    let spoke = start_pool_spoke().await.unwrap();
    let client = spoke.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let inventories: Api<DynamicObject> = Api::all_with(client.clone(), &node_inventory_resource());
    let status = |gpus: usize| {
        let devices: Vec<Value> = (0..gpus)
            .map(|_| json!({"name": "H100", "memoryBytes": 80_000_000_000_u64, "migDevices": []}))
            .collect();
        json!({"inventory": {"cpu": {"threads": 64}, "memory": {"totalBytes": 1_000_000_000_000_u64},
            "gpus": {"devices": devices}, "health": {"healthy": true, "reasons": []}}})
    };
    // (name, the Node's capacity if it exists, whether the inventory names its uid, GPUs claimed)
    for (name, capacity, owned, gpus) in [
        (
            "real",
            Some(json!({"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "2"})),
            true,
            4,
        ),
        ("ghost", None, false, 100),
        ("stale", Some(json!({"cpu": "8"})), false, 50),
    ] {
        let mut owner = json!([]);
        if let Some(capacity) = capacity {
            let node = nodes
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
                )
                .await
                .unwrap();
            nodes
                .patch_status(
                    name,
                    &Default::default(),
                    &kube::api::Patch::Merge(json!({"status": {"capacity": capacity}})),
                )
                .await
                .unwrap();
            // A stale inventory names a Node of its name that was deleted and re-created.
            let uid = if owned {
                node.metadata.uid.unwrap()
            } else {
                "3f0c1e2a-0000-4000-8000-000000000000".into()
            };
            owner = json!([{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]);
        }
        let inv: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "spokelet.io/v1alpha1", "kind": "NodeInventory",
            "metadata": {"name": name, "ownerReferences": owner}, "spec": {"nodeName": name},
        }))
        .unwrap();
        inventories.create(&PostParams::default(), &inv).await.unwrap();
        inventories
            .patch(
                name,
                &Default::default(),
                &kube::api::Patch::Merge(json!({"status": status(gpus)})),
            )
            .await
            .unwrap();
    }
    // The CRD's bounds: a document past them never reaches the engine.
    let flags: Vec<String> = (0..2000).map(|i| format!("f{i}")).collect();
    let err = inventories
        .patch(
            "real",
            &Default::default(),
            &kube::api::Patch::Merge(json!({"status": {"inventory": {"cpu": {"flags": flags}}}})),
        )
        .await
        .expect_err("2,000 CPU flags are past the CRD's bounds");
    assert!(err.to_string().contains("Too many"), "{err}");

    let works = tempfile::tempdir().unwrap();
    let kubeconfig = spoke.kubeconfig_path().display().to_string();
    let works_dir = works.path().display().to_string();
    let engine = Agent::start(&[
        "spokelet",
        "run",
        "--works-dir",
        &works_dir,
        "--kubeconfig",
        &kubeconfig,
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let claims_api: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_claim_resource());
    let claims = eventually_with(
        "the pool's claims on the spoke",
        spokelet_e2e::POLL_ATTEMPTS,
        spokelet_e2e::POLL_INTERVAL,
        || {
            let api = claims_api.clone();
            async move {
                let list = api
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let claims: BTreeMap<String, String> = list
                    .into_iter()
                    .map(|c| {
                        (
                            c.metadata.name.clone().unwrap_or_default(),
                            c.data["spec"]["value"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                if claims.contains_key("gpu.count.spokelet.io") {
                    Ok(claims)
                } else {
                    Err(format!("{claims:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
    // Only `real` counts, cut to its Node's 8 CPUs and 2 GPUs, and unhealthy for the claim.
    assert_eq!(claims["node.count.spokelet.io"], "1", "{claims:?}");
    assert_eq!(claims["gpu.count.spokelet.io"], "2", "{claims:?}");
    assert_eq!(claims["cpu.count.spokelet.io"], "8", "{claims:?}");
    assert_eq!(claims["node.healthy.count.spokelet.io"], "0", "{claims:?}");
    assert!(
        claims["node.unhealthy.spokelet.io"].contains("InventoryExceedsNodeCapacity"),
        "{claims:?}"
    );
    engine.stop().await;
}
