//! The floors the engine is measured against, sent raw in the same run: the raw-create floor
//! (the objects' creates and nothing else) and the OCM-shaped floor (what any agent keeping
//! OCM's record and watching for drift must send).

use std::time::Duration;

/// The resource of a built-in object from its apiVersion and kind (plural as kube guesses it).
pub fn resource_of(obj: &serde_json::Value) -> kube::api::ApiResource {
    let api_version = obj["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().unwrap_or("");
    kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind))
}

/// Creates one object through the API as `field_manager`; returns its UID. Panics on failure
/// (a benchmark whose floor fails measures nothing).
async fn create_raw(client: &kube::Client, obj: serde_json::Value, field_manager: Option<&str>) -> String {
    let ar = resource_of(&obj);
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
    let o: kube::api::DynamicObject =
        serde_json::from_value(obj).unwrap_or_else(|e| panic!("not an object: {e}"));
    let pp = kube::api::PostParams {
        dry_run: false,
        field_manager: field_manager.map(String::from),
    };
    let made = kube::Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
        .create(&pp, &o)
        .await
        .unwrap_or_else(|e| panic!("floor create failed: {e}"));
    made.metadata.uid.unwrap_or_default()
}

/// The raw-create floor: `objects` created straight through the API, `concurrency` at a time,
/// and nothing else.
pub async fn raw_creates(client: &kube::Client, objects: Vec<serde_json::Value>, concurrency: usize) {
    use futures::StreamExt;
    futures::stream::iter(objects)
        .for_each_concurrent(concurrency, |o| async move {
            create_raw(client, o, None).await;
        })
        .await;
}

/// Label of the objects the OCM-shaped floor creates (not the agent's, so its watches never
/// see them).
const OCM_FLOOR_LABEL: &str = "bench.spokelet.io/ocm-floor";

/// The OCM-shaped floor: the requests any agent keeping OCM's AppliedManifestWork record and
/// correcting drift by watch must send, sent raw and nothing else. Per work (one entry of
/// `works`, `concurrency` works at a time): the record created with its intent, the work's
/// objects created one after another, labelled and owned by it, then the record's status
/// written with their UIDs; meanwhile a label-selected watch is open on each kind. The
/// AppliedManifestWork CRD must be installed; records are named `<record_prefix>-<i>`.
pub async fn ocm_shaped_floor(
    client: &kube::Client,
    works: Vec<Vec<serde_json::Value>>,
    record_prefix: &str,
    concurrency: usize,
) {
    use futures::StreamExt;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut kinds: Vec<kube::api::ApiResource> = works.iter().flatten().map(resource_of).collect();
    kinds.sort_by(|a, b| (&a.group, &a.plural).cmp(&(&b.group, &b.plural)));
    kinds.dedup_by(|a, b| a.group == b.group && a.plural == b.plural);
    for ar in kinds {
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &ar);
        let stop = stop.clone();
        tokio::spawn(async move {
            let wp = kube::api::WatchParams::default().labels(OCM_FLOOR_LABEL);
            let Ok(events) = api.watch(&wp, "0").await else {
                return;
            };
            let mut events = events.boxed();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.next() => if e.is_none() { return },
                }
            }
        });
    }
    // Let the watches open before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = kube::api::ApiResource {
        group: "work.open-cluster-management.io".into(),
        version: "v1".into(),
        api_version: "work.open-cluster-management.io/v1".into(),
        kind: "AppliedManifestWork".into(),
        plural: "appliedmanifestworks".into(),
    };
    let records: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &records);
    futures::stream::iter(works.into_iter().enumerate())
        .for_each_concurrent(concurrency, |(i, objects)| {
            let records = records.clone();
            async move { ocm_floor_work(client, &records, &format!("{record_prefix}-{i}"), objects).await }
        })
        .await;
    stop.cancel();
}

/// One work of [`ocm_shaped_floor`].
async fn ocm_floor_work(
    client: &kube::Client,
    records: &kube::Api<kube::api::DynamicObject>,
    name: &str,
    objects: Vec<serde_json::Value>,
) {
    use serde_json::json;
    let entries: Vec<serde_json::Value> = objects
        .iter()
        .map(|o| {
            let ar = resource_of(o);
            json!({"group": ar.group, "version": ar.version, "resource": ar.plural,
                "namespace": o["metadata"]["namespace"], "name": o["metadata"]["name"]})
        })
        .collect();
    let record: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "work.open-cluster-management.io/v1", "kind": "AppliedManifestWork",
        "metadata": {"name": name,
            "annotations": {"work.spokelet.io/intended-resources": serde_json::to_string(&entries).unwrap_or_default()}},
        "spec": {"hubHash": "ocm-floor", "manifestWorkName": name, "agentID": "bench"}}))
    .unwrap_or_else(|e| panic!("not a record: {e}"));
    let record = records
        .create(&kube::api::PostParams::default(), &record)
        .await
        .unwrap_or_else(|e| panic!("floor record create failed: {e}"));
    let owner = json!([{"apiVersion": "work.open-cluster-management.io/v1", "kind": "AppliedManifestWork",
        "name": name, "uid": record.metadata.uid}]);
    let mut status = Vec::with_capacity(entries.len());
    for (mut o, mut entry) in objects.into_iter().zip(entries) {
        o["metadata"]["labels"] = json!({OCM_FLOOR_LABEL: "true"});
        o["metadata"]["ownerReferences"] = owner.clone();
        entry["uid"] = json!(create_raw(client, o, Some("ocm-floor")).await);
        status.push(entry);
    }
    records
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"appliedResources": status}})),
        )
        .await
        .unwrap_or_else(|e| panic!("floor record status write failed: {e}"));
}
