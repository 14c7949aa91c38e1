//! Joining the real OCM hub with a bootstrap credential, as OCM's registration agent does:
//! spokelet creates its ManagedCluster (naming the spoke's API server) and a certificate
//! request with OCM's subject, waits for an admin to approve it and to accept the cluster, runs
//! from the certificate the hub's signer issued (kept in a Secret), and a restart reuses it.

use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use spokelet_e2e::ocm::{OcmHub, OcmHubOptions, condition_status, managed_clusters};
use spokelet_e2e::{ClusterOptions, eventually, shared_spoke, unique_name};

mod support;
use support::{Agent, spoke_namespace, until_model};

/// The cluster's certificate requests on the hub.
async fn requests(hub: &kube::Client, cluster: &str) -> Vec<CertificateSigningRequest> {
    let api: Api<CertificateSigningRequest> = Api::all(hub.clone());
    api.list(&ListParams::default().labels(&format!("open-cluster-management.io/cluster-name={cluster}")))
        .await
        .unwrap()
        .items
}

/// Sends updates of work `renewed-model` (models `<prefix>1`, `<prefix>2`, ...), each waited
/// for on the spoke, until `done` holds after one; returns how many were sent.
async fn updates_until<F, Fut>(
    works: &Api<kube::api::DynamicObject>,
    cms: &Api<ConfigMap>,
    manifests: &impl Fn(&str) -> serde_json::Value,
    prefix: &str,
    mut done: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for version in 1..=400 {
        let model = format!("{prefix}{version}");
        works
            .patch(
                "renewed-model",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"workload": {"manifests": manifests(&model)}}})),
            )
            .await
            .unwrap();
        until_model(cms, "renewed-model", Some(&model)).await;
        if done().await {
            return version;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{prefix}: still not done after 400 work updates");
}

/// Waits until the hub's ManagedCluster `cluster` is `ManagedClusterJoined` and
/// `ManagedClusterConditionAvailable`, `how` naming the case for a failure.
async fn until_joined_and_available(clusters: &Api<kube::api::DynamicObject>, cluster: &str, how: &str) {
    eventually(
        &format!("the cluster Joined and Available {how}"),
        || async move {
            let mc = clusters.get_opt(cluster).await.map_err(|e| e.to_string())?;
            let status = |type_| mc.as_ref().and_then(|mc| condition_status(mc, type_));
            let (joined, available) = (
                status("ManagedClusterJoined"),
                status("ManagedClusterConditionAvailable"),
            );
            (joined.as_deref() == Some("True") && available.as_deref() == Some("True"))
                .then_some(())
                .ok_or(format!("joined {joined:?}, available {available:?}"))
        },
    )
    .await
    .unwrap();
}

/// The hub's ManifestWorks of `cluster`.
fn hub_works(admin: &kube::Client, cluster: &str) -> Api<kube::api::DynamicObject> {
    Api::namespaced_with(
        admin.clone(),
        cluster,
        &spokelet_e2e::ocm::resource(
            spokelet_e2e::ocm::WORK_GROUP,
            "v1",
            "ManifestWork",
            "manifestworks",
        ),
    )
}

/// The manifests of work `renewed-model`: one ConfigMap in `works_ns` holding `model`.
fn model_manifests(works_ns: &str, model: &str) -> serde_json::Value {
    json!([{"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "renewed-model", "namespace": works_ns}, "data": {"model": model}}])
}

/// Creates work `renewed-model` (model `v0`) on the hub and waits for it on the spoke;
/// returns the spoke's ConfigMaps in `works_ns`.
async fn start_renewed_model(
    works: &Api<kube::api::DynamicObject>,
    cluster: &str,
    spoke: &kube::Client,
    works_ns: &str,
) -> Api<ConfigMap> {
    let work: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
        "metadata": {"name": "renewed-model", "namespace": cluster},
        "spec": {"workload": {"manifests": model_manifests(works_ns, "v0")}}
    }))
    .unwrap();
    works.create(&Default::default(), &work).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(spoke.clone(), works_ns);
    until_model(&cms, "renewed-model", Some("v0")).await;
    cms
}

