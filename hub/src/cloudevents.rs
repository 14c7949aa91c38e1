//! The CloudEvents codec for ManifestWorks: hub spec events in, status and resync events out (pure, no IO).
//!
//! Attribute binding as the reference implementation writes it: extensions and optional context
//! attributes are keyed `ce-<name>`, the content type is keyed `contenttype`, JSON travels in
//! `binary_data` (we also accept `text_data`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spokelet_proto::{
    Attr, CloudEvent, CloudEventAttributeValue, Data, HEARTBEAT, MANIFEST_BUNDLES, SPEC_VERSION,
};

use spokelet_work_api::manifestwork::{
    ManifestBundle, ManifestBundleStatus, ManifestWork, ManifestWorkStatus,
};

/// Extension attribute names (without the `ce-` prefix).
pub mod ext {
    /// The work's UID.
    pub const RESOURCE_ID: &str = "resourceid";
    /// The work's generation.
    pub const RESOURCE_VERSION: &str = "resourceversion";
    /// The cluster the event is for / from.
    pub const CLUSTER_NAME: &str = "clustername";
    /// The source that created the work.
    pub const ORIGINAL_SOURCE: &str = "originalsource";
    /// Present when the work is being deleted.
    pub const DELETION_TIMESTAMP: &str = "deletiontimestamp";
    /// Monotonic id of a status update.
    pub const SEQUENCE_ID: &str = "sequenceid";
    /// Hex SHA-256 of the status JSON.
    pub const STATUS_HASH: &str = "statushash";
    /// The work's ObjectMeta as a JSON string.
    pub const METADATA: &str = "metadata";
    /// Event time (an optional context attribute, prefixed like the extensions).
    pub const TIME: &str = "time";
}

/// Key of the data content type attribute (not prefixed).
pub const CONTENT_TYPE_KEY: &str = "contenttype";
/// The only content type we send, and the one we expect.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Largest payload we accept: the reference servers' 4 MiB message limit. Larger payloads could
/// not have come from a conforming hub and are refused before JSON parsing.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// Event-type actions.
pub mod action {
    /// Create a work.
    pub const CREATE: &str = "create_request";
    /// Update a work.
    pub const UPDATE: &str = "update_request";
    /// Delete a work.
    pub const DELETE: &str = "delete_request";
    /// Ask the other side to resend.
    pub const RESYNC_REQUEST: &str = "resync_request";
    /// Answer to a resync request.
    pub const RESYNC_RESPONSE: &str = "resync_response";
}

/// `<data type>.<subresource>.<action>`.
pub fn event_type(subresource: &str, action: &str) -> String {
    format!("{MANIFEST_BUNDLES}.{subresource}.{action}")
}

/// Why an event could not be decoded. None of these stops the stream.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// An event type we do not handle.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// A required attribute is missing.
    #[error("missing attribute ce-{0}")]
    Missing(&'static str),
    /// An attribute has the wrong type or an unparsable value.
    #[error("attribute ce-{name}: {reason}")]
    BadAttribute {
        /// Attribute name without prefix.
        name: &'static str,
        /// What is wrong, naming the value's kind but never its contents.
        reason: String,
    },
    /// The event is for another cluster.
    #[error("event for cluster {got:?}, not ours ({ours:?})")]
    WrongCluster {
        /// Cluster named in the event.
        got: String,
        /// The cluster this agent serves.
        ours: String,
    },
    /// The payload exceeds [`MAX_PAYLOAD`].
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// [`MAX_PAYLOAD`], in bytes.
        limit: usize,
    },
    /// No payload where one is needed.
    #[error("event has no data")]
    NoData,
    /// A payload kind we cannot read (`proto_data`).
    #[error("unsupported data encoding: {0}")]
    UnsupportedData(&'static str),
    /// A content type other than JSON.
    #[error("unsupported content type {0:?}")]
    ContentType(String),
    /// The payload is not the expected JSON.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// What was being parsed.
        what: &'static str,
        /// Underlying error (position and kind; never echoes the payload).
        #[source]
        source: serde_json::Error,
    },
}

