//! The pool reporter: watches NodeInventories and, on a change (debounced) or the slow heartbeat, reports the pool to the spoke's ClusterClaims and to the hub.
//!
//! It runs in the active engine replica only (the leader): one writer of the pool's claims.
//! The watch keeps every NodeInventory's status in memory (a few kilobytes per node); each
//! change starts the debounce, and when it ends the pool is summed and compared with the
//! last report. Only a different report is written: changed ClusterClaims on the spoke, the
//! ManagedCluster status and the changed nodes' inventories handed to the hub transport,
//! which delivers the latest once the hub is reachable. An unchanged pool costs nothing but
//! the heartbeat, which re-sends the status to the hub (its proof that the report is fresh)
//! and re-applies every claim (repairing hand edits; a no-op on the server).
//!
//! A NodeInventory counts only while a Node of its name owns it (its ownerReference names the
//! live Node's uid), so an inventory written for a node that does not exist, or left by a
//! deleted one, reports nothing; a second watch follows the Nodes for that and for their
//! capacity, which each inventory is held to (see `aggregate`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::aggregate::{NodeCapacity, PoolInventory};
use super::claims::{self, Claim, ClusterFacts};
use super::spoke_claims::{ClaimWriter, ClaimsError};
use crate::admin::SharedRegistry;
use crate::backoff::ExponentialBackoff;
use crate::hub::PoolReportSink;
use crate::lock::lock;
use crate::node::node_inventory_resource;
use spokelet_base::duration::parse_duration;

/// Settings of the pool report.
#[derive(clap::Args, Debug, Clone)]
pub struct PoolReportArgs {
    /// Report the pool's inventory and health (ClusterClaims on the spoke, the ManagedCluster
    /// status on the hub) from the NodeInventories the node role writes.
    #[arg(long, env = "SPOKELET_POOL_REPORT", default_value_t = true, action = clap::ArgAction::Set)]
    pub pool_report: bool,

    /// Quiet time after a NodeInventory change before the pool is reported, so a burst (node
    /// agents starting one after another) costs one report.
    #[arg(long, env = "SPOKELET_POOL_REPORT_DEBOUNCE", default_value = "300ms", value_parser = parse_duration)]
    pub pool_report_debounce: Duration,

    /// How often the pool is reported though nothing changed: the hub's proof of freshness.
    #[arg(long, env = "SPOKELET_POOL_HEARTBEAT", default_value = "10m", value_parser = parse_duration)]
    pub pool_heartbeat: Duration,
}

impl Default for PoolReportArgs {
    fn default() -> Self {
        PoolReportArgs {
            pool_report: true,
            pool_report_debounce: Duration::from_millis(300),
            pool_heartbeat: Duration::from_secs(600),
        }
    }
}

/// `spokelet_pool_*` metrics.
#[derive(Debug, Clone, Default)]
pub struct PoolMetrics {
    /// Reports made, by `reason` (`change`, `heartbeat`).
    reports: Family<Vec<(String, String)>, Counter>,
    /// Requests to the spoke for ClusterClaims.
    claim_requests: Counter,
    /// Claim writes that failed.
    claim_failures: Counter,
    /// Nodes by `state` (`healthy`, `unhealthy`).
    nodes: Family<Vec<(String, String)>, Gauge>,
    /// Physical GPUs in the pool.
    gpus: Gauge,
    /// NodeInventories not counted (no live Node of their name owns them).
    untrusted: Gauge,
}

impl PoolMetrics {
    /// Registers the series under `spokelet_pool_`.
    pub fn register(&self, registry: &SharedRegistry) {
        let mut registry = lock(registry);
        let r = registry.sub_registry_with_prefix("pool");
        r.register("reports", "Pool reports made, by reason", self.reports.clone());
        r.register(
            "claim_requests",
            "Requests made to keep the spoke's ClusterClaims current",
            self.claim_requests.clone(),
        );
        r.register(
            "claim_failures",
            "ClusterClaim syncs that failed (retried at the next report)",
            self.claim_failures.clone(),
        );
        r.register("nodes", "Nodes in the pool, by health", self.nodes.clone());
        r.register("gpus", "Physical GPUs in the pool", self.gpus.clone());
        r.register(
            "untrusted_inventories",
            "NodeInventories not counted: no live Node of their name owns them",
            self.untrusted.clone(),
        );
    }

