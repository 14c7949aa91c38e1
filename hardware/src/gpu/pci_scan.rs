//! GPU fallback: NVIDIA display/3D controllers found on PCI, named from a built-in table.

use super::types::{ComputeCapability, Gpu};
use crate::pci::PciEntry;

/// Data-center GPUs by PCI device id: the name NVML would report and the
/// compute capability (from which the family follows). Unknown ids are still
/// reported, just with a generic name; this table only makes the fallback
/// output friendlier, it does not decide what counts as a GPU.
const KNOWN: &[(&str, &str, u32, u32)] = &[
    ("1db1", "Tesla V100-SXM2-16GB", 7, 0),
    ("1db4", "Tesla V100-PCIE-16GB", 7, 0),
    ("1db5", "Tesla V100-SXM2-32GB", 7, 0),
    ("1eb8", "Tesla T4", 7, 5),
    ("20b0", "NVIDIA A100-SXM4-40GB", 8, 0),
    ("20b2", "NVIDIA A100-SXM4-80GB", 8, 0),
    ("20b5", "NVIDIA A100 80GB PCIe", 8, 0),
    ("20b7", "NVIDIA A30", 8, 0),
    ("20f1", "NVIDIA A100-PCIE-40GB", 8, 0),
    ("2235", "NVIDIA A40", 8, 6),
    ("2236", "NVIDIA A10", 8, 6),
    ("2321", "NVIDIA H100 NVL", 9, 0),
    ("2330", "NVIDIA H100 80GB HBM3", 9, 0),
    ("2331", "NVIDIA H100 PCIe", 9, 0),
    ("2335", "NVIDIA H200", 9, 0),
    ("233b", "NVIDIA H200 NVL", 9, 0),
    ("2342", "NVIDIA GH200 480GB", 9, 0),
    ("26b5", "NVIDIA L40", 8, 9),
    ("26b9", "NVIDIA L40S", 8, 9),
    ("27b8", "NVIDIA L4", 8, 9),
    ("2901", "NVIDIA B200", 10, 0),
];

fn lookup(device_id: &str) -> Option<(&'static str, ComputeCapability)> {
    KNOWN
        .iter()
        .find(|(id, ..)| *id == device_id)
        .map(|(_, name, major, minor)| {
            (
                *name,
                ComputeCapability {
                    major: *major,
                    minor: *minor,
                },
            )
        })
}

/// Every NVIDIA GPU among the scanned PCI functions, in PCI order.
pub(super) fn discover(pci: &[PciEntry]) -> Vec<Gpu> {
    let mut gpus: Vec<&PciEntry> = pci.iter().filter(|e| e.is_nvidia_gpu()).collect();
    gpus.sort_by(|a, b| a.device.address.cmp(&b.device.address));
    gpus.into_iter()
        .zip(0u32..)
        .map(|(entry, index)| {
            let known = lookup(&entry.device.device_id);
            let name = known.map_or_else(
                || format!("NVIDIA GPU (device {})", entry.device.device_id),
                |(name, _)| name.to_owned(),
            );
            let compute_capability = known.map(|(_, cc)| cc);
            Gpu {
                index,
                name,
                uuid: None,
                memory_bytes: None,
                pci_bus_id: Some(entry.device.address.clone()),
                pci_device_id: Some(entry.device.device_id.clone()),
                architecture: compute_capability.and_then(|c| c.family()).map(str::to_owned),
                compute_capability,
                mig_mode: None,
                mig_devices: Vec::new(),
                nvlinks_active: None,
                numa_node: entry.device.numa_node,
                driver_loaded: entry.device.driver.is_some(),
                driver: entry.device.driver.clone(),
                device_path: Some(entry.host_path.clone()),
                health: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        // Keeps the table easy to audit against the PCI id database.
        assert!(KNOWN.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn known_ids() {
        let (name, cc) = lookup("2330").unwrap();
        assert_eq!(name, "NVIDIA H100 80GB HBM3");
        assert_eq!(cc.family(), Some("hopper"));
        assert_eq!(lookup("26b9").unwrap().1.family(), Some("ada-lovelace"));
        assert!(lookup("ffff").is_none());
    }
}
