//! A CloudEvents gRPC test hub that plays the source side of the OCM work protocol, over mutual TLS.
//!
//! It is written against the wire contract only (it does not use spokelet's codec, so a codec bug
//! cannot hide behind a matching hub bug). It serves `io.cloudevents.v1.CloudEventService` on
//! loopback with a rustls server config that requires client certificates signed by its client CA,
//! publishes works to subscribed clusters, answers `spec.resync_request`, sends heartbeats, can go
//! silent, can be stopped and restarted on the same port, and records every event it receives.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use spokelet_e2e::cloudevents_hub::{HubPki, TestHub, TestHubOptions};
//! let pki = HubPki::generate()?;
//! let hub = TestHub::start(TestHubOptions::new(&pki)?).await?;
//! hub.upsert_work("cluster1", "web", serde_json::json!({"manifests": []}));
//! println!("hub at {}", hub.url());
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use spokelet_proto::{
    Attr, CloudEvent, CloudEventAttributeValue, CloudEventService, CloudEventServiceServer, Data, HEARTBEAT,
    MANIFEST_BUNDLES, NODE_INVENTORIES, PublishRequest, SPEC_VERSION, SubscriptionRequest,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::HarnessError;
use crate::pki::{CertAndKey, CertificateAuthority};

/// Failures of the test hub.
#[derive(Debug, thiserror::Error)]
pub enum TestHubError {
    /// Certificate generation failed.
    #[error(transparent)]
    Pki(#[from] HarnessError),
    /// Binding or accepting failed.
    #[error("test hub io: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS material is unusable.
    #[error("test hub TLS: {0}")]
    Tls(String),
}

/// PKI of a test hub: a serving CA and the hub's certificate, a client CA for agents, and a second,
/// unrelated CA for negative tests.
#[derive(Debug)]
pub struct HubPki {
    /// Signs the hub's serving certificate; agents trust it.
    pub serving_ca: CertificateAuthority,
    /// Signs agent certificates; the hub trusts it.
    pub client_ca: CertificateAuthority,
    /// An unrelated CA: trusting it or being signed by it must fail.
    pub other_ca: CertificateAuthority,
    /// The hub's serving certificate (127.0.0.1 and localhost).
    pub serving: CertAndKey,
}

impl HubPki {
    /// A fresh PKI.
    pub fn generate() -> Result<Self, TestHubError> {
        let serving_ca = CertificateAuthority::new("test hub serving CA")?;
        let client_ca = CertificateAuthority::new("test hub client CA")?;
        let other_ca = CertificateAuthority::new("unrelated CA")?;
        let serving = serving_ca.issue_server("cloudevents-hub", &["127.0.0.1", "localhost"])?;
        Ok(HubPki {
            serving_ca,
            client_ca,
            other_ca,
            serving,
        })
    }

    /// An agent certificate: CN = the agent/cluster user, O = groups.
    pub fn client(&self, cn: &str, groups: &[&str]) -> Result<CertAndKey, TestHubError> {
        Ok(self.client_ca.issue_client_now(cn, groups)?)
    }

    /// An agent certificate that expired yesterday.
    pub fn expired_client(&self, cn: &str) -> Result<CertAndKey, TestHubError> {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        Ok(self.client_ca.issue_client(cn, &[], now - 2 * day, now - day)?)
    }

    /// An agent certificate from the unrelated CA.
    pub fn foreign_client(&self, cn: &str) -> Result<CertAndKey, TestHubError> {
        Ok(self.other_ca.issue_client_now(cn, &[])?)
    }

    /// A serving certificate for other names (to test name verification).
    pub fn serving_for(&self, sans: &[&str]) -> Result<CertAndKey, TestHubError> {
        Ok(self.serving_ca.issue_server("cloudevents-hub", sans)?)
    }
}

/// Test hub settings.
#[derive(Debug, Clone)]
pub struct TestHubOptions {
    /// Listen address; port 0 picks one (kept across restarts).
    pub addr: SocketAddr,
    /// Heartbeat interval (the reference default is 10 s).
    pub heartbeat: Duration,
    /// The hub's certificate and key.
    pub serving: CertAndKey,
    /// CA bundle that client certificates must chain to.
    pub client_ca_pem: String,
    /// Event `source` of the works it sends.
    pub source: String,
    /// Serve without TLS (only to test the agent's explicit insecure-plaintext mode).
    pub plaintext: bool,
    /// Speak TLS 1.2 only (an old hub), to test the agent's TLS version setting.
    pub tls12_only: bool,
}

impl TestHubOptions {
    /// Loopback, any port, 200 ms heartbeats (fast tests), the PKI's certificates.
    pub fn new(pki: &HubPki) -> Result<Self, TestHubError> {
        Ok(TestHubOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            heartbeat: Duration::from_millis(200),
            serving: pki.serving.clone(),
            client_ca_pem: pki.client_ca.cert_pem().to_string(),
            source: "test-hub".into(),
            plaintext: false,
            tls12_only: false,
        })
    }
}

/// A work as the hub holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubWork {
    /// Work name.
    pub name: String,
    /// Cluster (namespace) it belongs to.
    pub cluster: String,
    /// UID (the `resourceid`).
    pub uid: String,
    /// Generation (the `resourceversion`), bumped on each update.
    pub generation: i64,
    /// Labels sent in `metadata`.
    pub labels: BTreeMap<String, String>,
    /// The ManifestBundle JSON.
    pub bundle: serde_json::Value,
}

