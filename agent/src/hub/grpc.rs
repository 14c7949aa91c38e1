//! The CloudEvents-over-gRPC hub transport: a [`WorkSource`] and [`StatusSink`] backed by one subscription.
//!
//! One background task owns the connection. Per session it dials (mTLS through
//! [`HubConnector`]), subscribes for this cluster's manifest bundles,
//! sends `spec.resync_request` listing the works it delivered and the engine still holds, then
//! reads events until the stream ends or the hub is silent past the heartbeat timeout, and
//! reconnects with jittered exponential backoff. Status updates from the engine go into an outbox
//! that keeps only the latest status per work; a per-session publisher drains it while connected,
//! so status produced while disconnected is sent once, after the reconnect.
//!
//! `WorkEvent::Synced` is emitted once, after the first resync: the protocol has no "end of
//! resync" marker, so we wait until no spec event has arrived for a quiet period (default 2 s)
//! after the hub acknowledged our resync request (the reference hub queues its answers before it
//! acknowledges), capped by a maximum wait so a busy hub cannot hold it back for ever. Later
//! resyncs need no Synced: a hub answers them with explicit delete events.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::ResourceExt;
use spokelet_proto::{
    CloudEvent, CloudEventServiceClient, MANIFEST_BUNDLES, PublishRequest, SubscriptionRequest,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use super::cloudevents::{
    self, CodecError, Incoming, ResourceVersion, SequenceIds, SpecEvent, StatusHash, StatusKind,
    StatusTarget, WireMeta,
};
use super::config::HubSettings;
use super::metrics::HubMetrics;
use super::tls::{ClientTls, HubConnector, TlsError, error_chain};
use crate::backoff::ExponentialBackoff;
use crate::work::conditions::{FALSE, cond, now_rfc3339, types};
use crate::work::manifestwork::ManifestWorkStatus;
use crate::work::source::{SinkError, StatusSink, StatusUpdate, WorkEvent, WorkRef, WorkSource};

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
    /// Connection settings.
    pub settings: HubSettings,
    /// Metrics (register them with [`HubMetrics::register`]).
    pub metrics: HubMetrics,
    /// Quiet period after the first resync before `Synced` (see the module docs).
    pub sync_quiet: Duration,
    /// Longest wait for the quiet period before `Synced` is emitted anyway.
    pub sync_max_wait: Duration,
    /// First reconnect delay (jittered by ±50 %).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one Publish RPC.
    pub publish_timeout: Duration,
    /// How long a shutdown waits for queued statuses to be published (0: not at all).
    pub shutdown_flush: Duration,
    /// Largest gRPC message we decode. Above the codec's 4 MiB payload limit on purpose: an
    /// oversized event is then refused by the codec (logged, reported) instead of breaking the
    /// stream, which would reconnect and receive the same event again.
    pub max_message_size: usize,
}

impl GrpcHubOptions {
    /// Production defaults around `settings`.
    pub fn new(settings: HubSettings) -> Self {
        GrpcHubOptions {
            settings,
            metrics: HubMetrics::default(),
            sync_quiet: Duration::from_secs(2),
            sync_max_wait: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            shutdown_flush: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024,
        }
    }
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
    /// `Synced` was emitted.
    pub synced: bool,
    /// Why the last attempt or session failed (full error chain, no secrets).
    pub last_error: Option<String>,
    /// Spec resync requests sent.
    pub resyncs: u64,
}

/// Observes the transport.
#[derive(Debug, Clone)]
pub struct HubHandle {
    /// Latest state.
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
    /// Work events for the engine.
    pub source: GrpcWorkSource,
    /// Status from the engine.
    pub sink: GrpcStatusSink,
    /// Connection state.
    pub handle: HubHandle,
    /// The background task; ends after `shutdown` is cancelled.
    pub task: JoinHandle<()>,
}

/// Work events from the hub; `next_event` is cancel-safe (an mpsc receive).
#[derive(Debug)]
pub struct GrpcWorkSource {
    /// Fed by the connection task. Unbounded on purpose: the task must keep reading the stream
    /// (or heartbeats would look missing) even while the engine is busy; the backlog is bounded
    /// by the number of works the hub sends.
    rx: mpsc::UnboundedReceiver<WorkEvent>,
}

