//! Network interfaces from `/sys/class/net`: link state, speed, driver, PCI placement and SR-IOV.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pci;
use crate::sysfs::{self, Root, Warnings};

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    /// Interface name (`eth0`, `ens1f0np0`, `ibp28s0`).
    pub name: String,
    /// Hardware address as the kernel prints it; 20 bytes long for IPoIB.
    pub mac: Option<String>,
    /// MTU in bytes.
    pub mtu: Option<u32>,
    /// RFC 2863 operational state (`up`, `down`, `unknown`...). Virtual
    /// interfaces such as `lo` legitimately report `unknown`.
    pub operstate: String,
    /// Administratively up (`IFF_UP` in `flags`, set by `ip link set up`):
    /// an interface that is down on purpose is unused, not broken, so only
    /// one meant to be up can have a link fault. `None` when unreadable.
    pub admin_up: Option<bool>,
    /// Link layer from the ARPHRD `type` (`ether`, `infiniband`, `loopback`,
    /// or `arphrd-<n>` for the rest).
    pub link_type: Option<String>,
    /// Negotiated speed in Mb/s. `None` when the link is down or the driver
    /// does not know (virtio, most virtual devices): the kernel then reports
    /// -1 or refuses the read with `EINVAL`, which is not an error.
    pub speed_mbps: Option<u64>,
    /// Kernel driver bound to the device (`mlx5_core`, `ice`, `virtio_net`).
    pub driver: Option<String>,
    /// PCI function backing the interface, when it is on PCI.
    pub pci_address: Option<String>,
    /// NUMA node of the backing device, when the platform reports one.
    pub numa_node: Option<u32>,
    /// Backed by a device (PCI, platform, USB) rather than purely software
    /// (`lo`, bridges, veth, VLANs, which live under `/sys/devices/virtual`).
    pub physical: bool,
    /// A virtual function carved out of an SR-IOV physical function.
    pub is_vf: bool,
    /// SR-IOV capability of the physical function; `None` when it has none.
    pub sriov: Option<Sriov>,
    /// Sysfs path of the backing device as the host sees it; it encodes the
    /// PCIe position used for topology.
    pub device_path: Option<String>,
}

/// SR-IOV state of a physical function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sriov {
    /// How many VFs the device can expose (`sriov_totalvfs`).
    pub total_vfs: u32,
    /// How many are enabled now (`sriov_numvfs`).
    pub num_vfs: u32,
}

/// `IFF_UP` in a netdev's `flags` (`include/uapi/linux/if.h`).
const IFF_UP: u32 = 0x1;

/// Parses the kernel's `flags` attribute (`0x1003`).
fn parse_flags(value: &str) -> Option<u32> {
    let digits = value.strip_prefix("0x").unwrap_or(value);
    u32::from_str_radix(digits, 16).ok()
}

/// Whether the interface is administratively up, from its `flags`.
fn admin_up(path: &Path, warnings: &mut Warnings) -> Option<bool> {
    let value = warnings.attr(path)?;
    match parse_flags(&value) {
        Some(flags) => Some(flags & IFF_UP != 0),
        None => {
            warnings.push(sysfs::SysfsError::Parse {
                path: path.to_path_buf(),
                value: sysfs::excerpt(&value),
                expected: "hexadecimal interface flags",
            });
            None
        }
    }
}

/// Names for the ARPHRD link types that show up on servers.
fn link_type(code: u32) -> String {
    match code {
        1 => "ether".to_owned(),
        32 => "infiniband".to_owned(),
        772 => "loopback".to_owned(),
        776 => "sit".to_owned(),
        65534 => "none".to_owned(),
        n => format!("arphrd-{n}"),
    }
}

/// Reads `speed`, mapping the kernel's ways of saying "unknown" to `None`.
fn speed(path: &Path, warnings: &mut Warnings) -> Option<u64> {
    match sysfs::read_attr(path) {
        Ok(Some(value)) => match value.parse::<i64>() {
            // SPEED_UNKNOWN is -1, and some drivers print it as u32.
            Ok(n) if n > 0 && n != i64::from(u32::MAX) => u64::try_from(n).ok(),
            Ok(_) => None,
            Err(_) => {
                warnings.push(sysfs::SysfsError::Parse {
                    path: path.to_path_buf(),
                    value: sysfs::excerpt(&value),
                    expected: "a speed in Mb/s",
                });
                None
            }
        },
        Ok(None) => None,
        Err(e) if e.is_invalid_argument() || e.is_unsupported() => None,
        Err(e) => {
            warnings.push(e);
            None
        }
    }
}