/// A TLS handshake the hub saw.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Subject CN of the client certificate, when the handshake succeeded.
    pub client_cn: Option<String>,
    /// DER of the client's leaf certificate.
    pub client_cert_der: Option<Vec<u8>>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// An event the hub received through Publish.
#[derive(Debug, Clone)]
pub struct Received {
    /// CN of the client certificate of the connection it came on.
    pub client_cn: Option<String>,
    /// The `authorization` header, if any (test tokens only; a real hub would never keep it).
    pub authorization: Option<String>,
    /// When the hub received it (for latency measurements).
    pub at: std::time::Instant,
    /// The event.
    pub event: CloudEvent,
}

impl Received {
    /// A string-valued attribute (`ce-` prefix added) or the integer rendered as a string.
    pub fn ext(&self, name: &str) -> Option<String> {
        match self.event.attributes.get(&format!("ce-{name}"))?.attr.as_ref()? {
            Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s) => Some(s.clone()),
            Attr::CeInteger(i) => Some(i.to_string()),
            Attr::CeBoolean(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// The JSON payload.
    pub fn json(&self) -> Option<serde_json::Value> {
        match self.event.data.as_ref()? {
            Data::BinaryData(b) => serde_json::from_slice(b).ok(),
            Data::TextData(t) => serde_json::from_str(t).ok(),
            Data::ProtoData(_) => None,
        }
    }
}

/// A live subscription.
#[derive(Debug)]
struct Subscriber {
    /// Cluster it subscribed for.
    cluster: String,
    /// Works go only to subscribers of the works data type (a node service hears heartbeats).
    works: bool,
    /// Its stream.
    tx: mpsc::UnboundedSender<Result<CloudEvent, Status>>,
}

/// Everything the hub remembers; survives restarts.
#[derive(Debug, Default)]
struct State {
    /// (cluster, name) → work.
    works: BTreeMap<(String, String), HubWork>,
    /// uid → (cluster, name) of deleted works, so resync deletes can carry the name.
    tombstones: HashMap<String, (String, String)>,
    /// Current subscribers.
    subscribers: Vec<Subscriber>,
    /// Every subscription request, in order.
    subscriptions: Vec<SubscriptionRequest>,
    /// Every published event, in order.
    received: Vec<Received>,
    /// Every handshake, in order.
    handshakes: Vec<Handshake>,
}

/// Shared between the hub handle and the server.
#[derive(Debug)]
struct Inner {
    /// Settings.
    opts: TestHubOptions,
    /// State.
    state: Mutex<State>,
    /// No heartbeats while set.
    silent: AtomicBool,
    /// How long the hub waits before answering a spec resync request, in milliseconds (an
    /// overloaded hub, or one still loading its works).
    resync_delay_ms: AtomicU64,
    /// Whether a resync answer includes deletes for works the agent lists and the hub lacks
    /// (the reference hub's behaviour); off plays a hub that lost its store and answers only
    /// with what it has.
    answer_deletes: AtomicBool,
    /// Largest status payload accepted, in bytes (0: any); larger ones are refused with
    /// `RESOURCE_EXHAUSTED`, as a Go gRPC hub refuses a message over its 4 MiB default.
    max_status_bytes: AtomicU64,
    /// Source of unique ids.
    counter: AtomicU64,
}

impl Inner {
    fn deletes(&self) -> bool {
        self.answer_deletes.load(Ordering::SeqCst)
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One running incarnation of the server.
#[derive(Debug)]
struct Running {
    /// Set to true to kill listener, connections and streams at once.
    kill: watch::Sender<bool>,
    /// The accept loop.
    accept: JoinHandle<()>,
    /// The tonic server.
    server: JoinHandle<()>,
}

/// A running (or stopped) test hub.
#[derive(Debug)]
pub struct TestHub {
    /// Shared state.
    inner: Arc<Inner>,
    /// Bound address (fixed after the first start).
    addr: SocketAddr,
    /// The current incarnation, None while stopped.
    running: Mutex<Option<Running>>,
}

impl TestHub {
    /// Starts a hub.
    pub async fn start(opts: TestHubOptions) -> Result<TestHub, TestHubError> {
        let inner = Arc::new(Inner {
            opts: opts.clone(),
            state: Mutex::new(State::default()),
            silent: AtomicBool::new(false),
            resync_delay_ms: AtomicU64::new(0),
            answer_deletes: AtomicBool::new(true),
            max_status_bytes: AtomicU64::new(0),
            counter: AtomicU64::new(1),
        });
        let listener = TcpListener::bind(opts.addr).await?;
        let addr = listener.local_addr()?;
        let hub = TestHub {
            inner,
            addr,
            running: Mutex::new(None),
        };
        hub.launch(listener)?;
        Ok(hub)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        let scheme = if self.inner.opts.plaintext {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.addr)
    }

    fn launch(&self, listener: TcpListener) -> Result<(), TestHubError> {
        let acceptor = if self.inner.opts.plaintext {
            None
        } else {
            Some(TlsAcceptor::from(server_config(&self.inner.opts)?))
        };
        let (kill_tx, kill_rx) = watch::channel(false);
        let (conn_tx, conn_rx) = mpsc::unbounded_channel::<Result<Conn, std::io::Error>>();
        let accept = tokio::spawn(accept_loop(
            listener,
            acceptor,
            self.inner.clone(),
            conn_tx,
            kill_rx.clone(),
        ));
        let svc = CloudEventServiceServer::new(HubService {
            inner: self.inner.clone(),
            kill: kill_rx.clone(),
        })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
        let mut kill_srv = kill_rx;
        let server = tokio::spawn(async move {
            let incoming = UnboundedReceiverStream::new(conn_rx);
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = kill_srv.wait_for(|k| *k).await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "test hub server ended with an error");
            }
        });
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running {
            kill: kill_tx,
            accept,
            server,
        });
        Ok(())
    }

    /// Stops the server: closes the listener, every connection and every stream, abruptly (as a
    /// crash would). State (works, records) is kept.
    pub async fn stop(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = running {
            let _ = r.kill.send(true);
            r.accept.abort();
            let _ = r.accept.await;
            r.server.abort();
            let _ = r.server.await;
        }
        lock(&self.inner.state).subscribers.clear();
    }

    /// Starts again on the same port.
    pub async fn restart(&self) -> Result<(), TestHubError> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.launch(listener)
    }

