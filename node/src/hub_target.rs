//! The bare-metal node service's reports: this machine's NodeInventory to the hub over mutual-TLS gRPC, latest wins, delivered after outages.
//!
//! The connection is the engine's gRPC transport with a reports-only subscription (spokelet's
//! node data type: the hub sends heartbeats and no works). A report is queued and returns at
//! once; the transport keeps the newest, sends it while connected and again after a reconnect,
//! so a hub outage delays the report and loses nothing.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::report::{Report, inventory_document};
use spokelet_base::lock::lock;
use spokelet_hub::config::{HubConfigError, HubTransport, ResolvedHub};
use spokelet_hub::{
    GrpcError, GrpcHub, GrpcHubOptions, GrpcReportSink, HubArgs, HubCloser, PoolReportSink, Subscription,
};
use spokelet_runtime::admin::RunContext;

/// Why the node service could not reach for the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubTargetError {
    /// The hub settings are incomplete or contradictory.
    #[error(transparent)]
    Config(#[from] HubConfigError),
    /// The transport refused its settings (unreadable certificates, plaintext without opt-in).
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// Joining the hub with the bootstrap credential failed.
    #[error("joining the hub: {0}")]
    Join(#[from] spokelet_hub::registration::JoinError),
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
    /// Validates the settings, joins the hub first when given a bootstrap config (waiting for
    /// approval and acceptance), and starts the connection (which retries until the hub is
    /// up). Returns the target and what stops its transport once the report loop is over
    /// (after flushing the queued report, bounded by the transport's shutdown flush).
    pub(super) async fn start(
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
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut rejected = None;
        let settings = match args.resolve()? {
            Some(ResolvedHub::Grpc(settings)) => settings,
            Some(ResolvedHub::GrpcJoin { bootstrap, join }) => {
                let (settings, renewing, refused) = join_as_node(&args, *bootstrap, join, &stop).await?;
                tasks.push(renewing);
                rejected = Some(refused);
                settings
            }
            _ => return Err(HubTargetError::KubeTransport),
        };
        let mut opts = GrpcHubOptions::new(settings);
        opts.rejected = rejected;
        opts.subscription = Subscription::NodeReports;
        spokelet_hub::metrics::register(&opts.metrics, &mut lock(&ctx.registry));
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
        tasks.extend([task, drain]);
        Ok((target, HubCloser::new(stop, tasks)))
    }

    /// Queues the report (the transport delivers the newest).
    pub(super) fn report(&self, report: &Report, observed: &str, heartbeat: bool) {
        let document = inventory_document(&self.node, report, observed);
        self.reports.node_inventory(&self.node, Some(document), heartbeat);
    }
}

/// Joins as this machine's agent (`spokelet-node-<node>`, a certificate naming its node) with
/// the bootstrap config, keeping the credentials in the files alone (no Secret: there is no
/// Kubernetes API here), and starts their renewal. Returns the settings to run from, the
/// renewal and what tells it of a refused certificate.
async fn join_as_node(
    args: &HubArgs,
    bootstrap: spokelet_hub::HubSettings,
    join: spokelet_hub::config::BootstrapSettings,
    stop: &CancellationToken,
) -> Result<
    (
        spokelet_hub::HubSettings,
        tokio::task::JoinHandle<()>,
        Arc<Notify>,
    ),
    HubTargetError,
> {
    use spokelet_hub::registration::{self, Bootstrap, JoinSettings, Keeping};
    let joining = JoinSettings {
        cluster: bootstrap.cluster_name.clone(),
        agent: bootstrap.agent_id.clone(),
        bootstrap: Bootstrap::Grpc(Box::new(bootstrap)),
        dir: join.dir.clone(),
        keeping: Keeping::Files,
        // A ManagedCluster this makes (the pool's engine or an admin usually has) names no
        // API server: a bare-metal pool may have none.
        spoke_url: join.spoke_url.clone(),
        spoke_ca: None,
    };
    registration::ensure_joined(&joining).await?;
    // Told by the transport when the hub refuses the certificate.
    let rejected = Arc::new(Notify::new());
    let renewing = tokio::spawn(registration::keep_renewed(
        joining,
        rejected.clone(),
        stop.clone(),
    ));
    let Some(ResolvedHub::Grpc(settings)) = join.joined_args(args).resolve()? else {
        return Err(HubTargetError::KubeTransport);
    };
    Ok((settings, renewing, rejected))
}