/// A spec change from the hub.
#[derive(Debug, Clone)]
pub struct SpecEvent {
    /// The work's UID (`resourceid`).
    pub resource_id: String,
    /// The work's generation (`resourceversion`; 0 when absent).
    pub resource_version: i64,
    /// Who created the work: `originalsource`, else the event's `source`.
    pub original_source: String,
    /// The work name from `metadata`, if it was there.
    pub name: Option<String>,
    /// Delete request, or a create/update carrying `deletiontimestamp`.
    pub deleted: bool,
    /// The work, for create/update (None for deletes); boxed as the engine takes it.
    pub work: Option<Box<ManifestWork>>,
}

/// One `statusHashes` entry of a status resync request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusHash {
    /// The work's UID (`resourceid`).
    #[serde(rename = "resourceID")]
    pub resource_id: String,
    /// The hash the hub holds.
    #[serde(rename = "statusHash")]
    pub status_hash: String,
}

/// What a hub event means.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Create, update or delete a work.
    Spec(SpecEvent),
    /// The hub asks for statuses whose hash differs from these (empty: all).
    StatusResync(Vec<StatusHash>),
    /// Liveness only.
    Heartbeat,
}

/// The subset of ObjectMeta that travels in the `metadata` extension. Other fields are ignored
/// rather than rejected, so a hub sending full ObjectMeta (with timestamps, managedFields) is fine.
/// The fields are ObjectMeta's; empty ones are left out of the JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct WireMeta {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The cluster namespace on the hub.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub generation: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Attribute lookup by extension name.
fn attr<'a>(ev: &'a CloudEvent, name: &str) -> Option<&'a Attr> {
    ev.attributes
        .get(&format!("ce-{name}"))
        .and_then(|v| v.attr.as_ref())
}

/// A string-ish attribute.
pub(crate) fn attr_string(ev: &CloudEvent, name: &'static str) -> Result<Option<String>, CodecError> {
    match attr(ev, name) {
        None => Ok(None),
        Some(Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s)) => Ok(Some(s.clone())),
        Some(Attr::CeInteger(i)) => Ok(Some(i.to_string())),
        Some(other) => Err(CodecError::BadAttribute {
            name,
            reason: format!("expected a string, got {}", kind(other)),
        }),
    }
}

/// An integer attribute (sent as `ce_integer`, or as a decimal string by some encoders).
fn attr_int(ev: &CloudEvent, name: &'static str) -> Result<Option<i64>, CodecError> {
    match attr(ev, name) {
        None => Ok(None),
        Some(Attr::CeInteger(i)) => Ok(Some(i64::from(*i))),
        Some(Attr::CeString(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|e| CodecError::BadAttribute {
                name,
                reason: format!("not an integer: {e}"),
            }),
        Some(other) => Err(CodecError::BadAttribute {
            name,
            reason: format!("expected an integer, got {}", kind(other)),
        }),
    }
}

/// Names an attribute value's kind for error messages (never its contents).
fn kind(a: &Attr) -> &'static str {
    match a {
        Attr::CeBoolean(_) => "boolean",
        Attr::CeInteger(_) => "integer",
        Attr::CeString(_) => "string",
        Attr::CeBytes(_) => "bytes",
        Attr::CeUri(_) => "uri",
        Attr::CeUriRef(_) => "uri-ref",
        Attr::CeTimestamp(_) => "timestamp",
    }
}

/// The JSON payload bytes, size-checked.
pub(crate) fn payload(ev: &CloudEvent) -> Result<Option<&[u8]>, CodecError> {
    if let Some(ct) = ev.attributes.get(CONTENT_TYPE_KEY).and_then(|v| v.attr.as_ref()) {
        let Attr::CeString(ct) = ct else {
            return Err(CodecError::ContentType(kind(ct).to_string()));
        };
        let base = ct.split(';').next().unwrap_or("").trim();
        if !(base.is_empty() || base == CONTENT_TYPE_JSON || base.ends_with("+json")) {
            return Err(CodecError::ContentType(ct.clone()));
        }
    }
    let bytes: &[u8] = match &ev.data {
        None => return Ok(None),
        Some(Data::BinaryData(b)) => b,
        Some(Data::TextData(t)) => t.as_bytes(),
        Some(Data::ProtoData(_)) => return Err(CodecError::UnsupportedData("proto_data")),
    };
    if bytes.len() > MAX_PAYLOAD {
        return Err(CodecError::TooLarge {
            size: bytes.len(),
            limit: MAX_PAYLOAD,
        });
    }
    Ok(if bytes.is_empty() { None } else { Some(bytes) })
}

