//! The node role's loop: discovery every `--rediscover-interval`, a report written to the
//! cluster (`kube_target`) or sent to the hub (`hub_target`) only when it changed, and the
//! `spokelet_node_*` metrics.

use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

use tokio::time::Instant;

use crate::inventory::DiscoveryArgs;
use spokelet_base::backoff::ExponentialBackoff;
use spokelet_base::duration::parse_duration;
use spokelet_base::lock::lock;
use spokelet_hub::HubArgs;
use spokelet_kube_client::{self as kube_client, ClusterConfigError, HttpVersion, KubeClientError};
use spokelet_runtime::admin::RunContext;

use crate::hub_target;
use crate::kube_target::NodeWriter;
use crate::report::Report;

/// Settings of `spokelet node`.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// What discovery reads.
    #[command(flatten)]
    pub discovery: DiscoveryArgs,

    /// The Node this runs on (in a DaemonSet, the downward API's `spec.nodeName`). With
    /// `--hub-config` it defaults to the machine's hostname.
    #[arg(long, env = "SPOKELET_NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubeconfig (default: KUBECONFIG / ~/.kube/config, then the in-cluster config).
    #[arg(long, env = "SPOKELET_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// How often the hardware is looked at again.
    #[arg(long, env = "SPOKELET_REDISCOVER_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub rediscover_interval: Duration,

    /// How often labels and NodeInventory are re-applied though nothing changed (repairs hand
    /// edits; a no-op apply changes nothing on the server); with `--hub-config`, the heartbeat
    /// report to the hub.
    #[arg(long, env = "SPOKELET_NODE_RESYNC_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// The hub to report to instead of a Kubernetes API server (the bare-metal node service):
    /// `--hub-config FILE` or `--hub-url`, with `--cluster-name`; or
    /// `--bootstrap-hub-config FILE` to join with a bootstrap credential first, as agent
    /// `spokelet-node-<node>` with a certificate of its own (kept in `--hub-credentials-dir`).
    /// gRPC only.
    #[command(flatten)]
    pub hub: HubArgs,
}

impl NodeArgs {
    /// Reports go to the hub, not to a Kubernetes API server.
    pub fn reports_to_hub(&self) -> bool {
        self.hub.hub_config.is_some() || self.hub.hub_url.is_some() || self.hub.bootstrap_hub_config.is_some()
    }
}

