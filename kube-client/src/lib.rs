//! The agent's kube clients, over our own rustls connector: HTTP/1.1 with a pool of connections
//! ([`HttpVersion::Http1`]) or HTTP/2, one TLS connection multiplexing every request and watch
//! ([`HttpVersion::Http2`]).
//!
//! The spoke client speaks HTTP/1.1 by default: the API server (Go's HTTP/2 server) spent about
//! 1.45 times the CPU, and took 1.5 times as long, serving the same 20,000 writes over one HTTP/2
//! connection as over pooled HTTP/1.1 connections (the many-works benchmark's OCM-shaped floor,
//! both in one run). HTTP/2 stays available (`--kube-http2`) where connection count matters
//! more, and is what the hub client uses: little traffic, one connection through the network.
//!
//! A client whose TLS identity can change (the hub client with a rotating client certificate)
//! moves new requests to a fresh connection pool when it does, so they handshake with the new
//! identity while requests in flight, such as watches, finish on the connection they are on.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod gate;

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use rustls::pki_types::ServerName;
use tower::ServiceBuilder;

use crate::gate::{GateLayer, WriteGate};
use spokelet_base::lock::lock;

/// The error type kube's service stack uses.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's pooling client over our TLS connector: one pool of connections.
type HyperClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Body>;

/// The version of a client's TLS identity, read before each request: when it changes, new
/// requests go on new connections. It may do the reload itself (it is called outside handshakes).
pub type IdentityVersion = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Which HTTP a client speaks to an HTTPS server (plain-HTTP servers always get HTTP/1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    /// HTTP/1.1 only: one connection per request in flight, idle ones kept for reuse.
    #[default]
    Http1,
    /// HTTP/2 offered first in ALPN (HTTP/1.1 still offered, for servers without h2).
    Http2,
}

/// How long a connection (TCP and TLS) may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for its answer to begin, and an answer (other than a watch's) may
/// go without a byte: the API server's own default `--request-timeout`. Without it a request on
/// a half-open connection (a stalled proxy, a vanished node) waits for ever, and with it the
/// reconcile, the engine's drain and a lost leader's exit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a watch may go without a byte: kube's own read timeout, just over the 290 s a
/// watch asks the server to close it after; bookmarks arrive about every minute well inside it.
const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(295);

/// Idle connections an HTTP/1.1 pool keeps: enough for the engine's steady traffic; a burst
/// opens more, which then close after hyper's idle timeout.
const MAX_IDLE_PER_HOST: usize = 32;

/// Client construction failures.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    /// TLS or auth settings of the config are unusable.
    #[error("building the kube client: {0}")]
    Config(#[from] kube::Error),
    /// The kubeconfig's `tls-server-name` is not a DNS name or IP address.
    #[error("invalid tls-server-name {0:?}")]
    ServerName(String),
    /// The bearer token holds characters an HTTP header cannot carry (the HTTP stack would
    /// otherwise panic on it).
    #[error("the kubeconfig's token holds characters an HTTP header cannot carry")]
    Token,
}

/// Why the cluster configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    /// The kubeconfig could not be read.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No `--kubeconfig`, and neither KUBECONFIG / ~/.kube/config nor the in-cluster config is usable.
    #[error("cluster configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
}

/// The cluster configuration of either role: the given kubeconfig, else the usual inference
/// (KUBECONFIG, ~/.kube/config, then the in-cluster service account).
pub async fn cluster_config(kubeconfig: Option<&std::path::Path>) -> Result<Config, ClusterConfigError> {
    match kubeconfig {
        Some(path) => config_from_file(path)
            .await
            .map_err(|source| ClusterConfigError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            }),
        None => Ok(Config::infer().await?),
    }
}

/// Reads a kubeconfig file (its current context) into a client configuration; used for the
/// spoke (`--kubeconfig`) and for the hub (`--hub-kubeconfig`) alike.
pub async fn config_from_file(path: &std::path::Path) -> Result<Config, kube::config::KubeconfigError> {
    check_utf16_length(path)?;
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await
}

/// Refuses a file that starts with a UTF-16 byte-order mark but holds an odd number of bytes
/// after it: kube's reader indexes past its end on such a file and panics.
fn check_utf16_length(path: &std::path::Path) -> Result<(), kube::config::KubeconfigError> {
    let bytes =
        std::fs::read(path).map_err(|e| kube::config::KubeconfigError::ReadConfig(e, path.to_path_buf()))?;
    let utf16 = bytes.starts_with(&[0xFE, 0xFF]) || bytes.starts_with(&[0xFF, 0xFE]);
    if utf16 && bytes.len() % 2 != 0 {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "truncated UTF-16 text (odd number of bytes)",
        );
        return Err(kube::config::KubeconfigError::ReadConfig(e, path.to_path_buf()));
    }
    Ok(())
}

