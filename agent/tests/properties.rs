//! Property tests of the agent's parsers of hub and operator input.
//!
//! Covered: the CloudEvents decoder, work files, the hub URL and config file, durations, the
//! agent's config file, inline PEM and the hub kubeconfig. Each property asserts no panic, no
//! stack overflow and typed errors, plus a round trip or an invariant where one is natural. The
//! normal run uses proptest's default of 256 cases per property;
//! `PROPTEST_CASES=100000 cargo test --release -p spokelet --test properties` runs each with
//! 100,000 cases.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use kube::ResourceExt;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use prost_types::{Any, Timestamp};
use serde_json::{Value, json};

use spokelet::config::Cli;
use spokelet::duration::parse_duration;
use spokelet::hub::cloudevents::{CodecError, Incoming, MAX_PAYLOAD, decode, identify, identify_name};
use spokelet::hub::config::{HubArgs, HubConfigError, HubConfigFile, HubUrl};
use spokelet::hub::file_source::parse_works;
use spokelet::hub::kube_hub::{HubSecurity, config_from_kubeconfig, hub_client, hub_tls_config};
use spokelet::hub::tls::{ClientTls, PemSource, TlsError, TlsOptions};
use spokelet::work::manifestwork::{DeleteOption, DeletePropagationPolicy, Manifest, ManifestBundle};
use spokelet_proto::{Attr, CloudEvent, CloudEventAttributeValue, Data, HEARTBEAT, MANIFEST_BUNDLES};

/// The cluster the decoder serves in these tests.
const OURS: &str = "c1";
/// A self-signed EC certificate and its key, and a key that does not belong to it.
const CERT: &str = include_str!("../../hub/src/testdata/client.crt");
const KEY: &str = include_str!("../../hub/src/testdata/client.key");
const OTHER_KEY: &str = include_str!("../../hub/src/testdata/other.key");

// ---------------------------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------------------------

/// Object keys: names the wire types use, tricky ones, and anything at all.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "a", "name", "namespace", "apiVersion", "kind", "metadata", "spec", "manifests", "workload",
            "deleteOption", "propagationPolicy", "labels", "statusHashes", "resourceID", "", " ",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// JSON values a few levels deep. Floats have few digits, so their text parses back exactly
/// (serde_json's default float parsing is best-effort; the work crate's properties cover that).
fn json_value() -> impl Strategy<Value = Value> {
    let float = (any::<i32>(), 0i32..7).prop_map(|(m, k)| f64::from(m) / 10f64.powi(k));
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        float.prop_map(Value::from),
        key().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(key(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string field of the wire types, or a value of the wrong type.
fn wire_str(names: Vec<&'static str>) -> impl Strategy<Value = Value> {
    prop_oneof![4 => select(names).prop_map(Value::from), 1 => json_value()]
}

/// A Kubernetes object with its fields present, missing or of the wrong type.
fn manifest_value() -> impl Strategy<Value = Value> {
    let object = (
        wire_str(vec!["v1", "apps/v1", "a/b/c", ""]),
        wire_str(vec!["ConfigMap", "Deployment", ""]),
        wire_str(vec!["a", "", "w1"]),
    )
        .prop_map(
            |(a, k, n)| json!({"apiVersion": a, "kind": k, "metadata": {"name": n, "namespace": "default"}}),
        );
    prop_oneof![3 => object, 1 => json_value()]
}

/// Replaces the value at a JSON pointer of `v` by `with`, if the pointer exists.
fn mutate(mut v: Value, at: Option<(&str, Value)>) -> Value {
    if let Some((pointer, with)) = at
        && let Some(slot) = v.pointer_mut(pointer)
    {
        *slot = with;
    }
    v
}

/// Where a near-valid document is broken: one of its subtrees replaced by any value.
fn mutation(pointers: Vec<&'static str>) -> impl Strategy<Value = Option<(&'static str, Value)>> {
    option::of((select(pointers), json_value()))
}

/// A ManifestBundle payload as the gRPC hub sends it, sometimes broken in one place.
fn near_valid_bundle() -> impl Strategy<Value = Value> {
    let pointers = vec![
        "",
        "/manifests",
        "/manifests/0",
        "/deleteOption",
        "/manifestConfigs",
        "/executer",
    ];
    let policy = wire_str(vec!["Foreground", "Orphan", "SelectivelyOrphan", "Background"]);
    (vec(manifest_value(), 0..4), policy, mutation(pointers)).prop_map(|(manifests, policy, m)| {
        let b = json!({
            "manifests": manifests,
            "deleteOption": {"propagationPolicy": policy},
            "manifestConfigs": [{"resourceIdentifier": {"resource": "configmaps", "name": "*"},
                "updateStrategy": {"type": "ServerSideApply"}}],
            "executer": {"subject": {"type": "ServiceAccount"}},
        });
        mutate(b, m)
    })
}

/// JSON text of `v`, or a prefix of it cut at a random character.
fn maybe_truncated(v: &Value, cut: Option<Index>) -> String {
    let text = serde_json::to_string(v).unwrap();
    match cut {
        Some(i) => text.chars().take(i.index(text.chars().count().max(1))).collect(),
        None => text,
    }
}

/// How many times a unit is repeated: mostly few, sometimes far past every recursion limit.
fn repeat_count() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..16, 1usize..1_000, 1usize..50_000]
}

/// Text nested `n` levels deep in one of JSON's (and YAML's flow) brackets, closed or not.
fn deeply_nested() -> impl Strategy<Value = String> {
    let open = select(vec![("[", "]"), ("{\"a\":", "}"), ("{\"manifests\":[", "]}")]);
    (open, repeat_count(), any::<bool>()).prop_map(|((o, c), n, close)| {
        let mut s = o.repeat(n);
        if close {
            s.push_str(&c.repeat(n));
        }
        s
    })
}

/// Bounded durations as the config format writes them, with the value they stand for.
fn valid_duration() -> impl Strategy<Value = (String, Duration)> {
    let unit = select(vec![("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]);
    vec((0u32..1_000_000, unit), 1..5).prop_map(|parts| {
        let text = parts.iter().map(|(n, (u, _))| format!("{n}{u}")).collect();
        let total = parts
            .iter()
            .map(|(n, (_, f))| Duration::from_secs_f64(f64::from(*n) * f))
            .sum();
        (text, total)
    })
}

/// One part of a duration between 55% and 99% of the longest Duration, in any unit: two of
/// them add up past it.
fn huge_duration_part() -> impl Strategy<Value = String> {
    let max = Duration::MAX.as_secs_f64();
    let unit = select(vec![
        ("ms", 1000.0),
        ("s", 1.0),
        ("m", 1.0 / 60.0),
        ("h", 1.0 / 3600.0),
    ]);
    (0.55f64..0.99, unit)
        .prop_map(move |(frac, (u, per_second))| format!("{:.0}{u}", max * frac * per_second))
}

/// Duration text near the format: valid, broken, bare numbers.
fn near_valid_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        valid_duration().prop_map(|d| d.0),
        select(vec![
            "", " ", "abc", "-1s", "1e400s", "5 m", "1.5.5s", "ms", "1", "0", ".", "1..s", "1h-5m", "s5"
        ])
        .prop_map(String::from),
        ".{0,8}",
        any::<u64>().prop_map(|n| n.to_string()),
    ]
}

// ---------------------------------------------------------------------------------------------
// CloudEvents
// ---------------------------------------------------------------------------------------------

/// Every event type the decoder knows, its prefixes, and close misses.
fn known_types() -> Vec<String> {
    let mut t = vec![
        HEARTBEAT.to_string(),
        MANIFEST_BUNDLES.to_string(),
        format!("{MANIFEST_BUNDLES}."),
        format!("{MANIFEST_BUNDLES}.spec"),
        format!("{MANIFEST_BUNDLES}.spec."),
        format!("{MANIFEST_BUNDLES}..create_request"),
        format!("{MANIFEST_BUNDLES}.spec.create_request.extra"),
        String::new(),
    ];
    for sub in ["spec", "status", "Spec"] {
        for act in [
            "create_request",
            "update_request",
            "delete_request",
            "resync_request",
            "resync_response",
        ] {
            t.push(format!("{MANIFEST_BUNDLES}.{sub}.{act}"));
        }
    }
    t
}

/// Event types: the real ones, the real ones with something added, anything.
fn event_type() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(known_types()),
        1 => (select(known_types()), ".{0,6}").prop_map(|(t, s)| t + &s),
        1 => (".{0,6}", select(known_types())).prop_map(|(s, t)| s + &t),
        1 => any::<String>(),
    ]
}

