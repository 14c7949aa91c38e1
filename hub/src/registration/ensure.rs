//! Which join runs: the credentials kept from an earlier join while they still name this
//! cluster and agent and have not expired, else a join over the bootstrap credential's wire.

use std::path::PathBuf;
use std::time::SystemTime;

use super::csr::Issued;
use super::join::{Bootstrap, JoinError, JoinSettings, hub_endpoint};
use super::store::Credentials;

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
        Bootstrap::Kube { kubeconfig, security } => super::over_kube::join(s, kubeconfig, *security).await,
        Bootstrap::Grpc(settings) => super::over_grpc::join(s, settings).await,
    }
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