impl WorkSource for GrpcWorkSource {
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>> {
        Box::pin(self.rx.recv())
    }
}

/// Status sink: buffers the latest status per work and returns at once; the connection task
/// delivers it when the hub is reachable.
#[derive(Debug, Clone)]
pub struct GrpcStatusSink {
    /// State shared with the connection task.
    shared: Arc<Shared>,
}

impl StatusSink for GrpcStatusSink {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        let r = self.shared.enqueue_status(update);
        Box::pin(async move { r })
    }
}

/// What we know about a work the hub sent.
#[derive(Debug, Clone, Default)]
struct WorkInfo {
    /// Metadata echoed in status events.
    meta: WireMeta,
    /// The `originalsource` to answer to.
    original_source: String,
}

/// The latest status of one work.
#[derive(Debug, Clone)]
struct Latest {
    /// The update as the engine gave it.
    update: StatusUpdate,
    /// Its hash (the engine's, or computed when it gave none).
    hash: String,
}

/// Bookkeeping shared by the sink and the connection task.
#[derive(Debug, Default)]
struct Book {
    /// uid → generation of works delivered to the engine and not deleted: the resync list.
    held: HashMap<String, i64>,
    /// uid → identity, kept until the work's final (deleted) status is out.
    info: HashMap<String, WorkInfo>,
    /// name → uid, to address status updates that carry no uid.
    names: HashMap<String, String>,
    /// uid → latest status (answers status resync requests).
    latest: HashMap<String, Latest>,
    /// uids waiting to be published, in arrival order, each at most once.
    outbox: VecDeque<String>,
    /// uid → kind of event to send for the queued entry.
    pending: HashMap<String, StatusKind>,
}

impl Book {
    /// Queues `uid` (once); a resync response request does not downgrade a queued update.
    fn queue(&mut self, uid: &str, kind: StatusKind) {
        match self.pending.get_mut(uid) {
            Some(k) => {
                if kind == StatusKind::Update {
                    *k = StatusKind::Update;
                }
            }
            None => {
                self.pending.insert(uid.to_string(), kind);
                self.outbox.push_back(uid.to_string());
            }
        }
    }

    /// Puts a failed send back at the front, unless a newer one was queued meanwhile.
    fn requeue_front(&mut self, uid: &str, kind: StatusKind) {
        if !self.pending.contains_key(uid) {
            self.pending.insert(uid.to_string(), kind);
            self.outbox.push_front(uid.to_string());
        }
    }

    /// Forgets a deleted work entirely.
    fn forget(&mut self, uid: &str) {
        self.held.remove(uid);
        if let Some(i) = self.info.remove(uid)
            && self.names.get(&i.meta.name).is_some_and(|u| u == uid)
        {
            self.names.remove(&i.meta.name);
        }
        self.latest.remove(uid);
    }
}

/// State shared between the handles and the task.
#[derive(Debug)]
struct Shared {
    /// Our cluster.
    cluster: String,
    /// Our agent id.
    agent_id: String,
    /// Status sequence ids.
    seq: SequenceIds,
    /// The bookkeeping; a std mutex: never held across an await.
    book: Mutex<Book>,
    /// Wakes the publisher when the outbox gains an entry.
    outbox_ready: Notify,
    /// Synced was emitted (once per process).
    synced: AtomicBool,
    /// A Publish is in flight (so an empty outbox does not yet mean everything is delivered).
    in_flight: AtomicBool,
    /// Metrics.
    metrics: HubMetrics,
}

