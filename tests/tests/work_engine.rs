//! End-to-end tests of the work engine against a real kube-apiserver and controller-manager.
//!
//! Each test runs its own engine with its own hub name (so its AppliedManifestWorks are its
//! own) and uses its own namespace on the shared spoke. Nothing asserts on elapsed time: every
//! wait is a bounded poll that fails with what it expected and what it last saw.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use spokelet::work::applied_work;
use spokelet::work::conditions::find;
use spokelet::work::engine::WorkEngine;
use spokelet::work::manifestwork::AppliedManifestWork;
use spokelet::work::metrics::WorkMetrics;
use spokelet::work::{CancellationToken, Listing, StatusUpdate, WorkEvent};
use spokelet_e2e::{shared_spoke, unique_name};
use tokio::sync::mpsc;

mod support;
use support::engine::*;

#[tokio::test]
async fn update_strategy_applies_owns_records_and_reapply_writes_nothing() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "upd").await;
    let w = work(
        "w-update",
        1,
        vec![
            cm(&ns, "c1", json!({"k": "v"})),
            deployment(&ns, "d1", "nginx:1", 1),
        ],
    );
    a.upsert(&w);
    let st = a.wait_applied("w-update", 1).await;
    assert_eq!(find(&st.status.conditions, "Available").unwrap().status, "True");
    assert_eq!(find(&st.status.conditions, "Degraded").unwrap().status, "False");
    let meta = &st.status.resource_status.manifests[1].resource_meta;
    assert_eq!(
        (
            meta.group.as_str(),
            meta.version.as_str(),
            meta.kind.as_str(),
            meta.resource.as_str()
        ),
        ("apps", "v1", "Deployment", "deployments")
    );
    assert_eq!(
        st.status_hash,
        spokelet::work::conditions::status_hash(&st.status)
    );

    let amw = a.amw_api().get(&a.amw_name("w-update")).await.unwrap();
    let res = amw.status.clone().unwrap().applied_resources;
    assert_eq!(res.len(), 2);
    assert!(res.iter().all(|r| !r.uid.is_empty()), "{res:?}");
    assert_eq!(amw.spec.manifest_work_name, "w-update");
    let c = get_cm(&a.client, &ns, "c1").await.unwrap();
    assert_eq!(c.owner_references()[0].uid, amw.uid().unwrap());
    assert_eq!(
        c.labels().get("work.spokelet.io/managed").map(String::as_str),
        Some("true")
    );

    // Same content again under a new generation: nothing is written.
    let d_api: Api<Deployment> = Api::namespaced(a.client.clone(), &ns);
    let rv_before = (
        c.resource_version(),
        d_api.get("d1").await.unwrap().resource_version(),
    );
    let updates_before = a.metrics.applies_of("unchanged", &["ConfigMap", "Deployment"]);
    let w2 = work(
        "w-update",
        2,
        w.spec
            .workload
            .manifests
            .iter()
            .map(|m| m.value().unwrap())
            .collect(),
    );
    a.upsert(&w2);
    a.wait_applied("w-update", 2).await;
    let c2 = get_cm(&a.client, &ns, "c1").await.unwrap();
    assert_eq!(
        rv_before.0,
        c2.resource_version(),
        "ConfigMap was rewritten by an unchanged re-apply"
    );
    // The deployment controller writes status, so compare our fields via the generation.
    assert_eq!(d_api.get("d1").await.unwrap().metadata.generation, Some(1));
    let updates_after = a.metrics.applies_of("unchanged", &["ConfigMap", "Deployment"]);
    assert!(
        updates_after >= updates_before + 2,
        "re-apply should be unchanged: {updates_before} -> {updates_after}"
    );

    // A real change is applied (Update merges onto the live object).
    a.upsert(&work(
        "w-update",
        3,
        vec![
            cm(&ns, "c1", json!({"k": "v2"})),
            deployment(&ns, "d1", "nginx:2", 1),
        ],
    ));
    a.wait_applied("w-update", 3).await;
    assert_eq!(
        get_cm(&a.client, &ns, "c1").await.unwrap().data.unwrap()["k"],
        "v2"
    );
    a.stop().await;
}

#[tokio::test]
async fn server_side_apply_with_ignore_fields() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "ssa").await;
    let w = with_configs(
        work(
            "w-ssa",
            1,
            vec![
                deployment(&ns, "d", "nginx:1", 1),
                cm(&ns, "c", json!({"a": "1"})),
            ],
        ),
        json!([
            {"resourceIdentifier": {"group": "apps", "resource": "deployments", "name": "d", "namespace": ns},
             "updateStrategy": {"type": "ServerSideApply", "serverSideApply": {"force": true, "fieldManager": "e2e-manager",
                "ignoreFields": [{"condition": "OnSpokePresent", "jsonPaths": [".spec.replicas"]},
                                 {"condition": "OnSpokeChange", "jsonPaths": [".metadata.annotations.note"]}]}}},
            {"resourceIdentifier": {"resource": "configmaps", "name": "c", "namespace": ns},
             "updateStrategy": {"type": "ServerSideApply"}}
        ]),
    );
    a.upsert(&w);
    a.wait_applied("w-ssa", 1).await;
    let d_api: Api<Deployment> = Api::namespaced(a.client.clone(), &ns);
    let d = d_api.get("d").await.unwrap();
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"e2e-manager".to_string()), "{managers:?}");
    let c = get_cm(&a.client, &ns, "c").await.unwrap();
    let managers: Vec<String> = c
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"work-agent".to_string()),
        "default field manager: {managers:?}"
    );

    // Someone scales the deployment and changes the image: replicas stay, image is restored.
    d_api
        .patch("d", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "image": "evil:1"}]}}}})))
        .await
        .unwrap();
    until("image restored, replicas kept", || {
        let d_api = d_api.clone();
        async move {
            let d = d_api.get("d").await.map_err(|e| e.to_string())?;
            let spec = d.spec.unwrap();
            let image = spec.template.spec.unwrap().containers[0]
                .image
                .clone()
                .unwrap_or_default();
            if image == "nginx:1" && spec.replicas == Some(3) {
                Ok(())
            } else {
                Err(format!("image {image}, replicas {:?}", spec.replicas))
            }
        }
    })
    .await;
    a.stop().await;
}

