//! The whole agent, end to end, for both hub transports: `spokelet run --hub-transport grpc|kube`
//! parsed from a command line, dialling the hub with a client certificate (the test CloudEvents
//! hub, or a second real kube-apiserver) and applying to a real spoke kube-apiserver.
//!
//! A work published on the hub must become objects on the spoke and a status with feedback on
//! the hub; an update must change the objects; a delete must remove them and end with a
//! `Deleted` status. Waits are bounded polls; nothing asserts on elapsed time.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use spokelet::work::manifestwork::ManifestWork;
use spokelet_e2e::cloudevents_hub::{HubPki, TestHub, TestHubOptions};
use spokelet_e2e::ocm_hub::{onboard_cluster, start_ocm_hub};
use spokelet_e2e::{eventually, shared_spoke, unique_name};

mod support;
use support::{Agent, GrpcAgentArgs, condition, latest_status, spoke_namespace, until_gone, until_model};

#[tokio::test]
async fn work_from_grpc_hub_is_applied_updated_and_deleted_with_status_back_on_the_hub() {
    let spoke = shared_spoke().await;
    let client = spoke.client();
    let cluster = unique_name("cluster");
    let ns = spoke_namespace(&client, "agent-grpc").await;

    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    // Exactly what an operator would type, through the real CLI parser.
    let args = GrpcAgentArgs::new(&pki, &hub, &cluster, spoke.kubeconfig_path());
    let agent = Agent::start(&args.with(&[]));
    let health = agent.health.clone();

    let bundle = |value: &str| {
        json!({
            "manifests": [
                {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "settings", "namespace": ns}, "data": {"model": value}},
                {"apiVersion": "apps/v1", "kind": "Deployment",
                 "metadata": {"name": "server", "namespace": ns},
                 "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "server"}},
                          "template": {"metadata": {"labels": {"app": "server"}},
                                       "spec": {"containers": [{"name": "c", "image": "registry.invalid/server:1"}]}}}}
            ],
            "manifestConfigs": [
                {"resourceIdentifier": {"group": "apps", "resource": "deployments", "name": "server", "namespace": ns},
                 "feedbackRules": [{"type": "JSONPaths", "jsonPaths": [{"name": "replicas", "path": ".spec.replicas"}]}]}
            ]
        })
    };
    let work = hub.upsert_work(&cluster, "model-server", bundle("llama"));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    until_model(&cms, "settings", Some("llama")).await;
    let status = eventually("Applied=True with feedback on the hub", || {
        let found = latest_status(&hub, &work.uid, |s| {
            condition(s, "Applied").as_deref() == Some("True") && s.to_string().contains("\"replicas\"")
        });
        async move { found }
    })
    .await
    .unwrap();
    assert!(status["resourceStatus"].is_array(), "{status}");
    eventually("/readyz to turn ready once the hub's resync is applied", || {
        let ready = health.is_ready();
        async move { if ready { Ok(()) } else { Err("not ready") } }
    })
    .await
    .unwrap();
    let sent = hub
        .statuses()
        .into_iter()
        .rev()
        .find(|r| r.ext("resourceid").as_deref() == Some(work.uid.as_str()))
        .unwrap();
    assert_eq!(sent.ext("clustername").as_deref(), Some(cluster.as_str()));
    assert_eq!(
        sent.client_cn.as_deref(),
        Some(cluster.as_str()),
        "mTLS identity is the cluster's certificate"
    );
    assert!(sent.ext("statushash").is_some_and(|h| h.len() == 64));

    // Update on the hub: the spoke follows.
    let updated = hub.upsert_work(&cluster, "model-server", bundle("mistral"));
    assert_eq!(updated.generation, 2);
    until_model(&cms, "settings", Some("mistral")).await;

    // Delete on the hub: objects go, and the last status says Deleted.
    hub.delete_work(&cluster, "model-server").unwrap();
    until_model(&cms, "settings", None).await;
    eventually("a final Deleted status on the hub", || {
        let found = latest_status(&hub, &work.uid, |s| {
            condition(s, "Deleted").as_deref() == Some("True")
        });
        async move { found }
    })
    .await
    .unwrap();

    agent.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn work_from_kubernetes_hub_is_applied_updated_and_deleted_with_status_on_the_hub() {
    let spoke = shared_spoke().await;
    let client = spoke.client();
    let ns = spoke_namespace(&client, "agent-kube").await;
    let (hub, admin) = start_ocm_hub().await.unwrap();
    let cluster = unique_name("cluster");
    // The agent's identity on the hub: a client certificate bound to the shipped role only.
    let agent_identity = onboard_cluster(&hub, &admin, &cluster).await.unwrap();
    let hub_kubeconfig = agent_identity.kubeconfig_path().display().to_string();
    let kubeconfig = spoke.kubeconfig_path().display().to_string();

    let argv = [
        "spokelet",
        "run",
        "--hub-transport",
        "kube",
        "--hub-kubeconfig",
        &hub_kubeconfig,
        "--cluster-name",
        &cluster,
        "--kubeconfig",
        &kubeconfig,
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let agent = Agent::start(&argv);

    let work = |value: &str| -> ManifestWork {
        serde_json::from_value(json!({
            "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
            "metadata": {"name": "model-server"},
            "spec": {
                "workload": {"manifests": [
                    {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "settings", "namespace": ns}, "data": {"model": value}}]},
                "manifestConfigs": [
                    {"resourceIdentifier": {"group": "", "resource": "configmaps", "name": "settings", "namespace": ns},
                     "feedbackRules": [{"type": "JSONPaths", "jsonPaths": [{"name": "model", "path": ".data.model"}]}]}]
            }
        }))
        .unwrap()
    };
    let works: Api<ManifestWork> = Api::namespaced(admin.clone(), &cluster);
    works
        .create(&PostParams::default(), &work("llama"))
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    until_model(&cms, "settings", Some("llama")).await;

    eventually(
        "Applied=True and the feedback value in the hub work's status",
        || {
            let works = works.clone();
            async move {
                let w = serde_json::to_value(works.get("model-server").await.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                let status = &w["status"];
                if condition(status, "Applied").as_deref() == Some("True")
                    && status.to_string().contains("llama")
                {
                    Ok(())
                } else {
                    Err(format!("status: {status}"))
                }
            }
        },
    )
    .await
    .unwrap();

    // Update on the hub.
    works
        .patch(
            "model-server",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": serde_json::to_value(work("mistral")).unwrap()["spec"]})),
        )
        .await
        .unwrap();
    until_model(&cms, "settings", Some("mistral")).await;

    // Delete on the hub: the spoke is cleaned up, then the finalizer lets the hub work go.
    works
        .delete("model-server", &DeleteParams::default())
        .await
        .unwrap();
    until_model(&cms, "settings", None).await;
    until_gone(
        &works,
        "model-server",
        "the hub work to be gone once cleanup is done",
    )
    .await;

    agent.stop().await;
    hub.stop().await;
}
