//! Work-engine benchmark on a real API server (prints a table):
//!
//! 1. apply 1,000 objects (200 works x ConfigMap, Secret, Service, Deployment, ServiceAccount)
//!    from cold, side by side with `kubectl apply --server-side` of the same objects, the
//!    raw-create floor (the same creates, nothing else) and the OCM-shaped floor (the requests
//!    any agent keeping OCM's record and watching for drift must send, sent raw); three rounds on
//!    fresh namespaces, medians reported, with the API server's requests per side; then
//!    re-apply the first round unchanged, which must write nothing;
//! 2. drift: edit or delete 100 applied objects one at a time and time change -> corrected (p50/p99);
//! 3. peak RSS (VmHWM) of the real `spokelet run` binary holding the 200 works.
//!
//! Run: `cargo bench -p spokelet-e2e --bench work_engine` (builds the agent binary if needed).
//! `KUBECTL` overrides the kubectl path (default /usr/bin/kubectl).

use std::collections::HashMap;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use spokelet::work::applied_work::hub_hash;
use spokelet::work::conditions::find;
use spokelet::work::engine::{EngineConfig, WorkEngine};
use spokelet::work::manifestwork::{Manifest, ManifestWork, ManifestWorkSpec, ManifestsTemplate};
use spokelet::work::metrics::WorkMetrics;
use spokelet::work::{CancellationToken, Listing, StatusUpdate, WorkEvent};
use spokelet_e2e::bench::{
    Cost, Mark, Tamper, drift_sample, kubectl_apply, ocm_shaped_floor, percentile, print_costs, proc_cpu,
    proc_status_kib, raw_creates, spokelet_binary,
};
use spokelet_e2e::{ClusterOptions, KubeCluster};
use tokio::sync::mpsc;

const WORKS: usize = 200;
const NAMESPACES: usize = 10;
const DRIFT_SAMPLES: usize = 100;
/// Cold-apply rounds; the table gives medians.
const ROUNDS: usize = 3;

fn objects(ns_prefix: &str, i: usize) -> Vec<Value> {
    let ns = format!("{ns_prefix}-{}", i % NAMESPACES);
    let n = format!("w{i}");
    vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("{n}-cm"), "namespace": ns},
            "data": {"config.yaml": format!("work: {i}\nlevel: info\n"), "index": i.to_string()}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{n}-secret"), "namespace": ns},
            "type": "Opaque", "stringData": {"token": format!("t-{i}")}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("{n}-svc"), "namespace": ns},
            "spec": {"selector": {"app": n}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": format!("{n}-deploy"), "namespace": ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": n}},
                "template": {"metadata": {"labels": {"app": n}},
                    "spec": {"serviceAccountName": format!("{n}-sa"), "containers": [{"name": "app", "image": "registry.invalid/app:1.0",
                        "ports": [{"containerPort": 8080}], "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": format!("{n}-sa"), "namespace": ns}}),
    ]
}

fn work(ns_prefix: &str, i: usize, generation: i64) -> ManifestWork {
    let mut w = ManifestWork::new(
        &format!("{ns_prefix}-{i}"),
        ManifestWorkSpec {
            workload: ManifestsTemplate {
                manifests: objects(ns_prefix, i).into_iter().map(Manifest::from).collect(),
            },
            ..Default::default()
        },
    );
    w.metadata.generation = Some(generation);
    w
}

async fn make_namespaces(client: &Client, prefix: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    for k in 0..NAMESPACES {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("{prefix}-{k}")}})).unwrap();
        api.create(&PostParams::default(), &ns).await.unwrap();
    }
}

