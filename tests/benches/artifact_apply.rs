//! An artifact of 500 objects applied by the engine from an `OCIRepository` + `Kustomization`
//! in a work, against `kubectl apply --server-side -f DIR` of the same files, on a real API
//! server and registry (prints a table):
//!
//! 1. cold apply, three rounds on fresh namespaces, medians: the engine's time runs from the
//!    work's arrival to the Kustomization's `Ready` (pull, build, apply and record included);
//! 2. drift: edit or delete 60 objects that came from the artifact, one at a time, change ->
//!    corrected (p50/p99), the same targets as inline objects.
//!
//! Run with `cargo bench -p spokelet-e2e --bench artifact_apply`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::{Value, json};
use spokelet::work::applied_work::hub_hash;
use spokelet::work::conditions::find;
use spokelet::work::engine::{EngineConfig, WorkEngine};
use spokelet::work::flux::{FluxExpander, FluxObjects};
use spokelet::work::manifestwork::{Manifest, ManifestWork, ManifestWorkSpec, ManifestsTemplate};
use spokelet::work::metrics::WorkMetrics;
use spokelet::work::{CancellationToken, Listing, StatusUpdate, WorkEvent};
use spokelet_artifact::registry::{Registry, RegistryAuth};
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_e2e::bench::{Tamper, drift_sample, kubectl_apply, ms, percentile, print_table};
use spokelet_e2e::{ClusterOptions, KubeCluster, OciRegistry, create_namespace};
use tokio::sync::mpsc;

/// 100 groups of 5 objects.
const GROUPS: usize = 100;
const ROUNDS: usize = 3;
const DRIFT_SAMPLES: usize = 60;

/// The 500 objects of group `i`, in namespace `ns` (None leaves it to `targetNamespace`).
fn group(i: usize, ns: Option<&str>) -> Vec<Value> {
    let n = format!("g{i}");
    let mut objs = vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("{n}-cm")},
            "data": {"config.yaml": format!("group: {i}\nlevel: info\n"), "index": i.to_string()}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{n}-secret")},
            "type": "Opaque", "stringData": {"token": format!("t-{i}")}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("{n}-svc")},
            "spec": {"selector": {"app": n}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": format!("{n}-deploy")},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": n}},
                "template": {"metadata": {"labels": {"app": n}},
                    "spec": {"serviceAccountName": format!("{n}-sa"), "containers": [{"name": "app", "image": "registry.invalid/app:1.0",
                        "ports": [{"containerPort": 8080}], "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": format!("{n}-sa")}}),
    ];
    if let Some(ns) = ns {
        for o in &mut objs {
            o["metadata"]["namespace"] = json!(ns);
        }
    }
    objs
}

/// Writes the 500 objects as one YAML file per group under `dir`.
fn write_tree(dir: &Path, ns: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..GROUPS {
        let docs: Vec<String> = group(i, ns)
            .iter()
            .map(|o| serde_yaml::to_string(o).unwrap())
            .collect();
        std::fs::write(dir.join(format!("group-{i:03}.yaml")), docs.join("---\n")).unwrap();
    }
}

fn flux_work(name: &str, url: &str, tag: &str, target_ns: &str) -> ManifestWork {
    let manifests = vec![
        json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
               "metadata": {"name": name, "namespace": "flux-system"},
               "spec": {"url": url, "ref": {"tag": tag}, "insecure": true, "interval": "10m"}}),
        json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
               "metadata": {"name": name, "namespace": "flux-system"},
               "spec": {"sourceRef": {"kind": "OCIRepository", "name": name}, "path": "./", "prune": true,
                        "interval": "10m", "targetNamespace": target_ns}}),
    ];
    let mut w = ManifestWork::new(
        name,
        ManifestWorkSpec {
            workload: ManifestsTemplate {
                manifests: manifests.into_iter().map(Manifest::from).collect(),
            },
            ..Default::default()
        },
    );
    w.metadata.generation = Some(1);
    w
}

