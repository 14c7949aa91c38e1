//! Property tests of the work engine's parsers of hub input: JSONPath, ManifestWork, manifests.
//!
//! Each property asserts no panic, no stack overflow and typed errors, plus a round trip or an
//! invariant where one is natural. The normal run uses proptest's default of 256 cases per
//! property; `PROPTEST_CASES=100000 cargo test --release -p spokelet-work --test properties` runs
//! each with 100,000 cases.

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Value, json};

use spokelet_work::applier::{IgnorePath, overlay_ignored};
use spokelet_work::feedback::{MAX_JSON_RAW, evaluate, validate_rules};
use spokelet_work::jsonpath::{
    CmpOp, Filter, JsonPath, JsonPathError, MAX_FILTER_DEPTH, MAX_PATH_CHARS, Step,
};
use spokelet_work::manifestwork::{
    FeedbackRule, FeedbackType, IgnoreFieldsCondition, JsonPath as FeedbackPath, Manifest, ManifestBundle,
    ManifestWork, ManifestWorkSpec, ManifestsTemplate,
};
use spokelet_work::object::{get_path, remove_path, set_path};
use spokelet_work::prepare::parse_manifests;
use spokelet_work::validate::{
    MAX_WORK_NAME, ValidateError, WorkLimits, check_label, check_limits, check_object_name, check_subdomain,
    json_depth, parse_manifest,
};

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Object keys: the names real paths and manifests use, tricky ones, and anything at all.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "a", "b", "c", "n", "type", "status", "spec", "metadata", "name", "namespace",
            "apiVersion", "kind", "x.y", "app.kubernetes.io/name", "", " ", "*", "0", "-1",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// Any finite float.
fn any_float() -> BoxedStrategy<f64> {
    (prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO).boxed()
}

/// Floats of a few decimal digits, which come back exactly from their JSON text.
fn short_float() -> BoxedStrategy<f64> {
    (any::<i32>(), 0i32..7)
        .prop_map(|(m, k)| f64::from(m) / 10f64.powi(k))
        .boxed()
}

/// JSON values a few levels deep, with keys paths are likely to hit and floats from `floats`.
fn json_value_with(floats: BoxedStrategy<f64>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        floats.prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        key().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 96, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any JSON value (floats of every magnitude and precision).
fn json_value() -> impl Strategy<Value = Value> {
    json_value_with(any_float())
}

/// JSON values whose text parses back to the same value (see `manifest_keeps_any_float_exactly`).
fn exact_json_value() -> impl Strategy<Value = Value> {
    json_value_with(short_float())
}

/// Pieces of JSONPath syntax, valid and broken, to be glued together at random.
const PATH_FRAGMENTS: &[&str] = &[
    ".a",
    ".b",
    ".status",
    ".type",
    ".*",
    "[*]",
    "[ * ]",
    "[0]",
    "[1]",
    "[-1]",
    "[ 2 ]",
    "[-]",
    "[99999999999999999999]",
    "[-9223372036854775808]",
    "[1:2]",
    "['a.b/c']",
    "[\"k\"]",
    "['x\\'y']",
    "['",
    "[\"",
    "\\",
    "[?(@",
    "[?(@)]",
    "[?(@.a)]",
    "[?(@.type==\"x\")]",
    "[?(@.n != 2)]",
    "[?( @.b == true )]",
    "[?(@.c==null)]",
    "[?(@.d==1.5e3)]",
    "[?(@.e==-0)]",
    "[?(@.f==x)]",
    ")]",
    ")",
    "]",
    "[",
    "..",
    ".",
    "$",
    "{",
    "}",
    "@",
    "?",
    "(",
    "==",
    "!=",
    "=",
    "!",
    " ",
    "\t",
    "'",
    "\"",
    "-",
    "é",
    "\u{0}",
    "status",
    "a-b/c",
    "[?(@.a[?(@.b)])]",
    "[?(@.a == 'x')].b",
];

/// Near-valid JSONPath text: fragments glued at random, with a few arbitrary characters.
fn near_valid_path() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            5 => select(PATH_FRAGMENTS).prop_map(String::from),
            1 => ".{0,4}",
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

/// How many times a unit is repeated: mostly within the caps, sometimes far past them.
fn repeat_count() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..16, 1usize..1_200, 1usize..30_000]
}

/// Units repeated thousands of times: deep filter nesting, long field chains, long strings.
fn deep_path() -> impl Strategy<Value = String> {
    let unit = select(vec![
        "[?(@", "[?(@.b", ".a", ".a.b.c", "[0]", "[*]", ".*", "[", "['x']", ")]", "a", "[?(@.a)]", "'", "\\",
    ]);
    vec((unit, repeat_count()), 1..4).prop_map(|parts| parts.into_iter().map(|(u, n)| u.repeat(n)).collect())
}

/// Optional whitespace inside brackets and filters.
fn ws() -> impl Strategy<Value = &'static str> {
    select(vec!["", "", " ", "  ", "\t"])
}

