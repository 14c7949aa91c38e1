//! `spokelet run`: the work engine fed from a hub transport or, without one, a works directory
//! (the file source, reporting status next to each work file and in the log).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Config;

use crate::admin::RunContext;
use crate::artifact::ArtifactLimitArgs;
use crate::connect::{ConnectError, HubConnection};
use crate::hub::HubArgs;
use crate::hub::file_source::{FileSource, FileSourceError, FileStatusSink};
use crate::kube_client::{self, ClusterConfigError, HttpVersion, KubeClientError};
use crate::leader::{
    Elector, GatedSink, LeaderArgs, LeaderError, LeaderMetrics, LeaseSettings, Role, WriteGate,
};
use crate::lock::lock;
use crate::pool::{PoolMetrics, PoolReportArgs, PoolReporter, RunningReporter};
use crate::work::applied_work::{hub_hash, hub_hash_of_address, legacy_hub_hash};
use crate::work::engine::{EngineConfig, EngineError, WorkEngine};
use crate::work::executor::ClientFactory;
use crate::work::metrics::WorkMetrics;
use crate::work::policy::{AgentIdentity, Policy, PolicyError};
use crate::work::schedule::FlapGuard;
use crate::work::validate::WorkLimits;
use spokelet_base::duration::parse_duration;
use spokelet_work_api::manifestwork::DEFAULT_FIELD_MANAGER;
use spokelet_work_api::source::{StatusSink, WorkSource};
use tokio_util::sync::CancellationToken;

