//! Leader election for the work engine: one active `spokelet run` per spoke, chosen by a
//! `coordination.k8s.io/v1` Lease, with a write gate that shuts the moment leadership may
//! have passed to someone else.
//!
//! Written here rather than taken from a crate because the guarantee we need is the gate,
//! not the election: the leader's right to write is judged by its *own* monotonic clock (it
//! writes only until `renew sent + renew deadline`), and a candidate judges the holder by
//! when *it* last saw the Lease change (client-go's rule), so no decision ever compares two
//! machines' wall clocks. A leader frozen (SIGSTOP, a stalled VM) past its deadline finds
//! its gate shut the instant it resumes, before its next request leaves.
//!
//! The timings, each a flag: the lease lasts `duration` (10 s) as others see it; the leader
//! renews every `retry_period` (2 s) and stops writing once `renew_deadline` (7 s) has passed
//! since the last renewal it sent that succeeded, 3 s before anyone may take over.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub(crate) use spokelet_kube_client::gate::WriteGate;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use spokelet_base::backoff::ExponentialBackoff;
use spokelet_base::duration::parse_duration;

/// Leader-election settings of `spokelet run`.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaderArgs {
    /// Run the work engine only while holding the Lease, so several replicas (a Deployment of
    /// two) have exactly one active; the others wait as standbys and write nothing.
    #[arg(long, env = "SPOKELET_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Name of the Lease.
    #[arg(
        long,
        env = "SPOKELET_LEADER_LEASE_NAME",
        default_value = "spokelet-work-engine"
    )]
    pub leader_lease_name: String,

    /// Namespace of the Lease (default: --agent-namespace).
    #[arg(long, env = "SPOKELET_LEADER_LEASE_NAMESPACE")]
    pub leader_lease_namespace: Option<String>,

    /// How long the Lease holds, as other replicas see it, after its last renewal.
    #[arg(long, env = "SPOKELET_LEADER_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,

    /// How long after its last successful renewal the leader stops writing; must be shorter
    /// than the lease duration (the difference is the safety margin).
    #[arg(long, env = "SPOKELET_LEADER_RENEW_DEADLINE", default_value = "7s", value_parser = parse_duration)]
    pub leader_renew_deadline: Duration,

    /// How often the leader renews and a standby looks at the Lease.
    #[arg(long, env = "SPOKELET_LEADER_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub leader_retry_period: Duration,

    /// This replica's identity in the Lease (default: the pod or host name plus a random
    /// suffix, so a restarted replica is never mistaken for its former self).
    #[arg(long, env = "SPOKELET_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
}

/// Settings that cannot work together.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "--leader-renew-deadline ({deadline:?}) must be shorter than --leader-lease-duration ({duration:?}) and longer than --leader-retry-period ({retry:?})"
    )]
    Timings {
        duration: Duration,
        deadline: Duration,
        retry: Duration,
    },
    /// Leadership was lost while running; the engine stopped writing at once.
    #[error(
        "lost the work-engine lease {0}: another replica may now hold it; exiting so the standby takes over"
    )]
    Lost(String),
}

/// Checked settings of one election.
#[derive(Debug, Clone)]
pub(crate) struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// The settings `args` select; the Lease lives in `agent_namespace` unless told otherwise.
    pub(crate) fn from_args(args: &LeaderArgs, agent_namespace: &str) -> Result<LeaseSettings, LeaderError> {
        let (duration, deadline, retry) = (
            args.leader_lease_duration,
            args.leader_renew_deadline,
            args.leader_retry_period,
        );
        if deadline >= duration || retry >= deadline || retry.is_zero() {
            return Err(LeaderError::Timings {
                duration,
                deadline,
                retry,
            });
        }
        Ok(LeaseSettings {
            name: args.leader_lease_name.clone(),
            namespace: args
                .leader_lease_namespace
                .clone()
                .unwrap_or_else(|| agent_namespace.to_string()),
            identity: args.leader_identity.clone().unwrap_or_else(default_identity),
            duration,
            renew_deadline: deadline,
            retry_period: retry,
        })
    }

    /// `namespace/name`, for messages.
    pub(crate) fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `$POD_NAME`/`$HOSTNAME` (or `spokelet`) and eight random hex digits.
fn default_identity() -> String {
    let host = std::env::var("SPOKELET_POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "spokelet".to_string());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// The error of a Lease request that got no answer within `limit`.
fn no_answer(limit: Duration) -> kube::Error {
    kube::Error::Service(format!("no answer from the API server within {limit:?}").into())
}

/// Where this replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// Waiting for the Lease; writes nothing.
    Standby,
    /// Holds the Lease; its gate is open.
    Leader,
    /// Held it and could not renew it in time: its gate is shut for good.
    Lost,
}

/// Leader-election metrics (`spokelet_leader_*`).
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaderMetrics {
    /// 1 while this replica holds the Lease.
    pub is_leader: Gauge,
    /// Times this replica acquired the Lease.
    pub acquired: Counter,
    /// Renewals that failed (each is retried until the renew deadline).
    pub renew_failures: Counter,
}

impl LeaderMetrics {
    /// Registers under `registry` (give it the `leader` prefix).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "is_leader",
            "1 while this replica holds the work-engine Lease",
            self.is_leader.clone(),
        );
        registry.register(
            "acquired",
            "Times this replica acquired the work-engine Lease",
            self.acquired.clone(),
        );
        registry.register(
            "renew_failures",
            "Lease renewals that failed (retried until the renew deadline)",
            self.renew_failures.clone(),
        );
    }
}

