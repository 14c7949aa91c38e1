//! The admin endpoint: Prometheus `/metrics`, liveness `/healthz` and readiness `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use spokelet_base::lock::lock;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address could not be bound (in use, or not ours to bind).
    #[error("cannot listen for admin requests on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Serving stopped with an I/O error, or the bound socket's address could not be read.
    #[error("admin server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Liveness and readiness flags shared between the engine and the admin server.
///
/// Cheap to clone: every clone sees the same flags. Readiness starts false and is
/// raised by whoever knows the agent can do its job (the work engine, once synced);
/// liveness starts true and is lowered only when a component is wedged beyond repair,
/// so the kubelet restarts us instead of leaving a stuck agent in place.
#[derive(Debug, Clone)]
pub struct Health {
    /// Serving traffic is meaningful: caches synced, first apply pass done.
    ready: Arc<AtomicBool>,
    /// The process is not wedged.
    live: Arc<AtomicBool>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Health {
    /// Mark the agent ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Mark the agent live (or wedged) for `/healthz`.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether `/healthz` answers 200.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

/// A metrics registry shared by every component that registers metrics.
///
/// A `std` mutex is enough: registration happens at start-up and encoding once per
/// scrape, never across an `.await`.
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// A fresh registry with every metric named under the `spokelet` prefix.
pub fn new_registry() -> SharedRegistry {
    Arc::new(Mutex::new(Registry::with_prefix("spokelet")))
}

/// What a long-running command gets from the binary: how to stop, where to put
/// metrics, and how to say it is ready.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Cancelled on SIGTERM/SIGINT: stop taking new work, finish what is in flight, return.
    pub shutdown: CancellationToken,
    /// Register metrics here; `/metrics` encodes it on each scrape.
    pub registry: SharedRegistry,
    /// Readiness and liveness reported by the admin server.
    pub health: Health,
}

impl RunContext {
    /// A context with a fresh token, registry and health (tests, and the binary).
    pub fn new() -> Self {
        Self {
            shutdown: CancellationToken::new(),
            registry: new_registry(),
            health: Health::default(),
        }
    }
}

impl Default for RunContext {
    fn default() -> Self {
        Self::new()
    }
}

/// The admin HTTP server, bound and ready to serve.
#[derive(Debug)]
pub struct AdminServer {
    /// Bound before serving so the caller learns the real port (tests bind port 0).
    listener: tokio::net::TcpListener,
    state: AdminState,
}

/// Cloned into every request by axum's `State`; both fields are shared handles, so that is cheap.
#[derive(Debug, Clone)]
struct AdminState {
    registry: SharedRegistry,
    health: Health,
}

impl AdminServer {
    /// Binds `addr` at once, so a port in use fails start-up with [`AdminError::Bind`].
    pub async fn bind(
        addr: SocketAddr,
        registry: SharedRegistry,
        health: Health,
    ) -> Result<Self, AdminError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self {
            listener,
            state: AdminState { registry, health },
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, AdminError> {
        self.listener.local_addr().map_err(AdminError::Serve)
    }

    /// Serve until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), AdminError> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(AdminError::Serve)
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    let encoded = prometheus_client::encoding::text::encode(&mut body, &lock(&state.registry));
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {err}\n"),
        ),
    }
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not live\n")
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A raw HTTP/1.1 GET, so the test needs no HTTP client dependency.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let ctx = RunContext::new();
        let counter: Counter = Counter::default();
        ctx.registry
            .lock()
            .unwrap()
            .register("test_events", "Events seen by the test", counter.clone());
        counter.inc_by(3);

        let server = AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            ctx.registry.clone(),
            ctx.health.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.serve(ctx.shutdown.clone()));

        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("spokelet_test_events_total 3"), "{body}");

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(
            get(addr, "/readyz").await.0,
            503,
            "not ready before the engine says so"
        );
        ctx.health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        ctx.health.set_live(false);
        assert_eq!(get(addr, "/healthz").await.0, 503);
        assert_eq!(get(addr, "/nope").await.0, 404);

        ctx.shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = AdminServer::bind(addr, new_registry(), Health::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
