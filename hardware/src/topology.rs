//! GPU-to-NIC/HCA affinity: which network devices share a PCIe switch, root complex or NUMA node with each GPU.
//!
//! GPUDirect RDMA moves data between a GPU and an HCA without touching host
//! memory; it is only fast when the two sit under the same PCIe switch
//! (peer-to-peer traffic then never crosses the CPU). Schedulers and NCCL
//! configuration want to know that pairing, so it is computed here from the
//! sysfs device paths, which spell out each device's PCIe ancestry.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::gpu::Gpu;
use crate::net::Nic;
use crate::pci::PciPath;
use crate::rdma::RdmaDevice;

/// How close two PCI devices are. Variants are ordered best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// Behind a common PCIe bridge below the root complex (a PCIe switch, or
    /// the same root port): peer-to-peer traffic stays inside the switch.
    /// nvidia-smi calls this PIX/PXB.
    PcieSwitch,
    /// Same root complex (host bridge) but different root ports: traffic
    /// goes through the CPU's PCIe root but not across sockets (PHB).
    PcieRoot,
    /// Same NUMA node but different root complexes (NODE).
    Numa,
    /// Nothing in common, or not enough information to tell (SYS).
    None,
}

impl Relation {
    /// The name used in JSON, tables and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PcieSwitch => "pcie-switch",
            Self::PcieRoot => "pcie-root",
            Self::Numa => "numa",
            Self::None => "none",
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of device a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    /// An RDMA device from `/sys/class/infiniband`.
    Rdma,
    /// A network interface from `/sys/class/net`.
    Nic,
}

/// One GPU and the network devices near it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuTopology {
    /// The GPU's index in `gpus.devices`.
    pub gpu: u32,
    /// The GPU's PCI address.
    pub pci_bus_id: Option<String>,
    /// The GPU's NUMA node.
    pub numa_node: Option<u32>,
    /// Network devices with any relation other than `none`, best first.
    pub peers: Vec<TopologyPeer>,
}

/// A network device near a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyPeer {
    /// RDMA device or plain NIC.
    pub kind: PeerKind,
    /// `mlx5_0`, `eth0`...
    pub name: String,
    /// The peer's PCI address.
    pub pci_address: Option<String>,
    /// How close it is to the GPU.
    pub relation: Relation,
}

/// A device's placement, as far as topology cares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement<'a> {
    pub(crate) device_path: Option<&'a str>,
    pub(crate) numa_node: Option<u32>,
}

/// The relation between two placed devices.
pub(crate) fn relation(a: Placement<'_>, b: Placement<'_>) -> Relation {
    let (pa, pb) = (
        a.device_path.and_then(PciPath::parse),
        b.device_path.and_then(PciPath::parse),
    );
    if let (Some(pa), Some(pb)) = (&pa, &pb)
        && pa.host_bridge == pb.host_bridge
    {
        // Any shared bridge below the host bridge means a shared switch (a
        // root port has a single link, so two devices below the same root
        // port are necessarily behind a switch on it).
        let shared = pa
            .bridges()
            .iter()
            .zip(pb.bridges())
            .take_while(|(x, y)| x == y)
            .count();
        return if shared > 0 {
            Relation::PcieSwitch
        } else {
            Relation::PcieRoot
        };
    }
    match (a.numa_node, b.numa_node) {
        (Some(x), Some(y)) if x == y => Relation::Numa,
        _ => Relation::None,
    }
}

pub(crate) fn compute(gpus: &[Gpu], nics: &[Nic], rdma: &[RdmaDevice]) -> Vec<GpuTopology> {
    gpus.iter()
        .map(|gpu| {
            let here = Placement {
                device_path: gpu.device_path.as_deref(),
                numa_node: gpu.numa_node,
            };
            let rdma_peers = rdma.iter().map(|d| {
                let there = Placement {
                    device_path: d.device_path.as_deref(),
                    numa_node: d.numa_node,
                };
                (PeerKind::Rdma, &d.name, &d.pci_address, there)
            });
            // Only NICs backed by hardware can do peer-to-peer DMA.
            let nic_peers = nics.iter().filter(|n| n.physical).map(|n| {
                let there = Placement {
                    device_path: n.device_path.as_deref(),
                    numa_node: n.numa_node,
                };
                (PeerKind::Nic, &n.name, &n.pci_address, there)
            });
            let mut peers: Vec<TopologyPeer> = rdma_peers
                .chain(nic_peers)
                .filter_map(|(kind, name, pci_address, there)| {
                    let relation = relation(here, there);
                    (relation != Relation::None).then(|| TopologyPeer {
                        kind,
                        name: name.clone(),
                        pci_address: pci_address.clone(),
                        relation,
                    })
                })
                .collect();
            peers.sort_by(|a, b| {
                (a.relation, a.kind)
                    .cmp(&(b.relation, b.kind))
                    .then_with(|| crate::sysfs::natural_cmp(&a.name, &b.name))
            });
            GpuTopology {
                gpu: gpu.index,
                pci_bus_id: gpu.pci_bus_id.clone(),
                numa_node: gpu.numa_node,
                peers,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: &str, numa: Option<u32>) -> Placement<'_> {
        Placement {
            device_path: Some(path),
            numa_node: numa,
        }
    }

    #[test]
    fn relations() {
        let gpu = at(
            "/sys/devices/pci0000:18/0000:18:01.0/0000:19:00.0/0000:1a:00.0/0000:1b:00.0",
            Some(0),
        );
        let same_switch = at(
            "/sys/devices/pci0000:18/0000:18:01.0/0000:19:00.0/0000:1a:01.0/0000:1c:00.0",
            Some(0),
        );
        let same_root = at("/sys/devices/pci0000:18/0000:18:02.0/0000:30:00.0", Some(0));
        let same_numa = at("/sys/devices/pci0000:40/0000:40:01.0/0000:41:00.0", Some(0));
        let far = at("/sys/devices/pci0000:9a/0000:9a:01.0/0000:9b:00.0", Some(1));
        assert_eq!(relation(gpu, same_switch), Relation::PcieSwitch);
        assert_eq!(relation(gpu, same_root), Relation::PcieRoot);
        assert_eq!(relation(gpu, same_numa), Relation::Numa);
        assert_eq!(relation(gpu, far), Relation::None);
        let unknown = Placement {
            device_path: None,
            numa_node: None,
        };
        assert_eq!(relation(gpu, unknown), Relation::None);
        assert!(Relation::PcieSwitch < Relation::PcieRoot && Relation::Numa < Relation::None);
    }
}