/// Settings of the work engine.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory of ManifestWork YAML files to apply; status is written next to each as NAME.status.yaml.
    #[arg(long, env = "SPOKELET_WORKS_DIR", value_name = "DIR")]
    pub works_dir: Option<PathBuf>,

    /// Kubeconfig of the spoke cluster (default: KUBECONFIG / ~/.kube/config, then the in-cluster config).
    #[arg(long, env = "SPOKELET_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Speak HTTP/2 to the spoke API server (one connection for every request and watch) instead
    /// of HTTP/1.1 with pooled connections, which costs the API server less CPU per request.
    #[arg(long, env = "SPOKELET_KUBE_HTTP2")]
    pub kube_http2: bool,

    /// Hub address or name; its SHA-256 names this agent's AppliedManifestWorks.
    #[arg(long, env = "SPOKELET_HUB_NAME", default_value = "local")]
    pub hub_name: String,

    /// This agent's id, recorded on every AppliedManifestWork.
    #[arg(long, env = "SPOKELET_AGENT_ID", default_value = "spokelet")]
    pub agent_id: String,

    /// Full re-apply period; only a backstop, since applied objects are watched (e.g. 30s, 5m).
    #[arg(long, env = "SPOKELET_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Works reconciled at once.
    #[arg(long, env = "SPOKELET_MAX_CONCURRENT_WORKS", default_value_t = 48)]
    pub max_concurrent_works: usize,

    /// Manifests applied at once, across all works.
    #[arg(long, env = "SPOKELET_MAX_CONCURRENT_MANIFESTS", default_value_t = 96)]
    pub max_concurrent_manifests: usize,

    /// Default server-side-apply field manager.
    #[arg(long, env = "SPOKELET_FIELD_MANAGER", default_value = DEFAULT_FIELD_MANAGER)]
    pub field_manager: String,

    /// How often the works directory is re-read.
    #[arg(long, env = "SPOKELET_WORKS_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub works_poll_interval: Duration,

    /// Largest accepted work, in bytes of manifest JSON.
    #[arg(long, env = "SPOKELET_MAX_WORK_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_work_bytes: usize,

    /// Most manifests per work (the work's record must fit in one API object).
    #[arg(long, env = "SPOKELET_MAX_MANIFESTS", default_value_t = 5_000)]
    pub max_manifests: usize,

    /// Most JSONPaths per work, feedback rules and ignored fields together.
    #[arg(long, env = "SPOKELET_MAX_JSON_PATHS", default_value_t = 512)]
    pub max_json_paths: usize,

    /// Deepest nesting (objects and arrays) of a manifest.
    #[arg(long, env = "SPOKELET_MAX_JSON_DEPTH", default_value_t = 100)]
    pub max_json_depth: usize,

    /// Debounce quiet period for drift corrections.
    #[arg(long, env = "SPOKELET_DRIFT_DEBOUNCE", default_value = "20ms", value_parser = parse_duration)]
    pub drift_debounce: Duration,

    /// How long a recorded work the hub has not re-sent keeps running before its objects are
    /// cleaned up, counted from when a connected, synced hub first lacked it (OCM's default).
    #[arg(long, env = "SPOKELET_EVICTION_GRACE_PERIOD", default_value = "60m", value_parser = parse_duration)]
    pub eviction_grace_period: Duration,

    /// Spoke-side write policy (YAML): which kinds and namespaces hub works may write. Without
    /// it the built-in policy refuses kube-system, kube-public, kube-node-lease, the agent's
    /// namespace and its own RBAC (see docs/POLICY.md).
    #[arg(long, env = "SPOKELET_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Largest status sent to the hub, in bytes of JSON; a larger one is summarised (long texts
    /// cut, then only the manifests not applied listed), never dropped.
    #[arg(long, env = "SPOKELET_MAX_STATUS_BYTES", default_value_t = 1024 * 1024)]
    pub max_status_bytes: usize,

    /// What happens to an object that existed before the work that adopted it, when the work
    /// lets go of it: `release` (default: our ownerReference and label removed, the object
    /// stays) or `delete` (OCM's reference behaviour).
    #[arg(long, env = "SPOKELET_ADOPTED_OBJECTS", value_enum, default_value_t = AdoptedObjects::Release)]
    pub adopted_objects: AdoptedObjects,

    /// The namespace the agent runs in, protected by the built-in policy.
    #[arg(long, env = "SPOKELET_AGENT_NAMESPACE", default_value = "spokelet-system")]
    pub agent_namespace: String,

    /// Flux `OCIRepository` and `Kustomization` objects in works: `native` (the agent pulls,
    /// builds and applies them itself, no Flux needed) or `passthrough` (sent to the API server,
    /// for spokes that run Flux's controllers).
    #[arg(long, env = "SPOKELET_FLUX_OBJECTS", value_enum, default_value_t = FluxMode::Native)]
    pub flux_objects: FluxMode,

    /// Directory of the content-addressed artifact cache; it survives restarts, so an unchanged
    /// artifact is never downloaded again.
    #[arg(
        long,
        env = "SPOKELET_ARTIFACT_CACHE",
        value_name = "DIR",
        default_value = "/var/cache/spokelet/artifacts"
    )]
    pub artifact_cache: PathBuf,

    /// Bounds on every artifact unpacked.
    #[command(flatten)]
    pub artifact_limits: ArtifactLimitArgs,

    /// Allow `OCIRepository` sources on plain HTTP (`insecure: true`) or at loopback and
    /// link-local addresses (this node's own services, the cloud metadata endpoint); refused by
    /// default, since the hub picks the URL and the agent sends the source's credentials there.
    #[arg(long, env = "SPOKELET_ARTIFACT_ALLOW_INSECURE")]
    pub artifact_allow_insecure: bool,

    /// With `--artifact-allow-insecure`, only these registry hosts (`host` or `host:port`,
    /// comma-separated); all when empty.
    #[arg(
        long,
        env = "SPOKELET_ARTIFACT_INSECURE_HOSTS",
        value_delimiter = ',',
        value_name = "HOSTS"
    )]
    pub artifact_insecure_hosts: Vec<String>,

    /// One active engine among several replicas (`--leader-elect`).
    #[command(flatten)]
    pub leader: LeaderArgs,

    /// The pool's inventory to the spoke's ClusterClaims and the hub (`--pool-report`).
    #[command(flatten)]
    pub pool: PoolReportArgs,
}

/// See [`RunArgs::flux_objects`].
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxMode {
    Native,
    Passthrough,
}

/// See [`RunArgs::adopted_objects`].
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptedObjects {
    Release,
    Delete,
}

