//! spokelet against the real OCM hub: OCM's own registration controller, work manager,
//! placement controller and CloudEvents gRPC server (built from OCM's module by
//! `tests/env/install.sh`), not copies of their behaviour.
//!
//! - Kubernetes-hub transport: the admin accepts the cluster as PaletteAI does; spokelet makes
//!   it `Joined` and `Available` (so OCM's taint controller leaves it selectable), a
//!   ManagedClusterSet, its binding and a Placement select it, a ManifestWorkReplicaSet rolls a
//!   ManifestWork out to it, spokelet applies it and OCM's summary counts it applied and
//!   available. Stopped, the cluster turns `Unknown` and `unreachable` after its lease grace.
//! - gRPC transport through OCM's `server grpc`: works created on the hub API reach spokelet and
//!   their status is written back to the hub's ManifestWorks by OCM's server.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use spokelet_e2e::ocm::{OcmHub, OcmHubOptions, WORK_GROUP, condition_status, managed_clusters, resource};
use spokelet_e2e::{eventually, shared_spoke, unique_name};

mod support;
use support::{Agent, GrpcAgentArgs, create_object as create, spoke_namespace, until_gone, until_model};

/// A lease short enough that the hub's grace (5 durations) runs out within the test.
const LEASE_SECONDS: u32 = 2;
const UNREACHABLE_TAINT: &str = "cluster.open-cluster-management.io/unreachable";

