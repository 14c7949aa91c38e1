//! The spoke-side write policy: which objects works from the hub may create, change or delete.
//!
//! Without it the hub is cluster-admin on the spoke: a work naming `Namespace kube-system` would
//! be applied, and deleting that work would delete kube-system. The policy is checked for every
//! object a work writes, deletes included, before the API server is asked; a refused object is
//! left exactly as it is.
//!
//! # Decision
//!
//! 1. Denied if any deny rule matches: the built-in ones (unless the file switches them off),
//!    then the file's `deny` rules.
//! 2. Otherwise, when the file has a non-empty `allow` list, allowed only if some allow rule
//!    matches.
//! 3. Otherwise allowed: by default the hub is trusted with everything outside the protected set.
//!
//! Deny beats allow so that a file can widen what the hub may write only by switching the
//! built-ins off explicitly (`builtinDenies: false`), never by an allow rule that happens to be
//! broader than meant.
//!
//! # Built-in denies
//!
//! On unless the file says `builtinDenies: false`:
//! - the namespaces `kube-system`, `kube-public`, `kube-node-lease` and the agent's own: objects
//!   in them and the Namespace objects themselves (the cluster's control plane and the agent
//!   itself must not be changeable from the hub);
//! - ClusterRoles and ClusterRoleBindings (`rbac.authorization.k8s.io`) whose names match the
//!   agent's own ([`AgentIdentity::rbac_names`]), so the hub cannot take the agent's rights away
//!   or hand them to someone else;
//! - the agent's bookkeeping: AppliedManifestWorks and their CustomResourceDefinition (deleting
//!   the CRD would delete every record of what was applied, orphaning it all).
//!
//! # File format
//!
//! YAML, camelCase, unknown fields refused so that a typo fails at start-up instead of silently
//! widening the policy:
//!
//! ```yaml
//! builtinDenies: true          # default true; false widens (only for a spoke that trusts its hub fully)
//! allow:                       # optional; when non-empty, ONLY matching objects may be written
//!   - groups: ["", "apps"]     # API groups; "" is core; "*" any. Omitted = any.
//!     kinds: ["ConfigMap", "Deployment"]   # omitted = any
//!     namespaces: ["team-*"]   # omitted = any, cluster-scoped objects included
//!     names: ["*"]             # omitted = any
//! deny:                        # extra denies, same rule shape
//!   - kinds: ["ClusterRoleBinding"]
//!     names: ["*admin*"]
//! ```
//!
//! Every entry is a pattern in which `*` stands for any run of characters (none included) and
//! every other character for itself; matching is case-sensitive, as Kubernetes names are.
//!
//! A rule matches an object when every field it sets matches. `namespaces` matches a namespaced
//! object in one of those namespaces and also the Namespace object (core group, kind `Namespace`)
//! of one of them, so protecting a namespace protects the namespace itself; it matches no other
//! cluster-scoped object (add a rule without `namespaces` to allow or deny those).
//!
//! Rules are numbered from 1 in the order they are written, in messages: "deny rule 1" is the
//! first entry under `deny:`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::applied_work::CRD_NAME;
use super::manifestwork::GROUP as WORK_GROUP;

/// The reason code a manifest's status carries when the policy refuses it.
pub const DENIED_REASON: &str = "DeniedByPolicy";

/// The longest pattern accepted, in bytes: Kubernetes' longest object name (253), so that no
/// sensible pattern is refused and a pasted blob is.
pub const MAX_PATTERN_LEN: usize = 253;

/// The namespaces the built-in rules protect, besides the agent's own.
pub const PROTECTED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// API group of ClusterRole and ClusterRoleBinding.
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// API group of CustomResourceDefinition.
const CRD_GROUP: &str = "apiextensions.k8s.io";

/// The agent's own identity, protected by the built-in rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The namespace the agent runs in (default `spokelet-system`, as `deploy/kubernetes`
    /// installs it): its ServiceAccount, Secrets and DaemonSet live there.
    pub namespace: String,
    /// Name patterns of the agent's ClusterRoles and ClusterRoleBindings (default `spokelet`
    /// and `spokelet-*`, which cover `deploy/kubernetes/rbac.yaml`). Empty protects none.
    pub rbac_names: Vec<String>,
}

impl Default for AgentIdentity {
    fn default() -> Self {
        AgentIdentity {
            namespace: "spokelet-system".to_string(),
            rbac_names: vec!["spokelet".to_string(), "spokelet-*".to_string()],
        }
    }
}

/// One object a work wants to write (create, change or delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// API group; `""` for core.
    pub group: &'a str,
    /// Kind, e.g. `ConfigMap` (not the plural resource: rules are written in kinds).
    pub kind: &'a str,
    /// The namespace the write goes to; None for a cluster-scoped object. It must come from the
    /// kind's scope as discovery reports it, not from the manifest's `metadata.namespace` alone:
    /// a stray namespace on a cluster-scoped manifest would otherwise let it pass for a
    /// namespaced one. `Some("")` is read as None, and a Namespace object's is ignored (it is
    /// cluster-scoped whatever its manifest says).
    pub namespace: Option<&'a str>,
    pub name: &'a str,
}