    /// Stops or resumes heartbeats to every subscriber (the connection stays open).
    pub fn set_silent(&self, silent: bool) {
        self.inner.silent.store(silent, Ordering::SeqCst);
    }

    /// Answers later spec resync requests only after `delay` (Publish itself returns at once).
    pub fn set_resync_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.inner.resync_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Refuses status events whose payload is over `bytes` (0: accept any).
    pub fn set_max_status_bytes(&self, bytes: u64) {
        self.inner.max_status_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Whether resync answers include deletes (see [`Inner`]'s `answer_deletes`).
    pub fn set_answer_deletes(&self, on: bool) {
        self.inner.answer_deletes.store(on, Ordering::SeqCst);
    }

    /// Drops a work without a trace: no delete event and no tombstone, as a hub restored from an
    /// old backup would. A resync asking about it gets a delete, one not asking gets nothing.
    pub fn forget_work(&self, cluster: &str, name: &str) -> Option<HubWork> {
        lock(&self.inner.state)
            .works
            .remove(&(cluster.to_string(), name.to_string()))
    }

    /// Puts a forgotten work back as it was (same uid and generation) and sends it.
    pub fn restore_work(&self, work: &HubWork) {
        let mut st = lock(&self.inner.state);
        st.works
            .insert((work.cluster.clone(), work.name.clone()), work.clone());
        let ev = spec_event(&self.inner.opts.source, work, "create_request");
        broadcast(&mut st, &work.cluster, ev);
    }

    /// Creates a work, or updates it (generation + 1), and sends it to the cluster's subscribers.
    pub fn upsert_work(&self, cluster: &str, name: &str, bundle: serde_json::Value) -> HubWork {
        let mut st = lock(&self.inner.state);
        let key = (cluster.to_string(), name.to_string());
        let (work, action) = match st.works.get(&key) {
            Some(w) => (
                HubWork {
                    generation: w.generation + 1,
                    bundle,
                    ..w.clone()
                },
                "update_request",
            ),
            None => (
                HubWork {
                    name: name.into(),
                    cluster: cluster.into(),
                    uid: self.inner.new_uid(),
                    generation: 1,
                    labels: BTreeMap::new(),
                    bundle,
                },
                "create_request",
            ),
        };
        st.works.insert(key, work.clone());
        let ev = spec_event(&self.inner.opts.source, &work, action);
        broadcast(&mut st, cluster, ev);
        work
    }

    /// Deletes a work and sends `delete_request` to the cluster's subscribers (lost if none).
    pub fn delete_work(&self, cluster: &str, name: &str) -> Option<HubWork> {
        let mut st = lock(&self.inner.state);
        let w = st.works.remove(&(cluster.to_string(), name.to_string()))?;
        st.tombstones
            .insert(w.uid.clone(), (cluster.to_string(), name.to_string()));
        let ev = delete_event(&self.inner.opts.source, &w.uid, w.generation, cluster, Some(name));
        broadcast(&mut st, cluster, ev);
        Some(w)
    }

    /// The work the hub holds.
    pub fn work(&self, cluster: &str, name: &str) -> Option<HubWork> {
        lock(&self.inner.state)
            .works
            .get(&(cluster.to_string(), name.to_string()))
            .cloned()
    }

    /// Sends a raw event (malformed ones included) to the cluster's subscribers; returns how many got it.
    pub fn send_raw(&self, cluster: &str, ev: CloudEvent) -> usize {
        broadcast(&mut lock(&self.inner.state), cluster, ev)
    }

    /// Asks the cluster's agents for statuses whose hash differs from `hashes` (uid, hash); empty: all.
    pub fn request_status_resync(&self, cluster: &str, hashes: &[(String, String)]) -> usize {
        let list: Vec<serde_json::Value> = hashes
            .iter()
            .map(|(id, h)| serde_json::json!({"resourceID": id, "statusHash": h}))
            .collect();
        let body = serde_json::json!({ "statusHashes": list });
        let mut ev = base_event(
            &self.inner.opts.source,
            &format!("{MANIFEST_BUNDLES}.status.resync_request"),
            &body,
        );
        ev.attributes
            .insert("ce-clustername".into(), string_attr(cluster));
        self.send_raw(cluster, ev)
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        let mut st = lock(&self.inner.state);
        st.subscribers.retain(|s| !s.tx.is_closed());
        st.subscribers.len()
    }

    /// Every subscription request so far.
    pub fn subscriptions(&self) -> Vec<SubscriptionRequest> {
        lock(&self.inner.state).subscriptions.clone()
    }

    /// Every published event so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner.state).received.clone()
    }

    /// How many events have been published to the hub so far.
    pub fn received_count(&self) -> usize {
        lock(&self.inner.state).received.len()
    }

    /// Published events after the first `skip` (cheap incremental polling for benchmarks).
    pub fn received_since(&self, skip: usize) -> Vec<Received> {
        lock(&self.inner.state)
            .received
            .iter()
            .skip(skip)
            .cloned()
            .collect()
    }

    /// Published events whose type ends with `suffix` (e.g. `status.update_request`).
    pub fn received_of(&self, suffix: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event.r#type.ends_with(suffix))
            .collect()
    }

    /// Status events (update requests and resync responses) so far.
    pub fn statuses(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event.r#type.contains(".status."))
            .collect()
    }

    /// Every TLS handshake so far.
    pub fn handshakes(&self) -> Vec<Handshake> {
        lock(&self.inner.state).handshakes.clone()
    }
}

impl Inner {
    fn new_uid(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:08x}-0000-4000-8000-{:012x}", n, t & 0xffff_ffff_ffff)
    }
}