/// The work name an event's `metadata` extension gives, read leniently (for an event that
/// failed to decode: its name is what its status and the spoke's record are found by).
pub fn identify_name(ev: &CloudEvent) -> Option<String> {
    let text = attr_string(ev, ext::METADATA).ok().flatten()?;
    let meta: WireMeta = serde_json::from_str(&text).ok()?;
    Some(meta.name).filter(|n| !n.is_empty())
}

/// Resource id and version of an event, for reporting an event that failed to decode.
pub fn identify(ev: &CloudEvent) -> Option<(String, i64)> {
    let id = attr_string(ev, ext::RESOURCE_ID)
        .ok()
        .flatten()
        .filter(|s| !s.is_empty())?;
    let version = attr_int(ev, ext::RESOURCE_VERSION).ok().flatten().unwrap_or(0);
    Some((id, version))
}

/// Decodes a hub event for cluster `ours`.
pub fn decode(ev: &CloudEvent, ours: &str) -> Result<Incoming, CodecError> {
    if ev.r#type == HEARTBEAT {
        return Ok(Incoming::Heartbeat);
    }
    let Some(rest) = ev
        .r#type
        .strip_prefix(MANIFEST_BUNDLES)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return Err(CodecError::UnknownType(ev.r#type.clone()));
    };
    match rest.split_once('.') {
        Some(("spec", a @ (action::CREATE | action::UPDATE | action::DELETE))) => {
            decode_spec(ev, ours, a).map(Incoming::Spec)
        }
        Some(("status", action::RESYNC_REQUEST)) => {
            check_cluster(ev, ours)?;
            decode_status_resync(ev).map(Incoming::StatusResync)
        }
        _ => Err(CodecError::UnknownType(ev.r#type.clone())),
    }
}

/// Refuses events naming another cluster. Events without the attribute were routed to us by the
/// subscription, so they are accepted.
pub(crate) fn check_cluster(ev: &CloudEvent, ours: &str) -> Result<(), CodecError> {
    match attr_string(ev, ext::CLUSTER_NAME)? {
        Some(c) if c != ours => Err(CodecError::WrongCluster {
            got: c,
            ours: ours.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Decodes create/update/delete.
fn decode_spec(ev: &CloudEvent, ours: &str, act: &str) -> Result<SpecEvent, CodecError> {
    check_cluster(ev, ours)?;
    let resource_id = attr_string(ev, ext::RESOURCE_ID)?
        .filter(|s| !s.is_empty())
        .ok_or(CodecError::Missing(ext::RESOURCE_ID))?;
    let resource_version = attr_int(ev, ext::RESOURCE_VERSION)?.unwrap_or(0);
    let original_source = attr_string(ev, ext::ORIGINAL_SOURCE)?.unwrap_or_else(|| ev.source.clone());
    let meta: WireMeta = match attr_string(ev, ext::METADATA)? {
        Some(m) if !m.trim().is_empty() => serde_json::from_str(&m).map_err(|source| CodecError::Json {
            what: "metadata",
            source,
        })?,
        _ => WireMeta::default(),
    };
    let name = (!meta.name.is_empty()).then(|| meta.name.clone());
    let deleted = act == action::DELETE || attr(ev, ext::DELETION_TIMESTAMP).is_some();
    if deleted {
        // The payload of a delete is not needed; it is not even parsed, so a delete always goes through.
        return Ok(SpecEvent {
            resource_id,
            resource_version,
            original_source,
            name,
            deleted,
            work: None,
        });
    }
    let data = payload(ev)?.ok_or(CodecError::NoData)?;
    let bundle: ManifestBundle = serde_json::from_slice(data).map_err(|source| CodecError::Json {
        what: "manifest bundle",
        source,
    })?;
    let mut work = ManifestWork::new(name.as_deref().unwrap_or(&resource_id), bundle.into_spec());
    let md = &mut work.metadata;
    md.namespace = Some(if meta.namespace.is_empty() {
        ours.to_string()
    } else {
        meta.namespace
    });
    md.uid = Some(resource_id.clone());
    md.generation = Some(resource_version);
    if !meta.labels.is_empty() {
        md.labels = Some(meta.labels);
    }
    if !meta.annotations.is_empty() {
        md.annotations = Some(meta.annotations);
    }
    Ok(SpecEvent {
        resource_id,
        resource_version,
        original_source,
        name,
        deleted: false,
        work: Some(Box::new(work)),
    })
}

/// Body of `status.resync_request`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StatusResyncBody {
    /// Hashes the hub holds.
    #[serde(rename = "statusHashes", default)]
    status_hashes: Vec<StatusHash>,
}

/// Decodes a status resync request; no payload means "send everything".
fn decode_status_resync(ev: &CloudEvent) -> Result<Vec<StatusHash>, CodecError> {
    match payload(ev)? {
        None => Ok(Vec::new()),
        Some(d) => serde_json::from_slice::<StatusResyncBody>(d)
            .map(|b| b.status_hashes)
            .map_err(|source| CodecError::Json {
                what: "status resync request",
                source,
            }),
    }
}

/// One `resourceVersions` entry of a spec resync request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceVersion {
    /// The work's UID (`resourceid`).
    #[serde(rename = "resourceID")]
    pub resource_id: String,
    /// Generation we hold.
    #[serde(rename = "resourceVersion")]
    pub resource_version: i64,
}

/// Body of `spec.resync_request`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SpecResyncBody {
    /// What the agent holds.
    #[serde(rename = "resourceVersions", default)]
    pub resource_versions: Vec<ResourceVersion>,
}

/// A random UUID v4 in text form, the event id.
pub fn new_event_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn string_attr(s: impl Into<String>) -> CloudEventAttributeValue {
    CloudEventAttributeValue {
        attr: Some(Attr::CeString(s.into())),
    }
}

/// Integers that fit go as `ce_integer` (the CloudEvents integer type is 32-bit); larger ones as
/// decimal strings, which the reference decoders also accept.
fn int_attr(v: i64) -> CloudEventAttributeValue {
    match i32::try_from(v) {
        Ok(i) => CloudEventAttributeValue {
            attr: Some(Attr::CeInteger(i)),
        },
        Err(_) => string_attr(v.to_string()),
    }
}

fn now_attr() -> CloudEventAttributeValue {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    CloudEventAttributeValue {
        attr: Some(Attr::CeTimestamp(prost_types::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        })),
    }
}

/// An event with the common context attributes.
pub(crate) fn base_event(source: &str, type_: String, data: Vec<u8>) -> CloudEvent {
    let mut attributes = std::collections::HashMap::new();
    attributes.insert(CONTENT_TYPE_KEY.to_string(), string_attr(CONTENT_TYPE_JSON));
    attributes.insert(format!("ce-{}", ext::TIME), now_attr());
    CloudEvent {
        id: new_event_id(),
        source: source.to_string(),
        spec_version: SPEC_VERSION.to_string(),
        r#type: type_,
        attributes,
        data: Some(Data::BinaryData(data)),
    }
}

/// `spec.resync_request` listing the works we hold.
pub fn spec_resync_request(agent_id: &str, cluster: &str, held: Vec<ResourceVersion>) -> CloudEvent {
    let body = SpecResyncBody {
        resource_versions: held,
    };
    // Serialising plain strings and integers cannot fail.
    let data = serde_json::to_vec(&body).unwrap_or_default();
    let mut ev = base_event(agent_id, event_type("spec", action::RESYNC_REQUEST), data);
    ev.attributes
        .insert(format!("ce-{}", ext::CLUSTER_NAME), string_attr(cluster));
    ev
}

/// Which status event to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// A change.
    Update,
    /// An answer to the hub's status resync request.
    ResyncResponse,
}

/// Identity of the work a status is about.
#[derive(Debug, Clone)]
pub struct StatusTarget<'a> {
    /// Our agent id (event source).
    pub agent_id: &'a str,
    /// The `clustername`: this agent's cluster.
    pub cluster: &'a str,
    /// The work's UID, the `resourceid`.
    pub resource_id: &'a str,
    /// Generation the status describes.
    pub resource_version: i64,
    /// The `originalsource` the hub sent with the work (who created it).
    pub original_source: &'a str,
    /// Work metadata for the `metadata` extension.
    pub meta: &'a WireMeta,
    /// From [`SequenceIds::next`], so the hub sees ours increase.
    pub sequence_id: u64,
}

