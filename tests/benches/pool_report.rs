//! The pool's inventory on its way to the hub, as an operator runs it (release binaries, default
//! intervals: discovery every second, the pool report 300 ms after a change), printing tables:
//!
//! 1. a hardware change on a node to the hub, per transport: an uncorrectable ECC error raised
//!    (and cleared) in the fake NVML of a node whose `spokelet-node` writes its NodeInventory;
//!    time until the engine's report shows the node's health on a Kubernetes hub (the
//!    ManagedCluster's claims) and on the CloudEvents hub over gRPC (the managedclusters status
//!    event); and time until the bare-metal node service's own event shows it;
//! 2. requests an unchanged pool costs, counted over a quiet minute and scaled to an hour: the
//!    hub API server's and the spoke API server's request counters (by resource), and the
//!    events the gRPC hub received;
//! 3. resident memory of `spokelet-node` (the lean binary as shipped) idle and while reporting,
//!    in the DaemonSet role and as the bare-metal node service.
//!
//! Discovery time with and without NVML against `lshw -json` is the `inventory` benchmark.
//! Run with `cargo bench -p spokelet-e2e --bench pool_report`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use spokelet::hub::kube_hub::managed_cluster_resource;
use spokelet_e2e::bench::{
    ms, node_binary, percentile, print_table, proc_status_kib, release_binary, request_counts, request_delta,
};
use spokelet_e2e::cloudevents_hub::{HubPki, TestHub, TestHubOptions};
use spokelet_e2e::fixtures::{copy_fixture, healthy_hgx};
use spokelet_e2e::ocm_hub::{
    MANAGED_CLUSTER_CRD_FILE, accept_managed_cluster, install_ocm_crd, onboard_cluster, start_ocm_hub,
    start_pool_spoke,
};
use spokelet_hardware::testing::{ShimState, ShimVariant, build_nvml_shim, write_shim_state};

/// Changes timed per transport (each one way: raised, then cleared).
const CHANGES: usize = 10;
/// The unchanged pool is watched this long.
const QUIET: Duration = Duration::from_secs(60);
/// The goal for a change on a node to reach the hub.
const TARGET: Duration = Duration::from_secs(2);
/// The goal for the node role's resident memory.
const TARGET_RSS_MIB: f64 = 10.0;

const CLUSTER_STATUS: &str = "cluster.open-cluster-management.io.v1.managedclusters.status.update_request";
const NODE_UPDATE: &str = "io.spokelet.nodes.v1alpha1.nodeinventories.status.update_request";

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(bin)
            .args(args)
            .args(["--admin-addr", "127.0.0.1:0", "--log-level", "warn"])
            .env_remove("SPOKELET_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_string()).collect()
}

/// The claims of a ManagedCluster status.
fn claim(status: &serde_json::Value, name: &str) -> Option<String> {
    status["clusterClaims"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_str().map(str::to_string))
}