#[tokio::test]
async fn create_only_and_read_only() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "crro").await;
    // An object owned by someone else, only read.
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(cm(&ns, "theirs", json!({"key": "42", "flag": "x"}))).unwrap(),
    )
    .await
    .unwrap();
    let w = with_configs(
        work(
            "w-cr",
            1,
            vec![
                cm(&ns, "once", json!({"k": "v"})),
                cm(&ns, "theirs", json!({"key": "ignored"})),
            ],
        ),
        json!([
            {"resourceIdentifier": {"resource": "configmaps", "name": "once", "namespace": ns}, "updateStrategy": {"type": "CreateOnly"}},
            {"resourceIdentifier": {"resource": "configmaps", "name": "theirs", "namespace": ns}, "updateStrategy": {"type": "ReadOnly"},
             "feedbackRules": [{"type": "JSONPaths", "jsonPaths": [{"name": "key", "path": ".data.key"}, {"name": "data", "path": "{.data}"}]}]}
        ]),
    );
    a.upsert(&w);
    let st = a.wait_applied("w-cr", 1).await;
    let key = feedback(&st, 1, "key").expect("ReadOnly feedback value");
    assert_eq!(key.string.as_deref(), Some("42"));
    let raw = feedback(&st, 1, "data").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(raw.json_raw.as_deref().unwrap()).unwrap(),
        json!({"key": "42", "flag": "x"})
    );
    let theirs = cms.get("theirs").await.unwrap();
    assert!(
        theirs.owner_references().is_empty() && !theirs.labels().contains_key("work.spokelet.io/managed"),
        "ReadOnly object was written: {theirs:?}"
    );
    assert_eq!(theirs.data.unwrap()["key"], "42");

    // CreateOnly: an edit is left alone, a deletion is re-created.
    cms.patch(
        "once",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "edited"}})),
    )
    .await
    .unwrap();
    let mut w2 = w.clone();
    w2.metadata.generation = Some(2);
    a.upsert(&w2);
    a.wait_applied("w-cr", 2).await;
    assert_eq!(cms.get("once").await.unwrap().data.unwrap()["k"], "edited");
    cms.delete("once", &DeleteParams::default()).await.unwrap();
    until("CreateOnly object re-created after deletion", || {
        let cms = cms.clone();
        async move {
            match cms.get_opt("once").await.map_err(|e| e.to_string())? {
                Some(c) if c.metadata.deletion_timestamp.is_none() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    a.stop().await;
}

#[tokio::test]
async fn crd_and_its_custom_resource_in_one_work_applied_in_order() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = unique_name("crdns");
    let group = format!("{}.example.com", unique_name("g"));
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {"group": group, "scope": "Namespaced", "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
    let cr = json!({"apiVersion": format!("{group}/v1"), "kind": "Widget", "metadata": {"name": "w1", "namespace": ns}, "spec": {"size": 3}});
    let nsm = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
    // Deliberately listed in the wrong order: CR first, namespace last.
    let w = with_configs(
        work("w-crd", 1, vec![cr, crd, nsm]),
        json!([{"resourceIdentifier": {"group": group, "resource": "widgets", "name": "w1", "namespace": ns},
                "feedbackRules": [{"type": "JSONPaths", "jsonPaths": [{"name": "size", "path": ".spec.size"}]}]}]),
    );
    a.upsert(&w);
    let st = a.wait_applied("w-crd", 1).await;
    assert_eq!(feedback(&st, 0, "size").unwrap().integer, Some(3));
    assert_eq!(manifest_cond(&st, 0, "StatusFeedbackSynced").status, "True");
    a.stop().await;
}

#[tokio::test]
async fn removed_manifest_is_pruned_and_shared_object_only_loses_owner() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "prune").await;
    let shared = cm(&ns, "shared", json!({"s": "1"}));
    a.upsert(&work(
        "w-a",
        1,
        vec![
            cm(&ns, "keep", json!({})),
            cm(&ns, "drop", json!({})),
            shared.clone(),
        ],
    ));
    a.upsert(&work("w-b", 1, vec![shared.clone()]));
    a.wait_applied("w-a", 1).await;
    a.wait_applied("w-b", 1).await;
    let s = get_cm(&a.client, &ns, "shared").await.unwrap();
    assert_eq!(s.owner_references().len(), 2, "both works own the shared object");

    a.upsert(&work("w-a", 2, vec![cm(&ns, "keep", json!({}))]));
    a.wait_applied("w-a", 2).await;
    cm_gone(&a.client, &ns, "drop", "dropped ConfigMap deleted").await;
    let s = get_cm(&a.client, &ns, "shared")
        .await
        .expect("object still claimed by w-b must stay");
    assert_eq!(s.owner_references().len(), 1);
    assert_eq!(s.owner_references()[0].name, a.amw_name("w-b"));
    let amw = a.amw_api().get(&a.amw_name("w-a")).await.unwrap();
    let names: Vec<String> = amw
        .status
        .unwrap()
        .applied_resources
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["keep"]);
    a.stop().await;
}

async fn delete_case(policy: Value, expect_left: &[&str], expect_gone: &[&str]) {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "del").await;
    let mut w = work("w-del", 1, vec![cm(&ns, "a", json!({})), cm(&ns, "b", json!({}))]);
    w.spec.delete_option = Some(serde_json::from_value(policy).unwrap());
    a.upsert(&w);
    a.wait_applied("w-del", 1).await;
    a.delete("w-del");
    let st = a.wait("w-del", "Deleted=True", |u| u.deleted).await;
    assert_eq!(
        find(&st.status.conditions, "Deleted").unwrap().reason,
        "ManifestsDeleted"
    );
    assert!(
        a.amw_api().get_opt(&a.amw_name("w-del")).await.unwrap().is_none(),
        "record must be gone"
    );
    for n in expect_gone {
        assert!(get_cm(&a.client, &ns, n).await.is_none(), "{n} should be deleted");
    }
    for n in expect_left {
        let c = get_cm(&a.client, &ns, n)
            .await
            .unwrap_or_else(|| panic!("{n} should be orphaned"));
        assert!(
            c.owner_references().is_empty(),
            "orphaned {n} keeps no reference to the deleted record"
        );
    }
    a.stop().await;
}