/// Sends to every live subscriber of `cluster`; returns how many got it.
fn broadcast(st: &mut State, cluster: &str, ev: CloudEvent) -> usize {
    st.subscribers.retain(|s| !s.tx.is_closed());
    let mut n = 0;
    for s in st.subscribers.iter().filter(|s| s.cluster == cluster && s.works) {
        if s.tx.send(Ok(ev.clone())).is_ok() {
            n += 1;
        }
    }
    n
}

fn string_attr(s: &str) -> CloudEventAttributeValue {
    CloudEventAttributeValue {
        attr: Some(Attr::CeString(s.to_string())),
    }
}

fn base_event(source: &str, type_: &str, body: &serde_json::Value) -> CloudEvent {
    static ID: AtomicU64 = AtomicU64::new(1);
    let mut attributes = HashMap::new();
    attributes.insert("contenttype".to_string(), string_attr("application/json"));
    CloudEvent {
        id: format!("hub-{}", ID.fetch_add(1, Ordering::Relaxed)),
        source: source.to_string(),
        spec_version: SPEC_VERSION.to_string(),
        r#type: type_.to_string(),
        attributes,
        data: Some(Data::BinaryData(serde_json::to_vec(body).unwrap_or_default())),
    }
}

/// A `spec.<action>` event for `w`, as a conforming source writes it.
pub fn spec_event(source: &str, w: &HubWork, action: &str) -> CloudEvent {
    let mut ev = base_event(source, &format!("{MANIFEST_BUNDLES}.spec.{action}"), &w.bundle);
    let meta = serde_json::json!({
        "name": w.name, "namespace": w.cluster, "uid": w.uid, "generation": w.generation,
        "labels": w.labels, "creationTimestamp": "2024-01-01T00:00:00Z",
    });
    let a = &mut ev.attributes;
    a.insert("ce-resourceid".into(), string_attr(&w.uid));
    a.insert(
        "ce-resourceversion".into(),
        CloudEventAttributeValue {
            attr: Some(Attr::CeInteger(i32::try_from(w.generation).unwrap_or(i32::MAX))),
        },
    );
    a.insert("ce-clustername".into(), string_attr(&w.cluster));
    a.insert("ce-metadata".into(), string_attr(&meta.to_string()));
    ev
}