fn lock(m: &Mutex<Book>) -> MutexGuard<'_, Book> {
    // The book is consistent after every statement, so a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Stores the latest status of a work and queues it for publishing.
    fn enqueue_status(&self, mut update: StatusUpdate) -> Result<(), SinkError> {
        let mut book = lock(&self.book);
        let uid = match update.uid.clone().filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => match book.names.get(&update.name) {
                Some(u) => u.clone(),
                None => {
                    // Without a uid there is no resourceid to address the hub with.
                    tracing::warn!(work = %update.name, "status for a work the hub never sent; not publishing it");
                    return Ok(());
                }
            },
        };
        update.uid = Some(uid.clone());
        let hash = if update.status_hash.is_empty() {
            cloudevents::status_hash(&update.status)
        } else {
            update.status_hash.clone()
        };
        book.latest.insert(uid.clone(), Latest { update, hash });
        book.queue(&uid, StatusKind::Update);
        self.metrics
            .outbox
            .set(i64::try_from(book.outbox.len()).unwrap_or(i64::MAX));
        drop(book);
        self.outbox_ready.notify_one();
        Ok(())
    }

    /// Takes the next queued status and builds its event.
    fn next_outgoing(&self) -> Option<Outgoing> {
        let mut book = lock(&self.book);
        loop {
            let uid = book.outbox.pop_front()?;
            let Some(kind) = book.pending.remove(&uid) else {
                continue;
            };
            let Some(latest) = book.latest.get(&uid).cloned() else {
                continue;
            };
            let info = book.info.get(&uid).cloned().unwrap_or_default();
            let mut meta = info.meta;
            if meta.name.is_empty() {
                meta.name = latest.update.name.clone();
            }
            if meta.namespace.is_empty() {
                meta.namespace = latest.update.namespace.clone().unwrap_or_default();
            }
            meta.uid = uid.clone();
            meta.generation = latest.update.generation;
            let target = StatusTarget {
                agent_id: &self.agent_id,
                cluster: &self.cluster,
                resource_id: &uid,
                resource_version: latest.update.generation,
                original_source: &info.original_source,
                meta: &meta,
                sequence_id: self.seq.next(),
            };
            let event = cloudevents::status_event(kind, &target, &latest.update.status, &latest.hash);
            self.metrics
                .outbox
                .set(i64::try_from(book.outbox.len()).unwrap_or(i64::MAX));
            self.in_flight.store(true, Ordering::SeqCst);
            return Some(Outgoing {
                uid,
                kind,
                hash: latest.hash,
                deleted: latest.update.deleted,
                event,
            });
        }
    }

    /// Records a successful publish: a deleted work whose final status is out is forgotten.
    fn published(&self, out: &Outgoing) {
        let mut book = lock(&self.book);
        let still_latest = book.latest.get(&out.uid).is_some_and(|l| l.hash == out.hash);
        if out.deleted && still_latest && !book.pending.contains_key(&out.uid) {
            book.forget(&out.uid);
        }
    }

    /// Nothing queued and nothing in flight.
    fn idle(&self) -> bool {
        // Read under the lock: next_outgoing pops and sets in_flight under it too.
        let book = lock(&self.book);
        book.outbox.is_empty() && !self.in_flight.load(Ordering::SeqCst)
    }

    /// Queues resync responses for works whose status hash the hub does not have.
    fn answer_status_resync(&self, hub: &[StatusHash]) -> usize {
        let mut book = lock(&self.book);
        let want: HashMap<&str, &str> = hub
            .iter()
            .map(|h| (h.resource_id.as_str(), h.status_hash.as_str()))
            .collect();
        let stale: Vec<String> = book
            .latest
            .iter()
            .filter(|(uid, l)| hub.is_empty() || want.get(uid.as_str()) != Some(&l.hash.as_str()))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &stale {
            book.queue(uid, StatusKind::ResyncResponse);
        }
        drop(book);
        if !stale.is_empty() {
            self.outbox_ready.notify_one();
        }
        stale.len()
    }
}