impl<'a> Target<'a> {
    /// A target from the crate's usual form, where `""` is the namespace of a cluster-scoped
    /// object (as in [`super::object::ObjKey`]).
    pub fn new(group: &'a str, kind: &'a str, namespace: &'a str, name: &'a str) -> Self {
        Target {
            group,
            kind,
            namespace: (!namespace.is_empty()).then_some(namespace),
            name,
        }
    }

    /// Whether this is a Namespace object (core group), which `namespaces` patterns match by name.
    fn is_namespace_object(&self) -> bool {
        self.group.is_empty() && self.kind == "Namespace"
    }

    /// The namespace rules see: a Namespace object's own namespace field and an empty one both
    /// count as cluster-scoped, so neither can be used to slip past a `namespaces` pattern.
    fn effective_namespace(&self) -> Option<&'a str> {
        if self.is_namespace_object() {
            return None;
        }
        self.namespace.filter(|ns| !ns.is_empty())
    }
}

impl fmt::Display for Target<'_> {
    /// `Kind[.group] [namespace/]name`, e.g. `ClusterRole.rbac.authorization.k8s.io view`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        match self.effective_namespace() {
            Some(ns) => write!(f, " {ns}/{}", self.name),
            None => write!(f, " {}", self.name),
        }
    }
}

/// Which part of the policy refused an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedBy {
    /// A built-in rule.
    BuiltIn,
    /// A rule under the file's `deny:`, numbered from 1 as written.
    DenyRule(usize),
    /// The file has an allow-list and no entry of it matches.
    NotAllowed,
}

/// Why the policy refuses an object; its message is what the manifest's status shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by the spoke's policy: {rule}")]
pub struct Denied {
    /// The rule in words, e.g. "writes to namespace kube-system are denied (built-in rule)".
    pub rule: String,
    /// The same, for code (metrics, tests) that must not parse the words.
    pub by: DeniedBy,
}

/// A policy file that cannot be used; the agent refuses to start rather than run with a policy
/// other than the one written.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not YAML of the policy's shape (unknown fields included); the message gives the line.
    #[error("policy is not valid: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// Well-formed YAML that cannot mean what was intended, e.g. an empty pattern.
    #[error("policy is not valid: {0}")]
    Invalid(String),
}

/// The policy, compiled from the built-ins and a file; cheap to check against, shareable across
/// tasks.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Whether the built-in denies are in `deny` (kept for [`Policy::summary`]).
    builtin_denies: bool,
    /// Built-in denies first, so an object both they and a file rule refuse is reported with the
    /// built-in's more telling description.
    deny: Vec<Rule>,
    /// Empty = no allow-list.
    allow: Vec<Rule>,
    /// How many of `deny` came from the file.
    file_denies: usize,
}

impl Policy {
    /// The built-in default: the built-in denies, no allow-list.
    pub fn builtin(agent: &AgentIdentity) -> Policy {
        Policy {
            builtin_denies: true,
            deny: builtin_rules(agent),
            allow: Vec::new(),
            file_denies: 0,
        }
    }

    /// Parses a policy file's YAML; the built-in denies apply unless the file sets
    /// `builtinDenies: false`. An empty file (or one of comments only) is the built-in policy.
    pub fn from_yaml(text: &str, agent: &AgentIdentity) -> Result<Policy, PolicyError> {
        // Option so that an empty document, which YAML reads as null, is the defaults rather
        // than a puzzling "invalid type: unit value".
        let file: PolicyFile = serde_yaml::from_str::<Option<PolicyFile>>(text)?.unwrap_or_default();
        let mut deny = if file.builtin_denies {
            builtin_rules(agent)
        } else {
            Vec::new()
        };
        let file_deny = compile_rules("deny", file.deny.unwrap_or_default())?;
        let file_denies = file_deny.len();
        deny.extend(file_deny);
        let allow = compile_rules("allow", file.allow.unwrap_or_default())?;
        Ok(Policy {
            builtin_denies: file.builtin_denies,
            deny,
            allow,
            file_denies,
        })
    }

