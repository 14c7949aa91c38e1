//! What the engine does before its loop: the AppliedManifestWork CRD installed and served, and
//! this hub's records listed, each asked for again while the spoke's API server is not ready.

use std::collections::HashMap;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use tokio_util::sync::CancellationToken;

use super::applied_work::{self, AppliedWorkError};
use super::context::ReconcileContext;
use super::manifestwork::AppliedManifestWork;
use super::object::ObjKey;
use spokelet_base::backoff::ExponentialBackoff;
use spokelet_base::lock::lock;

/// Engine failures (only start-up can fail; per-work problems go to status).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Installing the AppliedManifestWork CRD failed.
    #[error("installing the AppliedManifestWork CRD: {0}")]
    Crd(#[source] AppliedWorkError),
    /// Listing existing AppliedManifestWorks failed.
    #[error("listing AppliedManifestWorks: {0}")]
    List(#[source] kube::Error),
}

/// Jitter of the start's retry delays.
const RETRY_JITTER: f64 = 0.2;

/// Records of this hub left by a previous run, by work name: their objects are claimed, and
/// works the hub no longer has are cleaned up on evidence of that (see [`EngineLoop::on_synced`]).
/// None when `shutdown` came while the list was still being asked for.
pub(crate) async fn load_records(
    ctx: &ReconcileContext,
    shutdown: &CancellationToken,
) -> Result<Option<HashMap<String, AppliedManifestWork>>, EngineError> {
    let Some(list) = list_records(&ctx.amw_api, &ctx.hub_hashes(), shutdown).await? else {
        return Ok(None);
    };
    let mut records = HashMap::new();
    for amw in list {
        let work = amw.spec.manifest_work_name.clone();
        if amw.spec.hub_hash != ctx.cfg.hub_hash {
            // Written under another spelling of this hub's address: the work keeps that record.
            tracing::info!(work = %work, record = %amw.name_any(), "adopting a record written under another spelling of the hub address");
            lock(&ctx.record_names).insert(work.clone(), amw.name_any());
        }
        let mut claims = lock(&ctx.claims);
        for e in applied_work::resources(&amw) {
            claims.preload(&ObjKey::from(&e), &work);
        }
        drop(claims);
        records.insert(work, amw);
    }
    Ok(Some(records))
}

/// Installs the AppliedManifestWork CRD and waits until it is served, trying again while the
/// API server's answer is one that passes (see [`passes`]), or the CRD is slow to become
/// Established; false when `shutdown` came first.
pub(crate) async fn install_crd(
    ctx: &ReconcileContext,
    shutdown: &CancellationToken,
) -> Result<bool, EngineError> {
    let mut backoff = startup_backoff();
    loop {
        let error = match applied_work::install_crd(&ctx.client).await {
            Ok(()) => return Ok(true),
            Err(AppliedWorkError::Api { source, .. }) if passes(&source) => source.to_string(),
            Err(e @ AppliedWorkError::NotEstablished(_)) => e.to_string(),
            Err(e) => return Err(EngineError::Crd(e)),
        };
        if !wait_to_ask_again(
            &mut backoff,
            shutdown,
            "install the AppliedManifestWork CRD",
            &error,
        )
        .await
        {
            return Ok(false);
        }
    }
}

/// The backoff of the engine's start: 200 ms doubling to 30 s.
fn startup_backoff() -> ExponentialBackoff {
    ExponentialBackoff::new(Duration::from_millis(200), Duration::from_secs(30), RETRY_JITTER)
}

/// Says why the start is held up and waits the next backoff delay; false when `shutdown` came
/// first.
async fn wait_to_ask_again(
    backoff: &mut ExponentialBackoff,
    shutdown: &CancellationToken,
    what: &str,
    error: &str,
) -> bool {
    let delay = backoff.next_delay();
    tracing::warn!(%error, retry_in = ?delay, "cannot {what} yet; asking again");
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Lists this hub's records, asking again while the API server's answer is one that passes (a
/// CRD's storage still (re)initializing, which a loaded Kubernetes 1.3x answers with 429 even
/// after the CRD is Established and served once; an overloaded or restarting server; a dropped
/// connection): a slow spoke must not stop the agent, and nothing is applied or deleted until
/// the records are known. An answer that cannot pass (forbidden, say) ends the engine.
async fn list_records(
    api: &Api<AppliedManifestWork>,
    hub_hashes: &[String],
    shutdown: &CancellationToken,
) -> Result<Option<Vec<AppliedManifestWork>>, EngineError> {
    let mut backoff = startup_backoff();
    loop {
        match applied_work::list_for_hub(api, hub_hashes).await {
            Ok(list) => return Ok(Some(list)),
            Err(e) if passes(&e) => {
                let error = e.to_string();
                if !wait_to_ask_again(&mut backoff, shutdown, "list the AppliedManifestWorks", &error).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(EngineError::List(e)),
        }
    }
}

/// Whether a failed request may succeed when asked again: the server was busy, restarting or
/// unreachable, rather than refusing.
fn passes(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Client;
    use std::sync::Arc;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            serde_json::from_value(serde_json::json!({"status": "Failure", "code": code, "message": "m"}))
                .unwrap(),
        )
    }

    #[test]
    fn a_busy_or_restarting_api_server_is_asked_again_and_a_refusal_is_not() {
        for code in [429, 500, 502, 503, 504] {
            assert!(passes(&api(code)), "{code}");
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(!passes(&api(code)), "{code}");
        }
    }

    /// An API server that answers the records' list with `codes` in turn, then an empty list;
    /// returns the client and how many requests it served.
    fn answering(codes: Vec<u16>) -> (Client, Arc<std::sync::atomic::AtomicUsize>) {
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let svc = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (code, body) = match codes.get(n) {
                Some(&code) => (
                    code,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "code": code, "message": "storage is (re)initializing", "reason": "TooManyRequests"}),
                ),
                None => (
                    200,
                    serde_json::json!({"kind": "AppliedManifestWorkList",
                        "apiVersion": "work.open-cluster-management.io/v1", "metadata": {}, "items": []}),
                ),
            };
            let response = http::Response::builder()
                .status(code)
                .body(kube::client::Body::from(body.to_string().into_bytes()))
                .unwrap();
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        (Client::new(svc, "default"), served)
    }

    #[tokio::test(start_paused = true)]
    async fn the_records_are_asked_for_again_while_the_api_server_is_not_ready() {
        let (client, served) = answering(vec![429, 503, 429]);
        let listed = list_records(&Api::all(client), &["h".into()], &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(listed.map(|l| l.len()), Some(0));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 4);

        // A refusal is not asked again: the engine stops with it.
        let (client, served) = answering(vec![403]);
        let refused = list_records(&Api::all(client), &["h".into()], &CancellationToken::new()).await;
        assert!(matches!(refused, Err(EngineError::List(_))), "{refused:?}");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Shut down while the spoke is still not ready: no error, nothing listed.
        let (client, _) = answering(vec![429; 100]);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let stopped = list_records(&Api::all(client), &["h".into()], &shutdown)
            .await
            .unwrap();
        assert!(stopped.is_none());
    }
}