/// A status event ready to send.
#[derive(Debug)]
struct Outgoing {
    /// Work uid.
    uid: String,
    /// Update or resync response.
    kind: StatusKind,
    /// Status hash sent.
    hash: String,
    /// It is the final status of a deleted work.
    deleted: bool,
    /// The event.
    event: CloudEvent,
}

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
struct Auth {
    /// The header value, marked sensitive so it is never logged by tonic/hyper.
    header: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.header.is_some() {
            "Auth(<bearer>)"
        } else {
            "Auth(none)"
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The client type of one session.
type Client = CloudEventServiceClient<InterceptedService<Channel, Auth>>;

/// How one session ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The session broke; `heard` tells whether anything was received (resets the backoff).
    Broken {
        /// The reason.
        error: GrpcError,
        /// At least one message arrived in this session.
        heard: bool,
    },
}

/// The connection task's own state.
struct Runner {
    /// Options.
    opts: GrpcHubOptions,
    /// TLS client (None for plaintext).
    tls: Option<ClientTls>,
    /// Shared bookkeeping.
    shared: Arc<Shared>,
    /// Events to the engine.
    events: mpsc::UnboundedSender<WorkEvent>,
    /// State for observers.
    state: watch::Sender<HubState>,
    /// Stop everything.
    shutdown: CancellationToken,
}

impl GrpcHub {
    /// Validates the settings, loads TLS material (failing fast on a bad setup) and starts the
    /// connection task. Must be called inside a tokio runtime.
    pub fn start(opts: GrpcHubOptions, shutdown: CancellationToken) -> Result<GrpcHub, GrpcError> {
        let s = &opts.settings;
        if s.url.plaintext && !s.insecure_plaintext {
            return Err(GrpcError::Plaintext(s.url.uri()));
        }
        let tls = if s.url.plaintext {
            None
        } else {
            Some(ClientTls::new(s.tls.clone())?)
        };
        if let Some(tls) = &tls {
            // Validate the server name now rather than at the first connect.
            tls.connector(&s.url.host, s.url.port)?;
        }
        let shared = Arc::new(Shared {
            cluster: s.cluster_name.clone(),
            agent_id: s.agent_id.clone(),
            seq: SequenceIds::default(),
            book: Mutex::new(Book::default()),
            outbox_ready: Notify::new(),
            synced: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            metrics: opts.metrics.clone(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
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
            source: GrpcWorkSource { rx },
            sink: GrpcStatusSink { shared },
            handle: HubHandle { state: state_rx },
            task,
        })
    }
}

impl Runner {
    /// Connect, run a session, back off, repeat until shutdown.
    async fn run(self) {
        let mut backoff = ExponentialBackoff::new(self.opts.backoff_min, self.opts.backoff_max, 0.5);
        let mut first = true;
        loop {
            if !first {
                self.opts.metrics.reconnects.inc();
            }
            first = false;
            let end = self.session().await;
            self.opts.metrics.connected.set(0);
            self.state.send_modify(|s| s.connected = false);
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Broken { error, heard } => {
                    let mut msg = error_chain(&error);
                    if REFUSED_IDENTITY_ALERTS.iter().any(|a| msg.contains(a)) {
                        msg.push_str(" (the hub refused this agent's client certificate)");
                    }
                    tracing::warn!(error = %msg, "hub session ended; reconnecting");
                    self.state.send_modify(|s| {
                        s.failures += 1;
                        s.last_error = Some(msg);
                    });
                    if heard {
                        backoff.reset();
                    }
                }
            }
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "waiting before reconnecting");
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        tracing::info!("hub transport stopped");
    }