    /// Loads a policy file; see [`Policy::from_yaml`].
    pub fn load(path: &Path, agent: &AgentIdentity) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::from_yaml(&text, agent)
    }

    /// Ok if a work may write `t`, or why it may not.
    pub fn check(&self, t: &Target<'_>) -> Result<(), Denied> {
        if let Some(rule) = self.deny.iter().find(|r| r.matches(t)) {
            return Err(Denied {
                rule: rule.description.clone(),
                by: rule.by,
            });
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|r| r.matches(t)) {
            return Err(Denied {
                rule: "not in the policy's allow-list".to_string(),
                by: DeniedBy::NotAllowed,
            });
        }
        Ok(())
    }

    /// Whether the built-in denies are on.
    pub fn builtin_denies(&self) -> bool {
        self.builtin_denies
    }

    /// One line for the start-up log, e.g. "built-in denies on; 2 allow rules; 1 deny rule".
    pub fn summary(&self) -> String {
        let builtins = if self.builtin_denies { "on" } else { "off" };
        let allow = match self.allow.len() {
            0 => "no allow-list".to_string(),
            n => plural(n, "allow rule"),
        };
        format!(
            "built-in denies {builtins}; {allow}; {}",
            plural(self.file_denies, "deny rule")
        )
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyFile {
    /// Default true: leaving the field out must never widen the policy.
    #[serde(default = "default_true")]
    builtin_denies: bool,
    allow: Option<Vec<RuleFile>>,
    deny: Option<Vec<RuleFile>>,
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicyFile {
            builtin_denies: true,
            allow: None,
            deny: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// One rule as written; a field left out matches anything.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleFile {
    groups: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    names: Option<Vec<String>>,
}

/// A rule, checked and ready to match.
#[derive(Debug, Clone)]
struct Rule {
    /// None = any; patterns otherwise (see [`glob_match`]).
    groups: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    names: Option<Vec<String>>,
    /// What [`Denied::rule`] says when this rule refuses an object.
    description: String,
    by: DeniedBy,
}

impl Rule {
    fn matches(&self, t: &Target<'_>) -> bool {
        any_match(&self.groups, t.group)
            && any_match(&self.kinds, t.kind)
            && any_match(&self.names, t.name)
            && self.namespace_matches(t)
    }

    /// See the module docs: a namespaced object by its namespace, a Namespace object by its
    /// name, no other cluster-scoped object.
    fn namespace_matches(&self, t: &Target<'_>) -> bool {
        let Some(patterns) = &self.namespaces else {
            return true;
        };
        let namespace = match t.effective_namespace() {
            Some(ns) => ns,
            None if t.is_namespace_object() => t.name,
            None => return false,
        };
        patterns.iter().any(|p| glob_match(p, namespace))
    }
}

fn any_match(patterns: &Option<Vec<String>>, value: &str) -> bool {
    patterns
        .as_ref()
        .is_none_or(|ps| ps.iter().any(|p| glob_match(p, value)))
}

/// The built-in denies for `agent`, each described for [`Denied`].
fn builtin_rules(agent: &AgentIdentity) -> Vec<Rule> {
    let builtin = |groups: Option<&[&str]>,
                   kinds: Option<&[&str]>,
                   namespaces: Option<&[&str]>,
                   names: Option<Vec<String>>,
                   what: String| Rule {
        groups: groups.map(owned),
        kinds: kinds.map(owned),
        namespaces: namespaces.map(owned),
        names,
        description: format!("{what} (built-in rule)"),
        by: DeniedBy::BuiltIn,
    };
    let mut rules: Vec<Rule> = PROTECTED_NAMESPACES
        .iter()
        .map(|ns| {
            builtin(
                None,
                None,
                Some(&[ns]),
                None,
                format!("writes to namespace {ns} are denied"),
            )
        })
        .collect();
    // An agent installed into one of the protected namespaces is already covered; one rule per
    // namespace keeps the message naming the one that matched.
    if !agent.namespace.is_empty() && !PROTECTED_NAMESPACES.contains(&agent.namespace.as_str()) {
        rules.push(builtin(
            None,
            None,
            Some(&[&agent.namespace]),
            None,
            format!(
                "writes to namespace {}, the agent's own, are denied",
                agent.namespace
            ),
        ));
    }
    if !agent.rbac_names.is_empty() {
        rules.push(builtin(
            Some(&[RBAC_GROUP]),
            Some(&["ClusterRole", "ClusterRoleBinding"]),
            None,
            Some(agent.rbac_names.clone()),
            format!(
                "writes to the agent's own ClusterRoles and ClusterRoleBindings ({}) are denied",
                agent.rbac_names.join(", ")
            ),
        ));
    }
    rules.push(builtin(
        Some(&[WORK_GROUP]),
        Some(&["AppliedManifestWork"]),
        None,
        None,
        "writes to AppliedManifestWorks, the agent's records of what it applied, are denied".to_string(),
    ));
    rules.push(builtin(
        Some(&[CRD_GROUP]),
        Some(&["CustomResourceDefinition"]),
        None,
        Some(vec![CRD_NAME.to_string()]),
        format!(
            "writes to the CustomResourceDefinition {CRD_NAME}, which holds the agent's records, are denied"
        ),
    ));
    rules
}

fn owned(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Checks the file's rules under `section` (`allow` or `deny`) and describes each.
fn compile_rules(section: &str, rules: Vec<RuleFile>) -> Result<Vec<Rule>, PolicyError> {
    rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let number = i + 1;
            let at = format!("{section} rule {number}");
            let groups = check_patterns(&at, "groups", r.groups)?;
            let kinds = check_patterns(&at, "kinds", r.kinds)?;
            let namespaces = check_patterns(&at, "namespaces", r.namespaces)?;
            let names = check_patterns(&at, "names", r.names)?;
            let fields: Vec<String> = [
                ("groups", &groups),
                ("kinds", &kinds),
                ("namespaces", &namespaces),
                ("names", &names),
            ]
            .into_iter()
            .filter_map(|(field, ps)| ps.as_ref().map(|ps| format!("{field} [{}]", show_patterns(ps))))
            .collect();
            let fields = if fields.is_empty() {
                "any object".to_string()
            } else {
                fields.join(", ")
            };
            Ok(Rule {
                groups,
                kinds,
                namespaces,
                names,
                description: format!("{at} ({fields}) matches"),
                by: DeniedBy::DenyRule(number),
            })
        })
        .collect()
}

/// Patterns as a message shows them; the core group's `""` is written out so it is visible.
fn show_patterns(patterns: &[String]) -> String {
    patterns
        .iter()
        .map(|p| if p.is_empty() { "\"\"" } else { p.as_str() })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses patterns that cannot mean what was written, so that a rule which would silently never
/// match (a deny that protects nothing) fails at start-up instead.
fn check_patterns(
    at: &str,
    field: &str,
    patterns: Option<Vec<String>>,
) -> Result<Option<Vec<String>>, PolicyError> {
    let Some(patterns) = patterns else {
        return Ok(None);
    };
    let invalid = |why: String| Err(PolicyError::Invalid(format!("{at}: {field}: {why}")));
    if patterns.is_empty() {
        // An empty list would match nothing; "any" is written by leaving the field out.
        return invalid("empty list; leave the field out to match any".to_string());
    }
    for p in &patterns {
        if p.len() > MAX_PATTERN_LEN {
            return invalid(format!(
                "pattern of {} bytes is longer than the {MAX_PATTERN_LEN} allowed",
                p.len()
            ));
        }
        match field {
            // "" is the core group, the one place an empty pattern means something.
            "groups" if p.contains('/') => {
                return invalid(format!(
                    "{p:?} is an apiVersion; write the group alone (\"\" for core)"
                ));
            }
            "groups" if p == "core" => {
                return invalid("\"core\" is no API group; write \"\" for the core group".to_string());
            }
            "groups" => {}
            _ if p.is_empty() => return invalid("empty pattern".to_string()),
            // Kinds are UpperCamelCase; a lowercase one is almost surely a plural resource
            // ("configmaps") and would never match. A leading `*` still allows any kind.
            "kinds" if p.starts_with(|c: char| c.is_ascii_lowercase()) => {
                return invalid(format!(
                    "{p:?} is not a kind; kinds are written like ConfigMap, not configmaps"
                ));
            }
            // Namespace names are DNS labels, so any other character can never match.
            "namespaces"
                if !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '*') =>
            {
                return invalid(format!(
                    "{p:?} can never match: namespaces are lowercase letters, digits and '-'"
                ));
            }
            _ => {}
        }
    }
    Ok(Some(patterns))
}

/// Whether `text` matches `pattern`, in which `*` stands for any run of characters (none
/// included) and every other character for itself.
///
/// Hand-written: a language with one wildcard does not justify a regex dependency. It is linear
/// in `pattern.len() + text.len()` and does not recurse, where the obvious recursive matcher is
/// exponential on patterns like `*a*a*a*b` (and the usual backtracking loop quadratic): the part
/// before the first `*` must be a prefix, the part after the last a suffix, and the pieces
/// between are found left to right, each at its first occurrence after the previous one. Taking
/// the first occurrence is never wrong, since it leaves the most text for the pieces after it;
/// and `str::find` is the Two-Way search, linear in what it scans.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (Some(first_star), Some(last_star)) = (pattern.find('*'), pattern.rfind('*')) else {
        return pattern == text;
    };
    let prefix = &pattern[..first_star];
    let suffix = &pattern[last_star + 1..];
    // The length check keeps prefix and suffix from sharing characters ("a*a" against "a").
    if text.len() < prefix.len() + suffix.len() || !text.starts_with(prefix) || !text.ends_with(suffix) {
        return false;
    }
    let middle = if last_star > first_star {
        &pattern[first_star + 1..last_star]
    } else {
        ""
    };
    let mut rest = &text[prefix.len()..text.len() - suffix.len()];
    for piece in middle.split('*').filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn builtin() -> Policy {
        Policy::builtin(&AgentIdentity::default())
    }

    fn yaml(text: &str) -> Policy {
        Policy::from_yaml(text, &AgentIdentity::default()).unwrap()
    }

    fn invalid(text: &str) -> String {
        match Policy::from_yaml(text, &AgentIdentity::default()) {
            Err(e @ (PolicyError::Invalid(_) | PolicyError::Parse(_))) => e.to_string(),
            other => panic!("expected an invalid policy, got {other:?}"),
        }
    }

    fn t<'a>(group: &'a str, kind: &'a str, namespace: &'a str, name: &'a str) -> Target<'a> {
        Target::new(group, kind, namespace, name)
    }

    fn configmap<'a>(namespace: &'a str, name: &'a str) -> Target<'a> {
        t("", "ConfigMap", namespace, name)
    }

    fn namespace(name: &str) -> Target<'_> {
        t("", "Namespace", "", name)
    }

    fn crb(name: &str) -> Target<'_> {
        t(RBAC_GROUP, "ClusterRoleBinding", "", name)
    }

    fn refused(p: &Policy, target: Target<'_>) -> Denied {
        match p.check(&target) {
            Err(d) => d,
            Ok(()) => panic!("{target} was allowed"),
        }
    }

    fn allowed(p: &Policy, target: Target<'_>) {
        if let Err(d) = p.check(&target) {
            panic!("{target} was refused: {d}");
        }
    }

    #[test]
    fn builtin_refuses_a_configmap_in_kube_system() {
        let d = refused(&builtin(), configmap("kube-system", "coredns"));
        assert_eq!(d.by, DeniedBy::BuiltIn);
        assert_eq!(
            d.to_string(),
            "refused by the spoke's policy: writes to namespace kube-system are denied (built-in rule)"
        );
    }

    #[test]
    fn builtin_refuses_the_kube_system_namespace_itself() {
        let d = refused(&builtin(), namespace("kube-system"));
        assert_eq!(
            d.rule,
            "writes to namespace kube-system are denied (built-in rule)"
        );
    }

    #[test]
    fn builtin_refuses_kube_public_and_kube_node_lease() {
        let p = builtin();
        for ns in ["kube-public", "kube-node-lease"] {
            refused(&p, namespace(ns));
            let d = refused(&p, t("coordination.k8s.io", "Lease", ns, "node-1"));
            assert!(d.rule.contains(ns), "{d}");
        }
    }

    #[test]
    fn builtin_refuses_the_agent_namespace_and_what_is_in_it() {
        let p = builtin();
        let d = refused(&p, namespace("spokelet-system"));
        assert_eq!(
            d.rule,
            "writes to namespace spokelet-system, the agent's own, are denied (built-in rule)"
        );
        refused(&p, t("", "ServiceAccount", "spokelet-system", "spokelet"));
        refused(&p, t("apps", "DaemonSet", "spokelet-system", "spokelet"));
    }

    #[test]
    fn builtin_follows_a_custom_agent_identity() {
        let agent = AgentIdentity {
            namespace: "ocm-agent".to_string(),
            rbac_names: vec!["ocm-*".to_string()],
        };
        let p = Policy::builtin(&agent);
        refused(&p, configmap("ocm-agent", "x"));
        refused(&p, crb("ocm-work"));
        allowed(&p, configmap("spokelet-system", "x"));
        allowed(&p, crb("spokelet-work-agent"));
    }

    #[test]
    fn builtin_with_the_agent_in_kube_system_adds_no_second_rule() {
        let agent = AgentIdentity {
            namespace: "kube-system".to_string(),
            ..AgentIdentity::default()
        };
        let d = refused(&Policy::builtin(&agent), configmap("kube-system", "x"));
        assert_eq!(
            d.rule,
            "writes to namespace kube-system are denied (built-in rule)"
        );
    }

    #[test]
    fn builtin_refuses_the_agents_cluster_role_binding_and_cluster_role() {
        let p = builtin();
        let d = refused(&p, crb("spokelet-work-agent"));
        assert_eq!(
            d.rule,
            "writes to the agent's own ClusterRoles and ClusterRoleBindings (spokelet, spokelet-*) are denied (built-in rule)"
        );
        refused(&p, crb("spokelet"));
        refused(&p, t(RBAC_GROUP, "ClusterRole", "", "spokelet"));
    }

    #[test]
    fn builtin_rbac_rule_covers_only_cluster_roles_and_bindings_of_the_rbac_group() {
        let p = builtin();
        allowed(&p, t(RBAC_GROUP, "RoleBinding", "team-a", "spokelet"));
        allowed(&p, configmap("team-a", "spokelet"));
        allowed(&p, t("example.com", "ClusterRoleBinding", "", "spokelet"));
        allowed(&p, crb("spokeletish"));
    }

    #[test]
    fn builtin_refuses_applied_manifest_works_and_their_crd() {
        let p = builtin();
        let d = refused(&p, t(WORK_GROUP, "AppliedManifestWork", "", "abc-work"));
        assert!(d.rule.contains("AppliedManifestWorks"), "{d}");
        let d = refused(&p, t(CRD_GROUP, "CustomResourceDefinition", "", CRD_NAME));
        assert!(d.rule.contains(CRD_NAME), "{d}");
        allowed(
            &p,
            t(CRD_GROUP, "CustomResourceDefinition", "", "widgets.example.com"),
        );
    }

    #[test]
    fn builtin_allows_a_deployment_in_a_team_namespace() {
        allowed(&builtin(), t("apps", "Deployment", "team-a", "web"));
        allowed(&builtin(), namespace("team-a"));
    }

    #[test]
    fn builtin_allows_a_cluster_admin_binding_outside_the_protected_set() {
        // The hub is trusted by default with everything but the protected set.
        allowed(&builtin(), crb("team-a-admin"));
    }

    #[test]
    fn a_namespace_objects_own_namespace_field_is_ignored() {
        let p = builtin();
        refused(
            &p,
            Target {
                namespace: Some("team-a"),
                ..namespace("kube-system")
            },
        );
        let p = yaml("allow: [{namespaces: [team-*]}]");
        allowed(
            &p,
            Target {
                namespace: Some("kube-system"),
                ..namespace("team-a")
            },
        );
        refused(
            &p,
            Target {
                namespace: Some("team-a"),
                ..namespace("other")
            },
        );
    }

    #[test]
    fn empty_namespace_means_cluster_scoped() {
        let p = yaml("allow: [{namespaces: [\"*\"]}]");
        let d = refused(
            &p,
            Target {
                namespace: Some(""),
                ..crb("x")
            },
        );
        assert_eq!(d.by, DeniedBy::NotAllowed);
        assert_eq!(t("", "Pod", "", "p").namespace, None);
    }

    #[test]
    fn allow_list_narrows_to_matching_objects() {
        let p = yaml("allow:\n  - groups: [\"\"]\n    kinds: [ConfigMap]\n    namespaces: [team-*]\n");
        allowed(&p, configmap("team-a", "settings"));
        let d = refused(&p, t("", "Secret", "team-a", "token"));
        assert_eq!(d.by, DeniedBy::NotAllowed);
        assert_eq!(
            d.to_string(),
            "refused by the spoke's policy: not in the policy's allow-list"
        );
        refused(&p, configmap("other", "settings"));
        refused(&p, t("example.com", "ConfigMap", "team-a", "settings"));
    }

    #[test]
    fn allow_list_with_namespaces_refuses_cluster_scoped_objects() {
        let p = yaml("allow: [{namespaces: [team-*]}]");
        refused(&p, crb("team-a-admin"));
        refused(&p, t(RBAC_GROUP, "ClusterRole", "", "team-a"));
        allowed(&p, t("apps", "Deployment", "team-b", "web"));
    }

    #[test]
    fn allow_list_namespaces_cover_the_namespace_object() {
        let p = yaml("allow: [{namespaces: [team-*]}]");
        allowed(&p, namespace("team-a"));
        refused(&p, namespace("default"));
        // A kind restriction applies to the Namespace object as to anything else.
        let p = yaml("allow: [{kinds: [ConfigMap], namespaces: [team-*]}]");
        refused(&p, namespace("team-a"));
    }

    #[test]
    fn allow_list_without_namespaces_admits_cluster_scoped_objects() {
        let p = yaml("allow: [{groups: [rbac.authorization.k8s.io], kinds: [ClusterRole]}]");
        allowed(&p, t(RBAC_GROUP, "ClusterRole", "", "team-a-view"));
        refused(&p, crb("team-a-view"));
    }

    #[test]
    fn empty_allow_list_is_no_allow_list() {
        let p = yaml("allow: []");
        allowed(&p, configmap("team-a", "x"));
        assert_eq!(p.summary(), "built-in denies on; no allow-list; 0 deny rules");
    }

    #[test]
    fn builtin_denies_apply_under_an_allow_list() {
        let p = yaml("allow: [{namespaces: [\"*\"]}, {kinds: [\"*\"]}]");
        let d = refused(&p, configmap("kube-system", "x"));
        assert_eq!(d.by, DeniedBy::BuiltIn);
        refused(&p, namespace("spokelet-system"));
        refused(&p, crb("spokelet-work-agent"));
    }

    #[test]
    fn builtin_denies_false_widens() {
        let p = yaml("builtinDenies: false");
        allowed(&p, configmap("kube-system", "x"));
        allowed(&p, namespace("kube-system"));
        allowed(&p, crb("spokelet-work-agent"));
        allowed(&p, t(WORK_GROUP, "AppliedManifestWork", "", "x"));
        assert!(!p.builtin_denies());
        assert_eq!(p.summary(), "built-in denies off; no allow-list; 0 deny rules");
    }

    #[test]
    fn builtin_denies_are_on_unless_switched_off() {
        assert!(yaml("deny: [{kinds: [Secret]}]").builtin_denies());
        assert!(yaml("builtinDenies: true").builtin_denies());
        refused(
            &yaml("allow: [{kinds: [ConfigMap]}]"),
            configmap("kube-system", "x"),
        );
    }

    #[test]
    fn deny_beats_allow() {
        let p =
            yaml("allow:\n  - namespaces: [team-*]\ndeny:\n  - kinds: [Secret]\n    namespaces: [team-*]\n");
        allowed(&p, configmap("team-a", "x"));
        let d = refused(&p, t("", "Secret", "team-a", "x"));
        assert_eq!(d.by, DeniedBy::DenyRule(1));
    }

    #[test]
    fn file_deny_rules_add_to_the_builtins() {
        let p = yaml("deny:\n  - kinds: [ClusterRoleBinding]\n    names: [\"*admin*\"]\n");
        refused(&p, crb("team-a-admin"));
        refused(&p, configmap("kube-system", "x"));
        allowed(&p, crb("team-a-view"));
    }

    #[test]
    fn file_deny_messages_name_the_rule_by_number_and_fields() {
        let p = yaml(
            "deny:\n  - kinds: [Secret]\n  - groups: [\"\", rbac.authorization.k8s.io]\n    kinds: [ClusterRoleBinding]\n    names: [\"*admin*\"]\n  - {}\n",
        );
        let d = refused(&p, crb("team-a-admin"));
        assert_eq!(d.by, DeniedBy::DenyRule(2));
        assert_eq!(
            d.to_string(),
            "refused by the spoke's policy: deny rule 2 (groups [\"\", rbac.authorization.k8s.io], kinds [ClusterRoleBinding], names [*admin*]) matches"
        );
        let d = refused(&p, configmap("team-a", "x"));
        assert_eq!(d.rule, "deny rule 3 (any object) matches");
    }

    #[test]
    fn a_builtin_and_a_file_rule_both_matching_reports_the_builtin() {
        let p = yaml("deny: [{namespaces: [kube-*]}]");
        assert_eq!(refused(&p, configmap("kube-system", "x")).by, DeniedBy::BuiltIn);
        assert_eq!(
            refused(&p, configmap("kube-flannel", "x")).by,
            DeniedBy::DenyRule(1)
        );
    }

    #[test]
    fn unknown_top_level_field_fails_naming_it() {
        let e = invalid("alow: [{kinds: [ConfigMap]}]");
        assert!(e.contains("unknown field `alow`"), "{e}");
    }

    #[test]
    fn unknown_rule_field_fails_naming_it() {
        let e = invalid("deny: [{kind: [Secret]}]");
        assert!(e.contains("unknown field `kind`"), "{e}");
    }

    #[test]
    fn misspelt_builtin_denies_fails_rather_than_defaulting() {
        let e = invalid("builtinDeny: false");
        assert!(e.contains("builtinDeny"), "{e}");
    }

    #[test]
    fn wrong_types_fail() {
        invalid("builtinDenies: maybe");
        invalid("allow: {kinds: [ConfigMap]}");
        invalid("deny: [{names: ConfigMap}]");
        invalid("- kinds: [ConfigMap]");
    }

    #[test]
    fn empty_or_comment_only_file_is_the_builtin_policy() {
        for text in ["", "# nothing to add\n", "{}"] {
            let p = yaml(text);
            assert!(p.builtin_denies());
            refused(&p, configmap("kube-system", "x"));
            allowed(&p, configmap("team-a", "x"));
            assert_eq!(p.summary(), "built-in denies on; no allow-list; 0 deny rules");
        }
    }

    #[test]
    fn empty_pattern_list_is_invalid() {
        let e = invalid("deny: [{names: []}]");
        assert!(e.contains("deny rule 1: names: empty list"), "{e}");
    }

    #[test]
    fn empty_pattern_is_invalid_except_the_core_group() {
        let e = invalid("allow: [{kinds: [ConfigMap]}, {names: [\"\"]}]");
        assert!(e.contains("allow rule 2: names: empty pattern"), "{e}");
        invalid("deny: [{namespaces: [\"\"]}]");
        invalid("deny: [{kinds: [\"\"]}]");
        let p = yaml("deny: [{groups: [\"\"], kinds: [Secret]}]");
        refused(&p, t("", "Secret", "team-a", "x"));
        allowed(&p, t("example.com", "Secret", "team-a", "x"));
    }

    #[test]
    fn over_long_pattern_is_invalid() {
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        let e = invalid(&format!("deny: [{{names: [{long}]}}]"));
        assert!(e.contains("longer than the 253 allowed"), "{e}");
        yaml(&format!("deny: [{{names: [{}]}}]", "a".repeat(MAX_PATTERN_LEN)));
    }

    #[test]
    fn api_version_or_core_as_a_group_is_invalid() {
        let e = invalid("deny: [{groups: [apps/v1]}]");
        assert!(e.contains("apiVersion"), "{e}");
        let e = invalid("deny: [{groups: [core]}]");
        assert!(e.contains("\"\" for the core group"), "{e}");
    }

    #[test]
    fn lowercase_kind_is_invalid_but_a_leading_star_is_not() {
        let e = invalid("deny: [{kinds: [secrets]}]");
        assert!(e.contains("not a kind"), "{e}");
        yaml("deny: [{kinds: [\"*\", \"*Binding\"]}]");
    }

    #[test]
    fn namespace_pattern_that_can_never_match_is_invalid() {
        let e = invalid("deny: [{namespaces: [Team-A]}]");
        assert!(e.contains("can never match"), "{e}");
        invalid("deny: [{namespaces: [team_a]}]");
        yaml("deny: [{namespaces: [\"team-*-prod\", \"*\"]}]");
    }

    #[test]
    fn summary_counts_rules() {
        let p = yaml("allow: [{kinds: [ConfigMap]}, {kinds: [Secret]}]\ndeny: [{names: [x]}]");
        assert_eq!(p.summary(), "built-in denies on; 2 allow rules; 1 deny rule");
        assert_eq!(
            builtin().summary(),
            "built-in denies on; no allow-list; 0 deny rules"
        );
        let p =
            yaml("builtinDenies: false\nallow: [{kinds: [ConfigMap]}]\ndeny: [{names: [x]}, {names: [y]}]");
        assert_eq!(p.summary(), "built-in denies off; 1 allow rule; 2 deny rules");
    }

    #[test]
    fn load_reads_a_file() {
        let path = std::env::temp_dir().join(format!("spokelet-policy-{}.yaml", std::process::id()));
        std::fs::write(&path, "deny: [{kinds: [Secret]}]\n").unwrap();
        let p = Policy::load(&path, &AgentIdentity::default());
        std::fs::remove_file(&path).unwrap();
        refused(&p.unwrap(), t("", "Secret", "team-a", "x"));
    }

    #[test]
    fn load_names_the_path_when_the_file_cannot_be_read() {
        let path = Path::new("/nonexistent/spokelet/policy.yaml");
        let e = Policy::load(path, &AgentIdentity::default()).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/spokelet/policy.yaml"), "{e}");
    }

    #[test]
    fn denied_reason_is_the_status_reason_code() {
        assert_eq!(DENIED_REASON, "DeniedByPolicy");
    }

    #[test]
    fn policy_is_debug_clone_send_sync() {
        fn check<T: fmt::Debug + Clone + Send + Sync + 'static>() {}
        check::<Policy>();
        check::<Denied>();
        check::<AgentIdentity>();
    }

    #[test]
    fn target_display_names_kind_group_namespace_and_name() {
        assert_eq!(configmap("team-a", "x").to_string(), "ConfigMap team-a/x");
        assert_eq!(
            crb("y").to_string(),
            "ClusterRoleBinding.rbac.authorization.k8s.io y"
        );
    }

    #[test]
    fn glob_star_matches_anything_including_empty() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("**", ""));
        assert!(glob_match("***", "abc"));
    }

    #[test]
    fn glob_without_star_is_exact() {
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
        assert!(!glob_match("abc", "ab"));
        assert!(!glob_match("abc", "ABC"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
    }

    #[test]
    fn glob_prefix_and_suffix() {
        assert!(glob_match("a*", "a"));
        assert!(glob_match("a*", "abc"));
        assert!(!glob_match("a*", "ba"));
        assert!(!glob_match("a*", ""));
        assert!(glob_match("*a", "a"));
        assert!(glob_match("*a", "cba"));
        assert!(!glob_match("*a", "ab"));
        assert!(!glob_match("*a", ""));
    }

    #[test]
    fn glob_prefix_and_suffix_do_not_share_characters() {
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("ab*ba", "abba"));
    }

    #[test]
    fn glob_several_stars() {
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(glob_match("a*b*c", "abbbcc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(!glob_match("a*b*c", "abcd"));
        assert!(glob_match("*admin*", "team-a-admin"));
        assert!(glob_match("*admin*", "admin"));
        assert!(!glob_match("*admin*", "adm-in"));
        assert!(glob_match("*a*b*", "xaxbx"));
        assert!(!glob_match("*b*a*", "xaxbx"));
    }

    #[test]
    fn glob_empty_text() {
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", ""));
        assert!(!glob_match("*a*", ""));
    }

    #[test]
    fn glob_handles_multibyte_characters() {
        assert!(glob_match("ü*", "üx"));
        assert!(glob_match("*ü", "xü"));
        assert!(glob_match("*ü*", "aüb"));
        assert!(!glob_match("ü*ü", "ü"));
    }

    /// Straightforward dynamic programming, slow but obviously right.
    fn reference_match(pattern: &[u8], text: &[u8]) -> bool {
        let mut m = vec![vec![false; text.len() + 1]; pattern.len() + 1];
        m[0][0] = true;
        for i in 1..=pattern.len() {
            for j in 0..=text.len() {
                m[i][j] = if pattern[i - 1] == b'*' {
                    m[i - 1][j] || (j > 0 && m[i][j - 1])
                } else {
                    j > 0 && m[i - 1][j - 1] && pattern[i - 1] == text[j - 1]
                };
            }
        }
        m[pattern.len()][text.len()]
    }

    fn all_strings(alphabet: &[u8], max_len: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max_len {
            let next: Vec<String> = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                .collect();
            out.extend(next.iter().cloned());
            last = next;
        }
        out
    }

    #[test]
    fn glob_agrees_with_a_reference_matcher_on_all_short_inputs() {
        let patterns = all_strings(b"ab*", 6);
        let texts = all_strings(b"ab", 6);
        for p in &patterns {
            for s in &texts {
                assert_eq!(
                    glob_match(p, s),
                    reference_match(p.as_bytes(), s.as_bytes()),
                    "pattern {p:?} text {s:?}"
                );
            }
        }
    }

    #[test]
    fn glob_is_linear_on_a_long_adversarial_input() {
        let text = "a".repeat(1 << 20);
        let start = Instant::now();
        // 125 pieces then an absent piece: a recursive matcher tries every way of splitting a
        // megabyte between the stars.
        let many_stars = format!("{}*b*", "*a".repeat(125));
        assert!(many_stars.len() <= MAX_PATTERN_LEN);
        assert!(!glob_match(&many_stars, &text));
        assert!(glob_match(&many_stars, &format!("{text}b")));
        // A long piece that almost matches everywhere: the usual backtracking loop compares it
        // afresh at each of a million offsets.
        let long_piece = format!("*{}b*", "a".repeat(250));
        assert!(long_piece.len() <= MAX_PATTERN_LEN);
        assert!(!glob_match(&long_piece, &text));
        assert!(glob_match(&long_piece, &format!("{text}b")));
        // Generous, so a loaded machine cannot fail it: each match is a single scan.
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }
}
