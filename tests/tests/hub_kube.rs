//! The Kubernetes-API hub transport against a real hub API server (etcd + kube-apiserver).
//!
//! The agent always talks to the hub with its own client certificate, allowed nothing but the
//! role in `deploy/hub/agent-rbac.yaml`, so these tests also prove that role is enough.
//!
//! Needs the binaries from `tests/env/install.sh`. No wall-clock limits: every wait is a
//! bounded number of checks (`spokelet_e2e::eventually`) that fails saying what it waited for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use spokelet::hub::kube_hub::{
    CLEANUP_FINALIZER, HubSecurity, KubeHub, KubeHubOptions, LEASE_NAME, client_from_kubeconfig,
};
use spokelet::work::manifestwork::{Condition, ManifestWork, ManifestWorkStatus};
use spokelet::work::source::{Listing, StatusSink, StatusUpdate, WorkEvent, WorkSource};
use spokelet_e2e::ocm_hub::{self, start_ocm_hub, start_ocm_hub_with};
use spokelet_e2e::{ClusterOptions, KubeCluster, UserCredentials, eventually, unique_name};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A hub API server with the ManifestWork CRD.
async fn start_hub() -> (KubeCluster, kube::Client) {
    start_ocm_hub()
        .await
        .unwrap_or_else(|e| panic!("hub API server did not start (run tests/env/install.sh): {e}"))
}

/// The cluster namespace, the agent's role from `deploy/hub/agent-rbac.yaml`, and its certificate.
async fn onboard_cluster(hub: &KubeCluster, admin: &kube::Client, cluster: &str) -> UserCredentials {
    ocm_hub::onboard_cluster(hub, admin, cluster)
        .await
        .unwrap_or_else(|e| panic!("onboarding {cluster}: {e}"))
}

/// A hub with one onboarded cluster: what most tests start from.
struct OnboardedHub {
    /// The hub API server (stopped when dropped).
    hub: KubeCluster,
    /// Hub admin client.
    admin: kube::Client,
    /// The cluster's name, which is also its namespace on the hub.
    cluster: String,
    /// The agent's identity on the hub.
    agent_user: UserCredentials,
    /// ManifestWorks in the cluster namespace, as the hub admin sees them.
    works: Api<ManifestWork>,
}

/// Starts a hub and onboards a cluster named from `prefix`.
async fn onboarded_hub(prefix: &str) -> OnboardedHub {
    let (hub, admin) = start_hub().await;
    let cluster = unique_name(prefix);
    let agent_user = onboard_cluster(&hub, &admin, &cluster).await;
    let works = Api::namespaced(admin.clone(), &cluster);
    OnboardedHub {
        hub,
        admin,
        cluster,
        agent_user,
        works,
    }
}

fn work(name: &str, cm: &str) -> ManifestWork {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "work.open-cluster-management.io/v1",
        "kind": "ManifestWork",
        "metadata": {"name": name},
        "spec": {"workload": {"manifests": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm, "namespace": "default"}}
        ]}},
    }))
    .unwrap()
}

