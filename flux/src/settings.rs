//! The agent's setting for Flux objects in works (`--flux-objects`): reconciled natively, with
//! an artifact cache and its limits, or passed through to the API server.

use std::path::PathBuf;

use spokelet_artifact::unpack::UnpackLimits;

use crate::source::InsecureRegistries;

/// What the agent does with Flux objects in works (`--flux-objects`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FluxObjects {
    /// Reconciled by the agent: artifacts cached in `cache`, unpacked within `unpack`, from
    /// plain-HTTP or local registries only as `insecure` allows.
    Native {
        cache: PathBuf,
        unpack: UnpackLimits,
        insecure: InsecureRegistries,
    },
    /// Sent to the API server like any other object, for spokes that run Flux themselves.
    Passthrough,
}
