//! The connection task: dial, subscribe, send the spec resync, read events; reconnect with
//! backoff when a session breaks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spokelet_proto::{CloudEvent, PublishRequest, SubscriptionRequest};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::Instrument;

use super::book::Shared;
use super::dial::{self, Client};
use super::options::{GrpcError, GrpcHubOptions, HubState, Subscription};
use super::publish::publish_loop;
use crate::cloudevents;
use crate::tls::{ClientTls, error_chain};
use spokelet_base::backoff::ExponentialBackoff;
use spokelet_base::deadline::sleep_until_opt;
use spokelet_base::lock::lock;
use spokelet_work_api::source::{Listing, WorkEvent};

/// How one session ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The session broke; `heard` tells whether anything was received (resets the backoff).
    Broken {
        error: GrpcError,
        /// At least one message arrived in this session.
        heard: bool,
    },
}

/// The connection task's own state.
pub(super) struct Runner {
    pub(super) opts: GrpcHubOptions,
    /// TLS client (None for plaintext).
    pub(super) tls: Option<ClientTls>,
    /// Works held and the status outbox, shared with the sink.
    pub(super) shared: Arc<Shared>,
    /// The sending end of the engine's `GrpcHub::source`.
    pub(super) events: mpsc::Sender<WorkEvent>,
    /// Seen by every `HubHandle`.
    pub(super) state: watch::Sender<HubState>,
    /// Ends the transport, after a bounded flush of the outbox (see `flush`).
    pub(super) shutdown: CancellationToken,
}

