//! The write gate of leader election: while it is shut, every mutating request of a client that
//! carries it is refused without being sent, and a write still unanswered when it shuts is
//! abandoned, so a replica that lost the Lease cannot write to the spoke.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Whether this replica may write to the spoke now: open until an instant of the local
/// monotonic clock, shut otherwise. Cheap to clone; checked before every mutating request.
#[derive(Debug, Clone)]
pub struct WriteGate {
    /// The instant the gate shuts, as nanoseconds after `base`; 0 is shut.
    open_until: Arc<AtomicU64>,
    base: Instant,
}

impl WriteGate {
    /// A gate that is shut until [`WriteGate::open_until`] opens it.
    pub fn shut() -> WriteGate {
        WriteGate {
            open_until: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
        }
    }

    /// Writes are allowed until `deadline` (never moved backwards by a late renewal).
    pub fn open_until(&self, deadline: Instant) {
        let nanos =
            u64::try_from(deadline.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.open_until.fetch_max(nanos.max(1), Ordering::AcqRel);
    }

    /// No write from now on.
    pub fn shut_now(&self) {
        self.open_until.store(0, Ordering::Release);
    }

    /// How long writes remain allowed (zero when shut).
    pub fn remaining(&self) -> Duration {
        let until = self.open_until.load(Ordering::Acquire);
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(until.saturating_sub(now))
    }

    /// Whether a write may be sent now.
    pub fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        until != 0 && now < until
    }
}

/// A tower layer that refuses every mutating request (anything but GET, HEAD and OPTIONS)
/// while its [`WriteGate`] is shut, without sending it: the engine's spoke clients carry it,
/// so no code path (apply, record, prune, delete, executor impersonation) can write
/// without leadership. Reads and watches pass, so caches stay warm.
#[derive(Debug, Clone)]
pub struct GateLayer(pub WriteGate);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// The service [`GateLayer`] makes.
#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: WriteGate,
}

/// The error a refused write fails with; kube reports it as a service error.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: {method} {path} refused (this replica does not hold the work-engine lease)")]
pub struct NotLeader {
    method: http::Method,
    path: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if reads {
            let fut = self.inner.call(request);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        }
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        if !self.gate.is_open() {
            let refused = NotLeader { method, path };
            tracing::warn!(error = %refused, "write refused");
            return Box::pin(std::future::ready(Err(refused.into())));
        }
        let fut = self.inner.call(request);
        // A write sent while the gate was open must still not land after it shuts: a request
        // held up (a stalled connection, a slow server) is abandoned at the gate's deadline,
        // which a renewal meanwhile moves on.
        let gate = self.gate.clone();
        Box::pin(async move {
            tokio::pin!(fut);
            loop {
                let left = gate.remaining();
                if left.is_zero() {
                    let late = Outlived { method, path };
                    tracing::warn!(error = %late, "write abandoned");
                    return Err(late.into());
                }
                tokio::select! {
                    r = &mut fut => return r.map_err(Into::into),
                    () = tokio::time::sleep(left) => {}
                }
            }
        })
    }
}

/// The error of a write still unanswered when the gate shut: abandoned, so it cannot land
/// while another replica holds the lease.
#[derive(Debug, thiserror::Error)]
#[error(
    "not the leader: {method} {path} was abandoned unanswered when the work-engine lease's renew deadline passed"
)]
pub struct Outlived {
    method: http::Method,
    path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_gate_shuts_by_the_clock_and_never_moves_back() {
        let gate = WriteGate::shut();
        assert!(!gate.is_open());
        let now = Instant::now();
        gate.open_until(now + Duration::from_secs(7));
        assert!(gate.is_open());
        // A late renewal that started earlier does not shorten the window.
        gate.open_until(now + Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(gate.is_open());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            !gate.is_open(),
            "past the deadline: shut without anyone closing it"
        );
        gate.open_until(Instant::now() + Duration::from_secs(1));
        gate.shut_now();
        assert!(!gate.is_open());
    }

    /// A leader whose renewal hangs (a half-open connection: the request is sent, no answer
    /// ever comes) loses the Lease when its gate shuts, instead of waiting on the request.
    #[tokio::test(start_paused = true)]
    async fn a_shut_gate_refuses_writes_and_lets_reads_through() {
        use tower::{Layer, Service, ServiceExt};
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, BoxError>(()))
        });
        let gate = WriteGate::shut();
        let mut svc = GateLayer(gate.clone()).layer(inner);
        let req = |m: http::Method| {
            http::Request::builder()
                .method(m)
                .uri("/api/v1/namespaces/a/configmaps")
                .body(())
                .unwrap()
        };
        svc.ready()
            .await
            .unwrap()
            .call(req(http::Method::GET))
            .await
            .unwrap();
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(req(http::Method::PATCH))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not the leader"), "{err}");
        assert_eq!(
            sent.load(Ordering::SeqCst),
            1,
            "the refused write never reached the server"
        );
        gate.open_until(Instant::now() + Duration::from_secs(1));
        svc.ready()
            .await
            .unwrap()
            .call(req(http::Method::DELETE))
            .await
            .unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_unanswered_at_the_gates_deadline_is_abandoned_unless_a_renewal_moves_it() {
        use tower::{Layer, Service, ServiceExt};
        // A server that answers each write only after 5 s.
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, BoxError>(())
        });
        let gate = WriteGate::shut();
        let mut svc = GateLayer(gate.clone()).layer(inner);
        let patch = || {
            http::Request::builder()
                .method(http::Method::PATCH)
                .uri("/api/v1/namespaces/a/configmaps/b")
                .body(())
                .unwrap()
        };
        let start = Instant::now();
        gate.open_until(start + Duration::from_secs(2));
        let err = svc.ready().await.unwrap().call(patch()).await.unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "abandoned at the deadline, not later"
        );

        // Renewed while the write is on its way: it is waited for.
        let start = Instant::now();
        gate.open_until(start + Duration::from_secs(2));
        let renewing = {
            let gate = gate.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                gate.open_until(Instant::now() + Duration::from_secs(7));
            })
        };
        svc.ready().await.unwrap().call(patch()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        renewing.await.unwrap();
    }
}
