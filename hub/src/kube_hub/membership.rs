//! The cluster's membership of the hub, kept as OCM's registration agent keeps it: the hub's
//! `ManagedCluster` followed by a watch and, while the hub accepts the cluster, its
//! `ManagedClusterJoined` and `ManagedClusterConditionAvailable` conditions set.
//!
//! A stock OCM hub's taint controller marks a cluster `unreachable` (NoSelect) while
//! `ManagedClusterConditionAvailable` is missing or not True, so without these conditions no
//! Placement selects the cluster. The agent sets them as OCM's agent does
//! (`pkg/registration/spoke/managedcluster`): `Joined` once the hub's `HubAcceptedManagedCluster`
//! is True; `Available` True when the spoke API server answers `/livez` (`/healthz` where
//! `/livez` is not served), False `ManagedClusterKubeAPIServerUnavailable` only after the probe
//! has failed for 20 s; probed every minute and on every change of the ManagedCluster, written
//! only when a condition changes, never while the hub says the clocks are out of sync.
//!
//! A hub without OCM's registration controller (only the ManifestWork API, spokelet's minimal
//! hub) never sets `HubAcceptedManagedCluster`; there `spec.hubAcceptsClient: true` alone
//! counts as accepted. A hub that serves no ManagedCluster to the agent at all (no such CRD, or
//! RBAC without it) leaves the membership [`Membership::Unmanaged`]: the lease is then renewed
//! as before, at `--hub-lease-duration`, and no condition is written.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cluster::managed_cluster_resource;
use super::retry::{api_code, retry_backoff};
use spokelet_work_api::conditions::now_rfc3339;

/// OCM's lease duration when `spec.leaseDurationSeconds` is 0 or unset.
const DEFAULT_LEASE_SECONDS: u64 = 60;
/// How often the spoke API server is probed while nothing else changes (OCM's
/// `--cluster-healthcheck-period`).
pub(crate) const HEALTH_PERIOD: Duration = Duration::from_secs(60);
/// How long the probe must keep failing before `Available` turns False (OCM waits as long).
const UNAVAILABLE_AFTER: Duration = Duration::from_secs(20);
/// How often a failing probe is repeated (OCM's retry while the spoke looks unavailable).
pub(crate) const FAILING_PROBE_PERIOD: Duration = Duration::from_secs(5);
/// The longest pause between attempts to read the ManagedCluster on a hub that does not serve
/// it: such a hub rarely starts serving it, and each attempt is a request.
const UNMANAGED_RETRY_MAX: Duration = Duration::from_secs(300);

/// Condition types and reasons, as OCM's API names them.
const HUB_ACCEPTED: &str = "HubAcceptedManagedCluster";
pub(crate) const JOINED: &str = "ManagedClusterJoined";
pub(crate) const AVAILABLE: &str = "ManagedClusterConditionAvailable";
pub(crate) const CLOCK_SYNCED: &str = "ManagedClusterConditionClockSynced";

/// What the agent knows of its ManagedCluster.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Membership {
    /// The first read has not answered yet.
    Pending,
    /// The hub serves no ManagedCluster to this agent (no such CRD, or no right to read it):
    /// not an OCM registration hub, as far as the agent can tell.
    Unmanaged,
    /// The ManagedCluster is missing or the hub does not accept it (yet).
    NotAccepted {
        /// Why, for the log.
        why: String,
    },
    /// The hub accepts the cluster.
    Accepted(AcceptedCluster),
}

/// The parts of an accepted ManagedCluster the agent acts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AcceptedCluster {
    /// `spec.leaseDurationSeconds` (0 → 60 s): how often the lease is renewed.
    pub(crate) lease_duration: Duration,
    /// `status.conditions` as the hub has them.
    pub(crate) conditions: Vec<Value>,
    /// For the optimistic-concurrency guard of the condition patch.
    resource_version: Option<String>,
}

impl Membership {
    /// Reads a ManagedCluster object.
    pub(crate) fn of(obj: &DynamicObject) -> Membership {
        let spec = &obj.data["spec"];
        let conditions: Vec<Value> = obj.data["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let accepted = match condition_status(&conditions, HUB_ACCEPTED) {
            Some(status) => status == "True",
            // No registration controller on this hub: the spec is the acceptance.
            None => spec["hubAcceptsClient"].as_bool() == Some(true),
        };
        if !accepted {
            return Membership::NotAccepted {
                why: "the hub has not accepted the cluster (hubAcceptsClient)".into(),
            };
        }
        let seconds = spec["leaseDurationSeconds"]
            .as_u64()
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_LEASE_SECONDS);
        Membership::Accepted(AcceptedCluster {
            lease_duration: Duration::from_secs(seconds),
            conditions,
            resource_version: obj.metadata.resource_version.clone(),
        })
    }

    /// How often to renew the lease: the ManagedCluster's duration once accepted, `fallback`
    /// on a hub without ManagedClusters, none otherwise.
    pub(crate) fn lease_period(&self, fallback: Duration) -> Option<Duration> {
        match self {
            Membership::Accepted(c) => Some(c.lease_duration),
            Membership::Unmanaged => Some(fallback),
            Membership::Pending | Membership::NotAccepted { .. } => None,
        }
    }
}

