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
mod inventory;
pub mod labels;
pub mod memory;
pub mod net;
mod options;
pub mod pci;
pub mod rdma;
pub(crate) mod sysfs;
pub mod table;
pub mod topology;

#[cfg(feature = "test-support")]
pub mod testing;

pub use crate::cpu::CpuInfo;
pub use crate::gpu::{
    ComputeCapability, Gpu, GpuError, GpuHealth, GpuInventory, GpuSource, MigDevice, MigMode, RemappedRows,
};
pub use crate::health::{HealthReason, NodeHealth};
pub use crate::inventory::Inventory;
pub use crate::labels::labels;
pub use crate::memory::{HugePages, MemoryInfo, NumaMemory};
pub use crate::net::{Nic, Sriov};
pub use crate::options::{DiscoverOptions, NvmlSource};
pub use crate::pci::PciDevice;
pub use crate::rdma::{RdmaDevice, RdmaPort};
pub use crate::sysfs::SysfsError;
pub use crate::table::render_table;
pub use crate::topology::{GpuTopology, PeerKind, Relation, TopologyPeer};

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
