//! An OCM-style hub on a real API server: the `ManifestWork` CRD, cluster namespaces and the
//! agent's RBAC, exactly as shipped in `deploy/`.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use crate::{ClusterOptions, HarnessError, KubeCluster, UserCredentials, eventually};

/// The hub CRD users without OCM install (`deploy/crds/`).
pub const MANIFESTWORK_CRD: &str =
    include_str!("../../deploy/crds/manifestworks.work.open-cluster-management.io.yaml");
/// The agent's hub role (`deploy/hub/agent-rbac.yaml`), written for [`RBAC_EXAMPLE_CLUSTER`].
pub const AGENT_RBAC: &str = include_str!("../../deploy/hub/agent-rbac.yaml");
/// The cluster name `deploy/hub/agent-rbac.yaml` is written for; replaced per test.
pub const RBAC_EXAMPLE_CLUSTER: &str = "cluster1";

fn invalid(what: &str, reason: impl ToString) -> HarnessError {
    HarnessError::InvalidManifest {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// A fresh hub API server with the ManifestWork CRD installed and established, and its admin client.
pub async fn start_ocm_hub() -> Result<(KubeCluster, kube::Client), HarnessError> {
    start_ocm_hub_with(ClusterOptions::hub()).await
}

/// [`start_ocm_hub`] with other cluster options, e.g. extra API server flags such as an audit log.
pub async fn start_ocm_hub_with(
    options: ClusterOptions,
) -> Result<(KubeCluster, kube::Client), HarnessError> {
    let hub = KubeCluster::start(options).await?;
    let admin = hub.try_client()?;
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(MANIFESTWORK_CRD).map_err(|e| invalid("ManifestWork CRD", e))?;
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    api.create(&PostParams::default(), &crd)
        .await
        .map_err(|source| HarnessError::Kube {
            context: "creating the ManifestWork CRD".into(),
            source,
        })?;
    crd_established(&admin, "manifestworks.work.open-cluster-management.io").await?;
    Ok((hub, admin))
}

/// OCM's ManagedCluster CRD file (as the cluster manager installs it on a hub).
pub const MANAGED_CLUSTER_CRD_FILE: &str =
    "hub/0000_00_clusters.open-cluster-management.io_managedclusters.crd.yaml";
/// OCM's ClusterClaim CRD file (as the klusterlet installs it on a spoke).
pub const CLUSTER_CLAIM_CRD_FILE: &str =
    "spoke/0000_02_clusters.open-cluster-management.io_clusterclaims.crd.yaml";

/// Where OCM's own CRD files are: `SPOKELET_OCM_CRDS`, else `ocm-crds/` in the test assets,
/// where `tests/env/install.sh` copies them from the OCM module it builds OCM from: `hub/`
/// (the cluster manager's) and `spoke/` (the klusterlet's). They are OCM's interface data,
/// used to validate what spokelet writes, and deliberately not copied into the project.
pub fn ocm_crds_dir() -> std::path::PathBuf {
    match std::env::var_os("SPOKELET_OCM_CRDS") {
        Some(dir) => dir.into(),
        None => crate::test_assets_dir().join("ocm-crds"),
    }
}

/// Installs a CRD from YAML text (kept if it exists) and waits until it is established.
pub async fn install_crd_yaml(client: &kube::Client, what: &str, yaml: &str) -> Result<(), HarnessError> {
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).map_err(|e| invalid(what, e))?;
    let name = crd.metadata.name.clone().unwrap_or_default();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(source) => {
            return Err(HarnessError::Kube {
                context: format!("creating the CRD {what}"),
                source,
            });
        }
    }
    crd_established(client, &name).await
}

/// Installs one of OCM's CRDs from [`ocm_crds_dir`] exactly as OCM ships it. A missing file is
/// an error naming where it was looked for (the tests that need it cannot run without it).
pub async fn install_ocm_crd(client: &kube::Client, file: &str) -> Result<(), HarnessError> {
    let path = ocm_crds_dir().join(file);
    let yaml = std::fs::read_to_string(&path).map_err(|e| {
        invalid(
            file,
            format!(
                "{}: {e} (tests/env/install.sh puts OCM's CRD files there; SPOKELET_OCM_CRDS \
                 names another folder)",
                path.display()
            ),
        )
    })?;
    install_crd_yaml(client, file, &yaml).await
}

/// The project's NodeInventory CRD (`deploy/crds/`).
pub const NODE_INVENTORY_CRD: &str = include_str!("../../deploy/crds/nodeinventories.spokelet.io.yaml");