fn taints(mc: &DynamicObject) -> Vec<String> {
    mc.data["spec"]["taints"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t["key"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn config_map(ns: &str, name: &str, model: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": ns}, "data": {"model": model}})
}

#[tokio::test]
async fn a_stock_ocm_hub_accepts_places_and_rolls_out_to_spokelet_over_its_kubernetes_api() {
    // With OCM's ClusterProfile feature, the clusters a set binding covers get a ClusterProfile
    // whose properties are the ManagedCluster's claims.
    let hub = OcmHub::start(OcmHubOptions {
        registration_args: vec!["--feature-gates=ClusterProfile=true".into()],
        ..OcmHubOptions::default()
    })
    .await
    .unwrap();
    let admin = hub.client();
    let spoke = shared_spoke().await;
    // The pool report reads NodeInventories (none here: a pool of no nodes still has claims).
    spokelet_e2e::ocm_hub::install_crd_yaml(
        &spoke.client(),
        "nodeinventories.spokelet.io",
        spokelet_e2e::ocm_hub::NODE_INVENTORY_CRD,
    )
    .await
    .unwrap();
    let ns = spoke_namespace(&spoke.client(), "ocm-rollout").await;
    let cluster = unique_name("pool");
    hub.accept_cluster(&cluster, LEASE_SECONDS).await.unwrap();

    // The agent has exactly what OCM's accept gives a cluster's agent.
    let identity = hub.issue_agent(&cluster, "agent").unwrap();
    let hub_kubeconfig = identity.kubeconfig_path().display().to_string();
    let kubeconfig = spoke.kubeconfig_path().display().to_string();
    let agent = Agent::start(&[
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
    ]);

    // Joined and Available as OCM's agent would make it, so no unreachable taint.
    let clusters = managed_clusters(&admin);
    eventually("the cluster Joined and Available, with no taint", || {
        let clusters = clusters.clone();
        let cluster = cluster.clone();
        async move {
            let mc = clusters.get(&cluster).await.map_err(|e| e.to_string())?;
            let joined = condition_status(&mc, "ManagedClusterJoined");
            let available = condition_status(&mc, "ManagedClusterConditionAvailable");
            let taints = taints(&mc);
            if joined.as_deref() == Some("True") && available.as_deref() == Some("True") && taints.is_empty()
            {
                Ok(())
            } else {
                Err(format!(
                    "joined {joined:?}, available {available:?}, taints {taints:?}"
                ))
            }
        }
    })
    .await
    .unwrap();

    // A set, its binding and a Placement select the cluster.
    let rollouts = support::placed(&admin, &cluster).await.namespace;

    // The bound set gives the cluster a ClusterProfile carrying its claims as properties.
    let profiles: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &rollouts,
        &resource(
            "multicluster.x-k8s.io",
            "v1alpha1",
            "ClusterProfile",
            "clusterprofiles",
        ),
    );
    eventually("the ClusterProfile's properties from spokelet's claims", || {
        let (profiles, cluster) = (profiles.clone(), cluster.clone());
        async move {
            let profile = profiles.get_opt(&cluster).await.map_err(|e| e.to_string())?;
            let properties = profile
                .as_ref()
                .and_then(|p| p.data["status"]["properties"].as_array().cloned())
                .unwrap_or_default();
            properties
                .iter()
                .any(|p| {
                    p["name"] == "kubeversion.open-cluster-management.io"
                        && p["value"].as_str().is_some_and(|v| v.starts_with("v1."))
                })
                .then_some(())
                .ok_or(format!("properties: {properties:?}"))
        }
    })
    .await
    .unwrap();

    // A ManifestWorkReplicaSet rolls the model out through the Placement.
    let mwrs = resource(
        WORK_GROUP,
        "v1alpha1",
        "ManifestWorkReplicaSet",
        "manifestworkreplicasets",
    );
    create(
        &admin,
        &mwrs,
        Some(&rollouts),
        json!({
            "apiVersion": "work.open-cluster-management.io/v1alpha1", "kind": "ManifestWorkReplicaSet",
            "metadata": {"name": "model-server", "namespace": rollouts},
            "spec": {
                "placementRefs": [{"name": "models"}],
                "manifestWorkTemplate": {"workload": {"manifests": [config_map(&ns, "model", "llama")]}},
            },
        }),
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(spoke.client(), &ns);
    let sets: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &rollouts, &mwrs);
    let works: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &cluster,
        &resource(WORK_GROUP, "v1", "ManifestWork", "manifestworks"),
    );
    eventually(
        "the ManifestWorkReplicaSet's ManifestWork in the cluster's namespace",
        || {
            let works = works.clone();
            let sets = sets.clone();
            async move {
                let list = works.list(&Default::default()).await.map_err(|e| e.to_string())?;
                if list.items.is_empty() {
                    let set = sets.get("model-server").await.map_err(|e| e.to_string())?;
                    return Err(format!("no work; the set's status: {}", set.data["status"]));
                }
                Ok(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nwork manager: {}", hub.log_tail("work-manager")));
    until_model(&cms, "model", Some("llama")).await;
    eventually(
        "the ManifestWorkReplicaSet's summary to count the cluster applied and available",
        || {
            let sets = sets.clone();
            async move {
                let set = sets.get("model-server").await.map_err(|e| e.to_string())?;
                let summary = &set.data["status"]["summary"];
                if summary["total"] == 1 && summary["applied"] == 1 && summary["available"] == 1 {
                    Ok(())
                } else {
                    Err(format!("summary {summary}"))
                }
            }
        },
    )
    .await
    .unwrap();

    // Stopped, the agent renews nothing: after the lease grace the hub marks the cluster
    // Unknown and unreachable, as it would for the stock agent.
    agent.stop().await;
    eventually(
        "the hub to mark the stopped cluster Unknown and unreachable",
        || {
            let clusters = clusters.clone();
            let cluster = cluster.clone();
            async move {
                let mc = clusters.get(&cluster).await.map_err(|e| e.to_string())?;
                let available = condition_status(&mc, "ManagedClusterConditionAvailable");
                let taints = taints(&mc);
                if available.as_deref() == Some("Unknown") && taints.iter().any(|t| t == UNREACHABLE_TAINT) {
                    Ok(())
                } else {
                    Err(format!("available {available:?}, taints {taints:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
    // The work stays where it runs: a hub that stops hearing from the agent deletes nothing.
    until_model(&cms, "model", Some("llama")).await;
    hub.check_running().unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn works_reach_spokelet_through_ocms_grpc_server_and_their_status_returns() {
    let hub = OcmHub::start(OcmHubOptions {
        grpc: true,
        ..OcmHubOptions::default()
    })
    .await
    .unwrap();
    let admin = hub.client();
    let spoke = shared_spoke().await;
    let ns = spoke_namespace(&spoke.client(), "ocm-grpc").await;
    let cluster = unique_name("pool");
    hub.accept_cluster(&cluster, 60).await.unwrap();

    let identity = hub.issue_grpc_agent(&cluster, "agent").unwrap();
    let args = GrpcAgentArgs::to(
        hub.grpc_url().unwrap(),
        hub.grpc_ca_pem().unwrap(),
        &identity,
        &cluster,
        spoke.kubeconfig_path(),
    );
    let agent = Agent::start(&args.with(&["--pool-report", "false"]));

    // A ManifestWork created on the hub API, as any OCM user creates one.
    let works: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &cluster,
        &resource(WORK_GROUP, "v1", "ManifestWork", "manifestworks"),
    );
    let work = |model: &str| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
            "metadata": {"name": "model-server", "namespace": cluster},
            "spec": {"workload": {"manifests": [config_map(&ns, "model", model)]}},
        }))
        .unwrap()
    };
    works
        .create(&PostParams::default(), &work("llama"))
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(spoke.client(), &ns);
    until_model(&cms, "model", Some("llama")).await;
    eventually(
        "Applied and Available on the hub's ManifestWork, written by OCM's server",
        || {
            let works = works.clone();
            async move {
                let w = works.get("model-server").await.map_err(|e| e.to_string())?;
                let applied = condition_status(&w, "Applied");
                let available = condition_status(&w, "Available");
                if applied.as_deref() == Some("True") && available.as_deref() == Some("True") {
                    Ok(())
                } else {
                    Err(format!("status {}", w.data["status"]))
                }
            }
        },
    )
    .await
    .unwrap();

    // An update on the hub reaches the spoke; a delete removes the object.
    let mut current = works.get("model-server").await.unwrap();
    current.data["spec"] = work("mistral").data["spec"].clone();
    works
        .replace("model-server", &PostParams::default(), &current)
        .await
        .unwrap();
    until_model(&cms, "model", Some("mistral")).await;
    works.delete("model-server", &Default::default()).await.unwrap();
    until_model(&cms, "model", None).await;
    until_gone(
        &works,
        "model-server",
        "the hub's ManifestWork gone once spokelet cleaned up",
    )
    .await;

    agent.stop().await;
    hub.check_running().unwrap();
    hub.stop().await;
}
