//! Joining over the Kubernetes hub with a bootstrap credential, as OCM's registration agent
//! does: the ManagedCluster created if it is missing, a CSR with OCM's subject (signer
//! `kubernetes.io/kube-apiserver-client`) polled until signed, the certificate kept, and then
//! the wait for the hub to accept the cluster.

use std::path::{Path, PathBuf};

use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};

use super::csr::{self, Issued};
use super::join::{
    AGENT_NAME_LABEL, CLUSTER_NAME_LABEL, JoinError, JoinSettings, Waiting, endpoint_of, keep, kubeconfig_in,
    new_managed_cluster, say_csr_wait,
};
use crate::config::HubSecurity;
use crate::kube_hub::{config_from_kubeconfig, hub_client, managed_cluster_resource};

/// The signer of client certificates the hub's API server accepts.
const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";

/// Joins over the Kubernetes hub with the bootstrap `kubeconfig`; returns the kubeconfig to
/// run from.
pub(super) async fn join(
    s: &JoinSettings,
    kubeconfig: &Path,
    security: HubSecurity,
) -> Result<PathBuf, JoinError> {
    let config = config_from_kubeconfig(kubeconfig)
        .await
        .map_err(JoinError::Bootstrap)?;
    let (server, ca_pem) = endpoint_of(&config);
    let hub = hub_client(config, kubeconfig, security).map_err(JoinError::Bootstrap)?;
    ensure_managed_cluster(&hub, s).await?;
    let (issued, name) = obtain(s, &hub, server, ca_pem).await?;
    tracing::info!(cluster = %s.cluster, csr = %name, not_after = ?issued.not_after, "joined the hub: certificate issued and kept");
    wait_accepted(&hub, &s.cluster).await?;
    Ok(kubeconfig_in(&s.dir))
}

/// Asks `hub` for a certificate (a new key and request, as the identity `hub` holds), waits
/// until it is signed, checks that it names this cluster and agent, and keeps it: the Secret,
/// then the files. Returns what was issued and the request's name.
pub(super) async fn obtain(
    s: &JoinSettings,
    hub: &kube::Client,
    server: String,
    ca_pem: Option<Vec<u8>>,
) -> Result<(Issued, String), JoinError> {
    let request = csr::request(&s.cluster, &s.agent)?;
    let name = create_csr(hub, s, &request.csr_pem).await?;
    let cert_pem = wait_issued(hub, &name).await?;
    let issued = keep(s, request, cert_pem, (server, ca_pem)).await?;
    Ok((issued, name))
}

/// Creates the ManagedCluster if it does not exist, naming the spoke's API server; an existing
/// one is left as it is (the bootstrap role may not change it).
async fn ensure_managed_cluster(hub: &kube::Client, s: &JoinSettings) -> Result<(), JoinError> {
    let api: Api<DynamicObject> = Api::all_with(hub.clone(), &managed_cluster_resource());
    let err = |what| move |source| JoinError::Hub { what, source };
    if api
        .get_opt(&s.cluster)
        .await
        .map_err(err("reading the ManagedCluster"))?
        .is_some()
    {
        return Ok(());
    }
    let obj: DynamicObject = serde_json::from_value(new_managed_cluster(s)).map_err(|e| JoinError::Hub {
        what: "making the ManagedCluster",
        source: kube::Error::SerdeError(e),
    })?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {
            tracing::info!(cluster = %s.cluster, "created the ManagedCluster on the hub");
            Ok(())
        }
        // Made meanwhile by someone else: as good.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(source) => Err(JoinError::Hub {
            what: "creating the ManagedCluster",
            source,
        }),
    }
}

/// Sends the certificate request; returns its name.
async fn create_csr(hub: &kube::Client, s: &JoinSettings, csr_pem: &str) -> Result<String, JoinError> {
    let api: Api<CertificateSigningRequest> = Api::all(hub.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", s.cluster)),
            labels: Some(
                [
                    (CLUSTER_NAME_LABEL.to_string(), s.cluster.clone()),
                    (AGENT_NAME_LABEL.to_string(), s.agent.clone()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(csr_pem.as_bytes().to_vec()),
            signer_name: CLIENT_SIGNER.to_string(),
            usages: Some(
                ["digital signature", "key encipherment", "client auth"]
                    .map(String::from)
                    .to_vec(),
            ),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let made = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(|source| JoinError::Hub {
            what: "creating the certificate request",
            source,
        })?;
    let name = made.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, "certificate request sent to the hub");
    Ok(name)
}

/// Waits until the hub signs request `name` (approved, then issued), saying where it waits;
/// a denied or failed request is an error.
async fn wait_issued(hub: &kube::Client, name: &str) -> Result<Vec<u8>, JoinError> {
    let api: Api<CertificateSigningRequest> = Api::all(hub.clone());
    let mut waiting = Waiting::new();
    loop {
        let csr = api.get(name).await.map_err(|source| JoinError::Hub {
            what: "reading the certificate request",
            source,
        })?;
        let status = csr.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        if let Some(c) = conditions
            .iter()
            .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
        {
            return Err(JoinError::Denied {
                name: name.to_string(),
                reason: format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                ),
            });
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            return Ok(cert.0);
        }
        let approved = conditions.iter().any(|c| c.type_ == "Approved");
        if waiting.time_to_say() {
            say_csr_wait(name, approved);
        }
        waiting.pause().await;
    }
}

/// Waits until the hub accepts the cluster (`spec.hubAcceptsClient`), saying where it waits.
async fn wait_accepted(hub: &kube::Client, cluster: &str) -> Result<(), JoinError> {
    let api: Api<DynamicObject> = Api::all_with(hub.clone(), &managed_cluster_resource());
    let mut waiting = Waiting::new();
    loop {
        let mc = api.get_opt(cluster).await.map_err(|source| JoinError::Hub {
            what: "reading the ManagedCluster",
            source,
        })?;
        let accepted = mc
            .as_ref()
            .and_then(|m| m.data.pointer("/spec/hubAcceptsClient"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        if accepted {
            return Ok(());
        }
        if waiting.time_to_say() {
            tracing::info!(
                cluster,
                "waiting for the hub to accept the cluster (spec.hubAcceptsClient on its ManagedCluster)"
            );
        }
        waiting.pause().await;
    }
}