    fn observe(&self, pool: &PoolInventory) {
        let t = &pool.totals;
        let set = |state: &str, v: u64| {
            self.nodes
                .get_or_create(&vec![("state".into(), state.into())])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set("healthy", t.healthy_nodes);
        set("unhealthy", t.nodes - t.healthy_nodes);
        self.gpus.set(i64::try_from(t.gpus).unwrap_or(i64::MAX));
    }
}

/// One report: what the spoke's claims and the hub's ManagedCluster status say.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolReport {
    /// The pool itself.
    pub pool: PoolInventory,
    /// Its claims.
    pub claims: Vec<Claim>,
    /// The ManagedCluster `status` object.
    pub status: serde_json::Value,
}

impl PoolReport {
    /// The report of `nodes` (node name, NodeInventory status, the Node's capacity) in a cluster
    /// with `facts`.
    pub fn of<'a>(
        nodes: impl IntoIterator<Item = (&'a str, &'a serde_json::Value, Option<&'a NodeCapacity>)>,
        facts: &ClusterFacts,
    ) -> Self {
        let pool = PoolInventory::from_nodes(nodes);
        let claims = claims::claims(&pool, facts);
        let status = claims::managed_cluster_status(&pool, facts, &claims);
        PoolReport { pool, claims, status }
    }
}

/// Reports the pool until `shutdown`.
#[derive(Clone)]
pub struct PoolReporter {
    /// The spoke (reads NodeInventories, writes ClusterClaims).
    client: kube::Client,
    /// The hub transport's report sink; None without a hub (claims on the spoke only).
    hub: Option<Arc<dyn PoolReportSink>>,
    /// Debounce, heartbeat.
    args: PoolReportArgs,
    /// The `spokelet_pool_*` series (clones share them).
    metrics: PoolMetrics,
}

impl std::fmt::Debug for PoolReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolReporter")
            .field("hub", &self.hub)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl PoolReporter {
    /// A reporter of the pool on `client`'s cluster, to `hub` when there is one.
    pub fn new(
        client: kube::Client,
        hub: Option<Arc<dyn PoolReportSink>>,
        args: PoolReportArgs,
        metrics: PoolMetrics,
    ) -> Self {
        PoolReporter {
            client,
            hub,
            args,
            metrics,
        }
    }

    /// Starts the reporter as a task on a child token of `shutdown`: it ends on shutdown, or
    /// when [`RunningReporter::stop`] is called (the engine ended for another reason).
    pub fn spawn(self, shutdown: &CancellationToken) -> RunningReporter {
        let stop = shutdown.child_token();
        let task = tokio::spawn(self.run(stop.clone()).instrument(tracing::info_span!("pool")));
        RunningReporter { stop, task }
    }

    /// Watches and reports until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &node_inventory_resource());
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let node_api: Api<Node> = Api::all(self.client.clone());
        let mut node_stream = watcher::watcher(node_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut state = ReporterState::new(ClaimWriter::new(self.client.clone()));
        let mut due: Option<Instant> = None;
        let mut heartbeat = Instant::now() + self.args.pool_heartbeat;
        loop {
            let debounce = async {
                match due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = debounce => {
                    due = None;
                    self.report(&mut state, false).await;
                }
                () = tokio::time::sleep_until(heartbeat), if state.ready() => {
                    heartbeat = Instant::now() + self.args.pool_heartbeat;
                    self.report(&mut state, true).await;
                }
                ev = stream.next() => {
                    let Some(ev) = ev else { return };
                    if state.apply(ev) && due.is_none() {
                        due = Some(Instant::now() + self.args.pool_report_debounce);
                    }
                }
                ev = node_stream.next() => {
                    let Some(ev) = ev else { return };
                    if state.apply_node(ev) && due.is_none() {
                        due = Some(Instant::now() + self.args.pool_report_debounce);
                    }
                }
            }
        }
    }

    /// Sums the pool and reports what changed (everything, for a heartbeat).
    async fn report(&self, state: &mut ReporterState, heartbeat: bool) {
        if !state.ready() {
            // Both lists first: a partial pool is never reported as the whole.
            return;
        }
        let facts = state.facts(&self.client).await;
        state.note_untrusted(&self.metrics);
        let report = PoolReport::of(state.trusted(), &facts);
        let changed = state.last.as_ref() != Some(&report);
        // A node's document goes to the hub when it changed, even if the totals did not.
        self.report_nodes(state, heartbeat);
        // A claim sync that failed is retried at the next report even if nothing changed.
        if !changed && !heartbeat && !state.claims_failed {
            return;
        }
        let reason = if changed { "change" } else { "heartbeat" };
        self.metrics
            .reports
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
        self.metrics.observe(&report.pool);
        if changed {
            tracing::info!(
                nodes = report.pool.totals.nodes,
                healthy = report.pool.totals.healthy_nodes,
                gpus = report.pool.totals.gpus,
                "pool inventory changed; reporting"
            );
        }
        self.sync_claims(state, &report, heartbeat).await;
        if let Some(hub) = &self.hub {
            hub.cluster_status(self.exposed_status(state, &report).await, heartbeat);
        }
        state.last = Some(report);
    }

    /// The report's ManagedCluster status with the claims as OCM exposes them: every
    /// ClusterClaim on the spoke beside spokelet's (see [`claims::exposed`]). Without the
    /// ClusterClaim API, or when it cannot be read, spokelet's own.
    async fn exposed_status(&self, state: &ReporterState, report: &PoolReport) -> serde_json::Value {
        let on_spoke = match state.claims.on_spoke().await {
            Ok(c) => c,
            Err(ClaimsError::NoApi) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the spoke's ClusterClaims; reporting spokelet's own");
                Vec::new()
            }
        };
        let mut status = report.status.clone();
        status["clusterClaims"] = serde_json::json!(claims::exposed(
            &report.claims,
            &on_spoke,
            claims::MAX_CUSTOM_CLAIMS
        ));
        status
    }

    /// Keeps the spoke's ClusterClaims current; a missing ClusterClaim API is said once.
    async fn sync_claims(&self, state: &mut ReporterState, report: &PoolReport, all: bool) {
        match state
            .claims
            .sync(&report.claims, all || state.claims_failed)
            .await
        {
            Ok(n) => {
                self.metrics.claim_requests.inc_by(n as u64);
                state.claims_failed = false;
            }
            Err(ClaimsError::NoApi) => {
                if !state.no_claim_api {
                    tracing::warn!("{}", ClaimsError::NoApi);
                }
                state.no_claim_api = true;
            }
            Err(e) => {
                self.metrics.claim_failures.inc();
                state.claims_failed = true;
                tracing::warn!(error = %e, "cannot write the spoke's ClusterClaims; retried at the next report");
            }
        }
    }

    /// Hands the hub each counted node whose inventory changed since the last report (all, for
    /// a heartbeat) or that it does not have yet, and the removal of each node it has that no
    /// longer counts.
    fn report_nodes(&self, state: &mut ReporterState, heartbeat: bool) {
        let dirty = std::mem::take(&mut state.dirty);
        let Some(hub) = &self.hub else { return };
        let mut counted = BTreeSet::new();
        for (name, status, _) in state.trusted() {
            counted.insert(name.to_string());
            if heartbeat || dirty.contains(name) || !state.sent.contains(name) {
                hub.node_inventory(name, Some(node_document(name, status)), heartbeat);
            }
        }
        for name in state.sent.difference(&counted) {
            hub.node_inventory(name, None, false);
        }
        state.sent = counted;
    }
}

