//! Status to the hub: the sink the engine publishes to, and the task that writes the `status`
//! subresource (and releases deleted works).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::retry::{api_code, is_not_found, pause, retry_backoff};
use super::works::remove_finalizer;
use crate::outbox::Outbox;
use spokelet_base::lock::lock;
use spokelet_work_api::source::{SinkError, StatusSink, StatusUpdate};

/// Status sink writing the `status` subresource; returns at once, writes in the background.
#[derive(Debug, Clone)]
pub struct KubeStatusSink {
    /// Shared with the writer task.
    pub(super) queue: Arc<StatusQueue>,
}

impl StatusSink for KubeStatusSink {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        lock(&self.queue.pending).push(update.name.clone(), update);
        self.queue.ready.notify_one();
        Box::pin(async { Ok(()) })
    }
}

/// Statuses waiting to be written, by work name.
#[derive(Debug, Default)]
pub(super) struct StatusQueue {
    /// Taken through [`lock`], never across an await.
    pending: Mutex<Outbox<StatusUpdate>>,
    /// Wakes the writer when a status is queued.
    ready: Notify,
}

/// Writes queued statuses; after a deleted work's final status, removes the finalizer.
pub(super) async fn write_statuses(
    api: Api<DynamicObject>,
    queue: Arc<StatusQueue>,
    retry_max: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = retry_backoff(retry_max);
    loop {
        let next = lock(&queue.pending).pop();
        let Some((_, update)) = next else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = queue.ready.notified() => continue,
            }
        };
        match write_one(&api, &update).await {
            Ok(()) => backoff.reset(),
            Err(e) => {
                tracing::warn!(work = %update.name, error = %e, attempt = backoff.attempts() + 1,
                    "status write to the hub failed; retrying");
                // At the back, so one work the hub keeps refusing does not hold up the others.
                lock(&queue.pending).retry_back(update.name.clone(), update);
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Whether the hub refused the request body itself: sending it again cannot succeed.
fn is_rejected(e: &kube::Error) -> bool {
    matches!(api_code(e), Some(400 | 413 | 422))
}

/// One status write (and the finalizer removal for a deleted work).
async fn write_one(api: &Api<DynamicObject>, u: &StatusUpdate) -> Result<(), kube::Error> {
    // Merge patch of `status` through the status subresource: the spec and metadata are not
    // ours, and the status subresource ignores everything but `status` anyway.
    let patch = serde_json::json!({ "status": u.status });
    match api
        .patch_status(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => tracing::debug!(work = %u.name, hash = %u.status_hash, "status written to the hub"),
        // Already gone (no finalizer held it): nothing left to report to.
        Err(e) if is_not_found(&e) => return Ok(()),
        // Dropped: the engine sends a new status on the next change. The final status of a
        // deleted work still releases the work below, as the cleanup is done either way.
        Err(e) if is_rejected(&e) => {
            tracing::error!(work = %u.name, error = %e, deleted = u.deleted, "the hub rejected the work's status; dropped")
        }
        Err(e) => return Err(e),
    }
    if u.deleted {
        remove_finalizer(api, &u.name).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_bodies_are_dropped() {
        let api = |code| {
            kube::Error::Api(
                serde_json::from_value(
                    serde_json::json!({"status": "Failure", "code": code, "message": "m"}),
                )
                .unwrap(),
            )
        };
        for code in [400, 413, 422] {
            assert!(is_rejected(&api(code)), "{code}");
        }
        for code in [401, 403, 404, 409, 429, 500, 503] {
            assert!(!is_rejected(&api(code)), "{code}");
        }
        assert!(is_not_found(&api(404)));
    }

    #[tokio::test]
    async fn sink_keeps_latest_per_work() {
        let sink = KubeStatusSink {
            queue: Arc::new(StatusQueue::default()),
        };
        for generation in [1, 2] {
            let u = StatusUpdate {
                name: "w".into(),
                namespace: None,
                uid: None,
                generation,
                status: Default::default(),
                status_hash: String::new(),
                deleted: false,
            };
            sink.publish(u).await.unwrap();
        }
        let mut q = lock(&sink.queue.pending);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop().unwrap().1.generation, 2);
    }
}
