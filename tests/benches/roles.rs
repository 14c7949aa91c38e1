//! The two roles as an operator runs them (the release binary, default lease settings) against
//! a real API server, printing a table:
//!
//! 1. leader failover over 10 kills: two `spokelet run --leader-elect` replicas; the leader is
//!    SIGKILLed and a replacement started (as the Deployment would); time from the kill until
//!    the other replica holds the Lease;
//! 2. a hardware change to the node's labels and NodeInventory: `spokelet node` on a copy of
//!    the HGX fixture tree, an RDMA port toggled in it, time until the label shows it;
//! 3. resident memory: the node role's peak (its lean binary as the image ships it, built with
//!    `--profile release-small`), an engine standby, and the leader with one work and holding
//!    1,000 works.
//!
//! Run with `cargo bench -p spokelet-e2e --bench roles`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;
use spokelet_e2e::bench::{ms, node_binary, percentile, print_table, proc_status_kib, release_binary};
use spokelet_e2e::{ClusterOptions, KubeCluster, create_namespace, lease_holder};

const KILLS: usize = 10;
const LABEL_SAMPLES: usize = 10;
const WORKS: usize = 1_000;

struct Replica {
    id: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn engine(bin: &Path, id: &str, lease_ns: &str, works: &Path, kubeconfig: &Path, scratch: &Path) -> Replica {
    let log = std::fs::File::create(scratch.join(format!("{id}.log"))).unwrap();
    let child = Command::new(bin)
        .args(["run", "--leader-elect", "--leader-identity", id, "--agent-id", id])
        .args(["--agent-namespace", lease_ns])
        .arg("--works-dir")
        .arg(works)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--artifact-cache")
        .arg(scratch.join(format!("{id}-cache")))
        .args(["--admin-addr", "127.0.0.1:0", "--log-level", "warn"])
        .env_remove("SPOKELET_CONFIG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Replica {
        id: id.to_string(),
        child,
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    let (client, ns) = (
        leases.clone().into_client(),
        leases.namespace().unwrap_or_default().to_string(),
    );
    lease_holder(&client, &ns, "spokelet-work-engine").await
}

/// Polls every 20 ms until `f` holds; the time it took.
async fn until<F, Fut>(what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what}: not after two minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn rss_kib(child: &Child) -> u64 {
    proc_status_kib(child.id(), "VmRSS").unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn work_file(dir: &Path, i: usize, ns: &str) {
    let text = format!(
        "apiVersion: work.open-cluster-management.io/v1\nkind: ManifestWork\nmetadata:\n  name: w{i}\nspec:\n  workload:\n    manifests:\n      - apiVersion: v1\n        kind: ConfigMap\n        metadata:\n          name: w{i}\n          namespace: {ns}\n        data:\n          index: \"{i}\"\n"
    );
    std::fs::write(dir.join(format!("w{i}.yaml")), text).unwrap();
}

async fn failover(bin: &Path, spoke: &KubeCluster, scratch: &Path) -> (Vec<Duration>, u64, u64) {
    let client = spoke.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "spokelet-bench");
    let works = scratch.join("works");
    std::fs::create_dir_all(&works).unwrap();
    work_file(&works, 0, "bench-works");
    let mut next = 0;
    let start = |next: &mut usize| {
        *next += 1;
        engine(
            bin,
            &format!("replica-{next}"),
            "spokelet-bench",
            &works,
            spoke.kubeconfig_path(),
            scratch,
        )
    };
    let mut replicas = vec![start(&mut next), start(&mut next)];
    let mut times = Vec::new();
    let (mut standby_rss, mut leader_rss) = (0, 0);
    for round in 0..KILLS {
        let ids: Vec<String> = replicas.iter().map(|r| r.id.clone()).collect();
        until("a leader", || {
            let (l, ids) = (leases.clone(), ids.clone());
            async move { holder(&l).await.is_some_and(|h| ids.contains(&h)) }
        })
        .await;
        // Let the standby settle as a standby, and the leader finish its pass.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = holder(&leases).await.unwrap();
        let at = replicas.iter().position(|r| r.id == leader).unwrap();
        if round == 0 {
            leader_rss = rss_kib(&replicas[at].child);
            standby_rss = rss_kib(&replicas[1 - at].child);
        }
        let killed = replicas.remove(at);
        let dead = killed.id.clone();
        let kill_at = Instant::now();
        drop(killed); // SIGKILL
        let survivor = replicas[0].id.clone();
        until("the standby takes over", || {
            let (l, s) = (leases.clone(), survivor.clone());
            async move { holder(&l).await.as_deref() == Some(s.as_str()) }
        })
        .await;
        times.push(kill_at.elapsed());
        eprintln!(
            "kill {}: {} -> {} in {:?}",
            round + 1,
            dead,
            survivor,
            kill_at.elapsed()
        );
        replicas.push(start(&mut next));
    }
    times.sort_unstable();
    (times, standby_rss, leader_rss)
}

async fn leader_with_works(bin: &Path, spoke: &KubeCluster, scratch: &Path) -> (u64, u64, Duration) {
    let client = spoke.client();
    let works = scratch.join("many");
    std::fs::create_dir_all(&works).unwrap();
    for i in 0..WORKS {
        work_file(&works, i, "bench-many");
    }
    // A Lease of its own: the failover rounds' last holder was killed and holds theirs until it
    // lapses.
    let start = Instant::now();
    let r = engine(
        bin,
        "many",
        "spokelet-bench-many",
        &works,
        spoke.kubeconfig_path(),
        scratch,
    );
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "bench-many");
    until("1,000 works applied", || {
        let c = cms.clone();
        async move {
            c.list(&Default::default())
                .await
                .map(|l| l.items.len() >= WORKS)
                .unwrap_or(false)
        }
    })
    .await;
    let applied = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_kib(&r.child);
    let hwm = proc_status_kib(r.child.id(), "VmHWM").unwrap_or(0);
    (rss, hwm, applied)
}

async fn node_role(bin: &Path, spoke: &KubeCluster, scratch: &Path) -> (Vec<Duration>, u64) {
    let client = spoke.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let name = "bench-gpu-node";
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let crd = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/nodeinventories.spokelet.io.yaml"),
    )
    .unwrap();
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_yaml::from_str(&crd).unwrap();
    Api::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let root = scratch.join("host");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/tests/fixtures/hgx-h100");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&fixture)
            .arg(&root)
            .status()
            .unwrap()
            .success()
    );
    let log = std::fs::File::create(scratch.join("node.log")).unwrap();
    let mut child = Command::new(bin)
        .args([
            "--node-name",
            name,
            "--no-nvml",
            "--admin-addr",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .arg("--root")
        .arg(&root)
        .arg("--kubeconfig")
        .arg(spoke.kubeconfig_path())
        .env_remove("SPOKELET_CONFIG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let ports = |n: &Node| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("spokelet.io/rdma.ports-active").cloned())
    };
    until("the first labels", || {
        let n = nodes.clone();
        async move { n.get(name).await.ok().and_then(|n| ports(&n)).is_some() }
    })
    .await;
    let out = Command::new("find")
        .arg(root.join("sys/devices"))
        .args(["-path", "*infiniband/mlx5_1/ports/1/state"])
        .output()
        .unwrap();
    let state = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let mut times = Vec::new();
    for i in 0..LABEL_SAMPLES {
        let (text, want) = if i % 2 == 0 {
            ("1: DOWN\n", "6")
        } else {
            ("4: ACTIVE\n", "7")
        };
        std::fs::write(&state, text).unwrap();
        let t = until("the label follows", || {
            let n = nodes.clone();
            async move { n.get(name).await.ok().and_then(|n| ports(&n)).as_deref() == Some(want) }
        })
        .await;
        times.push(t);
        // Independent samples: not in step with the discovery interval.
        tokio::time::sleep(Duration::from_millis(700 + 97 * i as u64)).await;
    }
    // Its highest resident memory over the whole run: start, first write, ten changes written.
    let peak = proc_status_kib(child.id(), "VmHWM").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    times.sort_unstable();
    (times, peak)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bin = release_binary("spokelet").expect("release build");
        let spoke = KubeCluster::start(ClusterOptions::spoke()).await.expect("spoke cluster");
        let client = spoke.client();
        for ns in ["spokelet-bench", "spokelet-bench-many", "bench-works", "bench-many"] {
            create_namespace(&client, ns).await.unwrap();
        }
        let scratch = tempfile::tempdir().unwrap();
        let (failovers, standby_rss, leader_rss) = failover(&bin, &spoke, scratch.path()).await;
        let node_bin = node_binary().expect("the node role's binary");
        let (labels, node_rss) = node_role(&node_bin, &spoke, scratch.path()).await;
        eprintln!("node role: label latencies {labels:?}, peak RSS {node_rss} KiB");
        let (many_rss, many_hwm, applied) = leader_with_works(&bin, &spoke, scratch.path()).await;
        println!("\nRoles: leader failover, node labels, resident memory (release binary, default lease settings)\n");
        print_table(
            &["measure", "spokelet", "target"],
            &[
                vec![format!("failover after SIGKILL, p50, ms ({KILLS} kills)"), ms(percentile(&failovers, 0.5)), "< 15 s".into()],
                vec!["failover p90 / max, ms".into(), format!("{} / {}", ms(percentile(&failovers, 0.9)), ms(*failovers.last().unwrap())), String::new()],
                vec![format!("hardware change -> node label, p50, ms ({LABEL_SAMPLES})"), ms(percentile(&labels, 0.5)), "< 2 s".into()],
                vec!["hardware change -> node label, max, ms".into(), ms(*labels.last().unwrap()), "< 2 s".into()],
                vec!["node role peak RSS (spokelet-node, VmHWM)".into(), mib(node_rss), "< 10 MiB".into()],
                vec!["engine standby RSS".into(), mib(standby_rss), String::new()],
                vec!["engine leader RSS, one work".into(), mib(leader_rss), String::new()],
                vec![format!("engine leader RSS / peak, {WORKS} works"), format!("{} / {}", mib(many_rss), mib(many_hwm)), String::new()],
                vec![format!("  ({WORKS} works applied from cold in, ms)"), ms(applied), String::new()],
            ],
        );
        spoke.stop().await;
    });
}