/// Whether a bearer token can travel in an `Authorization` header (visible ASCII, spaces, tabs
/// and bytes above 0x7f, as the `http` crate accepts).
fn token_fits_a_header(token: &str) -> bool {
    token.bytes().all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// Builds a client from `config` speaking `version`.
pub fn client(config: Config, version: HttpVersion) -> Result<Client, KubeClientError> {
    gated_client(config, version, None)
}

/// [`client`] whose writes pass only while `gate` is open (see [`crate::gate::GateLayer`]).
pub fn gated_client(
    config: Config,
    version: HttpVersion,
    gate: Option<WriteGate>,
) -> Result<Client, KubeClientError> {
    let tls = config.rustls_client_config()?;
    let guards = Guards {
        gate,
        ..Guards::default()
    };
    build(config, tls, None, version, guards)
}

/// What a client watches over besides auth.
#[derive(Debug, Clone, Default)]
pub struct Guards {
    /// Writes pass only while it is open (see [`crate::gate::GateLayer`]).
    pub gate: Option<WriteGate>,
    /// Told of every answer `401 Unauthorized`: the server no longer takes the client's
    /// credential (the hub client's, so a joined agent can join again).
    pub unauthorized: Option<Arc<tokio::sync::Notify>>,
}

/// [`client`] with a TLS configuration the caller made, for example kube's own
/// (`Config::rustls_client_config`) with a client-certificate resolver that follows rotation.
/// Everything else (server, auth, headers, `tls-server-name`) still comes from `config`.
/// With `identity_version`, a change of version retires the current connections for new
/// requests (see `RenewingPool`); without, one pool serves the client's lifetime. See
/// [`Guards`] for the rest.
pub fn client_with_tls(
    config: Config,
    tls: rustls::ClientConfig,
    identity_version: Option<IdentityVersion>,
    version: HttpVersion,
    guards: Guards,
) -> Result<Client, KubeClientError> {
    build(config, tls, identity_version, version, guards)
}

fn build(
    config: Config,
    mut tls: rustls::ClientConfig,
    identity_version: Option<IdentityVersion>,
    version: HttpVersion,
    guards: Guards,
) -> Result<Client, KubeClientError> {
    if let Some(token) = &config.auth_info.token
        && !token_fits_a_header(secrecy::ExposeSecret::expose_secret(token))
    {
        return Err(KubeClientError::Token);
    }
    // The connector sets ALPN itself from the protocols enabled below.
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    // A kubeconfig's `tls-server-name` replaces the URL's host for SNI and verification, as in
    // kube's own connector.
    let https = match &config.tls_server_name {
        Some(name) => {
            let server_name =
                ServerName::try_from(name.clone()).map_err(|_| KubeClientError::ServerName(name.clone()))?;
            https.with_server_name_resolver(FixedServerNameResolver::new(server_name))
        }
        None => https,
    };
    let https = match version {
        HttpVersion::Http1 => https.enable_http1().wrap_connector(http),
        HttpVersion::Http2 => https.enable_http1().enable_http2().wrap_connector(http),
    };
    let pool = match identity_version {
        None => ConnectionPool::Fixed(Box::new(hyper_client(https))),
        Some(version) => ConnectionPool::Renewing(Arc::new(RenewingPool::new(https, version))),
    };
    let service = ServiceBuilder::new()
        // Outermost: a write refused for want of leadership never reaches auth or the wire.
        .option_layer(guards.gate.map(GateLayer))
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        // The auth layers' errors are boxed; make the connection's error the same type.
        .map_err(|e: DeadlineError<hyper_util::client::legacy::Error>| -> BoxError { Box::new(e) })
        .service(Deadlines {
            inner: pool,
            unauthorized: guards.unauthorized,
        });
    Ok(Client::new(service, config.default_namespace))
}

/// A hyper client (a new, empty connection pool) over `https`.
fn hyper_client(https: HttpsConnector<HttpConnector>) -> HyperClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Watches idle for minutes; keep the one connection verified alive.
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .http2_keep_alive_while_idle(true)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .build(https)
}

/// Bounds every request in time: its answer must begin within [`REQUEST_TIMEOUT`], and then
/// go no longer without a byte than [`REQUEST_TIMEOUT`] ([`WATCH_IDLE_TIMEOUT`] for a watch).
/// It also tells [`Guards::unauthorized`] of each `401` answer.
#[derive(Debug, Clone)]
struct Deadlines<S> {
    inner: S,
    unauthorized: Option<Arc<tokio::sync::Notify>>,
}

/// The error of a request whose answer did not begin in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the API server within {0:?}")]
struct NoAnswer(Duration);

/// Whether the request is a watch (`?watch=true` or `?watch=1`), whose answer streams for minutes.
fn is_watch(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    })
}

