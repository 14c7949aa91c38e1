//! The CloudEvents codec for whole Kubernetes objects, as OCM's gRPC registration carries them
//! (ManagedClusters, leases, certificate signing requests): each event holds one object as
//! JSON, named by `resourceid` (its name) and `resourceversion` (its Kubernetes
//! resourceVersion). Pure, no IO; the work codec is [`super::cloudevents`].

use serde_json::Value;
use spokelet_proto::{CloudEvent, HEARTBEAT};

use super::cloudevents::{
    CodecError, SpecResyncBody, action, base_event, check_cluster, ext, payload, string_attr,
};

/// What the hub said of one object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectEvent {
    /// `spec` or `status`.
    pub subresource: String,
    /// `create_request`, `update_request`, `delete_request`, `resync_response`.
    pub action: String,
    /// The object, as the hub has it.
    pub object: Value,
}

impl ObjectEvent {
    /// The object's `metadata.name` ("" when missing).
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// Whether the hub says the object is gone.
    pub fn deleted(&self) -> bool {
        self.action == action::DELETE
    }
}

/// Decodes a hub event of `data_type` for cluster `ours`; `None` for a heartbeat.
pub fn decode_object(
    ev: &CloudEvent,
    data_type: &str,
    ours: &str,
) -> Result<Option<ObjectEvent>, CodecError> {
    if ev.r#type == HEARTBEAT {
        return Ok(None);
    }
    let (subresource, act) = ev
        .r#type
        .strip_prefix(data_type)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.split_once('.'))
        .ok_or_else(|| CodecError::UnknownType(ev.r#type.clone()))?;
    check_cluster(ev, ours)?;
    let bytes = payload(ev)?.ok_or(CodecError::NoData)?;
    let object: Value = serde_json::from_slice(bytes).map_err(|source| CodecError::Json {
        what: "object",
        source,
    })?;
    if !object.is_object() {
        return Err(CodecError::Json {
            what: "object",
            source: serde::de::Error::custom("not a JSON object"),
        });
    }
    Ok(Some(ObjectEvent {
        subresource: subresource.to_string(),
        action: act.to_string(),
        object,
    }))
}

/// `<data_type>.<subresource>.<action>` carrying `object` whole, from `source`, with
/// `clustername`, `resourceid` (the object's name) and, when it has one, `resourceversion`
/// (OCM's hub writes the object back with it: an update on an old version is refused).
pub fn object_event(
    source: &str,
    cluster: &str,
    data_type: &str,
    subresource: &str,
    act: &str,
    object: &Value,
) -> CloudEvent {
    // Serialising a JSON value cannot fail.
    let data = serde_json::to_vec(object).unwrap_or_default();
    let mut ev = base_event(source, format!("{data_type}.{subresource}.{act}"), data);
    let a = &mut ev.attributes;
    a.insert(format!("ce-{}", ext::CLUSTER_NAME), string_attr(cluster));
    let meta = &object["metadata"];
    if let Some(name) = meta["name"].as_str() {
        a.insert(format!("ce-{}", ext::RESOURCE_ID), string_attr(name));
    }
    if let Some(rv) = meta["resourceVersion"].as_str().filter(|v| !v.is_empty()) {
        a.insert(format!("ce-{}", ext::RESOURCE_VERSION), string_attr(rv));
    }
    ev
}

/// `<data_type>.spec.resync_request` holding nothing: the hub answers with every object of
/// the type it has for the cluster.
pub fn list_request(source: &str, cluster: &str, data_type: &str) -> CloudEvent {
    let body = SpecResyncBody {
        resource_versions: Vec::new(),
    };
    let data = serde_json::to_vec(&body).unwrap_or_default();
    let mut ev = base_event(
        source,
        format!("{data_type}.spec.{}", action::RESYNC_REQUEST),
        data,
    );
    ev.attributes
        .insert(format!("ce-{}", ext::CLUSTER_NAME), string_attr(cluster));
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use spokelet_proto::{Attr, Data};

    const CLUSTERS: &str = spokelet_proto::MANAGED_CLUSTERS;

    #[test]
    fn an_object_goes_out_whole_named_by_its_name_and_version() {
        let mc = json!({"metadata": {"name": "pool-a", "resourceVersion": "42"}, "spec": {}});
        let ev = object_event("pool-a", "pool-a", CLUSTERS, "status", action::UPDATE, &mc);
        assert_eq!(ev.r#type, format!("{CLUSTERS}.status.update_request"));
        let attr = |k: &str| match ev.attributes[k].attr.as_ref() {
            Some(Attr::CeString(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(attr("ce-resourceid"), "pool-a");
        assert_eq!(attr("ce-resourceversion"), "42");
        assert_eq!(attr("ce-clustername"), "pool-a");
        let Some(Data::BinaryData(data)) = &ev.data else {
            panic!("binary data")
        };
        assert_eq!(serde_json::from_slice::<Value>(data).unwrap(), mc);
        // Read back as the hub would send it.
        let back = decode_object(&ev, CLUSTERS, "pool-a").unwrap().unwrap();
        assert_eq!((back.name(), back.deleted()), ("pool-a", false));
    }

    #[test]
    fn events_of_another_type_cluster_or_shape_are_refused() {
        let mc = json!({"metadata": {"name": "pool-a"}});
        let ev = object_event("kube", "pool-b", CLUSTERS, "spec", action::UPDATE, &mc);
        assert!(matches!(
            decode_object(&ev, CLUSTERS, "pool-a"),
            Err(CodecError::WrongCluster { .. })
        ));
        assert!(matches!(
            decode_object(&ev, spokelet_proto::LEASES, "pool-b"),
            Err(CodecError::UnknownType(_))
        ));
        let list = object_event("kube", "pool-a", CLUSTERS, "spec", action::UPDATE, &json!([1]));
        assert!(matches!(
            decode_object(&list, CLUSTERS, "pool-a"),
            Err(CodecError::Json { .. })
        ));
        let mut heartbeat = ev.clone();
        heartbeat.r#type = HEARTBEAT.to_string();
        assert!(decode_object(&heartbeat, CLUSTERS, "pool-a").unwrap().is_none());
    }

    #[test]
    fn a_list_request_holds_no_versions() {
        let ev = list_request("agent", "pool-a", spokelet_proto::LEASES);
        assert_eq!(ev.r#type, "coordination.k8s.io.v1.leases.spec.resync_request");
        let Some(Data::BinaryData(data)) = &ev.data else {
            panic!("binary data")
        };
        assert_eq!(
            serde_json::from_slice::<Value>(data).unwrap(),
            json!({"resourceVersions": []})
        );
    }
}
