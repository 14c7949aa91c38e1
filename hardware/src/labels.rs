//! Kubernetes node labels derived from an inventory.
//!
//! Names follow the existing conventions so that workloads written for them
//! keep working: GPU Feature Discovery (`nvidia.com/...`) for what NVML
//! reports, Node Feature Discovery (`feature.node.kubernetes.io/...`) for
//! CPU, PCI, SR-IOV and RDMA, and `spokelet.io/...` for what neither has.

use std::collections::{BTreeMap, BTreeSet};

use crate::gpu::GpuSource;
use crate::inventory::Inventory;
use crate::topology::{PeerKind, Relation};

const NVIDIA: &str = "nvidia.com/";
const NFD: &str = "feature.node.kubernetes.io/";
const OURS: &str = "spokelet.io/";

/// Longest label value (and name segment) Kubernetes accepts.
const MAX_LABEL_LEN: usize = 63;

/// Makes `raw` a valid label value: at most 63 characters from
/// `[A-Za-z0-9_.-]`, starting and ending alphanumeric (or empty). Other
/// characters become `-`, which is how GPU Feature Discovery turns
/// `NVIDIA H100 80GB HBM3` into `NVIDIA-H100-80GB-HBM3`.
pub fn sanitize_value(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL_LEN)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// A label key with a sanitised name part (for names built from data, such
/// as a PCI vendor id or a MIG profile).
fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}{}", sanitize_value(name))
}

struct Labels(BTreeMap<String, String>);

impl Labels {
    fn set(&mut self, key: String, value: impl ToString) {
        let value = sanitize_value(&value.to_string());
        self.0.insert(key, value);
    }

    fn flag(&mut self, key: String) {
        self.0.insert(key, "true".to_owned());
    }
}

/// Formats a rate without a trailing `.0` (400, but 2.5).
fn rate(gbps: f64) -> String {
    if gbps.fract() == 0.0 {
        format!("{gbps:.0}")
    } else {
        gbps.to_string()
    }
}

/// The NFD short vendor name (`Intel`, `AMD`) for a `vendor_id`.
fn cpu_vendor(vendor: &str) -> &str {
    match vendor {
        "GenuineIntel" => "Intel",
        "AuthenticAMD" => "AMD",
        other => other,
    }
}

fn gpu_labels(inv: &Inventory, l: &mut Labels) {
    let gpus = &inv.gpus;
    let Some(first) = gpus.devices.first() else {
        return;
    };
    l.set(format!("{OURS}gpu.source"), gpus.source);
    l.set(format!("{OURS}gpu.count"), gpus.devices.len());
    l.set(
        format!("{OURS}gpu.driver-loaded"),
        gpus.devices.iter().all(|g| g.driver_loaded),
    );
    let nvlinks: Option<Vec<u32>> = gpus.devices.iter().map(|g| g.nvlinks_active).collect();
    if let Some(min) = nvlinks.and_then(|n| n.into_iter().min()) {
        // The weakest GPU bounds what a multi-GPU job can rely on.
        l.set(format!("{OURS}gpu.nvlinks-active"), min);
    }

    if gpus.source != GpuSource::Nvml {
        // GPU Feature Discovery only labels what NVML confirms. Publishing
        // its labels for a GPU without a working driver would attract
        // workloads that cannot run, so the PCI scan gets our own names.
        l.set(format!("{OURS}gpu.product"), &first.name);
        return;
    }
    l.set(format!("{NVIDIA}gpu.count"), gpus.devices.len());
    l.set(format!("{NVIDIA}gpu.product"), &first.name);
    if let Some(bytes) = first.memory_bytes {
        l.set(format!("{NVIDIA}gpu.memory"), bytes / (1024 * 1024));
    }
    if let Some(family) = &first.architecture {
        l.set(format!("{NVIDIA}gpu.family"), family);
    }
    if let Some(cc) = first.compute_capability {
        l.set(format!("{NVIDIA}gpu.compute.major"), cc.major);
        l.set(format!("{NVIDIA}gpu.compute.minor"), cc.minor);
    }
    if let Some(v) = &gpus.driver_version {
        l.set(format!("{NVIDIA}cuda.driver-version.full"), v);
        for (part, value) in ["major", "minor", "revision"].iter().zip(v.split('.')) {
            l.set(format!("{NVIDIA}cuda.driver-version.{part}"), value);
        }
    }
    if let Some(v) = &gpus.cuda_driver_version {
        l.set(format!("{NVIDIA}cuda.runtime-version.full"), v);
        for (part, value) in ["major", "minor"].iter().zip(v.split('.')) {
            l.set(format!("{NVIDIA}cuda.runtime-version.{part}"), value);
        }
    }
    l.set(
        format!("{NVIDIA}mig.capable"),
        gpus.devices.iter().any(|g| g.mig_mode.is_some()),
    );
    let mut profiles: BTreeMap<&str, usize> = BTreeMap::new();
    for mig in gpus.devices.iter().flat_map(|g| &g.mig_devices) {
        if let Some(p) = &mig.profile {
            *profiles.entry(p).or_default() += 1;
        }
    }
    for (profile, count) in profiles {
        l.set(key(OURS, &format!("mig-{profile}.count")), count);
    }
}