/// The real OCM hub whose API server signs client certificates for `signing` at most, its
/// registration controller run with `registration_args`.
async fn signing_hub(name: &str, signing: Duration, registration_args: Vec<String>) -> OcmHub {
    OcmHub::start(OcmHubOptions {
        registration_args,
        cluster: ClusterOptions {
            name: name.into(),
            controller_manager: true,
            csr_signing: Some(signing),
            ..ClusterOptions::hub()
        },
        ..OcmHubOptions::default()
    })
    .await
    .unwrap()
}

/// Where a joining agent's files are and who it is.
#[derive(Clone, Copy)]
struct Joiner<'a> {
    bootstrap: &'a std::path::Path,
    spoke_kubeconfig: &'a std::path::Path,
    cluster: &'a str,
    agent_ns: &'a str,
}

impl Joiner<'_> {
    /// `spokelet run` on the Kubernetes hub with the bootstrap credential, as agent `spokelet`,
    /// writing its credentials to `dir`.
    fn argv(&self, dir: &std::path::Path) -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        [
            "spokelet",
            "run",
            "--hub-transport",
            "kube",
            "--bootstrap-hub-kubeconfig",
            &path(self.bootstrap),
            "--hub-credentials-dir",
            &path(dir),
            "--cluster-name",
            self.cluster,
            "--agent-id",
            "spokelet",
            "--agent-namespace",
            self.agent_ns,
            "--kubeconfig",
            &path(self.spoke_kubeconfig),
            "--admin-addr",
            "127.0.0.1:0",
            "--pool-report",
            "false",
        ]
        .map(String::from)
        .to_vec()
    }
}