fn manifest_names(w: &ManifestWork) -> Vec<String> {
    w.spec
        .workload
        .manifests
        .iter()
        .map(|m| {
            m.value().unwrap()["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn condition(type_: &str, status: &str, reason: &str, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        observed_generation: generation,
        last_transition_time: "2025-01-01T00:00:00Z".into(),
        reason: reason.into(),
        message: format!("{type_} is {status}"),
    }
}

fn update(w: &ManifestWork, conditions: Vec<Condition>, deleted: bool) -> StatusUpdate {
    StatusUpdate {
        name: w.name_any(),
        namespace: w.namespace(),
        uid: w.metadata.uid.clone(),
        generation: w.metadata.generation.unwrap_or(0),
        status: ManifestWorkStatus {
            conditions,
            ..Default::default()
        },
        status_hash: String::new(),
        deleted,
    }
}

/// The next work event, polled a bounded number of times; fails if the source ends.
async fn next_event(source: &mut impl WorkSource, what: &str) -> WorkEvent {
    eventually(what, || {
        let got = match source.next_event().now_or_never() {
            Some(Some(ev)) => Ok(ev),
            Some(None) => panic!("the work source ended while waiting for {what}"),
            None => Err("no event yet"),
        };
        async move { got }
    })
    .await
    .unwrap()
}

async fn next_upsert(source: &mut impl WorkSource, what: &str) -> ManifestWork {
    match next_event(source, what).await {
        WorkEvent::Upsert(w) => *w,
        other => panic!("expected {what} (an upsert), got {other:?}"),
    }
}

/// Waits for the initial `Synced` event, then for the cleanup finalizer on `name` on the hub.
async fn synced_and_finalized(source: &mut impl WorkSource, works: &Api<ManifestWork>, name: &str) {
    assert!(matches!(
        next_event(source, "Synced").await,
        WorkEvent::Synced(Listing::Complete)
    ));
    hub_work(works, name, &format!("the cleanup finalizer on {name}"), |w| {
        w.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
    })
    .await;
}

/// Polls the hub until the work `name` is gone (its finalizer released).
async fn hub_work_gone(works: &Api<ManifestWork>, name: &str, what: &str) {
    eventually(what, || {
        let works = works.clone();
        async move {
            match works.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(w) => Err(format!("still there with finalizers {:?}", w.finalizers())),
            }
        }
    })
    .await
    .unwrap();
}

/// Polls the hub until `check` accepts the work.
async fn hub_work(works: &Api<ManifestWork>, name: &str, what: &str, check: impl Fn(&ManifestWork) -> bool) {
    eventually(what, || {
        let works = works.clone();
        let got = async move { works.get(name).await };
        let check = &check;
        async move {
            let w = got.await.map_err(|e| e.to_string())?;
            if check(&w) {
                Ok(())
            } else {
                Err(format!(
                    "finalizers {:?}, status {:?}",
                    w.finalizers(),
                    w.status.as_ref().map(|s| &s.conditions)
                ))
            }
        }
    })
    .await
    .unwrap();
}

/// Shuts the transport down and waits, a bounded number of checks, for its tasks to end.
async fn stop(shutdown: &CancellationToken, tasks: Vec<JoinHandle<()>>) {
    shutdown.cancel();
    eventually("the transport tasks to stop after shutdown", || {
        let running = tasks.iter().filter(|t| !t.is_finished()).count();
        async move {
            if running == 0 {
                Ok(())
            } else {
                Err(format!("{running} task(s) still running"))
            }
        }
    })
    .await
    .unwrap();
    for t in tasks {
        t.await.expect("a transport task panicked");
    }
}

fn agent_options(client: kube::Client, cluster: &str) -> KubeHubOptions {
    let mut opts = KubeHubOptions::new(client, cluster, "agent-1");
    opts.lease_duration = Duration::from_secs(1);
    opts.retry_max = Duration::from_secs(1);
    opts
}

#[tokio::test]
async fn kube_hub_watches_writes_status_manages_finalizer_and_lease() {
    let OnboardedHub {
        hub: _hub,
        admin,
        cluster,
        agent_user,
        works,
    } = onboarded_hub("cluster").await;
    works
        .create(&PostParams::default(), &work("w1", "a"))
        .await
        .unwrap();

    // The agent authenticates with its own client certificate through a kubeconfig.
    let client = client_from_kubeconfig(agent_user.kubeconfig_path())
        .await
        .unwrap();
    // It is not an administrator: it may not create works, nor read another namespace's.
    let agent_works: Api<ManifestWork> = Api::namespaced(client.clone(), &cluster);
    let denied = agent_works
        .create(&PostParams::default(), &work("mine", "x"))
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "{denied:?}"
    );
    let other: Api<ManifestWork> = Api::namespaced(client.clone(), "default");
    let denied = other.list(&Default::default()).await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "{denied:?}"
    );

    let shutdown = CancellationToken::new();
    let mut agent = KubeHub::start(agent_options(client, &cluster), shutdown.clone());

    // Created on the hub: delivered whole, then Synced.
    let w1 = next_upsert(&mut agent.source, "w1").await;
    assert_eq!(w1.name_any(), "w1");
    assert_eq!(w1.namespace().as_deref(), Some(cluster.as_str()));
    assert_eq!(w1.metadata.generation, Some(1));
    assert_eq!(manifest_names(&w1), ["a"]);
    assert!(w1.metadata.managed_fields.is_none());
    synced_and_finalized(&mut agent.source, &works, "w1").await;

    // Status goes to the status subresource.
    let applied = vec![condition("Applied", "True", "AppliedManifestWorkComplete", 1)];
    agent.sink.publish(update(&w1, applied, false)).await.unwrap();
    hub_work(&works, "w1", "w1's status on the hub", |w| {
        w.status
            .as_ref()
            .and_then(|s| s.conditions.first())
            .map(|c| c.reason.as_str())
            == Some("AppliedManifestWorkComplete")
    })
    .await;

    // The lease is created and renewed.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &cluster);
    let first = eventually("the cluster lease", || {
        let leases = leases.clone();
        async move {
            let spec = leases.get(LEASE_NAME).await.map_err(|e| e.to_string())?.spec;
            spec.ok_or("no spec".to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(first.holder_identity.as_deref(), Some("agent-1"));
    assert_eq!(first.lease_duration_seconds, Some(1));
    assert!(first.renew_time.is_some());
    eventually("a lease renewal", || {
        let leases = leases.clone();
        let before = first.renew_time.clone();
        async move {
            let now = leases
                .get(LEASE_NAME)
                .await
                .map_err(|e| e.to_string())?
                .spec
                .and_then(|s| s.renew_time);
            (now != before).then_some(()).ok_or("not renewed yet".to_string())
        }
    })
    .await
    .unwrap();

    // Updated on the hub: delivered again with the new generation. (Our own status and
    // finalizer writes, echoed by the watch, were not: this is the next event.)
    let mut changed = works.get("w1").await.unwrap();
    changed.spec = work("w1", "b").spec;
    works
        .replace("w1", &PostParams::default(), &changed)
        .await
        .unwrap();
    let w1 = next_upsert(&mut agent.source, "w1 generation 2").await;
    assert_eq!(w1.metadata.generation, Some(2));
    assert_eq!(manifest_names(&w1), ["b"]);

    // Deleted on the hub: the finalizer holds the work until our final status.
    works.delete("w1", &DeleteParams::default()).await.unwrap();
    match next_event(&mut agent.source, "the delete of w1").await {
        WorkEvent::Delete(r) => assert_eq!(r.name, "w1"),
        other => panic!("expected the delete of w1, got {other:?}"),
    }
    let held = works
        .get("w1")
        .await
        .expect("the finalizer keeps w1 until cleanup is done");
    assert!(held.metadata.deletion_timestamp.is_some());
    // A status while cleanup runs is still written (the object is terminating, not gone).
    let deleting = vec![condition("Deleting", "True", "ManifestsDeleting", 2)];
    agent.sink.publish(update(&w1, deleting, false)).await.unwrap();
    hub_work(
        &works,
        "w1",
        "w1's Deleting status on the terminating work",
        |w| {
            w.status
                .as_ref()
                .and_then(|s| s.conditions.first())
                .map(|c| c.type_.as_str())
                == Some("Deleting")
        },
    )
    .await;
    let gone = vec![
        condition("Deleting", "False", "ManifestsDeleted", 2),
        condition("Deleted", "True", "ManifestsDeleted", 2),
    ];
    agent.sink.publish(update(&w1, gone, true)).await.unwrap();
    hub_work_gone(&works, "w1", "w1 to disappear after its final status").await;

    stop(&shutdown, agent.tasks).await;
}

/// A status the hub refuses must not hold a deleted work forever, nor other works' statuses.
#[tokio::test]
async fn kube_hub_releases_a_deleted_work_whose_final_status_the_hub_rejects() {
    let OnboardedHub {
        hub: _hub,
        admin: _admin,
        cluster,
        agent_user,
        works,
    } = onboarded_hub("cluster-rejected").await;
    for name in ["bad", "good"] {
        works
            .create(&PostParams::default(), &work(name, name))
            .await
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    let client = agent_user.client();
    let mut agent = KubeHub::start(agent_options(client, &cluster), shutdown.clone());
    let mut delivered = Vec::new();
    loop {
        match next_event(&mut agent.source, "the initial works").await {
            WorkEvent::Upsert(w) => delivered.push(*w),
            WorkEvent::Synced(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    delivered.sort_by_key(|w| w.name_any());
    let [bad, good] = &delivered[..] else {
        panic!("expected two works, got {delivered:?}")
    };
    for name in ["bad", "good"] {
        hub_work(&works, name, &format!("the cleanup finalizer on {name}"), |w| {
            w.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
        })
        .await;
    }

    // "Maybe" is not a condition status the CRD allows: the hub answers 422 whatever we retry.
    works.delete("bad", &DeleteParams::default()).await.unwrap();
    match next_event(&mut agent.source, "the delete of bad").await {
        WorkEvent::Delete(r) => assert_eq!(r.name, "bad"),
        other => panic!("expected the delete of bad, got {other:?}"),
    }
    let invalid = vec![condition("Deleted", "Maybe", "ManifestsDeleted", 1)];
    agent.sink.publish(update(bad, invalid, true)).await.unwrap();
    let applied = vec![condition("Applied", "True", "AppliedManifestWorkComplete", 1)];
    agent.sink.publish(update(good, applied, false)).await.unwrap();
    hub_work(
        &works,
        "good",
        "good's status, queued behind bad's rejected one",
        |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty()),
    )
    .await;
    hub_work_gone(
        &works,
        "bad",
        "bad to be released although the hub rejected its final status",
    )
    .await;
    stop(&shutdown, agent.tasks).await;
}

/// Works the agent cannot read are skipped; the watch goes on delivering the others.
#[tokio::test]
async fn kube_hub_reports_malformed_works_as_unreadable_and_keeps_watching() {
    let OnboardedHub {
        hub: _hub,
        admin,
        cluster,
        agent_user,
        works,
    } = onboarded_hub("cluster-malformed").await;
    let raw: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &cluster,
        &kube::api::ApiResource::erase::<ManifestWork>(&()),
    );
    let create_raw = |value: serde_json::Value| {
        let raw = raw.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            raw.create(&PostParams::default(), &obj).await
        }
    };
    let api_version = "work.open-cluster-management.io/v1";

    // A manifest that is not an object never reaches the agent: the CRD refuses it.
    let refused = create_raw(serde_json::json!({
        "apiVersion": api_version, "kind": "ManifestWork", "metadata": {"name": "not-an-object"},
        "spec": {"workload": {"manifests": ["just a string"]}},
    }))
    .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422),
        "{refused:?}"
    );
    // No spec at all: the CRD allows it, the agent cannot use it.
    create_raw(serde_json::json!({
        "apiVersion": api_version, "kind": "ManifestWork", "metadata": {"name": "a-no-spec"},
    }))
    .await
    .unwrap();
    // A status entry without resourceMeta (the CRD allows it): the work itself is fine.
    works
        .create(&PostParams::default(), &work("b-odd-status", "odd"))
        .await
        .unwrap();
    let odd = serde_json::json!({"status": {"resourceStatus": {"manifests": [
        {"conditions": [{"type": "Applied", "status": "True", "reason": "Somebody", "message": "else"}]}
    ]}}});
    raw.patch_status("b-odd-status", &PatchParams::default(), &Patch::Merge(&odd))
        .await
        .unwrap();
    works
        .create(&PostParams::default(), &work("c-good", "good"))
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let mut agent = KubeHub::start(agent_options(agent_user.client(), &cluster), shutdown.clone());
    let mut names = Vec::new();
    let mut unreadable = Vec::new();
    loop {
        match next_event(&mut agent.source, "the initial works").await {
            WorkEvent::Upsert(w) => names.push(w.name_any()),
            // Known but unreadable: the engine leaves its objects alone and reports why.
            WorkEvent::Unreadable { work, reason, .. } => {
                assert!(work.uid.is_some(), "an unreadable work is named by uid too");
                assert!(reason.contains("spec"), "{reason}");
                unreadable.push(work.name);
            }
            WorkEvent::Synced(listing) => {
                assert_eq!(listing, Listing::Complete, "a list is complete evidence");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    names.sort();
    assert_eq!(names, ["b-odd-status", "c-good"]);
    assert_eq!(unreadable, ["a-no-spec"]);

    // Still watching: a new work, and a change of the unreadable one into a readable one.
    works
        .create(&PostParams::default(), &work("d-later", "later"))
        .await
        .unwrap();
    let later = next_upsert(&mut agent.source, "d-later").await;
    assert_eq!(later.name_any(), "d-later");
    let fixed = serde_json::json!({"spec": {"workload": {"manifests": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fixed", "namespace": "default"}}
    ]}}});
    raw.patch("a-no-spec", &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .unwrap();
    let fixed = next_upsert(&mut agent.source, "a-no-spec once it has a spec").await;
    assert_eq!(fixed.name_any(), "a-no-spec");
    assert_eq!(manifest_names(&fixed), ["fixed"]);
    hub_work(
        &works,
        "a-no-spec",
        "the cleanup finalizer once the work is readable",
        |w| w.finalizers().iter().any(|f| f == CLEANUP_FINALIZER),
    )
    .await;
    stop(&shutdown, agent.tasks).await;
}

/// A TCP forwarder to the hub that can be taken down (connections cut, port closed) and
/// brought back on the same port: the hub "going away" without becoming a different hub.
struct Gate {
    port: u16,
    target: String,
    open: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Gate {
    /// A gate on a free port, closed (connections refused).
    async fn closed(target: &str) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        Gate {
            port,
            target: target.to_string(),
            open: None,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    async fn open(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let cut = CancellationToken::new();
        let (target, token) = (self.target.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let (target, token) = (target.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        self.open = Some((cut, task));
    }

    /// Cuts every connection and closes the port.
    async fn close(&mut self) {
        if let Some((cut, task)) = self.open.take() {
            cut.cancel();
            task.await.unwrap();
        }
    }
}

/// The hub is down when the agent starts, comes up, goes away mid-watch and comes back.
#[tokio::test]
async fn kube_hub_waits_for_a_dead_hub_and_recovers_when_it_returns() {
    let OnboardedHub {
        hub,
        admin,
        cluster,
        agent_user,
        works,
    } = onboarded_hub("cluster-outage").await;
    works
        .create(&PostParams::default(), &work("w1", "a"))
        .await
        .unwrap();
    let target = hub.server_url().trim_start_matches("https://").to_string();
    let mut gate = Gate::closed(&target).await;
    let client = agent_user.client_for(&gate.url(), hub.ca_pem()).unwrap();
    let shutdown = CancellationToken::new();
    let mut agent = KubeHub::start(agent_options(client, &cluster), shutdown.clone());

    // Dead hub: a few checks in which the source yields nothing and no task ends.
    let mut quiet = 0;
    let still_down = spokelet_e2e::eventually_with(
        "the transport to keep retrying a dead hub",
        10,
        spokelet_e2e::POLL_INTERVAL,
        || {
            let polled = agent.source.next_event().now_or_never();
            let ended = agent.tasks.iter().filter(|t| t.is_finished()).count();
            assert!(
                polled.is_none(),
                "the source yielded {polled:?} with the hub down"
            );
            assert_eq!(ended, 0, "a transport task ended with the hub down");
            quiet += 1;
            let done = quiet >= 5;
            async move { if done { Ok(()) } else { Err("checking") } }
        },
    )
    .await;
    still_down.unwrap();

    // The hub appears: everything flows.
    gate.open().await;
    assert_eq!(
        next_upsert(&mut agent.source, "w1 once the hub is up")
            .await
            .name_any(),
        "w1"
    );
    assert!(matches!(
        next_event(&mut agent.source, "Synced").await,
        WorkEvent::Synced(Listing::Complete)
    ));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &cluster);
    eventually("the cluster lease once the hub is up", || {
        let leases = leases.clone();
        async move { leases.get(LEASE_NAME).await.map(drop).map_err(|e| e.to_string()) }
    })
    .await
    .unwrap();

    // The hub goes away mid-watch; a work is created meanwhile; the hub comes back.
    gate.close().await;
    works
        .create(&PostParams::default(), &work("w2", "b"))
        .await
        .unwrap();
    gate.open().await;
    assert_eq!(
        next_upsert(&mut agent.source, "w2 after the outage")
            .await
            .name_any(),
        "w2"
    );
    hub_work(&works, "w2", "the cleanup finalizer on w2", |w| {
        w.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
    })
    .await;

    stop(&shutdown, agent.tasks).await;
    gate.close().await;
}

/// Audit policy for the hub: one line (at `ResponseStarted` for watches, `ResponseComplete`
/// for the rest) with the user, verb and object of every request.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
";

/// A hub (as [`start_hub`]) whose API server writes an audit log into `dir`; returns its path.
async fn start_audited_hub(dir: &Path) -> (KubeCluster, kube::Client, PathBuf) {
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY).unwrap();
    let log = dir.join("audit.log");
    let options = ClusterOptions {
        extra_apiserver_args: vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", log.display()),
        ],
        ..ClusterOptions::hub()
    };
    let (hub, admin) = start_ocm_hub_with(options)
        .await
        .unwrap_or_else(|e| panic!("hub API server did not start (run tests/env/install.sh): {e}"));
    (hub, admin, log)
}

/// One request as the hub's audit log records it.
#[derive(Debug)]
struct AuditedRequest {
    /// Who made it: the common name of the client certificate it came with.
    user: String,
    /// `get`, `list`, `watch`, `update`, `patch`, ...
    verb: String,
    /// The resource, with `/subresource` when there is one.
    resource: String,
    /// The object's name; empty for lists and watches.
    name: String,
}

/// Every request the audit log records in `namespace` (a line still being written is skipped).
fn audited_requests(log: &Path, namespace: &str) -> Vec<AuditedRequest> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["objectRef"]["namespace"] == namespace)
        .map(|event| {
            let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let object = &event["objectRef"];
            let mut resource = field(&object["resource"]);
            if let Some(sub) = object["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            AuditedRequest {
                user: field(&event["user"]["username"]),
                verb: field(&event["verb"]),
                resource,
                name: field(&object["name"]),
            }
        })
        .collect()
}

/// Waits until the audit log holds a request in `namespace` that `matches`.
async fn audited(log: &Path, namespace: &str, what: &str, matches: impl Fn(&AuditedRequest) -> bool) {
    eventually(what, || {
        let requests = audited_requests(log, namespace);
        let found = requests.iter().any(&matches);
        async move {
            if found {
                Ok(())
            } else {
                Err(format!("{} audited requests, none matching", requests.len()))
            }
        }
    })
    .await
    .unwrap();
}

/// Replaces `path` the way a Secret volume or cert-manager does: written aside, renamed over.
fn replace_file(path: &Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// The client certificate files are rotated on disk while the agent runs: new requests move to
/// the new certificate, the watch carries on, and nothing reaches the engine again.
///
/// How the test tells the certificates apart: the rotated certificate is issued for another user
/// name (`<group>:agent-rotated`) in the same group, which `deploy/hub/agent-rbac.yaml` binds, so
/// both are allowed; the hub's audit log names the user of every request, so it shows which
/// certificate each one came with. That is deterministic: the lease is renewed every second, and
/// the first renewal after the files change must open a new connection with the new certificate
/// (no waiting for a connection to break, and no wall-clock limit: bounded polls only).
/// "The watch was not dropped" is shown by the work created after the rotation arriving as the
/// next event with no watch or list of works ever made with the new certificate; "nothing
/// re-applied" by no other event reaching the engine.
#[tokio::test]
async fn kube_hub_follows_client_certificate_rotation_without_dropping_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, admin, audit_log) = start_audited_hub(dir.path()).await;
    let cluster = unique_name("cluster-rotation");
    let first = onboard_cluster(&hub, &admin, &cluster).await;
    let group = format!("system:open-cluster-management:{cluster}");
    let rotated = hub
        .issue_user(&format!("{group}:agent-rotated"), &[&group])
        .unwrap();
    assert_ne!(first.cert_pem, rotated.cert_pem);

    // The kubeconfig names the certificate and key by paths relative to itself.
    let hub_dir = dir.path().join("hub");
    std::fs::create_dir(&hub_dir).unwrap();
    let (cert_file, key_file) = (hub_dir.join("tls.crt"), hub_dir.join("tls.key"));
    std::fs::write(&cert_file, &first.cert_pem).unwrap();
    std::fs::write(&key_file, &first.key_pem).unwrap();
    use base64::Engine as _;
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "hub", "cluster": {
            "server": hub.server_url(),
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(hub.ca_pem()),
        }}],
        "users": [{"name": "agent", "user": {"client-certificate": "tls.crt", "client-key": "tls.key"}}],
        "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent"}}],
        "current-context": "hub",
    });
    let kubeconfig_path = hub_dir.join("hub.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string()).unwrap();

    let works: Api<ManifestWork> = Api::namespaced(admin.clone(), &cluster);
    works
        .create(&PostParams::default(), &work("w1", "a"))
        .await
        .unwrap();
    let client = client_from_kubeconfig(&kubeconfig_path).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut agent = KubeHub::start(agent_options(client, &cluster), shutdown.clone());
    assert_eq!(next_upsert(&mut agent.source, "w1").await.name_any(), "w1");
    synced_and_finalized(&mut agent.source, &works, "w1").await;
    let is_lease_renewal =
        |user: &str, r: &AuditedRequest| r.user == user && r.resource == "leases" && r.verb == "update";
    audited(
        &audit_log,
        &cluster,
        "a lease renewal with the first certificate",
        |r| is_lease_renewal(&first.common_name, r),
    )
    .await;
    let before = audited_requests(&audit_log, &cluster);
    assert!(before.iter().all(|r| r.user != rotated.common_name), "{before:?}");

    // Rotation: key, then certificate, each replaced whole. In between the pair does not match;
    // the agent keeps the old certificate until it does.
    replace_file(&key_file, &rotated.key_pem);
    replace_file(&cert_file, &rotated.cert_pem);

    audited(
        &audit_log,
        &cluster,
        "a lease renewal with the rotated certificate",
        |r| is_lease_renewal(&rotated.common_name, r),
    )
    .await;
    // The watch is still there: a work created now is the next event, so nothing before it
    // (w1 again) reached the engine.
    works
        .create(&PostParams::default(), &work("w2", "b"))
        .await
        .unwrap();
    let w2 = next_upsert(&mut agent.source, "w2, created after the rotation").await;
    assert_eq!(w2.name_any(), "w2");
    // Status and finalizer writes go with the new certificate too.
    let applied = vec![condition("Applied", "True", "AppliedManifestWorkComplete", 1)];
    agent.sink.publish(update(&w2, applied, false)).await.unwrap();
    hub_work(&works, "w2", "w2's status and finalizer on the hub", |w| {
        w.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
            && w.status.as_ref().is_some_and(|s| !s.conditions.is_empty())
    })
    .await;
    audited(
        &audit_log,
        &cluster,
        "w2's status written with the rotated certificate",
        |r| r.user == rotated.common_name && r.resource == "manifestworks/status" && r.name == "w2",
    )
    .await;
    let requests = audited_requests(&audit_log, &cluster);
    let rewatched: Vec<&AuditedRequest> = requests
        .iter()
        .filter(|r| r.resource == "manifestworks" && matches!(r.verb.as_str(), "watch" | "list"))
        .filter(|r| r.user == rotated.common_name)
        .collect();
    assert!(
        rewatched.is_empty(),
        "the watch was re-established after the rotation: {rewatched:?}"
    );
    // Nothing else reached the engine: no work was re-delivered, so nothing is re-applied.
    let extra = agent.source.next_event().now_or_never();
    assert!(extra.is_none(), "unexpected event after the rotation: {extra:?}");

    stop(&shutdown, agent.tasks).await;
}