fn rdma_labels(inv: &Inventory, l: &mut Labels) {
    if inv.rdma.is_empty() {
        return;
    }
    l.flag(format!("{NFD}custom-rdma.capable"));
    l.set(format!("{OURS}rdma.devices"), inv.rdma.len());
    let ports = || inv.rdma.iter().flat_map(|d| &d.ports);
    l.set(
        format!("{OURS}rdma.ports-active"),
        ports().filter(|p| p.is_active()).count(),
    );
    let max_rate = ports()
        .filter(|p| p.is_active())
        .filter_map(|p| p.rate_gbps)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    if let Some(r) = max_rate {
        l.set(format!("{OURS}rdma.max-rate-gbps"), rate(r));
    }
    let layers: BTreeSet<&str> = ports().filter_map(|p| p.link_layer.as_deref()).collect();
    match layers.len() {
        0 => {}
        1 => l.set(
            format!("{OURS}rdma.link-layer"),
            layers.iter().next().copied().unwrap_or_default(),
        ),
        _ => l.set(format!("{OURS}rdma.link-layer"), "mixed"),
    }
}

fn topology_labels(inv: &Inventory, l: &mut Labels) {
    if inv.topology.is_empty() || inv.rdma.is_empty() {
        return;
    }
    // Every GPU's nearest HCA, then the worst of those: the placement a job
    // using all GPUs can count on for GPUDirect RDMA.
    let worst = inv
        .topology
        .iter()
        .map(|t| {
            t.peers
                .iter()
                .filter(|p| p.kind == PeerKind::Rdma)
                .map(|p| p.relation)
                .min()
                .unwrap_or(Relation::None)
        })
        .max()
        .unwrap_or(Relation::None);
    l.set(format!("{OURS}topology.gpu-rdma"), worst);
}

/// The node labels this inventory implies, sorted by key. All values are
/// valid Kubernetes label values.
pub fn labels(inv: &Inventory) -> BTreeMap<String, String> {
    let mut l = Labels(BTreeMap::new());

    // CPU
    for flag in &inv.cpu.flags {
        if let Some((_, nfd)) = crate::cpu::AI_FLAGS.iter().find(|(f, _)| f == flag) {
            l.flag(format!("{NFD}cpu-cpuid.{nfd}"));
        }
    }
    if let Some(vendor) = &inv.cpu.vendor {
        l.set(format!("{NFD}cpu-model.vendor_id"), cpu_vendor(vendor));
    }
    l.set(format!("{OURS}cpu.sockets"), inv.cpu.sockets);
    l.set(format!("{OURS}numa.nodes"), inv.cpu.numa_nodes);
    if inv.cpu.numa_nodes > 1 {
        l.flag(format!("{NFD}memory-numa"));
    }

    // Kernel
    if !inv.kernel.is_empty() {
        l.set(format!("{NFD}kernel-version.full"), &inv.kernel);
        let numeric = inv.kernel.split(['-', '+']).next().unwrap_or_default();
        for (part, value) in ["major", "minor", "revision"].iter().zip(numeric.split('.')) {
            l.set(format!("{NFD}kernel-version.{part}"), value);
        }
    }

    // PCI presence, by vendor, the way NFD does with `deviceLabelFields:
    // [vendor]` (the GPU and Network operators key off these).
    let vendors: BTreeSet<&str> = inv.pci_devices.iter().map(|d| d.vendor_id.as_str()).collect();
    for vendor in vendors {
        l.flag(key(NFD, &format!("pci-{vendor}.present")));
    }

    // Network
    let physical = || inv.nics.iter().filter(|n| n.physical);
    if physical().any(|n| n.sriov.is_some()) {
        l.flag(format!("{NFD}network-sriov.capable"));
    }
    if physical().any(|n| n.sriov.is_some_and(|s| s.num_vfs > 0)) {
        l.flag(format!("{NFD}network-sriov.configured"));
    }

    rdma_labels(inv, &mut l);
    gpu_labels(inv, &mut l);
    topology_labels(inv, &mut l);
    // Whether the node can take work; the reasons are in the NodeInventory.
    l.set(format!("{OURS}node.healthy"), inv.health.healthy);
    l.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(v: &str) -> bool {
        v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && (v.is_empty()
                || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && v.ends_with(|c: char| c.is_ascii_alphanumeric())))
    }

    #[test]
    fn sanitizing() {
        assert_eq!(sanitize_value("NVIDIA H100 80GB HBM3"), "NVIDIA-H100-80GB-HBM3");
        assert_eq!(sanitize_value("Intel(R) Xeon(R) 8480+"), "Intel-R--Xeon-R--8480");
        assert_eq!(sanitize_value("  --x--  "), "x");
        assert_eq!(sanitize_value("ünï"), "n");
        assert_eq!(sanitize_value("!!!"), "");
        let long = "a".repeat(62) + "-b";
        assert_eq!(sanitize_value(&long), "a".repeat(62));
        for raw in [
            "6.18.44-fc-v657",
            "é".repeat(100).as_str(),
            "a b c",
            "-",
            ".a.",
            "550.54.15",
        ] {
            assert!(valid(&sanitize_value(raw)), "{raw:?}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(rate(400.0), "400");
        assert_eq!(rate(2.5), "2.5");
    }
}