/// The `metadata` extension: ObjectMeta JSON with fields of the right or wrong type, maybe cut short.
fn metadata_json() -> impl Strategy<Value = String> {
    let meta = (
        wire_str(vec!["w1", "", "a.b"]),
        wire_str(vec![OURS, "", "other"]),
        prop_oneof![any::<i64>().prop_map(Value::from), json_value()],
        btree_map(".{0,4}", ".{0,4}", 0..3),
    )
        .prop_map(|(name, ns, generation, labels)| {
            json!({"name": name, "namespace": ns, "generation": generation, "labels": labels,
                "annotations": {"a": "b"}, "creationTimestamp": "2024-01-01T00:00:00Z"})
        });
    (meta, option::of(any::<Index>())).prop_map(|(m, cut)| maybe_truncated(&m, cut))
}

/// Attribute text: the values the decoder looks for, near misses, anything.
fn attr_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "", " ", OURS, "c2", "uid-1", "3", " 42 ", "-1", "9223372036854775807", "9223372036854775808",
            "x",
            "application/json", "application/cloudevents+json; charset=utf-8", "text/plain", ";", "{}",
            "{\"name\":\"w1\"}", "{\"name\":5}", "{", "null", "[]",
        ])
        .prop_map(String::from),
        1 => metadata_json(),
        1 => any::<String>(),
    ]
}

/// An attribute value of every kind (or none).
fn attr_value() -> impl Strategy<Value = CloudEventAttributeValue> {
    let attr = prop_oneof![
        1 => any::<bool>().prop_map(Attr::CeBoolean),
        1 => any::<i32>().prop_map(Attr::CeInteger),
        3 => attr_text().prop_map(Attr::CeString),
        1 => vec(any::<u8>(), 0..16).prop_map(Attr::CeBytes),
        1 => attr_text().prop_map(Attr::CeUri),
        1 => attr_text().prop_map(Attr::CeUriRef),
        1 => (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Attr::CeTimestamp(Timestamp { seconds, nanos })),
    ];
    option::of(attr).prop_map(|attr| CloudEventAttributeValue { attr })
}