#[tokio::test]
async fn spokelet_joins_a_stock_ocm_hub_with_a_bootstrap_credential_and_a_restart_reuses_its_certificate() {
    let hub = signing_hub("ocm-hub-join", Duration::from_secs(3600), Vec::new()).await;
    let admin = hub.client();
    let spoke = shared_spoke().await;
    let agent_ns = spoke_namespace(&spoke.client(), "join-agent").await;
    let works_ns = spoke_namespace(&spoke.client(), "join-works").await;
    let cluster = unique_name("joined");
    let bootstrap = hub
        .issue_bootstrap("system:bootstrap:spokelet-e2e")
        .await
        .unwrap();
    let credentials = tempfile::tempdir().unwrap();
    let joiner = Joiner {
        bootstrap: bootstrap.kubeconfig_path(),
        spoke_kubeconfig: spoke.kubeconfig_path(),
        cluster: &cluster,
        agent_ns: &agent_ns,
    };
    let agent = Agent::start(&joiner.argv(credentials.path()));

    // It made its ManagedCluster, naming the spoke's API server, and asks for a certificate.
    let clusters = managed_clusters(&admin);
    let csr_name = eventually("the agent's certificate request", || {
        let (admin, cluster) = (admin.clone(), cluster.clone());
        async move {
            let found = requests(&admin, &cluster).await;
            found
                .first()
                .and_then(|c| c.metadata.name.clone())
                .ok_or_else(|| "none yet".to_string())
        }
    })
    .await
    .unwrap();
    let mc = clusters.get(&cluster).await.unwrap();
    assert_eq!(
        mc.data["spec"]["managedClusterClientConfigs"][0]["url"].as_str(),
        Some(spoke.server_url().trim_end_matches('/')),
        "{:?}",
        mc.data["spec"]
    );
    assert!(mc.data["spec"]["managedClusterClientConfigs"][0]["caBundle"].is_string());
    let csr = requests(&admin, &cluster).await.remove(0);
    assert_eq!(csr.spec.signer_name, "kubernetes.io/kube-apiserver-client");
    assert_eq!(
        csr.spec.username.as_deref(),
        Some("system:bootstrap:spokelet-e2e")
    );

    // Nothing is kept until the hub signs.
    let secrets: Api<Secret> = Api::namespaced(spoke.client(), &agent_ns);
    assert!(secrets.get_opt("hub-kubeconfig-secret").await.unwrap().is_none());

    // The admin approves (`kubectl certificate approve`) and accepts the cluster.
    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    csrs.patch_approval(
        &csr_name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"conditions": [{"type": "Approved", "status": "True",
            "reason": "AdminApproved", "message": "approved by the test"}]}}),
        ),
    )
    .await
    .unwrap();
    eventually("the hub credentials kept in the Secret", || {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt("hub-kubeconfig-secret")
                .await
                .map_err(|e| e.to_string())?
                .map(drop)
                .ok_or_else(|| "no Secret yet".to_string())
        }
    })
    .await
    .unwrap();
    clusters
        .patch(
            &cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hubAcceptsClient": true, "leaseDurationSeconds": 5}})),
        )
        .await
        .unwrap();
    until_joined_and_available(&clusters, &cluster, "after approval and acceptance").await;

    // Works reach it with the issued certificate.
    let works = hub_works(&admin, &cluster);
    let work = |model: &str| -> kube::api::DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
            "metadata": {"name": "joined-model", "namespace": cluster},
            "spec": {"workload": {"manifests": [{"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "joined-model", "namespace": works_ns}, "data": {"model": model}}]}}
        }))
        .unwrap()
    };
    works.create(&Default::default(), &work("llama")).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(spoke.client(), &works_ns);
    until_model(&cms, "joined-model", Some("llama")).await;
    agent.stop().await;

    // A restart runs from the kept certificate: no new request, works still flow.
    let again = tempfile::tempdir().unwrap();
    let agent = Agent::start(&joiner.argv(again.path()));
    works
        .patch(
            "joined-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workload": {"manifests": [{"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "joined-model", "namespace": works_ns}, "data": {"model": "mistral"}}]}}})),
        )
        .await
        .unwrap();
    until_model(&cms, "joined-model", Some("mistral")).await;
    assert_eq!(
        requests(&admin, &cluster).await.len(),
        1,
        "no second certificate request"
    );
    assert!(again.path().join("tls.crt").exists());
    agent.stop().await;

    // Bad input: a bootstrap file that is not a kubeconfig, and a request the hub denies. Each
    // ends the agent with an error naming it, and nothing is kept.
    let broken = credentials.path().join("broken.kubeconfig");
    std::fs::write(&broken, "clusters: [unclosed\n").unwrap();
    let bad = Joiner {
        bootstrap: &broken,
        ..joiner
    }
    .argv(tempfile::tempdir().unwrap().path());
    let err = Agent::start(&bad)
        .ended()
        .await
        .expect_err("a broken bootstrap file");
    assert!(err.to_string().contains("bootstrap kubeconfig"), "{err}");

    let denied_ns = spoke_namespace(&spoke.client(), "join-denied").await;
    let denied_cluster = unique_name("denied");
    let denied_argv = Joiner {
        cluster: &denied_cluster,
        agent_ns: &denied_ns,
        ..joiner
    }
    .argv(tempfile::tempdir().unwrap().path());
    let denied = Agent::start(&denied_argv);
    let name = eventually("the second cluster's request", || {
        let (admin, cluster) = (admin.clone(), denied_cluster.clone());
        async move {
            requests(&admin, &cluster)
                .await
                .first()
                .and_then(|c| c.metadata.name.clone())
                .ok_or_else(|| "none yet".to_string())
        }
    })
    .await
    .unwrap();
    csrs.patch_approval(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"conditions": [{"type": "Denied", "status": "True",
            "reason": "NotOurs", "message": "this pool is not expected"}]}}),
        ),
    )
    .await
    .unwrap();
    let err = denied.ended().await.expect_err("a denied request");
    assert!(
        err.to_string().contains("denied certificate request") && err.to_string().contains("NotOurs"),
        "{err}"
    );
    let kept: Api<Secret> = Api::namespaced(spoke.client(), &denied_ns);
    assert!(
        kept.get_opt("hub-kubeconfig-secret").await.unwrap().is_none(),
        "nothing kept"
    );
    hub.stop().await;
}