#[tokio::test]
async fn delete_foreground_removes_everything_and_reports_progress() {
    delete_case(json!({"propagationPolicy": "Foreground"}), &[], &["a", "b"]).await;
}

#[tokio::test]
async fn delete_orphan_leaves_everything() {
    delete_case(json!({"propagationPolicy": "Orphan"}), &["a", "b"], &[]).await;
}

#[tokio::test]
async fn delete_selectively_orphan_leaves_matching() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "sel").await;
    let mut w = work(
        "w-sel",
        1,
        vec![cm(&ns, "keep", json!({})), cm(&ns, "drop", json!({}))],
    );
    w.spec.delete_option = Some(
        serde_json::from_value(json!({"propagationPolicy": "SelectivelyOrphan",
            "selectivelyOrphans": {"orphaningRules": [{"group": "", "resource": "configmaps", "name": "keep", "namespace": ns}]}}))
        .unwrap(),
    );
    a.upsert(&w);
    a.wait_applied("w-sel", 1).await;
    a.delete("w-sel");
    a.wait("w-sel", "Deleted=True", |u| u.deleted).await;
    assert!(get_cm(&a.client, &ns, "keep").await.is_some());
    assert!(get_cm(&a.client, &ns, "drop").await.is_none());
    a.stop().await;
}

#[tokio::test]
async fn foreground_delete_waits_for_finalizers_with_deleting_condition() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "fin").await;
    let mut held = cm(&ns, "held", json!({}));
    held["metadata"]["finalizers"] = json!(["e2e.spokelet.io/hold"]);
    a.upsert(&work("w-fin", 1, vec![held]));
    a.wait_applied("w-fin", 1).await;
    a.delete("w-fin");
    let st = a
        .wait("w-fin", "Deleting=True", |u| {
            find(&u.status.conditions, "Deleting").is_some_and(|c| c.status == "True")
        })
        .await;
    assert!(
        find(&st.status.conditions, "Deleting")
            .unwrap()
            .message
            .contains("1 of 1"),
        "{:?}",
        st.status.conditions
    );
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    a.wait("w-fin", "Deleted=True", |u| u.deleted).await;
    a.stop().await;
}

#[tokio::test]
async fn drift_edit_and_delete_are_corrected_and_counted() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "drift").await;
    a.upsert(&work("w-drift", 1, vec![cm(&ns, "c", json!({"k": "v"}))]));
    a.wait_applied("w-drift", 1).await;
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "tampered"}})),
    )
    .await
    .unwrap();
    let st = a
        .wait("w-drift", "DriftCorrections=1", |u| {
            feedback(u, 0, "DriftCorrections").and_then(|v| v.integer) == Some(1)
        })
        .await;
    assert_eq!(find(&st.status.conditions, "Applied").unwrap().status, "True");
    assert_eq!(get_cm(&a.client, &ns, "c").await.unwrap().data.unwrap()["k"], "v");
    cms.delete("c", &DeleteParams::default()).await.unwrap();
    a.wait("w-drift", "DriftCorrections=2", |u| {
        feedback(u, 0, "DriftCorrections").and_then(|v| v.integer) == Some(2)
    })
    .await;
    assert_eq!(get_cm(&a.client, &ns, "c").await.unwrap().data.unwrap()["k"], "v");
    let n = a
        .metrics
        .drift_corrections
        .get_or_create(&vec![("work".into(), "w-drift".into())])
        .get();
    assert_eq!(n, 2);
    a.stop().await;
}

#[tokio::test]
async fn well_known_and_json_path_feedback() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "fb").await;
    let w = with_configs(
        work("w-fb", 1, vec![deployment(&ns, "d", "nginx:1", 2)]),
        json!([{"resourceIdentifier": {"group": "apps", "resource": "deployments", "name": "d", "namespace": ns},
            "feedbackRules": [{"type": "WellKnownStatus"},
                {"type": "JSONPaths", "jsonPaths": [
                    {"name": "progressing", "path": ".status.conditions[?(@.type==\"Progressing\")].status"},
                    {"name": "firstContainer", "path": "{.spec.template.spec.containers[0]}"}]}]}]),
    );
    a.upsert(&w);
    // The deployment controller fills in status shortly after the apply.
    let st = a
        .wait("w-fb", "Replicas=2 and Progressing feedback", |u| {
            feedback(u, 0, "Replicas").and_then(|v| v.integer) == Some(2)
                && feedback(u, 0, "progressing").is_some()
        })
        .await;
    assert_eq!(
        feedback(&st, 0, "progressing").unwrap().string.as_deref(),
        Some("True")
    );
    let fc = feedback(&st, 0, "firstContainer").unwrap();
    assert_eq!(fc.type_, spokelet::work::manifestwork::ValueType::JsonRaw);
    assert!(fc.json_raw.unwrap().contains("nginx:1"));
    a.stop().await;
}

#[tokio::test]
async fn restart_mid_apply_converges_without_loss_or_duplicates() {
    let hub = unique_name("hub");
    let ns = namespace(&shared_spoke().await.client(), "restart").await;
    let manifests: Vec<Value> = (0..40)
        .map(|i| cm(&ns, &format!("c{i}"), json!({"i": i.to_string()})))
        .collect();
    let w = work("w-restart", 1, manifests.clone());
    {
        let mut cfg = test_config(&hub);
        cfg.max_concurrent_manifests = 2;
        let a = Agent::start_with(&hub, cfg).await;
        a.upsert(&w);
        a.synced();
        // Kill as soon as the record exists and before everything is applied.
        let amw_api = a.amw_api();
        let name = a.amw_name("w-restart");
        until("record created", || {
            let (api, name) = (amw_api.clone(), name.clone());
            async move {
                api.get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| ())
                    .ok_or_else(|| "not yet".to_string())
            }
        })
        .await;
        a.task.abort();
        let _ = a.task.await;
    }
    // The work meanwhile lost its last 10 manifests.
    let mut a = Agent::start_with(&hub, test_config(&hub)).await;
    let w2 = work("w-restart", 2, manifests[..30].to_vec());
    a.upsert(&w2);
    a.synced();
    a.wait_applied("w-restart", 2).await;
    let amw = a.amw_api().get(&a.amw_name("w-restart")).await.unwrap();
    let res = amw.status.unwrap().applied_resources;
    assert_eq!(res.len(), 30, "{res:?}");
    assert!(res.iter().all(|r| !r.uid.is_empty()));
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    until("the 10 removed manifests are gone", || {
        let cms = cms.clone();
        async move {
            let n = cms
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .filter(|c| c.name_any().starts_with('c'))
                .count();
            if n == 30 {
                Ok(())
            } else {
                Err(format!("{n} ConfigMaps"))
            }
        }
    })
    .await;
    for c in cms
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| c.name_any().starts_with('c'))
    {
        assert_eq!(
            c.owner_references().len(),
            1,
            "{} has duplicate owner references",
            c.name_any()
        );
    }
    a.stop().await;

    // Deleted while the agent was away: the next agent cleans up once the source has synced.
    let mut b = Agent::start(&hub).await;
    b.wait("w-restart", "Deleted=True after restart", |u| u.deleted)
        .await;
    assert!(
        cms.list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .all(|c| !c.name_any().starts_with('c') || c.metadata.deletion_timestamp.is_some())
    );
    b.stop().await;
}