/// Attribute keys: the ones the decoder reads, near misses, anything.
fn attr_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec![
            "ce-resourceid", "ce-resourceversion", "ce-clustername", "ce-originalsource",
            "ce-deletiontimestamp", "ce-metadata", "ce-sequenceid", "ce-statushash", "ce-time", "contenttype",
            "resourceid", "ce-", "",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// Payloads: bytes, text, protobuf, near-valid bundles and resync bodies (maybe cut short), deep nesting.
fn event_data() -> impl Strategy<Value = Option<Data>> {
    let resync = (
        vec((json_value(), json_value()), 0..3),
        option::of(any::<Index>()),
    )
        .prop_map(|(h, cut)| {
            let hashes: Vec<Value> = h
                .into_iter()
                .map(|(r, s)| json!({"resourceID": r, "statusHash": s}))
                .collect();
            maybe_truncated(&json!({"statusHashes": hashes}), cut)
        });
    let bundle =
        || (near_valid_bundle(), option::of(any::<Index>())).prop_map(|(b, cut)| maybe_truncated(&b, cut));
    option::of(prop_oneof![
        1 => vec(any::<u8>(), 0..256).prop_map(Data::BinaryData),
        1 => any::<String>().prop_map(Data::TextData),
        1 => (any::<String>(), vec(any::<u8>(), 0..32))
            .prop_map(|(type_url, value)| Data::ProtoData(Any { type_url, value })),
        3 => bundle().prop_map(|b| Data::BinaryData(b.into_bytes())),
        2 => bundle().prop_map(Data::TextData),
        1 => resync.prop_map(Data::TextData),
        1 => deeply_nested().prop_map(|d| Data::BinaryData(d.into_bytes())),
    ])
}

/// Any event: random type, attributes and payload.
fn any_event() -> impl Strategy<Value = CloudEvent> {
    (
        ".{0,8}",
        ".{0,8}",
        event_type(),
        btree_map(attr_key(), attr_value(), 0..10),
        event_data(),
    )
        .prop_map(|(id, source, r#type, attributes, data)| CloudEvent {
            id,
            source,
            spec_version: "1.0".into(),
            r#type,
            attributes: attributes.into_iter().collect(),
            data,
        })
}

/// `CeString` attribute.
fn string_attr(s: &str) -> CloudEventAttributeValue {
    CloudEventAttributeValue {
        attr: Some(Attr::CeString(s.to_string())),
    }
}

/// A spec or status event with mostly valid attributes, a few replaced by random ones.
fn near_valid_event() -> impl Strategy<Value = CloudEvent> {
    let types: Vec<String> = ["create_request", "update_request", "delete_request"]
        .iter()
        .map(|a| format!("{MANIFEST_BUNDLES}.spec.{a}"))
        .chain([format!("{MANIFEST_BUNDLES}.status.resync_request")])
        .collect();
    let base = (
        select(types),
        "[a-z0-9-]{0,12}",
        any::<i64>(),
        metadata_json(),
        any::<bool>(),
        event_data(),
    );
    (base, btree_map(attr_key(), attr_value(), 0..3)).prop_map(
        |((r#type, uid, version, meta, deleting, data), extra)| {
            let mut attributes = HashMap::from([
                ("ce-resourceid".to_string(), string_attr(&uid)),
                (
                    "ce-resourceversion".to_string(),
                    string_attr(&version.to_string()),
                ),
                ("ce-clustername".to_string(), string_attr(OURS)),
                ("ce-metadata".to_string(), string_attr(&meta)),
                ("contenttype".to_string(), string_attr("application/json")),
            ]);
            if deleting {
                attributes.insert("ce-deletiontimestamp".into(), string_attr("2024-01-01T00:00:00Z"));
            }
            attributes.extend(extra);
            CloudEvent {
                id: "1".into(),
                source: "hub".into(),
                spec_version: "1.0".into(),
                r#type,
                attributes,
                data,
            }
        },
    )
}

/// The cluster an event names, as the decoder reads it (strings and integers).
fn named_cluster(ev: &CloudEvent) -> Option<String> {
    match ev.attributes.get("ce-clustername")?.attr.as_ref()? {
        Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s) => Some(s.clone()),
        Attr::CeInteger(i) => Some(i.to_string()),
        _ => None,
    }
}

/// What every decoded event must satisfy, whatever it was made of.
fn check_decoded(ev: &CloudEvent, got: Result<Incoming, CodecError>) -> Result<(), TestCaseError> {
    let handled = ev.r#type != HEARTBEAT && (ev.r#type.contains(".spec.") || ev.r#type.contains(".status."));
    if handled && named_cluster(ev).is_some_and(|c| c != OURS) {
        let wrong = matches!(
            got,
            Err(CodecError::WrongCluster { .. }) | Err(CodecError::UnknownType(_))
        );
        prop_assert!(wrong, "{:?}", got);
    }
    match got {
        Ok(Incoming::Heartbeat) => prop_assert_eq!(ev.r#type.as_str(), HEARTBEAT),
        Ok(Incoming::StatusResync(_)) => prop_assert!(ev.r#type.ends_with(".status.resync_request")),
        Ok(Incoming::Spec(s)) => {
            prop_assert!(!s.resource_id.is_empty());
            prop_assert_eq!(s.deleted, s.work.is_none());
            if let Some(w) = &s.work {
                prop_assert_eq!(w.metadata.uid.as_deref(), Some(s.resource_id.as_str()));
                prop_assert_eq!(w.metadata.generation, Some(s.resource_version));
                prop_assert!(w.metadata.namespace.as_deref().is_some_and(|n| !n.is_empty()));
                prop_assert!(!w.name_any().is_empty());
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #[test]
    fn cloudevents_decode_never_panics_on_any_event(ev in any_event()) {
        check_decoded(&ev, decode(&ev, OURS))?;
    }

    #[test]
    fn cloudevents_decode_never_panics_on_near_valid_events(ev in near_valid_event()) {
        check_decoded(&ev, decode(&ev, OURS))?;
    }

    #[test]
    fn cloudevents_identify_never_panics(ev in prop_oneof![any_event(), near_valid_event()]) {
        if let Some((id, _)) = identify(&ev) {
            prop_assert!(!id.is_empty());
        }
        if let Some(name) = identify_name(&ev) {
            prop_assert!(!name.is_empty());
        }
    }

    #[test]
    fn cloudevents_decode_returns_the_generated_work(
        manifests in vec(json_value(), 0..4),
        orphan in any::<bool>(),
        uid in "[a-z0-9-]{1,36}",
        version in any::<i64>(),
        name in option::of("[a-z0-9.-]{1,20}"),
        namespace in option::of("[a-z0-9-]{1,12}"),
        text in any::<bool>(),
    ) {
        let policy = if orphan {
            DeletePropagationPolicy::Orphan
        } else {
            DeletePropagationPolicy::Foreground
        };
        let bundle = ManifestBundle {
            manifests: manifests.into_iter().map(Manifest::from).collect(),
            delete_option: Some(DeleteOption { propagation_policy: policy, ..Default::default() }),
            ..Default::default()
        };
        let body = serde_json::to_string(&bundle).unwrap();
        let version_attr = match i32::try_from(version) {
            Ok(i) => CloudEventAttributeValue { attr: Some(Attr::CeInteger(i)) },
            Err(_) => string_attr(&version.to_string()),
        };
        let meta = json!({
            "name": name.clone().unwrap_or_default(),
            "namespace": namespace.clone().unwrap_or_default(),
        });
        let ev = CloudEvent {
            r#type: format!("{MANIFEST_BUNDLES}.spec.create_request"),
            attributes: HashMap::from([
                ("ce-resourceid".to_string(), string_attr(&uid)),
                ("ce-resourceversion".to_string(), version_attr),
                ("ce-clustername".to_string(), string_attr(OURS)),
                ("ce-metadata".to_string(), string_attr(&meta.to_string())),
            ]),
            data: Some(if text { Data::TextData(body) } else { Data::BinaryData(body.into_bytes()) }),
            ..Default::default()
        };
        let Ok(Incoming::Spec(s)) = decode(&ev, OURS) else {
            return Err(TestCaseError::fail("not a spec event"));
        };
        let w = s.work.unwrap();
        prop_assert_eq!(&w.spec, &bundle.into_spec());
        prop_assert_eq!(w.name_any(), name.unwrap_or(uid.clone()));
        prop_assert_eq!(w.metadata.namespace, Some(namespace.unwrap_or(OURS.to_string())));
        prop_assert_eq!(w.metadata.uid, Some(uid));
        prop_assert_eq!(w.metadata.generation, Some(version));
    }

    #[test]
    fn cloudevents_payload_over_the_limit_is_too_large(extra in 1usize..4096, text in any::<bool>()) {
        let size = MAX_PAYLOAD + extra;
        let data = if text { Data::TextData(" ".repeat(size)) } else { Data::BinaryData(vec![b' '; size]) };
        let ev = CloudEvent {
            r#type: format!("{MANIFEST_BUNDLES}.spec.update_request"),
            attributes: HashMap::from([("ce-resourceid".to_string(), string_attr("u"))]),
            data: Some(data),
            ..Default::default()
        };
        let got = decode(&ev, OURS);
        let too_large =
            matches!(got, Err(CodecError::TooLarge { size: s, limit }) if s == size && limit == MAX_PAYLOAD);
        prop_assert!(too_large);
    }
}

// ---------------------------------------------------------------------------------------------
// Work files
// ---------------------------------------------------------------------------------------------

/// Work names: valid, unsafe, too long.
fn work_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(vec!["w1", "a.b", "UPPER", "../escape", "", "-x", ".h", "ok-name", "a/b", "é"])
            .prop_map(Value::from),
        2 => "[a-z0-9.-]{1,12}".prop_map(Value::from),
        1 => "[a-z]{195,205}".prop_map(Value::from),
        1 => json_value(),
    ]
}

/// One ManifestWork document as YAML, sometimes broken in one place.
fn work_document() -> impl Strategy<Value = String> {
    let pointers = vec![
        "",
        "/kind",
        "/metadata",
        "/spec",
        "/spec/workload",
        "/spec/workload/manifests",
        "/status",
    ];
    let kind = wire_str(vec!["ManifestWork", "ConfigMap", ""]);
    let parts = (work_name(), kind, vec(manifest_value(), 0..3), mutation(pointers));
    parts.prop_map(|(name, kind, manifests, m)| {
        let w = json!({
            "apiVersion": "work.open-cluster-management.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": {"workload": {"manifests": manifests}, "deleteOption": {"propagationPolicy": "Orphan"}},
        });
        serde_yaml::to_string(&mutate(w, m)).unwrap()
    })
}

/// Pieces of YAML syntax: anchors, aliases, tags, merge keys, markers, indentation.
const YAML_FRAGMENTS: &[&str] = &[
    "&a ",
    "*a",
    "*b",
    "<<: *a\n",
    "!!binary ",
    "!!str ",
    "!!map ",
    "!Custom ",
    "? ",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "\n",
    "  ",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "%TAG ! tag:x:\n",
    "\t",
    "'",
    "\"",
    "# c\n",
    "|\n",
    ">\n",
    "kind: ManifestWork\n",
    "metadata:\n  name: w\n",
    "spec: {}\n",
    "spec:\n  workload:\n    manifests:\n",
    "null",
    "~",
    "\u{feff}",
    "\\",
    "\u{0}",
    "a: 1\n",
    "a: &a {b: 1}\n",
    "b: *a\n",
];

/// Near-valid YAML: fragments glued at random.
fn yaml_fragments() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![5 => select(YAML_FRAGMENTS).prop_map(String::from), 1 => ".{0,4}"],
        0..48,
    )
    .prop_map(|p| p.concat())
}

/// YAML nested far deeper than any recursion limit, in flow and block style. Fewer levels than
/// for JSON: the YAML parser reads a whole document before its recursion limit applies, in time
/// quadratic in the flow nesting (20,000 levels take seconds).
fn deep_yaml() -> impl Strategy<Value = String> {
    let unit = select(vec![
        "[",
        "{a: ",
        "- ",
        "? ",
        "!!seq [",
        "&x [",
        "spec: {workload: ",
    ]);
    let count = prop_oneof![1usize..16, 1usize..300, 1usize..2_000];
    (unit, count).prop_map(|(u, n)| format!("kind: ManifestWork\nspec: {}\n", u.repeat(n)))
}

/// Aliases of aliases: `levels` levels of `width` references each ("billion laughs").
fn alias_bomb() -> impl Strategy<Value = String> {
    (1usize..12, 2usize..10).prop_map(|(levels, width)| {
        let mut y = String::from("a0: &a0 [x, x]\n");
        for l in 1..=levels {
            let refs = vec![format!("*a{}", l - 1); width].join(", ");
            y.push_str(&format!("a{l}: &a{l} [{refs}]\n"));
        }
        y.push_str(&format!("spec: {{workload: {{manifests: *a{levels}}}}}\n"));
        y
    })
}

/// Whole work files: documents, fragments, deep nesting, alias bombs.
fn work_file() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(work_document(), 0..4).prop_map(|d| d.join("---\n")),
        2 => yaml_fragments(),
        1 => deep_yaml(),
        1 => alias_bomb(),
        1 => any::<String>(),
    ]
}

