//! Flux's `postBuild` variable substitution: `${VAR}`, `${VAR:=default}` (also `:-`, `=`, `-`)
//! replaced in each built object's YAML text, `$${VAR}` left as the literal `${VAR}`.
//!
//! Done on the text, as Flux does, so `replicas: ${REPLICAS}` becomes a number. An object
//! labelled or annotated `kustomize.toolkit.fluxcd.io/substitute: disabled` is left alone.
//! Written here because Flux's (drone/envsubst) is Go; the grammar is small.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::transform::describe;

/// The label or annotation that turns substitution off for one object.
pub const SUBSTITUTE_KEY: &str = "kustomize.toolkit.fluxcd.io/substitute";

/// Why substitution failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstituteError {
    #[error("variable name {0:?} is not valid (letters, digits and _, not starting with a digit)")]
    BadName(String),
    #[error("unterminated ${{...}} in {0}")]
    Unterminated(String),
    #[error("{object}: after substitution the YAML does not parse: {message}")]
    Reparse { object: String, message: String },
}

/// Checks every variable name, as Flux does before it substitutes anything.
pub fn check_names(vars: &BTreeMap<String, String>) -> Result<(), SubstituteError> {
    match vars.keys().find(|k| !valid_name(k)) {
        Some(k) => Err(SubstituteError::BadName(k.clone())),
        None => Ok(()),
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Substitutes `vars` into every object (but those that opt out). Unset variables without a
/// default become empty, as in Flux without its strict mode.
pub fn substitute_objects(
    objs: &mut [Value],
    vars: &BTreeMap<String, String>,
) -> Result<(), SubstituteError> {
    for obj in objs.iter_mut() {
        if opted_out(obj) {
            continue;
        }
        let name = describe(obj);
        let text = serde_yaml::to_string(obj).map_err(|e| SubstituteError::Reparse {
            object: name.clone(),
            message: e.to_string(),
        })?;
        if !text.contains('$') {
            continue;
        }
        let out = substitute(&text, vars).map_err(|e| match e {
            SubstituteError::Unterminated(_) => SubstituteError::Unterminated(name.clone()),
            e => e,
        })?;
        *obj = serde_yaml::from_str(&out).map_err(|e| SubstituteError::Reparse {
            object: name,
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn opted_out(obj: &Value) -> bool {
    ["/metadata/labels", "/metadata/annotations"].iter().any(|p| {
        obj.pointer(p)
            .and_then(|m| m.get(SUBSTITUTE_KEY))
            .and_then(Value::as_str)
            == Some("disabled")
    })
}

/// Substitutes into one text.
pub fn substitute(text: &str, vars: &BTreeMap<String, String>) -> Result<String, SubstituteError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            // `$${VAR}`: the literal `${VAR}`.
            out.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            return Err(SubstituteError::Unterminated(String::new()));
        };
        let expr = &body[..end];
        match expand(expr, vars) {
            Some(v) => out.push_str(&v),
            // Not a variable expression (`${ not a name }`): kept as written.
            None => {
                out.push_str("${");
                out.push_str(expr);
                out.push('}');
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `${...}` body, or None when it is not a variable expression.
fn expand(expr: &str, vars: &BTreeMap<String, String>) -> Option<String> {
    let name_end = expr
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(expr.len());
    let (name, op) = expr.split_at(name_end);
    if !valid_name(name) {
        return None;
    }
    let value = vars.get(name);
    let (default, when_empty) = if let Some(d) = op.strip_prefix(":=").or_else(|| op.strip_prefix(":-")) {
        (Some(d), true)
    } else if let Some(d) = op.strip_prefix('=').or_else(|| op.strip_prefix('-')) {
        (Some(d), false)
    } else if op.is_empty() {
        (None, false)
    } else {
        return None;
    };
    Some(match (value, default) {
        (Some(v), Some(d)) if when_empty && v.is_empty() => d.to_string(),
        (Some(v), _) => v.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_defaults_and_escapes() {
        let v = vars(&[("A", "1"), ("EMPTY", "")]);
        assert_eq!(substitute("x=${A}", &v).unwrap(), "x=1");
        assert_eq!(substitute("${B:=two}", &v).unwrap(), "two");
        assert_eq!(substitute("${EMPTY:=d}|${EMPTY=d}", &v).unwrap(), "d|");
        assert_eq!(substitute("${MISSING}", &v).unwrap(), "");
        assert_eq!(
            substitute("$${A} $A ${not a var}", &v).unwrap(),
            "${A} $A ${not a var}"
        );
        assert!(substitute("${A", &v).is_err());
    }

    #[test]
    fn numbers_come_out_as_numbers_and_opted_out_objects_stay() {
        let v = vars(&[("REPLICAS", "3")]);
        let mut objs = vec![
            json!({"kind": "Deployment", "metadata": {"name": "w"}, "spec": {"replicas": "${REPLICAS}"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "c", "annotations": {SUBSTITUTE_KEY: "disabled"}},
                   "data": {"script": "echo ${REPLICAS}"}}),
        ];
        substitute_objects(&mut objs, &v).unwrap();
        assert_eq!(objs[0]["spec"]["replicas"], 3);
        assert_eq!(objs[1]["data"]["script"], "echo ${REPLICAS}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names(&vars(&[("ok_1", "")])).is_ok());
        assert!(check_names(&vars(&[("1bad", "")])).is_err());
        assert!(check_names(&vars(&[("a-b", "")])).is_err());
    }

    proptest! {
        /// Text without `$` is never changed, whatever the variables.
        #[test]
        fn text_without_dollars_is_unchanged(text in "[^$]{0,200}", value in ".{0,20}") {
            let v = vars(&[("X", &value)]);
            prop_assert_eq!(substitute(&text, &v).unwrap(), text);
        }

        /// An escaped reference always comes out literal.
        #[test]
        fn escapes_stay_literal(name in "[A-Z_][A-Z0-9_]{0,10}", value in "[a-z]{0,10}") {
            let v = vars(&[(&name, &value)]);
            let text = format!("$${{{name}}}");
            prop_assert_eq!(substitute(&text, &v).unwrap(), format!("${{{name}}}"));
        }
    }
}