/// With OCM's auto-approval for the bootstrap user, the join needs no one: the cluster is
/// `Available` moments after start. The hub signs for a short time; spokelet renews with a
/// fifth of the lifetime left, in its own name (OCM approves renewals of accepted clusters),
/// and works keep flowing across the switch. A certificate the hub stops taking (401) sends it
/// back to the bootstrap credential, and it joins again by itself.
#[tokio::test]
async fn an_auto_approved_join_renews_its_short_lived_certificate_while_works_flow() {
    let bootstrap_user = "system:bootstrap:spokelet-renew";
    let hub = signing_hub(
        "ocm-hub-renew",
        Duration::from_secs(90),
        vec![
            "--feature-gates=ManagedClusterAutoApproval=true".into(),
            format!("--auto-approved-csr-users={bootstrap_user}"),
        ],
    )
    .await;
    let admin = hub.client();
    let spoke = shared_spoke().await;
    let agent_ns = spoke_namespace(&spoke.client(), "renew-agent").await;
    let works_ns = spoke_namespace(&spoke.client(), "renew-works").await;
    let cluster = unique_name("renewed");
    let bootstrap = hub.issue_bootstrap(bootstrap_user).await.unwrap();
    let credentials = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let joiner = Joiner {
        bootstrap: bootstrap.kubeconfig_path(),
        spoke_kubeconfig: spoke.kubeconfig_path(),
        cluster: &cluster,
        agent_ns: &agent_ns,
    };
    let agent = Agent::start(&joiner.argv(credentials.path()));
    let clusters = managed_clusters(&admin);
    until_joined_and_available(&clusters, &cluster, "without anyone approving").await;
    println!("start to Available, auto-approved: {:?}", started.elapsed());

    let works = hub_works(&admin, &cluster);
    let manifests = |model: &str| model_manifests(&works_ns, model);
    let cms = start_renewed_model(&works, &cluster, &spoke.client(), &works_ns).await;
    let first_cert = std::fs::read(credentials.path().join("tls.crt")).unwrap();

    // Works keep coming while the certificate nears its renewal.
    let version = updates_until(&works, &cms, &manifests, "v", || async {
        requests(&admin, &cluster).await.len() >= 2
            && std::fs::read(credentials.path().join("tls.crt")).unwrap() != first_cert
    })
    .await;
    println!("renewed after {:?} and {version} work updates", started.elapsed());
    let renewal = requests(&admin, &cluster)
        .await
        .into_iter()
        .find(|c| c.spec.username.as_deref() != Some(bootstrap_user))
        .expect("a request in the agent's own name");
    assert_eq!(
        renewal.spec.username.as_deref(),
        Some(format!("system:open-cluster-management:{cluster}:spokelet").as_str())
    );
    // After the switch, works still arrive.
    works
        .patch(
            "renewed-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workload": {"manifests": manifests("after")}}})),
        )
        .await
        .unwrap();
    until_model(&cms, "renewed-model", Some("after")).await;

    // The hub stops taking the certificate (here: one from a CA it does not know takes its
    // place): its 401s send the agent back to the bootstrap credential, and it joins again.
    let group = format!("system:open-cluster-management:{cluster}");
    let foreign = spokelet_e2e::pki::CertificateAuthority::new("not the hub's CA")
        .unwrap()
        .issue_client_now(&format!("{group}:spokelet"), &[&group])
        .unwrap();
    std::fs::write(credentials.path().join("tls.key"), &foreign.key_pem).unwrap();
    std::fs::write(credentials.path().join("tls.crt"), &foreign.cert_pem).unwrap();
    let bootstrap_requests = |all: Vec<CertificateSigningRequest>| {
        all.into_iter()
            .filter(|c| c.spec.username.as_deref() == Some(bootstrap_user))
            .count()
    };
    updates_until(&works, &cms, &manifests, "rejected-", || async {
        bootstrap_requests(requests(&admin, &cluster).await) >= 2
            && std::fs::read(credentials.path().join("tls.crt")).unwrap() != foreign.cert_pem.as_bytes()
    })
    .await;
    // The kept Secret deleted: the agent joins again and keeps the new certificate. Deleted
    // now, right after the join, so no renewal (due 67 to 72 s after it) is in flight: one
    // would write the Secret again with its own new certificate, which is as good for the
    // agent but not what this step tests. The Secret is looked for every 60 s.
    let secrets: Api<Secret> = Api::namespaced(spoke.client(), &agent_ns);
    secrets
        .delete("hub-kubeconfig-secret", &Default::default())
        .await
        .unwrap();
    // Its status reaches the hub again with the new certificate.
    eventually("the work's status on the hub after joining again", || {
        let works = works.clone();
        async move {
            let w = works.get("renewed-model").await.map_err(|e| e.to_string())?;
            let applied = condition_status(&w, "Applied");
            let generation = w.metadata.generation.unwrap_or_default();
            let observed = w.data["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Applied"))
                .and_then(|c| c["observedGeneration"].as_i64())
                .unwrap_or_default();
            (applied.as_deref() == Some("True") && observed == generation)
                .then_some(())
                .ok_or(format!("Applied {applied:?} at {observed} of {generation}"))
        }
    })
    .await
    .unwrap();
    eventually("a join again after the Secret was deleted", || {
        let (admin, cluster, secrets) = (admin.clone(), cluster.clone(), secrets.clone());
        async move {
            let joins = bootstrap_requests(requests(&admin, &cluster).await);
            let kept = secrets
                .get_opt("hub-kubeconfig-secret")
                .await
                .map_err(|e| e.to_string())?
                .is_some();
            (joins >= 3 && kept)
                .then_some(())
                .ok_or(format!("{joins} joins, Secret kept: {kept}"))
        }
    })
    .await
    .unwrap();
    agent.stop().await;
    hub.stop().await;
}

