//! PCI addresses, sysfs device paths and the scan of `/sys/bus/pci/devices`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sysfs::{Root, Warnings};

/// A PCI function worth reporting: network, display and processing-accelerator
/// classes, the ones node-feature labels and GPU/RDMA placement care about.
/// Bridges, storage and the like are left out to keep the inventory readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    /// Bus address in sysfs form, e.g. `0000:1b:00.0`.
    pub address: String,
    /// Vendor id as four lowercase hex digits (`10de` is NVIDIA), the form
    /// node-feature-discovery uses in `pci-<vendor>.present` labels.
    pub vendor_id: String,
    /// Device id as four lowercase hex digits.
    pub device_id: String,
    /// Class, subclass and programming interface as six hex digits
    /// (`030200` is a 3D controller).
    pub class: String,
    /// Bound kernel driver, if any. `None` means no driver is loaded for it.
    pub driver: Option<String>,
    /// NUMA node the device is attached to, when the platform reports one.
    pub numa_node: Option<u32>,
}

/// A scanned PCI function together with where it lives in sysfs.
#[derive(Debug, Clone)]
pub(crate) struct PciEntry {
    pub(crate) device: PciDevice,
    /// Path of the device as the host sees it (`/sys/devices/pci0000:17/...`),
    /// which encodes its position in the PCIe tree.
    pub(crate) host_path: String,
}

impl PciDevice {
    /// An NVIDIA VGA or 3D controller (not an NVSwitch or the HDMI audio function).
    pub fn is_nvidia_gpu(&self) -> bool {
        self.vendor_id == NVIDIA_VENDOR && is_gpu_class(&self.class)
    }
}

impl PciEntry {
    pub(crate) fn is_nvidia_gpu(&self) -> bool {
        self.device.is_nvidia_gpu()
    }
}

/// NVIDIA's PCI vendor id.
pub(crate) const NVIDIA_VENDOR: &str = "10de";

/// VGA controller (`0300xx`) or 3D controller (`0302xx`): the two classes
/// NVIDIA GPUs enumerate as. NVSwitches (`0680`) and the HDMI audio function
/// (`0403`) share the vendor id and must not be counted.
pub(crate) fn is_gpu_class(class: &str) -> bool {
    class.starts_with("0300") || class.starts_with("0302")
}

/// Classes worth listing in [`PciDevice`]: network (02), display (03) and
/// processing accelerators (12).
fn is_reported_class(class: &str) -> bool {
    class.starts_with("02") || class.starts_with("03") || class.starts_with("12")
}

/// `dddd:bb:dd.f` with hex digits; the domain may be longer than four digits
/// (Intel VMD puts devices in domains such as `10000`).
pub(crate) fn is_pci_address(s: &str) -> bool {
    let mut parts = s.split(':');
    let (Some(domain), Some(bus), Some(devfn), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    let hex = |p: &str, min: usize, max: usize| {
        (min..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit())
    };
    hex(domain, 4, 8)
        && hex(bus, 2, 2)
        && hex(dev, 2, 2)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7')
}

/// `pci0000:17`: a host bridge (PCIe root complex) directory in sysfs.
fn is_host_bridge(s: &str) -> bool {
    s.strip_prefix("pci")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(d, b)| {
            !d.is_empty() && !b.is_empty() && d.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
        })
}

/// The position of a device in the PCIe tree, read from its sysfs path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PciPath<'a> {
    /// The root complex, e.g. `pci0000:17`.
    pub(crate) host_bridge: &'a str,
    /// PCI functions from the root port down to the device itself.
    pub(crate) chain: Vec<&'a str>,
}

impl<'a> PciPath<'a> {
    /// Parses `/sys/devices/pci0000:17/0000:17:01.0/.../0000:1b:00.0/net/x`.
    /// `None` for devices that are not on PCI (virtual, platform, USB root).
    pub(crate) fn parse(host_path: &'a str) -> Option<Self> {
        let mut components = host_path.split('/').skip_while(|c| !is_host_bridge(c));
        let host_bridge = components.next()?;
        let chain: Vec<&str> = components.take_while(|c| is_pci_address(c)).collect();
        if chain.is_empty() {
            return None;
        }
        Some(Self { host_bridge, chain })
    }

