//! GPUs: read through NVML when it loads, counted by a PCI scan when it does not.

mod nvml;
mod pci_scan;
mod types;

use crate::options::NvmlSource;
use crate::pci::PciEntry;
use crate::sysfs::{Root, Warnings};

pub use self::types::{
    ComputeCapability, Gpu, GpuError, GpuHealth, GpuInventory, GpuSource, MigDevice, MigMode, RemappedRows,
};

/// Reads the NVIDIA kernel module's version, which is available without NVML
/// (e.g. in a container that does not have the user-space library).
fn module_driver_version(root: &Root, warnings: &mut Warnings) -> Option<String> {
    warnings
        .attr(&root.join("sys/module/nvidia/version"))
        .filter(|v| !v.is_empty())
}

pub(crate) fn discover(
    root: &Root,
    source: &NvmlSource,
    pci: &[PciEntry],
    warnings: &mut Warnings,
) -> GpuInventory {
    let scanned = pci_scan::discover(pci);
    let result = match source {
        NvmlSource::Disabled => Err(GpuError::Disabled),
        NvmlSource::Auto => nvml::discover(None, pci, warnings),
        NvmlSource::Library(path) => nvml::discover(Some(path), pci, warnings),
    };
    match result {
        Ok(inventory) => {
            for gpu in &scanned {
                let seen = inventory.devices.iter().any(|d| d.pci_bus_id == gpu.pci_bus_id);
                if !seen {
                    warnings.push(format!(
                        "GPU at {} ({}) is on PCI but not visible to NVML",
                        gpu.pci_bus_id.as_deref().unwrap_or("?"),
                        gpu.name
                    ));
                }
            }
            inventory
        }
        Err(e) => {
            if !scanned.is_empty() && !matches!(e, GpuError::Disabled) {
                warnings.push(format!(
                    "{} NVIDIA GPU(s) found on PCI but NVML is unavailable ({e}); reporting PCI scan only",
                    scanned.len()
                ));
            }
            let driver_version = if scanned.iter().any(|g| g.driver_loaded) {
                module_driver_version(root, warnings)
            } else {
                None
            };
            GpuInventory {
                source: GpuSource::PciScan,
                nvml_error: Some(e.to_string()),
                driver_version,
                cuda_driver_version: None,
                devices: scanned,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(major: u32, minor: u32) -> Option<&'static str> {
        ComputeCapability { major, minor }.family()
    }

    #[test]
    fn families() {
        assert_eq!(cc(7, 0), Some("volta"));
        assert_eq!(cc(7, 5), Some("turing"));
        assert_eq!(cc(8, 0), Some("ampere"));
        assert_eq!(cc(8, 6), Some("ampere"));
        assert_eq!(cc(8, 7), Some("ampere"));
        assert_eq!(cc(8, 9), Some("ada-lovelace"));
        assert_eq!(cc(9, 0), Some("hopper"));
        assert_eq!(cc(10, 0), Some("blackwell"));
        assert_eq!(cc(12, 0), Some("blackwell"));
        assert_eq!(cc(42, 0), None);
    }
}