/// File names work files come from (the name a work defaults to).
fn work_path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "/d/w1.yaml", "x.yaml", "/d/UPPER.yml", "/d/.yaml", "/", "", "/d/a.b.yaml", "/d/.yml",
        ])
            .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// What `parse_works` must say about the works it returns.
fn check_works(
    got: Result<Vec<spokelet::work::ManifestWork>, impl std::fmt::Display>,
) -> Result<(), TestCaseError> {
    match got {
        Ok(works) => {
            let mut names: Vec<String> = works.iter().map(|w| w.name_any()).collect();
            for n in &names {
                prop_assert!(
                    !n.is_empty() && n.len() <= 200 && !n.starts_with(['.', '-']),
                    "{}",
                    n
                );
                prop_assert!(
                    n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                );
            }
            names.sort();
            names.dedup();
            prop_assert_eq!(names.len(), works.len());
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #[test]
    fn work_file_parse_never_panics_on_any_bytes(bytes in vec(any::<u8>(), 0..512), path in work_path()) {
        check_works(parse_works(Path::new(&path), &bytes))?;
    }

    #[test]
    fn work_file_parse_never_panics_on_any_text(text in any::<String>(), path in work_path()) {
        check_works(parse_works(Path::new(&path), text.as_bytes()))?;
    }

    #[test]
    fn work_file_parse_never_panics_on_near_valid_yaml(text in work_file(), path in work_path()) {
        check_works(parse_works(Path::new(&path), text.as_bytes()))?;
    }

    #[test]
    fn work_file_deep_nesting_and_alias_bombs_never_overflow(text in prop_oneof![deep_yaml(), alias_bomb()]) {
        match parse_works(Path::new("w.yaml"), text.as_bytes()) {
            Ok(works) => prop_assert!(works.len() <= 1),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn work_file_of_generated_works_keeps_their_names(names in vec("[a-z0-9]{1,12}", 1..5)) {
        let mut names = names;
        names.sort();
        names.dedup();
        let docs: Vec<String> = names
            .iter()
            .map(|n| format!("kind: ManifestWork\nmetadata: {{name: {n:?}}}\nspec: {{}}\n"))
            .collect();
        let works = parse_works(Path::new("/d/file.yaml"), docs.join("---\n").as_bytes()).unwrap();
        prop_assert_eq!(works.iter().map(|w| w.name_any()).collect::<Vec<_>>(), names);
    }
}

// ---------------------------------------------------------------------------------------------
// Hub URL and hub config file
// ---------------------------------------------------------------------------------------------

/// Hub addresses assembled from schemes, hosts, ports and suffixes, valid or not.
fn near_valid_url() -> impl Strategy<Value = String> {
    let scheme = select(vec![
        "https://", "http://", "", "grpc://", "HTTPS://", "://", "https:/",
    ]);
    let host = prop_oneof![
        select(vec![
            "hub.example.com",
            "10.0.0.1",
            "[::1]",
            "[::1",
            "::1",
            "",
            "[]",
            "a@b",
            "h/p",
            "]",
            "é.example"
        ])
        .prop_map(String::from),
        "[a-z0-9.-]{0,12}",
    ];
    let port = prop_oneof![
        select(vec![
            "", ":", ":0", ":443", ":65535", ":65536", ":-1", ":abc", ":1:2", "::", ":+1"
        ])
        .prop_map(String::from),
        ":[0-9]{1,6}",
    ];
    let suffix = select(vec!["", "/", "//", "/path", "?q", "#f", " "]);
    (scheme, host, port, suffix).prop_map(|(s, h, p, x)| format!("{s}{h}{p}{x}"))
}

/// A valid hub address as text and as what it must parse to.
fn valid_url() -> impl Strategy<Value = (String, HubUrl)> {
    let host = prop_oneof!["[a-z0-9][a-z0-9.-]{0,20}", "\\[[0-9a-f:]{1,12}\\]"];
    let scheme = select(vec!["https://", "http://", ""]);
    (scheme, host, option::of(any::<u16>()), any::<u16>(), 0usize..3).prop_map(
        |(scheme, host, port, any_port, slashes)| {
            // Without a scheme the port is required.
            let port = if scheme.is_empty() {
                Some(port.unwrap_or(any_port))
            } else {
                port
            };
            let default = if scheme == "http://" { 80 } else { 443 };
            let text = format!(
                "{scheme}{host}{}{}",
                port.map(|p| format!(":{p}")).unwrap_or_default(),
                "/".repeat(slashes)
            );
            (
                text,
                HubUrl {
                    plaintext: scheme == "http://",
                    host,
                    port: port.unwrap_or(default),
                },
            )
        },
    )
}

/// A PEM-ish inline value: PEM, base64 of PEM, or junk.
fn inline_data() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(CERT.to_string()),
        Just(base64::engine::general_purpose::STANDARD.encode(CERT)),
        "[A-Za-z0-9+/=]{0,40}",
        ".{0,12}",
    ]
}

/// A hub config file in the reference format, with values of the right and wrong kinds.
fn near_valid_hub_config() -> impl Strategy<Value = String> {
    let s = || option::of(prop_oneof![".{0,12}".prop_map(Value::from), json_value()]);
    let keep_alive = (
        any::<bool>(),
        near_valid_duration(),
        near_valid_duration(),
        wire_str(vec!["true", "x"]),
    )
        .prop_map(|(e, t, to, p)| json!({"enable": e, "time": t, "timeout": to, "permitWithoutStream": p}));
    let fields = (
        option::of(near_valid_url().prop_map(Value::from)),
        option::of(inline_data().prop_map(Value::from)),
        s(),
        option::of(inline_data().prop_map(Value::from)),
        option::of(keep_alive),
        option::of(wire_str(vec!["1.2", "1.3", "1.1", ""])),
        option::of(prop_oneof![any::<bool>().prop_map(Value::from), json_value()]),
        (s(), s()),
    );
    fields.prop_map(|(url, ca, ca_file, key, ka, tls, plain, (token, bogus))| {
        let mut m = serde_json::Map::new();
        let entries = [
            ("url", url),
            ("caData", ca),
            ("caFile", ca_file),
            ("clientKeyData", key),
            ("keepAliveConfig", ka),
            ("minTLSVersion", tls),
            ("insecurePlaintext", plain),
            ("token", token),
            ("bogus", bogus),
        ];
        for (k, v) in entries {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        serde_yaml::to_string(&Value::Object(m)).unwrap()
    })
}

/// A hub URL error that says what is wrong with which URL.
fn check_url(text: &str, got: &Result<HubUrl, HubConfigError>) -> Result<(), TestCaseError> {
    match got {
        Ok(u) => {
            prop_assert!(!u.host.is_empty() && u.host != "[]");
            prop_assert_eq!(HubUrl::parse(&u.uri()).ok(), Some(u.clone()), "{}", u.uri());
        }
        Err(HubConfigError::Url { url, reason }) => {
            prop_assert_eq!(url, text);
            prop_assert!(!reason.is_empty());
        }
        Err(e) => prop_assert!(false, "unexpected error {}", e),
    }
    Ok(())
}

proptest! {
    #[test]
    fn hub_url_parse_never_panics_on_any_text(text in any::<String>()) {
        check_url(&text, &HubUrl::parse(&text))?;
    }

    #[test]
    fn hub_url_parse_never_panics_on_near_valid_urls(text in near_valid_url()) {
        check_url(&text, &HubUrl::parse(&text))?;
    }

    #[test]
    fn hub_url_valid_url_parses_to_the_generated_parts((text, url) in valid_url()) {
        prop_assert_eq!(HubUrl::parse(&text).ok(), Some(url));
    }

    #[test]
    fn hub_config_parse_never_panics_on_any_text(text in any::<String>()) {
        if let Err(e) = HubConfigFile::parse(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn hub_config_near_valid_file_merges_or_fails_typed(
        text in prop_oneof![4 => near_valid_hub_config(), 1 => yaml_fragments()],
        flag_url in option::of(near_valid_url()),
        cluster in option::of(select(vec!["c1", ""])),
        insecure_plaintext in any::<bool>(),
    ) {
        let file = match HubConfigFile::parse(&text) {
            Ok(f) => f,
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                return Ok(());
            }
        };
        let file_url = file.url.clone();
        let args = HubArgs {
            hub_url: flag_url.clone(),
            cluster_name: cluster.map(String::from),
            insecure_plaintext,
            ..Default::default()
        };
        match args.merge(file) {
            Ok(s) => {
                let url_text = flag_url.or(file_url).unwrap();
                prop_assert_eq!(Some(s.url.clone()), HubUrl::parse(&url_text).ok());
                prop_assert!(!s.url.plaintext || s.insecure_plaintext);
                prop_assert_eq!(s.agent_id.as_str(), "c1");
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Durations (flags, the agent's config file, keepAliveConfig)
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn duration_parse_never_panics_on_any_text(text in any::<String>()) {
        if let Err(e) = parse_duration(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn duration_parse_never_panics_on_near_valid_text(text in near_valid_duration()) {
        if let Err(e) = parse_duration(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn duration_parse_sums_the_generated_parts((text, want) in valid_duration()) {
        let got = parse_duration(&text).unwrap();
        let close = got.abs_diff(want) <= Duration::from_micros(1);
        prop_assert!(close, "{} parsed to {:?}, expected {:?}", text, got, want);
    }

    #[test]
    fn duration_parse_never_panics_on_huge_parts(parts in vec(huge_duration_part(), 1..4)) {
        let text = parts.concat();
        if let Err(e) = parse_duration(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's config file
// ---------------------------------------------------------------------------------------------

/// Keys of the agent's config file: real long flags of every command, and typos.
const CONFIG_KEYS: &[&str] = &[
    "log-level",
    "log-format",
    "output",
    "root",
    "nvml-library",
    "no-nvml",
    "admin-addr",
    "shutdown-grace",
    "works-dir",
    "kubeconfig",
    "hub-name",
    "agent-id",
    "resync-interval",
    "max-concurrent-works",
    "max-concurrent-manifests",
    "field-manager",
    "works-poll-interval",
    "max-work-bytes",
    "drift-debounce",
    "hub-transport",
    "hub-config",
    "hub-url",
    "cluster-name",
    "hub-heartbeat-timeout",
    "insecure-plaintext",
    "hub-kubeconfig",
    "hub-lease-duration",
    "config",
    "help",
    "version",
    "bogus",
    "",
];

/// Values of the agent's config file: scalars of each kind, lists, maps, null.
fn config_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        near_valid_duration().prop_map(Value::from),
        select(vec![
            "json",
            "text",
            "yaml",
            "table",
            "grpc",
            "kube",
            "127.0.0.1:1",
            "true",
            "false",
            "x"
        ])
        .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        json_value(),
    ]
}

/// Writes `text` to a temporary file and loads the agent's command line with it as `--config`.
fn load_with_config(text: &str, subcommand: &str) -> Result<Cli, spokelet::config::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spokelet.yaml");
    std::fs::write(&path, text).unwrap();
    let args = [
        "spokelet".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
        subcommand.as_ref(),
    ];
    Cli::load_from(args)
}

proptest! {
    #[test]
    fn agent_config_file_is_typed(
        entries in btree_map(select(CONFIG_KEYS), config_value(), 0..6),
        subcommand in select(vec!["inventory", "run"]),
    ) {
        let map: serde_json::Map<String, Value> =
            entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let text = serde_yaml::to_string(&map).unwrap();
        if let Err(e) = load_with_config(&text, subcommand) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn agent_config_file_of_any_text_is_typed(text in prop_oneof![any::<String>(), yaml_fragments()]) {
        if let Err(e) = load_with_config(&text, "inventory") {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PEM certificates and keys
// ---------------------------------------------------------------------------------------------

/// The DER of the test certificate and key.
fn real_der() -> (Vec<u8>, Vec<u8>) {
    let cert = rustls_pemfile::certs(&mut CERT.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut KEY.as_bytes()).unwrap().unwrap();
    (cert.to_vec(), key.secret_der().to_vec())
}

/// `der` with bytes flipped, cut short or extended.
fn mutated(der: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    (
        vec((any::<Index>(), any::<u8>()), 0..4),
        option::of(any::<Index>()),
        vec(any::<u8>(), 0..3),
    )
        .prop_map(move |(flips, cut, tail)| {
            let mut d = der.clone();
            for (i, x) in flips {
                let i = i.index(d.len());
                d[i] ^= x;
            }
            if let Some(c) = cut {
                d.truncate(c.index(d.len() + 1));
            }
            d.extend(tail);
            d
        })
}

/// `der` as a PEM block with `label`, its base64 wrapped at `width`.
fn pem(label: &str, der: &[u8], width: usize) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(width)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// PEM blocks of every label, bodies real (mutated), random or not base64, ends matching or not.
fn pem_block() -> impl Strategy<Value = String> {
    let (cert, key) = real_der();
    let label = select(vec![
        "CERTIFICATE",
        "PRIVATE KEY",
        "EC PRIVATE KEY",
        "RSA PRIVATE KEY",
        "X509 CRL",
        "JUNK",
        "",
    ]);
    let body = prop_oneof![mutated(cert), mutated(key), vec(any::<u8>(), 0..128)];
    let raw = (label, body, select(vec![64usize, 76, 1, 1000])).prop_map(|(l, b, w)| pem(l, &b, w));
    let broken = (
        select(vec!["CERTIFICATE", "PRIVATE KEY"]),
        "[A-Za-z0-9+/=\n-]{0,120}",
        select(vec!["", "-----END X-----\n"]),
    )
        .prop_map(|(l, body, end)| format!("-----BEGIN {l}-----\n{body}{end}"));
    prop_oneof![3 => raw, 1 => broken]
}

/// An inline PEM input: blocks between junk lines, sent as PEM or as base64 of PEM.
fn pem_input() -> impl Strategy<Value = Vec<u8>> {
    let junk = "[a-zA-Z0-9 .,:;]{0,30}\n";
    (vec(prop_oneof![3 => pem_block(), 1 => junk], 0..4), any::<bool>()).prop_map(|(parts, b64)| {
        let text = parts.concat();
        if b64 {
            base64::engine::general_purpose::STANDARD
                .encode(text)
                .into_bytes()
        } else {
            text.into_bytes()
        }
    })
}

/// Builds the hub TLS client from inline inputs.
fn tls(
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    allow_tls12: bool,
) -> Result<ClientTls, TlsError> {
    ClientTls::new(TlsOptions {
        ca: ca.map(PemSource::Inline),
        client_cert: cert.map(PemSource::Inline),
        client_key: key.map(PemSource::Inline),
        allow_tls12,
    })
}

/// A TLS error that says what is wrong.
fn check_tls<T>(got: Result<T, TlsError>) -> Result<(), TestCaseError> {
    if let Err(e) = got {
        let typed = matches!(
            e,
            TlsError::Pem { .. } | TlsError::Config(_) | TlsError::NoCa | TlsError::HalfIdentity
        );
        prop_assert!(typed, "{}", e);
        prop_assert!(!e.to_string().is_empty());
    }
    Ok(())
}

proptest! {
    #[test]
    fn tls_inline_inputs_of_any_bytes_are_typed(
        ca in option::of(vec(any::<u8>(), 0..256)),
        cert in option::of(vec(any::<u8>(), 0..256)),
        key in option::of(vec(any::<u8>(), 0..256)),
        allow_tls12 in any::<bool>(),
    ) {
        check_tls(tls(ca, cert, key, allow_tls12))?;
    }

    #[test]
    fn tls_near_valid_pem_inputs_are_typed(
        ca in option::of(pem_input()),
        cert in option::of(pem_input()),
        key in option::of(pem_input()),
        allow_tls12 in any::<bool>(),
    ) {
        check_tls(tls(ca, cert, key, allow_tls12))?;
    }

    #[test]
    fn tls_mutated_certificate_and_key_are_typed(
        cert in mutated(real_der().0),
        key in mutated(real_der().1),
        key_label in select(vec!["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"]),
    ) {
        let cert = pem("CERTIFICATE", &cert, 64).into_bytes();
        let key = pem(key_label, &key, 64).into_bytes();
        check_tls(tls(Some(cert.clone()), Some(cert), Some(key), false))?;
    }

    #[test]
    fn tls_real_identity_loads_from_any_inline_form(
        before in "[a-zA-Z0-9 .,:;\n]{0,40}",
        after in "[a-zA-Z0-9 .,:;\n]{0,40}",
        b64 in any::<bool>(),
        wrap in select(vec![0usize, 64, 76]),
        allow_tls12 in any::<bool>(),
    ) {
        let inline = |pem: &str| {
            let text = format!("{before}\n{pem}\n{after}");
            if !b64 {
                return text.into_bytes();
            }
            let e = base64::engine::general_purpose::STANDARD.encode(text);
            let lines: Vec<&[u8]> = match wrap {
                0 => vec![e.as_bytes()],
                w => e.as_bytes().chunks(w).collect(),
            };
            lines.join(&b'\n')
        };
        let t = tls(Some(inline(CERT)), Some(inline(CERT)), Some(inline(KEY)), allow_tls12).unwrap();
        prop_assert_eq!(t.identity().map(|i| i.loads()), Some(1));
        let mismatched = tls(Some(inline(CERT)), Some(inline(CERT)), Some(inline(OTHER_KEY)), allow_tls12);
        let refused = matches!(mismatched, Err(TlsError::Config(_)));
        prop_assert!(refused);
    }

    #[test]
    fn tls_connector_takes_any_host_or_refuses_it_by_name(
        host in prop_oneof![any::<String>(), near_valid_url()],
        port in any::<u16>(),
    ) {
        let t = tls(Some(CERT.as_bytes().to_vec()), None, None, false).unwrap();
        match t.connector(&host, port) {
            Ok(_) => {}
            Err(TlsError::ServerName(h)) => prop_assert_eq!(h, host),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hub kubeconfig
// ---------------------------------------------------------------------------------------------

/// Loads `text` as the hub kubeconfig (next to the test certificate and key files) and builds
/// the hub client from it: an error message where it fails.
fn load_hub_kubeconfig(text: &[u8]) -> Result<bool, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), CERT).unwrap();
    std::fs::write(dir.path().join("tls.key"), KEY).unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let path = dir.path().join("hub.kubeconfig");
    std::fs::write(&path, text).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = config_from_kubeconfig(&path).await.map_err(|e| e.to_string())?;
        let identity = hub_tls_config(&config, &path, false)
            .map_err(|e| e.to_string())?
            .identity
            .is_some();
        hub_client(config, &path, HubSecurity::default()).map_err(|e| e.to_string())?;
        Ok(identity)
    })
}

/// A kubeconfig of one cluster at `server` (the test certificate as CA) and one user.
fn kubeconfig_with_user(server: &str, user: Value) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(CERT);
    json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "hub",
        "clusters": [{"name": "hub", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": "agent", "user": user}],
        "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent"}}],
    })
    .to_string()
}

/// A hub kubeconfig with servers, CAs, users and contexts of the right and wrong kinds.
fn near_valid_kubeconfig() -> impl Strategy<Value = Value> {
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    let server = prop_oneof![near_valid_url(), Just("https://127.0.0.1:6443".to_string())];
    let cluster = (
        server,
        option::of(pem_input().prop_map(b64)),
        any::<bool>(),
        option::of(".{0,8}"),
    )
        .prop_map(|(server, ca, skip, sni)| {
            json!({"server": server, "certificate-authority-data": ca,
                "insecure-skip-tls-verify": skip, "tls-server-name": sni})
        });
    let file = || {
        option::of(select(vec![
            "tls.crt",
            "tls.key",
            "missing",
            "/nonexistent/x",
            "",
        ]))
    };
    let user = (
        option::of(pem_input().prop_map(b64)),
        option::of(pem_input().prop_map(b64)),
        file(),
        file(),
        // Tokens of characters a header can carry; see `kubeconfig_token_of_any_text_is_typed`.
        option::of("[ -~]{0,8}"),
        option::of(select(vec!["token", "missing"])),
    )
        .prop_map(|(cd, kd, cf, kf, token, token_file)| {
            json!({"client-certificate-data": cd, "client-key-data": kd, "client-certificate": cf,
                "client-key": kf, "token": token, "tokenFile": token_file})
        });
    let pointers = vec![
        "",
        "/clusters",
        "/clusters/0/cluster",
        "/users/0/user",
        "/contexts/0/context",
        "/current-context",
    ];
    let parts = (
        cluster,
        user,
        select(vec!["hub", "missing", ""]),
        mutation(pointers),
    );
    parts.prop_map(|(cluster, user, current, m)| {
        let kc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "hub", "cluster": cluster}],
            "users": [{"name": "agent", "user": user}],
            "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent", "namespace": "c1"}}],
            "current-context": current,
        });
        mutate(kc, m)
    })
}

proptest! {
    #[test]
    fn kubeconfig_of_any_text_is_typed(text in prop_oneof![any::<String>(), yaml_fragments()]) {
        if let Err(e) = load_hub_kubeconfig(text.as_bytes()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn kubeconfig_of_any_bytes_is_typed(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..512),
            (select(vec![[0xFE, 0xFF], [0xFF, 0xFE]]), vec(any::<u8>(), 0..64))
                .prop_map(|(bom, rest)| [bom.as_slice(), &rest].concat()),
        ],
    ) {
        if let Err(e) = load_hub_kubeconfig(&bytes) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn kubeconfig_near_valid_is_typed(kc in near_valid_kubeconfig(), yaml in any::<bool>()) {
        let text = if yaml { serde_yaml::to_string(&kc).unwrap() } else { kc.to_string() };
        if let Err(e) = load_hub_kubeconfig(text.as_bytes()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn kubeconfig_token_of_any_text_is_typed(
        token in prop_oneof![any::<String>(), "[a-z\\x00-\\x1f\\x7f]{1,8}"],
    ) {
        let kc = kubeconfig_with_user("https://127.0.0.1:6443", json!({"token": token}));
        if let Err(e) = load_hub_kubeconfig(kc.as_bytes()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn kubeconfig_generated_valid_loads(
        host in "[a-z][a-z0-9-]{0,12}",
        port in 1u16..,
        files in any::<bool>(),
    ) {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let user = if files {
            json!({"client-certificate": "tls.crt", "client-key": "tls.key"})
        } else {
            json!({"client-certificate-data": b64(CERT), "client-key-data": b64(KEY)})
        };
        let kc = kubeconfig_with_user(&format!("https://{host}:{port}"), user);
        prop_assert_eq!(load_hub_kubeconfig(kc.as_bytes()), Ok(files));
    }
}
