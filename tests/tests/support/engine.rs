//! The work engine run in-process against the shared spoke, driven through its source channel:
//! what the engine tests and the Flux artifact tests share.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use serde_json::{Value, json};
use spokelet::work::applied_work::{applied_name, hub_hash};
use spokelet::work::conditions::find;
use spokelet::work::engine::{EngineConfig, WorkEngine};
use spokelet::work::manifestwork::{
    AppliedManifestWork, Manifest, ManifestWork, ManifestWorkSpec, ManifestsTemplate,
};
use spokelet::work::metrics::WorkMetrics;
use spokelet::work::{CancellationToken, Listing, StatusUpdate, WorkEvent, WorkRef};
use spokelet_e2e::{eventually, shared_spoke, unique_name};
use tokio::sync::mpsc;

/// A running engine plus the channels a test drives it with.
pub struct Agent {
    pub hub: String,
    pub client: Client,
    pub tx: mpsc::UnboundedSender<WorkEvent>,
    pub status_rx: mpsc::UnboundedReceiver<StatusUpdate>,
    pub latest: HashMap<String, StatusUpdate>,
    pub all: Vec<StatusUpdate>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub metrics: WorkMetrics,
}

pub fn test_config(hub: &str) -> EngineConfig {
    let mut cfg = EngineConfig::new(hub_hash(hub), "e2e-agent");
    cfg.retry_base = Duration::from_millis(200);
    cfg.retry_max = Duration::from_secs(2);
    cfg
}

impl Agent {
    /// An engine whose source has nothing yet (so it is synced from the start).
    pub async fn start(hub: &str) -> Agent {
        let a = Agent::start_with(hub, test_config(hub)).await;
        a.synced();
        a
    }

    pub async fn start_with(hub: &str, cfg: EngineConfig) -> Agent {
        let client = shared_spoke().await.client();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stx, status_rx) = mpsc::unbounded_channel::<StatusUpdate>();
        let metrics = WorkMetrics::default();
        let engine = WorkEngine::new(client.clone(), cfg, metrics.clone());
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            engine
                .run(rx, Arc::new(stx), sd)
                .await
                .expect("engine failed to start");
        });
        Agent {
            hub: hub.to_string(),
            client,
            tx,
            status_rx,
            latest: HashMap::new(),
            all: Vec::new(),
            shutdown,
            task,
            metrics,
        }
    }

    /// Tells the engine the source has delivered everything (call after the initial upserts).
    pub fn synced(&self) {
        self.tx.send(WorkEvent::Synced(Listing::Complete)).unwrap();
    }

    pub fn upsert(&self, w: &ManifestWork) {
        self.tx.send(WorkEvent::Upsert(Box::new(w.clone()))).unwrap();
    }

    pub fn delete(&self, name: &str) {
        self.tx.send(WorkEvent::Delete(WorkRef::named(name))).unwrap();
    }

    pub fn drain(&mut self) {
        while let Ok(u) = self.status_rx.try_recv() {
            self.latest.insert(u.name.clone(), u.clone());
            self.all.push(u);
        }
    }

    /// Waits until the latest status of `work` satisfies `pred` (bounded).
    pub async fn wait(
        &mut self,
        work: &str,
        what: &str,
        pred: impl Fn(&StatusUpdate) -> bool,
    ) -> StatusUpdate {
        let mut last = String::from("no status yet");
        for _ in 0..1500 {
            self.drain();
            if let Some(u) = self.latest.get(work) {
                if pred(u) {
                    return u.clone();
                }
                last = serde_json::to_string_pretty(&u.status).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("work {work}: never reached {what}; last status: {last}");
    }

    pub async fn wait_applied(&mut self, work: &str, generation: i64) -> StatusUpdate {
        self.wait(work, "Applied=True", |u| {
            u.generation == generation
                && find(&u.status.conditions, "Applied")
                    .is_some_and(|c| c.status == "True" && c.observed_generation == generation)
        })
        .await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    pub fn amw_api(&self) -> Api<AppliedManifestWork> {
        Api::all(self.client.clone())
    }

    pub fn amw_name(&self, work: &str) -> String {
        applied_name(&hub_hash(&self.hub), work)
    }
}

pub fn work(name: &str, generation: i64, manifests: Vec<Value>) -> ManifestWork {
    let mut w = ManifestWork::new(
        name,
        ManifestWorkSpec {
            workload: ManifestsTemplate {
                manifests: manifests.into_iter().map(Manifest::from).collect(),
            },
            ..Default::default()
        },
    );
    w.metadata.generation = Some(generation);
    w.metadata.namespace = Some("cluster1".into());
    w
}

pub fn with_configs(mut w: ManifestWork, configs: Value) -> ManifestWork {
    w.spec.manifest_configs = serde_json::from_value(configs).unwrap();
    w
}

pub fn cm(ns: &str, name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data})
}

