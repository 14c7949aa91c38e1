//! The Kubernetes JSONPath subset OCM feedback rules and ignoreFields use:
//! `.a.b`, `['a.b/c']`, `[0]`, `[-1]`, `[*]`, `.*` and filters `[?(@.x.y=="v")]` (`==`, `!=`, or
//! existence `[?(@.x)]`), optionally wrapped in `{}` and optionally starting with `$`.

use serde_json::Value;

/// Longest path accepted, in characters. Real feedback and ignoreFields paths are a few dozen;
/// the cap keeps a hostile work from making the agent parse megabytes per reconcile.
pub const MAX_PATH_CHARS: usize = 4096;
/// Deepest nesting of filters (`[?(@.a[?(@.b)])]`). Parsing and evaluation recurse once per
/// level, so without a cap a long enough path overflows the stack and aborts the agent.
pub const MAX_FILTER_DEPTH: usize = 8;

/// Why a path does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonPathError {
    /// Nothing but whitespace, `{}` or `$`.
    #[error("empty JSONPath")]
    Empty,
    #[error("JSONPath of {len} characters is longer than the {max} characters accepted")]
    TooLong { len: usize, max: usize },
    /// Unexpected character at a position.
    #[error("invalid JSONPath {path:?}: {reason} at position {pos}")]
    Syntax {
        /// The whole path as given.
        path: String,
        reason: String,
        /// Character offset.
        pos: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Field(String),
    /// Array index (negative counts from the end).
    Index(i64),
    /// Every element or member.
    Wildcard,
    /// Array elements matching a filter.
    Filter(Filter),
}

/// A filter expression `@.path op literal`, or `@.path` for existence.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Relative path from the element.
    pub path: Vec<Step>,
    /// Comparison; None means "exists".
    pub cmp: Option<(CmpOp, Value)>,
}

/// Filter comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`: some value at the path equals the literal (numbers by value, `1 == 1.0`).
    Eq,
    /// `!=`: the path has values and none equals the literal; a missing field does not match.
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JsonPath {
    /// Steps from the root.
    pub steps: Vec<Step>,
}

impl JsonPath {
    /// Also accepts `{}` around the path, a leading `$`, and a first step without its dot (`status.x`).
    pub fn parse(input: &str) -> Result<Self, JsonPathError> {
        let mut s = input.trim();
        if s.starts_with('{') && s.ends_with('}') && s.len() >= 2 {
            s = s[1..s.len() - 1].trim();
        }
        if s.is_empty() {
            return Err(JsonPathError::Empty);
        }
        let len = s.chars().count();
        if len > MAX_PATH_CHARS {
            let max = MAX_PATH_CHARS;
            return Err(JsonPathError::TooLong { len, max });
        }
        let mut p = Parser {
            src: s,
            chars: s.char_indices().collect(),
            i: 0,
            orig: input,
            depth: 0,
        };
        if p.peek() == Some('$') {
            p.i += 1;
        }
        // Accept `status.x` as `.status.x`, as kubectl's relaxed form does.
        let steps = p.steps(true, false)?;
        if p.i != p.chars.len() {
            return Err(p.err("unexpected character"));
        }
        if steps.is_empty() {
            return Err(JsonPathError::Empty);
        }
        Ok(JsonPath { steps })
    }

    /// All values the path selects.
    pub fn eval<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        eval_steps(&self.steps, root)
    }

    /// The steps when the path has only fields and indices (what ignoreFields can address).
    pub fn simple(&self) -> Option<&[Step]> {
        self.steps
            .iter()
            .all(|s| matches!(s, Step::Field(_) | Step::Index(_)))
            .then_some(self.steps.as_slice())
    }
}

