//! Many-works benchmark: the real `spokelet run --hub-transport grpc` holding 5,000 works of 2
//! objects (a ConfigMap and a Secret) from the test CloudEvents hub, on a real kube-apiserver.
//! Prints a table:
//!
//! 1. time until all 5,000 works are reported `Applied`, beside two floors measured in the same
//!    run: the raw-create floor (the same 10,000 objects created directly, 96 at a time) and the
//!    OCM-shaped floor (the same plus, per work, its AppliedManifestWork record created and its
//!    status written, objects owned by it, with label-selected watches open: what any agent
//!    keeping OCM's record and watching for drift must send);
//! 2. the agent's resident memory holding them (now and peak);
//! 3. reconnect + resync: the hub restarts; time from it listening again until the agent has
//!    re-subscribed and sent its `spec.resync_request` listing all 5,000 works, and until the
//!    hub has answered it (its re-sent works acknowledged with statuses);
//! 4. drift correction while holding them: 100 ConfigMaps edited by hand one at a time, time
//!    from the edit to the agent's correction, p50/p99.
//!
//! Run with `cargo bench -p spokelet-e2e --bench many_works` (after `tests/env/install.sh`).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use spokelet_e2e::bench::{
    Mark, Tamper, drift_sample, ms, ocm_shaped_floor, percentile, print_costs, print_table, proc_cpu,
    proc_status_kib, raw_creates, resync_listing, spokelet_binary, start_hub_and_agent,
};
use spokelet_e2e::cloudevents_hub::TestHub;
use spokelet_e2e::{ClusterOptions, KubeCluster};

const WORKS: usize = 5000;
const NAMESPACES: usize = 20;
const DRIFT_SAMPLES: usize = 100;
const CLUSTER: &str = "bench-cluster";
/// Concurrency of the raw-API floor, the agent's default manifest concurrency.
const FLOOR_CONCURRENCY: usize = 96;

fn objects(i: usize, ns: &str) -> Vec<Value> {
    let meta = json!({"name": format!("app-{i}"), "namespace": ns});
    vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"index": i.to_string()}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"token": format!("t-{i}")}}),
    ]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(rt) => rt.block_on(bench()),
        Err(e) => panic!("cannot start the runtime: {e}"),
    }
}

async fn namespaces(client: &kube::Client, prefix: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    for n in 0..NAMESPACES {
        let ns = serde_json::from_value(json!({"metadata": {"name": format!("{prefix}-{n}")}})).unwrap();
        api.create(&PostParams::default(), &ns).await.unwrap();
    }
}

/// The raw-create floor: the same objects created straight through the API,
/// `FLOOR_CONCURRENCY` at a time.
async fn raw_floor(client: &kube::Client) -> Duration {
    namespaces(client, "floor").await;
    let creates = (0..WORKS).flat_map(|i| objects(i, &format!("floor-{}", i % NAMESPACES)));
    let t = Instant::now();
    raw_creates(client, creates.collect(), FLOOR_CONCURRENCY).await;
    t.elapsed()
}

/// The OCM-shaped floor ([`ocm_shaped_floor`]): per work its record, its objects and the
/// record's status, `FLOOR_CONCURRENCY` works at a time, with the drift watches open.
async fn ocm_floor(client: &kube::Client) -> Duration {
    namespaces(client, "ocm").await;
    spokelet::work::applied_work::install_crd(client).await.unwrap();
    let crd = spokelet::work::applied_work::CRD_NAME;
    spokelet::work::applied_work::wait_established(client, crd, Duration::from_secs(60))
        .await
        .unwrap();
    let works = (0..WORKS)
        .map(|i| objects(i, &format!("ocm-{}", i % NAMESPACES)))
        .collect();
    let t = Instant::now();
    ocm_shaped_floor(client, works, "ocm-floor", FLOOR_CONCURRENCY).await;
    t.elapsed()
}

/// Statuses with `Applied=True` the hub has received since event `from`, by resource id.
fn applied_since(hub: &TestHub, from: usize) -> std::collections::HashSet<String> {
    hub.received_since(from)
        .into_iter()
        .filter(|r| r.event.r#type.contains(".status."))
        .filter(|r| {
            r.json().is_some_and(|j| {
                j["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Applied" && c["status"] == "True"))
            })
        })
        .filter_map(|r| r.ext("resourceid"))
        .collect()
}

