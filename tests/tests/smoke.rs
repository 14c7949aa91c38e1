//! Smoke tests of the real-server harness: a real API server, controller-manager and OCI
//! registry behave as the later end-to-end tests rely on.
//!
//! Nothing here asserts on elapsed time. Asynchronous effects are polled with bounded
//! retries ([`eventually`]); watch reads carry a hang guard of minutes that only turns a
//! broken watch into a failure instead of a stuck test run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use sha2::{Digest as _, Sha256};
use spokelet_e2e::ocm_hub::crd_established;
use spokelet_e2e::{
    ClusterOptions, KubeCluster, OciRegistry, UserCredentials, eventually, shared_spoke, unique_name,
};
use spokelet_e2e::{LayoutBlob, skopeo, write_oci_layout};

const FIELD_MANAGER: &str = "spokelet-e2e-smoke";
/// Only protects against a watch that never delivers: far beyond any slow machine.
const WATCH_HANG_GUARD: Duration = Duration::from_secs(300);

/// A fresh namespace on `cluster` for one test.
async fn namespace(cluster: &KubeCluster, prefix: &str) -> String {
    let name = unique_name(prefix);
    let namespaces: Api<Namespace> = Api::all(cluster.client());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    name
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..ConfigMap::default()
    }
}

/// A server-side apply of a ConfigMap (apiVersion/kind set, as apply requires).
async fn apply_config_map(api: &Api<ConfigMap>, name: &str, data: &[(&str, &str)]) -> ConfigMap {
    let mut value = serde_json::to_value(config_map(name, data)).unwrap();
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&value))
        .await
        .unwrap()
}

/// The next watch event, failing the test (instead of hanging it) if the watch is dead.
async fn next_event<S>(stream: &mut S) -> watcher::Event<ConfigMap>
where
    S: Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    match tokio::time::timeout(WATCH_HANG_GUARD, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => panic!("watch stream ended"),
        Err(_) => panic!("no watch event within the hang guard: the watch is not delivering"),
    }
}

/// Reads watch events until an added/modified ConfigMap `name` satisfies `wanted`,
/// skipping at most `max_events` others.
async fn wait_for_applied<S>(
    stream: &mut S,
    name: &str,
    max_events: usize,
    wanted: impl Fn(&ConfigMap) -> bool,
) -> ConfigMap
where
    S: Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    for _ in 0..max_events {
        match next_event(stream).await {
            watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)
                if cm.metadata.name.as_deref() == Some(name) && wanted(&cm) =>
            {
                return cm;
            }
            other => seen.push(format!("{other:?}")),
        }
    }
    panic!("no matching event for {name} among {max_events} events: {seen:#?}");
}

fn data_value<'a>(cm: &'a ConfigMap, key: &str) -> Option<&'a str> {
    cm.data.as_ref()?.get(key).map(String::as_str)
}