#[tokio::test]
async fn bad_manifests_fail_alone_with_clear_messages() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "bad").await;
    let nons = unique_name("nons");
    let w = with_configs(
        work(
            "w-bad",
            1,
            vec![
                json!({"kind": "ConfigMap", "metadata": {"name": "x"}}), // 0 no apiVersion
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}), // 1 no name
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": nons}}), // 2 no namespace
                json!({"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "n", "namespace": ns}}), // 3 unknown kind
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name", "namespace": ns}}), // 4 rejected
                cm(&ns, "dup", json!({})),             // 5
                cm(&ns, "dup", json!({"other": "x"})), // 6 duplicate of 5
                cm(&ns, "fine", json!({"k": "v"})),    // 7 ok, with a bad JSONPath + bad ignore path
            ],
        ),
        json!([{"resourceIdentifier": {"resource": "configmaps", "name": "fine", "namespace": ns},
            "updateStrategy": {"type": "ServerSideApply", "serverSideApply": {"ignoreFields": [{"jsonPaths": [".spec.doesNotExist"]}]}},
            "feedbackRules": [{"type": "JSONPaths", "jsonPaths": [{"name": "broken", "path": ".data[?(@.x=="}, {"name": "k", "path": ".data.k"}]}]}]),
    );
    a.upsert(&w);
    let st = a.wait("w-bad", "first status", |u| u.generation == 1).await;
    let applied = |i: usize| manifest_cond(&st, i, "Applied").clone();
    assert!(applied(0).message.contains("apiVersion"), "{:?}", applied(0));
    assert_eq!(applied(0).reason, "InvalidManifest");
    assert!(applied(1).message.contains("metadata.name"));
    assert_eq!(applied(2).status, "True");
    assert!(
        applied(2).message.contains("defaulted to \"default\""),
        "{:?}",
        applied(2)
    );
    assert_eq!(applied(3).reason, "UnknownKind");
    assert!(applied(3).message.contains("Nope"));
    assert_eq!(applied(4).status, "False");
    assert!(
        applied(4).message.contains("Bad_Name"),
        "API server message expected: {:?}",
        applied(4)
    );
    assert_eq!(applied(5).status, "True");
    assert_eq!(applied(6).reason, "DuplicateManifest");
    assert_eq!(applied(7).status, "True");
    assert!(
        applied(7).message.contains(".spec.doesNotExist"),
        "{:?}",
        applied(7)
    );
    let fb = manifest_cond(&st, 7, "StatusFeedbackSynced");
    assert_eq!(fb.status, "False");
    assert!(
        fb.message.contains("broken") && fb.message.contains("invalid JSONPath"),
        "{fb:?}"
    );
    assert_eq!(feedback(&st, 7, "k").unwrap().string.as_deref(), Some("v"));
    let wc = find(&st.status.conditions, "Applied").unwrap();
    assert_eq!(wc.status, "False");
    assert!(wc.message.starts_with("5 of 8 manifests failed"), "{wc:?}");
    assert_eq!(find(&st.status.conditions, "Degraded").unwrap().status, "True");
    // The good ones were applied.
    assert!(get_cm(&a.client, &ns, "fine").await.is_some());
    assert!(
        get_cm(&a.client, "default", &nons).await.is_some(),
        "namespace defaulted to default"
    );
    // Another work is untouched by all of this.
    a.upsert(&work("w-good", 1, vec![cm(&ns, "good", json!({}))]));
    a.wait_applied("w-good", 1).await;
    // Status is not re-sent while nothing changes, even though the bad work retries.
    a.drain();
    let before = a.all.iter().filter(|u| u.name == "w-bad").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.drain();
    let after = a.all.iter().filter(|u| u.name == "w-bad").count();
    let sent: Vec<&StatusUpdate> = a.all.iter().filter(|u| u.name == "w-bad").collect();
    assert_eq!(
        before,
        after,
        "unchanged status must not be re-sent; last two: {}\n---\n{}",
        serde_json::to_string(&sent[sent.len() - 2].status).unwrap(),
        serde_json::to_string(&sent[sent.len() - 1].status).unwrap()
    );
    a.stop().await;
}

#[tokio::test]
async fn two_works_claiming_one_object_differently() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "claim").await;
    a.upsert(&work(
        "w-first",
        1,
        vec![cm(&ns, "contested", json!({"by": "first"}))],
    ));
    a.wait_applied("w-first", 1).await;
    a.upsert(&work(
        "w-second",
        1,
        vec![
            cm(&ns, "contested", json!({"by": "second"})),
            cm(&ns, "mine", json!({})),
        ],
    ));
    let st = a.wait("w-second", "status", |u| u.generation == 1).await;
    let c = manifest_cond(&st, 0, "Applied");
    assert_eq!(c.reason, "ConflictingWork");
    assert!(c.message.contains("w-first"), "{c:?}");
    assert_eq!(manifest_cond(&st, 1, "Applied").status, "True");
    assert_eq!(
        get_cm(&a.client, &ns, "contested").await.unwrap().data.unwrap()["by"],
        "first"
    );
    a.stop().await;
}

