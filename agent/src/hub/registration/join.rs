//! Joining with a bootstrap credential, as OCM's registration agent does: the ManagedCluster
//! created if it is missing, a CSR with OCM's subject, the issued certificate kept, and then
//! the wait for the hub to accept the cluster. A restart finds the kept certificate and makes
//! no new request. This file holds what both wires share and the Kubernetes hub's join; the
//! gRPC hub's is in [`super::over_grpc`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};
use serde_json::json;

use super::csr::{self, Issued};
use super::store::{Credentials, Keeping, StoreError, Wire};
use crate::hub::config::HubSettings;
use crate::hub::grpc::GrpcError;
use crate::hub::kube_hub::{
    HubSecurity, KubeHubError, config_from_kubeconfig, hub_client, managed_cluster_resource,
};

/// OCM's label naming a CSR's cluster; its hub approves only CSRs that carry it.
pub(super) const CLUSTER_NAME_LABEL: &str = "open-cluster-management.io/cluster-name";
/// OCM's label naming a CSR's agent.
pub(super) const AGENT_NAME_LABEL: &str = "open-cluster-management.io/agent-name";
/// The signer of client certificates the hub's API server accepts.
const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// How often the CSR and the ManagedCluster are looked at while waiting (each look is one GET;
/// the bootstrap identity may not be allowed to watch everywhere): every second for the first
/// minute, when auto-approval answers, then every [`SLOW_POLL`], since a person approving may
/// take hours and each look costs the hub a request.
pub(super) const POLL: Duration = Duration::from_secs(1);
const FAST_POLLS_FOR: Duration = Duration::from_secs(60);
const SLOW_POLL: Duration = Duration::from_secs(10);
/// How often a wait says again where it waits.
const SAY_AGAIN: Duration = Duration::from_secs(30);

/// The bootstrap credential, a credential allowed only to create the ManagedCluster and CSRs
/// (OCM's `open-cluster-management:bootstrap` role), and the wire it is used on.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// A kubeconfig of the hub's API server (`--bootstrap-hub-kubeconfig`).
    Kube {
        kubeconfig: PathBuf,
        security: HubSecurity,
    },
    /// OCM's gRPC config file (`--bootstrap-hub-config`), read: the server's URL and CA, and a
    /// bootstrap client certificate or token.
    Grpc(Box<HubSettings>),
}

impl Bootstrap {
    /// How the credentials the join earns are kept and run from.
    fn wire(&self) -> Wire {
        match self {
            Bootstrap::Kube { .. } => Wire::Kube,
            Bootstrap::Grpc(s) => Wire::Grpc {
                allow_tls12: s.tls.allow_tls12,
            },
        }
    }
}

/// What joining needs.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    pub bootstrap: Bootstrap,
    pub cluster: String,
    pub agent: String,
    /// Where the credentials are written for the hub transport.
    pub dir: PathBuf,
    /// What keeps them across restarts.
    pub keeping: Keeping,
    /// The spoke's API server as the hub is to reach it (`managedClusterClientConfigs`);
    /// none for a pool without one (bare metal).
    pub spoke_url: Option<String>,
    /// Its CA bundle (PEM), when not publicly trusted.
    pub spoke_ca: Option<Vec<u8>>,
}