/// Field names the dotted form can carry.
fn ident() -> impl Strategy<Value = String> {
    "[\\p{Alphabetic}\\p{N}_/-]{1,12}"
}

/// `s` quoted with `q`, escaping what the parser unescapes.
fn quote(s: &str, q: char) -> String {
    let mut out = String::from(q);
    for c in s.chars() {
        if c == '\\' || c == q {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(q);
    out
}

/// A filter literal's text and the value it stands for.
fn literal() -> impl Strategy<Value = (String, Value)> {
    prop_oneof![
        (any::<String>(), select(vec!['\'', '"'])).prop_map(|(s, q)| (quote(&s, q), Value::String(s))),
        any::<i64>().prop_map(|i| (i.to_string(), Value::from(i))),
        select(vec!["true", "false", "null", "1.5", "-2.25", "1e3", "0"])
            .prop_map(|t| (t.to_string(), serde_json::from_str(t).unwrap())),
    ]
}

/// One step as text and as the step it must parse to; filters nest up to `depth` levels.
fn step(depth: u32, simple: bool) -> BoxedStrategy<(String, Step)> {
    let field = ident().prop_map(|id| (format!(".{id}"), Step::Field(id)));
    let quoted = (any::<String>(), select(vec!['\'', '"']), ws(), ws())
        .prop_map(|(k, q, a, b)| (format!("[{a}{}{b}]", quote(&k, q)), Step::Field(k)));
    let index = (any::<i64>(), ws(), ws()).prop_map(|(i, a, b)| (format!("[{a}{i}{b}]"), Step::Index(i)));
    if simple {
        return prop_oneof![field, quoted, index].boxed();
    }
    let wildcard = select(vec![".*", "[*]", "[ * ]"]).prop_map(|t| (t.to_string(), Step::Wildcard));
    let leaf = prop_oneof![field, quoted, index, wildcard];
    if depth == 0 {
        return leaf.boxed();
    }
    let cmp = option::of((
        select(vec![("==", CmpOp::Eq), ("!=", CmpOp::Ne)]),
        literal(),
        ws(),
        ws(),
    ));
    let filter = (vec(step(depth - 1, false), 0..4), cmp, ws(), ws()).prop_map(|(inner, cmp, a, b)| {
        let (texts, path): (Vec<String>, Vec<Step>) = inner.into_iter().unzip();
        let (cmp_text, cmp) = match cmp {
            Some(((op_text, op), (lit_text, lit), c, d)) => {
                (format!("{c}{op_text}{d}{lit_text}"), Some((op, lit)))
            }
            None => (String::new(), None),
        };
        let text = format!("[{a}?({a}@{}{cmp_text}{b}){b}]", texts.concat());
        (text, Step::Filter(Filter { path, cmp }))
    });
    prop_oneof![4 => leaf, 1 => filter].boxed()
}

/// A valid path as text (with the optional `$`, `{}` and dotless first field) and its steps.
fn valid_path(simple: bool) -> impl Strategy<Value = (String, Vec<Step>)> {
    let depth = if simple { 0 } else { 3 };
    (
        vec(step(depth, simple), 1..8),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(steps, dollar, braces, bare)| {
            let (mut texts, steps): (Vec<String>, Vec<Step>) = steps.into_iter().unzip();
            let bare_ok = matches!(&steps[0], Step::Field(f)
                if texts[0].starts_with('.') && f.starts_with(|c: char| c.is_alphanumeric() || c == '_'));
            if bare && bare_ok {
                texts[0].remove(0);
            }
            let mut text = format!("{}{}", if dollar { "$" } else { "" }, texts.concat());
            if braces {
                text = format!("{{ {text} }}");
            }
            (text, steps)
        })
}

/// Valid steps as text with nothing around them, so more steps can follow.
fn bare_steps() -> impl Strategy<Value = String> {
    vec(step(3, false), 0..6).prop_map(|steps| steps.into_iter().map(|(t, _)| t).collect())
}

/// Characters of `path` the length cap counts (`{}` and surrounding whitespace removed).
fn counted_chars(path: &str) -> usize {
    let mut s = path.trim();
    if s.starts_with('{') && s.ends_with('}') && s.len() >= 2 {
        s = s[1..s.len() - 1].trim();
    }
    s.chars().count()
}

/// A parse error that says what is wrong.
fn assert_typed_path_error(e: &JsonPathError) -> Result<(), TestCaseError> {
    prop_assert!(!e.to_string().is_empty());
    match e {
        JsonPathError::Empty => {}
        JsonPathError::TooLong { len, max } => prop_assert!(len > max && *max == MAX_PATH_CHARS),
        JsonPathError::Syntax { reason, .. } => prop_assert!(!reason.is_empty()),
    }
    Ok(())
}

/// apiVersion values: valid, empty, too many slashes, not strings.
fn api_version() -> impl Strategy<Value = Option<Value>> {
    option::of(prop_oneof![
        select(vec![
            "v1",
            "apps/v1",
            " apps/v1 ",
            "a/b/c",
            "",
            " ",
            "/v1",
            "apps/",
            "/",
            "x.io/v1beta1",
            "../v1",
            "Apps/v1",
            "apps/V1",
            "a..b/v1",
            ".x/v1",
            "apps/v1%2F"
        ])
        .prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        exact_json_value(),
    ])
}

/// kind values.
fn kind() -> impl Strategy<Value = Option<Value>> {
    option::of(prop_oneof![
        select(vec![
            "ConfigMap",
            "Deployment",
            "CustomResourceDefinition",
            "",
            "  "
        ])
        .prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        exact_json_value(),
    ])
}

/// metadata: absent, not an object, or an object with name, namespace and generateName variations.
fn metadata() -> impl Strategy<Value = Option<Value>> {
    let s = || option::of(prop_oneof![3 => name_text().prop_map(Value::from), 1 => exact_json_value()]);
    let object = (s(), s(), option::of(exact_json_value())).prop_map(|(name, ns, gen_name)| {
        let mut m = serde_json::Map::new();
        for (k, v) in [("name", name), ("namespace", ns), ("generateName", gen_name)] {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        Value::Object(m)
    });
    option::of(prop_oneof![4 => object, 1 => exact_json_value()])
}

/// Names and namespaces: valid, path-breaking, too long, anything.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "a", "", " ", "default", "n-1", ".", "..", "a/b", "%", "UPPER", "-x", "x-", "a..b", "x\u{7}",
        ])
        .prop_map(String::from),
        2 => "[a-z0-9.:/%-]{0,70}",
        1 => "[a-z0-9-]{60,260}",
        1 => any::<String>(),
    ]
}