/// A spoke of its own for a Compute Pool (the pool is every NodeInventory in the cluster): an
/// API server with the NodeInventory CRD and OCM's ClusterClaim CRD installed.
pub async fn start_pool_spoke() -> Result<KubeCluster, HarnessError> {
    let spoke = KubeCluster::start(ClusterOptions {
        name: "pool".into(),
        ..ClusterOptions::hub()
    })
    .await?;
    let client = spoke.try_client()?;
    install_crd_yaml(&client, "NodeInventory", NODE_INVENTORY_CRD).await?;
    install_ocm_crd(&client, CLUSTER_CLAIM_CRD_FILE).await?;
    Ok(spoke)
}

/// Does on the hub what accepting a cluster does: creates its ManagedCluster
/// (`hubAcceptsClient: true`); the agent only ever writes its status.
pub async fn accept_managed_cluster(admin: &kube::Client, cluster: &str) -> Result<(), HarnessError> {
    create_managed_cluster(admin, cluster, None).await
}

/// Creates the ManagedCluster `cluster` with `hubAcceptsClient: true` and, if given,
/// `leaseDurationSeconds`.
pub async fn create_managed_cluster(
    admin: &kube::Client,
    cluster: &str,
    lease_seconds: Option<u32>,
) -> Result<(), HarnessError> {
    let mut spec = serde_json::json!({"hubAcceptsClient": true});
    if let Some(seconds) = lease_seconds {
        spec["leaseDurationSeconds"] = seconds.into();
    }
    let mc: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
        "metadata": {"name": cluster}, "spec": spec,
    }))
    .map_err(|e| invalid("ManagedCluster", e))?;
    crate::ocm::managed_clusters(admin)
        .create(&PostParams::default(), &mc)
        .await
        .map_err(|source| HarnessError::Kube {
            context: format!("creating the ManagedCluster {cluster}"),
            source,
        })?;
    Ok(())
}

/// Waits until the CRD `name` reports `Established=True` (its kinds are then served).
pub async fn crd_established(client: &kube::Client, name: &str) -> Result<(), HarnessError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(&format!("the CRD {name} to be established"), || {
        let api = api.clone();
        async move {
            let crd = api.get(name).await.map_err(|e| e.to_string())?;
            spokelet_work::applied_work::is_established(&crd)
                .then_some(())
                .ok_or("not established yet".to_string())
        }
    })
    .await
}

/// Creates the cluster namespace and the agent's role from `deploy/hub/agent-rbac.yaml`, and
/// issues the agent's certificate (user `system:open-cluster-management:<cluster>:agent`, group
/// `system:open-cluster-management:<cluster>`).
pub async fn onboard_cluster(
    hub: &KubeCluster,
    admin: &kube::Client,
    cluster: &str,
) -> Result<UserCredentials, HarnessError> {
    let yaml = AGENT_RBAC.replace(RBAC_EXAMPLE_CLUSTER, cluster);
    let mut kinds = Vec::new();
    for doc in yaml.split("\n---\n") {
        let value: serde_json::Value =
            serde_yaml::from_str(doc).map_err(|e| invalid("deploy/hub/agent-rbac.yaml", e))?;
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        if !matches!(
            kind.as_str(),
            "Namespace" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            return Err(invalid(
                "deploy/hub/agent-rbac.yaml",
                format!("unexpected kind {kind:?}"),
            ));
        }
        // Retried: right after a CRD is established the API server may drop pooled connections.
        eventually(&format!("creating the {kind} of {cluster}"), || {
            let (admin, value, kind) = (admin.clone(), value.clone(), kind.clone());
            async move {
                let pp = PostParams::default();
                let parse_err = |e: serde_json::Error| e.to_string();
                match kind.as_str() {
                    "Namespace" => Api::<Namespace>::all(admin)
                        .create(&pp, &serde_json::from_value(value).map_err(parse_err)?)
                        .await
                        .map(drop),
                    "Role" => Api::<Role>::namespaced(admin, cluster)
                        .create(&pp, &serde_json::from_value(value).map_err(parse_err)?)
                        .await
                        .map(drop),
                    "ClusterRole" => Api::<ClusterRole>::all(admin)
                        .create(&pp, &serde_json::from_value(value).map_err(parse_err)?)
                        .await
                        .map(drop),
                    "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(admin)
                        .create(&pp, &serde_json::from_value(value).map_err(parse_err)?)
                        .await
                        .map(drop),
                    _ => Api::<RoleBinding>::namespaced(admin, cluster)
                        .create(&pp, &serde_json::from_value(value).map_err(parse_err)?)
                        .await
                        .map(drop),
                }
                .map_err(|e| e.to_string())
            }
        })
        .await?;
        kinds.push(kind);
    }
    if kinds
        != [
            "Namespace",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
    {
        return Err(invalid("deploy/hub/agent-rbac.yaml", format!("kinds {kinds:?}")));
    }
    let group = format!("system:open-cluster-management:{cluster}");
    hub.issue_user(&format!("{group}:agent"), &[&group])
}
