//! Work-engine benchmark on a real API server (prints a table):
//!
//! 1. apply 1,000 objects (200 works x ConfigMap, Secret, Service, Deployment, ServiceAccount)
//!    from cold, then re-apply them unchanged, side by side with `kubectl apply --server-side`
//!    of the same objects (fresh namespaces for each side); the unchanged re-apply must write nothing;
//! 2. drift: edit or delete 100 applied objects one at a time and time change -> corrected (p50/p99);
//! 3. peak RSS (VmHWM) of the real `spokelet run` binary holding the 200 works.
//!
//! Run: `cargo bench -p spokelet-e2e --bench work_engine` (builds the agent binary if needed).
//! `KUBECTL` overrides the kubectl path (default /usr/bin/kubectl).

use std::collections::HashMap;

use futures::StreamExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use spokelet::work::applied_work::hub_hash;
use spokelet::work::conditions::find;
use spokelet::work::manifestwork::{Manifest, ManifestWork, ManifestWorkSpec, ManifestsTemplate};
use spokelet::work::metrics::WorkMetrics;
use spokelet::work::{CancellationToken, EngineConfig, Listing, StatusUpdate, WorkEngine, WorkEvent};
use spokelet_e2e::bench::{percentile, proc_cpu, proc_status_kib, spokelet_binary, total_cpu};
use spokelet_e2e::{ClusterOptions, KubeCluster};
use tokio::sync::mpsc;

const WORKS: usize = 200;
const NAMESPACES: usize = 10;
const DRIFT_SAMPLES: usize = 100;

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
        &format!("bench-{i}"),
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

fn changed(a: &HashMap<String, String>, b: &HashMap<String, String>) -> usize {
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count() + b.keys().filter(|k| !a.contains_key(*k)).count()
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "/usr/bin/kubectl".into())
}

/// Runs `kubectl apply --server-side`; returns its wall time and its own CPU time (bash's `times`
/// reports the CPU of the children it waited for).
fn kubectl_apply(kubeconfig: &Path, file: &Path) -> (Duration, Duration) {
    let t0 = Instant::now();
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            r#""$0" --kubeconfig "$1" apply --server-side --field-manager bench-kubectl -f "$2" >/dev/null && times"#,
        ])
        .arg(kubectl())
        .arg(kubeconfig)
        .arg(file)
        .output()
        .expect("kubectl runs");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `times` prints the shell's user/sys times, then its children's: "0m1.234s 0m0.056s".
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cpu = stdout
        .lines()
        .nth(1)
        .map(|l| l.split_whitespace().filter_map(parse_times).sum())
        .unwrap_or_default();
    (took, cpu)
}