/// resourceVersion of every object of the benchmark kinds in the namespaces (Deployments by
/// generation, since the deployment controller keeps writing their status).
async fn versions(client: &Client, prefix: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let kinds = [
        ("", "v1", "ConfigMap", "configmaps"),
        ("", "v1", "Secret", "secrets"),
        ("", "v1", "Service", "services"),
        ("apps", "v1", "Deployment", "deployments"),
        ("", "v1", "ServiceAccount", "serviceaccounts"),
    ];
    for k in 0..NAMESPACES {
        let ns = format!("{prefix}-{k}");
        for (g, v, kind, plural) in kinds {
            let ar = kube::api::ApiResource {
                group: g.into(),
                version: v.into(),
                api_version: if g.is_empty() {
                    v.into()
                } else {
                    format!("{g}/{v}")
                },
                kind: kind.into(),
                plural: plural.into(),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
            for o in api.list(&ListParams::default()).await.unwrap().items {
                let name = o.name_any();
                // Only the benchmark's own objects (not e.g. service-account token Secrets).
                let ours = ["-cm", "-secret", "-svc", "-deploy", "-sa"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|w| w.starts_with('w') && w[1..].parse::<usize>().is_ok())
                });
                if !ours {
                    continue;
                }
                let ver = if kind == "Deployment" {
                    format!("g{}", o.metadata.generation.unwrap_or(0))
                } else {
                    o.resource_version().unwrap_or_default()
                };
                out.insert(format!("{ns}/{plural}/{name}"), ver);
            }
        }
    }
    out
}

/// [`versions`] once controllers have stopped writing the objects (token controllers update
/// ServiceAccounts for a while after a burst): two readings 2 s apart agree, or a minute passed.
async fn settled_versions(client: &Client, prefix: &str) -> HashMap<String, String> {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut last = versions(client, prefix).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = versions(client, prefix).await;
        if now == last || Instant::now() > give_up {
            return now;
        }
        last = now;
    }
}

fn changed(a: &HashMap<String, String>, b: &HashMap<String, String>) -> usize {
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count() + b.keys().filter(|k| !a.contains_key(*k)).count()
}

struct Engine {
    tx: mpsc::UnboundedSender<WorkEvent>,
    rx: mpsc::UnboundedReceiver<StatusUpdate>,
    latest: HashMap<String, StatusUpdate>,
    shutdown: CancellationToken,
    metrics: WorkMetrics,
}

