//! Shared helpers for the integration tests: fixture paths and the NVML test double.
#![allow(dead_code)]

use std::path::PathBuf;

use spokelet_hardware::testing::{ShimVariant, build_nvml_shim};
use spokelet_hardware::{DiscoverOptions, Inventory, NvmlSource};

/// A committed fixture tree under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Discovers a fixture tree with NVML disabled.
pub fn discover_fixture(name: &str) -> Inventory {
    spokelet_hardware::discover(&DiscoverOptions {
        root: fixture(name),
        nvml: NvmlSource::Disabled,
    })
}

/// A freshly compiled NVML test double. Every call builds into its own
/// directory so that tests in one process never share the library's state.
/// Fails the test (rather than skipping it) when there is no C compiler.
pub struct Shim {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn shim(variant: ShimVariant) -> Shim {
    let dir = tempfile::Builder::new()
        .prefix("nvml-shim-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let path = build_nvml_shim(variant, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    Shim { _dir: dir, path }
}

/// Discovers a fixture tree with NVML loaded from `shim`.
pub fn discover_with_shim(name: &str, shim: &Shim) -> Inventory {
    spokelet_hardware::discover(&DiscoverOptions {
        root: fixture(name),
        nvml: NvmlSource::Library(shim.path.clone()),
    })
}