impl Runner {
    /// Connect, run a session, back off, repeat until shutdown.
    pub(super) async fn run(self) {
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
            // No evictions of missing works while the hub is away (see `WorkEvent::Disconnected`).
            let _ = self.events.send(WorkEvent::Disconnected).await;
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Broken { error, heard } => {
                    let mut msg = error_chain(&error);
                    let refused = super::options::credentials_refused(&error);
                    if refused {
                        msg.push_str(" (the hub refused this agent's client certificate)");
                    }
                    // A session that never got going may be a refused certificate whose TLS
                    // alert was lost (TLS 1.3 sends it after the handshake): the renewal task
                    // checks (`refuses_kept`) before it joins again.
                    if (refused || !heard)
                        && let Some(rejected) = &self.opts.rejected
                    {
                        rejected.notify_one();
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
        dial::connect(&self.opts, self.tls.as_ref()).await
    }

    /// One connection: subscribe, resync, read until it breaks.
    async fn session(&self) -> SessionEnd {
        let broken = |error| SessionEnd::Broken { error, heard: false };
        let client = tokio::select! {
            () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            c = self.connect() => match c { Ok(c) => c, Err(e) => return broken(e) },
        };
        let mut stream = tokio::select! {
            () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            r = self.subscribe(&client) => match r { Ok(s) => s, Err(e) => return broken(e) },
        };
        self.opts.metrics.connected.set(1);
        self.state.send_modify(|st| {
            st.connected = true;
            st.sessions += 1;
        });
        tracing::info!("subscribed to the hub");
        // Only a works subscription has works to resync.
        if self.opts.subscription == Subscription::Works
            && let Err(e) = self.send_spec_resync(&client).await
        {
            return broken(e);
        }

        // Publisher: drains the outbox while this session lives. Its own token (not a child of
        // shutdown) so it can flush the outbox after shutdown is requested.
        let session = CancellationToken::new();
        let (pub_err_tx, mut pub_err_rx) = mpsc::channel::<GrpcError>(1);
        let publisher = tokio::spawn(
            publish_loop(
                self.shared.clone(),
                client.clone(),
                self.opts.publish_timeout,
                self.opts.gate.clone(),
                session.clone(),
                pub_err_tx,
            )
            .in_current_span(),
        );
        let _stop_publisher = session.clone().drop_guard();

        let end = self.read_events(&mut stream, &mut pub_err_rx).await;
        if matches!(end, SessionEnd::Shutdown) && !self.opts.shutdown_flush.is_zero() {
            self.flush(&mut pub_err_rx).await;
        }
        session.cancel();
        let _ = publisher.await;
        end
    }

    /// Subscribes for this cluster's manifest bundles.
    async fn subscribe(&self, client: &Client) -> Result<Streaming<CloudEvent>, GrpcError> {
        let mut sub_client = client.clone();
        let req = SubscriptionRequest {
            source: String::new(),
            cluster_name: self.opts.settings.cluster_name.clone(),
            data_type: self.opts.subscription.data_type().to_string(),
        };
        match tokio::time::timeout(self.opts.connect_timeout, sub_client.subscribe(req)).await {
            Err(_) => Err(GrpcError::Timeout("subscribe")),
            Ok(Err(st)) => Err(GrpcError::Subscribe(st)),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    /// Resync: tells the hub what we hold so it sends what changed while we were away.
    async fn send_spec_resync(&self, client: &Client) -> Result<(), GrpcError> {
        let s = &self.opts.settings;
        let held = lock(&self.shared.book).held_versions();
        let count = held.len();
        let ev = cloudevents::spec_resync_request(&s.agent_id, &s.cluster_name, held);
        let mut pub_client = client.clone();
        match tokio::time::timeout(
            self.opts.publish_timeout,
            pub_client.publish(PublishRequest { event: Some(ev) }),
        )
        .await
        {
            Err(_) => return Err(GrpcError::Timeout("spec resync request")),
            Ok(Err(st)) => return Err(GrpcError::Resync(st)),
            Ok(Ok(_)) => {}
        }
        self.state.send_modify(|st| st.resyncs += 1);
        tracing::debug!(works = count, "spec resync request sent");
        Ok(())
    }

    /// Reads events until the stream breaks, the hub goes silent past the heartbeat timeout, the
    /// publisher reports a broken connection, or shutdown. Emits `Synced(Quiet)` once this
    /// session's resync has gone quiet (see the module docs).
    async fn read_events(
        &self,
        stream: &mut Streaming<CloudEvent>,
        publish_errors: &mut mpsc::Receiver<GrpcError>,
    ) -> SessionEnd {
        let hb_timeout = self.opts.settings.heartbeat_timeout;
        let start = Instant::now();
        let mut last_heard = start;
        let mut heard = false;
        // A reports-only subscription has no resync to wait for.
        let mut sync_at =
            (self.opts.subscription == Subscription::Works).then(|| start + self.opts.sync_quiet);
        let sync_limit = start + self.opts.sync_max_wait;
        loop {
            let sync_deadline = sync_at.map(|t| t.min(sync_limit));
            tokio::select! {
                () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                Some(e) = publish_errors.recv() => return SessionEnd::Broken { error: e, heard },
                () = tokio::time::sleep_until(last_heard + hb_timeout) => {
                    return SessionEnd::Broken { error: GrpcError::HeartbeatTimeout(hb_timeout), heard };
                }
                () = sleep_until_opt(sync_deadline) => {
                    sync_at = None;
                    self.emit_synced().await;
                }
                msg = stream.message() => match msg {
                    Ok(Some(ev)) => {
                        last_heard = Instant::now();
                        heard = true;
                        let (spec, event) = self.handle_event(&ev);
                        if spec && sync_at.is_some() {
                            sync_at = Some(last_heard + self.opts.sync_quiet);
                        }
                        if let Some(event) = event {
                            // Waits while the engine's channel is full; the engine only files
                            // events, so the wait is short, and it counts as hearing the hub.
                            if self.events.send(event).await.is_err() {
                                return SessionEnd::Shutdown;
                            }
                            last_heard = Instant::now();
                        }
                    }
                    Ok(None) => return SessionEnd::Broken { error: GrpcError::StreamEnded, heard },
                    Err(st) => return SessionEnd::Broken { error: GrpcError::Stream(st), heard },
                },
            }
        }
    }

    /// Emits `Synced(Quiet)` for this session's resync. It proves nothing about works the hub
    /// did not send (the hub may still be answering): those are only missing.
    async fn emit_synced(&self) {
        if !self.shared.synced.swap(true, Ordering::Relaxed) {
            tracing::info!("initial resync quiet");
        } else {
            tracing::debug!("resync quiet");
        }
        let _ = self.events.send(WorkEvent::Synced(Listing::Quiet)).await;
        self.state.send_modify(|st| st.synced = true);
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
}
