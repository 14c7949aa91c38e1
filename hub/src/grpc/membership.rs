//! The cluster's membership of an OCM hub over gRPC, as OCM's registration agent keeps it with
//! `--registration-auth=grpc`: the hub's ManagedCluster and `managed-cluster-lease` followed
//! over their own subscriptions, and written back whole (OCM's server replaces the object with
//! what it is sent, so each write carries the latest version the hub sent).
//!
//! While the hub accepts the cluster the task renews the lease every
//! `spec.leaseDurationSeconds` (jittered by up to a quarter, as OCM's agent does), and keeps
//! `ManagedClusterJoined` and `ManagedClusterConditionAvailable` with the same rules as the
//! Kubernetes hub ([`crate::kube_hub::membership`]); the pool reporter's status
//! (claims, capacity, version) goes into the same object. A hub that serves no ManagedCluster
//! to the agent (spokelet's own CloudEvents hub, say) is left alone: the pool status then
//! goes as before, a status-only event, and the subscription is tried again every few minutes.

use std::time::Duration;

use kube::api::DynamicObject;
use serde_json::Value;
use spokelet_proto::{LEASES, MANAGED_CLUSTERS};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dial::dial_hub;
use super::objects::{ObjectFeed, Refusal};
use super::options::GrpcError;
use crate::cloudevents::action;
use crate::config::HubSettings;
use crate::kube_hub::lease::{jittered, micro_time_now};
use crate::kube_hub::membership::{
    CLOCK_SYNCED, FAILING_PROBE_PERIOD, HEALTH_PERIOD, Health, JOINED, Membership, condition,
    condition_status, merge_conditions, probe_spoke,
};
use crate::pool_report::PoolReportSink;
use spokelet_base::backoff::ExponentialBackoff;
use spokelet_kube_client::gate::WriteGate;
use spokelet_work_api::conditions::now_rfc3339;

/// The lease OCM's hub makes for each cluster, in the cluster's namespace.
const LEASE_NAME: &str = "managed-cluster-lease";
/// How often the hub is asked again for the ManagedCluster and the lease until it has
/// confirmed the membership (see `Session::settled`): OCM's server registers a subscription
/// only after it has answered it, so the answer to a list sent at once, or an event of those
/// first moments, can miss it (and, until the object changes, nothing else comes). The first
/// asks are a second apart, doubling up to [`RELIST_MAX`]; none once settled.
const RELIST: Duration = Duration::from_secs(1);
const RELIST_MAX: Duration = Duration::from_secs(30);
/// How long a hub that serves no ManagedCluster is left before the agent asks again.
const UNMANAGED_RETRY: Duration = Duration::from_secs(300);

/// What the membership task needs.
#[allow(missing_debug_implementations)] // kube's Client has no Debug.
pub struct MembershipOptions {
    /// The hub and the agent's credentials (the transport's own).
    pub settings: HubSettings,
    /// The spoke, probed for `Available`; without it only `Joined` is kept.
    pub spoke: Option<kube::Client>,
    /// The work-engine lease's write gate: nothing is written while it is shut.
    pub gate: Option<WriteGate>,
    /// Where the pool status goes on a hub that serves no ManagedCluster.
    pub fallback: super::sinks::GrpcReportSink,
}

/// The pool reporter's side: its ManagedCluster status reaches the membership task, which
/// writes it into the whole object (or hands it to the transport's outbox, see the module
/// docs); node inventories go to the transport as before.
#[derive(Debug, Clone)]
pub struct MembershipReports {
    status: watch::Sender<Option<(Value, bool)>>,
    transport: super::sinks::GrpcReportSink,
}

impl MembershipReports {
    /// The sink, and the receiver the membership task reads.
    pub fn new(transport: super::sinks::GrpcReportSink) -> (Self, watch::Receiver<Option<(Value, bool)>>) {
        let (status, rx) = watch::channel(None);
        (MembershipReports { status, transport }, rx)
    }
}

impl PoolReportSink for MembershipReports {
    fn cluster_status(&self, status: Value, resend: bool) {
        self.status.send_replace(Some((status, resend)));
    }

    fn node_inventory(&self, node: &str, document: Option<Value>, resend: bool) {
        self.transport.node_inventory(node, document, resend);
    }
}

/// How a session ended.
enum End {
    Stopped,
    /// The hub serves no ManagedCluster or lease to this agent.
    Unmanaged(GrpcError),
    Broken(GrpcError),
}

