//! The per-session status publisher: drains the outbox while a session lives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spokelet_proto::PublishRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::GrpcError;
use super::book::Shared;
use super::dial::Client;
use crate::hub::cloudevents::StatusKind;
use crate::hub::tls::error_chain;
use crate::lock::lock;

/// How long a status the hub refused as too large waits before it is offered again, behind
/// every other queued status (the hub's limit may be raised, or the status shrink meanwhile).
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Whether a failed Publish means the connection is unusable (keep the status and reconnect)
/// rather than the hub refusing this one status. `ResourceExhausted` is a refusal: a gRPC hub
/// answers it for a message over its size limit, and treating that as a broken connection would
/// resend the same status first after every reconnect, stopping all status reporting.
fn is_transport_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Aborted
    )
}

/// The metric label of a gRPC code (`resource_exhausted`, ...).
fn code_label(code: Code) -> String {
    let mut label = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            label.push('_');
        }
        label.push(ch.to_ascii_lowercase());
    }
    label
}

/// Clears the in-flight flag when one send is fully handled (after any requeue).
struct InFlightDone<'a>(&'a Shared);

impl Drop for InFlightDone<'_> {
    fn drop(&mut self) {
        self.0.in_flight.store(false, Ordering::SeqCst);
    }
}

/// Publishes queued statuses until the session ends. A send the connection breaks is put back
/// first in line and reported on `errors`, which ends the session.
pub(super) async fn publish_loop(
    shared: Arc<Shared>,
    mut client: Client,
    timeout: Duration,
    session: CancellationToken,
    errors: mpsc::Sender<GrpcError>,
) {
    loop {
        let Some(out) = shared.next_outgoing() else {
            tokio::select! {
                () = session.cancelled() => return,
                () = shared.outbox_ready.notified() => continue,
            }
        };
        let kind_label = match out.kind {
            StatusKind::Update => "update_request",
            StatusKind::ResyncResponse => "resync_response",
        };
        let req = PublishRequest {
            event: Some(out.event.clone()),
        };
        let result = tokio::select! {
            () = session.cancelled() => {
                lock(&shared.book).outbox.retry_front(out.uid.clone(), out.kind);
                shared.in_flight.store(false, Ordering::SeqCst);
                return;
            }
            r = tokio::time::timeout(timeout, client.publish(req)) => r,
        };
        // Cleared when this iteration ends, after any requeue below.
        let _done = InFlightDone(&shared);
        match result {
            Ok(Ok(_)) => {
                shared.metrics.status(kind_label);
                tracing::debug!(resource_id = %out.uid, kind = kind_label, hash = %out.hash, "status published");
                shared.published(&out);
            }
            Ok(Err(st)) if st.code() == Code::ResourceExhausted => {
                shared.metrics.refused(&code_label(st.code()));
                tracing::warn!(resource_id = %out.uid, error = %error_chain(&st), retry_in = ?REFUSED_RETRY,
                    "hub refused a status as too large; other statuses go first, this one is offered again later");
                shared.defer(&out, REFUSED_RETRY);
            }
            Ok(Err(st)) if !is_transport_failure(st.code()) => {
                shared.metrics.refused(&code_label(st.code()));
                tracing::error!(resource_id = %out.uid, error = %error_chain(&st), "hub refused a status update; dropping it");
            }
            Ok(Err(st)) => {
                lock(&shared.book).outbox.retry_front(out.uid.clone(), out.kind);
                let _ = errors.try_send(GrpcError::Publish(st));
                return;
            }
            Err(_) => {
                lock(&shared.book).outbox.retry_front(out.uid.clone(), out.kind);
                let _ = errors.try_send(GrpcError::Timeout("status publish"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_classified() {
        assert!(is_transport_failure(Code::Unavailable));
        assert!(!is_transport_failure(Code::PermissionDenied));
        assert!(!is_transport_failure(Code::InvalidArgument));
        // A message over the hub's limit is a refusal of that status, not a broken connection.
        assert!(!is_transport_failure(Code::ResourceExhausted));
        assert_eq!(code_label(Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(code_label(Code::Internal), "internal");
    }
}