/// The `status` of condition `type_` in `conditions`.
pub(crate) fn condition_status<'a>(conditions: &'a [Value], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
}

/// Follows the ManagedCluster named `cluster` on the hub and publishes what it says. Errors
/// are retried with the shared backoff; a hub that does not serve it to the agent is
/// [`Membership::Unmanaged`] and asked again, slowly.
pub(super) async fn follow_cluster(
    client: kube::Client,
    cluster: String,
    tx: watch::Sender<Membership>,
    retry_max: Duration,
    shutdown: CancellationToken,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &managed_cluster_resource());
    // One object by name: RBAC with `resourceNames` allows exactly this list and watch.
    let config = watcher::Config::default().fields(&format!("metadata.name={cluster}"));
    let stream = watcher::watcher(api, config);
    let mut stream = std::pin::pin!(stream);
    let mut backoff = retry_backoff(retry_max);
    let mut slow = retry_backoff(UNMANAGED_RETRY_MAX);
    let mut listed = false;
    loop {
        let ev = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = stream.next() => ev,
        };
        let next = match ev {
            None => return,
            Some(Ok(Event::Init)) => {
                listed = false;
                continue;
            }
            Some(Ok(Event::InitApply(obj) | Event::Apply(obj))) => {
                listed = true;
                Membership::of(&obj)
            }
            Some(Ok(Event::InitDone)) if listed => continue,
            Some(Ok(Event::InitDone | Event::Delete(_))) => Membership::NotAccepted {
                why: format!("the hub has no ManagedCluster {cluster}"),
            },
            Some(Err(e)) => {
                let code = watcher_code(&e);
                let delay = if matches!(code, Some(403 | 404)) {
                    if *tx.borrow() != Membership::Unmanaged {
                        tracing::info!(error = %e, "the hub serves no ManagedCluster to this agent: no cluster conditions; the lease is renewed at --hub-lease-duration");
                    }
                    tx.send_replace(Membership::Unmanaged);
                    slow.next_delay()
                } else {
                    tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "ManagedCluster watch failed; retrying");
                    backoff.next_delay()
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        backoff.reset();
        slow.reset();
        announce(&tx.borrow(), &next);
        tx.send_if_modified(|current| {
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}

/// Logs a change of acceptance (not every status update of the ManagedCluster).
fn announce(old: &Membership, new: &Membership) {
    match (old, new) {
        (Membership::Accepted(a), Membership::Accepted(b)) if a.lease_duration != b.lease_duration => {
            tracing::info!(lease_duration = ?b.lease_duration, "the hub changed the cluster's lease duration");
        }
        (Membership::Accepted(_), Membership::Accepted(_)) => {}
        (_, Membership::Accepted(c)) => {
            tracing::info!(lease_duration = ?c.lease_duration, "the hub accepts the cluster");
        }
        (Membership::NotAccepted { why: a }, Membership::NotAccepted { why: b }) if a == b => {}
        (_, Membership::NotAccepted { why }) => {
            tracing::warn!(%why, "waiting for the hub to accept the cluster; no lease, no conditions until then");
        }
        _ => {}
    }
}

/// The HTTP status of a failed watcher request, if the server answered.
fn watcher_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => api_code(e),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// The result of probing the spoke's API server, with when it started failing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    /// When the current run of failed probes began.
    pub(crate) failing_since: Option<Instant>,
    /// The last failure, for the condition's message.
    last_error: String,
}

impl Health {
    pub(crate) fn record(&mut self, probe: Result<(), SpokeUnhealthy>) {
        match probe {
            Ok(()) => self.failing_since = None,
            Err(e) => {
                self.failing_since.get_or_insert_with(Instant::now);
                self.last_error = e.to_string();
            }
        }
    }

    /// The `Available` condition to publish: True while healthy, False once failures have
    /// lasted [`UNAVAILABLE_AFTER`], nothing new (keep what the hub has) in between.
    pub(crate) fn condition(&self) -> Option<Value> {
        match self.failing_since {
            None => Some(condition(
                AVAILABLE,
                "True",
                "ManagedClusterAvailable",
                "Managed cluster is available",
            )),
            Some(since) if since.elapsed() >= UNAVAILABLE_AFTER => Some(condition(
                AVAILABLE,
                "False",
                "ManagedClusterKubeAPIServerUnavailable",
                &format!("The kube-apiserver is not ok: {}", self.last_error),
            )),
            Some(_) => None,
        }
    }
}

/// A condition without its transition time (set when merged).
pub(crate) fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message})
}

