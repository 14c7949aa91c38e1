//! What GPU discovery reports: the list, each GPU with its health and MIG layout, and its errors.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where the GPU list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuSource {
    /// The NVIDIA management library: full detail.
    Nvml,
    /// `/sys/bus/pci/devices`: presence, model and driver binding only.
    PciScan,
}

impl GpuSource {
    /// The name used in JSON and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::PciScan => "pci-scan",
        }
    }
}

impl fmt::Display for GpuSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// All GPUs on the node and how they were found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInventory {
    /// `nvml`, or `pci-scan` when NVML could not be used.
    pub source: GpuSource,
    /// Why NVML was not used, when it was not. Kept apart from the general
    /// warnings because on a node without GPUs it is expected, not a problem.
    pub nvml_error: Option<String>,
    /// Kernel driver version (`550.54.15`). From NVML, or from the loaded
    /// module's `version` when NVML is unavailable.
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports (`12.4`); NVML only.
    pub cuda_driver_version: Option<String>,
    /// The GPUs, in NVML index order (which is PCI bus order).
    pub devices: Vec<Gpu>,
}

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// NVML index, or position in PCI order for a PCI scan (the same order
    /// NVML uses by default, so the two agree on a healthy node).
    pub index: u32,
    /// Product name as NVML reports it (`NVIDIA H100 80GB HBM3`); from a
    /// built-in table for a PCI scan.
    pub name: String,
    /// `GPU-<uuid>`; NVML only.
    pub uuid: Option<String>,
    /// Framebuffer size in bytes; NVML only.
    pub memory_bytes: Option<u64>,
    /// PCI address in sysfs form (`0000:1b:00.0`), so it can be matched with
    /// NICs and HCAs; NVML's own form is `00000000:1B:00.0`.
    pub pci_bus_id: Option<String>,
    /// PCI device id (`2330` for H100 SXM5).
    pub pci_device_id: Option<String>,
    /// CUDA compute capability.
    pub compute_capability: Option<ComputeCapability>,
    /// Architecture family in GPU Feature Discovery spelling (`hopper`,
    /// `ampere`, `ada-lovelace`...).
    pub architecture: Option<String>,
    /// MIG mode; `None` when the GPU does not support MIG.
    pub mig_mode: Option<MigMode>,
    /// MIG devices carved out of this GPU (empty unless MIG is enabled).
    pub mig_devices: Vec<MigDevice>,
    /// NVLinks currently up; `None` when the GPU has no NVLink.
    pub nvlinks_active: Option<u32>,
    /// NUMA node of the GPU's PCI function (from sysfs, not NVML, so it is
    /// the same source as for NICs and directly comparable).
    pub numa_node: Option<u32>,
    /// Whether a kernel driver is bound. A GPU without one is still reported
    /// (so it is counted), but nothing can use it.
    pub driver_loaded: bool,
    /// The bound driver (`nvidia`, or `vfio-pci` for passthrough).
    pub driver: Option<String>,
    /// Sysfs path of the GPU as the host sees it.
    pub device_path: Option<String>,
    /// Error counters, thermal and power state from NVML, judged by
    /// [`crate::health::assess`]; `None` for a PCI scan, which cannot read them.
    pub health: Option<GpuHealth>,
}

/// A GPU's health as NVML reports it. Every field is `None` when the GPU does
/// not support the query (or it failed, which is a warning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuHealth {
    /// ECC mode now in effect (a change waits for a reboot); without ECC the
    /// error counters below are not kept.
    pub ecc_enabled: Option<bool>,
    /// Uncorrected ECC errors since the driver loaded (volatile counter):
    /// above zero, what ran on the GPU may have read corrupt memory.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// Uncorrected ECC errors over the GPU's lifetime (aggregate counter),
    /// kept across driver reloads; history, not a verdict by itself.
    pub ecc_uncorrected_aggregate: Option<u64>,
    /// Framebuffer pages wait for retirement, which takes a GPU reset (boards
    /// before Ampere; later ones remap rows instead).
    pub retired_pages_pending: Option<bool>,
    /// Row remapping state (Ampere and later).
    pub remapped_rows: Option<RemappedRows>,
    /// Temperature at which the GPU starts throttling, in degrees Celsius.
    pub temperature_slowdown_c: Option<u32>,
    /// Temperature at which the GPU shuts down to protect itself, in degrees Celsius.
    pub temperature_shutdown_c: Option<u32>,
    /// Power limit the driver enforces now, in milliwatts.
    pub power_limit_mw: Option<u32>,
    /// GPU core temperature when read, in degrees Celsius. Not serialized: it
    /// changes every second, and the inventory document is compared between
    /// discoveries to decide whether to write it to the API server. Kept for
    /// the table and for metrics; the verdict it leads to is serialized.
    #[serde(skip)]
    pub temperature_c: Option<u32>,
    /// Power draw when read, in milliwatts. Not serialized, for the same
    /// reason as `temperature_c`.
    #[serde(skip)]
    pub power_mw: Option<u32>,
}

/// Rows of GPU memory remapped to spare rows (Ampere and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RemappedRows {
    /// Rows remapped because of correctable errors.
    pub correctable: u32,
    /// Rows remapped because of uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for the next GPU reset to take effect.
    pub pending: bool,
    /// A remapping failed: no spare row was left for a failing one.
    pub failed: bool,
}

/// CUDA compute capability (`major.minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeCapability {
    /// Major version (9 for Hopper).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl ComputeCapability {
    /// The architecture family, using the names GPU Feature Discovery puts
    /// in `nvidia.com/gpu.family`.
    pub fn family(self) -> Option<&'static str> {
        Some(match (self.major, self.minor) {
            (3, _) => "kepler",
            (5, _) => "maxwell",
            (6, _) => "pascal",
            (7, 0..=4) => "volta",
            (7, _) => "turing",
            (8, 0..=8) => "ampere",
            (8, _) => "ada-lovelace",
            (9, _) => "hopper",
            (10..=12, _) => "blackwell",
            _ => return None,
        })
    }
}

/// MIG mode of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigMode {
    /// MIG is enabled now.
    pub current: bool,
    /// MIG will be enabled after the next GPU reset.
    pub pending: bool,
}

/// One MIG device (a compute instance inside a GPU instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigDevice {
    /// Index within the parent GPU.
    pub index: u32,
    /// `MIG-<uuid>`, what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: Option<String>,
    /// Profile name (`1g.10gb`, `3g.40gb`, or `1c.3g.40gb` for a compute
    /// instance smaller than its GPU instance).
    pub profile: Option<String>,
    /// Memory of the GPU instance in bytes.
    pub memory_bytes: Option<u64>,
    /// Streaming multiprocessors available to it.
    pub multiprocessors: Option<u32>,
}

/// Why GPUs were not read through NVML.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The caller asked not to use NVML.
    #[error("NVML disabled by configuration")]
    Disabled,
    /// The library could not be opened, or lacks the entry points we need.
    #[error("cannot load NVML from {library}: {reason}")]
    Load {
        /// The path or soname that was tried.
        library: String,
        /// The loader's message.
        reason: String,
    },
    /// The library loaded but `nvmlInit` failed (driver not loaded, no
    /// permission to the device nodes, driver/library version mismatch).
    #[error("NVML initialization failed: {0}")]
    Init(#[source] nvml_wrapper::error::NvmlError),
    /// NVML initialised but could not even count the GPUs.
    #[error("NVML cannot count GPUs: {0}")]
    Count(#[source] nvml_wrapper::error::NvmlError),
}