/// A started reporter.
#[derive(Debug)]
pub struct RunningReporter {
    /// Stops it.
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningReporter {
    /// Stops the reporter and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "pool reporter ended abnormally");
        }
    }
}

/// What the reporter remembers between reports.
#[derive(Debug)]
struct ReporterState {
    /// Node name → NodeInventory, as the watch last saw it.
    inventories: BTreeMap<String, Inventory>,
    /// Node name → the Node's uid and capacity, as the Node watch last saw them.
    nodes: BTreeMap<String, NodeFacts>,
    /// The Node list in progress after a watch (re)start, swapped in whole at its end.
    node_relist: Option<BTreeMap<String, NodeFacts>>,
    /// A complete Node list has been seen.
    nodes_listed: bool,
    /// The Node watch is failing (warned once per outage).
    node_watch_failing: bool,
    /// Nodes whose document the hub has (sent and not removed since).
    sent: BTreeSet<String>,
    /// Inventories not counted, already warned about (again only after they counted).
    untrusted: BTreeSet<String>,
    /// The last report made.
    last: Option<PoolReport>,
    /// The list in progress after a watch (re)start, swapped in whole at its end.
    relist: Option<BTreeMap<String, Inventory>>,
    /// A complete list has been seen: the first report waits for it, so a partial pool is
    /// never reported as the whole.
    listed: bool,
    /// Nodes whose inventory changed since the last report (their documents go to the hub).
    dirty: BTreeSet<String>,
    /// The watch is failing: its failures are warned about once per outage (a cluster
    /// without the NodeInventory CRD would otherwise log one every backoff step, for ever).
    watch_failing: bool,
    /// Keeps the spoke's ClusterClaims, remembering what it applied.
    claims: ClaimWriter,
    /// The last claim sync failed: the next report re-applies every claim.
    claims_failed: bool,
    /// The spoke has no ClusterClaim API (warned once).
    no_claim_api: bool,
    /// The cluster facts last read (empty before the first read). They change only on an
    /// upgrade, so they are read again once per [`FACTS_TTL`].
    facts: ClusterFacts,
    /// When to read them again: [`FACTS_TTL`] after a read, sooner after a failed one.
    facts_due: Instant,
    /// The retry delay after failed reads (the last facts are reported meanwhile).
    facts_backoff: ExponentialBackoff,
}

