//! Node hardware discovery for spokelet: CPU, memory, NICs, RDMA, GPUs and their topology.
//!
//! [`discover`] reads everything from procfs and sysfs below a configurable
//! root (so it works on the host, in a DaemonSet with the host mounted at
//! `/host`, and on fixture trees in tests) plus NVML for GPU detail. It never
//! fails: anything it cannot read becomes an entry in
//! [`Inventory::warnings`] and the rest is still reported.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cpu;
pub mod gpu;
pub mod health;
pub mod labels;
pub mod memory;
pub mod net;
pub mod pci;
pub mod rdma;
pub(crate) mod sysfs;
pub mod table;
pub mod topology;

#[cfg(feature = "test-support")]
pub mod testing;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::cpu::CpuInfo;
pub use crate::gpu::{
    ComputeCapability, Gpu, GpuError, GpuHealth, GpuInventory, GpuSource, MigDevice, MigMode, RemappedRows,
};
pub use crate::health::{HealthReason, NodeHealth};
pub use crate::labels::labels;
pub use crate::memory::{HugePages, MemoryInfo, NumaMemory};
pub use crate::net::{Nic, Sriov};
pub use crate::pci::PciDevice;
pub use crate::rdma::{RdmaDevice, RdmaPort};
pub use crate::sysfs::SysfsError;
pub use crate::table::render_table;
pub use crate::topology::{GpuTopology, PeerKind, Relation, TopologyPeer};

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

/// Everything discovered about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// The kernel's hostname (empty when unreadable).
    pub hostname: String,
    /// Kernel release (`uname -r`), empty when unreadable.
    pub kernel: String,
    /// Machine architecture (`x86_64`, `aarch64`).
    pub architecture: String,
    /// Processors.
    pub cpu: CpuInfo,
    /// RAM and huge pages.
    pub memory: MemoryInfo,
    /// Network interfaces, physical and virtual, in name order.
    pub nics: Vec<Nic>,
    /// RDMA devices (InfiniBand HCAs, RoCE NICs).
    pub rdma: Vec<RdmaDevice>,
    /// GPUs and how they were found.
    pub gpus: GpuInventory,
    /// Network, display and accelerator PCI functions, for presence labels.
    pub pci_devices: Vec<PciDevice>,
    /// GPU to NIC/HCA placement.
    pub topology: Vec<GpuTopology>,
    /// Whether the node can take work, judged from everything above by
    /// [`health::assess`].
    pub health: NodeHealth,
    /// Everything that could not be read, each naming the path or call.
    pub warnings: Vec<String>,
}

/// Where the hostname is read: `/proc/sys/kernel/hostname` is the UTS hostname of the reading
/// process; `/etc/hostname` covers trees (and containers) without it.
const HOSTNAME_PATHS: &[&str] = &["proc/sys/kernel/hostname", "etc/hostname"];

/// The hostname discovery reports for a host below `root`; None when none can be read.
pub fn hostname(root: &std::path::Path) -> Option<String> {
    let mut warnings = sysfs::Warnings::default();
    let root = sysfs::Root::new(root, &mut warnings);
    Some(identity(&root, HOSTNAME_PATHS, &mut warnings)).filter(|h| !h.is_empty())
}

/// Reads a host identity file, falling back to a second location.
fn identity(root: &sysfs::Root, paths: &[&str], warnings: &mut sysfs::Warnings) -> String {
    let mut problems = Vec::new();
    for path in paths {
        match sysfs::read_attr(&root.join(path)) {
            Ok(Some(v)) if !v.is_empty() => return v,
            Ok(_) => {}
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        warnings.push(format!(
            "{}: not found",
            root.join(paths.first().copied().unwrap_or_default()).display()
        ));
    }
    for p in problems {
        warnings.push(p);
    }
    String::new()
}

/// Discovers the node below `opts.root`. Never fails and never panics: what
/// cannot be read is listed in [`Inventory::warnings`].
pub fn discover(opts: &DiscoverOptions) -> Inventory {
    let mut warnings = sysfs::Warnings::default();
    let root = sysfs::Root::new(&opts.root, &mut warnings);

    let hostname = identity(&root, HOSTNAME_PATHS, &mut warnings);
    let kernel = identity(&root, &["proc/sys/kernel/osrelease"], &mut warnings);
    let memory = memory::discover(&root, &mut warnings);
    // A kernel without NUMA support has no node directories: one node.
    let numa_nodes = u32::try_from(memory.numa.len()).unwrap_or(u32::MAX).max(1);
    let cpu = cpu::discover(&root, numa_nodes, &mut warnings);
    let nics = net::discover(&root, &mut warnings);
    let rdma = rdma::discover(&root, &mut warnings);
    let pci = pci::scan(&root, &mut warnings);
    let gpus = gpu::discover(&root, &opts.nvml, &pci, &mut warnings);
    let topology = topology::compute(&gpus.devices, &nics, &rdma);
    let pci_devices: Vec<PciDevice> = pci.into_iter().map(|e| e.device).collect();
    let health = health::assess(&nics, &rdma, &gpus, &pci_devices);

    Inventory {
        hostname,
        kernel,
        architecture: cpu.architecture.clone(),
        cpu,
        memory,
        nics,
        rdma,
        gpus,
        pci_devices,
        topology,
        health,
        warnings: warnings.into_vec(),
    }
}
