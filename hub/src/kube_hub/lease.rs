//! The cluster lease: renewed every lease duration so the hub knows the agent is alive.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::membership::Membership;
use super::options::KubeHubOptions;
use super::retry::{is_not_found, retry_backoff};

/// Name of the lease the agent renews in its cluster namespace.
pub const LEASE_NAME: &str = "managed-cluster-lease";

/// `metav1.MicroTime` wire format of now.
pub(crate) fn micro_time_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = spokelet_work_api::conditions::now_rfc3339();
    // now_rfc3339 is `YYYY-MM-DDTHH:MM:SSZ`; MicroTime adds six fractional digits.
    format!("{}.{:06}Z", secs.trim_end_matches('Z'), d.subsec_micros())
}

/// Lease failures.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("cannot build the lease: {0}")]
    Build(#[from] serde_json::Error),
}

/// Renews the cluster lease while the hub accepts the cluster, as OCM's agent does: at once
/// when accepted (or when the hub changes the duration), then every lease duration jittered by
/// ×[1, 1.25), which spreads a fleet's renewals; a failed renewal is retried with backoff (at
/// most a lease duration apart). Not accepted: no renewal (the hub then marks the cluster
/// unknown, as it should). On a hub without ManagedClusters, every `--hub-lease-duration`.
pub(super) async fn renew_lease(
    opts: KubeHubOptions,
    mut membership: watch::Receiver<Membership>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(opts.client.clone(), &opts.cluster_name);
    let mut backoff = retry_backoff(opts.retry_max.min(opts.lease_duration));
    // The lease as the last renewal left it: the next renewal replaces it without reading it
    // again, one request a period instead of OCM's two (a get and an update).
    let mut last: Option<Lease> = None;
    loop {
        let period = membership.borrow_and_update().lease_period(opts.lease_duration);
        let wait = match period {
            None => None,
            Some(period) => Some(match renew_once(&api, &opts, period, &mut last).await {
                Ok(()) => {
                    tracing::debug!("cluster lease renewed");
                    backoff.reset();
                    jittered(period)
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "cannot renew the cluster lease; retrying");
                    backoff.next_delay().min(period)
                }
            }),
        };
        // Until the next renewal, or until the period itself changes (accepted, refused, a new
        // duration); other changes of the ManagedCluster (its status) do not renew early.
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut sleep => break,
                changed = membership.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if membership.borrow().lease_period(opts.lease_duration) != period {
                        break;
                    }
                }
            }
        }
    }
}

/// `period` stretched by a random factor in [1, 1.25) (OCM's `leaseUpdateJitterFactor`).
pub(crate) fn jittered(period: Duration) -> Duration {
    period.mul_f64(1.0 + rand::random::<f64>() * 0.25)
}

/// One renewal: replace `renewTime` only (guarded by resourceVersion) on the lease as the last
/// renewal left it, or as read now when there is none or someone else changed it since (a
/// conflict); create the lease when the hub has none (a hub without OCM's lease controller).
async fn renew_once(
    api: &Api<Lease>,
    opts: &KubeHubOptions,
    period: Duration,
    last: &mut Option<Lease>,
) -> Result<(), LeaseError> {
    if let Some(mut lease) = last.take() {
        renew_time_now(&mut lease)?;
        match api.replace(LEASE_NAME, &PostParams::default(), &lease).await {
            Ok(renewed) => {
                *last = Some(renewed);
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    match api.get(LEASE_NAME).await {
        Ok(mut lease) => {
            renew_time_now(&mut lease)?;
            *last = Some(api.replace(LEASE_NAME, &PostParams::default(), &lease).await?);
        }
        Err(e) if is_not_found(&e) => {
            let secs = i32::try_from(period.as_secs()).unwrap_or(i32::MAX).max(1);
            let lease: Lease = serde_json::from_value(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": opts.cluster_name},
                "spec": {
                    "holderIdentity": opts.agent_id,
                    "leaseDurationSeconds": secs,
                    "renewTime": micro_time_now(),
                },
            }))?;
            *last = Some(api.create(&PostParams::default(), &lease).await?);
            tracing::info!("cluster lease created");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Sets the lease's `spec.renewTime` to now.
fn renew_time_now(lease: &mut Lease) -> Result<(), LeaseError> {
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.renew_time = Some(serde_json::from_value(micro_time_now().into())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stretches_by_at_most_a_quarter() {
        let period = Duration::from_secs(60);
        for _ in 0..100 {
            let d = jittered(period);
            assert!(d >= period && d < period.mul_f64(1.25), "{d:?}");
        }
    }

    #[test]
    fn micro_time_has_six_fraction_digits() {
        let t = micro_time_now();
        assert_eq!(t.len(), "2024-01-01T00:00:00.000000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.contains('.'));
    }
}