/// A status event with every extension the contract lists.
pub fn status_event(
    kind: StatusKind,
    t: &StatusTarget<'_>,
    status: &ManifestWorkStatus,
    hash: &str,
) -> CloudEvent {
    let data = serde_json::to_vec(&ManifestBundleStatus::from(status)).unwrap_or_default();
    let action = match kind {
        StatusKind::Update => action::UPDATE,
        StatusKind::ResyncResponse => action::RESYNC_RESPONSE,
    };
    let mut ev = base_event(t.agent_id, event_type("status", action), data);
    let meta = serde_json::to_string(t.meta).unwrap_or_default();
    let a = &mut ev.attributes;
    a.insert(format!("ce-{}", ext::RESOURCE_ID), string_attr(t.resource_id));
    a.insert(
        format!("ce-{}", ext::RESOURCE_VERSION),
        int_attr(t.resource_version),
    );
    a.insert(format!("ce-{}", ext::CLUSTER_NAME), string_attr(t.cluster));
    a.insert(
        format!("ce-{}", ext::ORIGINAL_SOURCE),
        string_attr(t.original_source),
    );
    a.insert(
        format!("ce-{}", ext::SEQUENCE_ID),
        string_attr(t.sequence_id.to_string()),
    );
    a.insert(format!("ce-{}", ext::STATUS_HASH), string_attr(hash));
    a.insert(format!("ce-{}", ext::METADATA), string_attr(meta));
    ev
}