#[tokio::test]
async fn oversized_work_is_rejected_whole() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "big").await;
    let chunk = "x".repeat(500 * 1024);
    let manifests: Vec<Value> = (0..10)
        .map(|i| cm(&ns, &format!("big{i}"), json!({"d": chunk})))
        .collect();
    a.upsert(&work("w-big", 1, manifests));
    let st = a.wait("w-big", "status", |u| u.generation == 1).await;
    let c = find(&st.status.conditions, "Applied").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "WorkTooLarge"));
    assert!(c.message.contains("byte limit"), "{c:?}");
    assert!(get_cm(&a.client, &ns, "big0").await.is_none());
    a.upsert(&work("w-small", 1, vec![cm(&ns, "small", json!({}))]));
    a.wait_applied("w-small", 1).await;
    a.stop().await;
}

#[tokio::test]
async fn immutable_field_rejection_is_reported() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "immut").await;
    let job = |image: &str| {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": ns},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": image}]}}}})
    };
    a.upsert(&work("w-job", 1, vec![job("busybox:1")]));
    a.wait_applied("w-job", 1).await;
    a.upsert(&work("w-job", 2, vec![job("busybox:2")]));
    let st = a
        .wait("w-job", "generation 2 status", |u| u.generation == 2)
        .await;
    let c = manifest_cond(&st, 0, "Applied");
    assert_eq!(c.status, "False");
    assert!(c.message.contains("immutable"), "{c:?}");
    a.stop().await;
}

#[tokio::test]
async fn file_source_end_to_end() {
    use spokelet::hub::{FileSource, FileStatusSink};
    let client = shared_spoke().await.client();
    let ns = namespace(&client, "files").await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: String| std::fs::write(dir.path().join(name), body).unwrap();
    write(
        "one.yaml",
        format!(
            "apiVersion: work.open-cluster-management.io/v1\nkind: ManifestWork\nmetadata: {{name: one}}\nspec:\n  workload:\n    manifests:\n      - {{apiVersion: v1, kind: ConfigMap, metadata: {{name: f1, namespace: {ns}}}, data: {{k: v}}}}\n"
        ),
    );
    write("broken.yaml", "spec: {workload: [not, a, map".to_string());
    let hub = unique_name("hub");
    let engine = WorkEngine::new(client.clone(), test_config(&hub), WorkMetrics::default());
    let shutdown = CancellationToken::new();
    let source = FileSource::new(dir.path(), Duration::from_millis(100)).unwrap();
    let sink = Arc::new(FileStatusSink::new(dir.path()));
    let sd = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(source, sink, sd).await });
    let status_file = dir.path().join("one.status.yaml");
    until("one.status.yaml says Applied", || {
        let p = status_file.clone();
        async move {
            let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
            let st: spokelet::work::ManifestWorkStatus =
                serde_yaml::from_str(&s).map_err(|e| e.to_string())?;
            if find(&st.conditions, "Applied").is_some_and(|c| c.status == "True") {
                Ok(())
            } else {
                Err(s)
            }
        }
    })
    .await;
    assert!(get_cm(&client, &ns, "f1").await.is_some());
    let err = std::fs::read_to_string(dir.path().join("broken.status.yaml")).unwrap();
    assert!(err.contains("InvalidWorkFile"), "{err}");
    // Removing the file deletes the work.
    std::fs::remove_file(dir.path().join("one.yaml")).unwrap();
    cm_gone(&client, &ns, "f1", "f1 deleted after its file was removed").await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_field_that_keeps_flipping_backs_off_and_degrades() {
    let hub = unique_name("hub");
    let mut cfg = test_config(&hub);
    cfg.flap = spokelet::work::schedule::FlapGuard::new(
        Duration::from_secs(120),
        3,
        Duration::from_secs(600),
        Duration::from_secs(600),
    );
    let mut a = Agent::start_with(&hub, cfg).await;
    a.synced();
    let ns = namespace(&a.client, "flap").await;
    a.upsert(&work("w-flap", 1, vec![cm(&ns, "c", json!({"k": "v"}))]));
    a.wait_applied("w-flap", 1).await;
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    for n in 1..=3i64 {
        cms.patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": format!("fight-{n}")}})),
        )
        .await
        .unwrap();
        a.wait("w-flap", "correction counted", |u| {
            feedback(u, 0, "DriftCorrections").and_then(|v| v.integer) == Some(n)
        })
        .await;
    }
    let st = a
        .wait("w-flap", "Degraded=DriftFlapping", |u| {
            find(&u.status.conditions, "Degraded").is_some_and(|c| c.reason == "DriftFlapping")
        })
        .await;
    assert!(
        find(&st.status.conditions, "Degraded")
            .unwrap()
            .message
            .contains("keeps being changed")
    );
    // During the back-off a further change is left alone (reported, not fought).
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "fight-4"}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get_cm(&a.client, &ns, "c").await.unwrap().data.unwrap()["k"],
        "fight-4"
    );
    a.stop().await;
}

#[tokio::test]
async fn engine_on_the_agents_http1_client() {
    engine_on_the_agents_client(spokelet::kube_client::HttpVersion::Http1, "h1").await;
}

#[tokio::test]
async fn engine_on_the_agents_http2_client() {
    engine_on_the_agents_client(spokelet::kube_client::HttpVersion::Http2, "h2").await;
}