/// The same join over OCM's CloudEvents gRPC server (`server grpc`), with a bootstrap config in
/// OCM's gRPC format: the ManagedCluster and the certificate request travel as CloudEvents,
/// OCM's gRPC registration driver approves the bootstrap user's request and signs it with the
/// CA the gRPC server trusts, and spokelet runs from the `config.yaml` it keeps. Over the same
/// wire it renews its lease, sets `Joined` and `Available` and sends the pool's claims; it
/// renews its short-lived certificate in its own name while works flow, and a restart reuses
/// what it kept.
#[tokio::test]
async fn spokelet_joins_ocms_grpc_server_with_a_bootstrap_config_and_stays_joined() {
    let bootstrap_user = "system:bootstrap:spokelet-grpc";
    let hub = OcmHub::start(OcmHubOptions {
        grpc: true,
        registration_args: vec![
            "--feature-gates=ManagedClusterAutoApproval=true".into(),
            format!("--auto-approved-grpc-users={bootstrap_user}"),
            // Short, so the agent renews while the test watches (it renews with a fifth left).
            "--grpc-signing-duration=90s".into(),
        ],
        ..OcmHubOptions::default()
    })
    .await
    .unwrap();
    let admin = hub.client();
    let spoke = shared_spoke().await;
    let agent_ns = spoke_namespace(&spoke.client(), "grpc-join-agent").await;
    let works_ns = spoke_namespace(&spoke.client(), "grpc-join-works").await;
    let cluster = unique_name("grpcjoin");
    // The pool report reads NodeInventories (none here: a pool of no nodes still has claims).
    spokelet_e2e::ocm_hub::install_crd_yaml(
        &spoke.client(),
        "nodeinventories.spokelet.io",
        spokelet_e2e::ocm_hub::NODE_INVENTORY_CRD,
    )
    .await
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let bootstrap = files.path().join("bootstrap.yaml");
    hub.issue_grpc_bootstrap(bootstrap_user, &bootstrap)
        .await
        .unwrap();
    let argv = |dir: &std::path::Path, bootstrap: &std::path::Path| -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        [
            "spokelet",
            "run",
            "--hub-transport",
            "grpc",
            "--bootstrap-hub-config",
            &path(bootstrap),
            "--hub-credentials-dir",
            &path(dir),
            "--cluster-name",
            &cluster,
            "--agent-id",
            "spokelet",
            "--agent-namespace",
            &agent_ns,
            "--kubeconfig",
            &path(spoke.kubeconfig_path()),
            "--admin-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec()
    };
    let credentials = files.path().join("hub");
    let started = std::time::Instant::now();
    let agent = Agent::start(&argv(&credentials, &bootstrap));

    // Joined, Available and leased over gRPC, with nobody approving.
    let clusters = managed_clusters(&admin);
    until_joined_and_available(&clusters, &cluster, "over gRPC").await;
    println!(
        "start to Available over gRPC, auto-approved: {:?}",
        started.elapsed()
    );
    let csr = requests(&admin, &cluster).await.remove(0);
    assert_eq!(csr.spec.signer_name, "open-cluster-management.io/grpc");
    assert_eq!(
        csr.metadata.annotations.unwrap_or_default()["open-cluster-management.io/csr-user"],
        bootstrap_user
    );
    let mc = clusters.get(&cluster).await.unwrap();
    assert_eq!(
        mc.data["spec"]["managedClusterClientConfigs"][0]["url"].as_str(),
        Some(spoke.server_url().trim_end_matches('/'))
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), &cluster);
    let renew_time = || async {
        leases
            .get("managed-cluster-lease")
            .await
            .ok()
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
            .map(|t| t.0)
    };
    let first_renewal = renew_time().await;
    assert!(first_renewal.is_some(), "the lease was renewed over gRPC");
    // OCM's taint controller leaves it selectable: a Placement selects it.
    support::placed(&admin, &cluster).await;
    // The pool's claims reach the ManagedCluster in the same object.
    eventually("the pool's claims on the ManagedCluster", || {
        let (clusters, cluster) = (clusters.clone(), cluster.clone());
        async move {
            let mc = clusters.get(&cluster).await.map_err(|e| e.to_string())?;
            let claims = mc.data["status"]["clusterClaims"].as_array().map_or(0, Vec::len);
            (claims > 0)
                .then_some(())
                .ok_or(format!("status {}", mc.data["status"]))
        }
    })
    .await
    .unwrap();

    // Works flow, and keep flowing across the renewal of the certificate.
    let works = hub_works(&admin, &cluster);
    let manifests = |model: &str| model_manifests(&works_ns, model);
    let cms = start_renewed_model(&works, &cluster, &spoke.client(), &works_ns).await;
    let first_cert = std::fs::read(credentials.join("tls.crt")).unwrap();
    let version = updates_until(&works, &cms, &manifests, "v", || async {
        requests(&admin, &cluster).await.len() >= 2
            && std::fs::read(credentials.join("tls.crt")).unwrap() != first_cert
    })
    .await;
    println!(
        "renewed over gRPC after {:?} and {version} work updates",
        started.elapsed()
    );
    let own = format!("system:open-cluster-management:{cluster}:spokelet");
    assert!(
        requests(&admin, &cluster).await.iter().any(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("open-cluster-management.io/csr-user"))
                == Some(&own)
        }),
        "the renewal is asked in the agent's own name"
    );
    updates_until(&works, &cms, &manifests, "after-", || async { true }).await;
    // Waits until the lease was renewed after `since`.
    let renewed_after = |what: &'static str, since| {
        let renew_time = &renew_time;
        async move {
            eventually(what, || async {
                (renew_time().await > since)
                    .then_some(())
                    .ok_or("not yet".to_string())
            })
            .await
            .unwrap();
        }
    };
    renewed_after("the lease renewed again", first_renewal).await;
    agent.stop().await;

    // A restart runs from what was kept: no new request. It runs without the pool reporter,
    // which must not take the membership with it: the lease is renewed all the same.
    let before = requests(&admin, &cluster).await.len();
    let renewed_before = renew_time().await;
    let mut without_reporter = argv(&files.path().join("again"), &bootstrap);
    without_reporter.push("--pool-report=false".into());
    let agent = Agent::start(&without_reporter);
    updates_until(&works, &cms, &manifests, "restarted-", || async { true }).await;
    assert_eq!(requests(&admin, &cluster).await.len(), before, "no new request");
    renewed_after(
        "the lease renewed after the restart, with no pool reporter",
        renewed_before,
    )
    .await;
    agent.stop().await;

    // The hub stops taking the kept certificate (its CA changed, say): the TLS alert sends the
    // agent back to its bootstrap config, it joins again and works flow.
    let stranger = spokelet_e2e::pki::CertificateAuthority::new("another-ca").unwrap();
    let foreign = stranger
        .issue_client_now(
            &own,
            &[
                &format!("system:open-cluster-management:{cluster}"),
                "system:open-cluster-management:managed-clusters",
            ],
        )
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(spoke.client(), &agent_ns);
    let mut kept = secrets.get("hub-kubeconfig-secret").await.unwrap();
    let data = kept.data.get_or_insert_with(Default::default);
    data.insert(
        "tls.crt".into(),
        k8s_openapi::ByteString(foreign.cert_pem.into_bytes()),
    );
    data.insert(
        "tls.key".into(),
        k8s_openapi::ByteString(foreign.key_pem.into_bytes()),
    );
    kept.metadata.managed_fields = None;
    secrets
        .replace("hub-kubeconfig-secret", &Default::default(), &kept)
        .await
        .unwrap();
    let before = requests(&admin, &cluster).await.len();
    let agent = Agent::start(&argv(&files.path().join("refused"), &bootstrap));
    updates_until(&works, &cms, &manifests, "rejoined-", || async {
        requests(&admin, &cluster).await.len() > before
    })
    .await;
    agent.stop().await;

    // Bad input: a bootstrap config that is not one ends the agent naming the file.
    let broken = files.path().join("broken.yaml");
    std::fs::write(&broken, "url: [unclosed\n").unwrap();
    let err = Agent::start(&argv(&files.path().join("broken"), &broken))
        .ended()
        .await
        .expect_err("a broken bootstrap config");
    assert!(err.to_string().contains("broken.yaml"), "{err}");
    assert!(!files.path().join("broken").join("config.yaml").exists());
    hub.check_running().unwrap();
    hub.stop().await;
}

