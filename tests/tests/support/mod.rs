//! What the whole-agent tests share: the agent run in-process from a command line, a gRPC hub
//! identity on disk, and readers of the statuses a hub received.
#![allow(dead_code)] // Each test binary uses its own subset.

pub mod engine;

use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use spokelet::admin::{Health, RunContext};
use spokelet::config::{Cli, Command};
use spokelet_e2e::cloudevents_hub::{HubPki, Received, TestHub};
use spokelet_e2e::unique_name;

/// The latest status the hub received for `work`, if it satisfies `pred`.
pub fn latest_status(hub: &TestHub, uid: &str, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
    let statuses: Vec<Received> = hub
        .statuses()
        .into_iter()
        .filter(|r| r.ext("resourceid").as_deref() == Some(uid))
        .collect();
    let Some(last) = statuses.last() else {
        return Err("no status for the work yet".into());
    };
    let json = last.json().ok_or("status event without JSON data")?;
    if pred(&json) {
        Ok(json)
    } else {
        Err(format!("latest status: {json}"))
    }
}

pub fn condition(status: &Value, type_: &str) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// A fresh namespace on the spoke for one test's objects.
pub async fn spoke_namespace(client: &kube::Client, prefix: &str) -> String {
    let ns = unique_name(prefix);
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    ns
}

/// Sends the agents' log lines (info and above, `SPOKELET_TEST_LOG` to change) to the output of
/// the test that runs them: the test harness keeps it per test and shows it only when the test
/// fails, so a failure in CI comes with what the agent was doing.
fn capture_agent_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter =
            std::env::var("SPOKELET_TEST_LOG").unwrap_or_else(|_| "spokelet=info,spokelet_work=info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

/// The whole agent running in-process from a command line, as `spokelet` would run it.
pub struct Agent {
    /// Readiness as `/readyz` reports it.
    pub health: Health,
    /// Plays SIGTERM.
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), spokelet::daemon::DaemonError>>,
}

impl Agent {
    /// Parses `argv` with the real CLI (a `run` or `node` command) and starts the agent.
    pub fn start<S: AsRef<str>>(argv: &[S]) -> Agent {
        capture_agent_logs();
        let argv: Vec<&str> = argv.iter().map(AsRef::as_ref).collect();
        let ctx = RunContext::new();
        let health = ctx.health.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let trigger = async {
            let _ = stopped.await;
        };
        let run: futures::future::BoxFuture<'static, _> = match Cli::load_from(&argv).unwrap().command {
            Command::Run(cmd) => Box::pin(spokelet::daemon::run_until(*cmd, ctx, trigger)),
            Command::Node(cmd) => Box::pin(spokelet::daemon::node_until(*cmd, ctx, trigger)),
            _ => panic!("not the run or node command: {argv:?}"),
        };
        // An agent that ends by itself is said at once, on the test's output: a test waiting
        // for something from it then fails with the cause beside its own message, instead of
        // only timing out.
        let line = argv.join(" ");
        let task = tokio::spawn(async move {
            let ended = run.await;
            if let Err(e) = &ended {
                eprintln!("AGENT ENDED WITH AN ERROR ({line}): {e}");
            }
            ended
        });
        Agent { health, stop, task }
    }

    /// Waits for the agent to end by itself (a fatal error) and returns how it ended.
    pub async fn ended(self) -> Result<(), spokelet::daemon::DaemonError> {
        self.task.await.unwrap()
    }

    /// Signals shutdown and checks the agent drained cleanly.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits until ConfigMap `name` in `cms` has `model` = `want` (`None`: until it is gone).