/// What a pool report event is about: the ManagedCluster, or one node's inventory.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportBody {
    /// The ManagedCluster's `status` object (claims, capacity, allocatable, version).
    ClusterStatus(serde_json::Value),
    /// One node's NodeInventory document; `None`: the node is gone from the pool.
    Node {
        /// The node's name (the `resourceid`).
        name: String,
        /// The NodeInventory (apiVersion, kind, metadata.name, spec, status).
        document: Option<serde_json::Value>,
    },
}

/// A pool report as it goes on the wire, built once when it is queued: every send of it
/// (the first, and again after a reconnect) carries the same type, resourceid and data.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportPayload {
    /// `...managedclusters.status.update_request`, or `...nodeinventories.status.{update,delete}_request`.
    pub type_: String,
    /// The cluster's or node's name: neither has a hub uid the agent knows.
    pub resource_id: String,
    /// The JSON data.
    pub data: Vec<u8>,
    /// Hex SHA-256 of `data`: the `statushash`, and how a newer report is told from this one.
    pub hash: String,
    /// A node's removal (a `delete_request`).
    pub gone: bool,
}

impl ReportPayload {
    /// `cluster.open-cluster-management.io.v1.managedclusters.status.update_request` carrying the
    /// ManagedCluster (name and status), or spokelet's
    /// `io.spokelet.nodes.v1alpha1.nodeinventories.status.{update,delete}_request` carrying a
    /// NodeInventory (a delete carries only its name).
    pub fn of(cluster: &str, body: &ReportBody) -> Self {
        let (type_, resource_id, data, gone) = match body {
            ReportBody::ClusterStatus(status) => (
                format!("{}.status.{}", spokelet_proto::MANAGED_CLUSTERS, action::UPDATE),
                cluster.to_string(),
                serde_json::json!({
                    "apiVersion": "cluster.open-cluster-management.io/v1",
                    "kind": "ManagedCluster",
                    "metadata": {"name": cluster},
                    "status": status,
                }),
                false,
            ),
            ReportBody::Node { name, document } => {
                let action = if document.is_some() {
                    action::UPDATE
                } else {
                    action::DELETE
                };
                (
                    format!("{}.status.{action}", spokelet_proto::NODE_INVENTORIES),
                    name.clone(),
                    document
                        .clone()
                        .unwrap_or_else(|| serde_json::json!({"metadata": {"name": name}})),
                    document.is_none(),
                )
            }
        };
        // Serialising a JSON value cannot fail.
        let data = serde_json::to_vec(&data).unwrap_or_default();
        let hash = hex::encode(Sha256::digest(&data));
        ReportPayload {
            type_,
            resource_id,
            data,
            hash,
            gone,
        }
    }
}