    /// Dials the hub and builds a client.
    async fn connect(&self) -> Result<Client, GrpcError> {
        let s = &self.opts.settings;
        let mut endpoint = if s.url.plaintext {
            tracing::warn!(url = %s.url.uri(), "connecting to the hub WITHOUT TLS (insecure plaintext): works, status and credentials travel unencrypted");
            Endpoint::from_shared(s.url.uri()).map_err(GrpcError::Connect)?
        } else {
            // tonic must not add TLS itself (our connector does), so it sees http; requests still
            // carry the https origin.
            let dial = format!("http://{}:{}", s.url.host, s.url.port);
            let origin: tonic::transport::Uri = s
                .url
                .uri()
                .parse()
                .map_err(|e: http_uri::InvalidUri| GrpcError::Url(e.to_string()))?;
            Endpoint::from_shared(dial)
                .map_err(GrpcError::Connect)?
                .origin(origin)
        };
        endpoint = endpoint
            .connect_timeout(self.opts.connect_timeout)
            .tcp_nodelay(true);
        if s.keep_alive.enable {
            endpoint = endpoint
                .http2_keep_alive_interval(s.keep_alive.time)
                .keep_alive_timeout(s.keep_alive.timeout)
                .keep_alive_while_idle(s.keep_alive.permit_without_stream);
        }
        let channel = match &self.tls {
            None => endpoint.connect().await.map_err(GrpcError::Connect)?,
            Some(tls) => {
                let connector: HubConnector = tls.connector(&s.url.host, s.url.port)?;
                endpoint
                    .connect_with_connector(connector)
                    .await
                    .map_err(GrpcError::Connect)?
            }
        };
        let header = match &s.token {
            None => None,
            Some(src) => {
                let token = src
                    .read()
                    .map_err(|e| GrpcError::Token(format!("reading {src:?}: {e}")))?;
                let mut v: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| GrpcError::Token("token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(
            CloudEventServiceClient::with_interceptor(channel, Auth { header })
                .max_decoding_message_size(self.opts.max_message_size)
                .max_encoding_message_size(self.opts.max_message_size),
        )
    }

    /// One connection: subscribe, resync, read until it breaks.
    async fn session(&self) -> SessionEnd {
        let broken = |error| SessionEnd::Broken { error, heard: false };
        let s = &self.opts.settings;
        let client = tokio::select! {
            () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            c = self.connect() => match c { Ok(c) => c, Err(e) => return broken(e) },
        };
        let mut sub_client = client.clone();
        let req = SubscriptionRequest {
            source: String::new(),
            cluster_name: s.cluster_name.clone(),
            data_type: MANIFEST_BUNDLES.to_string(),
        };
        let mut stream = tokio::select! {
            () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            r = tokio::time::timeout(self.opts.connect_timeout, sub_client.subscribe(req)) => match r {
                Err(_) => return broken(GrpcError::Timeout("subscribe")),
                Ok(Err(st)) => return broken(GrpcError::Subscribe(st)),
                Ok(Ok(resp)) => resp.into_inner(),
            },
        };
        self.opts.metrics.connected.set(1);
        self.state.send_modify(|st| {
            st.connected = true;
            st.sessions += 1;
        });
        tracing::info!("subscribed to the hub");

        // Resync: tell the hub what we hold so it sends what changed while we were away.
        let held: Vec<ResourceVersion> = {
            let book = lock(&self.shared.book);
            let mut v: Vec<ResourceVersion> = book
                .held
                .iter()
                .map(|(uid, g)| ResourceVersion {
                    resource_id: uid.clone(),
                    resource_version: *g,
                })
                .collect();
            v.sort_by(|a, b| a.resource_id.cmp(&b.resource_id));
            v
        };
        let count = held.len();
        let ev = cloudevents::spec_resync_request(&s.agent_id, &s.cluster_name, held);
        let mut pub_client = client.clone();
        match tokio::time::timeout(
            self.opts.publish_timeout,
            pub_client.publish(PublishRequest { event: Some(ev) }),
        )
        .await
        {
            Err(_) => return broken(GrpcError::Timeout("spec resync request")),
            Ok(Err(st)) => return broken(GrpcError::Resync(st)),
            Ok(Ok(_)) => {}
        }
        self.state.send_modify(|st| st.resyncs += 1);
        tracing::debug!(works = count, "spec resync request sent");

        // Publisher: drains the outbox while this session lives. Its own token (not a child of
        // shutdown) so it can flush the outbox after shutdown is requested.
        let session = CancellationToken::new();
        let (pub_err_tx, mut pub_err_rx) = mpsc::channel::<GrpcError>(1);
        let publisher = tokio::spawn(
            publish_loop(
                self.shared.clone(),
                client.clone(),
                self.opts.publish_timeout,
                session.clone(),
                pub_err_tx,
            )
            .in_current_span(),
        );
        let _stop_publisher = session.clone().drop_guard();

        let hb_timeout = s.heartbeat_timeout;
        let start = Instant::now();
        let mut last_heard = start;
        let mut heard = false;
        let mut sync_at = (!self.shared.synced.load(Ordering::Relaxed)).then(|| start + self.opts.sync_quiet);
        let sync_limit = start + self.opts.sync_max_wait;
        let end = loop {
            let sync_deadline = sync_at.map(|t| t.min(sync_limit));
            tokio::select! {
                () = self.shutdown.cancelled() => break SessionEnd::Shutdown,
                Some(e) = pub_err_rx.recv() => break SessionEnd::Broken { error: e, heard },
                () = tokio::time::sleep_until(last_heard + hb_timeout) => {
                    break SessionEnd::Broken { error: GrpcError::HeartbeatTimeout(hb_timeout), heard };
                }
                () = sleep_until_opt(sync_deadline) => {
                    sync_at = None;
                    if !self.shared.synced.swap(true, Ordering::Relaxed) {
                        tracing::info!("initial resync complete");
                        let _ = self.events.send(WorkEvent::Synced);
                        self.state.send_modify(|st| st.synced = true);
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(ev)) => {
                        last_heard = Instant::now();
                        heard = true;
                        if self.handle_event(&ev) && sync_at.is_some() {
                            sync_at = Some(last_heard + self.opts.sync_quiet);
                        }
                    }
                    Ok(None) => break SessionEnd::Broken { error: GrpcError::StreamEnded, heard },
                    Err(st) => break SessionEnd::Broken { error: GrpcError::Stream(st), heard },
                },
            }
        };
        if matches!(end, SessionEnd::Shutdown) && !self.opts.shutdown_flush.is_zero() {
            self.flush(&mut pub_err_rx).await;
        }
        session.cancel();
        let _ = publisher.await;
        end
    }

    /// After shutdown: gives the publisher up to `shutdown_flush` to send what is queued (the
    /// final statuses of a graceful stop), unless the connection fails first.
    async fn flush(&self, errors: &mut mpsc::Receiver<GrpcError>) {
        let deadline = Instant::now() + self.opts.shutdown_flush;
        loop {
            if self.shared.idle() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(queued = lock(&self.shared.book).outbox.len(), "shutdown: statuses not delivered in time");
                    return;
                }
                _ = errors.recv() => return,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Handles one event; true when it was a spec event (which extends the sync quiet period).
    fn handle_event(&self, ev: &CloudEvent) -> bool {
        let m = &self.opts.metrics;
        match cloudevents::decode(ev, &self.shared.cluster) {
            Ok(Incoming::Heartbeat) => {
                m.event("heartbeat");
                false
            }
            Ok(Incoming::StatusResync(hashes)) => {
                m.event("status.resync_request");
                let n = self.shared.answer_status_resync(&hashes);
                tracing::debug!(hub_hashes = hashes.len(), answering = n, "status resync request");
                false
            }
            Ok(Incoming::Spec(spec)) => {
                // Decoded events have one of the known types, so the label set stays small.
                let kind = ev
                    .r#type
                    .strip_prefix(MANIFEST_BUNDLES)
                    .unwrap_or("")
                    .trim_start_matches('.');
                m.event(if spec.deleted && !kind.ends_with(cloudevents::action::DELETE) {
                    "spec.deletion_timestamp"
                } else {
                    kind
                });
                self.handle_spec(spec);
                true
            }
            Err(e @ CodecError::WrongCluster { .. }) => {
                m.event("ignored");
                tracing::warn!(id = %ev.id, error = %e, "ignoring event for another cluster");
                false
            }
            Err(e) => {
                m.event("invalid");
                tracing::warn!(id = %ev.id, r#type = %ev.r#type, error = %e, "invalid event from the hub; skipped");
                // Only a work's own spec event that fails to decode says something about that work;
                // an event type we do not know (perhaps newer than us) must not fail a good work.
                let about_the_work = !matches!(e, CodecError::UnknownType(_));
                if about_the_work && let Some((uid, version)) = cloudevents::identify(ev) {
                    self.report_invalid(&uid, version, &e);
                }
                // A broken spec event is still activity in the resync window.
                ev.r#type.contains(".spec.")
            }
        }
    }

    /// Passes a spec change to the engine and records it.
    fn handle_spec(&self, spec: SpecEvent) {
        let uid = spec.resource_id.clone();
        let mut book = lock(&self.shared.book);
        if spec.deleted {
            let name = spec
                .name
                .clone()
                .or_else(|| book.info.get(&uid).map(|i| i.meta.name.clone()));
            book.held.remove(&uid);
            let Some(name) = name.filter(|n| !n.is_empty()) else {
                tracing::warn!(resource_id = %uid, "delete for a work we do not know and whose name the event lacks");
                return;
            };
            let info = book.info.entry(uid.clone()).or_default();
            info.meta.name.clone_from(&name);
            info.meta.uid.clone_from(&uid);
            if info.meta.namespace.is_empty() {
                info.meta.namespace.clone_from(&self.shared.cluster);
            }
            if info.original_source.is_empty() {
                info.original_source = spec.original_source;
            }
            book.names.insert(name.clone(), uid.clone());
            drop(book);
            tracing::info!(work = %name, resource_id = %uid, "work deleted on the hub");
            let _ = self.events.send(WorkEvent::Delete(WorkRef { name }));
            return;
        }
        let Some(work) = spec.work else { return };
        if let Some(&have) = book.held.get(&uid)
            && spec.resource_version != 0
            && spec.resource_version < have
        {
            tracing::debug!(resource_id = %uid, have, got = spec.resource_version, "stale work version; ignored");
            return;
        }
        let name = work.name_any();
        book.held.insert(uid.clone(), spec.resource_version);
        book.names.insert(name.clone(), uid.clone());
        book.info.insert(
            uid.clone(),
            WorkInfo {
                meta: WireMeta {
                    name: name.clone(),
                    namespace: work.namespace().unwrap_or_default(),
                    uid: uid.clone(),
                    generation: spec.resource_version,
                    labels: work.labels().clone(),
                    annotations: work.annotations().clone(),
                },
                original_source: spec.original_source,
            },
        );
        drop(book);
        tracing::info!(work = %name, resource_id = %uid, generation = spec.resource_version, "work from the hub");
        let _ = self.events.send(WorkEvent::Upsert(work));
    }

    /// Reports an event that could not be decoded as a failed `Applied` condition of its work.
    fn report_invalid(&self, uid: &str, version: i64, err: &CodecError) {
        let name = {
            let book = lock(&self.shared.book);
            book.info
                .get(uid)
                .map(|i| i.meta.name.clone())
                .unwrap_or_else(|| uid.to_string())
        };
        let mut c = cond(
            types::APPLIED,
            FALSE,
            "InvalidManifestBundle",
            format!("event rejected: {err}"),
            version,
        );
        c.last_transition_time = now_rfc3339();
        let status = ManifestWorkStatus {
            conditions: vec![c],
            ..Default::default()
        };
        let update = StatusUpdate {
            name,
            namespace: Some(self.shared.cluster.clone()),
            uid: Some(uid.to_string()),
            generation: version,
            status_hash: cloudevents::status_hash(&status),
            status,
            deleted: false,
        };
        let _ = self.shared.enqueue_status(update);
    }
}

/// TLS alerts a hub sends when it does not accept our client certificate (rustls spelling).
const REFUSED_IDENTITY_ALERTS: &[&str] = &[
    "fatal alert: CertificateExpired",
    "fatal alert: UnknownCA",
    "fatal alert: BadCertificate",
    "fatal alert: CertificateRequired",
    "fatal alert: CertificateRevoked",
    "fatal alert: AccessDenied",
];

/// Sleeps until `t`, or for ever when there is no deadline.
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}

/// Whether a failed Publish means the connection is unusable (keep the status and reconnect)
/// rather than the hub refusing this status (log and drop it; it is resent on the next change or
/// status resync).
fn is_transport_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Clears the in-flight flag when one send is fully handled (after any requeue).
struct InFlightDone<'a>(&'a Shared);

impl Drop for InFlightDone<'_> {
    fn drop(&mut self) {
        self.0.in_flight.store(false, Ordering::SeqCst);
    }
}

/// Publishes queued statuses until the session ends.
async fn publish_loop(
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
                lock(&shared.book).requeue_front(&out.uid, out.kind);
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
            Ok(Err(st)) if !is_transport_failure(st.code()) => {
                tracing::error!(resource_id = %out.uid, error = %error_chain(&st), "hub refused a status update; dropping it");
            }
            Ok(Err(st)) => {
                lock(&shared.book).requeue_front(&out.uid, out.kind);
                let _ = errors.try_send(GrpcError::Publish(st));
                return;
            }
            Err(_) => {
                lock(&shared.book).requeue_front(&out.uid, out.kind);
                let _ = errors.try_send(GrpcError::Timeout("status publish"));
                return;
            }
        }
    }
}