pub fn deployment(ns: &str, name: &str, image: &str, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
}

pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    spokelet_e2e::create_namespace(client, &name).await.unwrap();
    name
}

pub fn manifest_cond<'a>(
    u: &'a StatusUpdate,
    ordinal: usize,
    t: &str,
) -> &'a spokelet::work::manifestwork::Condition {
    find(&u.status.resource_status.manifests[ordinal].conditions, t)
        .unwrap_or_else(|| panic!("manifest {ordinal} has no {t} condition: {:?}", u.status))
}

/// A manifest's condition, if it has that manifest and condition yet.
pub fn manifest_cond_opt<'a>(
    u: &'a StatusUpdate,
    ordinal: usize,
    t: &str,
) -> Option<&'a spokelet::work::manifestwork::Condition> {
    u.status
        .resource_status
        .manifests
        .iter()
        .find(|m| m.resource_meta.ordinal == ordinal as i32)
        .and_then(|m| find(&m.conditions, t))
}

pub fn feedback(
    u: &StatusUpdate,
    ordinal: usize,
    name: &str,
) -> Option<spokelet::work::manifestwork::FieldValue> {
    u.status.resource_status.manifests[ordinal]
        .status_feedback
        .values
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.field_value.clone())
}

pub async fn get_cm(client: &Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

pub async fn until<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    eventually(what, f).await.unwrap_or_else(|e| panic!("{e}"));
}

/// Waits (bounded) until the ConfigMap `ns/name` is gone.
pub async fn cm_gone(client: &Client, ns: &str, name: &str, what: &str) {
    until(what, || async move {
        if get_cm(client, ns, name).await.is_none() {
            Ok(())
        } else {
            Err("still there".to_string())
        }
    })
    .await;
}

/// An engine config whose executor clients impersonate through the spoke's admin kubeconfig.
pub async fn config_with_executors(hub: &str) -> EngineConfig {
    let path = shared_spoke().await.kubeconfig_path().to_path_buf();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let mut cfg = test_config(hub);
    cfg.executor_clients = Some(spokelet::run::executor_factory(
        &config,
        spokelet::kube_client::HttpVersion::Http1,
        None,
    ));
    cfg
}

/// A ServiceAccount `name` in `ns` allowed `verbs` on ConfigMaps there, and nothing else.
pub fn configmap_executor(ns: &str, name: &str, verbs: &[&str]) -> Vec<Value> {
    executor_with(ns, name, &["configmaps"], verbs)
}

/// A ServiceAccount `name` in `ns` allowed `verbs` on `resources` (core group) there, and nothing else.
pub fn executor_with(ns: &str, name: &str, resources: &[&str], verbs: &[&str]) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": format!("{name}-rights"), "namespace": ns},
               "rules": [{"apiGroups": [""], "resources": resources, "verbs": verbs}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": format!("{name}-rights"), "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("{name}-rights")},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
    ]
}
