//! Status feedback: reads values from a live object by well-known names or JSON paths and types them.

use serde_json::Value;

use super::jsonpath::JsonPath;
use super::manifestwork::{FeedbackRule, FeedbackType, FeedbackValue, FieldValue, ValueType};

/// Longest JsonRaw value the wire carries.
pub const MAX_JSON_RAW: usize = 1024;

/// Result of evaluating a manifest's feedback rules.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Feedback {
    /// Values in rule order.
    pub values: Vec<FeedbackValue>,
    /// One message per rule that failed (bad path, missing value, value too large).
    pub errors: Vec<String>,
}

/// Well-known values per (group, kind): (feedback name, path).
fn well_known(group: &str, kind: &str) -> &'static [(&'static str, &'static str)] {
    match (group, kind) {
        ("apps", "Deployment") => &[
            ("ReadyReplicas", ".status.readyReplicas"),
            ("Replicas", ".status.replicas"),
            ("AvailableReplicas", ".status.availableReplicas"),
        ],
        ("apps", "DaemonSet") => &[
            ("NumberReady", ".status.numberReady"),
            ("DesiredNumberScheduled", ".status.desiredNumberScheduled"),
            ("NumberAvailable", ".status.numberAvailable"),
        ],
        ("batch", "Job") => &[
            (
                "JobComplete",
                r#".status.conditions[?(@.type=="Complete")].status"#,
            ),
            ("JobSucceeded", ".status.succeeded"),
        ],
        ("", "Pod") => &[
            ("PodReady", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("PodPhase", ".status.phase"),
        ],
        _ => &[],
    }
}

/// Checks every JSONPaths rule parses, so bad paths are reported even before the object exists.
pub fn validate_rules(rules: &[FeedbackRule]) -> Vec<String> {
    let mut errs = Vec::new();
    for r in rules.iter().filter(|r| r.type_ == FeedbackType::JsonPaths) {
        for p in &r.json_paths {
            if let Err(e) = JsonPath::parse(&p.path) {
                errs.push(format!("feedback rule {:?}: {e}", p.name));
            }
        }
    }
    errs
}

/// Evaluates the rules against `obj` (a live object of the given group/kind/version).
pub fn evaluate(rules: &[FeedbackRule], group: &str, kind: &str, version: &str, obj: &Value) -> Feedback {
    let mut fb = Feedback::default();
    for rule in rules {
        match rule.type_ {
            FeedbackType::WellKnownStatus => {
                for (name, path) in well_known(group, kind) {
                    let Ok(p) = JsonPath::parse(path) else { continue };
                    // Absent well-known values are skipped, not errors: a Deployment with no ready
                    // pods omits readyReplicas entirely.
                    if let Ok(Some(v)) = typed(&p.eval(obj)) {
                        fb.values.push(FeedbackValue {
                            name: (*name).to_string(),
                            field_value: v,
                        });
                    }
                }
            }
            FeedbackType::JsonPaths => {
                for jp in &rule.json_paths {
                    if !jp.version.is_empty() && jp.version != version {
                        continue;
                    }
                    let p = match JsonPath::parse(&jp.path) {
                        Ok(p) => p,
                        Err(e) => {
                            fb.errors.push(format!("feedback rule {:?}: {e}", jp.name));
                            continue;
                        }
                    };
                    match typed(&p.eval(obj)) {
                        Ok(Some(v)) => fb.values.push(FeedbackValue {
                            name: jp.name.clone(),
                            field_value: v,
                        }),
                        Ok(None) => fb
                            .errors
                            .push(format!("feedback rule {:?}: no value at {}", jp.name, jp.path)),
                        Err(e) => fb.errors.push(format!("feedback rule {:?}: {e}", jp.name)),
                    }
                }
            }
        }
    }
    fb
}

