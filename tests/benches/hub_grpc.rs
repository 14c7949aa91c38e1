//! Hub transport benchmark: the real `spokelet run --hub-transport grpc` process, the test
//! CloudEvents hub over mutual TLS, and a real kube-apiserver. Prints a table:
//!
//! 1. publish-to-`Applied`-status latency for 1,000 works of 5 objects each (ConfigMap, Secret,
//!    headless Service, ServiceAccount, Deployment), published at a steady 50 works/s, p50/p99;
//!    then all 1,000 updated at once (a burst), p50/p99 and the time until the last is Applied;
//! 2. reconnect-and-resync: the hub restarts; time from it listening again until the agent has
//!    re-subscribed and sent its `spec.resync_request` listing all 1,000 works;
//! 3. the agent's resident memory holding the 1,000 works (now and peak).
//!
//! Latencies are measured at the hub: from the moment a work is handed to the hub's stream to
//! the moment the hub receives the first status with `Applied=True` for that generation.
//! Run with `cargo bench -p spokelet-e2e --bench hub_grpc` (after `tests/env/install.sh`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spokelet_e2e::bench::{
    ms, percentile, print_table, proc_status_kib, resync_listing, spokelet_binary, start_hub_and_agent,
};
use spokelet_e2e::cloudevents_hub::TestHub;
use spokelet_e2e::{ClusterOptions, KubeCluster};

const WORKS: usize = 1000;
const NAMESPACES: usize = 10;
/// Steady publishing rate of the first phase: a busy but realistic hub.
const PACE: Duration = Duration::from_millis(20);
const CLUSTER: &str = "bench-cluster";

fn bundle(i: usize, generation: i64) -> Value {
    let ns = format!("bench-{}", i % NAMESPACES);
    let name = format!("app-{i}");
    let meta = json!({"name": name, "namespace": ns});
    json!({"manifests": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"generation": generation.to_string()}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"token": format!("t-{i}")}},
        // Headless: 1,000 Services would exhaust the test cluster's small service IP range.
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"clusterIP": "None", "selector": {"app": name}, "ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": {"app": name}},
                               "spec": {"containers": [{"name": "c", "image": "registry.invalid/app:1"}]}}}}
    ]})
}

/// Follows the hub's received events and records when each (work uid, generation) was first
/// reported `Applied=True`.
struct AppliedTracker {
    seen: usize,
    applied: HashMap<(String, i64), Instant>,
}