/// A pool report's event, with `clustername`, `resourceid`, `sequenceid` and `statushash`.
pub fn report_event(agent_id: &str, cluster: &str, report: &ReportPayload, sequence_id: u64) -> CloudEvent {
    let mut ev = base_event(agent_id, report.type_.clone(), report.data.clone());
    let a = &mut ev.attributes;
    a.insert(
        format!("ce-{}", ext::RESOURCE_ID),
        string_attr(&report.resource_id),
    );
    a.insert(format!("ce-{}", ext::CLUSTER_NAME), string_attr(cluster));
    a.insert(
        format!("ce-{}", ext::SEQUENCE_ID),
        string_attr(sequence_id.to_string()),
    );
    a.insert(format!("ce-{}", ext::STATUS_HASH), string_attr(&report.hash));
    ev
}

/// Monotonic status sequence ids that stay monotonic across restarts: at least the current Unix
/// time in milliseconds shifted left by 22 bits (the layout of the snowflake ids reference agents
/// send, so a hub comparing them sees ours increase) and always above the previous one.
#[derive(Debug, Default)]
pub struct SequenceIds {
    /// Last id handed out.
    last: AtomicU64,
}

impl SequenceIds {
    /// The next id: above the last one, and at least the id of the current millisecond.
    pub fn next(&self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let floor = u64::try_from(now_ms)
            .unwrap_or(u64::MAX >> 1)
            .saturating_mul(1 << 22)
            & (u64::MAX >> 1);
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = floor.max(prev.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

/// Hex SHA-256 of arbitrary bytes (used for tests and logs of payload identity).
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use spokelet_work_api::manifestwork::Condition;

    fn spec_event(action: &str, data: Option<Data>) -> CloudEvent {
        let mut attributes = std::collections::HashMap::new();
        attributes.insert("ce-resourceid".into(), string_attr("uid-1"));
        attributes.insert("ce-resourceversion".into(), int_attr(3));
        attributes.insert("ce-clustername".into(), string_attr("c1"));
        attributes.insert(
            "ce-metadata".into(),
            string_attr(r#"{"name":"w1","namespace":"c1","labels":{"a":"b"},"annotations":{"x":"y"},"creationTimestamp":"2024-01-01T00:00:00Z"}"#),
        );
        attributes.insert("contenttype".into(), string_attr("application/json"));
        CloudEvent {
            id: "1".into(),
            source: "maestro".into(),
            spec_version: "1.0".into(),
            r#type: event_type("spec", action),
            attributes,
            data,
        }
    }

    const BUNDLE: &str = r#"{"manifests":[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","namespace":"default"}}],
        "deleteOption":{"propagationPolicy":"Orphan"},"executer":{"subject":{"type":"ServiceAccount"}}}"#;

    #[test]
    fn decodes_create_with_binary_and_text_data() {
        for data in [
            Data::BinaryData(BUNDLE.as_bytes().to_vec()),
            Data::TextData(BUNDLE.to_string()),
        ] {
            let Incoming::Spec(s) = decode(&spec_event(action::CREATE, Some(data)), "c1").unwrap() else {
                panic!("not spec")
            };
            assert!(!s.deleted);
            assert_eq!(s.original_source, "maestro");
            let w = s.work.unwrap();
            assert_eq!(w.name_any(), "w1");
            assert_eq!(w.namespace().as_deref(), Some("c1"));
            assert_eq!(w.metadata.uid.as_deref(), Some("uid-1"));
            assert_eq!(w.metadata.generation, Some(3));
            assert_eq!(w.labels().get("a").map(String::as_str), Some("b"));
            assert_eq!(w.annotations().get("x").map(String::as_str), Some("y"));
            assert_eq!(w.spec.workload.manifests.len(), 1);
            assert!(w.spec.executor.is_some());
        }
    }

    #[test]
    fn delete_and_deletion_timestamp() {
        let Incoming::Spec(s) = decode(&spec_event(action::DELETE, None), "c1").unwrap() else {
            panic!()
        };
        assert!(s.deleted && s.work.is_none());
        assert_eq!(s.name.as_deref(), Some("w1"));
        let mut ev = spec_event(action::UPDATE, Some(Data::BinaryData(BUNDLE.into())));
        ev.attributes.insert(
            "ce-deletiontimestamp".into(),
            CloudEventAttributeValue {
                attr: Some(Attr::CeTimestamp(prost_types::Timestamp { seconds: 1, nanos: 0 })),
            },
        );
        let Incoming::Spec(s) = decode(&ev, "c1").unwrap() else {
            panic!()
        };
        assert!(s.deleted);
    }

    #[test]
    fn malformed_events_are_typed_errors() {
        let bad_json = spec_event(action::CREATE, Some(Data::BinaryData(b"{not json".to_vec())));
        assert!(matches!(decode(&bad_json, "c1"), Err(CodecError::Json { .. })));
        let mut unknown = spec_event(action::CREATE, None);
        unknown.r#type = "io.example.other".into();
        assert!(matches!(decode(&unknown, "c1"), Err(CodecError::UnknownType(_))));
        unknown.r#type = event_type("spec", "frobnicate");
        assert!(matches!(decode(&unknown, "c1"), Err(CodecError::UnknownType(_))));
        let mut no_id = spec_event(action::CREATE, Some(Data::BinaryData(BUNDLE.into())));
        no_id.attributes.remove("ce-resourceid");
        assert!(matches!(
            decode(&no_id, "c1"),
            Err(CodecError::Missing("resourceid"))
        ));
        assert!(identify(&no_id).is_none());
        let other = spec_event(action::CREATE, Some(Data::BinaryData(BUNDLE.into())));
        assert!(matches!(
            decode(&other, "c2"),
            Err(CodecError::WrongCluster { .. })
        ));
        let huge = spec_event(
            action::CREATE,
            Some(Data::BinaryData(vec![b' '; 5 * 1024 * 1024])),
        );
        assert!(matches!(decode(&huge, "c1"), Err(CodecError::TooLarge { .. })));
        assert_eq!(identify(&huge), Some(("uid-1".to_string(), 3)));
        let empty = spec_event(action::CREATE, None);
        assert!(matches!(decode(&empty, "c1"), Err(CodecError::NoData)));
        let mut bad_ver = spec_event(action::CREATE, Some(Data::BinaryData(BUNDLE.into())));
        bad_ver
            .attributes
            .insert("ce-resourceversion".into(), string_attr("x"));
        assert!(matches!(
            decode(&bad_ver, "c1"),
            Err(CodecError::BadAttribute { .. })
        ));
        let mut bad_ct = spec_event(action::CREATE, Some(Data::BinaryData(BUNDLE.into())));
        bad_ct
            .attributes
            .insert("contenttype".into(), string_attr("application/protobuf"));
        assert!(matches!(decode(&bad_ct, "c1"), Err(CodecError::ContentType(_))));
        let mut bad_meta = spec_event(action::CREATE, Some(Data::BinaryData(BUNDLE.into())));
        bad_meta.attributes.insert("ce-metadata".into(), string_attr("{"));
        assert!(matches!(
            decode(&bad_meta, "c1"),
            Err(CodecError::Json { what: "metadata", .. })
        ));
    }

    #[test]
    fn heartbeat_and_status_resync() {
        let hb = CloudEvent {
            r#type: HEARTBEAT.into(),
            ..Default::default()
        };
        assert!(matches!(decode(&hb, "c1"), Ok(Incoming::Heartbeat)));
        let mut ev = CloudEvent {
            r#type: event_type("status", action::RESYNC_REQUEST),
            data: Some(Data::BinaryData(
                br#"{"statusHashes":[{"resourceID":"u","statusHash":"h"}]}"#.to_vec(),
            )),
            ..Default::default()
        };
        ev.attributes.insert("ce-clustername".into(), string_attr("c1"));
        let Incoming::StatusResync(h) = decode(&ev, "c1").unwrap() else {
            panic!()
        };
        assert_eq!(
            h,
            vec![StatusHash {
                resource_id: "u".into(),
                status_hash: "h".into()
            }]
        );
        ev.data = None;
        let Incoming::StatusResync(h) = decode(&ev, "c1").unwrap() else {
            panic!()
        };
        assert!(h.is_empty());
    }

    #[test]
    fn builds_spec_resync_request() {
        let ev = spec_resync_request(
            "agent",
            "c1",
            vec![ResourceVersion {
                resource_id: "u1".into(),
                resource_version: 4,
            }],
        );
        assert_eq!(ev.r#type, format!("{MANIFEST_BUNDLES}.spec.resync_request"));
        assert_eq!(ev.spec_version, "1.0");
        assert_eq!(ev.source, "agent");
        let Some(Data::BinaryData(d)) = &ev.data else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(d).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"resourceVersions":[{"resourceID":"u1","resourceVersion":4}]})
        );
        assert!(matches!(ev.attributes["ce-clustername"].attr, Some(Attr::CeString(ref c)) if c == "c1"));
        assert!(
            matches!(ev.attributes["contenttype"].attr, Some(Attr::CeString(ref c)) if c == "application/json")
        );
    }