fn api_status(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test]
async fn server_side_apply_is_observed_through_a_watch() {
    let spoke = shared_spoke().await;
    let ns = namespace(spoke, "ssa-watch").await;
    let api: Api<ConfigMap> = Api::namespaced(spoke.client(), &ns);
    let name = "watched";

    let mut events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .boxed();
    // The watch is established once the (empty) initial list is done; applying before
    // that could fold the object into the initial list, which is not what we test here.
    loop {
        match next_event(&mut events).await {
            watcher::Event::InitDone => break,
            watcher::Event::Init => {}
            other => panic!("unexpected event before InitDone: {other:?}"),
        }
    }

    let created = apply_config_map(&api, name, &[("colour", "blue")]).await;
    let managers: Vec<_> = created
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert!(managers.contains(&FIELD_MANAGER), "managers: {managers:?}");

    let seen = wait_for_applied(&mut events, name, 5, |cm| {
        data_value(cm, "colour") == Some("blue")
    })
    .await;
    assert_eq!(seen.metadata.uid, created.metadata.uid);

    apply_config_map(&api, name, &[("colour", "green")]).await;
    let seen = wait_for_applied(&mut events, name, 5, |cm| {
        data_value(cm, "colour") == Some("green")
    })
    .await;
    assert_eq!(seen.metadata.uid, created.metadata.uid, "modified in place");
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let spoke = shared_spoke().await;
    assert!(spoke.has_controller_manager());
    let ns = namespace(spoke, "gc").await;
    let api: Api<ConfigMap> = Api::namespaced(spoke.client(), &ns);

    let owner = api
        .create(&PostParams::default(), &config_map("owner", &[("role", "owner")]))
        .await
        .unwrap();
    let mut dependent = config_map("dependent", &[("role", "dependent")]);
    dependent.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        ..OwnerReference::default()
    }]);
    api.create(&PostParams::default(), &dependent).await.unwrap();
    // An unowned bystander must survive.
    api.create(&PostParams::default(), &config_map("bystander", &[]))
        .await
        .unwrap();

    api.delete("owner", &DeleteParams::background()).await.unwrap();

    eventually("the garbage collector deletes the dependent ConfigMap", || {
        let api = api.clone();
        async move {
            match api.get_opt("dependent").await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("dependent still exists".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    assert!(api.get_opt("bystander").await.unwrap().is_some());
}

#[tokio::test]
async fn deleted_namespace_is_emptied_and_removed() {
    let spoke = shared_spoke().await;
    let ns = namespace(spoke, "ns-delete").await;
    let api: Api<ConfigMap> = Api::namespaced(spoke.client(), &ns);
    apply_config_map(&api, "content", &[("k", "v")]).await;

    let namespaces: Api<Namespace> = Api::all(spoke.client());
    namespaces.delete(&ns, &DeleteParams::default()).await.unwrap();
    eventually("the namespace controller finishes deleting the namespace", || {
        let namespaces = namespaces.clone();
        let ns = ns.clone();
        async move {
            match namespaces.get_opt(&ns).await {
                Ok(None) => Ok(()),
                Ok(Some(n)) => Err(format!("phase {:?}", n.status.and_then(|s| s.phase))),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn hub_and_spoke_are_isolated_and_certificates_are_checked() {
    let spoke = shared_spoke().await;
    let hub = KubeCluster::start(ClusterOptions::hub()).await.unwrap();
    assert_ne!(hub.server_url(), spoke.server_url());
    assert_ne!(hub.ca_pem(), spoke.ca_pem());

    // Objects are isolated: same namespace and name, different content.
    let name = unique_name("isolated");
    let hub_cms: Api<ConfigMap> = Api::namespaced(hub.client(), "default");
    let spoke_cms: Api<ConfigMap> = Api::namespaced(spoke.client(), "default");
    apply_config_map(&hub_cms, &name, &[("side", "hub")]).await;
    assert!(spoke_cms.get_opt(&name).await.unwrap().is_none());
    apply_config_map(&spoke_cms, &name, &[("side", "spoke")]).await;
    let on_hub = hub_cms.get(&name).await.unwrap();
    assert_eq!(data_value(&on_hub, "side"), Some("hub"));
    spoke_cms.delete(&name, &DeleteParams::default()).await.unwrap();

    // A hub user authenticates on the hub (RBAC then says no: it has no permissions).
    let alice = hub.issue_user("alice", &[]).unwrap();
    let err = Api::<Namespace>::all(alice.client())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(
        api_status(&err),
        Some(403),
        "authenticated but unauthorised: {err}"
    );

    // Its kubeconfig (hub CA) aimed at the spoke: the spoke's serving certificate is not
    // signed by the hub CA, so TLS fails before any request is made.
    let wrong_ca = alice.client_for(&spoke.server_url(), hub.ca_pem()).unwrap();
    let err = Api::<Namespace>::all(wrong_ca)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), None, "expected a TLS failure, got {err}");
    let chain = error_chain(&err);
    assert!(
        chain.contains("certificate") || chain.contains("UnknownIssuer"),
        "expected a certificate error: {chain}"
    );

    // Trusting the spoke's CA gets through TLS, but the spoke does not accept a client
    // certificate from the hub's client CA.
    let foreign_cert = alice.client_for(&spoke.server_url(), spoke.ca_pem()).unwrap();
    let err = Api::<Namespace>::all(foreign_cert)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(401), "{err}");

    // An expired certificate from the right CA is refused too.
    let day = Duration::from_secs(24 * 60 * 60);
    let now = SystemTime::now();
    let expired = spoke
        .issue_user_with_validity("expired-admin", &["system:masters"], now - 2 * day, now - day)
        .unwrap();
    let err = Api::<Namespace>::all(expired.client())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(401), "{err}");

    // Groups come from the certificate's organisations and RBAC acts on them.
    check_group_rbac(&hub).await;

    // Stopping the hub kills every one of its processes and removes its files.
    let pids = hub.pids();
    let dir = hub.dir().to_path_buf();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver");
    hub.stop().await;
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} survived stop()");
    }
    assert!(!dir.exists(), "{} survived stop()", dir.display());
}

async fn check_group_rbac(hub: &KubeCluster) {
    let role = unique_name("list-namespaces");
    let group = unique_name("readers");
    Api::<ClusterRole>::all(hub.client())
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: ObjectMeta {
                    name: Some(role.clone()),
                    ..ObjectMeta::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["namespaces".into()]),
                    verbs: vec!["list".into()],
                    ..PolicyRule::default()
                }]),
                ..ClusterRole::default()
            },
        )
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(hub.client())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(role.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: role.clone(),
                },
                subjects: Some(vec![Subject {
                    kind: "Group".into(),
                    name: group.clone(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .unwrap();

    // The bound group second, so both organisations must make it into the certificate.
    let member: UserCredentials = hub.issue_user("bob", &["other-team", &group]).unwrap();
    let outsider = hub.issue_user("carol", &["other-team"]).unwrap();
    eventually("a member of the bound group may list namespaces", || {
        let api = Api::<Namespace>::all(member.client());
        async move { api.list(&ListParams::default()).await.map(|_| ()) }
    })
    .await
    .unwrap();
    let err = Api::<Namespace>::all(outsider.client())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(403), "{err}");
}

/// Every message in an error's source chain, for matching on the TLS cause.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{err}");
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(&format!(" / {e} ({e:?})"));
        source = e.source();
    }
    text
}