    /// The device's own address (the deepest PCI function on the path).
    pub(crate) fn address(&self) -> Option<&'a str> {
        self.chain.last().copied()
    }

    /// The bridges (root port, switch ports) above the device.
    pub(crate) fn bridges(&self) -> &[&'a str] {
        match self.chain.split_last() {
            Some((_, above)) => above,
            None => &[],
        }
    }
}

/// The PCI function directory that `resolved` is (or is below): for a virtio
/// NIC `device` resolves to `.../0000:00:03.0/virtio2`, whose PCI attributes
/// (`numa_node`, `sriov_*`) live one level up.
/// Where a class device (a netdev, an RDMA device) sits in the device tree.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    /// The resolved `device` link; `None` for software devices, which have none.
    pub(crate) device: Option<PathBuf>,
    /// Host-side path of the PCI function, or of the device when it is not on PCI
    /// (reported so topology can be checked by hand).
    pub(crate) device_path: Option<String>,
    /// The PCI address, when the device is on PCI.
    pub(crate) pci_address: Option<String>,
}

impl Placement {
    /// Resolve `<class_dir>/device`; a missing link is a software device, not a warning.
    pub(crate) fn of(root: &Root, class_dir: &Path, warnings: &mut Warnings) -> Placement {
        let device = match root.resolve(&class_dir.join("device")) {
            Ok(p) => p,
            Err(e) => {
                if !e.is_not_found() {
                    warnings.push(e);
                }
                return Placement::default();
            }
        };
        let device_path = Some(root.host_path(pci_function_dir(&device).unwrap_or(&device)));
        let pci_address = device_path
            .as_deref()
            .and_then(PciPath::parse)
            .and_then(|p| p.address())
            .map(str::to_owned);
        Placement {
            device: Some(device),
            device_path,
            pci_address,
        }
    }

    /// The PCI function directory the device belongs to, if it is on PCI.
    pub(crate) fn pci_dir(&self) -> Option<&Path> {
        self.device.as_deref().and_then(pci_function_dir)
    }
}

pub(crate) fn pci_function_dir(resolved: &Path) -> Option<&Path> {
    resolved
        .ancestors()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_pci_address))
}