/// One work applied through the agent's own client speaking `version`.
async fn engine_on_the_agents_client(version: spokelet::kube_client::HttpVersion, tag: &str) {
    let cluster = shared_spoke().await;
    let config = spokelet::kube_client::cluster_config(Some(cluster.kubeconfig_path()))
        .await
        .unwrap();
    let client = spokelet::kube_client::client(config, version).unwrap();
    let ns = namespace(&client, tag).await;
    let hub = unique_name("hub");
    let (tx, rx) = mpsc::unbounded_channel();
    let (stx, mut srx) = mpsc::unbounded_channel::<StatusUpdate>();
    let engine = WorkEngine::new(client.clone(), test_config(&hub), WorkMetrics::default());
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(rx, Arc::new(stx), sd).await });
    tx.send(WorkEvent::Upsert(Box::new(work(
        "w-h2",
        1,
        vec![cm(&ns, "c", json!({"k": "v"}))],
    ))))
    .unwrap();
    tx.send(WorkEvent::Synced(Listing::Complete)).unwrap();
    let mut applied = false;
    for _ in 0..1500 {
        match tokio::time::timeout(Duration::from_millis(200), srx.recv()).await {
            Ok(Some(u)) if find(&u.status.conditions, "Applied").is_some_and(|c| c.status == "True") => {
                applied = true;
                break;
            }
            _ => {}
        }
    }
    assert!(applied, "work never applied over the HTTP/2 client");
    assert!(get_cm(&client, &ns, "c").await.is_some());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_policy_refuses_protected_namespaces_alone_and_deleting_the_work_leaves_them() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "policy").await;
    let probe = unique_name("probe");
    let w = work(
        "w-policy",
        1,
        vec![
            cm("kube-system", &probe, json!({"k": "v"})),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
            cm(&ns, "allowed", json!({"k": "v"})),
        ],
    );
    a.upsert(&w);
    let st = a
        .wait("w-policy", "the allowed manifest applied", |u| {
            manifest_cond_opt(u, 2, "Applied").is_some_and(|c| c.status == "True")
        })
        .await;
    for i in [0, 1] {
        let c = manifest_cond(&st, i, "Applied");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "DeniedByPolicy"),
            "{c:?}"
        );
        assert!(c.message.contains("kube-system"), "{}", c.message);
    }
    assert!(
        get_cm(&a.client, "kube-system", &probe).await.is_none(),
        "nothing written to kube-system"
    );
    assert!(get_cm(&a.client, &ns, "allowed").await.is_some());

    a.delete("w-policy");
    a.wait("w-policy", "Deleted=True", |u| u.deleted).await;
    cm_gone(
        &a.client,
        &ns,
        "allowed",
        "the allowed ConfigMap deleted with its work",
    )
    .await;
    let kube_system = Api::<k8s_openapi::api::core::v1::Namespace>::all(a.client.clone())
        .get("kube-system")
        .await
        .unwrap();
    assert!(
        kube_system.metadata.deletion_timestamp.is_none(),
        "kube-system must never be deleted"
    );
    a.stop().await;
}

#[tokio::test]
async fn deleting_one_of_two_records_owning_an_object_only_releases_it() {
    // Two agents of two hubs (two record sets, neither engine knowing the other's claims)
    // apply the same ConfigMap: it carries both records' ownerReferences.
    let mut a = Agent::start(&unique_name("hub-a")).await;
    let mut b = Agent::start(&unique_name("hub-b")).await;
    let ns = namespace(&a.client, "shared-owner").await;
    let shared = || work("w-shared", 1, vec![cm(&ns, "shared", json!({"k": "v"}))]);
    a.upsert(&shared());
    a.wait_applied("w-shared", 1).await;
    b.upsert(&shared());
    b.wait_applied("w-shared", 1).await;
    let owners = |cm: &ConfigMap| -> Vec<String> {
        cm.metadata
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.name.clone())
            .collect()
    };
    let cm_now = get_cm(&a.client, &ns, "shared").await.unwrap();
    assert_eq!(owners(&cm_now).len(), 2, "{:?}", owners(&cm_now));
    let uid = cm_now.metadata.uid.clone();

    a.delete("w-shared");
    a.wait("w-shared", "Deleted=True", |u| u.deleted).await;
    let after = get_cm(&a.client, &ns, "shared")
        .await
        .expect("the other record's object stays");
    assert_eq!(after.metadata.uid, uid);
    assert_eq!(
        owners(&after),
        [b.amw_name("w-shared")],
        "only the deleted record let go"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sixty_deletions_stuck_on_finalizers_do_not_stop_a_61st_work() {
    // More stuck deletions than the engine's 48 work permits.
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "stuck").await;
    let stuck = |i: usize| {
        let mut m = cm(&ns, &format!("stuck-{i}"), json!({"k": "v"}));
        m["metadata"]["finalizers"] = json!(["spokelet.test/stuck"]);
        work(&format!("w-stuck-{i}"), 1, vec![m])
    };
    for i in 0..60 {
        a.upsert(&stuck(i));
    }
    for i in 0..60 {
        a.wait_applied(&format!("w-stuck-{i}"), 1).await;
    }
    for i in 0..60 {
        a.delete(&format!("w-stuck-{i}"));
    }
    for i in 0..60 {
        let st = a
            .wait(
                &format!("w-stuck-{i}"),
                "Deleting while the finalizer holds",
                |u| find(&u.status.conditions, "Deleting").is_some_and(|c| c.status == "True"),
            )
            .await;
        let c = find(&st.status.conditions, "Deleting").unwrap();
        assert!(c.message.contains("still being deleted"), "{}", c.message);
    }
    a.upsert(&work("w-61st", 1, vec![cm(&ns, "free", json!({"k": "v"}))]));
    a.wait_applied("w-61st", 1).await;

    // Let the finalizers go: the deletions finish.
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &ns);
    for i in 0..60 {
        let name = format!("stuck-{i}");
        cms.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    }
    for i in 0..60 {
        a.wait(&format!("w-stuck-{i}"), "Deleted=True", |u| u.deleted)
            .await;
    }
    a.stop().await;
}

#[tokio::test]
async fn a_work_of_10000_manifests_is_refused_clearly_and_one_of_3500_applies() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "big-work").await;
    let many = |name: &str, n: usize| {
        let manifests = (0..n)
            .map(|i| cm(&ns, &format!("c{i}"), json!({"i": i.to_string()})))
            .collect();
        work(name, 1, manifests)
    };
    // Over the 5,000-manifest limit: refused whole, with a reason that says so.
    a.upsert(&many("w-10000", 10_000));
    let st = a
        .wait("w-10000", "refused", |u| {
            find(&u.status.conditions, "Applied").is_some_and(|c| c.status == "False")
        })
        .await;
    let c = find(&st.status.conditions, "Applied").unwrap();
    assert_eq!(c.reason, "TooManyManifests", "{c:?}");
    assert!(c.message.contains("10000 manifests"), "{}", c.message);
    assert!(get_cm(&a.client, &ns, "c0").await.is_none(), "nothing applied");

    // Past the size at which the record's intent annotation used to overflow (about 3,000).
    a.upsert(&many("w-3500", 3_500));
    let st = a.wait_applied("w-3500", 1).await;
    assert!(get_cm(&a.client, &ns, "c3499").await.is_some());
    let record = a.amw_api().get(&a.amw_name("w-3500")).await.unwrap();
    let listed = record.status.map(|s| s.applied_resources.len()).unwrap_or(0);
    assert_eq!(listed, 3_500, "every object is recorded");
    // The status would be megabytes: it is summarised, not dropped.
    let size = serde_json::to_vec(&st.status).unwrap().len();
    assert!(size <= 1024 * 1024, "status of {size} bytes");
    a.stop().await;
}