/// Polls `check` every 5 ms until it holds; panics after 30 s. Returns the time since `from`.
async fn until(from: Instant, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    loop {
        if check().await {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Latencies as a table row: samples, p50, p90, max, target.
fn latency_row(name: &str, mut v: Vec<Duration>) -> Vec<String> {
    v.sort_unstable();
    let max = v.last().copied().unwrap_or_default();
    vec![
        name.to_string(),
        v.len().to_string(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.9)),
        ms(max),
        if max < TARGET { "met" } else { "missed" }.to_string(),
    ]
}

/// The pool's resources in an API server's request counters: `(VERB resource, count)`.
fn pool_requests(delta: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    const POOL: [&str; 6] = [
        "managedclusters",
        "leases",
        "clusterclaims",
        "nodeinventories",
        "nodes",
        "manifestworks",
    ];
    delta
        .iter()
        .filter(|(k, _)| {
            POOL.iter()
                .any(|r| k.split(' ').nth(1).is_some_and(|res| res.starts_with(r)))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// On a panic (a wait that timed out), prints the end of every process's log first: the
/// scratch directory holding them is removed as the panic unwinds.
fn show_logs_on_panic(dir: &Path) {
    let dir = dir.to_path_buf();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!("--- {} (last lines)", path.display());
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
        default(info);
    }));
}

#[tokio::main]
async fn main() {
    let spokelet = release_binary("spokelet").unwrap_or_else(|e| panic!("{e}"));
    let node_bin = node_binary().unwrap_or_else(|e| panic!("{e}"));
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    show_logs_on_panic(dir);

    // The spoke: two nodes, a GPU node with the fake NVML and a CPU node.
    let spoke = start_pool_spoke().await.unwrap();
    let client = spoke.client();
    healthy_hgx(&dir.join("gpu-host")).unwrap();
    copy_fixture("plain-vm", &dir.join("cpu-host")).unwrap();
    healthy_hgx(&dir.join("bare-metal-host")).unwrap();
    let shim = build_nvml_shim(ShimVariant::H100, &dir.join("nvml-node")).unwrap();
    let bm_shim = build_nvml_shim(ShimVariant::H100, &dir.join("nvml-bare-metal")).unwrap();
    let kubeconfig = spoke.kubeconfig_path().display().to_string();
    let mut node_procs = Vec::new();
    for (name, root, nvml) in [
        ("gpu-node", "gpu-host", Some(&shim)),
        ("cpu-node", "cpu-host", None),
    ] {
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        // The lean binary is the node role: no subcommand.
        let mut args = s(&["--node-name", name, "--kubeconfig", &kubeconfig]);
        args.extend(["--root".into(), dir.join(root).display().to_string()]);
        match nvml {
            Some(lib) => args.extend(["--nvml-library".into(), lib.display().to_string()]),
            None => args.push("--no-nvml".into()),
        }
        node_procs.push(spawn(&node_bin, &args, &dir.join(format!("{name}.log"))));
    }

    // The Kubernetes hub, with OCM's ManagedCluster CRD and the cluster accepted.
    let (hub, admin) = start_ocm_hub().await.unwrap();
    install_ocm_crd(&admin, MANAGED_CLUSTER_CRD_FILE).await.unwrap();
    let clusters: Api<DynamicObject> = Api::all_with(admin.clone(), &managed_cluster_resource());
    accept_managed_cluster(&admin, "pool-kube").await.unwrap();
    let identity = onboard_cluster(&hub, &admin, "pool-kube").await.unwrap();
    let kube_engine = spawn(
        &spokelet,
        &s(&[
            "run",
            "--hub-transport",
            "kube",
            "--hub-kubeconfig",
            &identity.kubeconfig_path().display().to_string(),
            "--cluster-name",
            "pool-kube",
            "--agent-id",
            "pool-kube",
            "--kubeconfig",
            &kubeconfig,
            "--artifact-cache",
            &dir.join("cache-kube").display().to_string(),
        ]),
        &dir.join("engine-kube.log"),
    );

    // The CloudEvents hub: a second engine on the same spoke reporting over gRPC, and the
    // bare-metal node service.
    let pki = HubPki::generate().unwrap();
    let ce_hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let mut grpc_args = Vec::new();
    for (cluster, tag) in [("pool-grpc", "grpc"), ("bare-metal", "bm")] {
        let id = pki.client(cluster, &[]).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(format!("{tag}-{name}"));
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        grpc_args.push(s(&[
            "--hub-url",
            &ce_hub.url(),
            "--hub-ca-file",
            &write("ca.crt", pki.serving_ca.cert_pem()),
            "--hub-client-cert-file",
            &write("tls.crt", &id.cert_pem),
            "--hub-client-key-file",
            &write("tls.key", &id.key_pem),
            "--cluster-name",
            cluster,
        ]));
    }
    let mut args = s(&[
        "run",
        "--hub-transport",
        "grpc",
        "--agent-id",
        "pool-grpc",
        "--kubeconfig",
        &kubeconfig,
    ]);
    args.extend([
        "--artifact-cache".into(),
        dir.join("cache-grpc").display().to_string(),
    ]);
    args.extend(grpc_args[0].clone());
    let grpc_engine = spawn(&spokelet, &args, &dir.join("engine-grpc.log"));
    let mut args = s(&[
        "--node-name",
        "bm-1",
        "--nvml-library",
        &bm_shim.display().to_string(),
    ]);
    args.extend(["--root".into(), dir.join("bare-metal-host").display().to_string()]);
    args.extend(grpc_args[1].clone());
    let node_service = spawn(&node_bin, &args, &dir.join("node-service.log"));

    // Everything reported once.
    let healthy = |want: &'static str| {
        let clusters = clusters.clone();
        async move || {
            let s = clusters
                .get("pool-kube")
                .await
                .map(|m| m.data["status"].clone())
                .unwrap_or_default();
            claim(&s, "node.healthy.count.spokelet.io").as_deref() == Some(want)
        }
    };
    let grpc_healthy = |want: &'static str| {
        let hub = &ce_hub;
        move || {
            let found = hub
                .received_of(CLUSTER_STATUS)
                .last()
                .and_then(|r| r.json())
                .is_some_and(|d| {
                    claim(&d["status"], "node.healthy.count.spokelet.io").as_deref() == Some(want)
                });
            async move { found }
        }
    };
    let bm_healthy = |want: bool| {
        let hub = &ce_hub;
        move || {
            let found = hub
                .received_of(NODE_UPDATE)
                .iter()
                .rev()
                .find(|r| r.ext("resourceid").as_deref() == Some("bm-1"))
                .and_then(|r| r.json())
                .is_some_and(|d| d["status"]["inventory"]["health"]["healthy"] == want);
            async move { found }
        }
    };
    let start = Instant::now();
    until(start, "the first report on the Kubernetes hub", healthy("2")).await;
    until(start, "the first report over gRPC", grpc_healthy("2")).await;
    until(start, "the node service's first report", bm_healthy(true)).await;
    println!(
        "all reported {:.1} s after the hub started\n",
        start.elapsed().as_secs_f64()
    );

    // 1. Change -> hub.
    let (mut kube_lat, mut grpc_lat, mut bm_lat) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..CHANGES {
        let raise = i % 2 == 0;
        let state = ShimState {
            ecc_uncorrected: if raise {
                BTreeMap::from([(3, 1)])
            } else {
                BTreeMap::new()
            },
            ..ShimState::default()
        };
        let want = if raise { "1" } else { "2" };
        let at = Instant::now();
        write_shim_state(&shim, &state).unwrap();
        // Both engines report the same change; poll both from the same instant.
        let (k, g) = tokio::join!(
            until(at, "the change on the Kubernetes hub", healthy(want)),
            until(at, "the change over gRPC", grpc_healthy(want))
        );
        kube_lat.push(k);
        grpc_lat.push(g);
        let at = Instant::now();
        write_shim_state(&bm_shim, &state).unwrap();
        bm_lat.push(until(at, "the node service's change", bm_healthy(!raise)).await);
        // Let the next change start from a settled state (another discovery tick).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let reporting_rss: Vec<u64> = node_procs
        .iter()
        .chain([&node_service])
        .map(|p| proc_status_kib(p.pid(), "VmHWM").unwrap_or(0))
        .collect();

    // 2. An unchanged pool for a minute.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hub_before = request_counts(&admin).await.unwrap();
    let spoke_before = request_counts(&client).await.unwrap();
    let events_before = ce_hub.received_count();
    tokio::time::sleep(QUIET).await;
    let hub_delta = request_delta(&hub_before, &request_counts(&admin).await.unwrap());
    let spoke_delta = request_delta(&spoke_before, &request_counts(&client).await.unwrap());
    let events: Vec<String> = ce_hub
        .received_since(events_before)
        .iter()
        .map(|r| r.event.r#type.clone())
        .collect();
    let idle_rss: Vec<u64> = node_procs
        .iter()
        .chain([&node_service])
        .map(|p| proc_status_kib(p.pid(), "VmRSS").unwrap_or(0))
        .collect();

    println!("Change on a node (an uncorrectable ECC error raised or cleared) -> the hub");
    print_table(
        &["transport", "changes", "p50 ms", "p90 ms", "max ms", "< 2 s"],
        &[
            latency_row("Kubernetes hub (ManagedCluster status)", kube_lat),
            latency_row("gRPC (managedclusters.status.update_request)", grpc_lat),
            latency_row("gRPC, bare-metal node service (nodeinventories)", bm_lat),
        ],
    );
    let per_hour = |n: u64| format!("{:.0}", n as f64 * 3600.0 / QUIET.as_secs_f64());
    println!(
        "\nAn unchanged pool ({} s quiet, scaled to an hour; heartbeats every 10 min are not in a 1-minute window)",
        QUIET.as_secs()
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (side, delta) in [("hub API server", &hub_delta), ("spoke API server", &spoke_delta)] {
        let pool = pool_requests(delta);
        if pool.is_empty() {
            rows.push(vec![side.into(), "(none)".into(), "0".into(), "0".into()]);
        }
        for (k, v) in pool {
            rows.push(vec![side.into(), k, v.to_string(), per_hour(v)]);
        }
    }
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for t in &events {
        *by_type.entry(t.clone()).or_default() += 1;
    }
    if by_type.is_empty() {
        rows.push(vec![
            "gRPC hub".into(),
            "(no events)".into(),
            "0".into(),
            "0".into(),
        ]);
    }
    for (t, n) in by_type {
        rows.push(vec!["gRPC hub".into(), t, n.to_string(), per_hour(n)]);
    }
    print_table(&["where", "requests", "in the window", "per hour"], &rows);
    println!(
        "configured heartbeats per hour: the Kubernetes hub's cluster lease 60, the pool report 6 \
         (ManagedCluster status + 1 event per node over gRPC), each node's NodeInventory re-apply 6, \
         the node service's report 6"
    );

    println!("\nspokelet-node resident memory (release-small binary)");
    let names = [
        "DaemonSet role, GPU node (NVML shim)",
        "DaemonSet role, CPU node",
        "bare-metal node service (gRPC, NVML shim)",
    ];
    let rss_rows: Vec<Vec<String>> = names
        .iter()
        .zip(idle_rss.iter().zip(&reporting_rss))
        .map(|(n, (idle, peak))| {
            vec![
                (*n).to_string(),
                format!("{:.1}", mib(*idle)),
                format!("{:.1}", mib(*peak)),
                if mib(*peak) < TARGET_RSS_MIB {
                    "met"
                } else {
                    "missed"
                }
                .to_string(),
            ]
        })
        .collect();
    print_table(
        &["process", "idle MiB (VmRSS)", "reporting MiB (VmHWM)", "< 10 MiB"],
        &rss_rows,
    );

    drop((kube_engine, grpc_engine, node_service, node_procs));
    ce_hub.stop().await;
    drop(hub);
    drop(spoke);
}