/// Why the agent could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the bootstrap kubeconfig: {0}")]
    Bootstrap(#[source] KubeHubError),
    #[error("the gRPC hub, with the bootstrap credential: {0}")]
    Grpc(#[source] GrpcError),
    #[error("the bootstrap hub config: {0}")]
    BootstrapConfig(String),
    #[error("the gRPC hub refused {what}: {why}")]
    Refused { what: &'static str, why: String },
    #[error("{what} on the hub with the bootstrap credential: {source}")]
    Hub {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the hub denied certificate request {name}: {reason}")]
    Denied { name: String, reason: String },
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    #[error(
        "the hub issued a certificate for {found:?}, not for agent {agent} of cluster {cluster}; nothing was kept"
    )]
    WrongIdentity {
        found: String,
        cluster: String,
        agent: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes sure the agent holds a certificate of the hub for itself: the one kept in the Secret
/// while it names this cluster and agent and has not expired, else a new one by joining.
/// Writes the files and returns the config (kubeconfig or gRPC config) to run the hub
/// transport from.
pub async fn ensure_joined(s: &JoinSettings) -> Result<PathBuf, JoinError> {
    let (server, ca_pem) = hub_endpoint(s).await?;
    let kept = s
        .keeping
        .load(
            &s.dir,
            s.bootstrap.wire(),
            (&server, ca_pem.as_deref()),
            (&s.cluster, &s.agent),
        )
        .await?;
    if let Some(kept) = kept {
        match usable(&kept, s) {
            Ok(()) => {
                tracing::info!(cluster = %s.cluster, kept_in = %s.keeping.describe(), "running from the hub credentials kept from an earlier join");
                return Ok(kept.write_files(&s.dir)?);
            }
            Err(why) => {
                tracing::warn!(kept_in = %s.keeping.describe(), why, "the kept hub credentials cannot be used; joining again")
            }
        }
    }
    join(s).await
}

/// Joins with the bootstrap credential, whatever is kept (see [`ensure_joined`]).
pub(super) async fn join(s: &JoinSettings) -> Result<PathBuf, JoinError> {
    match &s.bootstrap {
        Bootstrap::Kube { kubeconfig, security } => join_kube(s, kubeconfig, *security).await,
        Bootstrap::Grpc(settings) => super::over_grpc::join(s, settings).await,
    }
}

async fn join_kube(s: &JoinSettings, kubeconfig: &Path, security: HubSecurity) -> Result<PathBuf, JoinError> {
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

/// Checks that the certificate the hub issued for `request` names this cluster and agent and
/// keeps it: the Secret, then the files. Nothing is kept for a certificate naming another.
pub(super) async fn keep(
    s: &JoinSettings,
    request: csr::Request,
    cert_pem: Vec<u8>,
    (server, ca_pem): (String, Option<Vec<u8>>),
) -> Result<Issued, JoinError> {
    let issued = Issued::from_pem(&cert_pem)?;
    if !issued.names(&s.cluster, &s.agent) {
        return Err(JoinError::WrongIdentity {
            found: issued.common_name,
            cluster: s.cluster.clone(),
            agent: s.agent.clone(),
        });
    }
    let creds = Credentials {
        wire: s.bootstrap.wire(),
        server,
        ca_pem,
        cert_pem,
        key_pem: request.key_pem.into_bytes(),
        cluster: s.cluster.clone(),
        agent: s.agent.clone(),
    };
    s.keeping.save(&creds, &s.dir).await?;
    creds.write_files(&s.dir)?;
    Ok(issued)
}

/// The hub's URL and CA bundle as the bootstrap credential names them.
pub(super) async fn hub_endpoint(s: &JoinSettings) -> Result<(String, Option<Vec<u8>>), JoinError> {
    match &s.bootstrap {
        Bootstrap::Kube { kubeconfig, .. } => {
            let config = config_from_kubeconfig(kubeconfig)
                .await
                .map_err(JoinError::Bootstrap)?;
            Ok(endpoint_of(&config))
        }
        Bootstrap::Grpc(settings) => {
            let ca = match &settings.tls.ca {
                Some(source) => Some(
                    source
                        .read("hub CA")
                        .map_err(|e| JoinError::BootstrapConfig(e.to_string()))?,
                ),
                None => None,
            };
            Ok((settings.url.uri(), ca))
        }
    }
}

fn endpoint_of(config: &kube::Config) -> (String, Option<Vec<u8>>) {
    (
        config.cluster_url.to_string(),
        config.root_cert.as_ref().map(|certs| pem_bundle(certs)),
    )
}

/// Whether kept credentials can be run from: issued to this cluster and agent, not expired.
fn usable(c: &Credentials, s: &JoinSettings) -> Result<(), &'static str> {
    if c.cluster != s.cluster || c.agent != s.agent {
        return Err("they were issued to another cluster or agent");
    }
    let issued = Issued::from_pem(&c.cert_pem).map_err(|_| "the certificate cannot be read")?;
    if !issued.names(&s.cluster, &s.agent) {
        return Err("the certificate names another cluster or agent");
    }
    if SystemTime::now() >= issued.not_after {
        return Err("the certificate has expired");
    }
    Ok(())
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

/// The ManagedCluster an agent creates: its name, the spoke's API server where there is one,
/// and OCM's default lease duration; never `hubAcceptsClient` (the hub's admin decides).
pub(super) fn new_managed_cluster(s: &JoinSettings) -> serde_json::Value {
    let mut spec = json!({"leaseDurationSeconds": 60});
    if let Some(url) = &s.spoke_url {
        let mut client_config = json!({"url": url});
        if let Some(ca) = &s.spoke_ca {
            client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        spec["managedClusterClientConfigs"] = json!([client_config]);
    }
    json!({
        "apiVersion": "cluster.open-cluster-management.io/v1",
        "kind": "ManagedCluster",
        "metadata": {"name": s.cluster},
        "spec": spec,
    })
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
            if approved {
                tracing::info!(csr = %name, "waiting for the hub to sign the approved certificate request");
            } else {
                tracing::info!(csr = %name, "waiting for the hub to approve the certificate request (auto-approval, or `kubectl certificate approve {name}` on the hub)");
            }
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

/// The pace of a wait on the hub: when to look again, and when to say again where it waits.
pub(super) struct Waiting {
    start: tokio::time::Instant,
    said: Option<tokio::time::Instant>,
}

impl Waiting {
    pub(super) fn new() -> Waiting {
        Waiting {
            start: tokio::time::Instant::now(),
            said: None,
        }
    }

    /// Whether to log where it waits now (at once, then every [`SAY_AGAIN`]).
    pub(super) fn time_to_say(&mut self) -> bool {
        let due = self.said.is_none_or(|t| t.elapsed() >= SAY_AGAIN);
        if due {
            self.said = Some(tokio::time::Instant::now());
        }
        due
    }

    /// Sleeps until the next look.
    async fn pause(&self) {
        tokio::time::sleep(poll_after(self.start)).await;
    }

    /// When the next look is due, from now.
    pub(super) fn next_look(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + poll_after(self.start)
    }
}

/// The pause before the next look of a wait that began at `start`.
fn poll_after(start: tokio::time::Instant) -> Duration {
    if start.elapsed() < FAST_POLLS_FOR {
        POLL
    } else {
        SLOW_POLL
    }
}

/// DER certificates as one PEM bundle.
fn pem_bundle(certs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = String::new();
    for der in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// The spoke's URL and CA as a client of it sees them (the defaults for
/// `managedClusterClientConfigs`).
pub fn spoke_endpoint(config: &kube::Config) -> (String, Option<Vec<u8>>) {
    (
        config.cluster_url.to_string().trim_end_matches('/').to_string(),
        config.root_cert.as_ref().map(|c| pem_bundle(c)),
    )
}

/// The kubeconfig path the credentials in `dir` are run from.
pub fn kubeconfig_in(dir: &Path) -> PathBuf {
    dir.join(super::store::KUBECONFIG)
}

/// The gRPC config path the credentials in `dir` are run from.
pub fn grpc_config_in(dir: &Path) -> PathBuf {
    dir.join(super::store::GRPC_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_looks_every_second_for_a_minute_then_every_ten() {
        let start = tokio::time::Instant::now();
        assert_eq!(poll_after(start), POLL);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(poll_after(start), POLL);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(poll_after(start), SLOW_POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_says_where_it_waits_at_once_then_every_thirty_seconds() {
        let mut waiting = Waiting::new();
        assert!(waiting.time_to_say());
        assert!(!waiting.time_to_say());
        tokio::time::advance(SAY_AGAIN).await;
        assert!(waiting.time_to_say());
        assert!(!waiting.time_to_say());
    }

    #[tokio::test]
    async fn a_certificate_for_another_cluster_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = JoinSettings {
            bootstrap: Bootstrap::Kube {
                kubeconfig: dir.path().join("bootstrap.kubeconfig"),
                security: HubSecurity::default(),
            },
            cluster: "pool-a".into(),
            agent: "spokelet".into(),
            dir: dir.path().join("hub"),
            keeping: Keeping::Files,
            spoke_url: None,
            spoke_ca: None,
        };
        // A certificate naming the same agent of another cluster.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, csr::agent_user("pool-b", "spokelet"));
        let cert = params.self_signed(&key).unwrap();
        let ours = csr::request("pool-a", "spokelet").unwrap();
        let err = keep(
            &s,
            ours,
            cert.pem().into_bytes(),
            ("https://hub.example:6443".into(), None),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, JoinError::WrongIdentity { .. }), "{err}");
        assert!(
            err.to_string().contains("pool-b") && err.to_string().contains("nothing was kept"),
            "{err}"
        );
        assert!(!s.dir.exists(), "no file written");
    }

    #[test]
    fn der_certificates_become_one_pem_bundle() {
        let pem = String::from_utf8(pem_bundle(&[vec![1, 2, 3], vec![4; 100]])).unwrap();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
    }
}