/// Why `spokelet node` stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ClusterConfigError),
    #[error(transparent)]
    Client(#[from] KubeClientError),
    #[error("--node-name is empty: set it (SPOKELET_NODE_NAME) to this node's name")]
    NoNodeName,
    #[error(transparent)]
    Hub(#[from] hub_target::HubTargetError),
}

/// `spokelet_node_*` metrics.
#[derive(Debug, Clone, Default)]
struct NodeMetrics {
    /// Discoveries run.
    discoveries: Counter,
    /// Reports written (or, to a hub, queued).
    writes: Counter,
    /// Writes that failed.
    write_failures: Counter,
    /// Unix time of the last successful write.
    last_report: Gauge,
    /// 1 when the node is healthy, 0 when not.
    healthy: Gauge,
    /// Per GPU (`gpu` label: the NVML index).
    gpu_temperature: Family<Vec<(String, String)>, Gauge>,
    /// Per GPU, in watts (fractional: NVML reports milliwatts).
    gpu_power: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
}

impl NodeMetrics {
    fn register(&self, ctx: &RunContext) {
        let mut registry = lock(&ctx.registry);
        let r = registry.sub_registry_with_prefix("node");
        r.register(
            "discoveries",
            "Hardware discoveries run",
            self.discoveries.clone(),
        );
        r.register(
            "writes",
            "Label and NodeInventory writes (on change and on resync)",
            self.writes.clone(),
        );
        r.register(
            "write_failures",
            "Writes that failed (retried with backoff)",
            self.write_failures.clone(),
        );
        r.register(
            "last_report_timestamp_seconds",
            "Unix time of the last successful write",
            self.last_report.clone(),
        );
        r.register(
            "healthy",
            "1 when the node's health verdict is healthy, else 0",
            self.healthy.clone(),
        );
        r.register(
            "gpu_temperature_celsius",
            "GPU temperature at the last discovery",
            self.gpu_temperature.clone(),
        );
        r.register(
            "gpu_power_watts",
            "GPU power draw at the last discovery",
            self.gpu_power.clone(),
        );
    }

    /// Sets the gauges from one discovery.
    fn observe(&self, report: &Report) {
        self.healthy.set(i64::from(report.healthy));
        for (index, temperature, power_mw) in &report.readings.0 {
            let gpu = vec![("gpu".to_string(), index.to_string())];
            if let Some(t) = temperature {
                self.gpu_temperature.get_or_create(&gpu).set(i64::from(*t));
            }
            if let Some(p) = power_mw {
                self.gpu_power.get_or_create(&gpu).set(f64::from(*p) / 1000.0);
            }
        }
    }
}

/// Where one node's reports go.
enum Target {
    /// The cluster's API server: labels and NodeInventory.
    Kube(Box<NodeWriter>),
    /// The hub: the bare-metal node service.
    Hub(hub_target::HubTarget),
}

impl Target {
    /// Writes (or, for the hub, queues) one report. `heartbeat`: it equals the last one.
    async fn write(&self, report: &Report, observed: &str, heartbeat: bool) -> Result<(), kube::Error> {
        match self {
            Target::Kube(w) => w.write(report, observed).await,
            Target::Hub(h) => {
                h.report(report, observed, heartbeat);
                Ok(())
            }
        }
    }
}

/// Runs the node role until `ctx.shutdown`.
pub async fn run(args: NodeArgs, ctx: RunContext) -> Result<(), NodeError> {
    let name = args.node_name.clone().unwrap_or_default();
    if args.reports_to_hub() {
        let name = match name.trim() {
            "" => spokelet_hardware::hostname(&args.discovery.root).unwrap_or_default(),
            n => n.to_string(),
        };
        if name.is_empty() {
            return Err(NodeError::NoNodeName);
        }
        let (hub, closer) = hub_target::HubTarget::start(&args.hub, &name, &ctx).await?;
        tracing::info!(node = %name, interval = ?args.rediscover_interval, "node service starting (reporting to the hub)");
        let result = report_loop(&args, &ctx, Target::Hub(hub)).await;
        closer.close().await;
        return result;
    }
    if name.trim().is_empty() {
        return Err(NodeError::NoNodeName);
    }
    let config = kube_client::cluster_config(args.kubeconfig.as_deref()).await?;
    let client = kube_client::client(config, HttpVersion::Http1)?;
    tracing::info!(node = %name, interval = ?args.rediscover_interval, "node role starting");
    report_loop(
        &args,
        &ctx,
        Target::Kube(Box::new(NodeWriter::new(client, &name))),
    )
    .await
}

/// Discovers every `--rediscover-interval` and writes a report when it changed (or the resync
/// is due), until shutdown.
async fn report_loop(args: &NodeArgs, ctx: &RunContext, target: Target) -> Result<(), NodeError> {
    let metrics = NodeMetrics::default();
    metrics.register(ctx);
    // What was last written, when, and the time it was first seen (the NodeInventory's
    // observedTime, kept across resyncs so a re-apply of an unchanged report changes nothing).
    let mut written: Option<(Report, Instant, String)> = None;
    // Write failures (API server down) back off up to a minute; discovery goes on meanwhile.
    let mut backoff = ExponentialBackoff::new(Duration::from_millis(500), Duration::from_secs(60), 0.2);
    let mut retry_at = Instant::now();
    loop {
        if let Some(report) = Report::discover(&args.discovery).await {
            metrics.discoveries.inc();
            metrics.observe(&report);
            // Unchanged: due only for the resync, and the observed time stays.
            let (due, observed) = match &written {
                Some((last, at, observed)) if *last == report => {
                    (at.elapsed() >= args.resync_interval, Some(observed.clone()))
                }
                _ => (true, None),
            };
            if due && Instant::now() >= retry_at {
                let heartbeat = observed.is_some();
                let observed = observed.unwrap_or_else(spokelet_work_api::conditions::now_rfc3339);
                match target.write(&report, &observed, heartbeat).await {
                    Ok(()) => {
                        metrics.writes.inc();
                        metrics.last_report.set(unix_now());
                        backoff.reset();
                        if written
                            .as_ref()
                            .is_none_or(|(last, _, _)| last.labels != report.labels)
                        {
                            tracing::info!(
                                labels = report.labels.len(),
                                gpus = report.gpu_count,
                                "node labels and inventory written"
                            );
                        }
                        written = Some((report, Instant::now(), observed));
                        ctx.health.set_ready(true);
                    }
                    Err(e) => {
                        metrics.write_failures.inc();
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot write the node's labels or inventory");
                        retry_at = Instant::now() + delay;
                    }
                }
            }
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(args.rediscover_interval) => {}
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
