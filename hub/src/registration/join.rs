//! What joining a hub takes on either wire, as OCM's registration agent joins: the settings
//! and errors, the ManagedCluster an agent creates, the pace of the waits, and the keeping of
//! an issued certificate once it is checked to name this cluster and agent. The joins
//! themselves are [`super::over_kube`] and [`super::over_grpc`]; [`super::ensure`] picks one.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use super::csr::{self, Issued};
use super::store::{Credentials, Keeping, StoreError, Wire};
use crate::config::HubSecurity;
use crate::config::HubSettings;
pub use crate::config::{grpc_config_in, kubeconfig_in};
use crate::grpc::GrpcError;
use crate::kube_hub::{KubeHubError, config_from_kubeconfig};

/// OCM's label naming a CSR's cluster; its hub approves only CSRs that carry it.
pub(super) const CLUSTER_NAME_LABEL: &str = "open-cluster-management.io/cluster-name";
/// OCM's label naming a CSR's agent.
pub(super) const AGENT_NAME_LABEL: &str = "open-cluster-management.io/agent-name";
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
    pub(super) fn wire(&self) -> Wire {
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

pub(super) fn endpoint_of(config: &kube::Config) -> (String, Option<Vec<u8>>) {
    (
        config.cluster_url.to_string(),
        config.root_cert.as_ref().map(|certs| pem_bundle(certs)),
    )
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

/// Says where the wait for certificate request `name` stands, on either wire.
pub(super) fn say_csr_wait(name: &str, approved: bool) {
    if approved {
        tracing::info!(csr = %name, "waiting for the hub to sign the approved certificate request");
    } else {
        tracing::info!(csr = %name, "waiting for the hub to approve the certificate request (auto-approval, or `kubectl certificate approve {name}` on the hub)");
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
    pub(super) async fn pause(&self) {
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