/// Normalises a bus id as NVML writes it (`00000000:1B:00.0`) to the sysfs
/// form (`0000:1b:00.0`), so GPUs can be matched with sysfs paths.
pub(crate) fn normalize_bus_id(bus_id: &str) -> Option<String> {
    let mut parts = bus_id.trim().split(':');
    let (Some(domain), Some(bus), Some(devfn), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let (dev, func) = devfn.split_once('.')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok()?;
    let func = u8::from_str_radix(func, 16).ok()?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// Parses a `0x10de`-style hex attribute into `width` lowercase digits.
fn hex_id(value: &str, width: usize) -> Option<String> {
    let digits = value.strip_prefix("0x").unwrap_or(value);
    let n = u32::from_str_radix(digits, 16).ok()?;
    let s = format!("{n:0width$x}");
    (s.len() == width).then_some(s)
}

/// Reads a hex id attribute, warning when it is present but malformed.
fn read_hex(path: &Path, width: usize, warnings: &mut Warnings) -> Option<String> {
    let value = warnings.attr(path)?;
    let id = hex_id(&value, width);
    if id.is_none() {
        warnings.push(format!(
            "{}: unexpected value {:?} (expected a {width}-digit hex id)",
            path.display(),
            crate::sysfs::excerpt(&value)
        ));
    }
    id
}

/// Reads a device's `numa_node`, walking up to the PCI function when the
/// path given is a child device (virtio) without one of its own.
pub(crate) fn numa_node_of(resolved: &Path, warnings: &mut Warnings) -> Option<u32> {
    let dir = pci_function_dir(resolved).unwrap_or(resolved);
    crate::sysfs::numa_node(&dir.join("numa_node"), warnings)
}

/// Scans `/sys/bus/pci/devices`. Every function's class is read; the other
/// attributes only for the classes that are reported, since a large server
/// has hundreds of bridges we would otherwise read for nothing.
pub(crate) fn scan(root: &Root, warnings: &mut Warnings) -> Vec<PciEntry> {
    let bus = root.join("sys/bus/pci/devices");
    let names = match crate::sysfs::list_dir(&bus, warnings) {
        Ok(Some(names)) => names,
        Ok(None) => {
            warnings.push(format!("{}: not found; PCI devices not scanned", bus.display()));
            return Vec::new();
        }
        Err(e) => {
            warnings.push(e);
            return Vec::new();
        }
    };
    let mut entries = Vec::new();
    for name in names {
        if !is_pci_address(&name) {
            warnings.push(format!("{}: skipping {name:?}, not a PCI address", bus.display()));
            continue;
        }
        let dir: PathBuf = bus.join(&name);
        // Class first: most functions on a server are bridges, and nothing
        // else about them is needed.
        let Some(class) = read_hex(&dir.join("class"), 6, warnings) else {
            continue;
        };
        if !is_reported_class(&class) {
            continue;
        }
        let Some(vendor_id) = read_hex(&dir.join("vendor"), 4, warnings) else {
            continue;
        };
        let resolved = match root.resolve(&dir) {
            Ok(p) => p,
            Err(e) => {
                warnings.push(e);
                continue;
            }
        };
        let device_id = read_hex(&resolved.join("device"), 4, warnings).unwrap_or_default();
        let driver = warnings.link(&resolved.join("driver"));
        let numa_node = crate::sysfs::numa_node(&resolved.join("numa_node"), warnings);
        entries.push(PciEntry {
            device: PciDevice {
                address: name,
                vendor_id,
                device_id,
                class,
                driver,
                numa_node,
            },
            host_path: root.host_path(&resolved),
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(is_pci_address("0000:1b:00.0"));
        assert!(is_pci_address("10000:e1:00.7"));
        assert!(!is_pci_address("0000:1b:00.8"));
        assert!(!is_pci_address("0000:1b:00"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("virtio2"));
        assert!(!is_pci_address("0000:1g:00.0"));
    }

    #[test]
    fn path_parsing() {
        let p = "/sys/devices/pci0000:17/0000:17:01.0/0000:18:00.0/0000:19:00.0/0000:1b:00.0/net/eth0";
        let parsed = PciPath::parse(p).unwrap();
        assert_eq!(parsed.host_bridge, "pci0000:17");
        assert_eq!(parsed.address(), Some("0000:1b:00.0"));
        assert_eq!(parsed.bridges(), ["0000:17:01.0", "0000:18:00.0", "0000:19:00.0"]);
        assert!(PciPath::parse("/sys/devices/virtual/net/lo").is_none());
        assert!(PciPath::parse("/sys/devices/pci0000:00/firmware_node").is_none());
        let virtio = PciPath::parse("/sys/devices/pci0000:00/0000:00:03.0/virtio2").unwrap();
        assert_eq!(virtio.address(), Some("0000:00:03.0"));
        assert!(virtio.bridges().is_empty());
    }

    #[test]
    fn function_dir_walks_up_from_child_devices() {
        let p = Path::new("/x/sys/devices/pci0000:00/0000:00:03.0/virtio2");
        assert_eq!(
            pci_function_dir(p),
            Some(Path::new("/x/sys/devices/pci0000:00/0000:00:03.0"))
        );
        assert_eq!(pci_function_dir(Path::new("/x/sys/devices/virtual/net/lo")), None);
    }

    #[test]
    fn bus_ids() {
        assert_eq!(
            normalize_bus_id("00000000:1B:00.0").as_deref(),
            Some("0000:1b:00.0")
        );
        assert_eq!(normalize_bus_id("0000:c3:00.1").as_deref(), Some("0000:c3:00.1"));
        assert_eq!(normalize_bus_id("garbage"), None);
        assert_eq!(normalize_bus_id("0000:1b:00"), None);
    }

    #[test]
    fn hex_ids() {
        assert_eq!(hex_id("0x10de", 4).as_deref(), Some("10de"));
        assert_eq!(hex_id("0x030200", 6).as_deref(), Some("030200"));
        assert_eq!(hex_id("0x1", 4).as_deref(), Some("0001"));
        assert_eq!(hex_id("0x123456", 4), None);
        assert_eq!(hex_id("zz", 4), None);
    }
}