impl AppliedTracker {
    fn poll(&mut self, hub: &TestHub) {
        let new = hub.received_since(self.seen);
        self.seen += new.len();
        for r in new {
            if !r.event.r#type.contains(".status.") {
                continue;
            }
            let (Some(uid), Some(generation)) = (r.ext("resourceid"), r.ext("resourceversion")) else {
                continue;
            };
            let Ok(generation) = generation.parse::<i64>() else {
                continue;
            };
            let applied = r.json().is_some_and(|j| {
                j["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Applied" && c["status"] == "True"))
            });
            if applied {
                self.applied.entry((uid, generation)).or_insert(r.at);
            }
        }
    }

    /// Waits until every (uid, generation) in `published` is Applied; returns the latencies.
    async fn latencies(
        &mut self,
        hub: &TestHub,
        published: &HashMap<(String, i64), Instant>,
    ) -> Vec<Duration> {
        // A hang guard, not a measurement: a stuck run fails loudly instead of never ending.
        let give_up = Instant::now() + Duration::from_secs(600);
        loop {
            self.poll(hub);
            if published.keys().all(|k| self.applied.contains_key(k)) {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "only {} of {} works reached Applied",
                published.keys().filter(|k| self.applied.contains_key(*k)).count(),
                published.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut out: Vec<Duration> = published
            .iter()
            .map(|(k, at)| self.applied[k].saturating_duration_since(*at))
            .collect();
        out.sort();
        out
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(rt) => rt.block_on(bench()),
        Err(e) => panic!("cannot start the runtime: {e}"),
    }
}

async fn bench() {
    let binary = spokelet_binary().unwrap_or_else(|e| panic!("{e}"));
    // No controller-manager: Deployments stay as applied, so nothing but the agent writes.
    let spoke = KubeCluster::start(ClusterOptions {
        controller_manager: false,
        name: "spoke".into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("spoke API server did not start (run tests/env/install.sh): {e}"));
    let admin = spoke.client();
    for n in 0..NAMESPACES {
        let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(admin.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": format!("bench-{n}")}})).unwrap();
        api.create(&kube::api::PostParams::default(), &ns).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let (hub, mut agent) = start_hub_and_agent(&binary, CLUSTER, spoke.kubeconfig_path(), dir.path()).await;
    let pid = agent.id();

    // 1a. Steady publishing.
    let mut tracker = AppliedTracker {
        seen: 0,
        applied: HashMap::new(),
    };
    let mut published = HashMap::new();
    let mut uids = Vec::with_capacity(WORKS);
    let started = Instant::now();
    for i in 0..WORKS {
        let w = hub.upsert_work(CLUSTER, &format!("work-{i}"), bundle(i, 1));
        published.insert((w.uid.clone(), 1), Instant::now());
        uids.push(w.uid);
        tracker.poll(&hub);
        let next = started + PACE * (i as u32 + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    let steady = tracker.latencies(&hub, &published).await;

    // 1b. Burst: every work updated at once.
    let mut burst_published = HashMap::new();
    let burst_start = Instant::now();
    for i in 0..WORKS {
        let w = hub.upsert_work(CLUSTER, &format!("work-{i}"), bundle(i, 2));
        burst_published.insert((w.uid, 2), Instant::now());
    }
    let burst = tracker.latencies(&hub, &burst_published).await;
    let burst_all = burst_published
        .keys()
        .map(|k| tracker.applied[k])
        .max()
        .map_or(Duration::ZERO, |last| last.saturating_duration_since(burst_start));

    // 3. Memory holding the works (settled).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_now = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let rss_peak = proc_status_kib(pid, "VmHWM").unwrap_or(0);

    // 2. Reconnect and resync.
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = hub.received().len();
    let restarted = Instant::now();
    hub.restart().await.unwrap();
    let resync_at = resync_listing(&hub, before, WORKS).await;
    let resync = resync_at.saturating_duration_since(restarted);

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();

    println!("\nspokelet gRPC hub transport, {WORKS} works x 5 objects, real kube-apiserver (v1.20), mTLS\n");
    let rows = vec![
        vec![
            format!("publish -> Applied, steady {} works/s", 1000 / PACE.as_millis()),
            ms(percentile(&steady, 0.5)),
            ms(percentile(&steady, 0.99)),
            "p50 < 50 ms, p99 < 250 ms".into(),
            "Maestro: 0.76-2.2 s at low load".into(),
        ],
        vec![
            format!("publish -> Applied, burst of {WORKS} updates"),
            ms(percentile(&burst, 0.5)),
            ms(percentile(&burst, 0.99)),
            format!("all applied after {} ms", ms(burst_all)),
            "-".into(),
        ],
        vec![
            format!("reconnect + resync ({WORKS} works held)"),
            ms(resync),
            "-".into(),
            "< 2000 ms".into(),
            "-".into(),
        ],
        vec![
            format!("agent RSS holding {WORKS} works (now / peak MiB)"),
            format!("{:.1}", rss_now as f64 / 1024.0),
            format!("{:.1}", rss_peak as f64 / 1024.0),
            "< 64 MiB".into(),
            "-".into(),
        ],
    ];
    print_table(
        &["measurement", "p50 / value", "p99 / peak", "target", "reference"],
        &rows,
    );
    hub.stop().await;
    spoke.stop().await;
}