/// Creates ConfigMap `name` in `ns` as someone other than the agent would (its own field manager).
async fn create_foreign_cm(client: &Client, ns: &str, name: &str) -> String {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pp = PostParams {
        field_manager: Some("someone-else".into()),
        ..Default::default()
    };
    let made = cms
        .create(
            &pp,
            &serde_json::from_value(cm(ns, name, json!({"k": "theirs"}))).unwrap(),
        )
        .await
        .unwrap();
    made.metadata.uid.unwrap()
}

#[tokio::test]
async fn a_pre_existing_config_map_is_adopted_then_released_not_deleted() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "adopt").await;
    let pruned_uid = create_foreign_cm(&a.client, &ns, "pre-pruned").await;
    let deleted_uid = create_foreign_cm(&a.client, &ns, "pre-deleted").await;
    let w = |generation, names: &[&str]| {
        work(
            "w-adopt",
            generation,
            names.iter().map(|n| cm(&ns, n, json!({"k": "ours"}))).collect(),
        )
    };
    a.upsert(&w(1, &["pre-pruned", "pre-deleted", "new"]));
    a.wait_applied("w-adopt", 1).await;
    let record = a.amw_api().get(&a.amw_name("w-adopt")).await.unwrap();
    let adopted = spokelet::work::applied_work::adopted_uids(&record);
    assert!(
        adopted.contains(&pruned_uid) && adopted.contains(&deleted_uid),
        "{adopted:?}"
    );
    assert_eq!(
        adopted.len(),
        2,
        "the object the work created is not adopted: {adopted:?}"
    );

    // Dropped from the work: released, not deleted.
    a.upsert(&w(2, &["pre-deleted", "new"]));
    a.wait_applied("w-adopt", 2).await;
    let released = get_cm(&a.client, &ns, "pre-pruned")
        .await
        .expect("adopted object kept");
    assert_eq!(released.metadata.uid.as_deref(), Some(pruned_uid.as_str()));
    assert!(
        released
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .is_empty()
    );
    assert!(!released.labels().contains_key("work.spokelet.io/managed"));

    // The work deleted: what it created goes, what it adopted stays.
    a.delete("w-adopt");
    a.wait("w-adopt", "Deleted=True", |u| u.deleted).await;
    cm_gone(&a.client, &ns, "new", "the object the work created").await;
    let kept = get_cm(&a.client, &ns, "pre-deleted")
        .await
        .expect("adopted object kept");
    assert_eq!(kept.metadata.uid.as_deref(), Some(deleted_uid.as_str()));
    a.stop().await;
}

#[tokio::test]
async fn with_the_reference_behaviour_an_adopted_object_is_deleted_with_its_work() {
    let hub = unique_name("hub");
    let mut cfg = test_config(&hub);
    cfg.release_adopted = false;
    let mut a = Agent::start_with(&hub, cfg).await;
    a.synced();
    let ns = namespace(&a.client, "adopt-ref").await;
    create_foreign_cm(&a.client, &ns, "pre").await;
    a.upsert(&work(
        "w-adopt-ref",
        1,
        vec![cm(&ns, "pre", json!({"k": "ours"}))],
    ));
    a.wait_applied("w-adopt-ref", 1).await;
    a.delete("w-adopt-ref");
    a.wait("w-adopt-ref", "Deleted=True", |u| u.deleted).await;
    cm_gone(
        &a.client,
        &ns,
        "pre",
        "the adopted object, deleted as OCM's agent does",
    )
    .await;
    a.stop().await;
}

#[tokio::test]
async fn a_record_write_from_a_stale_copy_fails_instead_of_dropping_anothers_entries() {
    use spokelet::work::applied_work::{self, RecordIdentity};
    use spokelet::work::manifestwork::{AppliedManifestResourceMeta, AppliedManifestWorkSpec};
    let client = shared_spoke().await.client();
    applied_work::install_crd(&client).await.unwrap();
    let api: Api<AppliedManifestWork> = Api::all(client.clone());
    let name = unique_name("record-precondition");
    let spec = AppliedManifestWorkSpec {
        hub_hash: "h".into(),
        agent_id: "a".into(),
        manifest_work_name: name.clone(),
    };
    let identity = RecordIdentity {
        delete_option: None,
        hub_uid: "",
        executor: None,
    };
    let entry = |n: &str| AppliedManifestResourceMeta {
        group: String::new(),
        resource: "configmaps".into(),
        name: n.into(),
        namespace: "default".into(),
        version: "v1".into(),
        uid: String::new(),
    };
    let mut mine = None;
    applied_work::open(&api, &name, spec, identity, &[], &mut mine)
        .await
        .unwrap();
    // Another writer records an entry from its own fresh copy.
    let mut theirs = mine.clone();
    applied_work::write_and_cache(&api, &name, &[entry("theirs")], &mut theirs)
        .await
        .unwrap();
    // Our copy is stale now: the write is refused, and forgets the copy so the next read is fresh.
    let stale = applied_work::write_and_cache(&api, &name, &[entry("mine")], &mut mine).await;
    assert!(stale.is_err(), "a stale write went through");
    assert!(mine.is_none());
    let now = api.get(&name).await.unwrap();
    assert_eq!(
        applied_work::resources(&now),
        vec![entry("theirs")],
        "nothing of the other writer's was lost"
    );
    applied_work::delete(&api, &name).await.unwrap();
}

