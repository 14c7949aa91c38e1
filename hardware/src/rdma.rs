//! RDMA devices (InfiniBand and RoCE HCAs) from `/sys/class/infiniband`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pci;
use crate::sysfs::{self, Root, Warnings};

/// One RDMA device (an HCA, or one port group of it, e.g. `mlx5_0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RdmaDevice {
    /// Kernel device name (`mlx5_0`).
    pub name: String,
    /// Node GUID (`b83f:d203:00a1:b2c4`), the HCA's fabric identity.
    pub node_guid: Option<String>,
    /// Firmware version (`fw_ver`), which fabric managers and NCCL tuning
    /// guides pin; worth seeing at a glance.
    pub firmware: Option<String>,
    /// Node type without its numeric prefix (`CA`, `switch`, `router`).
    pub node_type: Option<String>,
    /// Chip identifier (`MT4129` is ConnectX-7), when the driver exports it.
    pub hca_type: Option<String>,
    /// Board part number (`MT_0000000838`), when the driver exports it.
    pub board_id: Option<String>,
    /// Ports, by port number.
    pub ports: Vec<RdmaPort>,
    /// Network interfaces on the same PCI function (IPoIB or the RoCE
    /// Ethernet netdev).
    pub netdevs: Vec<String>,
    /// PCI function of the HCA.
    pub pci_address: Option<String>,
    /// NUMA node of the HCA, when the platform reports one.
    pub numa_node: Option<u32>,
    /// Sysfs path of the HCA's PCI function as the host sees it.
    pub device_path: Option<String>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RdmaPort {
    /// Port number (1-based, as in `ports/1`).
    pub port: u32,
    /// Logical state without its numeric prefix (`ACTIVE`, `DOWN`, `INIT`).
    pub state: Option<String>,
    /// Physical state without its numeric prefix (`LinkUp`, `Polling`,
    /// `Disabled`).
    pub phys_state: Option<String>,
    /// Rate as the kernel prints it (`400 Gb/sec (4X NDR)`).
    pub rate: Option<String>,
    /// The rate's number in Gb/s; fractional for old links (2.5 for SDR).
    pub rate_gbps: Option<f64>,
    /// `InfiniBand` or `Ethernet` (RoCE).
    pub link_layer: Option<String>,
    /// The netdev carrying this port's traffic: from the GID table for RoCE,
    /// or the device's only netdev when there is exactly one.
    pub netdev: Option<String>,
}

impl RdmaPort {
    /// A port that can carry traffic now.
    pub fn is_active(&self) -> bool {
        self.state.as_deref() == Some("ACTIVE")
    }
}

/// `4: ACTIVE` → `ACTIVE`: the kernel prefixes the enum value.
fn strip_code(value: String) -> String {
    match value.split_once(": ") {
        Some((code, name)) if code.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => value,
    }
}

/// `400 Gb/sec (4X NDR)` → 400.0.
fn parse_rate(rate: &str) -> Option<f64> {
    let number = rate.split_ascii_whitespace().next()?;
    number.parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 0.0)
}

fn read_port(dir: &Path, port: u32, single_netdev: Option<&str>, warnings: &mut Warnings) -> RdmaPort {
    let rate = warnings.attr(&dir.join("rate"));
    // For RoCE, GID index 0's netdev is the port's Ethernet interface. On
    // InfiniBand ports the kernel answers EINVAL or the entry is absent.
    let gid_netdev = match sysfs::read_attr(&dir.join("gid_attrs/ndevs/0")) {
        Ok(v) => v.filter(|v| !v.is_empty()),
        Err(e) if e.is_invalid_argument() || e.is_unsupported() => None,
        Err(e) => {
            warnings.push(e);
            None
        }
    };
    RdmaPort {
        port,
        state: warnings.attr(&dir.join("state")).map(strip_code),
        phys_state: warnings.attr(&dir.join("phys_state")).map(strip_code),
        rate_gbps: rate.as_deref().and_then(parse_rate),
        rate,
        link_layer: warnings.attr(&dir.join("link_layer")),
        netdev: gid_netdev.or_else(|| single_netdev.map(str::to_owned)),
    }
}

fn read_device(root: &Root, class_entry: &Path, name: String, warnings: &mut Warnings) -> RdmaDevice {
    // Attributes are still readable through the class link when resolving
    // fails; only the device placement is lost then.
    let dir = root.resolve(class_entry).unwrap_or_else(|e| {
        warnings.push(e);
        class_entry.to_path_buf()
    });
    let placement = pci::Placement::of(root, &dir, warnings);
    let device = placement.device.as_deref();
    let netdevs = device.map(|d| warnings.list(&d.join("net"))).unwrap_or_default();
    let numa_node = device.and_then(|d| pci::numa_node_of(d, warnings));

    let ports_dir = dir.join("ports");
    let port_names = warnings.list(&ports_dir);
    let single_netdev = match (netdevs.as_slice(), port_names.len()) {
        ([only], 1) => Some(only.as_str()),
        _ => None,
    };
    let mut ports = Vec::with_capacity(port_names.len());
    for port_name in &port_names {
        match sysfs::parse_value::<u32>(&ports_dir.join(port_name), port_name, "a port number") {
            Ok(port) => ports.push(read_port(
                &ports_dir.join(port_name),
                port,
                single_netdev,
                warnings,
            )),
            Err(e) => warnings.push(e),
        }
    }

    RdmaDevice {
        node_guid: warnings.attr(&dir.join("node_guid")),
        firmware: warnings.attr(&dir.join("fw_ver")),
        node_type: warnings.attr(&dir.join("node_type")).map(strip_code),
        hca_type: warnings.attr(&dir.join("hca_type")).filter(|s| !s.is_empty()),
        board_id: warnings.attr(&dir.join("board_id")).filter(|s| !s.is_empty()),
        ports,
        netdevs,
        pci_address: placement.pci_address,
        numa_node,
        device_path: placement.device_path,
        name,
    }
}

pub(crate) fn discover(root: &Root, warnings: &mut Warnings) -> Vec<RdmaDevice> {
    let dir = root.join("sys/class/infiniband");
    // No directory simply means no RDMA stack is loaded: not a problem.
    warnings
        .list(&dir)
        .into_iter()
        .map(|name| read_device(root, &dir.join(&name), name, warnings))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_rates() {
        assert_eq!(strip_code("4: ACTIVE".into()), "ACTIVE");
        assert_eq!(strip_code("5: LinkUp".into()), "LinkUp");
        assert_eq!(strip_code("weird: thing".into()), "weird: thing");
        assert_eq!(parse_rate("400 Gb/sec (4X NDR)"), Some(400.0));
        assert_eq!(parse_rate("2.5 Gb/sec (1X SDR)"), Some(2.5));
        assert_eq!(parse_rate("NaN Gb/sec"), None);
        assert_eq!(parse_rate(""), None);
    }
}
