//! Keeping the hub certificate fresh: with a fifth of its lifetime left (OCM's rule) the agent
//! asks for a new one in its own name, which OCM's hub approves for an accepted cluster; the
//! kept Secret and the files are replaced, and the hub transport presents the new certificate
//! on its next connection while the watch stays on its own. A certificate that expires all the
//! same (the hub never signed), or that the hub stops taking (it answers `401`: its CA
//! changed, say), sends the agent back to its bootstrap credential to join again, as OCM's agent
//! rebootstraps.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::csr::Issued;
use super::join::{JoinError, JoinSettings, ensure_joined, hub_endpoint, obtain};
use crate::backoff::ExponentialBackoff;
use crate::hub::kube_hub::{config_from_kubeconfig, hub_client};

/// How long after a `401` the hub's answers are looked at again before joining again: a
/// certificate switched a moment ago (by a renewal) gets that long to reach the connections.
const REJECTION_SETTLE: Duration = Duration::from_secs(2);

/// Renews the certificate in `s.dir` until `stop`; `rejected` is told of every `401` from the
/// hub. See the module docs.
pub async fn keep_renewed(
    s: JoinSettings,
    spoke: kube::Client,
    rejected: Arc<Notify>,
    stop: CancellationToken,
) {
    // Failed renewals are tried again with the shared backoff, up to a few minutes apart, for
    // as long as the certificate lasts.
    let mut backoff = ExponentialBackoff::new(Duration::from_secs(5), Duration::from_secs(300), 0.2);
    loop {
        let issued = match std::fs::read(s.dir.join("tls.crt"))
            .map_err(|e| e.to_string())
            .and_then(|pem| Issued::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the hub certificate to renew it; looking again later");
                if !pause(backoff.next_delay(), &stop).await {
                    return;
                }
                continue;
            }
        };
        let now = SystemTime::now();
        if now >= issued.not_after {
            tracing::warn!(cluster = %s.cluster, "the hub certificate expired without renewal; joining again with the bootstrap credential");
            match ensure_joined(&s, &spoke).await {
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::error!(error = %e, "joining again failed; retrying");
                    if !pause(backoff.next_delay(), &stop).await {
                        return;
                    }
                }
            }
            continue;
        }
        let wait = issued.renew_at().duration_since(now).unwrap_or_default();
        if !wait.is_zero() {
            tracing::debug!(in_secs = wait.as_secs(), "hub certificate renewal scheduled");
            let refused = tokio::select! {
                () = tokio::time::sleep(wait) => false,
                () = rejected.notified() => true,
                () = stop.cancelled() => return,
            };
            if refused && still_refused(&s, &stop).await {
                tracing::warn!(cluster = %s.cluster, "the hub no longer takes the agent's certificate (401); joining again with the bootstrap credential");
                match rejoin(&s, &spoke).await {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        tracing::error!(error = %e, "joining again failed; retrying");
                        if !pause(backoff.next_delay(), &stop).await {
                            return;
                        }
                    }
                }
                continue;
            }
            if refused {
                continue;
            }
        }
        let left = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let renewal = tokio::time::timeout(left, renew_once(&s, &spoke));
        let outcome = tokio::select! {
            r = renewal => r,
            () = stop.cancelled() => return,
        };
        match outcome {
            Ok(Ok(next)) => {
                backoff.reset();
                tracing::info!(cluster = %s.cluster, not_after = ?next.not_after, "hub certificate renewed");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "hub certificate renewal failed; retrying");
                if !pause(backoff.next_delay(), &stop).await {
                    return;
                }
            }
            // The certificate ran out while waiting: the next turn joins again.
            Err(_) => {}
        }
    }
}

/// Whether the hub still refuses the certificate a moment after a `401`: after
/// [`REJECTION_SETTLE`], one request of the agent's own (its ManagedCluster) with the
/// certificate on disk now, so a lone `401` answered while a renewed certificate was being
/// picked up is let pass.
async fn still_refused(s: &JoinSettings, stop: &CancellationToken) -> bool {
    if !pause(REJECTION_SETTLE, stop).await {
        return false;
    }
    let path = s.dir.join("kubeconfig");
    let Ok(config) = config_from_kubeconfig(&path).await else {
        return false;
    };
    let Ok(hub) = hub_client(config, &path, s.security) else {
        return false;
    };
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::all_with(hub, &crate::hub::kube_hub::managed_cluster_resource());
    matches!(api.get_opt(&s.cluster).await, Err(kube::Error::Api(e)) if e.code == 401)
}

/// Joins again with the bootstrap credential, whatever is kept.
async fn rejoin(s: &JoinSettings, spoke: &kube::Client) -> Result<(), JoinError> {
    super::join::join(s, spoke).await.map(drop)
}

/// One renewal: a new key and request sent with the current certificate, the new
/// certificate waited for, checked, kept and written.
async fn renew_once(s: &JoinSettings, spoke: &kube::Client) -> Result<Issued, JoinError> {
    let path = s.dir.join("kubeconfig");
    let config = config_from_kubeconfig(&path)
        .await
        .map_err(JoinError::Bootstrap)?;
    let hub = hub_client(config, &path, s.security).map_err(JoinError::Bootstrap)?;
    let (server, ca_pem) = hub_endpoint(&s.bootstrap_kubeconfig).await?;
    let (issued, _) = obtain(s, spoke, &hub, server, ca_pem).await?;
    Ok(issued)
}

/// Sleeps `d` unless `stop` comes first; whether to go on.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.cancelled() => false,
    }
}