async fn bench() {
    let binary = spokelet_binary().unwrap_or_else(|e| panic!("{e}"));
    let spoke = KubeCluster::start(ClusterOptions {
        controller_manager: false,
        name: "spoke".into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("spoke API server did not start (run tests/env/install.sh): {e}"));
    let admin = spoke.client();
    let server = spoke.pids();
    let floor = raw_floor(&admin).await;
    let mark = Mark::take(&admin, &server).await;
    let bench_cpu = proc_cpu(0).unwrap_or_default();
    let ocm = ocm_floor(&admin).await;
    let ocm_bench_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(bench_cpu);
    let ocm_cost = mark.since(&admin, &server).await;
    namespaces(&admin, "many").await;

    let dir = tempfile::tempdir().unwrap();
    let (hub, mut agent) = start_hub_and_agent(&binary, CLUSTER, spoke.kubeconfig_path(), dir.path()).await;
    let pid = agent.id();

    // 1. All works at once.
    let mark = Mark::take(&admin, &server).await;
    let (agent_cpu, bench_cpu) = (proc_cpu(pid).unwrap_or_default(), proc_cpu(0).unwrap_or_default());
    let t = Instant::now();
    for i in 0..WORKS {
        let ns = format!("many-{}", i % NAMESPACES);
        hub.upsert_work(
            CLUSTER,
            &format!("work-{i}"),
            json!({"manifests": objects(i, &ns)}),
        );
    }
    let give_up = Instant::now() + Duration::from_secs(900);
    // Read incrementally: rescanning every status each poll would cost the machine more CPU
    // than the agent under test.
    let (mut applied, mut seen) = (std::collections::HashSet::new(), 0);
    while applied.len() < WORKS {
        assert!(Instant::now() < give_up, "not every work was applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let total = hub.received_count();
        applied.extend(applied_since(&hub, seen));
        seen = total;
    }
    let all_applied = t.elapsed();
    let agent_cpu = proc_cpu(pid).unwrap_or_default().saturating_sub(agent_cpu);
    // The test hub and this benchmark's polling share the process.
    let bench_cpu = proc_cpu(0).unwrap_or_default().saturating_sub(bench_cpu);
    let apply_cost = mark.since(&admin, &server).await;

    // 2. Memory, settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_now = proc_status_kib(pid, "VmRSS").unwrap_or(0);

    // 4. Drift while holding them (before the restart, so the watches are warm).
    let mut lat = Vec::with_capacity(DRIFT_SAMPLES);
    for s in 0..DRIFT_SAMPLES {
        let i = (s * 49) % WORKS;
        let api: Api<ConfigMap> = Api::namespaced(admin.clone(), &format!("many-{}", i % NAMESPACES));
        let name = format!("app-{i}");
        lat.push(drift_sample(&api, &name, &i.to_string(), Tamper::Edit).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat.sort();

    // 3. Reconnect and resync.
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = hub.received().len();
    let restarted = Instant::now();
    hub.restart().await.unwrap();
    let resync_at = resync_listing(&hub, before, WORKS).await;
    let resync = resync_at.saturating_duration_since(restarted);
    let rss_peak = proc_status_kib(pid, "VmHWM").unwrap_or(0);

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();

    println!("\nspokelet holding {WORKS} works x 2 objects (gRPC hub, mTLS), real kube-apiserver (v1.20)\n");
    let rows = vec![
        vec![
            format!("all {WORKS} works Applied"),
            ms(all_applied),
            format!("raw-create floor, {} creates: {} ms", WORKS * 2, ms(floor)),
            "-".into(),
        ],
        vec![
            "OCM-shaped floor: + records, owner refs, watches".into(),
            ms(ocm),
            format!(
                "agent / OCM-shaped floor: {:.2}x",
                all_applied.as_secs_f64() / ocm.as_secs_f64()
            ),
            "-".into(),
        ],
        vec![
            "agent RSS (settled / peak MiB)".into(),
            format!("{:.1}", rss_now as f64 / 1024.0),
            format!("{:.1}", rss_peak as f64 / 1024.0),
            "< 150 MiB".into(),
        ],
        vec![
            format!("reconnect + resync request ({WORKS} works listed)"),
            ms(resync),
            "-".into(),
            "< 3000 ms".into(),
        ],
        vec![
            format!("drift correction p50 / p99 ({DRIFT_SAMPLES} edits)"),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            "p99 < 100 ms".into(),
        ],
    ];
    print_table(&["measurement", "value", "peak / reference", "target"], &rows);
    print_costs(
        &format!(
            "API server during the apply: agent CPU {:.2} s, hub + benchmark {:.2} s; OCM-shaped floor client {:.2} s",
            agent_cpu.as_secs_f64(),
            bench_cpu.as_secs_f64(),
            ocm_bench_cpu.as_secs_f64()
        ),
        &[("agent", &apply_cost), ("OCM floor", &ocm_cost)],
    );
    hub.stop().await;
    spoke.stop().await;
}