pub async fn until_model(cms: &Api<ConfigMap>, name: &str, want: Option<&str>) {
    spokelet_e2e::eventually(
        &format!("ConfigMap {name} with model={want:?} on the spoke"),
        || {
            let cms = cms.clone();
            async move {
                let cm = cms.get_opt(name).await.map_err(|e| e.to_string())?;
                let model = cm.map(|c| c.data.and_then(|d| d.get("model").cloned()));
                match (model, want) {
                    (None, None) => Ok(()),
                    (Some(Some(m)), Some(w)) if m == w => Ok(()),
                    (other, _) => Err(format!("found {other:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
}

/// Waits until the hub object `name` in `api` is gone (its finalizers released).
pub async fn until_gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    spokelet_e2e::eventually(what, || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(o) => Err(format!("still there, finalizers {:?}", o.meta().finalizers)),
            }
        }
    })
    .await
    .unwrap();
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Files and flags for `spokelet run --hub-transport grpc` against a test hub, as cluster
/// `cluster` with a client certificate from `pki`.
pub struct GrpcAgentArgs {
    /// Holds the certificate files for as long as the agent runs.
    _dir: tempfile::TempDir,
    argv: Vec<String>,
}

impl GrpcAgentArgs {
    pub fn new(pki: &HubPki, hub: &TestHub, cluster: &str, kubeconfig: &Path) -> Self {
        let identity = pki
            .client(cluster, &["system:open-cluster-management:managed-clusters"])
            .unwrap();
        let args = Self::to(
            &hub.url(),
            pki.serving_ca.cert_pem(),
            &identity,
            cluster,
            kubeconfig,
        );
        args.with_agent_id(cluster)
    }

    /// The flags for the gRPC hub at `url` whose serving CA is `ca_pem`, as `identity`.
    pub fn to(
        url: &str,
        ca_pem: &str,
        identity: &spokelet_e2e::pki::CertAndKey,
        cluster: &str,
        kubeconfig: &Path,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "ca.crt", ca_pem);
        let cert = write(dir.path(), "tls.crt", &identity.cert_pem);
        let key = write(dir.path(), "tls.key", &identity.key_pem);
        let argv = [
            "spokelet",
            "run",
            "--hub-transport",
            "grpc",
            "--hub-url",
            url,
            "--hub-ca-file",
            &ca,
            "--hub-client-cert-file",
            &cert,
            "--hub-client-key-file",
            &key,
            "--cluster-name",
            cluster,
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--admin-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        GrpcAgentArgs { _dir: dir, argv }
    }

    /// With `--agent-id` set.
    fn with_agent_id(mut self, id: &str) -> Self {
        self.argv.extend(["--agent-id".to_string(), id.to_string()]);
        self
    }

    /// The command line with `extra` flags appended.
    pub fn with(&self, extra: &[&str]) -> Vec<String> {
        let mut v = self.argv.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// Creates an object of `res` (in `namespace`, if any) from JSON; a failure fails the test.
pub async fn create_object(
    client: &kube::Client,
    res: &kube::api::ApiResource,
    namespace: Option<&str>,
    obj: Value,
) {
    let api: Api<kube::api::DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, res),
        None => Api::all_with(client.clone(), res),
    };
    let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("creating a {}: {e}", res.kind));
}

/// What [`placed`] made: the ManagedClusterSet and the namespace its binding and the
/// Placement `models` are in.
pub struct Placed {
    pub set: String,
    pub namespace: String,
}

/// Does what a platform team does to roll out to `cluster` with OCM: a ManagedClusterSet with
/// the cluster in it, its binding in a new namespace and a Placement `models` there; waits
/// until the placement controller selects the cluster (it skips clusters OCM's taint
/// controller marks unreachable, so this also proves `Available`).
pub async fn placed(admin: &kube::Client, cluster: &str) -> Placed {
    use spokelet_e2e::ocm::{CLUSTER_GROUP, managed_clusters, resource};
    let create = |client, res: kube::api::ApiResource, namespace, obj| async move {
        create_object(client, &res, namespace, obj).await
    };
    let set = unique_name("gpu-pools");
    let namespace = unique_name("rollouts");
    spokelet_e2e::create_namespace(admin, &namespace).await.unwrap();
    create(admin, resource(CLUSTER_GROUP, "v1beta2", "ManagedClusterSet", "managedclustersets"), None,
        json!({"apiVersion": "cluster.open-cluster-management.io/v1beta2", "kind": "ManagedClusterSet",
               "metadata": {"name": set}, "spec": {"clusterSelector": {"selectorType": "ExclusiveClusterSetLabel"}}})).await;
    managed_clusters(admin)
        .patch(
            cluster,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
            "metadata": {"labels": {"cluster.open-cluster-management.io/clusterset": set}}})),
        )
        .await
        .unwrap();
    create(
        admin,
        resource(
            CLUSTER_GROUP,
            "v1beta2",
            "ManagedClusterSetBinding",
            "managedclustersetbindings",
        ),
        Some(&namespace),
        json!({"apiVersion": "cluster.open-cluster-management.io/v1beta2", "kind": "ManagedClusterSetBinding",
               "metadata": {"name": set, "namespace": namespace}, "spec": {"clusterSet": set}}),
    )
    .await;
    create(
        admin,
        resource(CLUSTER_GROUP, "v1beta1", "Placement", "placements"),
        Some(&namespace),
        json!({"apiVersion": "cluster.open-cluster-management.io/v1beta1", "kind": "Placement",
               "metadata": {"name": "models", "namespace": namespace}, "spec": {"clusterSets": [set]}}),
    )
    .await;
    let decisions: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &namespace,
        &resource(
            CLUSTER_GROUP,
            "v1beta1",
            "PlacementDecision",
            "placementdecisions",
        ),
    );
    spokelet_e2e::eventually("the Placement to select the cluster", || {
        let decisions = decisions.clone();
        async move {
            let list = decisions
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let chosen: Vec<String> = list
                .items
                .iter()
                .flat_map(|d| {
                    d.data["status"]["decisions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|d| d["clusterName"].as_str().map(str::to_string))
                .collect();
            chosen
                .iter()
                .any(|c| c == cluster)
                .then_some(())
                .ok_or(format!("decisions: {chosen:?}"))
        }
    })
    .await
    .unwrap();
    Placed { set, namespace }
}