/// How long the cluster facts (version, platform) are trusted.
const FACTS_TTL: Duration = Duration::from_secs(600);

impl ReporterState {
    fn new(claims: ClaimWriter) -> Self {
        ReporterState {
            inventories: BTreeMap::new(),
            nodes: BTreeMap::new(),
            node_relist: None,
            nodes_listed: false,
            node_watch_failing: false,
            sent: BTreeSet::new(),
            untrusted: BTreeSet::new(),
            last: None,
            relist: None,
            listed: false,
            dirty: BTreeSet::new(),
            watch_failing: false,
            claims,
            claims_failed: false,
            no_claim_api: false,
            facts: ClusterFacts::default(),
            facts_due: Instant::now(),
            facts_backoff: ExponentialBackoff::new(Duration::from_secs(1), FACTS_TTL, 0.2),
        }
    }

    /// Applies one watch event; true when the pool may have changed and a report is due.
    fn apply(&mut self, ev: Result<Event<DynamicObject>, watcher::Error>) -> bool {
        if ev.is_ok() {
            self.watch_failing = false;
        }
        match ev {
            Ok(Event::Init) => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(o)) => {
                if let (Some(r), Some((k, v))) = (self.relist.as_mut(), entry(o)) {
                    r.insert(k, v);
                }
                false
            }
            Ok(Event::InitDone) => {
                let fresh = self.relist.take().unwrap_or_default();
                for (name, status) in &fresh {
                    if self.inventories.get(name) != Some(status) {
                        self.dirty.insert(name.clone());
                    }
                }
                let left = self.inventories.keys().any(|n| !fresh.contains_key(n));
                self.inventories = fresh;
                let first = !self.listed;
                self.listed = true;
                first || !self.dirty.is_empty() || left
            }
            Ok(Event::Apply(o)) => match entry(o) {
                Some((name, status)) if self.inventories.get(&name) != Some(&status) => {
                    self.dirty.insert(name.clone());
                    self.inventories.insert(name, status);
                    self.listed
                }
                _ => false,
            },
            Ok(Event::Delete(o)) => match o.metadata.name {
                Some(name) if self.inventories.remove(&name).is_some() => {
                    self.dirty.remove(&name);
                    self.listed
                }
                _ => false,
            },
            Err(e) => {
                if self.watch_failing {
                    tracing::debug!(error = %e, "NodeInventory watch still failing");
                } else {
                    tracing::warn!(error = %e, "NodeInventory watch failed (is the NodeInventory CRD installed?); retrying with backoff");
                }
                self.watch_failing = true;
                false
            }
        }
    }

    /// Both watches have listed: a report can speak for the whole pool.
    fn ready(&self) -> bool {
        self.listed && self.nodes_listed
    }

    /// Applies one Node watch event; true when what the pool trusts may have changed.
    fn apply_node(&mut self, ev: Result<Event<Node>, watcher::Error>) -> bool {
        if ev.is_ok() {
            self.node_watch_failing = false;
        }
        let changed = match ev {
            Ok(Event::Init) => {
                self.node_relist = Some(BTreeMap::new());
                return false;
            }
            Ok(Event::InitApply(node)) => {
                if let (Some(r), Some((name, facts))) = (self.node_relist.as_mut(), NodeFacts::of(node)) {
                    r.insert(name, facts);
                }
                return false;
            }
            Ok(Event::InitDone) => {
                let fresh = self.node_relist.take().unwrap_or_default();
                let changed = fresh != self.nodes || !self.nodes_listed;
                self.nodes = fresh;
                self.nodes_listed = true;
                changed
            }
            Ok(Event::Apply(node)) => match NodeFacts::of(node) {
                Some((name, facts)) if self.nodes.get(&name) != Some(&facts) => {
                    self.nodes.insert(name, facts);
                    true
                }
                _ => false,
            },
            Ok(Event::Delete(node)) => node
                .metadata
                .name
                .is_some_and(|name| self.nodes.remove(&name).is_some()),
            Err(e) => {
                if !self.node_watch_failing {
                    tracing::warn!(error = %e, "Node watch failed; NodeInventories are not counted until it recovers; retrying with backoff");
                }
                self.node_watch_failing = true;
                false
            }
        };
        changed && self.ready()
    }

    /// The inventories that count: owned by the live Node of their name, with its capacity.
    fn trusted(&self) -> impl Iterator<Item = (&str, &serde_json::Value, Option<&NodeCapacity>)> {
        self.inventories.iter().filter_map(|(name, inv)| {
            let node = self.nodes.get(name)?;
            (inv.owner.as_deref() == Some(node.uid.as_str())).then_some((
                name.as_str(),
                &inv.status,
                Some(&node.capacity),
            ))
        })
    }

    /// Warns once about each inventory that does not count, and counts them.
    fn note_untrusted(&mut self, metrics: &PoolMetrics) {
        let mut untrusted = BTreeSet::new();
        for (name, inv) in &self.inventories {
            let why = match (self.nodes.get(name), inv.owner.as_deref()) {
                (None, _) => "no Node of that name",
                (Some(_), None) => "not owned by its Node",
                (Some(node), Some(owner)) if owner != node.uid => {
                    "owned by another Node of that name (a deleted one)"
                }
                _ => continue,
            };
            if !self.untrusted.contains(name) {
                tracing::warn!(node = %name, why, "NodeInventory not counted in the pool");
            }
            untrusted.insert(name.clone());
        }
        metrics
            .untrusted
            .set(i64::try_from(untrusted.len()).unwrap_or(i64::MAX));
        self.untrusted = untrusted;
    }

    /// The cluster facts, read again when they are due.
    async fn facts(&mut self, client: &kube::Client) -> ClusterFacts {
        if Instant::now() >= self.facts_due {
            match read_facts(client).await {
                Ok(facts) => {
                    self.facts_backoff.reset();
                    self.facts = facts;
                    self.facts_due = Instant::now() + FACTS_TTL;
                }
                Err(e) => {
                    let delay = self.facts_backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot read the cluster's version; reporting the last known");
                    self.facts_due = Instant::now() + delay;
                }
            }
        }
        self.facts.clone()
    }
}