fn read_nic(root: &Root, class_entry: &Path, name: String, warnings: &mut Warnings) -> Option<Nic> {
    // Resolving the class link tells us where the netdev lives; a loop or a
    // dangling link leaves nothing trustworthy to read.
    let dir = match root.resolve(class_entry) {
        Ok(p) => p,
        Err(e) => {
            warnings.push(e);
            return None;
        }
    };
    let is_virtual_path = root.host_path(&dir).starts_with("/sys/devices/virtual/");
    let placement = if is_virtual_path {
        pci::Placement::default()
    } else {
        pci::Placement::of(root, &dir, warnings)
    };
    let device = placement.device.as_deref();

    let (sriov, is_vf) = match placement.pci_dir() {
        Some(pci) => {
            let total: Option<u32> = warnings.parse(&pci.join("sriov_totalvfs"), "a VF count");
            let sriov = match total {
                Some(total_vfs) if total_vfs > 0 => Some(Sriov {
                    total_vfs,
                    num_vfs: warnings
                        .parse(&pci.join("sriov_numvfs"), "a VF count")
                        .unwrap_or(0),
                }),
                _ => None,
            };
            (sriov, sysfs::exists(&pci.join("physfn")))
        }
        None => (None, false),
    };

    let mac = warnings.attr(&dir.join("address")).filter(|m| !m.is_empty());
    Some(Nic {
        mac,
        mtu: warnings.parse(&dir.join("mtu"), "an MTU"),
        operstate: warnings
            .attr(&dir.join("operstate"))
            .unwrap_or_else(|| "unknown".to_owned()),
        admin_up: admin_up(&dir.join("flags"), warnings),
        link_type: warnings.parse(&dir.join("type"), "an ARPHRD type").map(link_type),
        // Software interfaces have no link speed worth knowing (veth makes
        // one up), and a Kubernetes node can have hundreds of them.
        speed_mbps: device.and_then(|_| speed(&dir.join("speed"), warnings)),
        driver: device.and_then(|d| warnings.link(&d.join("driver"))),
        numa_node: device.and_then(|d| {
            // A virtio NIC's `device` is the virtio device, whose NUMA node is
            // recorded on the PCI function above it.
            let own = d.join("numa_node");
            if sysfs::exists(&own) {
                sysfs::numa_node(&own, warnings)
            } else {
                pci::numa_node_of(d, warnings)
            }
        }),
        physical: device.is_some(),
        is_vf,
        sriov,
        device_path: placement.device_path,
        pci_address: placement.pci_address,
        name,
    })
}

pub(crate) fn discover(root: &Root, warnings: &mut Warnings) -> Vec<Nic> {
    let dir = root.join("sys/class/net");
    let names = match sysfs::list_dir(&dir, warnings) {
        Ok(Some(names)) => names,
        Ok(None) => {
            warnings.push(format!(
                "{}: not found; no network interfaces listed",
                dir.display()
            ));
            return Vec::new();
        }
        Err(e) => {
            warnings.push(e);
            return Vec::new();
        }
    };
    names
        .into_iter()
        // `bonding_masters` is a control file that lives in the same directory.
        .filter(|n| n != "bonding_masters")
        .filter_map(|name| read_nic(root, &dir.join(&name), name, warnings))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_unknown_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("speed");
        let mut w = Warnings::default();
        std::fs::write(&p, "-1\n").unwrap();
        assert_eq!(speed(&p, &mut w), None);
        std::fs::write(&p, "4294967295\n").unwrap();
        assert_eq!(speed(&p, &mut w), None);
        std::fs::write(&p, "400000\n").unwrap();
        assert_eq!(speed(&p, &mut w), Some(400_000));
        assert_eq!(speed(&dir.path().join("missing"), &mut w), None);
        assert!(w.into_vec().is_empty());

        let mut w = Warnings::default();
        std::fs::write(&p, "fast\n").unwrap();
        assert_eq!(speed(&p, &mut w), None);
        assert_eq!(w.into_vec().len(), 1);
    }

    #[test]
    fn admin_state_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("flags");
        let mut w = Warnings::default();
        std::fs::write(&p, "0x1003\n").unwrap();
        assert_eq!(admin_up(&p, &mut w), Some(true));
        std::fs::write(&p, "0x1002\n").unwrap();
        assert_eq!(admin_up(&p, &mut w), Some(false));
        assert_eq!(admin_up(&dir.path().join("missing"), &mut w), None);
        assert!(w.into_vec().is_empty());

        let mut w = Warnings::default();
        std::fs::write(&p, "0xup\n").unwrap();
        assert_eq!(admin_up(&p, &mut w), None);
        assert_eq!(w.into_vec().len(), 1);
    }

    #[test]
    fn link_types() {
        assert_eq!(link_type(1), "ether");
        assert_eq!(link_type(32), "infiniband");
        assert_eq!(link_type(778), "arphrd-778");
    }
}