/// A Kubernetes object with its required fields present, missing, empty or of the wrong type.
fn near_valid_manifest() -> impl Strategy<Value = Value> {
    (api_version(), kind(), metadata(), option::of(exact_json_value())).prop_map(|(api, kind, meta, data)| {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("apiVersion", api),
            ("kind", kind),
            ("metadata", meta),
            ("data", data),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        Value::Object(m)
    })
}

/// A manifest: near-valid mostly, anything sometimes.
fn manifest_value() -> impl Strategy<Value = Value> {
    prop_oneof![3 => near_valid_manifest(), 1 => exact_json_value()]
}

/// A string field of the wire types, or a value of the wrong type.
fn wire_str(names: Vec<&'static str>) -> impl Strategy<Value = Value> {
    prop_oneof![4 => select(names).prop_map(Value::from), 1 => exact_json_value()]
}

/// `manifestConfigs` entries with strategies, ignoreFields and feedback rules.
fn manifest_config() -> impl Strategy<Value = Value> {
    let id = (
        wire_str(vec!["", "apps"]),
        wire_str(vec!["deployments", "configmaps"]),
        wire_str(vec!["a", "*"]),
        wire_str(vec!["", "default", "*"]),
    )
        .prop_map(|(g, r, n, ns)| json!({"group": g, "resource": r, "name": n, "namespace": ns}));
    let paths = || vec(near_valid_path(), 0..3);
    let feedback = (
        wire_str(vec!["WellKnownStatus", "JSONPaths", "jsonpaths"]),
        paths(),
    )
        .prop_map(|(t, ps)| {
            let paths: Vec<Value> = ps.iter().map(|p| json!({"name": "v", "path": p})).collect();
            json!({"type": t, "jsonPaths": paths})
        });
    let strategy = (
        wire_str(vec![
            "Update",
            "CreateOnly",
            "ServerSideApply",
            "ReadOnly",
            "Replace",
        ]),
        any::<bool>(),
        wire_str(vec!["OnSpokePresent", "OnSpokeChange", "Always"]),
        paths(),
    )
        .prop_map(|(t, force, cond, ps)| {
            json!({"type": t, "serverSideApply": {"force": force, "fieldManager": "m",
                "ignoreFields": [{"condition": cond, "jsonPaths": ps}]}})
        });
    (id, vec(feedback, 0..2), option::of(strategy)).prop_map(|(id, fb, st)| {
        let mut c = json!({"resourceIdentifier": id, "feedbackRules": fb});
        if let Some(st) = st {
            c["updateStrategy"] = st;
        }
        c
    })
}

/// `deleteOption` with every policy, orphaning rules and a wrong value now and then.
fn delete_option() -> impl Strategy<Value = Value> {
    (
        wire_str(vec!["Foreground", "Orphan", "SelectivelyOrphan", "Background"]),
        vec(wire_str(vec!["configmaps", ""]), 0..3),
        option::of(exact_json_value()),
    )
        .prop_map(|(policy, rules, ttl)| {
            let rules: Vec<Value> = rules
                .into_iter()
                .map(|r| json!({"resource": r, "name": "a"}))
                .collect();
            let mut d = json!({"propagationPolicy": policy, "selectivelyOrphans": {"orphaningRules": rules}});
            if let Some(ttl) = ttl {
                d["ttlSecondsAfterFinished"] = ttl;
            }
            d
        })
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
    option::of((select(pointers), exact_json_value()))
}

