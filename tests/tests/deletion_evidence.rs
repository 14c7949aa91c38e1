//! Deletion only on evidence, end to end: the real `spokelet run` (gRPC transport, in-process)
//! against the test CloudEvents hub and a real spoke kube-apiserver.
//!
//! A restarted agent must delete nothing until the hub says so: not when the hub answers its
//! resync late (5 s, 40 s), not when the hub has lost a work and sends it back within the
//! eviction grace period, not when the hub's version of a work cannot be decoded, and not for a
//! delete event that names another work. It must clean up a work the hub deleted while the agent
//! was away, and a work still missing once the grace period is over.
//!
//! "Nothing deleted" is checked by the object's UID: a deleted and re-created ConfigMap has a new
//! one. The windows in which an object must stay are observation periods covering the agent's
//! sync timers, never limits on how fast something happens.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::{Value, json};
use spokelet_e2e::cloudevents_hub::{HubPki, HubWork, TestHub, TestHubOptions, spec_event};
use spokelet_e2e::{eventually, shared_spoke, unique_name};

mod support;
use support::{Agent, GrpcAgentArgs, condition, latest_status, spoke_namespace};

/// One test's hub, spoke namespace and agent command line.
struct Bed {
    hub: TestHub,
    cluster: String,
    ns: String,
    cms: Api<ConfigMap>,
    args: GrpcAgentArgs,
}

impl Bed {
    async fn new(prefix: &str) -> Bed {
        let spoke = shared_spoke().await;
        let client = spoke.client();
        let ns = spoke_namespace(&client, prefix).await;
        let pki = HubPki::generate().unwrap();
        let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
        let cluster = unique_name("cluster");
        let args = GrpcAgentArgs::new(&pki, &hub, &cluster, spoke.kubeconfig_path());
        Bed {
            hub,
            cluster,
            cms: Api::namespaced(client, &ns),
            ns,
            args,
        }
    }