/// `http::uri` through tonic, so no direct `http` dependency is needed.
mod http_uri {
    pub use tonic::codegen::http::uri::InvalidUri;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::manifestwork::Condition;

    fn shared() -> Shared {
        Shared {
            cluster: "c1".into(),
            agent_id: "a".into(),
            seq: SequenceIds::default(),
            book: Mutex::new(Book::default()),
            outbox_ready: Notify::new(),
            synced: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            metrics: HubMetrics::default(),
        }
    }

    fn update(uid: &str, reason: &str, deleted: bool) -> StatusUpdate {
        let status = ManifestWorkStatus {
            conditions: vec![Condition {
                type_: "Applied".into(),
                status: "True".into(),
                reason: reason.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        StatusUpdate {
            name: format!("w-{uid}"),
            namespace: None,
            uid: Some(uid.into()),
            generation: 1,
            status_hash: String::new(),
            status,
            deleted,
        }
    }

    #[test]
    fn outbox_keeps_only_the_latest_per_work() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        s.enqueue_status(update("u2", "A", false)).unwrap();
        s.enqueue_status(update("u1", "B", false)).unwrap();
        let a = s.next_outgoing().unwrap();
        let b = s.next_outgoing().unwrap();
        assert!(s.next_outgoing().is_none());
        assert_eq!((a.uid.as_str(), b.uid.as_str()), ("u1", "u2"));
        let want = cloudevents::status_hash(&update("u1", "B", false).status);
        assert_eq!(a.hash, want);
    }

    #[test]
    fn failed_send_is_requeued_unless_superseded() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        let a = s.next_outgoing().unwrap();
        lock(&s.book).requeue_front(&a.uid, a.kind);
        let again = s.next_outgoing().unwrap();
        assert_eq!(again.hash, a.hash);
        // A newer status while in flight: published once more with the new content.
        s.enqueue_status(update("u1", "B", false)).unwrap();
        s.published(&again);
        let next = s.next_outgoing().unwrap();
        assert_ne!(next.hash, again.hash);
        assert!(s.next_outgoing().is_none());
    }

    #[test]
    fn deleted_work_is_forgotten_after_its_final_status() {
        let s = shared();
        lock(&s.book).held.insert("u1".into(), 1);
        s.enqueue_status(update("u1", "Deleted", true)).unwrap();
        let out = s.next_outgoing().unwrap();
        assert!(out.deleted);
        s.published(&out);
        let book = lock(&s.book);
        assert!(book.latest.is_empty() && book.held.is_empty());
    }

    #[test]
    fn status_resync_answers_only_differing_hashes() {
        let s = shared();
        s.enqueue_status(update("u1", "A", false)).unwrap();
        s.enqueue_status(update("u2", "A", false)).unwrap();
        while let Some(o) = s.next_outgoing() {
            s.published(&o);
        }
        let h1 = lock(&s.book).latest["u1"].hash.clone();
        let n = s.answer_status_resync(&[
            StatusHash {
                resource_id: "u1".into(),
                status_hash: h1,
            },
            StatusHash {
                resource_id: "u2".into(),
                status_hash: "old".into(),
            },
        ]);
        assert_eq!(n, 1);
        let o = s.next_outgoing().unwrap();
        assert_eq!(o.uid, "u2");
        assert_eq!(o.kind, StatusKind::ResyncResponse);
        assert!(o.event.r#type.ends_with("status.resync_response"));
        assert_eq!(s.answer_status_resync(&[]), 2);
    }

    #[test]
    fn status_without_uid_uses_the_name_or_is_dropped() {
        let s = shared();
        let mut u = update("u1", "A", false);
        u.uid = None;
        s.enqueue_status(u.clone()).unwrap();
        assert!(s.next_outgoing().is_none());
        lock(&s.book).names.insert(u.name.clone(), "u9".into());
        s.enqueue_status(u).unwrap();
        assert_eq!(s.next_outgoing().unwrap().uid, "u9");
    }

    #[test]
    fn transport_failures_are_classified() {
        assert!(is_transport_failure(Code::Unavailable));
        assert!(!is_transport_failure(Code::PermissionDenied));
        assert!(!is_transport_failure(Code::InvalidArgument));
    }
}