/// A ManifestWork as the hub's API returns it, sometimes broken in one place.
fn near_valid_work() -> impl Strategy<Value = Value> {
    let pointers = vec![
        "",
        "/metadata",
        "/metadata/name",
        "/spec",
        "/spec/workload",
        "/spec/workload/manifests",
        "/spec/deleteOption",
        "/spec/manifestConfigs",
        "/spec/executor",
        "/status",
    ];
    (
        ".{0,12}",
        vec(manifest_value(), 0..4),
        option::of(delete_option()),
        vec(manifest_config(), 0..3),
        mutation(pointers),
    )
        .prop_map(|(name, manifests, del, configs, m)| {
            let mut w = json!({
                "apiVersion": "work.open-cluster-management.io/v1",
                "kind": "ManifestWork",
                "metadata": {"name": name, "namespace": "c1"},
                "spec": {"workload": {"manifests": manifests}, "manifestConfigs": configs,
                    "executor": {"subject": {"type": "ServiceAccount",
                        "serviceAccount": {"namespace": "n", "name": "s"}}}},
            });
            if let Some(d) = del {
                w["spec"]["deleteOption"] = d;
            }
            mutate(w, m)
        })
}

/// A ManifestBundle as the gRPC hub sends it, sometimes broken in one place.
fn near_valid_bundle() -> impl Strategy<Value = Value> {
    let pointers = vec!["", "/manifests", "/deleteOption", "/manifestConfigs", "/executer"];
    (
        vec(manifest_value(), 0..4),
        option::of(delete_option()),
        vec(manifest_config(), 0..3),
        mutation(pointers),
    )
        .prop_map(|(manifests, del, configs, m)| {
            let mut b = json!({"manifests": manifests, "manifestConfigs": configs,
                "executer": {"subject": {"type": "ServiceAccount"}}});
            if let Some(d) = del {
                b["deleteOption"] = d;
            }
            mutate(b, m)
        })
}

/// JSON text nested far deeper than serde_json's recursion limit, closed or not.
fn deeply_nested_json() -> impl Strategy<Value = String> {
    let open = select(vec!["[", "{\"a\":", "{\"spec\":", "{\"manifests\":["]);
    (
        Just("{\"metadata\":{},\"spec\":{\"workload\":{\"manifests\":["),
        open,
        1usize..100_000,
        any::<bool>(),
    )
        .prop_map(|(head, open, n, close)| {
            let mut s = format!("{head}{}", open.repeat(n));
            if close {
                s.push_str(&"]".repeat(n));
            }
            s
        })
}

/// A work with these manifests.
fn work_of(manifests: Vec<Value>) -> ManifestWork {
    let spec = ManifestWorkSpec {
        workload: ManifestsTemplate {
            manifests: manifests.into_iter().map(Manifest::from).collect(),
        },
        ..Default::default()
    };
    ManifestWork::new("w", spec)
}

/// The part of manifest `v` a `BadName` error for `field` is about.
fn bad_name_input<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    let api = v["apiVersion"].as_str()?.trim();
    let (group, version) = api.split_once('/').unwrap_or(("", api));
    match field {
        "metadata.name" => v["metadata"]["name"].as_str(),
        "metadata.namespace" => v["metadata"]["namespace"].as_str(),
        "apiVersion group" => Some(group),
        "apiVersion version" => Some(version),
        _ => None,
    }
}

/// A `BadName` error for `field` that quotes (the start of) `input`.
fn assert_bad_name(e: ValidateError, field: &str, input: &str) -> Result<(), TestCaseError> {
    match e {
        ValidateError::BadName { field: f, value, why } => {
            prop_assert_eq!(f, field);
            prop_assert_eq!(value, input.chars().take(100).collect::<String>());
            prop_assert!(!why.is_empty());
        }
        other => prop_assert!(false, "unexpected error {}", other),
    }
    Ok(())
}

/// What `parse_manifest` must say about `v`, from the rules every manifest has to follow.
fn expected_manifest_error(v: &Value) -> Option<String> {
    let o = v.as_object()?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let api = s(o.get("apiVersion")).trim().to_string();
    let meta = o.get("metadata");
    let mut missing = Vec::new();
    if api.is_empty() {
        missing.push("apiVersion");
    }
    if s(o.get("kind")).trim().is_empty() {
        missing.push("kind");
    }
    if s(meta.and_then(|m| m.get("name"))).is_empty() {
        missing.push("metadata.name");
    }
    if !missing.is_empty() {
        return Some(ValidateError::Missing(missing).to_string());
    }
    if meta.and_then(|m| m.get("generateName")).is_some() {
        return Some(ValidateError::GenerateName.to_string());
    }
    let version = api.split_once('/').map_or(api.as_str(), |(_, v)| v);
    if version.is_empty() || api.matches('/').count() > 1 {
        return Some(ValidateError::ApiVersion(api).to_string());
    }
    None
}