/// A `spec.delete_request` event.
fn delete_event(source: &str, uid: &str, generation: i64, cluster: &str, name: Option<&str>) -> CloudEvent {
    let mut ev = base_event(
        source,
        &format!("{MANIFEST_BUNDLES}.spec.delete_request"),
        &serde_json::json!({}),
    );
    ev.data = None;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let a = &mut ev.attributes;
    a.insert("ce-resourceid".into(), string_attr(uid));
    a.insert(
        "ce-resourceversion".into(),
        CloudEventAttributeValue {
            attr: Some(Attr::CeInteger(i32::try_from(generation).unwrap_or(i32::MAX))),
        },
    );
    a.insert("ce-clustername".into(), string_attr(cluster));
    a.insert(
        "ce-deletiontimestamp".into(),
        CloudEventAttributeValue {
            attr: Some(Attr::CeTimestamp(prost_types::Timestamp {
                seconds: i64::try_from(now.as_secs()).unwrap_or(0),
                nanos: 0,
            })),
        },
    );
    if let Some(n) = name {
        let meta = serde_json::json!({"name": n, "namespace": cluster, "uid": uid});
        a.insert("ce-metadata".into(), string_attr(&meta.to_string()));
    }
    ev
}

/// The hub's rustls config: TLS 1.2/1.3, ALPN h2, client certificates required and verified.
fn server_config(opts: &TestHubOptions) -> Result<Arc<ServerConfig>, TestHubError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = |e: &dyn std::fmt::Display| TestHubError::Tls(e.to_string());
    let mut roots = RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut BufReader::new(opts.client_ca_pem.as_bytes())) {
        roots.add(c?).map_err(|e| tls(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls(&e))?;
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut BufReader::new(opts.serving.cert_pem.as_bytes()))
            .collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut BufReader::new(opts.serving.key_pem.as_bytes()))?
            .ok_or_else(|| TestHubError::Tls("no serving key".into()))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if opts.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Subject CN of a DER certificate: the last `2.5.4.3` attribute (the issuer's comes first).
pub fn subject_cn(der: &[u8]) -> Option<String> {
    const OID_CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let pos = der.windows(OID_CN.len()).rposition(|w| w == OID_CN)?;
    let rest = der.get(pos + OID_CN.len()..)?;
    let len = usize::from(*rest.get(1)?);
    let value = rest.get(2..2 + len)?;
    String::from_utf8(value.to_vec()).ok()
}

/// Accepts TCP connections, runs the TLS handshake and hands a killable pipe to tonic.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    inner: Arc<Inner>,
    conns: mpsc::UnboundedSender<Result<Conn, std::io::Error>>,
    kill: watch::Receiver<bool>,
) {
    loop {
        let mut k = kill.clone();
        let (tcp, _) = tokio::select! {
            _ = k.wait_for(|v| *v) => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let acceptor = acceptor.clone();
        let inner = inner.clone();
        let conns = conns.clone();
        let kill = kill.clone();
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                lock(&inner.state).handshakes.push(Handshake {
                    client_cn: None,
                    client_cert_der: None,
                    error: None,
                });
                pump(tcp, PeerInfo { client_cn: None }, conns, kill).await;
                return;
            };
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    lock(&inner.state).handshakes.push(Handshake {
                        client_cn: None,
                        client_cert_der: None,
                        error: Some(e.to_string()),
                    });
                    return;
                }
            };
            let der = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let client_cn = der.as_deref().and_then(subject_cn);
            lock(&inner.state).handshakes.push(Handshake {
                client_cn: client_cn.clone(),
                client_cert_der: der,
                error: None,
            });
            pump(tls, PeerInfo { client_cn }, conns, kill).await;
        });
    }
}