/// Running (not gone, not a zombie waiting to be reaped by an init that may never do it).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

#[tokio::test]
async fn admin_kubeconfig_works_with_kubectl() {
    let spoke = shared_spoke().await;
    let Some(kubectl) = find_on_path("kubectl") else {
        eprintln!("kubectl not on PATH: skipping the kubectl check of the kubeconfig");
        return;
    };
    let output = tokio::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(spoke.kubeconfig_path())
        .args(["get", "namespace", "default", "-o", "name"])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "namespace/default"
    );
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[tokio::test]
async fn registry_accepts_an_image_from_skopeo() {
    let registry = OciRegistry::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (manifest_digest, layer_digest) = write_image_layout(&layout, work.path());

    let reference = format!("docker://{}/test/x:v1", registry.host());
    let copy = skopeo(&[
        "copy".to_string(),
        // Without it skopeo compresses the uncompressed layer and rewrites the manifest.
        "--preserve-digests".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("oci:{}:v1", layout.display()),
        reference.clone(),
    ])
    .await;
    assert!(copy.0, "skopeo copy failed: {}", copy.1);

    let inspect = skopeo(&["inspect".to_string(), "--tls-verify=false".to_string(), reference]).await;
    assert!(inspect.0, "skopeo inspect failed: {}", inspect.1);
    let info: serde_json::Value = serde_json::from_str(&inspect.1).unwrap();
    // The registry serves exactly the manifest we wrote.
    assert_eq!(info["Digest"], format!("sha256:{manifest_digest}"), "{info:#}");
    assert_eq!(info["Os"], "linux", "{info:#}");
    assert_eq!(
        info["Layers"],
        serde_json::json!([format!("sha256:{layer_digest}")]),
        "{info:#}"
    );

    let dir = registry.dir().to_path_buf();
    registry.stop().await;
    assert!(!dir.exists());
}

/// Writes a one-layer OCI image layout tagged `v1` at `layout` and returns the sha256 (hex)
/// of the manifest and of the layer.
fn write_image_layout(layout: &Path, scratch: &Path) -> (String, String) {
    // A layer with one file, made by tar(1); the config needs the uncompressed digest.
    let content = scratch.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from spokelet-e2e\n").unwrap();
    let tar = std::process::Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--mtime=@0", "-C"])
        .arg(&content)
        .args(["-cf", "-", "hello.txt"])
        .output()
        .unwrap();
    assert!(tar.status.success(), "tar failed");
    let diff_id = hex::encode(Sha256::digest(&tar.stdout));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    }))
    .unwrap();
    let (manifest, layers) = write_oci_layout(
        layout,
        "v1",
        LayoutBlob {
            media_type: "application/vnd.oci.image.config.v1+json",
            bytes: &config,
        },
        &[LayoutBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar",
            bytes: &tar.stdout,
        }],
    );
    (manifest, layers[0].clone())
}