/// The common name of the PEM certificate in `path`.
fn common_name(path: &std::path::Path) -> String {
    let pem = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Bare-metal node services join the same way, each with its own bootstrap config run and a
/// certificate naming its node (agent `spokelet-node-<node>`), kept in its own directory (no
/// Secret: there is no Kubernetes API on a bare-metal machine); a restart reuses it.
#[tokio::test]
async fn bare_metal_node_services_join_over_grpc_each_with_a_certificate_naming_its_node() {
    let bootstrap_user = "system:bootstrap:spokelet-nodes";
    let hub = OcmHub::start(OcmHubOptions {
        grpc: true,
        registration_args: vec![
            "--feature-gates=ManagedClusterAutoApproval=true".into(),
            format!("--auto-approved-grpc-users={bootstrap_user}"),
        ],
        ..OcmHubOptions::default()
    })
    .await
    .unwrap();
    let admin = hub.client();
    let cluster = unique_name("baremetal");
    // The pool was accepted when its engine (or an admin) joined it.
    hub.accept_cluster(&cluster, 60).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let bootstrap = files.path().join("bootstrap.yaml");
    hub.issue_grpc_bootstrap(bootstrap_user, &bootstrap)
        .await
        .unwrap();
    let root = files.path().join("empty-root");
    std::fs::create_dir_all(&root).unwrap();
    let node_argv = |node: &str, dir: &std::path::Path| -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        [
            "spokelet",
            "node",
            "--bootstrap-hub-config",
            &path(&bootstrap),
            "--hub-credentials-dir",
            &path(dir),
            "--cluster-name",
            &cluster,
            "--node-name",
            node,
            "--root",
            &path(&root),
            "--admin-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec()
    };
    let nodes = ["bm-1", "bm-2"];
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|node| Agent::start(&node_argv(node, &files.path().join(node))))
        .collect();
    for node in nodes {
        let dir = files.path().join(node);
        eventually(&format!("{node}'s certificate kept"), || {
            let dir = dir.clone();
            async move {
                (dir.join("tls.crt").exists() && dir.join("config.yaml").exists())
                    .then_some(())
                    .ok_or("not yet".to_string())
            }
        })
        .await
        .unwrap();
        assert_eq!(
            common_name(&dir.join("tls.crt")),
            format!("system:open-cluster-management:{cluster}:spokelet-node-{node}")
        );
    }
    let joined = requests(&admin, &cluster).await;
    assert_eq!(joined.len(), 2, "one request per machine");
    for agent in agents {
        agent.stop().await;
    }
    // A restart of one runs from its files: no new request.
    let again = Agent::start(&node_argv("bm-1", &files.path().join("bm-1")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(requests(&admin, &cluster).await.len(), 2, "no new request");
    again.stop().await;
    hub.check_running().unwrap();
    hub.stop().await;
}