/// A TLS server on loopback that speaks only TLS 1.2 and answers every request with a canned
/// `/version`, as an old hub would: its certificate for 127.0.0.1 signed by `ca`.
async fn tls12_only_server(ca: &spokelet_e2e::pki::CertificateAuthority) -> (u16, JoinHandle<()>) {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serving = ca.issue_server("old-hub", &["127.0.0.1"]).unwrap();
    let chain: Vec<_> = rustls_pemfile::certs(&mut serving.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut serving.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = r#"{"major":"1","minor":"20","gitVersion":"v1.20.2"}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, task)
}

/// The hub is offered TLS 1.3 only by default: a hub that speaks only TLS 1.2 fails the real
/// handshake, and is reached once `--hub-min-tls-version 1.2` allows it.
#[tokio::test]
async fn a_tls_12_only_hub_is_refused_unless_tls_12_is_allowed() {
    use base64::Engine as _;
    let ca = spokelet_e2e::pki::CertificateAuthority::new("old-hub-ca").unwrap();
    let (port, server) = tls12_only_server(&ca).await;
    let identity = ca
        .issue_client_now("system:open-cluster-management:c1:agent", &[])
        .unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "hub", "cluster": {
            "server": format!("https://127.0.0.1:{port}"), "certificate-authority-data": b64(ca.cert_pem())}}],
        "users": [{"name": "agent", "user": {
            "client-certificate-data": b64(&identity.cert_pem), "client-key-data": b64(&identity.key_pem)}}],
        "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent"}}],
        "current-context": "hub",
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).unwrap();
    let config = spokelet::hub::kube_hub::config_from_kubeconfig(&path)
        .await
        .unwrap();

    let strict = spokelet::hub::kube_hub::hub_client(config.clone(), &path, HubSecurity::default()).unwrap();
    let err = strict
        .apiserver_version()
        .await
        .expect_err("a TLS 1.2-only hub must be refused");
    let chain = format!("{err:?}");
    assert!(
        chain.contains("ProtocolVersion") || chain.contains("protocol"),
        "{chain}"
    );

    let relaxed = HubSecurity {
        allow_tls12: true,
        ..HubSecurity::default()
    };
    let client = spokelet::hub::kube_hub::hub_client(config, &path, relaxed).unwrap();
    let version = client.apiserver_version().await.expect("TLS 1.2 allowed");
    assert_eq!(version.git_version, "v1.20.2");
    server.abort();
}