/// Hands tonic one end of an in-memory pipe and copies between the other end and `io`, so stop()
/// can cut the connection (as a crashed hub would) by ending the copy.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    info: PeerInfo,
    conns: mpsc::UnboundedSender<Result<Conn, std::io::Error>>,
    mut kill: watch::Receiver<bool>,
) {
    let (mut ours, theirs) = tokio::io::duplex(256 * 1024);
    if conns.send(Ok(Conn { io: theirs, info })).is_err() {
        return;
    }
    tokio::select! {
        _ = kill.wait_for(|v| *v) => {}
        _ = tokio::io::copy_bidirectional(&mut io, &mut ours) => {}
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Client certificate CN.
    pub client_cn: Option<String>,
}

/// The connection tonic serves: an in-memory pipe that knows its peer.
#[derive(Debug)]
struct Conn {
    /// tonic's end of the pipe.
    io: DuplexStream,
    /// Peer identity, exposed to handlers as a request extension.
    info: PeerInfo,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
struct HubService {
    /// Shared state.
    inner: Arc<Inner>,
    /// Ends heartbeat tasks of this incarnation.
    kill: watch::Receiver<bool>,
}

fn peer_cn<T>(req: &Request<T>) -> Option<String> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.client_cn.clone())
}

#[tonic::async_trait]
impl CloudEventService for HubService {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<()>, Status> {
        let client_cn = peer_cn(&request);
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let ev = request
            .into_inner()
            .event
            .ok_or_else(|| Status::invalid_argument("no event"))?;
        let limit = self.inner.max_status_bytes.load(Ordering::SeqCst);
        let size = match &ev.data {
            Some(Data::BinaryData(b)) => b.len() as u64,
            Some(Data::TextData(t)) => t.len() as u64,
            _ => 0,
        };
        if limit > 0 && ev.r#type.contains(".status.") && size > limit {
            return Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max ({size} vs. {limit})"
            )));
        }
        let mut st = lock(&self.inner.state);
        st.received.push(Received {
            client_cn,
            authorization,
            at: std::time::Instant::now(),
            event: ev.clone(),
        });
        if ev.r#type == format!("{MANIFEST_BUNDLES}.spec.resync_request") {
            let delay = Duration::from_millis(self.inner.resync_delay_ms.load(Ordering::SeqCst));
            if delay.is_zero() {
                answer_spec_resync(&self.inner.opts.source, self.inner.deletes(), &mut st, &ev);
            } else {
                // A slow hub: acknowledged now, answered later (from the state at that time).
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    answer_spec_resync(&inner.opts.source, inner.deletes(), &mut lock(&inner.state), &ev);
                });
            }
        }
        Ok(Response::new(()))
    }

    type SubscribeStream = UnboundedReceiverStream<Result<CloudEvent, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscriptionRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        // Works, or spokelet's node reports (a node service subscribes to hear heartbeats).
        if req.data_type != MANIFEST_BUNDLES && req.data_type != NODE_INVENTORIES {
            return Err(Status::invalid_argument(format!(
                "unsupported data type {:?}",
                req.data_type
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = lock(&self.inner.state);
            st.subscriptions.push(req.clone());
            st.subscribers.push(Subscriber {
                cluster: req.cluster_name.clone(),
                works: req.data_type == MANIFEST_BUNDLES,
                tx: tx.clone(),
            });
        }
        let inner = self.inner.clone();
        let mut kill = self.kill.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(inner.opts.heartbeat);
            loop {
                tokio::select! {
                    _ = kill.wait_for(|v| *v) => return,
                    () = tx.closed() => return,
                    _ = tick.tick() => {}
                }
                if inner.silent.load(Ordering::SeqCst) {
                    continue;
                }
                let mut hb = base_event(&inner.opts.source, HEARTBEAT, &serde_json::json!({}));
                hb.data = None;
                hb.attributes.clear();
                if tx.send(Ok(hb)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Answers a spec resync request: create/update for newer works, delete for works we no longer have.
/// The answers are queued on the subscriber streams before Publish returns, as the reference hub does.
/// `deletes`: answer works the agent lists and the hub lacks with deletes.
fn answer_spec_resync(source: &str, deletes: bool, st: &mut State, ev: &CloudEvent) {
    let cluster = match ev.attributes.get("ce-clustername").and_then(|v| v.attr.as_ref()) {
        Some(Attr::CeString(c)) => c.clone(),
        _ => return,
    };
    let body: serde_json::Value = match &ev.data {
        Some(Data::BinaryData(b)) => serde_json::from_slice(b).unwrap_or_default(),
        Some(Data::TextData(t)) => serde_json::from_str(t).unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    let mut held: HashMap<String, i64> = HashMap::new();
    for rv in body["resourceVersions"].as_array().into_iter().flatten() {
        if let (Some(id), Some(v)) = (rv["resourceID"].as_str(), rv["resourceVersion"].as_i64()) {
            held.insert(id.to_string(), v);
        }
    }
    let mut out = Vec::new();
    for w in st.works.values().filter(|w| w.cluster == cluster) {
        match held.remove(&w.uid) {
            None => out.push(spec_event(source, w, "create_request")),
            Some(v) if v < w.generation => out.push(spec_event(source, w, "update_request")),
            Some(_) => {}
        }
    }
    for (uid, v) in held.into_iter().filter(|_| deletes) {
        let name = st.tombstones.get(&uid).map(|(_, n)| n.clone());
        out.push(delete_event(source, &uid, v, &cluster, name.as_deref()));
    }
    for e in out {
        broadcast(st, &cluster, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_cn_is_the_subject_not_the_issuer() {
        let pki = HubPki::generate().unwrap();
        let c = pki
            .client("cluster1", &["system:open-cluster-management"])
            .unwrap();
        let der = rustls_pemfile::certs(&mut BufReader::new(c.cert_pem.as_bytes()))
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(subject_cn(der.as_ref()).as_deref(), Some("cluster1"));
    }

    #[test]
    fn resync_answers_newer_and_deleted() {
        let mut st = State::default();
        let w = HubWork {
            name: "a".into(),
            cluster: "c".into(),
            uid: "u1".into(),
            generation: 2,
            labels: BTreeMap::new(),
            bundle: serde_json::json!({}),
        };
        st.works.insert(("c".into(), "a".into()), w);
        st.tombstones.insert("u2".into(), ("c".into(), "gone".into()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        st.subscribers.push(Subscriber {
            cluster: "c".into(),
            works: true,
            tx,
        });
        let mut req = base_event(
            "agent",
            &format!("{MANIFEST_BUNDLES}.spec.resync_request"),
            &serde_json::json!({"resourceVersions":[{"resourceID":"u1","resourceVersion":1},{"resourceID":"u2","resourceVersion":1}]}),
        );
        req.attributes.insert("ce-clustername".into(), string_attr("c"));
        answer_spec_resync("hub", true, &mut st, &req);
        let mut types = Vec::new();
        while let Ok(Ok(e)) = rx.try_recv() {
            types.push(e.r#type.rsplit('.').next().unwrap().to_string());
        }
        assert_eq!(types, vec!["update_request", "delete_request"]);
    }
}
