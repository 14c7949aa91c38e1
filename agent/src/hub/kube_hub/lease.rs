//! The cluster lease: renewed every lease duration so the hub knows the agent is alive.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

use super::{KubeHubOptions, LEASE_NAME, is_not_found, retry_backoff};

/// `metav1.MicroTime` wire format of now.
fn micro_time_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = crate::work::conditions::now_rfc3339();
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

/// Renews the cluster lease every lease duration, creating it if the hub has none; a failed
/// renewal is retried with backoff (at most a lease duration apart).
pub(super) async fn renew_lease(opts: KubeHubOptions, shutdown: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(opts.client.clone(), &opts.cluster_name);
    let secs = i32::try_from(opts.lease_duration.as_secs())
        .unwrap_or(i32::MAX)
        .max(1);
    let mut backoff = retry_backoff(opts.retry_max.min(opts.lease_duration));
    loop {
        let wait = match renew_once(&api, &opts, secs).await {
            Ok(()) => {
                tracing::debug!("cluster lease renewed");
                backoff.reset();
                opts.lease_duration
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "cannot renew the cluster lease; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One renewal: get and replace (guarded by resourceVersion), or create when absent.
async fn renew_once(api: &Api<Lease>, opts: &KubeHubOptions, secs: i32) -> Result<(), LeaseError> {
    let spec = serde_json::json!({
        "holderIdentity": opts.agent_id,
        "leaseDurationSeconds": secs,
        "renewTime": micro_time_now(),
    });
    match api.get(LEASE_NAME).await {
        Ok(lease) => {
            let mut value = serde_json::to_value(&lease)?;
            if let Some(map) = value.as_object_mut() {
                let current = map.entry("spec").or_insert_with(|| serde_json::json!({}));
                if let (Some(current), Some(new)) = (current.as_object_mut(), spec.as_object()) {
                    current.extend(new.clone());
                }
            }
            let lease: Lease = serde_json::from_value(value)?;
            api.replace(LEASE_NAME, &PostParams::default(), &lease).await?;
        }
        Err(e) if is_not_found(&e) => {
            let lease: Lease = serde_json::from_value(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": opts.cluster_name},
                "spec": spec,
            }))?;
            api.create(&PostParams::default(), &lease).await?;
            tracing::info!("cluster lease created");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_time_has_six_fraction_digits() {
        let t = micro_time_now();
        assert_eq!(t.len(), "2024-01-01T00:00:00.000000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.contains('.'));
    }
}