/// Keeps the membership until `stop`; see the module docs.
pub async fn keep_membership(
    opts: MembershipOptions,
    mut reports: watch::Receiver<Option<(Value, bool)>>,
    stop: CancellationToken,
) {
    let mut backoff = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(60), 0.2);
    loop {
        let mut session = Session::new(&opts);
        let end = session.run(&mut reports, &stop).await;
        match end {
            End::Stopped => return,
            End::Unmanaged(e) => {
                tracing::info!(error = %e, "the hub serves no ManagedCluster to this agent over gRPC: no lease or cluster conditions; the pool status goes as a status event");
                if !forward_unmanaged(&opts.fallback, &mut reports, &stop).await {
                    return;
                }
            }
            End::Broken(e) => {
                if session.heard {
                    backoff.reset();
                }
                tracing::warn!(error = %e, "the ManagedCluster and lease subscriptions broke; again shortly");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Hands the pool status to the transport's outbox for [`UNMANAGED_RETRY`]; false once
/// stopped.
async fn forward_unmanaged(
    fallback: &super::sinks::GrpcReportSink,
    reports: &mut watch::Receiver<Option<(Value, bool)>>,
    stop: &CancellationToken,
) -> bool {
    let until = Instant::now() + UNMANAGED_RETRY;
    // Without a pool reporter (`--pool-report=false`) there is never a status to forward.
    let mut open = reports.has_changed().is_ok();
    loop {
        if let Some((status, resend)) = reports.borrow_and_update().clone() {
            fallback.cluster_status(status, resend);
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep_until(until) => return true,
            changed = reports.changed(), if open => open = changed.is_ok(),
        }
    }
}

/// Whether a failed subscribe means the hub does not serve this data type at all. A refusal
/// (`PermissionDenied`) is not that: OCM's hub grants the lease's rights a moment after it
/// accepts the cluster, so it is tried again with the backoff.
fn not_served(e: &GrpcError) -> bool {
    matches!(e, GrpcError::Subscribe(s) if matches!(
        s.code(),
        tonic::Code::InvalidArgument | tonic::Code::Unimplemented | tonic::Code::NotFound
    ))
}

/// What woke a session.
enum Wake {
    Cluster(Result<crate::object_events::ObjectEvent, GrpcError>),
    Lease(Result<crate::object_events::ObjectEvent, GrpcError>),
    Report,
    /// The pool reporter is gone (or was never started): the membership goes on without it.
    ReportsClosed,
    Probe,
    Renew,
    Relist,
}

/// One connection's state.
struct Session<'a> {
    opts: &'a MembershipOptions,
    /// The ManagedCluster as the hub last sent it.
    cluster: Option<Value>,
    /// The lease as the hub last sent it.
    lease: Option<Value>,
    health: Health,
    /// When the spoke is probed next.
    next_probe: Instant,
    /// When the lease is renewed next (first: as soon as both are known).
    next_lease: Instant,
    /// Anything arrived (resets the reconnect backoff).
    heard: bool,
    /// The pause before asking again while the membership is not settled (see [`RELIST`]),
    /// and when that is.
    relist_after: Duration,
    next_relist: Instant,
    /// The hub has sent back a ManagedCluster with this agent's conditions (`Joined`, and
    /// `Available` where the spoke is probed): what was written reached it.
    confirmed: bool,
    /// A lease renewal was accepted by the hub since the session began.
    renewed: bool,
    /// The pool reporter sent a status (a change, or its heartbeat) not yet written. Only
    /// then is its status written: the hub keeps what it is sent in its own spelling
    /// (quantities, defaults), so comparing with what it sends back would write for ever.
    report_due: bool,
}

impl<'a> Session<'a> {
    fn new(opts: &'a MembershipOptions) -> Self {
        Session {
            opts,
            cluster: None,
            lease: None,
            health: Health::default(),
            next_probe: Instant::now(),
            next_lease: Instant::now(),
            heard: false,
            relist_after: RELIST,
            next_relist: Instant::now() + RELIST,
            confirmed: false,
            renewed: false,
            // A new connection writes the latest status once.
            report_due: true,
        }
    }

    fn cluster_name(&self) -> &str {
        &self.opts.settings.cluster_name
    }

    async fn run(
        &mut self,
        reports: &mut watch::Receiver<Option<(Value, bool)>>,
        stop: &CancellationToken,
    ) -> End {
        let opened = tokio::select! {
            () = stop.cancelled() => return End::Stopped,
            r = self.open() => r,
        };
        let (mut clusters, mut leases) = match opened {
            Ok(feeds) => feeds,
            Err(e) if not_served(&e) => return End::Unmanaged(e),
            Err(e) => return End::Broken(e),
        };
        tracing::info!("following the ManagedCluster and its lease over gRPC");
        // Without a pool reporter (`--pool-report=false`) the sender is gone from the start.
        let mut reports_open = reports.has_changed().is_ok();
        loop {
            let lease_due = self.lease_due();
            let unsettled = !self.settled();
            let wake = tokio::select! {
                () = stop.cancelled() => return End::Stopped,
                ev = clusters.next() => Wake::Cluster(ev),
                ev = leases.next() => Wake::Lease(ev),
                changed = reports.changed(), if reports_open => match changed {
                    Ok(()) => Wake::Report,
                    Err(_) => Wake::ReportsClosed,
                },
                () = tokio::time::sleep_until(self.next_probe) => Wake::Probe,
                () = tokio::time::sleep_until(self.next_lease), if lease_due => Wake::Renew,
                () = tokio::time::sleep_until(self.next_relist), if unsettled => Wake::Relist,
            };
            let step = match wake {
                Wake::Cluster(ev) => ev.map(|ev| self.on_cluster(ev)),
                Wake::Lease(ev) => ev.map(|ev| {
                    if ev.name() == LEASE_NAME {
                        self.lease = (!ev.deleted()).then_some(ev.object);
                    }
                }),
                Wake::Report => {
                    self.report_due = true;
                    Ok(())
                }
                Wake::ReportsClosed => {
                    reports_open = false;
                    Ok(())
                }
                Wake::Probe => {
                    self.probe().await;
                    Ok(())
                }
                Wake::Renew => self.renew_lease(&mut leases).await,
                Wake::Relist => self.relist(&mut clusters, &mut leases).await,
            };
            if let Err(e) = step {
                return End::Broken(e);
            }
            self.heard = true;
            if let Err(e) = self.write_cluster(&mut clusters, reports).await {
                return End::Broken(e);
            }
        }
    }

    /// Dials, subscribes to both types and asks for what the hub has.
    async fn open(&self) -> Result<(ObjectFeed, ObjectFeed), GrpcError> {
        let client = dial_hub(&self.opts.settings).await?;
        let cluster = self.cluster_name();
        let mut clusters = ObjectFeed::open(&client, cluster, MANAGED_CLUSTERS).await?;
        let mut leases = ObjectFeed::open(&client, cluster, LEASES).await?;
        clusters.list().await?;
        leases.list().await?;
        Ok((clusters, leases))
    }

    /// A ManagedCluster event: the hub's version replaces what the agent has.
    fn on_cluster(&mut self, ev: crate::object_events::ObjectEvent) {
        if ev.name() != self.cluster_name() {
            return;
        }
        if ev.deleted() {
            self.cluster = None;
            self.confirmed = false;
            return;
        }
        self.confirmed = self.carries_our_conditions(&ev.object);
        self.cluster = Some(ev.object);
    }

    /// Whether `cluster`, as the hub sent it, has this agent's conditions as it wants them
    /// (after the spoke's first probe, where it is probed).
    fn carries_our_conditions(&self, cluster: &Value) -> bool {
        let probed = self.opts.spoke.is_none() || self.health.condition().is_some();
        let conditions = cluster["status"]["conditions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        probed && merge_conditions(conditions, &self.wanted_conditions(), &now_rfc3339()).is_none()
    }

    /// `Joined`, and `Available` once the spoke has been probed.
    fn wanted_conditions(&self) -> Vec<Value> {
        let joined = condition(JOINED, "True", "ManagedClusterJoined", "Managed cluster joined");
        std::iter::once(joined)
            .chain(self.opts.spoke.as_ref().and_then(|_| self.health.condition()))
            .collect()
    }

    /// Whether the membership is in place as far as the hub has said: both objects known, a
    /// renewal accepted and the conditions sent back. Until then the hub is asked again now and
    /// then: OCM's server registers a subscription only after answering it, so an answer or an
    /// event can be lost in the first moments (see [`RELIST`]).
    fn settled(&self) -> bool {
        self.cluster.is_some() && self.lease.is_some() && self.renewed && self.confirmed
    }

    /// Asks again for what the hub has not confirmed; the next ask comes later each time.
    async fn relist(&mut self, clusters: &mut ObjectFeed, leases: &mut ObjectFeed) -> Result<(), GrpcError> {
        self.relist_after = (self.relist_after * 2).min(RELIST_MAX);
        self.next_relist = Instant::now() + self.relist_after;
        if self.cluster.is_none() || !self.confirmed {
            clusters.list().await?;
        }
        if self.lease.is_none() || !self.renewed {
            leases.list().await?;
        }
        Ok(())
    }

    fn membership(&self) -> Membership {
        let object = self
            .cluster
            .as_ref()
            .and_then(|c| serde_json::from_value::<DynamicObject>(c.clone()).ok());
        match object {
            Some(o) => Membership::of(&o),
            None => Membership::NotAccepted {
                why: "the hub has sent no ManagedCluster".into(),
            },
        }
    }

    fn writable(&self) -> bool {
        self.opts.gate.as_ref().is_none_or(WriteGate::is_open)
    }

    /// Whether a lease renewal can be due: accepted, and the lease known.
    fn lease_due(&self) -> bool {
        self.lease.is_some() && matches!(self.membership(), Membership::Accepted(_))
    }

    async fn probe(&mut self) {
        let period = match &self.opts.spoke {
            Some(spoke) => {
                self.health.record(probe_spoke(spoke).await);
                if self.health.failing_since.is_some() {
                    FAILING_PROBE_PERIOD
                } else {
                    HEALTH_PERIOD
                }
            }
            None => HEALTH_PERIOD,
        };
        self.next_probe = Instant::now() + period;
    }

    /// Renews the lease: the hub's object with `spec.renewTime` now. A conflict (the hub's
    /// newer version not seen yet) asks for the lease again and renews on its arrival.
    async fn renew_lease(&mut self, leases: &mut ObjectFeed) -> Result<(), GrpcError> {
        let Membership::Accepted(accepted) = self.membership() else {
            return Ok(());
        };
        self.next_lease = Instant::now() + jittered(accepted.lease_duration);
        let (Some(mut lease), true) = (self.lease.clone(), self.writable()) else {
            return Ok(());
        };
        lease["spec"]["renewTime"] = micro_time_now().into();
        match leases.write("spec", action::UPDATE, &lease).await? {
            Ok(()) => {
                tracing::debug!("cluster lease renewed");
                self.renewed = true;
            }
            Err(Refusal::Conflict) => {
                self.next_lease = Instant::now();
                leases.list().await?;
            }
            Err(r) => tracing::warn!(refusal = ?r, "the hub refused the lease renewal"),
        }
        Ok(())
    }

    /// The ManagedCluster as the agent wants it: the hub's, with `Joined` and `Available` set
    /// and, when one is due, the pool status merged in; `None` when nothing is to be written.
    fn wanted_cluster(&self, report: Option<&Value>) -> Option<Value> {
        let current = self.cluster.as_ref()?;
        let Membership::Accepted(accepted) = self.membership() else {
            return None;
        };
        if condition_status(&accepted.conditions, CLOCK_SYNCED) == Some("False") {
            // OCM's agent writes no status while the hub says the clocks disagree.
            return None;
        }
        let merged = merge_conditions(&accepted.conditions, &self.wanted_conditions(), &now_rfc3339());
        let report = report.filter(|_| self.report_due);
        if merged.is_none() && report.is_none() {
            return None;
        }
        let mut next = current.clone();
        if let Some(merged) = merged {
            next["status"]["conditions"] = Value::Array(merged);
        }
        if let Some(Value::Object(fields)) = report {
            for (k, v) in fields {
                // The conditions are the membership's; the rest is the pool's.
                if k != "conditions" {
                    next["status"][k] = v.clone();
                }
            }
        }
        Some(next)
    }

    /// Writes the wanted ManagedCluster status, when it differs from the hub's. Its update
    /// event brings the new version; a conflict asks for it.
    async fn write_cluster(
        &mut self,
        clusters: &mut ObjectFeed,
        reports: &watch::Receiver<Option<(Value, bool)>>,
    ) -> Result<(), GrpcError> {
        let report = reports.borrow().as_ref().map(|(status, _)| status.clone());
        let Some(next) = self.wanted_cluster(report.as_ref()) else {
            return Ok(());
        };
        if !self.writable() {
            return Ok(());
        }
        match clusters.write("status", action::UPDATE, &next).await? {
            Ok(()) => {
                tracing::debug!("ManagedCluster status written over gRPC");
                // Until the hub's update event arrives, what was written is what it has.
                self.cluster = Some(next);
                self.report_due = false;
            }
            Err(Refusal::Conflict) => clusters.list().await?,
            Err(r) => tracing::warn!(refusal = ?r, "the hub refused the ManagedCluster status"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> MembershipOptions {
        let settings = crate::config::HubArgs {
            hub_url: Some("https://127.0.0.1:1".into()),
            cluster_name: Some("pool-a".into()),
            ..Default::default()
        }
        .merge(Default::default())
        .unwrap();
        let shared = std::sync::Arc::new(super::super::book::Shared::new(
            "pool-a",
            "pool-a",
            crate::metrics::HubMetrics::default(),
        ));
        MembershipOptions {
            settings,
            spoke: None,
            gate: None,
            fallback: super::super::sinks::GrpcReportSink { shared },
        }
    }

    fn accepted(conditions: Value) -> Value {
        json!({"apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": {"name": "pool-a", "resourceVersion": "9"},
            "spec": {"hubAcceptsClient": true, "leaseDurationSeconds": 5},
            "status": {"conditions": conditions}})
    }

    #[test]
    fn an_accepted_cluster_gets_joined_and_the_pool_status_once() {
        let opts = options();
        let mut session = Session::new(&opts);
        assert!(session.wanted_cluster(None).is_none(), "nothing known yet");
        session.cluster = Some(accepted(json!([
            {"type": "HubAcceptedManagedCluster", "status": "True"}])));
        let report = json!({"clusterClaims": [{"name": "a", "value": "b"}],
            "conditions": [{"type": "Ignored"}]});
        let next = session.wanted_cluster(Some(&report)).unwrap();
        assert_eq!(
            next["metadata"]["resourceVersion"], "9",
            "written on the hub's version"
        );
        assert_eq!(next["status"]["clusterClaims"], report["clusterClaims"]);
        let types: Vec<_> = next["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["HubAcceptedManagedCluster", JOINED]);
        // Once the hub has it, nothing more is written, even where the hub spells the pool
        // status its own way; the reporter's next status (a change or its heartbeat) is.
        let mut as_hub_has_it = next;
        as_hub_has_it["status"]["clusterClaims"] = json!([{"name": "a", "value": "b", "x": 1}]);
        session.cluster = Some(as_hub_has_it);
        session.report_due = false;
        assert!(session.wanted_cluster(Some(&report)).is_none());
        session.report_due = true;
        let again = session.wanted_cluster(Some(&report)).unwrap();
        assert_eq!(again["status"]["clusterClaims"], report["clusterClaims"]);
    }

    #[test]
    fn nothing_is_written_before_acceptance_or_while_clocks_disagree() {
        let opts = options();
        let mut session = Session::new(&opts);
        let mut unaccepted = accepted(json!([]));
        unaccepted["spec"]["hubAcceptsClient"] = json!(false);
        session.cluster = Some(unaccepted);
        assert!(session.wanted_cluster(None).is_none());
        assert!(!session.lease_due());
        session.cluster = Some(accepted(json!([
            {"type": "HubAcceptedManagedCluster", "status": "True"},
            {"type": CLOCK_SYNCED, "status": "False"}])));
        assert!(session.wanted_cluster(None).is_none());
    }

    fn cluster_event(object: Value) -> crate::object_events::ObjectEvent {
        crate::object_events::ObjectEvent {
            subresource: "spec".into(),
            action: "update_request".into(),
            object,
        }
    }

    #[test]
    fn the_membership_settles_once_the_hub_sent_our_conditions_back_and_took_a_renewal() {
        let opts = options();
        let mut session = Session::new(&opts);
        session.on_cluster(cluster_event(accepted(json!([
            {"type": "HubAcceptedManagedCluster", "status": "True"}]))));
        session.lease = Some(json!({"metadata": {"name": LEASE_NAME}}));
        session.renewed = true;
        assert!(!session.settled(), "Joined is not on the hub yet");
        let written = session.wanted_cluster(None).unwrap();
        session.on_cluster(cluster_event(written));
        assert!(session.settled());
        session.renewed = false;
        assert!(!session.settled(), "no renewal taken yet");
        session.renewed = true;
        session.on_cluster(cluster_event(accepted(json!([]))));
        assert!(!session.settled(), "the hub's newer version lost the condition");
    }

    #[tokio::test(start_paused = true)]
    async fn no_pool_reporter_does_not_end_the_wait_on_a_hub_without_managed_clusters() {
        let opts = options();
        let (sender, mut reports) = watch::channel(None);
        drop(sender);
        let stop = CancellationToken::new();
        let started = Instant::now();
        assert!(
            forward_unmanaged(&opts.fallback, &mut reports, &stop).await,
            "tries the hub again"
        );
        assert_eq!(started.elapsed(), UNMANAGED_RETRY);
    }

    #[test]
    fn an_unknown_data_type_means_the_hub_does_not_serve_it_a_refusal_does_not() {
        assert!(not_served(&GrpcError::Subscribe(
            tonic::Status::invalid_argument("data type")
        )));
        assert!(!not_served(&GrpcError::Subscribe(
            tonic::Status::permission_denied("sar")
        )));
        assert!(!not_served(&GrpcError::Subscribe(tonic::Status::unavailable(
            "down"
        ))));
        assert!(!not_served(&GrpcError::StreamEnded));
    }
}
