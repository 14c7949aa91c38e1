//! Shared helpers for the integration tests: fixture paths and the NVML test double.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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

/// Discovers `root` with NVML loaded from `shim`.
pub fn discover_root_with_shim(root: &Path, shim: &Shim) -> Inventory {
    spokelet_hardware::discover(&DiscoverOptions {
        root: root.to_path_buf(),
        nvml: NvmlSource::Library(shim.path.clone()),
    })
}

/// Discovers `root` with NVML disabled.
pub fn discover_root(root: &Path) -> Inventory {
    spokelet_hardware::discover(&DiscoverOptions {
        root: root.to_path_buf(),
        nvml: NvmlSource::Disabled,
    })
}

/// A writable copy of a fixture tree, its relative symlinks kept, removed on drop.
pub struct FixtureCopy {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl FixtureCopy {
    /// Overwrites a file below the copy's root (following the tree's symlinks, so
    /// `sys/class/net/<if>/operstate` reaches the device directory).
    pub fn write(&self, rel: &str, content: &str) {
        let path = self.root.join(rel);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

pub fn copy_fixture(name: &str) -> FixtureCopy {
    let dir = tempfile::Builder::new()
        .prefix("fixture-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let root = dir.path().join(name);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture(name))
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {name}");
    FixtureCopy { _dir: dir, root }
}

/// The HGX H100 tree with mlx5_7's cable plugged back in: nothing in it is unhealthy.
pub fn healthy_hgx() -> FixtureCopy {
    let copy = copy_fixture("hgx-h100");
    copy.write("sys/class/infiniband/mlx5_7/ports/1/state", "4: ACTIVE\n");
    copy.write("sys/class/infiniband/mlx5_7/ports/1/phys_state", "5: LinkUp\n");
    copy.write("sys/class/net/ibp224s0/operstate", "up\n");
    copy
}

/// The health reasons as (code, subject) pairs, in the document's order.
pub fn verdicts(inv: &Inventory) -> Vec<(String, String)> {
    assert_eq!(inv.health.healthy, inv.health.reasons.is_empty());
    inv.health
        .reasons
        .iter()
        .map(|r| (r.code.clone(), r.subject.clone()))
        .collect()
}

/// Expected verdicts, for comparing with [`verdicts`].
pub fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(c, s)| ((*c).to_owned(), (*s).to_owned()))
        .collect()
}