#[tokio::test]
async fn records_under_another_spelling_of_the_hub_address_are_adopted() {
    use spokelet::work::applied_work::{applied_name, hub_hash_of_address, legacy_hub_hash};
    let host = unique_name("hub");
    // An earlier agent hashed the address as written.
    let spelling = format!("https://{host}/");
    let mut old = Agent::start(&spelling).await;
    let ns = namespace(&old.client, "respelt").await;
    let w = work("w-respelt", 1, vec![cm(&ns, "c", json!({"k": "v"}))]);
    old.upsert(&w);
    old.wait_applied("w-respelt", 1).await;
    let uid = get_cm(&old.client, &ns, "c").await.unwrap().metadata.uid;
    let old_record = old.amw_name("w-respelt");
    old.stop().await;

    // This agent hashes the normalised address and adopts the old records.
    let mut cfg = test_config(&spelling);
    cfg.hub_hash = hub_hash_of_address(&spelling);
    cfg.legacy_hub_hashes = legacy_hub_hash(&spelling).into_iter().collect();
    assert_eq!(cfg.legacy_hub_hashes.len(), 1);
    let new_record = applied_name(&cfg.hub_hash, "w-respelt");
    let mut a = Agent::start_with(&spelling, cfg).await;
    a.upsert(&w);
    a.synced();
    a.wait_applied("w-respelt", 1).await;
    assert_eq!(get_cm(&a.client, &ns, "c").await.unwrap().metadata.uid, uid);
    assert!(
        a.amw_api().get_opt(&new_record).await.unwrap().is_none(),
        "no second record"
    );
    assert!(a.amw_api().get_opt(&old_record).await.unwrap().is_some());
    // And it cleans up through the adopted record.
    a.delete("w-respelt");
    a.wait("w-respelt", "Deleted=True", |u| u.deleted).await;
    cm_gone(&a.client, &ns, "c", "the work's object").await;
    a.stop().await;
}

#[tokio::test]
async fn an_executor_writes_with_its_own_rights_and_the_api_server_refuses_what_it_may_not() {
    let hub = unique_name("hub");
    let mut a = Agent::start_with(&hub, config_with_executors(&hub).await).await;
    a.synced();
    let ns = namespace(&a.client, "executor").await;
    // The executor may manage ConfigMaps in its namespace, and nothing else.
    let setup = configmap_executor(&ns, "deployer", &["*"]);
    a.upsert(&work("w-setup", 1, setup));
    a.wait_applied("w-setup", 1).await;

    let binding = unique_name("deployer-admin");
    let mut w = work(
        "w-exec",
        1,
        vec![
            cm(&ns, "allowed", json!({"k": "v"})),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": binding},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                   "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}]}),
        ],
    );
    w.spec.executor = serde_json::from_value(json!(
        {"subject": {"type": "ServiceAccount", "serviceAccount": {"namespace": ns, "name": "deployer"}}}
    ))
    .unwrap();
    a.upsert(&w);
    let st = a
        .wait("w-exec", "both manifests tried", |u| {
            manifest_cond_opt(u, 0, "Applied").is_some() && manifest_cond_opt(u, 1, "Applied").is_some()
        })
        .await;
    assert_eq!(manifest_cond(&st, 0, "Applied").status, "True", "{:?}", st.status);
    let refused = manifest_cond(&st, 1, "Applied");
    assert_eq!(refused.status, "False");
    assert_eq!(
        refused.reason, "Forbidden",
        "the API server's own reason: {refused:?}"
    );
    assert!(
        refused.message.contains("system:serviceaccount:"),
        "{}",
        refused.message
    );
    let crbs = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(a.client.clone());
    assert!(
        crbs.get_opt(&binding).await.unwrap().is_none(),
        "nothing bound with the agent's rights"
    );
    a.stop().await;
}

#[tokio::test]
async fn after_a_restart_a_work_known_only_from_its_record_is_deleted_as_its_executor() {
    let hub = unique_name("hub");
    let mut a = Agent::start_with(&hub, config_with_executors(&hub).await).await;
    a.synced();
    let ns = namespace(&a.client, "exec-restart").await;
    // The executor may write ConfigMaps in its namespace but not delete them.
    let setup = configmap_executor(
        &ns,
        "writer",
        &["get", "list", "watch", "create", "update", "patch"],
    );
    let setup = work("w-exec-setup", 1, setup);
    a.upsert(&setup);
    a.wait_applied("w-exec-setup", 1).await;
    let mut w = work("w-exec-gone", 1, vec![cm(&ns, "kept", json!({"k": "v"}))]);
    w.spec.executor = serde_json::from_value(json!(
        {"subject": {"type": "ServiceAccount", "serviceAccount": {"namespace": ns, "name": "writer"}}}
    ))
    .unwrap();
    a.upsert(&w);
    a.wait_applied("w-exec-gone", 1).await;
    let record = a.amw_api().get(&a.amw_name("w-exec-gone")).await.unwrap();
    assert_eq!(
        applied_work::recorded_executor(&record),
        Some(format!("system:serviceaccount:{ns}:writer").as_str())
    );
    a.stop().await;

    // The hub no longer has the work: the next agent knows it only from its record.
    let mut b = Agent::start_with(&hub, config_with_executors(&hub).await).await;
    b.upsert(&setup);
    b.synced();
    let st = b
        .wait("w-exec-gone", "its deletion refused to the executor", |u| {
            find(&u.status.conditions, "Deleting").is_some_and(|c| c.reason == "DeletionFailed")
        })
        .await;
    let failed = find(&st.status.conditions, "Deleting").unwrap();
    assert!(
        failed.message.contains("system:serviceaccount:") && failed.message.contains("forbidden"),
        "the API server refused the executor: {}",
        failed.message
    );
    assert!(
        get_cm(&b.client, &ns, "kept").await.is_some(),
        "never deleted with the agent's own rights"
    );
    b.stop().await;
}

#[tokio::test]
async fn without_a_way_to_impersonate_a_work_with_an_executor_is_not_applied_at_all() {
    let mut a = Agent::start(&unique_name("hub")).await;
    let ns = namespace(&a.client, "no-executor").await;
    let mut w = work("w-noexec", 1, vec![cm(&ns, "c", json!({"k": "v"}))]);
    w.spec.executor = serde_json::from_value(json!(
        {"subject": {"type": "ServiceAccount", "serviceAccount": {"namespace": ns, "name": "deployer"}}}
    ))
    .unwrap();
    a.upsert(&w);
    let st = a
        .wait("w-noexec", "refused", |u| {
            find(&u.status.conditions, "Applied").is_some_and(|c| c.status == "False")
        })
        .await;
    assert_eq!(
        find(&st.status.conditions, "Applied").unwrap().reason,
        "ExecutorUnusable"
    );
    assert!(get_cm(&a.client, &ns, "c").await.is_none());
    a.stop().await;
}