/// Why `spokelet run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Both a hub transport and `--works-dir` were given.
    #[error("both --hub-transport and --works-dir {0} are set: choose one source of works")]
    TwoSources(PathBuf),
    /// The hub transport could not be set up.
    #[error(transparent)]
    Hub(#[from] ConnectError),
    /// No work source configured.
    #[error(
        "no work source: pass --hub-transport grpc|kube (with its --hub-* settings) or --works-dir (or their SPOKELET_* variables)"
    )]
    NoSource,
    /// The cluster configuration could not be loaded.
    #[error(transparent)]
    ClusterConfig(#[from] ClusterConfigError),
    #[error(transparent)]
    Client(#[from] KubeClientError),
    /// The works directory is unusable.
    #[error(transparent)]
    Source(#[from] FileSourceError),
    /// The engine failed to start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Leader election is misconfigured, or leadership was lost.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// The policy file cannot be used; the agent does not start with a policy other than the one written.
    #[error("--policy {path}: {source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
}

/// The write policy `--policy` names, else the built-in one, for the agent's identity.
pub fn load_policy(args: &RunArgs) -> Result<Policy, RunError> {
    let agent = AgentIdentity {
        namespace: args.agent_namespace.clone(),
        ..AgentIdentity::default()
    };
    let policy = match &args.policy {
        None => Policy::builtin(&agent),
        Some(path) => Policy::load(path, &agent).map_err(|source| RunError::Policy {
            path: path.clone(),
            source,
        })?,
    };
    tracing::info!(policy = %policy.summary(), file = ?args.policy, "write policy");
    Ok(policy)
}

/// The engine settings the flags select. A resync interval under 1 s is raised to 1 s and a
/// concurrency limit of 0 to 1; settings without a flag keep [`EngineConfig::new`]'s defaults.
pub fn engine_config(args: &RunArgs) -> EngineConfig {
    let mut cfg = EngineConfig::new(hub_hash(&args.hub_name), args.agent_id.clone());
    cfg.field_manager = args.field_manager.clone();
    cfg.resync_interval = args.resync_interval.max(Duration::from_secs(1));
    cfg.max_concurrent_works = args.max_concurrent_works.max(1);
    cfg.max_concurrent_manifests = args.max_concurrent_manifests.max(1);
    cfg.limits = WorkLimits {
        max_work_bytes: args.max_work_bytes,
        max_manifests: args.max_manifests.max(1),
        max_json_paths: args.max_json_paths,
        max_json_depth: args.max_json_depth.max(1),
    };
    cfg.debounce_quiet = args.drift_debounce;
    cfg.flap = FlapGuard::default();
    cfg.eviction_grace = args.eviction_grace_period;
    cfg.max_status_bytes = args.max_status_bytes;
    cfg.release_adopted = args.adopted_objects == AdoptedObjects::Release;
    cfg.expander = flux_expander(args);
    cfg
}

/// Flux's expander, unless Flux objects pass through to the API server.
#[cfg(feature = "flux")]
fn flux_expander(args: &RunArgs) -> Option<Arc<dyn crate::work::expand::Expander>> {
    use crate::work::flux::{FluxExpander, FluxObjects, InsecureRegistries};
    FluxExpander::for_setting(&match args.flux_objects {
        FluxMode::Passthrough => FluxObjects::Passthrough,
        FluxMode::Native => FluxObjects::Native {
            cache: args.artifact_cache.clone(),
            unpack: args.artifact_limits.limits(),
            insecure: InsecureRegistries {
                allow: args.artifact_allow_insecure,
                hosts: args.artifact_insecure_hosts.clone(),
            },
        },
    })
}

/// Built without Flux: Flux objects can only pass through, and asking for more is said loudly.
#[cfg(not(feature = "flux"))]
fn flux_expander(args: &RunArgs) -> Option<Arc<dyn crate::work::expand::Expander>> {
    if args.flux_objects == FluxMode::Native {
        tracing::warn!(
            "this build has no Flux support: Flux objects in works are sent to the API server as they are"
        );
    }
    None
}

/// Runs the engine on the hub's works when a hub transport is set, else on `--works-dir`, until
/// `ctx.shutdown` is cancelled. Setting both is an error ([`RunError::TwoSources`]).
/// The spoke client the engine writes with, and how it makes clients for works' executors.
#[allow(missing_debug_implementations)] // kube's Client has no Debug.
pub struct EngineClient {
    pub client: kube::Client,
    pub executors: ClientFactory,
}

/// Clients that impersonate a work's executor: the agent's own configuration plus the
/// `Impersonate-User` / `Impersonate-Group` headers, on a connection of their own, behind the
/// same write gate as the engine's own client.
pub fn executor_factory(config: &Config, version: HttpVersion, gate: Option<WriteGate>) -> ClientFactory {
    let base = config.clone();
    ClientFactory(Arc::new(move |user: &str, groups: &[String]| {
        let mut c = base.clone();
        c.auth_info.impersonate = Some(user.to_string());
        c.auth_info.impersonate_groups = Some(groups.to_vec());
        kube_client::gated_client(c, version, gate.clone()).map_err(Into::into)
    }))
}

/// Runs the engine until `ctx.shutdown`: at once, or with `--leader-elect` only once this
/// replica holds the Lease (see [`run_as_candidate`]).
pub async fn run(args: RunArgs, hub: HubArgs, ctx: RunContext) -> Result<(), RunError> {
    let config = kube_client::cluster_config(args.kubeconfig.as_deref()).await?;
    let version = if args.kube_http2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    if args.leader.leader_elect {
        run_as_candidate(&args, &hub, &ctx, &config, version).await
    } else {
        run_active(&args, &hub, &ctx, &config, version, None).await
    }
}

/// How long a replica that lost the lease lets its engine drain before it exits anyway.
const LOST_DRAIN: Duration = Duration::from_secs(1);

/// Waits as a standby (ready, writing nothing) until the Lease is ours, then runs the engine
/// with every spoke write behind the election's gate. Leadership lost: the gate shuts, the
/// engine stops and this returns [`LeaderError::Lost`], so the process exits and comes back
/// as a standby. Shutdown: the engine drains, then the Lease is released for the standby.
async fn run_as_candidate(
    args: &RunArgs,
    hub: &HubArgs,
    ctx: &RunContext,
    config: &Config,
    version: HttpVersion,
) -> Result<(), RunError> {
    let settings = LeaseSettings::from_args(&args.leader, &args.agent_namespace)?;
    let metrics = LeaderMetrics::default();
    metrics.register(lock(&ctx.registry).sub_registry_with_prefix("leader"));
    let gate = WriteGate::shut();
    // The Lease is the one write a standby makes: its client has no gate.
    let lease_client = kube_client::client(config.clone(), version)?;
    let mut elector = Elector::new(lease_client, settings.clone(), gate.clone(), metrics);
    let mut role = elector.role();
    let stop_electing = CancellationToken::new();
    let electing = {
        let stop = stop_electing.clone();
        tokio::spawn(async move {
            elector.run(stop).await;
            elector
        })
    };
    // A standby is doing its job: waiting. Its /readyz says so.
    ctx.health.set_ready(true);
    tracing::info!(lease = %settings.lease(), identity = %settings.identity, "standby: waiting for the work-engine lease");
    let leading = tokio::select! {
        r = role.wait_for(|r| *r != Role::Standby) => r.is_ok_and(|r| *r == Role::Leader),
        () = ctx.shutdown.cancelled() => false,
    };
    if !leading {
        stop_electing.cancel();
        let _ = electing.await;
        return Ok(());
    }
    ctx.health.set_ready(false);
    // The engine stops on shutdown, or at once when leadership is lost.
    let engine_stop = ctx.shutdown.child_token();
    let lost = {
        let (stop, mut role) = (engine_stop.clone(), role.clone());
        async move {
            if role.wait_for(|r| *r == Role::Lost).await.is_err() {
                return std::future::pending().await;
            }
            stop.cancel();
            // With the gate shut nothing in flight can write any more: the drain gets a
            // moment for its logs, and whatever is still waiting (a read on a stalled
            // connection) is abandoned rather than keep a deposed leader alive.
            tokio::time::sleep(LOST_DRAIN).await;
        }
    };
    let engine_ctx = RunContext {
        shutdown: engine_stop,
        ..ctx.clone()
    };
    let result = tokio::select! {
        r = run_active(args, hub, &engine_ctx, config, version, Some(gate.clone())) => r,
        () = lost => {
            tracing::error!(lease = %settings.lease(), "leadership lost; in-flight work abandoned");
            Err(LeaderError::Lost(settings.lease()).into())
        }
    };
    if *role.borrow() == Role::Lost {
        return Err(LeaderError::Lost(settings.lease()).into());
    }
    stop_electing.cancel();
    if let Ok(elector) = electing.await {
        elector.release().await;
    }
    result
}

/// The engine on the hub's works, or on `--works-dir`; with `gate`, every spoke write and
/// every status report passes only while it is open.
async fn run_active(
    args: &RunArgs,
    hub: &HubArgs,
    ctx: &RunContext,
    config: &Config,
    version: HttpVersion,
    gate: Option<WriteGate>,
) -> Result<(), RunError> {
    let executors = executor_factory(config, version, gate.clone());
    // One client (one connection pool) for every request and watch of the engine.
    let client = kube_client::gated_client(config.clone(), version, gate.clone())?;
    let client = EngineClient { client, executors };
    let hub = HubArgs {
        agent_namespace: Some(args.agent_namespace.clone()),
        ..hub.clone()
    };
    // Opening may wait long (a join waits for the hub's approval): a shutdown ends the wait.
    let opening = HubConnection::open(
        &hub,
        &args.agent_id,
        &ctx.registry,
        &client.client,
        config,
        gate.clone(),
    );
    let opened = tokio::select! {
        opened = opening => opened?,
        () = ctx.shutdown.cancelled() => return Ok(()),
    };
    if let Some(conn) = opened {
        if let Some(dir) = &args.works_dir {
            // Two sources would fight over the same AppliedManifestWorks; refuse rather than guess.
            conn.closer.close().await;
            return Err(RunError::TwoSources(dir.clone()));
        }
        let HubConnection {
            source,
            sink,
            reports,
            address,
            closer,
        } = conn;
        tracing::info!(hub = %address, "work engine starting (hub source)");
        let pool = start_pool_reporter(args, ctx, &client.client, Some(reports));
        let sink = GatedSink::wrap(sink, gate);
        let result = run_engine(args, ctx, client, source, sink, &address).await;
        if let Some(pool) = pool {
            pool.stop().await;
        }
        // After the engine: its last statuses (final `Deleted`s included) still reach the hub.
        closer.close().await;
        return result;
    }
    let dir = args.works_dir.clone().ok_or(RunError::NoSource)?;
    let source = FileSource::new(&dir, args.works_poll_interval)?;
    let sink = GatedSink::wrap(Arc::new(FileStatusSink::new(&dir)), gate);
    tracing::info!(dir = %dir.display(), hub = %args.hub_name, "work engine starting (file source)");
    let hub = args.hub_name.clone();
    let pool = start_pool_reporter(args, ctx, &client.client, None);
    let result = run_engine(args, ctx, client, source, sink, &hub).await;
    if let Some(pool) = pool {
        pool.stop().await;
    }
    result
}

/// Starts the pool reporter next to the engine (`--pool-report`), on the engine's gated client:
/// a replica that lost the Lease writes no claims either.
fn start_pool_reporter(
    args: &RunArgs,
    ctx: &RunContext,
    client: &kube::Client,
    hub: Option<Arc<dyn crate::hub::PoolReportSink>>,
) -> Option<RunningReporter> {
    if !args.pool.pool_report {
        return None;
    }
    let metrics = PoolMetrics::default();
    metrics.register(&ctx.registry);
    Some(PoolReporter::new(client.clone(), hub, args.pool.clone(), metrics).spawn(&ctx.shutdown))
}

/// Runs the engine on any source and sink (a hub transport, say) until `ctx.shutdown` is
/// cancelled. `hub_address` names the hub: its SHA-256 is the hubHash of the AppliedManifestWorks.
pub async fn run_engine(
    args: &RunArgs,
    ctx: &RunContext,
    client: EngineClient,
    source: impl WorkSource,
    sink: Arc<dyn StatusSink>,
    hub_address: &str,
) -> Result<(), RunError> {
    let metrics = WorkMetrics::default();
    metrics.register(lock(&ctx.registry).sub_registry_with_prefix("work"));
    let mut cfg = engine_config(args);
    cfg.hub_hash = hub_hash_of_address(hub_address);
    cfg.legacy_hub_hashes = legacy_hub_hash(hub_address).into_iter().collect();
    cfg.policy = Arc::new(load_policy(args)?);
    cfg.executor_clients = Some(client.executors);
    let engine = WorkEngine::new(client.client, cfg, metrics);
    let mut ready = engine.ready();
    let health = ctx.health.clone();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            tracing::info!("initial works applied; ready");
            health.set_ready(true);
        }
    });
    engine.run(source, sink, ctx.shutdown.clone()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_do_not_clash_with_the_engine_flags() {
        use clap::CommandFactory;
        #[derive(Parser, Debug)]
        struct Run {
            #[command(flatten)]
            run: RunArgs,
            #[command(flatten)]
            hub: HubArgs,
        }
        Run::command().debug_assert();
    }
}
