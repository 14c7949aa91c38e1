//! Opens the hub transport chosen by `--hub-transport` and hands the engine one source and one sink.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::SharedRegistry;
use crate::hub::config::{BootstrapSettings, HubArgs, HubConfigError, KubeHubSettings, ResolvedHub};
use crate::hub::grpc::{GrpcError, GrpcHub, GrpcHubOptions, RecordedWork};
use crate::hub::kube_hub::{KubeHub, KubeHubError, KubeHubOptions};
use crate::hub::metrics;
use crate::hub::registration::{self, Bootstrap, JoinSettings, Keeping};
use crate::hub::work_events::HubEvents;
use crate::hub::{HubCloser, PoolReportSink};
use crate::leader::WriteGate;
use crate::lock::lock;
use crate::work::applied_work;
use spokelet_work_api::source::StatusSink;

/// Why the hub connection could not be set up (a hub that is down is not an error:
/// the transports retry with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The `--hub-*` flags or the hub config file are incomplete or contradictory.
    #[error(transparent)]
    Config(#[from] HubConfigError),
    /// The gRPC transport refused its settings (plaintext without opt-in, unreadable certificates).
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// The hub kubeconfig cannot be read or used.
    #[error(transparent)]
    Kube(#[from] KubeHubError),
    /// Joining the hub with the bootstrap credential failed.
    #[error("joining the hub: {0}")]
    Join(#[from] registration::JoinError),
}

/// An open hub connection, split into what the engine consumes and what stops the transport.
pub struct HubConnection {
    /// Works from the hub, whichever transport brings them.
    pub source: HubEvents,
    /// Takes the engine's statuses and returns at once; the transport delivers them.
    pub sink: Arc<dyn StatusSink>,
    /// Takes the pool reporter's ManagedCluster status (and node inventories, where the
    /// transport carries them) the same way.
    pub reports: Arc<dyn PoolReportSink>,
    /// The hub's address; its SHA-256 is the `hubHash` in AppliedManifestWork names, so works
    /// from two hubs never collide on one spoke.
    pub address: String,
    /// Stops the transport after the engine is done.
    pub closer: HubCloser,
}

impl std::fmt::Debug for HubConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConnection")
            .field("source", &self.source)
            .field("address", &self.address)
            .field("closer", &self.closer)
            .finish_non_exhaustive()
    }
}

impl HubConnection {
    /// Open the configured transport; `Ok(None)` when no `--hub-transport` is set. With
    /// `gate`, nothing is sent to the hub while it is shut (statuses already queued included).
    pub async fn open(
        args: &HubArgs,
        agent_id: &str,
        registry: &SharedRegistry,
        spoke: &kube::Client,
        spoke_config: &kube::Config,
        gate: Option<WriteGate>,
    ) -> Result<Option<HubConnection>, ConnectError> {
        // `--agent-id` belongs to the engine's flags; the hub settings need it too.
        let mut args = args.clone();
        args.agent_id = Some(agent_id.to_string());
        let stop = CancellationToken::new();
        let conn = match args.resolve()? {
            None => return Ok(None),
            Some(ResolvedHub::Grpc(settings)) => {
                open_grpc(
                    GrpcOpening {
                        settings,
                        rejected: None,
                        tasks: Vec::new(),
                    },
                    spoke,
                    registry,
                    gate,
                    stop,
                )
                .await?
            }
            Some(ResolvedHub::GrpcJoin { bootstrap, join }) => {
                let joined = Spoke {
                    client: spoke,
                    config: spoke_config,
                };
                open_grpc_joined(&args, *bootstrap, &join, joined, registry, gate, stop).await?
            }
            Some(ResolvedHub::Kube(settings)) => {
                let joined = Spoke {
                    client: spoke,
                    config: spoke_config,
                };
                open_kube(&settings, joined, gate, stop).await?
            }
        };
        Ok(Some(conn))
    }
}

/// The spoke the agent runs on: its client (where the credential Secret is kept) and its
/// config (the API server a ManagedCluster the agent creates names).
#[derive(Clone, Copy)]
struct Spoke<'a> {
    client: &'a kube::Client,
    config: &'a kube::Config,
}

impl Spoke<'_> {
    /// How to join with `bootstrap` as `agent` of `cluster`, keeping what it earns as
    /// `settings` say.
    fn join_settings(
        self,
        bootstrap: Bootstrap,
        (cluster, agent): (&str, &str),
        settings: &BootstrapSettings,
    ) -> JoinSettings {
        let (url, ca) = registration::spoke_endpoint(self.config);
        JoinSettings {
            bootstrap,
            cluster: cluster.to_string(),
            agent: agent.to_string(),
            dir: settings.dir.clone(),
            keeping: Keeping::Secret {
                spoke: self.client.clone(),
                namespace: settings.agent_namespace.clone(),
                name: settings.secret.clone(),
            },
            spoke_url: Some(settings.spoke_url.clone().unwrap_or(url)),
            spoke_ca: ca,
        }
    }
}