// ---------------------------------------------------------------------------------------------
// JSONPath
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn jsonpath_parse_never_panics_on_any_text(s in any::<String>()) {
        match JsonPath::parse(&s) {
            Ok(p) => prop_assert!(!p.steps.is_empty()),
            Err(e) => assert_typed_path_error(&e)?,
        }
    }

    #[test]
    fn jsonpath_parse_never_panics_on_near_valid_fragments(s in near_valid_path()) {
        match JsonPath::parse(&s) {
            Ok(p) => prop_assert!(!p.steps.is_empty()),
            Err(e) => assert_typed_path_error(&e)?,
        }
    }

    #[test]
    fn jsonpath_parse_survives_deep_repetition_without_stack_overflow(s in deep_path()) {
        match JsonPath::parse(&s) {
            Ok(_) => prop_assert!(counted_chars(&s) <= MAX_PATH_CHARS),
            Err(JsonPathError::TooLong { len, max }) => {
                prop_assert_eq!(len, counted_chars(&s));
                prop_assert_eq!(max, MAX_PATH_CHARS);
            }
            Err(e) => {
                prop_assert!(counted_chars(&s) <= MAX_PATH_CHARS, "{}", e);
                assert_typed_path_error(&e)?;
            }
        }
    }

    #[test]
    fn jsonpath_longer_than_the_cap_is_too_long(
        base in near_valid_path(),
        pad in select(vec![".a", "[?(@", "x", "é"]),
    ) {
        let n = (MAX_PATH_CHARS + 1).div_ceil(pad.chars().count());
        let s = format!(".{base}{}", pad.repeat(n));
        let len = s.chars().count();
        prop_assert_eq!(JsonPath::parse(&s), Err(JsonPathError::TooLong { len, max: MAX_PATH_CHARS }));
    }

    #[test]
    fn jsonpath_filter_nesting_is_capped(depth in 0..=3 * MAX_FILTER_DEPTH, doc in json_value()) {
        let s = format!(".a{}{}", "[?(@.b".repeat(depth), ")]".repeat(depth));
        match JsonPath::parse(&s) {
            Ok(p) => {
                prop_assert!(depth <= MAX_FILTER_DEPTH);
                let _ = p.eval(&doc);
            }
            Err(JsonPathError::Syntax { reason, .. }) => {
                prop_assert!(depth > MAX_FILTER_DEPTH);
                prop_assert!(reason.contains("nested deeper"), "{}", reason);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn jsonpath_valid_path_parses_to_the_generated_steps((text, steps) in valid_path(false)) {
        let got = JsonPath::parse(&text);
        if counted_chars(&text) > MAX_PATH_CHARS {
            let too_long = matches!(got, Err(JsonPathError::TooLong { .. }));
            prop_assert!(too_long, "{:?}", got);
        } else {
            prop_assert_eq!(got, Ok(JsonPath { steps }), "{}", text);
        }
    }

    #[test]
    fn jsonpath_eval_never_panics_on_any_document(s in near_valid_path(), doc in json_value()) {
        if let Ok(p) = JsonPath::parse(&s) {
            let _ = p.eval(&doc);
        }
    }

    #[test]
    fn jsonpath_eval_of_valid_paths_never_panics((text, _) in valid_path(false), doc in json_value()) {
        if let Ok(p) = JsonPath::parse(&text) {
            let _ = p.eval(&doc);
        }
    }

    #[test]
    fn jsonpath_simple_paths_select_what_get_path_reads(
        (text, steps) in valid_path(true),
        doc in json_value(),
    ) {
        let p = JsonPath::parse(&text).unwrap();
        prop_assert_eq!(p.simple(), Some(steps.as_slice()));
        prop_assert_eq!(p.eval(&doc), get_path(&doc, &steps).into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn jsonpath_wildcard_selects_every_child(doc in json_value()) {
        let children = match &doc {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            _ => 0,
        };
        prop_assert_eq!(JsonPath::parse("[*]").unwrap().eval(&doc).len(), children);
    }

    #[test]
    fn jsonpath_filter_selects_a_subset_of_the_elements(text in bare_steps(), doc in json_value()) {
        let all = JsonPath::parse(&format!("{text}[*]")).unwrap();
        let some = JsonPath::parse(&format!("{text}[?(@.a)]")).unwrap();
        prop_assert!(some.eval(&doc).len() <= all.eval(&doc).len());
    }
}

// ---------------------------------------------------------------------------------------------
// ignoreFields paths written into objects
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn set_path_then_get_path_returns_the_value(
        (_, steps) in valid_path(true),
        doc in json_value(),
        val in json_value(),
    ) {
        let mut doc = doc;
        if set_path(&mut doc, &steps, val.clone()) {
            prop_assert_eq!(get_path(&doc, &steps), Some(&val));
        }
    }

    #[test]
    fn remove_path_then_get_path_finds_nothing((_, steps) in valid_path(true), doc in json_value()) {
        let mut doc = doc;
        if remove_path(&mut doc, &steps) {
            prop_assert_eq!(get_path(&doc, &steps), None);
        }
    }

    #[test]
    fn overlay_ignored_never_panics(
        paths in vec(prop_oneof![near_valid_path(), valid_path(true).prop_map(|p| p.0)], 0..6),
        on_change in any::<bool>(),
        desired in json_value(),
        live in option::of(json_value()),
    ) {
        let condition = if on_change {
            IgnoreFieldsCondition::OnSpokeChange
        } else {
            IgnoreFieldsCondition::OnSpokePresent
        };
        let ignore: Vec<IgnorePath> = paths
            .iter()
            .filter_map(|raw| {
                let steps = JsonPath::parse(raw).ok()?.simple()?.to_vec();
                Some(IgnorePath { condition, raw: raw.clone(), steps })
            })
            .collect();
        let mut desired = desired;
        let notes = overlay_ignored(&mut desired, live.as_ref(), &ignore, "hash");
        prop_assert!(notes.len() <= ignore.len());
        prop_assert!(notes.iter().all(|n| !n.is_empty()));
    }
}

// ---------------------------------------------------------------------------------------------
// Feedback rules
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn feedback_rules_give_one_value_or_error_per_path(
        paths in vec(prop_oneof![near_valid_path(), valid_path(false).prop_map(|p| p.0)], 0..6),
        doc in json_value(),
    ) {
        let rule = FeedbackRule {
            type_: FeedbackType::JsonPaths,
            json_paths: paths
                .iter()
                .map(|p| FeedbackPath { name: "v".into(), version: String::new(), path: p.clone() })
                .collect(),
        };
        let fb = evaluate(std::slice::from_ref(&rule), "apps", "Deployment", "v1", &doc);
        prop_assert_eq!(fb.values.len() + fb.errors.len(), paths.len());
        prop_assert!(fb.errors.iter().all(|e| !e.is_empty()));
        let raw_fits = |r: &String| r.len() <= MAX_JSON_RAW;
        prop_assert!(fb.values.iter().all(|v| v.field_value.json_raw.as_ref().is_none_or(raw_fits)));
        let bad = paths.iter().filter(|p| JsonPath::parse(p).is_err()).count();
        prop_assert_eq!(validate_rules(&[rule]).len(), bad);
    }

    #[test]
    fn well_known_feedback_never_fails(
        group in select(vec!["", "apps", "batch", "x"]),
        kind in select(vec!["Deployment", "DaemonSet", "Job", "Pod", "ConfigMap"]),
        doc in json_value(),
    ) {
        let rule = FeedbackRule { type_: FeedbackType::WellKnownStatus, json_paths: vec![] };
        prop_assert!(evaluate(&[rule], group, kind, "v1", &doc).errors.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// ManifestWork and ManifestBundle deserialization
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn manifest_work_from_any_json_value_is_typed(v in json_value()) {
        if let Err(e) = serde_json::from_value::<ManifestWork>(v) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn manifest_work_from_any_text_is_typed(s in any::<String>()) {
        if let Err(e) = serde_json::from_str::<ManifestWork>(&s) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn manifest_work_from_any_bytes_is_typed(b in vec(any::<u8>(), 0..512)) {
        if let Err(e) = serde_json::from_slice::<ManifestWork>(&b) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn manifest_work_from_deeply_nested_json_is_an_error(s in deeply_nested_json()) {
        let e = serde_json::from_str::<ManifestWork>(&s).unwrap_err();
        prop_assert!(!e.to_string().is_empty());
    }

    #[test]
    fn manifest_work_near_valid_round_trips(v in near_valid_work()) {
        match serde_json::from_value::<ManifestWork>(v) {
            Ok(w) => {
                let back: ManifestWork = serde_json::from_value(serde_json::to_value(&w).unwrap()).unwrap();
                prop_assert_eq!(&back.metadata, &w.metadata);
                prop_assert_eq!(&back.spec, &w.spec);
                prop_assert_eq!(&back.status, &w.status);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn manifest_work_near_valid_text_truncated_is_typed(v in near_valid_work(), cut in any::<Index>()) {
        let text = serde_json::to_string(&v).unwrap();
        let cut = cut.index(text.chars().count().max(1));
        let cut = text.char_indices().map(|(i, _)| i).nth(cut).unwrap_or(0);
        if let Err(e) = serde_json::from_str::<ManifestWork>(&text[..cut]) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn manifest_bundle_from_any_bytes_is_typed(b in vec(any::<u8>(), 0..512)) {
        if let Err(e) = serde_json::from_slice::<ManifestBundle>(&b) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn manifest_bundle_round_trips_through_the_work_spec(v in near_valid_bundle()) {
        if let Ok(b) = serde_json::from_value::<ManifestBundle>(v) {
            prop_assert_eq!(&ManifestBundle::from(&b.clone().into_spec()), &b);
            let back: ManifestBundle = serde_json::from_value(serde_json::to_value(&b).unwrap()).unwrap();
            prop_assert_eq!(back, b);
        }
    }

    #[test]
    #[ignore = "serde_json is built without `float_roundtrip`, so Manifest::value() can return a float \
                one ULP off the one the manifest was made from (7.045084618320132e+224 comes back as \
                7.045084618320133e+224), and ManifestsTemplate::json_len then differs from the \
                serialized length"]
    fn manifest_keeps_any_float_exactly(f in any_float()) {
        let v = json!([f]);
        prop_assert_eq!(Manifest::from(v.clone()).value().unwrap(), v);
    }

    #[test]
    fn manifest_keeps_any_value(v in exact_json_value()) {
        let m = Manifest::from(v.clone());
        prop_assert_eq!(m.value().unwrap(), v);
        prop_assert_eq!(Manifest::from(m.value().unwrap()), m);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest validation
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn parse_manifest_never_panics_on_any_value(v in json_value()) {
        match parse_manifest(&v) {
            Ok(p) => {
                prop_assert!(!p.kind.is_empty() && !p.name.is_empty() && !p.version.is_empty());
                prop_assert_eq!(p.content_hash.len(), 32);
                prop_assert_eq!(p.obj, v);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn parse_manifest_follows_the_required_field_rules(v in near_valid_manifest()) {
        match (parse_manifest(&v), expected_manifest_error(&v)) {
            (Ok(p), None) => {
                let api = v["apiVersion"].as_str().unwrap().trim();
                let joined = match p.group.as_str() {
                    "" => p.version.clone(),
                    g => format!("{g}/{}", p.version),
                };
                // "/v1" is core "v1", as apimachinery's ParseGroupVersion reads it.
                let core = p.group.is_empty() && api == format!("/{}", p.version);
                prop_assert!(joined == api || core, "{} parsed as {}/{}", api, p.group, p.version);
                prop_assert_eq!(Some(p.name.as_str()), v["metadata"]["name"].as_str());
                let namespace = v["metadata"]["namespace"].as_str().filter(|s| !s.is_empty());
                prop_assert_eq!(p.namespace.as_deref(), namespace);
            }
            (Err(ValidateError::BadName { field, value, why }), None) => {
                let got = bad_name_input(&v, field);
                prop_assert!(got.is_some(), "unexpected field {}", field);
                prop_assert_eq!(value, got.unwrap().chars().take(100).collect::<String>());
                prop_assert!(!why.is_empty());
            }
            (Err(e), Some(want)) => prop_assert_eq!(e.to_string(), want),
            (got, want) => prop_assert!(false, "got {:?}, expected error {:?}", got, want),
        }
    }

    #[test]
    fn parse_manifests_reports_every_manifest(manifests in vec(manifest_value(), 0..8)) {
        let work = work_of(manifests);
        let (results, parsed) = parse_manifests(&work);
        prop_assert_eq!(results.len(), work.spec.workload.manifests.len());
        prop_assert_eq!(parsed.len(), results.len());
        let manifests = &work.spec.workload.manifests;
        for (i, (r, (p, m))) in results.iter().zip(parsed.iter().zip(manifests)).enumerate() {
            prop_assert_eq!(r.meta.ordinal as usize, i);
            prop_assert_eq!(r.error.is_some(), p.is_none());
            prop_assert!(r.error.as_ref().is_none_or(|e| !e.to_string().is_empty()));
            prop_assert_eq!(p, &parse_manifest(&m.value().unwrap()).ok());
        }
    }

    #[test]
    fn check_size_refuses_exactly_what_is_over_the_limit(
        manifests in vec(exact_json_value(), 0..6),
        limit in 0usize..4096,
    ) {
        let work = work_of(manifests);
        let size = serde_json::to_vec(&work.spec.workload).unwrap().len();
        prop_assert_eq!(work.spec.workload.json_len(), size);
        let limits = WorkLimits {
            max_work_bytes: limit,
            max_manifests: usize::MAX,
            max_json_paths: usize::MAX,
            max_json_depth: usize::MAX,
        };
        match check_limits(&work, &limits) {
            Ok(()) => prop_assert!(size <= limit),
            Err(ValidateError::TooLarge { size: s, limit: l }) => {
                prop_assert!(size > limit);
                prop_assert_eq!((s, l), (size, limit));
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn json_depth_from_the_text_is_the_depth_of_the_parsed_tree(v in exact_json_value()) {
        fn depth(v: &Value) -> usize {
            match v {
                Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        let text = serde_json::to_string(&v).unwrap();
        prop_assert_eq!(json_depth(&text), depth(&v));
    }
}

// ---------------------------------------------------------------------------------------------
// Names that go into request paths
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn check_object_name_accepts_only_path_safe_names(s in name_text()) {
        match check_object_name("metadata.name", &s) {
            Ok(()) => {
                prop_assert!(s.len() <= 253 && s != "." && s != "..");
                prop_assert!(!s.contains(['/', '%']) && !s.chars().any(char::is_control));
            }
            Err(e) => assert_bad_name(e, "metadata.name", &s)?,
        }
    }

    #[test]
    fn check_object_name_accepts_generated_names(s in "[a-zA-Z0-9:._-]{1,253}") {
        prop_assume!(s != "." && s != "..");
        prop_assert!(check_object_name("metadata.name", &s).is_ok());
    }

    #[test]
    fn check_label_accepts_only_dns_labels(s in name_text()) {
        match check_label("metadata.namespace", &s) {
            Ok(()) => {
                prop_assert!(!s.is_empty() && s.len() <= 63);
                prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                prop_assert!(!s.starts_with('-') && !s.ends_with('-'));
            }
            Err(e) => assert_bad_name(e, "metadata.namespace", &s)?,
        }
    }

    #[test]
    fn check_label_accepts_generated_labels(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
        prop_assert!(check_label("metadata.namespace", &s).is_ok());
    }

    #[test]
    fn check_subdomain_accepts_only_dns_subdomains(s in name_text(), max in 0usize..300) {
        match check_subdomain("work name", &s, max) {
            Ok(()) => {
                prop_assert!(s.len() <= max);
                let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.';
                prop_assert!(s.bytes().all(ok));
                let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
                prop_assert!(alnum(s.bytes().next()) && alnum(s.bytes().last()));
            }
            Err(e) => assert_bad_name(e, "work name", &s)?,
        }
    }

    #[test]
    fn check_subdomain_accepts_generated_work_names(s in "[a-z0-9]([a-z0-9.-]{0,120}[a-z0-9])?") {
        prop_assert!(check_subdomain("work name", &s, MAX_WORK_NAME).is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// Claims: the work index agrees with a plain list of every claim
// ---------------------------------------------------------------------------------------------

/// One step on the claims: claim, preload, or drop a work's claims except some objects.
#[derive(Debug, Clone)]
enum ClaimOp {
    Claim { key: u8, work: u8, content: u8 },
    Preload { key: u8, work: u8 },
    Retain { work: u8, keep: Vec<u8> },
}

fn claim_op() -> impl Strategy<Value = ClaimOp> {
    prop_oneof![
        3 => (0u8..6, 0u8..4, 0u8..2).prop_map(|(key, work, content)| ClaimOp::Claim { key, work, content }),
        1 => (0u8..6, 0u8..4).prop_map(|(key, work)| ClaimOp::Preload { key, work }),
        2 => (0u8..4, vec(0u8..6, 0..3)).prop_map(|(work, keep)| ClaimOp::Retain { work, keep }),
    ]
}

fn claim_key(n: u8) -> spokelet_work::object::ObjKey {
    spokelet_work::object::ObjKey {
        group: String::new(),
        resource: "configmaps".into(),
        namespace: "ns".into(),
        name: format!("o{n}"),
    }
}

proptest! {
    #[test]
    fn claims_answer_as_a_plain_list_of_claims_would(ops in vec(claim_op(), 0..60)) {
        use spokelet_work::claims::Claims;
        // The model: (key, work, content) in claim order; None content for preloads.
        let mut model: Vec<(u8, u8, Option<u8>)> = Vec::new();
        let mut claims = Claims::default();
        for op in ops {
            match op {
                ClaimOp::Claim { key, work, content } => {
                    let conflict = model.iter().any(|(k, w, c)| *k == key && *w != work && *c != Some(content));
                    let got = claims.claim(&claim_key(key), &format!("w{work}"), 0, &format!("c{content}"));
                    prop_assert_eq!(got.is_err(), conflict);
                    if !conflict {
                        model.retain(|(k, w, _)| !(*k == key && *w == work));
                        model.push((key, work, Some(content)));
                    }
                }
                ClaimOp::Preload { key, work } => {
                    claims.preload(&claim_key(key), &format!("w{work}"));
                    if !model.iter().any(|(k, w, _)| *k == key && *w == work) {
                        model.push((key, work, None));
                    }
                }
                ClaimOp::Retain { work, keep } => {
                    let keep_keys = keep.iter().map(|k| claim_key(*k)).collect();
                    claims.retain_work(&format!("w{work}"), &keep_keys);
                    model.retain(|(k, w, _)| *w != work || keep.contains(k));
                }
            }
            for key in 0u8..6 {
                prop_assert_eq!(claims.is_claimed(&claim_key(key)), model.iter().any(|(k, _, _)| *k == key));
                let owners: Vec<String> = claims.owners(&claim_key(key)).into_iter().map(|(w, _)| w).collect();
                let expected: Vec<String> =
                    model.iter().filter(|(k, _, _)| *k == key).map(|(_, w, _)| format!("w{w}")).collect();
                prop_assert_eq!(owners, expected);
            }
        }
    }
}