/// Parses one of bash's `times` values ("1m2.345s").
fn parse_times(v: &str) -> Option<Duration> {
    let (m, s) = v.strip_suffix('s')?.split_once('m')?;
    Some(Duration::from_secs_f64(
        m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?,
    ))
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

    async fn all_applied(&mut self, generation: i64) {
        loop {
            let done = self.latest.values().filter(|u| {
                find(&u.status.conditions, "Applied")
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
        self.metrics
            .applies
            .get_or_create(&vec![("result".into(), result.into())])
            .get()
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
    // The same HTTP/2 client `spokelet run` uses.
    let config = spokelet::run::client_config(Some(&kubeconfig)).await.unwrap();
    let client = spokelet::kube_client::client(config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // --- 1. cold apply and unchanged re-apply: kubectl ---
    make_namespaces(&client, "kubectl").await;
    let mut yaml = String::new();
    for i in 0..WORKS {
        for o in objects("kubectl", i) {
            yaml.push_str("---\n");
            yaml.push_str(&serde_yaml::to_string(&o).unwrap());
        }
    }
    let file = tmp.path().join("all.yaml");
    std::fs::write(&file, yaml).unwrap();
    let server = cluster.pids();
    let s0 = total_cpu(&server);
    let (k_cold, k_cpu) = kubectl_apply(&kubeconfig, &file);
    let k_server_cpu = total_cpu(&server).saturating_sub(s0);
    // Let controllers finish their follow-up writes (service-account tokens) first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let k_before = versions(&client, "kubectl").await;
    let (k_again, _) = kubectl_apply(&kubeconfig, &file);
    let k_after = versions(&client, "kubectl").await;
    assert_eq!(k_before.len(), WORKS * 5, "kubectl applied every object");

    // --- server floor: the same 1,000 creates sent straight from one client, 64 at a time ---
    make_namespaces(&client, "floor").await;
    let all: Vec<Value> = (0..WORKS).flat_map(|i| objects("floor", i)).collect();
    let (s0, c0) = (total_cpu(&server), proc_cpu(0).unwrap_or_default());
    let t = Instant::now();
    futures::stream::iter(all.into_iter().map(|o| {
        let client = client.clone();
        async move {
            let (g, plural) = match o["kind"].as_str().unwrap_or("") {
                "ConfigMap" => ("", "configmaps"),
                "Secret" => ("", "secrets"),
                "Service" => ("", "services"),
                "Deployment" => ("apps", "deployments"),
                _ => ("", "serviceaccounts"),
            };
            let ar = kube::api::ApiResource {
                group: g.into(),
                version: "v1".into(),
                api_version: if g.is_empty() {
                    "v1".into()
                } else {
                    format!("{g}/v1")
                },
                kind: o["kind"].as_str().unwrap_or("").into(),
                plural: plural.into(),
            };
            let ns = o["metadata"]["namespace"].as_str().unwrap_or("").to_string();
            let obj: DynamicObject = serde_json::from_value(o).unwrap();
            Api::<DynamicObject>::namespaced_with(client, &ns, &ar)
                .create(&PostParams::default(), &obj)
                .await
                .unwrap();
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<()>>()
    .await;
    let floor = t.elapsed();
    let floor_server_cpu = total_cpu(&server).saturating_sub(s0);
    let floor_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(c0);
    // As after kubectl: let controllers finish their follow-up writes for these objects (token
    // Secrets, ReplicaSets, Pods) so they do not load the API server during the engine's run.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // --- 1. cold apply and unchanged re-apply: the engine ---
    make_namespaces(&client, "engine").await;
    let mut e = Engine::start(client.clone(), "bench-hub").await;
    let (s0, c0) = (total_cpu(&server), proc_cpu(0).unwrap_or_default());
    let t0 = Instant::now();
    for i in 0..WORKS {
        e.tx.send(WorkEvent::Upsert(Box::new(work("engine", i, 1))))
            .unwrap();
    }
    e.all_applied(1).await;
    let e_cold = t0.elapsed();
    let e_server_cpu = total_cpu(&server).saturating_sub(s0);
    // This process is the engine plus the benchmark's own (small) bookkeeping.
    let e_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(c0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e_before = versions(&client, "engine").await;
    assert_eq!(e_before.len(), WORKS * 5, "engine applied every object");
    let writes_before = e.count("created") + e.count("updated");
    let t1 = Instant::now();
    for i in 0..WORKS {
        e.tx.send(WorkEvent::Upsert(Box::new(work("engine", i, 2))))
            .unwrap();
    }
    e.all_applied(2).await;
    let e_again = t1.elapsed();
    let e_after = versions(&client, "engine").await;
    let e_writes = e.count("created") + e.count("updated") - writes_before;

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    rows.push(("cold apply, 1,000 objects".into(), ms(e_cold), ms(k_cold)));
    rows.push((
        "server floor: same 1,000 creates, raw, 64 in flight".into(),
        ms(floor),
        String::new(),
    ));
    let cpu = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    rows.push((
        "cold apply: API server + etcd + controllers CPU".into(),
        cpu(e_server_cpu),
        cpu(k_server_cpu),
    ));
    rows.push(("cold apply: client CPU".into(), cpu(e_cpu), cpu(k_cpu)));
    rows.push((
        "server floor: server CPU / client CPU".into(),
        format!("{} / {}", cpu(floor_server_cpu), cpu(floor_cpu)),
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
        let ns = format!("engine-{}", i % NAMESPACES);
        let name = format!("w{i}-cm");
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let t = Instant::now();
        let old_uid = if s % 2 == 0 {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"index": "tampered"}})),
            )
            .await
            .unwrap();
            None
        } else {
            let uid = api.get(&name).await.unwrap().uid();
            api.delete(&name, &DeleteParams::default()).await.unwrap();
            uid
        };
        loop {
            if let Some(c) = api.get_opt(&name).await.unwrap() {
                let restored = c.data.as_ref().and_then(|d| d.get("index")).map(String::as_str)
                    == Some(i.to_string().as_str());
                if restored && c.uid() != old_uid && c.metadata.deletion_timestamp.is_none() {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "drift on {ns}/{name} never corrected"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed());
        // Let the engine's own follow-up events settle so samples are independent.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat.sort();
    let corrections = e
        .metrics
        .drift_corrections
        .get_or_create(&vec![("work".into(), "bench-0".into())])
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
        format!("({} corrections counted on bench-0)", corrections),
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
            works_dir.join(format!("bench-{i}.yaml")),
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
                std::fs::read_to_string(works_dir.join(format!("bench-{i}.status.yaml")))
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
    cluster.stop().await;
}
