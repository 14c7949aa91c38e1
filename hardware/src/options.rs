//! What discovery is asked to do: where to read from and how to load NVML.

use std::path::PathBuf;

/// Where NVML comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NvmlSource {
    /// The system's `libnvidia-ml.so.1`, found by the dynamic loader.
    #[default]
    Auto,
    /// A specific library file (a driver install outside the loader path,
    /// or a test double).
    Library(PathBuf),
    /// Do not use NVML; GPUs come from the PCI scan only.
    Disabled,
}

/// What to discover and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverOptions {
    /// Filesystem root that `proc/` and `sys/` are read below: `/` normally,
    /// the host mount in a container, a fixture tree in tests.
    pub root: PathBuf,
    /// How to load NVML.
    pub nvml: NvmlSource,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            nvml: NvmlSource::Auto,
        }
    }
}