/// The Lease as a candidate last saw it change, and when (by its own clock).
#[derive(Debug, Clone)]
struct Observed {
    resource_version: String,
    holder: Option<String>,
    at: Instant,
}

/// Runs the election; [`Elector::role`] follows it.
#[derive(Debug)]
pub(crate) struct Elector {
    /// A client of its own, never gated: the Lease is the one write a standby makes.
    api: Api<Lease>,
    settings: LeaseSettings,
    gate: WriteGate,
    role: watch::Sender<Role>,
    metrics: LeaderMetrics,
    observed: Option<Observed>,
}

/// What one look at the Lease came to.
enum Attempt {
    /// We hold it, renewed by a request sent at this instant.
    Held(Instant),
    /// Someone else holds it and has not let it lapse.
    Taken,
}

impl Elector {
    pub(crate) fn new(
        client: kube::Client,
        settings: LeaseSettings,
        gate: WriteGate,
        metrics: LeaderMetrics,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            gate,
            role: watch::Sender::new(Role::Standby),
            metrics,
            observed: None,
        }
    }

    /// Follows this replica's role.
    pub(crate) fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Campaigns and then renews until `stop` is cancelled (the Lease is then released by
    /// [`Elector::release`], after the engine has drained) or leadership is lost (the gate is
    /// shut and the role becomes [`Role::Lost`]; the caller stops the engine and exits).
    pub(crate) async fn run(&mut self, stop: CancellationToken) {
        // Errors (API server down) are retried with the shared backoff, capped at the retry
        // period so a standby notices a free Lease promptly once the server is back.
        let mut backoff =
            ExponentialBackoff::new(self.settings.retry_period / 4, self.settings.retry_period, 0.2);
        loop {
            let leading = *self.role.borrow() == Role::Leader;
            // Each attempt is bounded: a renewal hung on a half-open connection must not keep a
            // shut-gate "leader" (and its hub session) alive for minutes. A leader waits at most
            // until its gate shuts, a candidate one retry period.
            let limit = if leading {
                self.gate.remaining()
            } else {
                self.settings.retry_period
            };
            let attempt = tokio::time::timeout(limit, self.attempt())
                .await
                .unwrap_or_else(|_| Err(no_answer(limit)));
            let wait = match attempt {
                Ok(Attempt::Held(sent)) => {
                    backoff.reset();
                    self.gate.open_until(sent + self.settings.renew_deadline);
                    if !leading {
                        self.metrics.acquired.inc();
                        self.metrics.is_leader.set(1);
                        tracing::info!(lease = %self.settings.lease(), identity = %self.settings.identity, "acquired the work-engine lease");
                        self.role.send_replace(Role::Leader);
                    }
                    self.settings.retry_period
                }
                Ok(Attempt::Taken) => {
                    backoff.reset();
                    if leading {
                        // Someone holds it now: it lapsed while we were not looking.
                        self.lose("another replica holds the lease");
                        return;
                    }
                    jittered(self.settings.retry_period)
                }
                Err(e) => {
                    if leading {
                        self.metrics.renew_failures.inc();
                        tracing::warn!(error = %e, "cannot renew the work-engine lease; retrying");
                    } else {
                        tracing::debug!(error = %e, "cannot read the work-engine lease; retrying");
                    }
                    backoff.next_delay()
                }
            };
            if leading && !self.gate.is_open() {
                self.lose("the renew deadline passed without a successful renewal");
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            // Frozen or starved past the deadline: the gate is already shut by the clock.
            if *self.role.borrow() == Role::Leader && !self.gate.is_open() {
                self.lose("the renew deadline passed (the process was paused or starved)");
                return;
            }
        }
    }

    fn lose(&self, why: &str) {
        self.gate.shut_now();
        self.metrics.is_leader.set(0);
        tracing::error!(lease = %self.settings.lease(), why, "lost the work-engine lease; writes stopped");
        self.role.send_replace(Role::Lost);
    }

    /// Gives the Lease up so a standby takes over at once, instead of after its duration.
    /// Called after the engine drained; the gate is shut first, so nothing writes after.
    pub(crate) async fn release(&self) {
        self.gate.shut_now();
        self.metrics.is_leader.set(0);
        if *self.role.borrow() != Role::Leader {
            return;
        }
        let Ok(mut lease) = self.api.get(&self.settings.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        // client-go's release: no holder, a one-second duration.
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_time_now());
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.settings.lease(), "released the work-engine lease"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the work-engine lease; it lapses on its own")
            }
        }
    }

    /// One look at the Lease: create it, renew ours, or take over a lapsed or released one.
    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        let sent = Instant::now();
        let current = match self.api.get_opt(&self.settings.name).await? {
            Some(l) => l,
            None => {
                self.api.create(&PostParams::default(), &self.lease(0)).await?;
                return Ok(Attempt::Held(sent));
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.settings.identity.as_str());
        if !ours && !self.lapsed(&current) {
            return Ok(Attempt::Taken);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut next = if ours {
            let mut renewed = current.clone();
            let s = renewed.spec.get_or_insert_with(Default::default);
            s.renew_time = Some(micro_time_now());
            s.lease_duration_seconds = Some(secs(self.settings.duration));
            renewed
        } else {
            tracing::info!(previous = ?holder, "the work-engine lease is free; taking it");
            self.lease(transitions + 1)
        };
        // The resourceVersion makes the write conditional: two candidates cannot both win.
        next.metadata.resource_version = current.metadata.resource_version.clone();
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(Attempt::Held(sent)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Taken),
            Err(e) => Err(e),
        }
    }

    /// Whether the holder let the Lease go: released (no holder), or unchanged for its whole
    /// duration since this replica first saw its current version.
    fn lapsed(&mut self, lease: &Lease) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.is_none() {
            return true;
        }
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen = match &self.observed {
            Some(o) if o.resource_version == version && o.holder == holder => o.at,
            _ => {
                let now = Instant::now();
                self.observed = Some(Observed {
                    resource_version: version,
                    holder,
                    at: now,
                });
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1)))
            .unwrap_or(self.settings.duration);
        seen.elapsed() > duration
    }

    /// A Lease held by this replica, acquired now.
    fn lease(&self, transitions: i32) -> Lease {
        let now = micro_time_now();
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(secs(self.settings.duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// `period` spread by a fifth either way, so standbys do not poll in step.
fn jittered(period: Duration) -> Duration {
    ExponentialBackoff::new(period, period, 0.2).delay_for(0)
}

/// Now, as the Lease's MicroTime.
fn micro_time_now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// A status sink that drops reports while the write gate is shut: a replica that lost the
/// Lease reports nothing more (the new leader reports the works' state itself).
#[derive(Debug)]
pub(crate) struct GatedSink {
    inner: Arc<dyn spokelet_work_api::source::StatusSink>,
    gate: WriteGate,
}

impl GatedSink {
    pub(crate) fn wrap(
        inner: Arc<dyn spokelet_work_api::source::StatusSink>,
        gate: Option<WriteGate>,
    ) -> Arc<dyn spokelet_work_api::source::StatusSink> {
        match gate {
            Some(gate) => Arc::new(GatedSink { inner, gate }),
            None => inner,
        }
    }
}

impl spokelet_work_api::source::StatusSink for GatedSink {
    fn publish(
        &self,
        update: spokelet_work_api::source::StatusUpdate,
    ) -> futures::future::BoxFuture<'_, Result<(), spokelet_work_api::source::SinkError>> {
        if !self.gate.is_open() {
            return Box::pin(std::future::ready(Err(
                spokelet_work_api::source::SinkError::Failed("not the leader: status not reported".into()),
            )));
        }
        self.inner.publish(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_loses_leadership_at_the_gate_deadline() {
        let hanging = tower::service_fn(|_req: http::Request<kube::client::Body>| {
            std::future::pending::<Result<http::Response<kube::client::Body>, BoxError>>()
        });
        let client = kube::Client::new(hanging, "ns");
        let settings = LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "me".into(),
            duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(2),
        };
        let gate = WriteGate::shut();
        let start = Instant::now();
        gate.open_until(start + settings.renew_deadline);
        let mut elector = Elector::new(client, settings, gate.clone(), LeaderMetrics::default());
        elector.role.send_replace(Role::Leader);
        let role = elector.role();
        let ran = tokio::time::timeout(Duration::from_secs(60), elector.run(CancellationToken::new())).await;
        assert!(ran.is_ok(), "the elector waited on a renewal that never answers");
        assert_eq!(*role.borrow(), Role::Lost);
        assert!(!gate.is_open());
        assert!(
            start.elapsed() <= Duration::from_secs(7) + Duration::from_millis(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn timings_that_leave_no_margin_are_refused() {
        let args = |duration: u64, deadline: u64, retry: u64| LeaderArgs {
            leader_elect: true,
            leader_lease_name: "l".into(),
            leader_lease_namespace: None,
            leader_lease_duration: Duration::from_secs(duration),
            leader_renew_deadline: Duration::from_secs(deadline),
            leader_retry_period: Duration::from_secs(retry),
            leader_identity: Some("me".into()),
        };
        assert!(LeaseSettings::from_args(&args(10, 7, 2), "ns").is_ok());
        assert!(LeaseSettings::from_args(&args(10, 10, 2), "ns").is_err());
        assert!(LeaseSettings::from_args(&args(10, 7, 7), "ns").is_err());
        let s = LeaseSettings::from_args(&args(10, 7, 2), "ns").unwrap();
        assert_eq!(s.lease(), "ns/l");
    }
}
