//! The per-session status publisher: drains the outbox while a session lives.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use spokelet_proto::PublishRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::book::{Outgoing, Shared};
use super::dial::Client;
use super::options::GrpcError;
use crate::cloudevents::StatusKind;
use crate::tls::error_chain;
use spokelet_base::lock::lock;
use spokelet_kube_client::gate::WriteGate;

/// How long a status the hub refused as too large waits before it is offered again, behind
/// every other queued status (the hub's limit may be raised, or the status shrink meanwhile).
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// How long a status the hub could not write for a conflict waits before it is offered again.
/// OCM's gRPC server answers `FailedPrecondition` when its write of the ManifestWork's status
/// met a newer object (409 Conflict): on a work's first status it adds its finalizer and then
/// patches the status against the object it read before, which conflicts every time. Sent again,
/// the same status goes through, as OCM's own agent's requeue does.
const CONFLICT_RETRY: Duration = Duration::from_secs(1);

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

/// Publish RPCs in flight at once. One at a time, the hub's round trip bounded the agent to a
/// few hundred statuses a second (5,000 new works took a minute to report); several share the
/// HTTP/2 connection. Each work still has at most one in flight, so its statuses stay in order.
const MAX_IN_FLIGHT: usize = 16;

/// How one send ended, for the loop to act on.
enum Sent {
    /// Delivered, or refused for itself (the hub keeps the connection): carry on.
    Done,
    /// The connection is unusable: end the session.
    Broken(GrpcError),
}

/// Publishes queued statuses until the session ends, up to [`MAX_IN_FLIGHT`] at once. A send the
/// connection breaks is put back first in line and reported on `errors`, which ends the
/// session; sends still in flight then are put back too (the hub ignores a repeat).
pub(super) async fn publish_loop(
    shared: Arc<Shared>,
    client: Client,
    timeout: Duration,
    gate: Option<WriteGate>,
    session: CancellationToken,
    errors: mpsc::Sender<GrpcError>,
) {
    let mut flying = FuturesUnordered::new();
    // uid → kind of what is in flight, to put back if the session ends first.
    let mut aboard: HashMap<String, StatusKind> = HashMap::new();
    // Without leadership nothing is taken from the outbox, and a send lasts at most until the
    // gate shuts: a deposed leader's queued statuses never reach the hub.
    let allowed = || {
        gate.as_ref()
            .map_or(Some(timeout), |g| g.is_open().then(|| timeout.min(g.remaining())))
    };
    loop {
        while flying.len() < MAX_IN_FLIGHT {
            let Some(limit) = allowed() else { break };
            let Some(out) = shared.next_outgoing() else { break };
            aboard.insert(out.uid.clone(), out.kind);
            flying.push(send(client.clone(), out, limit));
        }
        let ended = tokio::select! {
            () = session.cancelled() => None,
            () = shared.outbox_ready.notified(), if flying.len() < MAX_IN_FLIGHT => continue,
            Some((out, result)) = flying.next(), if !flying.is_empty() => {
                aboard.remove(&out.uid);
                match take_result(&shared, &out, result) {
                    Sent::Done => continue,
                    Sent::Broken(e) => Some(e),
                }
            }
        };
        for (uid, kind) in aboard.drain() {
            lock(&shared.book).outbox.retry_front(uid.clone(), kind);
            shared.finished(&uid);
        }
        if let Some(e) = ended {
            let _ = errors.try_send(e);
        }
        return;
    }
}

/// One Publish, bounded by `timeout`; hands the status back with the outcome.
async fn send(
    mut client: Client,
    out: Outgoing,
    timeout: Duration,
) -> (
    Outgoing,
    Result<Result<tonic::Response<()>, tonic::Status>, tokio::time::error::Elapsed>,
) {
    let req = PublishRequest {
        event: Some(out.event.clone()),
    };
    let result = tokio::time::timeout(timeout, client.publish(req)).await;
    (out, result)
}

/// Ends a refused send and offers the same status again after `delay`, behind the others.
fn offer_again(shared: &Arc<Shared>, out: &Outgoing, delay: Duration) -> Sent {
    shared.finished(&out.uid);
    shared.defer(out, delay);
    Sent::Done
}

/// Books one send's outcome: delivered, refused (this status only) or a broken connection (the
/// status put back first in line).
fn take_result(
    shared: &Arc<Shared>,
    out: &Outgoing,
    result: Result<Result<tonic::Response<()>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Sent {
    let kind_label = match out.kind {
        StatusKind::Update => "update_request",
        StatusKind::ResyncResponse => "resync_response",
    };
    let broken = match result {
        Ok(Ok(_)) => {
            shared.metrics.status(kind_label);
            tracing::debug!(resource_id = %out.uid, kind = kind_label, hash = %out.hash, "status published");
            shared.published(out);
            return Sent::Done;
        }
        Ok(Err(st)) if st.code() == Code::ResourceExhausted => {
            shared.metrics.refused(&code_label(st.code()));
            tracing::warn!(resource_id = %out.uid, error = %error_chain(&st), retry_in = ?REFUSED_RETRY,
                "hub refused a status as too large; other statuses go first, this one is offered again later");
            return offer_again(shared, out, REFUSED_RETRY);
        }
        Ok(Err(st)) if st.code() == Code::FailedPrecondition => {
            shared.metrics.refused(&code_label(st.code()));
            tracing::debug!(resource_id = %out.uid, error = %error_chain(&st), retry_in = ?CONFLICT_RETRY,
                "the hub's object changed under the status write; offered again");
            return offer_again(shared, out, CONFLICT_RETRY);
        }
        Ok(Err(st)) if !is_transport_failure(st.code()) => {
            shared.metrics.refused(&code_label(st.code()));
            tracing::error!(resource_id = %out.uid, error = %error_chain(&st), "hub refused a status update; dropping it");
            shared.finished(&out.uid);
            return Sent::Done;
        }
        Ok(Err(st)) => GrpcError::Publish(st),
        Err(_) => GrpcError::Timeout("status publish"),
    };
    lock(&shared.book).outbox.retry_front(out.uid.clone(), out.kind);
    shared.finished(&out.uid);
    Sent::Broken(broken)
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