impl Engine {
    async fn start(client: Client, hub: &str) -> Engine {
        let (tx, src) = mpsc::unbounded_channel();
        let (stx, rx) = mpsc::unbounded_channel();
        let metrics = WorkMetrics::default();
        let engine = WorkEngine::new(client, EngineConfig::new(hub_hash(hub), "bench"), metrics.clone());
        let mut ready = engine.ready();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move { engine.run(src, Arc::new(stx), sd).await.unwrap() });
        tx.send(WorkEvent::Synced(Listing::Complete)).unwrap();
        ready.wait_for(|r| *r).await.unwrap();
        Engine {
            tx,
            rx,
            latest: HashMap::new(),
            shutdown,
            metrics,
        }
    }

    /// Sends the works `<prefix>-<i>` at `generation` and waits until they are all Applied.
    async fn apply_all(&mut self, prefix: &str, generation: i64) {
        for i in 0..WORKS {
            let w = work(prefix, i, generation);
            self.tx.send(WorkEvent::Upsert(Box::new(w))).unwrap();
        }
        self.all_applied(prefix, generation).await;
    }

    /// Waits until the works named `<prefix>-<i>` all report Applied at `generation`.
    async fn all_applied(&mut self, prefix: &str, generation: i64) {
        let ours = format!("{prefix}-");
        loop {
            let done = self.latest.values().filter(|u| {
                u.name.starts_with(&ours)
                    && find(&u.status.conditions, "Applied")
                        .is_some_and(|c| c.status == "True" && c.observed_generation == generation)
            });
            if done.count() == WORKS {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(120), self.rx.recv()).await {
                Ok(Some(u)) => {
                    self.latest.insert(u.name.clone(), u);
                }
                _ => panic!(
                    "works did not all apply; latest: {:?}",
                    self.latest
                        .values()
                        .find(|u| find(&u.status.conditions, "Applied").is_none_or(|c| c.status != "True"))
                ),
            }
        }
    }

    fn count(&self, result: &str) -> u64 {
        self.metrics.applies_of(
            result,
            &["ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment"],
        )
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    // 600 Services (kubectl, engine, agent binary) need more than the default /24 of ClusterIPs.
    let opts = ClusterOptions {
        extra_apiserver_args: vec!["--service-cluster-ip-range=10.0.0.0/16".into()],
        ..ClusterOptions::spoke()
    };
    let cluster = KubeCluster::start(opts).await.expect("cluster starts");
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    // The client `spokelet run` uses by default.
    let config = spokelet::kube_client::cluster_config(Some(&kubeconfig))
        .await
        .unwrap();
    let client =
        spokelet::kube_client::client(config, spokelet::kube_client::HttpVersion::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    let server = cluster.pids();
    let mut engine = Engine::start(client.clone(), "bench-hub").await;
    // --- 1. cold apply, ROUNDS times side by side (fresh namespaces each), medians reported ---
    let mut rounds: Vec<Round> = Vec::new();
    for r in 0..ROUNDS {
        let kubectl = kubectl_side(&client, &server, &kubeconfig, tmp.path(), r).await;
        settle().await;
        let floor = floor_side(&client, &server, r).await;
        settle().await;
        let ocm = ocm_floor_side(&client, &server, r).await;
        settle().await;
        let engine_side = engine_side(&mut engine, &client, &server, r).await;
        settle().await;
        rounds.push(Round {
            kubectl,
            floor,
            ocm,
            engine: engine_side,
        });
    }
    let median = |f: &dyn Fn(&Round) -> Duration| {
        let mut v: Vec<Duration> = rounds.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    let e_cold = median(&|r| r.engine.wall);
    let k_cold = median(&|r| r.kubectl.wall);
    let floor = median(&|r| r.floor.wall);
    let ocm = median(&|r| r.ocm.wall);

    // --- unchanged re-apply, on the first round's objects ---
    let k_file = tmp.path().join("kubectl-0.yaml");
    let k_before = settled_versions(&client, &side_prefix("kubectl", 0)).await;
    let (k_again, _) = kubectl_apply(&kubeconfig, &k_file);
    let k_after = versions(&client, &side_prefix("kubectl", 0)).await;
    assert_eq!(k_before.len(), WORKS * 5, "kubectl applied every object");
    let e_prefix = side_prefix("engine", 0);
    let e_before = settled_versions(&client, &e_prefix).await;
    assert_eq!(e_before.len(), WORKS * 5, "engine applied every object");
    let writes_before = engine.count("created") + engine.count("updated");
    let t1 = Instant::now();
    engine.apply_all(&e_prefix, 2).await;
    let e_again = t1.elapsed();
    let e_after = versions(&client, &e_prefix).await;
    let e_writes = engine.count("created") + engine.count("updated") - writes_before;
    let e = engine;

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let cpu = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let all_ms = |f: &dyn Fn(&Round) -> Duration| {
        let v: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.0}", f(r).as_secs_f64() * 1000.0))
            .collect();
        v.join(", ")
    };
    rows.push((
        format!("cold apply, 1,000 objects (median of {ROUNDS})"),
        ms(e_cold),
        ms(k_cold),
    ));
    rows.push((
        "  each round (ms)".into(),
        all_ms(&|r| r.engine.wall),
        all_ms(&|r| r.kubectl.wall),
    ));
    rows.push((
        "raw-create floor: same 1,000 creates, 64 in flight".into(),
        format!("{} ({})", ms(floor), all_ms(&|r| r.floor.wall)),
        String::new(),
    ));
    rows.push((
        "OCM-shaped floor: + records, owner refs, drift watches".into(),
        format!("{} ({})", ms(ocm), all_ms(&|r| r.ocm.wall)),
        String::new(),
    ));
    rows.push((
        "engine / raw-create floor; engine / OCM-shaped floor".into(),
        format!(
            "{:.2}x; {:.2}x",
            e_cold.as_secs_f64() / floor.as_secs_f64(),
            e_cold.as_secs_f64() / ocm.as_secs_f64()
        ),
        String::new(),
    ));
    rows.push((
        "cold apply: API server + etcd + controllers CPU".into(),
        cpu(median(&|r| r.engine.server_cpu)),
        cpu(median(&|r| r.kubectl.server_cpu)),
    ));
    rows.push((
        "cold apply: client CPU".into(),
        cpu(median(&|r| r.engine.client_cpu)),
        cpu(median(&|r| r.kubectl.client_cpu)),
    ));
    rows.push((
        "floors: server CPU, raw-create / OCM-shaped".into(),
        format!(
            "{} / {}",
            cpu(median(&|r| r.floor.server_cpu)),
            cpu(median(&|r| r.ocm.server_cpu))
        ),
        String::new(),
    ));
    rows.push((
        "speed-up (kubectl / engine)".into(),
        format!("{:.1}x", k_cold.as_secs_f64() / e_cold.as_secs_f64()),
        "target >= 5x".into(),
    ));
    rows.push(("unchanged re-apply".into(), ms(e_again), ms(k_again)));
    rows.push((
        "objects changed by re-apply".into(),
        format!("{} (writes sent: {e_writes})", changed(&e_before, &e_after)),
        format!("{}", changed(&k_before, &k_after)),
    ));

    // --- 2. drift: one object at a time, change -> corrected ---
    let mut lat = Vec::with_capacity(DRIFT_SAMPLES);
    for s in 0..DRIFT_SAMPLES {
        let i = s % WORKS;
        let ns = format!("{e_prefix}-{}", i % NAMESPACES);
        let name = format!("w{i}-cm");
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let how = if s % 2 == 0 { Tamper::Edit } else { Tamper::Delete };
        lat.push(drift_sample(&api, &name, &i.to_string(), how).await);
        // Let the engine's own follow-up events settle so samples are independent.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat.sort();
    let corrections = e
        .metrics
        .drift_corrections
        .get_or_create(&vec![("work".into(), format!("{e_prefix}-0"))])
        .get();
    rows.push((
        "drift correction p50 (edit/delete)".into(),
        ms(percentile(&lat, 0.5)),
        "target < 300 ms".into(),
    ));
    rows.push((
        "drift correction p99".into(),
        ms(percentile(&lat, 0.99)),
        "target < 1000 ms".into(),
    ));
    rows.push((
        "drift correction max".into(),
        ms(*lat.last().unwrap()),
        format!("({corrections} corrections counted on {e_prefix}-0)"),
    ));
    e.shutdown.cancel();

    // --- 3. peak RSS of the real agent binary holding 200 works ---
    make_namespaces(&client, "rss").await;
    let works_dir = tmp.path().join("works");
    std::fs::create_dir_all(&works_dir).unwrap();
    for i in 0..WORKS {
        let mut w = serde_json::to_value(work("rss", i, 1)).unwrap();
        w["metadata"].as_object_mut().unwrap().remove("generation");
        std::fs::write(
            works_dir.join(format!("rss-{i}.yaml")),
            serde_yaml::to_string(&w).unwrap(),
        )
        .unwrap();
    }
    let bin = spokelet_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(&bin)
        .args(["run", "--works-dir"])
        .arg(&works_dir)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--hub-name",
            "rss-hub",
            "--admin-addr",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spokelet starts");
    let pid = child.id();
    let t2 = Instant::now();
    loop {
        let applied = (0..WORKS)
            .filter(|i| {
                std::fs::read_to_string(works_dir.join(format!("rss-{i}.status.yaml")))
                    .ok()
                    .and_then(|s| serde_yaml::from_str::<spokelet::work::ManifestWorkStatus>(&s).ok())
                    .is_some_and(|st| find(&st.conditions, "Applied").is_some_and(|c| c.status == "True"))
            })
            .count();
        if applied == WORKS {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "spokelet exited early");
        assert!(
            t2.elapsed() < Duration::from_secs(300),
            "binary applied only {applied} works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let binary_cold = t2.elapsed();
    // Hold the works through a few drift-watch and status cycles before reading the peak.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    rows.push((
        "agent binary: 200 works applied (process start -> all status files)".into(),
        ms(binary_cold),
        String::new(),
    ));
    rows.push((
        "agent binary peak RSS (VmHWM)".into(),
        format!("{:.1} MiB", hwm as f64 / 1024.0),
        "target < 64 MiB".into(),
    ));

    println!();
    println!(
        "| {:<62} | {:>26} | {:>22} |",
        "measurement", "spokelet engine", "kubectl --server-side"
    );
    println!("|{}|{}|{}|", "-".repeat(64), "-".repeat(28), "-".repeat(24));
    for (a, b, c) in rows {
        println!("| {a:<62} | {b:>26} | {c:>22} |");
    }
    print_requests(&rounds[ROUNDS / 2]);
    cluster.stop().await;
}

/// One side of one cold-apply round: wall time, CPU and what the server did.
struct Side {
    wall: Duration,
    /// API server + etcd + controller-manager.
    server_cpu: Duration,
    /// The client doing the apply (kubectl's own process, or this one for the others).
    client_cpu: Duration,
    cost: Cost,
}

/// One round of the cold apply, every side on fresh namespaces.
struct Round {
    kubectl: Side,
    floor: Side,
    ocm: Side,
    engine: Side,
}

/// Prints what the server did during one round, side by side, to show where the engine's
/// extra server work goes.
fn print_requests(round: &Round) {
    print_costs(
        "API server requests during one cold-apply round (every client, controllers included):",
        &[
            ("engine", &round.engine.cost),
            ("OCM floor", &round.ocm.cost),
            ("kubectl", &round.kubectl.cost),
            ("raw floor", &round.floor.cost),
        ],
    );
}

/// Namespace (and work-name) prefix of one side in one round.
fn side_prefix(side: &str, round: usize) -> String {
    format!("{side}{round}")
}

/// Lets controllers finish their follow-up writes (token Secrets, ReplicaSets, Pods) for the
/// objects just made, so they do not load the API server during the next side's run.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// `kubectl apply --server-side` of the round's 1,000 objects (its file is kept for the re-apply).
async fn kubectl_side(client: &Client, server: &[u32], kubeconfig: &Path, dir: &Path, round: usize) -> Side {
    let prefix = side_prefix("kubectl", round);
    make_namespaces(client, &prefix).await;
    let mut yaml = String::new();
    for i in 0..WORKS {
        for o in objects(&prefix, i) {
            yaml.push_str("---\n");
            yaml.push_str(&serde_yaml::to_string(&o).unwrap());
        }
    }
    let file = dir.join(format!("kubectl-{round}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let mark = Mark::take(client, server).await;
    let (wall, client_cpu) = kubectl_apply(kubeconfig, &file);
    side(&mark, client, server, wall, client_cpu).await
}

/// The raw-create floor: the same 1,000 creates sent straight from one client, 64 at a time.
async fn floor_side(client: &Client, server: &[u32], round: usize) -> Side {
    let prefix = side_prefix("floor", round);
    make_namespaces(client, &prefix).await;
    let all: Vec<Value> = (0..WORKS).flat_map(|i| objects(&prefix, i)).collect();
    let c0 = proc_cpu(0).unwrap_or_default();
    let mark = Mark::take(client, server).await;
    let t = Instant::now();
    raw_creates(client, all, 64).await;
    let wall = t.elapsed();
    let client_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(c0);
    side(&mark, client, server, wall, client_cpu).await
}

/// The OCM-shaped floor ([`ocm_shaped_floor`]) of the round's 200 works, 64 at a time.
async fn ocm_floor_side(client: &Client, server: &[u32], round: usize) -> Side {
    let prefix = side_prefix("ocm", round);
    make_namespaces(client, &prefix).await;
    let works: Vec<Vec<Value>> = (0..WORKS).map(|i| objects(&prefix, i)).collect();
    let c0 = proc_cpu(0).unwrap_or_default();
    let mark = Mark::take(client, server).await;
    let t = Instant::now();
    // 64 works at a time, each sending one request at a time: 64 requests in flight, as in the
    // raw-create floor.
    ocm_shaped_floor(client, works, &format!("ocm-floor-{round}"), 64).await;
    let wall = t.elapsed();
    let client_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(c0);
    side(&mark, client, server, wall, client_cpu).await
}

/// The engine applying the round's 200 works from cold.
async fn engine_side(engine: &mut Engine, client: &Client, server: &[u32], round: usize) -> Side {
    let prefix = side_prefix("engine", round);
    make_namespaces(client, &prefix).await;
    let c0 = proc_cpu(0).unwrap_or_default();
    let mark = Mark::take(client, server).await;
    let t = Instant::now();
    engine.apply_all(&prefix, 1).await;
    let wall = t.elapsed();
    // This process is the engine plus the benchmark's own (small) bookkeeping.
    let client_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(c0);
    side(&mark, client, server, wall, client_cpu).await
}

/// The side measured from `mark` to now.
async fn side(mark: &Mark, client: &Client, server: &[u32], wall: Duration, client_cpu: Duration) -> Side {
    let cost = mark.since(client, server).await;
    Side {
        wall,
        server_cpu: cost.server_cpu(),
        client_cpu,
        cost,
    }
}
