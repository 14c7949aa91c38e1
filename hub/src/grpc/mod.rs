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
mod publish;
mod session;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::book::Shared;
use self::session::Runner;
use super::config::HubSettings;
use super::metrics::HubMetrics;
use super::tls::{ClientTls, TlsError};
use super::work_events::{EVENT_BUFFER, HubEvents};
use spokelet_work_api::source::{SinkError, StatusSink, StatusUpdate};

/// Transport failures. Setup errors are returned by [`GrpcHub::start`]; the rest end one session
/// (logged, then reconnect).
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A plaintext URL without `insecure_plaintext`.
    #[error("hub url {0} is plaintext and insecure_plaintext is not set")]
    Plaintext(String),
    /// The endpoint could not be built or connected.
    #[error("connecting to the hub: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The hub URL is not a valid URI.
    #[error("hub url: {0}")]
    Url(String),
    /// The bearer token could not be read or is not a valid header value.
    #[error("hub token: {0}")]
    Token(String),
    /// The hub refused or broke the subscription.
    #[error("subscribe: {0}")]
    Subscribe(#[source] tonic::Status),
    /// Sending the spec resync request failed.
    #[error("spec resync request: {0}")]
    Resync(#[source] tonic::Status),
    /// The event stream failed.
    #[error("event stream: {0}")]
    Stream(#[source] tonic::Status),
    /// The hub closed the event stream.
    #[error("the hub closed the event stream")]
    StreamEnded,
    /// Nothing (not even a heartbeat) was heard for the timeout.
    #[error("no message from the hub for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// Publishing a status failed in a way that suggests the connection is gone.
    #[error("publishing status: {0}")]
    Publish(#[source] tonic::Status),
    /// An RPC did not finish in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// Tunables of the transport. [`GrpcHubOptions::new`] gives production defaults.
#[derive(Debug, Clone)]
pub struct GrpcHubOptions {
    /// Where and how to reach the hub: URL, TLS, token, keepalive and heartbeat timeout.
    pub settings: HubSettings,
    /// Counters and gauges of this transport; register them with [`HubMetrics::register`]
    /// (clones share the series).
    pub metrics: HubMetrics,
    /// Quiet period after a resync before `Synced` (see the module docs).
    pub sync_quiet: Duration,
    /// Longest wait for the quiet period before `Synced` is emitted anyway.
    pub sync_max_wait: Duration,
    /// Works the spoke's records hold from an earlier run, asked about in the first resync.
    pub recorded: Vec<RecordedWork>,
    /// First reconnect delay (jittered by ±50 %).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// TCP + TLS connect timeout; also bounds the subscribe call.
    pub connect_timeout: Duration,
    /// Timeout of one Publish RPC.
    pub publish_timeout: Duration,
    /// How long a shutdown waits for queued statuses to be published (0: not at all).
    pub shutdown_flush: Duration,
    /// What this connection subscribes to: the cluster's works (the engine), or only the hub's
    /// heartbeats under spokelet's node data type (the bare-metal node service, which sends
    /// reports and receives no works).
    pub subscription: Subscription,
    /// Largest gRPC message we decode. Above the codec's 4 MiB payload limit on purpose: an
    /// oversized event is then refused by the codec (logged, reported) instead of breaking the
    /// stream, which would reconnect and receive the same event again.
    pub max_message_size: usize,
    /// The work-engine lease's write gate, when leader election is on: nothing is published
    /// while it is shut (what was queued stays unsent; the next leader reports it), and a
    /// Publish in flight is abandoned when it shuts.
    pub gate: Option<spokelet_kube_client::gate::WriteGate>,
    /// Told when the hub refuses the agent's credentials (see [`credentials_refused`]): a
    /// joined agent's renewal then checks and, if the refusal stands, joins again.
    pub rejected: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl GrpcHubOptions {
    /// Production defaults around `settings`.
    pub fn new(settings: HubSettings) -> Self {
        GrpcHubOptions {
            settings,
            metrics: HubMetrics::default(),
            sync_quiet: Duration::from_secs(2),
            sync_max_wait: Duration::from_secs(30),
            recorded: Vec::new(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            shutdown_flush: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024,
            subscription: Subscription::Works,
            gate: None,
            rejected: None,
        }
    }
}

/// TLS alerts by which a hub refuses the client certificate itself (not the connection):
/// rustls' names, as they appear in the error chain.
const REFUSED_IDENTITY_ALERTS: &[&str] = &[
    "fatal alert: CertificateExpired",
    "fatal alert: UnknownCA",
    "fatal alert: BadCertificate",
    "fatal alert: CertificateRequired",
    "fatal alert: CertificateRevoked",
    "fatal alert: AccessDenied",
];

/// Whether `e` says the hub no longer takes this agent's credentials: a TLS alert about its
/// certificate, or `Unauthenticated`, the gRPC form of a `401`. `PermissionDenied` is not:
/// OCM's hub answers it while it is still making a newly accepted cluster's RBAC.
pub(crate) fn credentials_refused(e: &GrpcError) -> bool {
    let unauthenticated = matches!(e,
        GrpcError::Subscribe(s) | GrpcError::Resync(s) | GrpcError::Stream(s) | GrpcError::Publish(s)
            if s.code() == tonic::Code::Unauthenticated);
    let chain = crate::tls::error_chain(e);
    unauthenticated || REFUSED_IDENTITY_ALERTS.iter().any(|a| chain.contains(a))
}

/// What a connection subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// The cluster's manifest bundles, with a spec resync after every subscribe.
    Works,
    /// Spokelet's node data type: the hub sends heartbeats (liveness), no works; no resync.
    NodeReports,
}

impl Subscription {
    /// The subscription's `data_type`.
    pub fn data_type(self) -> &'static str {
        match self {
            Self::Works => spokelet_proto::MANIFEST_BUNDLES,
            Self::NodeReports => spokelet_proto::NODE_INVENTORIES,
        }
    }
}

/// A work the spoke holds a record of: its hub uid and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedWork {
    pub uid: String,
    pub name: String,
}

/// Connection state, for readiness and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubState {
    /// A subscription is established.
    pub connected: bool,
    /// Successful subscribes so far (1 after the first connect; +1 per reconnect).
    pub sessions: u64,
    /// Failed connect or subscribe attempts and broken sessions so far.
    pub failures: u64,
    /// A resync has gone quiet (`Synced` was emitted) at least once.
    pub synced: bool,
    /// Why the last attempt or session failed (full error chain, no secrets).
    pub last_error: Option<String>,
    /// Spec resync requests sent.
    pub resyncs: u64,
}

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

/// Status sink: buffers the latest status per work and returns at once; the connection task
/// delivers it when the hub is reachable.
#[derive(Debug, Clone)]
pub struct GrpcStatusSink {
    /// The outbox it fills, shared with the connection task.
    shared: Arc<Shared>,
}

impl StatusSink for GrpcStatusSink {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        let r = self.shared.enqueue_status(update);
        Box::pin(async move { r })
    }
}

/// Pool report sink: latest report per kind, delivered by the connection task with the statuses.
#[derive(Debug, Clone)]
pub struct GrpcReportSink {
    /// The outbox it fills, shared with the connection task.
    shared: Arc<Shared>,
}

impl crate::pool_report::PoolReportSink for GrpcReportSink {
    fn cluster_status(&self, status: serde_json::Value, resend: bool) {
        self.shared
            .enqueue_report(crate::cloudevents::ReportBody::ClusterStatus(status), resend);
    }

    fn node_inventory(&self, node: &str, document: Option<serde_json::Value>, resend: bool) {
        self.shared.enqueue_report(
            crate::cloudevents::ReportBody::Node {
                name: node.to_string(),
                document,
            },
            resend,
        );
    }
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

/// A client of the hub `settings` name, for the registration's own subscriptions (the join,
/// the membership): dialed with the transport's defaults and TLS.
pub(crate) async fn dial_hub(settings: &HubSettings) -> Result<dial::Client, GrpcError> {
    let tls = client_tls(settings)?;
    dial::connect(&GrpcHubOptions::new(settings.clone()), tls.as_ref()).await
}

/// The TLS client `settings` ask for: none for a plaintext URL, which must be opted into.
fn client_tls(settings: &HubSettings) -> Result<Option<ClientTls>, GrpcError> {
    if !settings.url.plaintext {
        return Ok(Some(ClientTls::new(settings.tls.clone())?));
    }
    if !settings.insecure_plaintext {
        return Err(GrpcError::Plaintext(settings.url.uri()));
    }
    Ok(None)
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
