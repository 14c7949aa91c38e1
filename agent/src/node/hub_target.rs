//! The bare-metal node service's reports: this machine's NodeInventory to the hub over mutual-TLS gRPC, latest wins, delivered after outages.
//!
//! The connection is the engine's gRPC transport with a reports-only subscription (spokelet's
//! node data type: the hub sends heartbeats and no works). A report is queued and returns at
//! once; the transport keeps the newest, sends it while connected and again after a reconnect,
//! so a hub outage delays the report and loses nothing.

use tokio_util::sync::CancellationToken;

use super::{Report, inventory_document};
use crate::admin::RunContext;
use crate::hub::config::{HubConfigError, HubTransport, ResolvedHub};
use crate::hub::{
    GrpcError, GrpcHub, GrpcHubOptions, GrpcReportSink, HubArgs, HubCloser, PoolReportSink, Subscription,
};
use crate::lock::lock;

/// Why the node service could not reach for the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubTargetError {
    /// The hub settings are incomplete or contradictory.
    #[error(transparent)]
    Config(#[from] HubConfigError),
    /// The transport refused its settings (unreadable certificates, plaintext without opt-in).
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// `--hub-transport kube` was asked for.
    #[error("the node service reports to the hub over gRPC only; --hub-transport kube is for `spokelet run`")]
    KubeTransport,
}

/// This machine's reports to the hub.
pub(super) struct HubTarget {
    /// The node's name: the report's `resourceid`.
    node: String,
    /// The transport's latest-wins report queue.
    reports: GrpcReportSink,
}

impl HubTarget {
    /// Validates the settings and starts the connection (which retries until the hub is up).
    /// Returns the target and what stops its transport once the report loop is over (after
    /// flushing the queued report, bounded by the transport's shutdown flush).
    pub(super) fn start(
        args: &HubArgs,
        node: &str,
        ctx: &RunContext,
    ) -> Result<(Self, HubCloser), HubTargetError> {
        if args.hub_transport == Some(HubTransport::Kube) {
            return Err(HubTargetError::KubeTransport);
        }
        let mut args = args.clone();
        args.hub_transport = Some(HubTransport::Grpc);
        // One source per machine, so the hub can tell the node services of a pool apart.
        args.agent_id = Some(format!("spokelet-node-{node}"));
        let Some(ResolvedHub::Grpc(settings)) = args.resolve()? else {
            return Err(HubTargetError::KubeTransport);
        };
        let mut opts = GrpcHubOptions::new(settings);
        opts.subscription = Subscription::NodeReports;
        crate::hub::metrics::register(&opts.metrics, &mut lock(&ctx.registry));
        let stop = CancellationToken::new();
        let GrpcHub {
            mut source,
            reports,
            task,
            ..
        } = GrpcHub::start(opts, stop.clone())?;
        // A reports-only subscription brings no works, only connection events; they are read
        // so the transport never waits on a full channel.
        let drain = tokio::spawn(async move { while source.recv().await.is_some() {} });
        let target = HubTarget {
            node: node.to_string(),
            reports,
        };
        // Its own token, not the shutdown token, so the final report can still be flushed once
        // shutdown is asked for.
        Ok((target, HubCloser::new(stop, vec![task, drain], None)))
    }

    /// Queues the report (the transport delivers the newest).
    pub(super) fn report(&self, report: &Report, observed: &str, heartbeat: bool) {
        let document = inventory_document(&self.node, report, observed);
        self.reports.node_inventory(&self.node, Some(document), heartbeat);
    }
}