/// Types the values a path selected: scalars keep their type, objects/lists (or several matches)
/// become JsonRaw. Ok(None) when nothing (or only null) matched.
pub fn typed(found: &[&Value]) -> Result<Option<FieldValue>, String> {
    let v = match found {
        [] => return Ok(None),
        [one] => (*one).clone(),
        many => Value::Array(many.iter().map(|v| (*v).clone()).collect()),
    };
    let fv = match v {
        Value::Null => return Ok(None),
        Value::Bool(b) => FieldValue {
            type_: ValueType::Boolean,
            boolean: Some(b),
            ..Default::default()
        },
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue {
                type_: ValueType::Integer,
                integer: Some(i),
                ..Default::default()
            },
            // Non-integers have no numeric wire type; send their text.
            None => FieldValue {
                type_: ValueType::String,
                string: Some(n.to_string()),
                ..Default::default()
            },
        },
        Value::String(s) => FieldValue {
            type_: ValueType::String,
            string: Some(s),
            ..Default::default()
        },
        other => {
            let raw = serde_json::to_string(&other).map_err(|e| e.to_string())?;
            if raw.len() > MAX_JSON_RAW {
                return Err(format!(
                    "value is {} characters of JSON, over the {MAX_JSON_RAW} limit",
                    raw.len()
                ));
            }
            FieldValue {
                type_: ValueType::JsonRaw,
                json_raw: Some(raw),
                ..Default::default()
            }
        }
    };
    Ok(Some(fv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifestwork::JsonPath as Jp;
    use serde_json::json;

    fn rule(paths: &[(&str, &str)]) -> FeedbackRule {
        FeedbackRule {
            type_: FeedbackType::JsonPaths,
            json_paths: paths
                .iter()
                .map(|(n, p)| Jp {
                    name: n.to_string(),
                    version: String::new(),
                    path: p.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn well_known_deployment() {
        let d = json!({"status": {"replicas": 2, "readyReplicas": 1}});
        let r = FeedbackRule {
            type_: FeedbackType::WellKnownStatus,
            json_paths: vec![],
        };
        let fb = evaluate(&[r], "apps", "Deployment", "v1", &d);
        let names: Vec<_> = fb.values.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["ReadyReplicas", "Replicas"]);
        assert!(fb.errors.is_empty());
    }

    #[test]
    fn well_known_job_and_pod() {
        let j = json!({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}});
        let r = FeedbackRule {
            type_: FeedbackType::WellKnownStatus,
            json_paths: vec![],
        };
        let fb = evaluate(std::slice::from_ref(&r), "batch", "Job", "v1", &j);
        assert_eq!(fb.values[0].name, "JobComplete");
        assert_eq!(fb.values[0].field_value.string.as_deref(), Some("True"));
        assert_eq!(fb.values[1].field_value.integer, Some(1));
        let p = json!({"status": {"phase": "Running"}});
        let fb = evaluate(&[r], "", "Pod", "v1", &p);
        assert_eq!(fb.values[0].name, "PodPhase");
    }

    #[test]
    fn json_paths_typed() {
        let o = json!({"a": 1, "b": "x", "c": true, "d": {"k": [1, 2]}, "e": 1.5, "f": null});
        let fb = evaluate(
            &[rule(&[
                ("a", ".a"),
                ("b", ".b"),
                ("c", ".c"),
                ("d", ".d"),
                ("e", ".e"),
                ("f", ".f"),
                ("bad", ".a["),
                ("g", ".g"),
            ])],
            "",
            "ConfigMap",
            "v1",
            &o,
        );
        let t: Vec<_> = fb
            .values
            .iter()
            .map(|v| (v.name.as_str(), v.field_value.type_))
            .collect();
        assert_eq!(
            t,
            [
                ("a", ValueType::Integer),
                ("b", ValueType::String),
                ("c", ValueType::Boolean),
                ("d", ValueType::JsonRaw),
                ("e", ValueType::String)
            ]
        );
        assert_eq!(
            fb.values[3].field_value.json_raw.as_deref(),
            Some(r#"{"k":[1,2]}"#)
        );
        assert_eq!(fb.errors.len(), 3, "{:?}", fb.errors);
        assert!(
            fb.errors
                .iter()
                .any(|e| e.contains("\"bad\"") && e.contains("invalid JSONPath"))
        );
    }

    #[test]
    fn json_raw_cap() {
        let big = json!({"x": "a".repeat(2000)});
        assert!(typed(&[&big]).is_err());
    }

    #[test]
    fn validate_reports_bad_paths() {
        assert_eq!(validate_rules(&[rule(&[("ok", ".a"), ("bad", "[?(")])]).len(), 1);
    }
}
