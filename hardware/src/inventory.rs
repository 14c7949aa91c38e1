//! Everything discovered about a node, as one serializable value.

use serde::{Deserialize, Serialize};

use crate::cpu::CpuInfo;
use crate::gpu::GpuInventory;
use crate::health::NodeHealth;
use crate::memory::MemoryInfo;
use crate::net::Nic;
use crate::pci::PciDevice;
use crate::rdma::RdmaDevice;
use crate::topology::GpuTopology;

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
    /// `health::assess`.
    pub health: NodeHealth,
    /// Everything that could not be read, each naming the path or call.
    pub warnings: Vec<String>,
}
