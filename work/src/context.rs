//! What every reconcile and deletion shares: the one client, discovery, the drift cache, the
//! applier, the claim table, the manifest-apply bound and the settings.
//!
//! Only state that really spans works is here. What belongs to one work (its flap guards, drift
//! counts, last applied content, cached record, what its expansion remembers) is the engine
//! slot's (`history`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use tokio::sync::Semaphore;

use super::applied_work::applied_name;
use super::applier::Applier;
use super::claims::Claims;
use super::discovery::Resolver;
use super::drift::DriftWatcher;
use super::executor::ExecutorClients;
use super::expand::Expander;
use super::manifestwork::AppliedManifestResourceMeta;
use super::manifestwork::AppliedManifestWork;
use super::metrics::WorkMetrics;
use super::policy::{Denied, Policy, Target};
use super::schedule::FlapGuard;
use spokelet_base::lock::lock;

/// Engine settings a reconcile needs.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Hex SHA-256 of the hub address: records of different hubs never collide.
    pub hub_hash: String,
    /// HubHashes earlier agents used for the same hub (another spelling of its address): their
    /// records are this hub's too.
    pub legacy_hub_hashes: Vec<String>,
    /// Recorded on AppliedManifestWorks, so an operator sees which agent wrote one.
    pub agent_id: String,
    /// Field manager for manifests whose update strategy names none.
    pub field_manager: String,
    /// What one work may be; over a limit it is refused whole.
    pub limits: super::validate::WorkLimits,
    /// How long to wait for an applied CRD to become Established.
    pub crd_wait: Duration,
    /// The flap guard each manifest's history starts from.
    pub flap: FlapGuard,
    /// Which objects hub works may write: a refused manifest fails alone, and a recorded object
    /// the policy protects is only released, never deleted.
    pub policy: Arc<Policy>,
    /// Largest status published, in bytes of JSON (larger ones are summarised).
    pub max_status_bytes: usize,
    /// Release (owner reference and label removed), rather than delete, objects a work adopted
    /// because they existed before it. False gives OCM's behaviour: they are deleted.
    pub release_adopted: bool,
}

/// The shared part of every reconcile.
pub struct ReconcileContext {
    /// The one client: every request and watch shares its connection pool.
    pub client: Client,
    pub cfg: ReconcileConfig,
    pub resolver: Resolver,
    pub drift: DriftWatcher,
    pub applier: Applier,
    /// Which work claims which object: spans works, so it is locked (through
    /// `spokelet_base::lock::lock`, never held across an await).
    pub claims: Arc<Mutex<Claims>>,
    /// Bounds concurrent manifest applies across all works, so one huge work cannot starve the
    /// API server's other clients.
    pub manifest_permits: Arc<Semaphore>,
    pub metrics: WorkMetrics,
    pub amw_api: Api<AppliedManifestWork>,
    /// Clients impersonating works' executors.
    pub executors: ExecutorClients,
    /// Works whose record has a legacy name (see `legacy_hub_hashes`): they keep using it.
    pub record_names: Mutex<HashMap<String, String>>,
    /// The step that expands works before they are applied (see `expand`; Flux's, when the
    /// agent reconciles Flux objects itself); None: every manifest goes to the API server.
    pub expander: Option<Arc<dyn Expander>>,
}

impl ReconcileContext {
    /// The AppliedManifestWork name of a work: `<hubHash>-<work>`.
    pub fn record_name(&self, work: &str) -> String {
        if let Some(name) = lock(&self.record_names).get(work) {
            return name.clone();
        }
        applied_name(&self.cfg.hub_hash, work)
    }

    /// Every hubHash whose records are this hub's: the current one first.
    pub fn hub_hashes(&self) -> Vec<String> {
        let mut v = vec![self.cfg.hub_hash.clone()];
        v.extend(self.cfg.legacy_hub_hashes.iter().cloned());
        v
    }

    /// Whether the policy refuses writes to a recorded object (its kind found by discovery; an
    /// unknown kind is checked by group, namespace and name alone).
    pub async fn policy_denies(&self, e: &AppliedManifestResourceMeta) -> Option<Denied> {
        let kind = self
            .resolver
            .kind_of(&e.group, &e.version, &e.resource)
            .await
            .unwrap_or_default();
        self.cfg
            .policy
            .check(&Target::new(&e.group, &kind, &e.namespace, &e.name))
            .err()
    }
}

impl std::fmt::Debug for ReconcileContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconcileContext")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}
