//! What the steps share while expanding one work: the shared support and the work's input, the
//! policy check of what a Flux object reads, and how a build's objects join the expansion.

use spokelet_flux::objects::{FluxKind, FluxObject, ReadRef};

use super::readiness::Native;
use super::support::FluxSupport;
use crate::expand::{ExpandInput, Expansion};
use crate::manifestwork::Manifest;
use crate::policy::{Policy, Target};

/// What the steps share while expanding one work.
pub(crate) struct Step<'a> {
    pub(crate) support: &'a FluxSupport,
    pub(crate) input: &'a ExpandInput<'a>,
}

/// Why the write policy refuses a Flux object or a Secret or ConfigMap it reads, if it does.
/// What a Flux object reads is held to the rules of what a work writes: a work may not have
/// the agent read (and substitute, or send to a registry) what it could not write itself.
pub(super) fn refused_by_policy<S>(
    policy: &Policy,
    kind: FluxKind,
    obj: &FluxObject<S>,
    reads: &[ReadRef],
) -> Option<String> {
    let (ns, name) = (obj.namespace.as_str(), obj.name.as_str());
    if let Err(d) = policy.check(&Target::new(kind.group(), kind.name(), ns, name)) {
        return Some(format!("{} {ns}/{name}: {d}", kind.name()));
    }
    reads.iter().find_map(|r| {
        policy
            .check(&Target::new("", r.kind, ns, &r.name))
            .err()
            .map(|d| {
                format!(
                    "{} {ns}/{} ({} of {} {name}): {d}",
                    r.kind,
                    r.name,
                    r.field,
                    kind.name()
                )
            })
    })
}

/// Appends a build's manifests to the expansion as the Kustomization's objects.
pub(super) fn append(x: &mut Expansion, native: &mut Native, manifests: &[Manifest], first_built: usize) {
    let start = first_built + x.built.len();
    x.built.extend(manifests.iter().cloned());
    native.objects = start..first_built + x.built.len();
    native.usable = true;
}