    #[test]
    fn builds_status_update_with_every_extension() {
        let status = ManifestWorkStatus {
            conditions: vec![Condition {
                type_: "Applied".into(),
                status: "True".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let hash = spokelet_work_api::conditions::status_hash(&status);
        let meta = WireMeta {
            name: "w1".into(),
            namespace: "c1".into(),
            uid: "u1".into(),
            ..Default::default()
        };
        let t = StatusTarget {
            agent_id: "agent",
            cluster: "c1",
            resource_id: "u1",
            resource_version: 2,
            original_source: "maestro",
            meta: &meta,
            sequence_id: 42,
        };
        let ev = status_event(StatusKind::Update, &t, &status, &hash);
        assert_eq!(ev.r#type, format!("{MANIFEST_BUNDLES}.status.update_request"));
        for k in [
            "ce-resourceid",
            "ce-resourceversion",
            "ce-clustername",
            "ce-originalsource",
            "ce-sequenceid",
            "ce-statushash",
            "ce-metadata",
        ] {
            assert!(ev.attributes.contains_key(k), "{k}");
        }
        assert!(matches!(
            ev.attributes["ce-resourceversion"].attr,
            Some(Attr::CeInteger(2))
        ));
        assert!(matches!(ev.attributes["ce-statushash"].attr, Some(Attr::CeString(ref h)) if *h == hash));
        let Some(Data::BinaryData(d)) = &ev.data else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(d).unwrap();
        assert_eq!(v["conditions"][0]["type"], "Applied");
        assert!(v["resourceStatus"].is_array());
        assert_eq!(hash, sha256_hex(&serde_json::to_vec(&status).unwrap()));
        let r = status_event(StatusKind::ResyncResponse, &t, &status, &hash);
        assert_eq!(r.r#type, format!("{MANIFEST_BUNDLES}.status.resync_response"));
    }

    #[test]
    fn sequence_ids_increase_and_ids_are_uuids() {
        let s = SequenceIds::default();
        let a = s.next();
        let b = s.next();
        assert!(b > a && a > (1 << 40));
        assert!(i64::try_from(b).is_ok());
        let id = new_event_id();
        assert_eq!(id.len(), 36);
        assert_ne!(id, new_event_id());
    }

    #[test]
    fn big_versions_go_as_strings() {
        assert!(matches!(int_attr(i64::MAX).attr, Some(Attr::CeString(_))));
        let mut ev = CloudEvent::default();
        ev.attributes
            .insert("ce-resourceversion".into(), int_attr(i64::MAX));
        assert_eq!(attr_int(&ev, "resourceversion").unwrap(), Some(i64::MAX));
    }
}