/// Joins over gRPC with `bootstrap` (or runs from what an earlier join kept), starts the
/// renewal, and opens the gRPC transport from the joined config.
async fn open_grpc_joined(
    args: &HubArgs,
    bootstrap: crate::hub::HubSettings,
    join: &BootstrapSettings,
    spoke: Spoke<'_>,
    registry: &SharedRegistry,
    gate: Option<WriteGate>,
    stop: CancellationToken,
) -> Result<HubConnection, ConnectError> {
    let who = (bootstrap.cluster_name.clone(), bootstrap.agent_id.clone());
    let joining = spoke.join_settings(Bootstrap::Grpc(Box::new(bootstrap)), (&who.0, &who.1), join);
    registration::ensure_joined(&joining).await?;
    // The transport tells of a refused certificate (a TLS alert, `Unauthenticated`).
    let rejected = Arc::new(tokio::sync::Notify::new());
    let renewing = tokio::spawn(registration::keep_renewed(
        joining,
        rejected.clone(),
        stop.clone(),
    ));
    let Some(ResolvedHub::Grpc(settings)) = join.joined_args(args).resolve()? else {
        unreachable!("the joined flags select the gRPC transport");
    };
    let grpc = GrpcOpening {
        settings,
        rejected: Some(rejected),
        tasks: vec![renewing],
    };
    open_grpc(grpc, spoke.client, registry, gate, stop).await
}

/// Opens the Kubernetes-hub transport, joining first when it has a bootstrap credential.
async fn open_kube(
    settings: &KubeHubSettings,
    spoke: Spoke<'_>,
    gate: Option<WriteGate>,
    stop: CancellationToken,
) -> Result<HubConnection, ConnectError> {
    let mut renewing = None;
    // A 401 from the hub tells a joined agent its certificate is no longer taken.
    let rejected = Arc::new(tokio::sync::Notify::new());
    if let Some(bootstrap) = &settings.bootstrap {
        let join = spoke.join_settings(
            Bootstrap::Kube {
                kubeconfig: bootstrap.credential.clone(),
                security: settings.security,
            },
            (&settings.cluster_name, &settings.agent_id),
            bootstrap,
        );
        registration::ensure_joined(&join).await?;
        renewing = Some(tokio::spawn(registration::keep_renewed(
            join,
            rejected.clone(),
            stop.clone(),
        )));
    }
    let config = crate::hub::kube_hub::config_from_kubeconfig(&settings.kubeconfig).await?;
    let address = config.cluster_url.to_string();
    let guards = crate::kube_client::Guards {
        gate,
        unauthorized: settings.bootstrap.as_ref().map(|_| rejected),
    };
    let client =
        crate::hub::kube_hub::gated_hub_client(config, &settings.kubeconfig, settings.security, guards)?;
    let mut opts = KubeHubOptions::new(client, &settings.cluster_name, &settings.agent_id);
    opts.lease_duration = settings.lease_duration;
    opts.spoke = Some(spoke.client.clone());
    let hub = KubeHub::start(opts, stop.clone());
    tracing::info!(hub = %address, transport = "kube", cluster = %settings.cluster_name, "hub transport started");
    let mut tasks = hub.tasks;
    tasks.extend(renewing);
    Ok(HubConnection {
        source: hub.source,
        sink: Arc::new(hub.sink),
        reports: Arc::new(hub.reports),
        address,
        closer: HubCloser::new(stop, tasks),
    })
}

/// What the gRPC transport is opened with besides the spoke.
struct GrpcOpening {
    settings: crate::hub::HubSettings,
    /// Told of refused credentials (a joined agent's; None without a bootstrap).
    rejected: Option<Arc<tokio::sync::Notify>>,
    /// Tasks that end with the connection (the renewal).
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the gRPC transport with `settings`, and beside it the cluster's membership (lease,
/// conditions, pool status; see [`crate::hub::grpc::membership`]); `tasks` end with it.
async fn open_grpc(
    grpc: GrpcOpening,
    spoke: &kube::Client,
    registry: &SharedRegistry,
    gate: Option<WriteGate>,
    stop: CancellationToken,
) -> Result<HubConnection, ConnectError> {
    use crate::hub::grpc::membership::{MembershipOptions, MembershipReports, keep_membership};
    let GrpcOpening {
        settings,
        rejected,
        mut tasks,
    } = grpc;
    let address = settings.url.uri();
    let mut opts = GrpcHubOptions::new(settings.clone());
    opts.recorded = recorded_works(spoke, &address).await;
    opts.gate = gate.clone();
    opts.rejected = rejected;
    metrics::register(&opts.metrics, &mut lock(registry));
    let hub = GrpcHub::start(opts, stop.clone())?;
    tracing::info!(hub = %address, transport = "grpc", "hub transport started");
    let (reports, status) = MembershipReports::new(hub.reports.clone());
    let membership = MembershipOptions {
        settings,
        spoke: Some(spoke.clone()),
        gate,
        fallback: hub.reports,
    };
    tasks.push(tokio::spawn(keep_membership(membership, status, stop.clone())));
    tasks.push(hub.task);
    Ok(HubConnection {
        source: hub.source,
        sink: Arc::new(hub.sink),
        reports: Arc::new(reports),
        address,
        closer: HubCloser::new(stop, tasks),
    })
}

/// The works this hub's records on the spoke belong to, so the first resync asks the hub about
/// each. Unreadable records only cost that: those works are then missing, not deleted.
async fn recorded_works(spoke: &kube::Client, address: &str) -> Vec<RecordedWork> {
    let api = kube::Api::all(spoke.clone());
    let mut hashes = vec![applied_work::hub_hash_of_address(address)];
    hashes.extend(applied_work::legacy_hub_hash(address));
    match applied_work::list_for_hub(&api, &hashes).await {
        Ok(records) => records
            .iter()
            .filter_map(|amw| {
                let uid = applied_work::recorded_hub_uid(amw)?;
                Some(RecordedWork {
                    uid: uid.to_string(),
                    name: amw.spec.manifest_work_name.clone(),
                })
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the spoke's records; the first resync asks about none of them");
            Vec::new()
        }
    }
}