/// Waits until the work's Kustomization reports Ready.
async fn ready(rx: &mut mpsc::UnboundedReceiver<StatusUpdate>, work: &str) {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(300), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{work} never became Ready"))
            .expect("engine running");
        if u.name != work {
            continue;
        }
        let ks = u.status.resource_status.manifests.get(1);
        if let Some(c) = ks.and_then(|m| find(&m.conditions, "Ready")) {
            assert_ne!(c.reason, "BuildFailed", "{c:?}");
            if c.status == "True" {
                return;
            }
        }
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
    let opts = ClusterOptions {
        extra_apiserver_args: vec!["--service-cluster-ip-range=10.0.0.0/16".into()],
        ..ClusterOptions::spoke()
    };
    let cluster = KubeCluster::start(opts).await.expect("cluster starts");
    let registry = OciRegistry::start().await.expect("registry starts");
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    let config = spokelet::kube_client::cluster_config(Some(&kubeconfig))
        .await
        .unwrap();
    let client =
        spokelet::kube_client::client(config, spokelet::kube_client::HttpVersion::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let url = format!("oci://{}/bench/app", registry.host());
    let artifact = tmp.path().join("artifact");
    write_tree(&artifact, None);
    Registry::new(true, RegistryAuth::Anonymous)
        .push_dir(&url, "v1", &artifact, "bench", "v1")
        .await
        .unwrap();

    let mut cfg = EngineConfig::new(hub_hash("bench-artifacts"), "bench");
    cfg.expander = FluxExpander::for_setting(&FluxObjects::Native {
        cache: tmp.path().join("cache"),
        unpack: UnpackLimits::default(),
        // The registry is plain HTTP on loopback.
        insecure: spokelet::work::flux::InsecureRegistries {
            allow: true,
            hosts: Vec::new(),
        },
    });
    let (tx, src) = mpsc::unbounded_channel();
    let (stx, mut rx) = mpsc::unbounded_channel();
    let engine = WorkEngine::new(client.clone(), cfg, WorkMetrics::default());
    let mut is_ready = engine.ready();
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move { engine.run(src, Arc::new(stx), sd).await.unwrap() });
    tx.send(WorkEvent::Synced(Listing::Complete)).unwrap();
    is_ready.wait_for(|r| *r).await.unwrap();

    let mut engine_walls = Vec::new();
    let mut kubectl_walls = Vec::new();
    for r in 0..ROUNDS {
        let k_ns = format!("kubectl-{r}");
        create_namespace(&client, &k_ns).await.unwrap();
        let k_dir = tmp.path().join(format!("kubectl-{r}"));
        write_tree(&k_dir, Some(&k_ns));
        let (k_wall, _) = kubectl_apply(&kubeconfig, &k_dir);
        kubectl_walls.push(k_wall);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let e_ns = format!("engine-{r}");
        create_namespace(&client, &e_ns).await.unwrap();
        let name = format!("app-{r}");
        let t = Instant::now();
        tx.send(WorkEvent::Upsert(Box::new(flux_work(&name, &url, "v1", &e_ns))))
            .unwrap();
        ready(&mut rx, &name).await;
        engine_walls.push(t.elapsed());
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &e_ns);
        let n = cms.list(&Default::default()).await.unwrap().items.len();
        assert!(
            n >= GROUPS,
            "the engine applied {n} ConfigMaps, expected {GROUPS}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (mut e_sorted, mut k_sorted) = (engine_walls.clone(), kubectl_walls.clone());
    e_sorted.sort();
    k_sorted.sort();
    let (e, k) = (e_sorted[ROUNDS / 2], k_sorted[ROUNDS / 2]);

    let mut lat = Vec::new();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "engine-0");
    for s in 0..DRIFT_SAMPLES {
        let i = s % GROUPS;
        let how = if s % 2 == 0 { Tamper::Edit } else { Tamper::Delete };
        lat.push(drift_sample(&api, &format!("g{i}-cm"), &i.to_string(), how).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat.sort();
    shutdown.cancel();

    let each = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nAn artifact of {} objects: engine (OCIRepository + Kustomization) against kubectl\n",
        GROUPS * 5
    );
    print_table(
        &[
            "measure",
            "engine",
            "kubectl apply --server-side -f DIR",
            "target",
        ],
        &[
            vec![
                format!("cold apply (median of {ROUNDS})"),
                ms(e),
                ms(k),
                String::new(),
            ],
            vec![
                "  each round (ms)".into(),
                each(&engine_walls),
                each(&kubectl_walls),
                String::new(),
            ],
            vec![
                "speed-up (kubectl / engine)".into(),
                format!("{:.1}x", k.as_secs_f64() / e.as_secs_f64()),
                String::new(),
                ">= 3x".into(),
            ],
            vec![
                "drift correction p50 (edit/delete)".into(),
                ms(percentile(&lat, 0.5)),
                String::new(),
                "< 300 ms".into(),
            ],
            vec![
                "drift correction p99".into(),
                ms(percentile(&lat, 0.99)),
                String::new(),
                "< 1000 ms".into(),
            ],
        ],
    );
    registry.stop().await;
    cluster.stop().await;
}
