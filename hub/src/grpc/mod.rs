//! The CloudEvents-over-gRPC hub transport: a [`WorkSource`](spokelet_work_api::source::WorkSource) and
//! [`StatusSink`] backed by one subscription.
//!
//! One background task owns the connection. Per session it dials (mTLS through
//! [`HubConnector`](crate::tls::HubConnector)), subscribes for this cluster's manifest bundles,
//! sends `spec.resync_request` listing the works it delivered and the engine still holds, then
//! reads events until the stream ends or the hub is silent past the heartbeat timeout, and
//! reconnects with jittered exponential backoff. Status updates from the engine go into an outbox
//! that keeps only the latest status per work; a per-session publisher drains it while connected,
//! so status produced while disconnected is sent once, after the reconnect.
//!
//! After each session's resync the transport emits `WorkEvent::Synced(Listing::Quiet)`: the
//! protocol has no "end of resync" marker, so we wait until no spec event has arrived for a quiet
//! period (default 2 s) after the hub acknowledged our resync request, capped by a maximum wait.
//! That proves nothing about works the hub did not send, so the engine treats those as missing
//! (kept, evicted only after its grace period), never as deleted. Deletion evidence is an
//! explicit delete: the resync request lists every work the agent holds (after a restart, the
//! spoke's records, as version 0 so the hub re-sends all it still has), and the hub answers the
//! ones it no longer has with delete events. A broken session emits `WorkEvent::Disconnected`.
//!
//! - `session`: the connection task (dial, subscribe, resync, read, reconnect).
//! - `events`: what each incoming event does.
//! - `book`: what the transport remembers about works and the status outbox.
//! - `publish`: the per-session status publisher.
//! - `objects`: one data type of OCM's gRPC registration followed (ManagedClusters, leases, CSRs).
//! - `membership`: the cluster's `Joined`/`Available` conditions, lease and status over gRPC.

mod book;
pub(crate) mod dial;
mod events;
pub mod membership;
pub(crate) mod objects;
mod options;
mod publish;
mod session;
mod sinks;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::book::Shared;
use self::dial::client_tls;
pub(crate) use self::dial::dial_hub;
pub(crate) use self::options::credentials_refused;
pub use self::options::{GrpcError, GrpcHubOptions, HubState, RecordedWork, Subscription};
use self::session::Runner;
pub use self::sinks::{GrpcReportSink, GrpcStatusSink};
use super::work_events::{EVENT_BUFFER, HubEvents};

/// Observes the transport.
#[derive(Debug, Clone)]
pub struct HubHandle {
    state: watch::Receiver<HubState>,
}

impl HubHandle {
    /// The state now.
    pub fn state(&self) -> HubState {
        self.state.borrow().clone()
    }

    /// Waits until `pred` holds for the state (returns at once if it already does).
    pub async fn wait_for(&mut self, pred: impl FnMut(&HubState) -> bool) -> HubState {
        let done = self.state.wait_for(pred).await.map(|s| s.clone());
        // Err: the task ended; report the final state.
        done.unwrap_or_else(|_| self.state.borrow().clone())
    }
}

/// The running transport: hand `source` and `sink` to the engine.
#[derive(Debug)]
pub struct GrpcHub {
    /// Work events for the engine, in the order the hub sent them; `recv` is cancel-safe.
    pub source: HubEvents,
    /// Takes the engine's statuses and returns at once; the connection task delivers them.
    pub sink: GrpcStatusSink,
    /// Takes pool reports (ManagedCluster status, node inventories) the same way.
    pub reports: GrpcReportSink,
    /// Readiness and test observers of the connection.
    pub handle: HubHandle,
    /// The background task; ends after `shutdown` is cancelled.
    pub task: JoinHandle<()>,
}

impl GrpcHub {
    /// Validates the settings, loads TLS material (failing fast on a bad setup) and starts the
    /// connection task. Must be called inside a tokio runtime.
    pub fn start(opts: GrpcHubOptions, shutdown: CancellationToken) -> Result<GrpcHub, GrpcError> {
        let s = &opts.settings;
        let tls = client_tls(s)?;
        if let Some(tls) = &tls {
            // Validate the server name now rather than at the first connect.
            tls.connector(&s.url.host, s.url.port)?;
        }
        let shared = Arc::new(Shared::new(&s.cluster_name, &s.agent_id, opts.metrics.clone()));
        shared.hold_recorded(&opts.recorded);
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (state_tx, state_rx) = watch::channel(HubState::default());
        let span =
            tracing::info_span!("hub", transport = "grpc", url = %s.url.uri(), cluster = %s.cluster_name);
        let runner = Runner {
            opts,
            tls,
            shared: shared.clone(),
            events: tx,
            state: state_tx,
            shutdown,
        };
        let task = tokio::spawn(runner.run().instrument(span));
        Ok(GrpcHub {
            source: rx,
            sink: GrpcStatusSink {
                shared: shared.clone(),
            },
            reports: GrpcReportSink { shared },
            handle: HubHandle { state: state_rx },
            task,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_told_from_a_refused_request() {
        let alert =
            tonic::Status::unavailable("error trying to connect: received fatal alert: BadCertificate");
        assert!(credentials_refused(&GrpcError::Subscribe(alert)));
        assert!(credentials_refused(&GrpcError::Stream(
            tonic::Status::unauthenticated("no client certificate")
        )));
        // RBAC still being made for a cluster just accepted, and a hub that is down.
        assert!(!credentials_refused(&GrpcError::Subscribe(
            tonic::Status::permission_denied("access denied")
        )));
        assert!(!credentials_refused(&GrpcError::Subscribe(
            tonic::Status::unavailable("connection refused")
        )));
        assert!(!credentials_refused(&GrpcError::StreamEnded));
    }
}