/// Set by [`servers_die_with_the_test_process`] for the copy of this binary it starts.
const ORPHAN_HELPER_ENV: &str = "SPOKELET_E2E_ORPHAN_HELPER";

/// Not a test on its own: [`servers_die_with_the_test_process`] runs this binary again with
/// only this test and [`ORPHAN_HELPER_ENV`] set, and kills it once the cluster is up.
#[tokio::test]
#[ignore = "helper process for servers_die_with_the_test_process"]
async fn orphan_helper() {
    if std::env::var_os(ORPHAN_HELPER_ENV).is_none() {
        return;
    }
    let cluster = KubeCluster::start(ClusterOptions {
        name: "orphan".into(),
        ..ClusterOptions::hub()
    })
    .await
    .unwrap();
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    println!("READY {} {}", cluster.dir().display(), pids.join(" "));
    // Wait to be killed; the cluster is deliberately never dropped.
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn servers_die_with_the_test_process() {
    use tokio::io::AsyncBufReadExt as _;

    let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_helper", "--ignored", "--nocapture"])
        .env(ORPHAN_HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(helper.stdout.take().unwrap()).lines();
    let ready = loop {
        match lines.next_line().await.unwrap() {
            Some(line) if line.starts_with("READY ") => break line,
            Some(_) => {}
            None => panic!(
                "helper exited before its cluster was ready: {:?}",
                helper.wait().await
            ),
        }
    };
    let mut words = ready.split_whitespace().skip(1);
    let cluster_dir = std::path::PathBuf::from(words.next().unwrap());
    let run_dir = cluster_dir.parent().unwrap().to_path_buf();
    let pids: Vec<u32> = words.map(|w| w.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver: {ready}");
    assert!(pids.iter().all(|&pid| process_alive(pid)));

    // SIGKILL: no destructor, no atexit handler runs in the helper.
    helper.kill().await.unwrap();

    eventually("the killed process's servers die with it", || {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        async move {
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {alive:?}"))
            }
        }
    })
    .await
    .unwrap();
    eventually("the janitor removes the killed process's run directory", || {
        let result = if run_dir.exists() {
            Err(format!("{} still exists", run_dir.display()))
        } else {
            Ok(())
        };
        async move { result }
    })
    .await
    .unwrap();
}

/// Custom resources go through code paths (schema coercion of object metadata) that the
/// built-in types do not; an API server built with a mismatched toolchain crashed there.
#[tokio::test]
async fn custom_resources_can_be_created_applied_and_listed() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

    let spoke = shared_spoke().await;
    // Cluster-scoped names are shared by every test on this cluster: make the group unique.
    let group = format!("{}.e2e.spokelet.test", unique_name("crd"));
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "properties": {
                            "size": { "type": "integer" },
                            "tags": { "type": "object", "additionalProperties": { "type": "string" } },
                        },
                    }},
                }},
            }],
        },
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(spoke.client());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let crd_name = format!("widgets.{group}");
    crd_established(&spoke.client(), &crd_name).await.unwrap();

    let ns = namespace(spoke, "crs").await;
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(&group, "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(spoke.client(), &ns, &resource);
    for i in 0..5 {
        let name = format!("w{i}");
        let widget = serde_json::json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": {
                "name": name,
                "labels": { "app": "spokelet", "index": i.to_string(), "tier": "e2e" },
                "annotations": { "a": "1", "b": "2", "c": "3", "d": "4" },
            },
            "spec": { "size": i, "tags": { "x": "1", "y": "2", "z": "3" } },
        });
        // eventually: discovery of a just-established CRD can lag on the serving side.
        eventually("a custom resource can be applied", || {
            let widgets = widgets.clone();
            let widget = widget.clone();
            let name = name.clone();
            async move {
                // A crashed API server is a failure, not something to wait out.
                spoke.check_running().unwrap();
                widgets
                    .patch(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&widget))
                    .await
                    .map(|_| ())
            }
        })
        .await
        .unwrap();
    }
    let listed = widgets
        .list(&ListParams::default().labels("app=spokelet"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 5);
    assert_eq!(listed.items[3].data["spec"]["size"], 3);
}