    /// A work of one ConfigMap `settings` with `model: <value>`.
    fn bundle(&self, value: &str) -> Value {
        json!({"manifests": [{"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": self.ns}, "data": {"model": value}}]})
    }

    /// Publishes the work `model` and waits until it is applied and reported.
    async fn applied_work(&self, agent_args: &[&str]) -> (Agent, HubWork, String) {
        let agent = Agent::start(&self.args.with(agent_args));
        let work = self.hub.upsert_work(&self.cluster, "model", self.bundle("llama"));
        let uid = self.cm_uid().await;
        self.until_status(&work.uid, "Applied", "True").await;
        (agent, work, uid)
    }

    /// The UID of ConfigMap `settings`, once it exists.
    async fn cm_uid(&self) -> String {
        eventually("ConfigMap settings on the spoke", || {
            let cms = self.cms.clone();
            async move {
                let cm = cms.get_opt("settings").await.map_err(|e| e.to_string())?;
                cm.and_then(|c| c.metadata.uid)
                    .ok_or_else(|| "not there yet".to_string())
            }
        })
        .await
        .unwrap()
    }

    /// Waits until the hub's latest status of `uid` has condition `type_` = `status`.
    async fn until_status(&self, uid: &str, type_: &str, status: &str) -> Value {
        eventually(&format!("{type_}={status} on the hub"), || {
            let found = latest_status(&self.hub, uid, |s| condition(s, type_).as_deref() == Some(status));
            async move { found }
        })
        .await
        .unwrap()
    }

    /// Statuses the hub has received for `uid`.
    fn status_count(&self, uid: &str) -> usize {
        self.hub
            .statuses()
            .iter()
            .filter(|r| r.ext("resourceid").as_deref() == Some(uid))
            .count()
    }

    /// Waits until the hub has more than `before` statuses of `uid` (the agent reported again).
    async fn until_reported_after(&self, uid: &str, before: usize) {
        eventually("a status from the restarted agent", || {
            let n = self.status_count(uid);
            async move { if n > before { Ok(()) } else { Err("none yet") } }
        })
        .await
        .unwrap();
    }

    /// Stops the agent, then the hub.
    async fn close(&self, agent: Agent) {
        agent.stop().await;
        self.hub.stop().await;
    }

    /// Spec resync requests the hub has received.
    fn resyncs(&self) -> usize {
        self.hub.received_of("spec.resync_request").len()
    }

    /// Restarts the agent and waits for its first resync request.
    async fn restart(&self, agent: Agent, agent_args: &[&str]) -> Agent {
        agent.stop().await;
        let before = self.resyncs();
        let agent = Agent::start(&self.args.with(agent_args));
        eventually("the restarted agent's resync request", || {
            let n = self.resyncs();
            async move { if n > before { Ok(()) } else { Err("none yet") } }
        })
        .await
        .unwrap();
        agent
    }

    /// Checks for `window` that ConfigMap `settings` keeps UID `uid` (never deleted, never
    /// re-created).
    async fn stays(&self, uid: &str, window: Duration) {
        let end = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < end {
            let cm = self.cms.get_opt("settings").await.unwrap();
            let now = cm.and_then(|c| c.metadata.uid);
            assert_eq!(
                now.as_deref(),
                Some(uid),
                "ConfigMap settings was deleted or re-created"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until ConfigMap `settings` is gone.
    async fn until_gone(&self) {
        eventually("ConfigMap settings to be deleted", || {
            let cms = self.cms.clone();
            async move {
                match cms.get_opt("settings").await.map_err(|e| e.to_string())? {
                    None => Ok(()),
                    Some(_) => Err("still there".to_string()),
                }
            }
        })
        .await
        .unwrap();
    }
}

/// Restart while the hub answers the resync `delay` late: the recorded work is asked about,
/// kept while the answer is pending, and reconciled in place when it comes.
async fn late_resync_deletes_nothing(delay: Duration) {
    let bed = Bed::new("late-resync").await;
    let (agent, work, uid) = bed.applied_work(&[]).await;
    bed.hub.set_resync_delay(delay);
    let before = bed.status_count(&work.uid);
    let agent = bed.restart(agent, &[]).await;

    // The first resync after the restart asks about the recorded work, so the hub can answer it
    // with an update (it still has it) or a delete (it does not).
    let request = bed.hub.received_of("spec.resync_request").pop().unwrap();
    let asked = request.json().unwrap()["resourceVersions"].clone();
    assert_eq!(
        asked,
        json!([{"resourceID": work.uid, "resourceVersion": 0}]),
        "{asked}"
    );

    // Through the 2 s quiet period, the 30 s sync cap and the late answer, the object stays.
    bed.stays(&uid, delay + Duration::from_secs(4)).await;
    // The late answer was taken: the restarted agent reports the work again.
    bed.until_reported_after(&work.uid, before).await;
    bed.until_status(&work.uid, "Applied", "True").await;
    assert_eq!(bed.cm_uid().await, uid);
    bed.close(agent).await;
}

#[tokio::test]
async fn restart_with_a_hub_answering_its_resync_5s_late_deletes_nothing() {
    late_resync_deletes_nothing(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn restart_with_a_hub_answering_its_resync_40s_late_deletes_nothing() {
    late_resync_deletes_nothing(Duration::from_secs(40)).await;
}

#[tokio::test]
async fn a_work_the_hub_lost_and_sends_back_within_the_grace_period_is_never_deleted() {
    let bed = Bed::new("lost-within-grace").await;
    let (agent, work, uid) = bed.applied_work(&[]).await;
    // A hub that lost its store: it no longer has the work and answers only with what it has.
    bed.hub.set_answer_deletes(false);
    let lost = bed.hub.forget_work(&bed.cluster, "model").unwrap();
    let before = bed.status_count(&work.uid);
    let agent = bed.restart(agent, &["--eviction-grace-period", "1h"]).await;
    bed.stays(&uid, Duration::from_secs(6)).await;

    // Back, unchanged: taken up again in place.
    bed.hub.restore_work(&lost);
    bed.until_reported_after(&work.uid, before).await;
    bed.until_status(&work.uid, "Applied", "True").await;
    bed.stays(&uid, Duration::from_secs(1)).await;
    bed.close(agent).await;
}

#[tokio::test]
async fn a_work_still_missing_after_the_grace_period_is_cleaned_up() {
    let bed = Bed::new("lost-after-grace").await;
    let (agent, _work, uid) = bed.applied_work(&[]).await;
    bed.hub.set_answer_deletes(false);
    bed.hub.forget_work(&bed.cluster, "model").unwrap();
    let agent = bed.restart(agent, &["--eviction-grace-period", "4s"]).await;
    // Kept through the quiet period and into the grace period...
    bed.stays(&uid, Duration::from_secs(2)).await;
    // ...and cleaned up once it is over.
    bed.until_gone().await;
    bed.close(agent).await;
}

#[tokio::test]
async fn a_work_deleted_on_the_hub_while_the_agent_was_away_is_cleaned_up_on_restart() {
    let bed = Bed::new("deleted-away").await;
    let (agent, _work, _uid) = bed.applied_work(&[]).await;
    agent.stop().await;
    bed.hub.delete_work(&bed.cluster, "model").unwrap();
    // The default one-hour grace period does not apply: the hub answers the resync with a delete.
    let agent = Agent::start(&bed.args.with(&[]));
    bed.until_gone().await;
    bed.close(agent).await;
}

#[tokio::test]
async fn an_undecodable_work_is_left_alone_across_a_restart_and_its_status_says_why() {
    let bed = Bed::new("undecodable").await;
    let (agent, work, uid) = bed.applied_work(&[]).await;
    agent.stop().await;
    // The hub's next version is not a ManifestBundle the agent can read.
    bed.hub
        .upsert_work(&bed.cluster, "model", json!({"manifests": "not a list"}));
    let agent = Agent::start(&bed.args.with(&[]));
    let status = bed.until_status(&work.uid, "Applied", "False").await;
    let applied = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Applied")
        .unwrap();
    assert_eq!(applied["reason"], "UnreadableWork", "{status}");
    assert!(
        applied["message"].as_str().unwrap().contains("manifest bundle"),
        "{status}"
    );
    bed.stays(&uid, Duration::from_secs(4)).await;

    // A readable version is applied in place.
    bed.hub.upsert_work(&bed.cluster, "model", bed.bundle("mistral"));
    eventually("model=mistral on the spoke", || {
        let cms = bed.cms.clone();
        async move {
            let cm = cms.get("settings").await.map_err(|e| e.to_string())?;
            let model = cm.data.and_then(|d| d.get("model").cloned());
            if model.as_deref() == Some("mistral") {
                Ok(())
            } else {
                Err(format!("{model:?}"))
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(bed.cm_uid().await, uid);
    bed.close(agent).await;
}

#[tokio::test]
async fn a_delete_event_naming_another_works_resource_id_deletes_nothing() {
    let bed = Bed::new("foreign-delete").await;
    let (agent, work, uid) = bed.applied_work(&[]).await;
    // A delete whose metadata names our work but whose resource id is another work's.
    let impostor = HubWork {
        uid: "another-work-uid".into(),
        ..work.clone()
    };
    let ev = spec_event("test-hub", &impostor, "delete_request");
    assert_eq!(bed.hub.send_raw(&bed.cluster, ev), 1);
    bed.stays(&uid, Duration::from_secs(3)).await;
    // The real delete still works.
    bed.hub.delete_work(&bed.cluster, "model").unwrap();
    bed.until_gone().await;
    bed.close(agent).await;
}