/// Why the spoke's API server failed its health probe: the path asked and its answer.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {answer}")]
pub(crate) struct SpokeUnhealthy {
    path: &'static str,
    answer: String,
}

/// `/livez` of the spoke, falling back to `/healthz` where it is not served or not allowed.
pub(crate) async fn probe_spoke(spoke: &kube::Client) -> Result<(), SpokeUnhealthy> {
    let mut last = None;
    for path in ["/livez", "/healthz"] {
        let unhealthy = |answer: String| SpokeUnhealthy { path, answer };
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| unhealthy(e.to_string()))?;
        match spoke.request_text(request).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if matches!(s.code, 403 | 404) => last = Some(unhealthy(s.message)),
            Err(e) => return Err(unhealthy(e.to_string())),
        }
    }
    Err(last.unwrap_or(SpokeUnhealthy {
        path: "/healthz",
        answer: "not served".into(),
    }))
}

/// Keeps `Joined` and `Available` on the accepted ManagedCluster, as OCM's agent does. Without
/// a spoke client only `Joined` is kept.
pub(super) async fn keep_conditions(
    client: kube::Client,
    cluster: String,
    spoke: Option<kube::Client>,
    mut membership: watch::Receiver<Membership>,
    shutdown: CancellationToken,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &managed_cluster_resource());
    let mut health = Health::default();
    loop {
        let accepted = match &*membership.borrow_and_update() {
            Membership::Accepted(c) => Some(c.clone()),
            _ => None,
        };
        let mut wait = HEALTH_PERIOD;
        if let Some(cluster_now) = accepted {
            if let Some(spoke) = &spoke {
                health.record(probe_spoke(spoke).await);
                if health.failing_since.is_some() {
                    wait = FAILING_PROBE_PERIOD;
                }
            }
            let wanted: Vec<Value> = std::iter::once(condition(
                JOINED,
                "True",
                "ManagedClusterJoined",
                "Managed cluster joined",
            ))
            .chain(spoke.as_ref().and_then(|_| health.condition()))
            .collect();
            if let Err(e) = write_conditions(&api, &cluster, &cluster_now, &wanted).await {
                // A conflict means the ManagedCluster changed: its watch event brings us back.
                tracing::warn!(error = %e, "cannot write the ManagedCluster's conditions; retried on its next change");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Merges `wanted` into the hub's conditions (a transition time only where the status
/// changes) and patches them when that changes anything, guarded by the resourceVersion.
async fn write_conditions(
    api: &Api<DynamicObject>,
    cluster: &str,
    current: &AcceptedCluster,
    wanted: &[Value],
) -> Result<(), kube::Error> {
    if condition_status(&current.conditions, CLOCK_SYNCED) == Some("False") {
        // OCM's agent writes no status while the hub says the clocks disagree.
        return Ok(());
    }
    let Some(merged) = merge_conditions(&current.conditions, wanted, &now_rfc3339()) else {
        return Ok(());
    };
    let patch = json!({
        "metadata": {"resourceVersion": current.resource_version},
        "status": {"conditions": merged},
    });
    api.patch_status(cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(conditions = ?wanted.iter().map(|c| format!("{}={}", c["type"], c["status"])).collect::<Vec<_>>(), "ManagedCluster conditions written");
    Ok(())
}

/// The hub's conditions with each of `wanted` set (`meta.SetStatusCondition`'s rules:
/// `lastTransitionTime` moves only when the status changes); `None` when nothing changes.
pub(crate) fn merge_conditions(current: &[Value], wanted: &[Value], now: &str) -> Option<Vec<Value>> {
    let mut merged = current.to_vec();
    let mut changed = false;
    for want in wanted {
        match merged.iter_mut().find(|c| c["type"] == want["type"]) {
            Some(have) => {
                let same = ["status", "reason", "message"].iter().all(|k| have[k] == want[k]);
                if same {
                    continue;
                }
                if have["status"] != want["status"] {
                    have["lastTransitionTime"] = now.into();
                }
                for k in ["status", "reason", "message"] {
                    have[k] = want[k].clone();
                }
            }
            None => {
                let mut new = want.clone();
                new["lastTransitionTime"] = now.into();
                merged.push(new);
            }
        }
        changed = true;
    }
    changed.then_some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed_cluster(spec: Value, conditions: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": {"name": "c1", "resourceVersion": "7"},
            "spec": spec, "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn acceptance_follows_the_hubs_condition_over_the_spec() {
        let accepted_cond = json!([{"type": HUB_ACCEPTED, "status": "True"}]);
        let denied_cond = json!([{"type": HUB_ACCEPTED, "status": "False"}]);
        let m = Membership::of(&managed_cluster(
            json!({"hubAcceptsClient": false}),
            accepted_cond,
        ));
        assert!(matches!(m, Membership::Accepted(_)), "{m:?}");
        let m = Membership::of(&managed_cluster(json!({"hubAcceptsClient": true}), denied_cond));
        assert!(matches!(m, Membership::NotAccepted { .. }), "{m:?}");
        // No registration controller on the hub: the spec decides.
        let m = Membership::of(&managed_cluster(json!({"hubAcceptsClient": true}), json!([])));
        assert!(matches!(m, Membership::Accepted(_)), "{m:?}");
        let m = Membership::of(&managed_cluster(json!({}), json!([])));
        assert!(matches!(m, Membership::NotAccepted { .. }), "{m:?}");
    }

    #[test]
    fn the_lease_period_is_the_clusters_duration_defaulting_to_a_minute() {
        let fallback = Duration::from_secs(7);
        let m = Membership::of(&managed_cluster(
            json!({"hubAcceptsClient": true, "leaseDurationSeconds": 5}),
            json!([]),
        ));
        assert_eq!(m.lease_period(fallback), Some(Duration::from_secs(5)));
        let m = Membership::of(&managed_cluster(
            json!({"hubAcceptsClient": true, "leaseDurationSeconds": 0}),
            json!([]),
        ));
        assert_eq!(m.lease_period(fallback), Some(Duration::from_secs(60)));
        assert_eq!(Membership::Unmanaged.lease_period(fallback), Some(fallback));
        assert_eq!(Membership::Pending.lease_period(fallback), None);
    }

    #[test]
    fn conditions_merge_with_transition_times_only_on_status_changes() {
        let current = vec![
            json!({"type": HUB_ACCEPTED, "status": "True", "reason": "HubClusterAdminAccepted", "message": "m", "lastTransitionTime": "t0"}),
            json!({"type": AVAILABLE, "status": "Unknown", "reason": "r", "message": "m", "lastTransitionTime": "t0"}),
        ];
        let wanted = vec![
            condition(JOINED, "True", "ManagedClusterJoined", "Managed cluster joined"),
            condition(
                AVAILABLE,
                "True",
                "ManagedClusterAvailable",
                "Managed cluster is available",
            ),
        ];
        let merged = merge_conditions(&current, &wanted, "t1").expect("changed");
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0], current[0], "the hub's own condition is kept as it is");
        assert_eq!(merged[1]["status"], "True");
        assert_eq!(merged[1]["lastTransitionTime"], "t1");
        assert_eq!(merged[2]["type"], JOINED);
        assert_eq!(merged[2]["lastTransitionTime"], "t1");
        // Written once: the same wish again changes nothing, so nothing is sent.
        assert_eq!(merge_conditions(&merged, &wanted, "t2"), None);
        // A new message without a new status keeps the transition time.
        let reworded = vec![condition(AVAILABLE, "True", "ManagedClusterAvailable", "other")];
        let again = merge_conditions(&merged, &reworded, "t3").expect("changed");
        assert_eq!(again[1]["lastTransitionTime"], "t1");
    }

    #[test]
    fn availability_turns_false_only_after_failures_last() {
        let mut health = Health::default();
        health.record(Ok(()));
        assert_eq!(health.condition().unwrap()["status"], "True");
        health.record(Err(SpokeUnhealthy {
            path: "/livez",
            answer: "refused".into(),
        }));
        assert_eq!(health.condition(), None, "a short failure changes nothing");
        health.failing_since = Some(Instant::now() - UNAVAILABLE_AFTER);
        let c = health.condition().unwrap();
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "ManagedClusterKubeAPIServerUnavailable");
        assert!(c["message"].as_str().unwrap().contains("refused"));
        health.record(Ok(()));
        assert_eq!(health.condition().unwrap()["status"], "True");
    }
}