impl<S, B, R> tower::Service<http::Request<B>> for Deadlines<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tower_http::timeout::TimeoutBody<R>>;
    type Error = DeadlineError<S::Error>;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(DeadlineError::Inner)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let idle = if is_watch(request.uri()) {
            WATCH_IDLE_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let answer = self.inner.call(request);
        let unauthorized = self.unauthorized.clone();
        Box::pin(async move {
            let response = tokio::time::timeout(REQUEST_TIMEOUT, answer)
                .await
                .map_err(|_| DeadlineError::NoAnswer(NoAnswer(REQUEST_TIMEOUT)))?
                .map_err(DeadlineError::Inner)?;
            if response.status() == http::StatusCode::UNAUTHORIZED
                && let Some(n) = &unauthorized
            {
                n.notify_one();
            }
            Ok(response.map(|body| tower_http::timeout::TimeoutBody::new(idle, body)))
        })
    }
}

/// A request's error: the connection's own, or no answer in time.
#[derive(Debug, thiserror::Error)]
enum DeadlineError<E> {
    #[error(transparent)]
    Inner(E),
    #[error(transparent)]
    NoAnswer(NoAnswer),
}

#[derive(Clone)]
enum ConnectionPool {
    /// One pool for the client's lifetime: the identity cannot change (no lock per request).
    /// Boxed to keep the enum small (hyper's client is some 300 bytes).
    Fixed(Box<HyperClient>),
    /// A pool replaced when the identity changes.
    Renewing(Arc<RenewingPool>),
}

impl std::fmt::Debug for ConnectionPool {
    // hyper's client has no Debug; which kind of pool this is says enough.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionPool::Fixed(_) => f.write_str("ConnectionPool::Fixed"),
            ConnectionPool::Renewing(_) => f.write_str("ConnectionPool::Renewing"),
        }
    }
}

/// A connection pool that follows the TLS identity. Pooled connections live on (an HTTP/2 one
/// carries every request), so without this a new identity would wait for them to break, and requests would
/// be refused once the old certificate expires. Dropping the old pool does not cut the
/// connection: hyper closes it once the streams still on it (a watch) have ended.
struct RenewingPool {
    /// Builds the replacement pools (cloning it shares the TLS config and its resolver).
    https: HttpsConnector<HttpConnector>,
    identity_version: IdentityVersion,
    /// The version the current pool was made for, and the pool; replaced whole under the lock.
    current: Mutex<(u64, HyperClient)>,
}

impl RenewingPool {
    fn new(https: HttpsConnector<HttpConnector>, identity_version: IdentityVersion) -> Self {
        let version = identity_version();
        let client = hyper_client(https.clone());
        RenewingPool {
            https,
            identity_version,
            current: Mutex::new((version, client)),
        }
    }

    /// The pool for the next request: a new one if the identity changed since the last request.
    fn client(&self) -> HyperClient {
        // Read outside the lock: it may reload files.
        let version = (self.identity_version)();
        let mut current = lock(&self.current);
        if current.0 != version {
            *current = (version, hyper_client(self.https.clone()));
            tracing::info!(
                version,
                "TLS identity changed; new requests go on new connections"
            );
        }
        current.1.clone()
    }
}

impl<R> tower::Service<R> for ConnectionPool
where
    HyperClient: tower::Service<R>,
{
    type Response = <HyperClient as tower::Service<R>>::Response;
    type Error = <HyperClient as tower::Service<R>>::Error;
    type Future = <HyperClient as tower::Service<R>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            ConnectionPool::Fixed(client) => client.poll_ready(cx),
            // hyper's client is always ready (it queues on its pool); the pool is picked in `call`.
            ConnectionPool::Renewing(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self {
            ConnectionPool::Fixed(client) => client.call(request),
            ConnectionPool::Renewing(pool) => pool.client().call(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    #[test]
    fn watches_are_told_from_other_requests_by_their_query() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert!(is_watch(&uri("/api/v1/pods?watch=true&resourceVersion=1")));
        assert!(is_watch(&uri("/api/v1/pods?resourceVersion=1&watch=1")));
        assert!(!is_watch(&uri("/api/v1/pods?limit=500")));
        assert!(!is_watch(&uri("/api/v1/namespaces/watch=true/pods")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_an_answer_fails_at_the_request_timeout() {
        let silent = tower::service_fn(|_req: http::Request<()>| async {
            std::future::pending::<Result<http::Response<String>, std::io::Error>>().await
        });
        let mut svc = Deadlines {
            inner: silent,
            unauthorized: None,
        };
        let start = tokio::time::Instant::now();
        let req = http::Request::get("/api/v1/namespaces").body(()).unwrap();
        let Err(err) = svc.ready().await.unwrap().call(req).await else {
            panic!("answered");
        };
        assert!(err.to_string().contains("no answer"), "{err}");
        assert_eq!(start.elapsed(), REQUEST_TIMEOUT);
    }
}
