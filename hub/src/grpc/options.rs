//! The transport's settings and what they describe: its tunables, what a connection subscribes
//! to, the works the spoke already records, the connection state, and the transport's errors.

use std::time::Duration;

use crate::config::HubSettings;
use crate::metrics::HubMetrics;
use crate::tls::TlsError;

/// Transport failures. Setup errors are returned by `GrpcHub::start`; the rest end one session
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