/// The API server's version and one node's provider id.
async fn read_facts(client: &kube::Client) -> Result<ClusterFacts, kube::Error> {
    let version = client.apiserver_version().await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let provider = nodes
        .list(&ListParams::default().limit(1))
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|n| n.spec.and_then(|s| s.provider_id));
    Ok(ClusterFacts::from_parts(
        &version.git_version,
        provider.as_deref(),
    ))
}

/// A NodeInventory as the pool reads it.
#[derive(Debug, Clone, PartialEq)]
struct Inventory {
    /// The uid of the Node of the same name its ownerReferences name (the node role sets it).
    owner: Option<String>,
    /// Its status.
    status: serde_json::Value,
}

/// A NodeInventory's name, owner and status.
fn entry(o: DynamicObject) -> Option<(String, Inventory)> {
    let name = o.metadata.name?;
    let owner = o
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.kind == "Node" && r.api_version == "v1" && r.name == name)
        .map(|r| r.uid);
    let status = o.data.get("status").cloned().unwrap_or(serde_json::Value::Null);
    Some((name, Inventory { owner, status }))
}

/// What the pool needs of a Node.
#[derive(Debug, Clone, PartialEq)]
struct NodeFacts {
    /// Its uid, which its NodeInventory's ownerReference must name.
    uid: String,
    /// What its kubelet reports as capacity.
    capacity: NodeCapacity,
}

impl NodeFacts {
    /// A Node's name and facts; the rest of the object is dropped at once.
    fn of(node: Node) -> Option<(String, NodeFacts)> {
        let name = node.metadata.name?;
        let uid = node.metadata.uid?;
        let capacity = node
            .status
            .and_then(|s| s.capacity)
            .map(|c| NodeCapacity::from_capacity(c.iter().map(|(k, v)| (k.as_str(), v.0.as_str()))))
            .unwrap_or_default();
        Some((name, NodeFacts { uid, capacity }))
    }
}

/// The NodeInventory document the hub receives for a node (the same shape the bare-metal node
/// service sends).
pub fn node_document(name: &str, status: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "spokelet.io/v1alpha1",
        "kind": "NodeInventory",
        "metadata": {"name": name},
        "spec": {"nodeName": name},
        "status": status,
    })
}