fn eval_steps<'a>(steps: &[Step], root: &'a Value) -> Vec<&'a Value> {
    let mut cur = vec![root];
    for step in steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => {
                    if let Some(x) = v.get(f.as_str()) {
                        next.push(x);
                    }
                }
                Step::Index(i) => {
                    if let Some(a) = v.as_array() {
                        let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                        if let Some(x) = usize::try_from(idx).ok().and_then(|u| a.get(u)) {
                            next.push(x);
                        }
                    }
                }
                Step::Wildcard => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(o) => next.extend(o.values()),
                    _ => {}
                },
                Step::Filter(f) => {
                    if let Some(a) = v.as_array() {
                        next.extend(a.iter().filter(|e| f.matches(e)));
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

impl Filter {
    fn matches(&self, elem: &Value) -> bool {
        let found = eval_steps(&self.path, elem);
        match &self.cmp {
            None => !found.is_empty(),
            Some((op, lit)) => {
                let eq = found.iter().any(|v| loose_eq(v, lit));
                match op {
                    CmpOp::Eq => eq,
                    CmpOp::Ne => !found.is_empty() && !eq,
                }
            }
        }
    }
}

/// Numbers compare by value (1 == 1.0); everything else structurally.
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Recursive-descent parser state.
struct Parser<'s> {
    /// The path with `{}` stripped.
    src: &'s str,
    /// (byte offset, char) pairs of `src`, so positions are characters but slicing is bytes.
    chars: Vec<(usize, char)>,
    /// Current index into `chars`.
    i: usize,
    /// The path exactly as given, for error messages.
    orig: &'s str,
    /// Filters open around the current position (at most [`MAX_FILTER_DEPTH`]).
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).map(|c| c.1)
    }

    fn err(&self, reason: &str) -> JsonPathError {
        JsonPathError::Syntax {
            path: self.orig.to_string(),
            reason: reason.to_string(),
            pos: self.i,
        }
    }

    fn ident(&mut self) -> String {
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' || c == '-' || c == '/' {
                self.i += 1;
            } else {
                break;
            }
        }
        let (a, b) = (self.byte(start), self.byte(self.i));
        self.src[a..b].to_string()
    }

    fn byte(&self, i: usize) -> usize {
        self.chars.get(i).map(|c| c.0).unwrap_or(self.src.len())
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }

    /// Parses steps until the end, or (in a filter) until an operator or `)`.
    fn steps(&mut self, allow_bare_first: bool, in_filter: bool) -> Result<Vec<Step>, JsonPathError> {
        let mut steps = Vec::new();
        let mut first = true;
        loop {
            match self.peek() {
                None => break,
                Some('.') => {
                    self.i += 1;
                    if self.peek() == Some('.') {
                        return Err(self.err("recursive descent `..` is not supported"));
                    }
                    if self.peek() == Some('*') {
                        self.i += 1;
                        steps.push(Step::Wildcard);
                    } else {
                        let id = self.ident();
                        if id.is_empty() {
                            return Err(self.err("expected a field name after `.`"));
                        }
                        steps.push(Step::Field(id));
                    }
                }
                Some('[') => {
                    self.i += 1;
                    steps.push(self.bracket()?);
                }
                Some(c) if first && allow_bare_first && (c.is_alphanumeric() || c == '_') => {
                    steps.push(Step::Field(self.ident()));
                }
                Some(c) if in_filter && (c == ')' || c == '=' || c == '!' || c.is_whitespace()) => break,
                Some(_) => return Err(self.err("unexpected character")),
            }
            first = false;
        }
        Ok(steps)
    }

    fn bracket(&mut self) -> Result<Step, JsonPathError> {
        self.skip_ws();
        let step = match self.peek() {
            Some('*') => {
                self.i += 1;
                Step::Wildcard
            }
            Some('\'') | Some('"') => Step::Field(self.string_lit()?),
            Some('?') => {
                self.i += 1;
                self.expect('(')?;
                self.skip_ws();
                self.expect('@')?;
                if self.depth >= MAX_FILTER_DEPTH {
                    return Err(self.err(&format!("filters nested deeper than {MAX_FILTER_DEPTH}")));
                }
                self.depth += 1;
                let path = self.steps(false, true);
                self.depth -= 1;
                let path = path?;
                self.skip_ws();
                let cmp = match self.peek() {
                    Some('=') => {
                        self.i += 1;
                        self.expect('=')?;
                        Some(CmpOp::Eq)
                    }
                    Some('!') => {
                        self.i += 1;
                        self.expect('=')?;
                        Some(CmpOp::Ne)
                    }
                    _ => None,
                };
                let cmp = match cmp {
                    Some(op) => {
                        self.skip_ws();
                        Some((op, self.literal()?))
                    }
                    None => None,
                };
                self.skip_ws();
                self.expect(')')?;
                Step::Filter(Filter { path, cmp })
            }
            Some(c) if c == '-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                let txt = &self.src[self.byte(start)..self.byte(self.i)];
                if self.peek() == Some(':') {
                    return Err(self.err("slices are not supported"));
                }
                Step::Index(txt.parse().map_err(|_| self.err("invalid index"))?)
            }
            _ => return Err(self.err("expected an index, `*`, a quoted key or a filter")),
        };
        self.skip_ws();
        self.expect(']')?;
        Ok(step)
    }

    fn expect(&mut self, c: char) -> Result<(), JsonPathError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected `{c}`")))
        }
    }

    fn string_lit(&mut self) -> Result<String, JsonPathError> {
        let q = self.peek().ok_or_else(|| self.err("expected a quote"))?;
        self.i += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(c) if c == q => {
                    self.i += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    out.push(c);
                    self.i += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn literal(&mut self) -> Result<Value, JsonPathError> {
        match self.peek() {
            Some('\'') | Some('"') => Ok(Value::String(self.string_lit()?)),
            _ => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_alphanumeric() || c == '.' || c == '-')
                {
                    self.i += 1;
                }
                let txt = &self.src[self.byte(start)..self.byte(self.i)];
                match txt {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    "null" => Ok(Value::Null),
                    _ => serde_json::from_str::<serde_json::Number>(txt)
                        .map(Value::Number)
                        .map_err(|_| self.err("expected a quoted string, number or boolean")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"status": {"readyReplicas": 3, "conditions": [
            {"type": "Available", "status": "True"},
            {"type": "Ready", "status": "False", "n": 2}
        ]}, "metadata": {"labels": {"app.kubernetes.io/name": "x"}}})
    }

    #[test]
    fn fields_with_and_without_braces() {
        let d = doc();
        for p in [
            ".status.readyReplicas",
            "{.status.readyReplicas}",
            "$.status.readyReplicas",
            "status.readyReplicas",
        ] {
            assert_eq!(JsonPath::parse(p).unwrap().eval(&d), vec![&json!(3)], "{p}");
        }
    }

    #[test]
    fn filter_and_index() {
        let d = doc();
        let p = JsonPath::parse(r#".status.conditions[?(@.type=="Ready")].status"#).unwrap();
        assert_eq!(p.eval(&d), vec![&json!("False")]);
        let p = JsonPath::parse(r#"{.status.conditions[?(@.type == 'Available')].status}"#).unwrap();
        assert_eq!(p.eval(&d), vec![&json!("True")]);
        let p = JsonPath::parse(".status.conditions[?(@.n==2)].type").unwrap();
        assert_eq!(p.eval(&d), vec![&json!("Ready")]);
        let p = JsonPath::parse(".status.conditions[?(@.n)].type").unwrap();
        assert_eq!(p.eval(&d), vec![&json!("Ready")]);
        let p = JsonPath::parse(".status.conditions[?(@.type!=\"Ready\")].type").unwrap();
        assert_eq!(p.eval(&d), vec![&json!("Available")]);
        assert_eq!(
            JsonPath::parse(".status.conditions[0].type").unwrap().eval(&d),
            vec![&json!("Available")]
        );
        assert_eq!(
            JsonPath::parse(".status.conditions[-1].type").unwrap().eval(&d),
            vec![&json!("Ready")]
        );
        assert_eq!(
            JsonPath::parse(".status.conditions[*].type")
                .unwrap()
                .eval(&d)
                .len(),
            2
        );
        assert_eq!(
            JsonPath::parse(".status.conditions[5]").unwrap().eval(&d).len(),
            0
        );
        let p = JsonPath::parse(".metadata.labels['app.kubernetes.io/name']").unwrap();
        assert_eq!(p.eval(&d), vec![&json!("x")]);
    }

    #[test]
    fn bad_paths_are_errors() {
        for p in [
            "",
            "{}",
            ".status[",
            ".status.[0]",
            ".a..b",
            ".a[?(@.x==)]",
            ".a[1:2]",
            ".a b",
            "[?(x)]",
            ".a[\"x]",
        ] {
            assert!(JsonPath::parse(p).is_err(), "{p:?} should not parse");
        }
        let e = JsonPath::parse(".status[").unwrap_err().to_string();
        assert!(e.contains("invalid JSONPath"), "{e}");
    }

    #[test]
    fn hostile_paths_fail_clearly_without_exhausting_the_stack() {
        // 60,000 nested filters aborted the agent with a stack overflow before the caps.
        let deep = "[?(@".repeat(60_000);
        let e = JsonPath::parse(&deep).unwrap_err();
        assert!(matches!(e, JsonPathError::TooLong { len: 240_000, .. }), "{e}");
        // Within the length cap, nesting is capped on its own.
        let nested = format!(".a{}", "[?(@.b".repeat(MAX_FILTER_DEPTH + 1));
        let e = JsonPath::parse(&nested).unwrap_err().to_string();
        assert!(e.contains("nested deeper than 8"), "{e}");
        // Nesting up to the cap still parses.
        let ok = format!(
            ".a{}{}",
            "[?(@.b".repeat(MAX_FILTER_DEPTH),
            ")]".repeat(MAX_FILTER_DEPTH)
        );
        assert!(JsonPath::parse(&ok).is_ok(), "{ok}");
    }

    #[test]
    fn simple_paths() {
        assert!(JsonPath::parse(".spec.replicas").unwrap().simple().is_some());
        assert!(
            JsonPath::parse(".spec.containers[0].image")
                .unwrap()
                .simple()
                .is_some()
        );
        assert!(
            JsonPath::parse(".spec.containers[*].image")
                .unwrap()
                .simple()
                .is_none()
        );
    }
}
