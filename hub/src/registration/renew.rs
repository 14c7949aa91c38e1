//! Keeping the hub certificate fresh: with 20 to 25 % of its lifetime left (OCM's rule, drawn per
//! certificate) the agent asks for a new one in its own name, which OCM's hub approves for an
//! accepted cluster; the kept Secret and the files are replaced, and the hub transport presents the
//! new certificate on its next connection while the watch stays on its own. A certificate that
//! expires all the same (the hub never signed), or that the hub stops taking (it answers `401`, or
//! over gRPC a TLS alert about the certificate or `Unauthenticated`: its CA changed, say), or a
//! deleted credential Secret, sends the agent back to its bootstrap credential to join again, as
//! OCM's agent rebootstraps.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::csr::Issued;
use super::join::{Bootstrap, JoinError, JoinSettings, hub_endpoint, kubeconfig_in};
use super::over_kube::obtain;
use crate::kube_hub::{config_from_kubeconfig, hub_client};
use spokelet_base::backoff::ExponentialBackoff;

/// How long after a `401` the hub's answers are looked at again before joining again: a
/// certificate switched a moment ago (by a renewal) gets that long to reach the connections.
const REJECTION_SETTLE: Duration = Duration::from_secs(2);

/// How often the kept Secret is looked for: one GET of the spoke a minute. A deleted Secret
/// sends the agent back to its bootstrap credential, as OCM's agent does.
const SECRET_CHECK: Duration = Duration::from_secs(60);

/// What woke the renewal task.
enum Wake {
    /// The hub answered `401`.
    Rejected,
    /// Renewal is due, or the Secret is to be looked for.
    Timer,
}

/// Renews the certificate in `s.dir` until `stop`; `rejected` is told of every `401` from the
/// hub. See the module docs.
pub async fn keep_renewed(s: JoinSettings, rejected: Arc<Notify>, stop: CancellationToken) {
    let mut task = Renewal {
        s,
        // Failed renewals and joins are tried again with the shared backoff, up to a few
        // minutes apart, for as long as the certificate lasts.
        backoff: ExponentialBackoff::new(Duration::from_secs(5), Duration::from_secs(300), 0.2),
        stop,
    };
    while task.turn(&rejected).await {}
}

/// The renewal task's state.
struct Renewal {
    s: JoinSettings,
    backoff: ExponentialBackoff,
    stop: CancellationToken,
}

impl Renewal {
    /// One turn: waits for whatever comes first and acts on it; false once stopped.
    async fn turn(&mut self, rejected: &Notify) -> bool {
        let issued = match current(&self.s) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the hub certificate to renew it; looking again later");
                return pause(self.backoff.next_delay(), &self.stop).await;
            }
        };
        let now = SystemTime::now();
        if now >= issued.not_after {
            return self.rejoin("the hub certificate expired without renewal").await;
        }
        let due = issued.renew_at().duration_since(now).unwrap_or_default();
        // A stop first when several are ready.
        let wake = tokio::select! {
            biased;
            () = self.stop.cancelled() => return false,
            () = rejected.notified() => Wake::Rejected,
            () = tokio::time::sleep(due.min(SECRET_CHECK)) => Wake::Timer,
        };
        match wake {
            Wake::Rejected if still_refused(&self.s, &self.stop).await => {
                self.rejoin("the hub no longer takes the agent's certificate (a 401; over gRPC a TLS alert or Unauthenticated)")
                    .await
            }
            Wake::Rejected => true,
            // Looked for before any renewal, which would write it again unnoticed.
            Wake::Timer if self.s.keeping.gone(&self.s.dir).await => {
                self.rejoin("the kept hub credentials were deleted").await
            }
            Wake::Timer if SystemTime::now() >= issued.renew_at() => self.renew(&issued).await,
            Wake::Timer => true,
        }
    }

    /// Renews, bounded by the certificate's expiry.
    async fn renew(&mut self, issued: &Issued) -> bool {
        let left = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let renewal = tokio::time::timeout(left, renew_once(&self.s));
        let outcome = tokio::select! {
            r = renewal => r,
            () = self.stop.cancelled() => return false,
        };
        match outcome {
            Ok(Ok(next)) => {
                self.backoff.reset();
                tracing::info!(cluster = %self.s.cluster, not_after = ?next.not_after, "hub certificate renewed");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "hub certificate renewal failed; retrying");
                pause(self.backoff.next_delay(), &self.stop).await
            }
            // The certificate ran out while waiting: the next turn joins again.
            Err(_) => true,
        }
    }

    /// Joins again with the bootstrap credential, whatever is kept.
    async fn rejoin(&mut self, why: &str) -> bool {
        tracing::warn!(cluster = %self.s.cluster, why, "joining again with the bootstrap credential");
        let joined = tokio::select! {
            r = super::ensure::join(&self.s) => r,
            () = self.stop.cancelled() => return false,
        };
        match joined {
            Ok(_) => {
                self.backoff.reset();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "joining again failed; retrying");
                pause(self.backoff.next_delay(), &self.stop).await
            }
        }
    }
}

/// Why the certificate the transport runs from cannot be looked at.
#[derive(Debug, thiserror::Error)]
enum CurrentError {
    #[error("reading {0}: {1}")]
    Read(std::path::PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Unreadable(#[from] super::csr::CsrError),
}

/// The certificate the transport runs from now.
fn current(s: &JoinSettings) -> Result<Issued, CurrentError> {
    let path = s.dir.join(super::store::CERT);
    let pem = std::fs::read(&path).map_err(|e| CurrentError::Read(path, e))?;
    Ok(Issued::from_pem(&pem)?)
}

/// Whether the hub still refuses the certificate a moment after a `401` (over gRPC: a TLS
/// alert about it, or `Unauthenticated`): after [`REJECTION_SETTLE`], one request of the
/// agent's own (its ManagedCluster) with the certificate on disk now, so a lone refusal
/// answered while a renewed certificate was being picked up is let pass.
async fn still_refused(s: &JoinSettings, stop: &CancellationToken) -> bool {
    if !pause(REJECTION_SETTLE, stop).await {
        return false;
    }
    let security = match &s.bootstrap {
        Bootstrap::Kube { security, .. } => security,
        Bootstrap::Grpc(bootstrap) => return super::over_grpc::refuses_kept(s, bootstrap).await,
    };
    let path = kubeconfig_in(&s.dir);
    let Ok(config) = config_from_kubeconfig(&path).await else {
        return false;
    };
    let Ok(hub) = hub_client(config, &path, *security) else {
        return false;
    };
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::all_with(hub, &crate::kube_hub::managed_cluster_resource());
    matches!(api.get_opt(&s.cluster).await, Err(kube::Error::Api(e)) if e.code == 401)
}

/// One renewal: a new key and request sent with the current certificate, the new
/// certificate waited for, checked, kept and written.
async fn renew_once(s: &JoinSettings) -> Result<Issued, JoinError> {
    let endpoint = hub_endpoint(s).await?;
    match &s.bootstrap {
        Bootstrap::Kube { security, .. } => {
            let path = kubeconfig_in(&s.dir);
            let config = config_from_kubeconfig(&path)
                .await
                .map_err(JoinError::Bootstrap)?;
            let hub = hub_client(config, &path, *security).map_err(JoinError::Bootstrap)?;
            let (issued, _) = obtain(s, &hub, endpoint.0, endpoint.1).await?;
            Ok(issued)
        }
        Bootstrap::Grpc(bootstrap) => super::over_grpc::renew(s, bootstrap, endpoint).await,
    }
}

/// Sleeps `d` unless `stop` comes first; whether to go on.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.cancelled() => false,
    }
}
