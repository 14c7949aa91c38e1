//! Node health: whether the node is eligible for work, judged from what discovery found.
//!
//! [`assess`] is a pure function of the rest of the inventory: it reads no file and calls no
//! library, so the verdicts are tested on constructed values and follow the hardware exactly.
//! Each problem found is one [`HealthReason`] with a stable CamelCase [`code`] and the part it
//! concerns (`gpu3`, `ens1f0`, `mlx5_0/1`, or a PCI address); messages never carry a live
//! reading (a temperature, a power draw), so the same hardware state always gives the same
//! document and an unchanged node is not written again.
//!
//! What is deliberately not a reason: a GPU without a driver, or bound to another driver such
//! as `vfio-pci` (passthrough is intentional); an administratively down interface (unused on
//! purpose); virtual interfaces and SR-IOV virtual functions (their link follows the physical
//! function's, which is judged itself).
//!
//! # XID errors are not assessed
//!
//! NVML reports XIDs (the driver's GPU error events: 48 double-bit ECC error, 79 fallen off the
//! bus, 94/95 contained and uncontained ECC errors...) only as events delivered to an event set
//! registered beforehand (`nvmlDeviceRegisterEvents`, then `nvmlEventSetWait`), never as a
//! counter that can be read later. Discovery opens one short NVML session per run and closes
//! it, so an XID raised between two runs is never delivered to anyone, and catching them would
//! take a long-lived listener holding its own NVML session, which discovery does not run. Their
//! lasting effects are still judged: uncorrected ECC errors, pages pending retirement, pending
//! or failed row remapping, and a GPU that has fallen off the bus (no longer in NVML's list).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::gpu::{Gpu, GpuHealth, GpuInventory, GpuSource};
use crate::net::Nic;
use crate::pci::PciDevice;
use crate::rdma::{RdmaDevice, RdmaPort};
use crate::sysfs::natural_cmp;

/// The reason codes [`assess`] gives, as constants so that readers of the document can match
/// on them without repeating the spelling.
pub mod code {
    /// Uncorrected ECC errors since the driver loaded (volatile counter above zero).
    pub const GPU_ECC_UNCORRECTABLE: &str = "GpuEccUncorrectable";
    /// Framebuffer pages wait for retirement, which takes a GPU reset.
    pub const GPU_RETIRED_PAGES_PENDING: &str = "GpuRetiredPagesPending";
    /// A row remapping waits for a GPU reset.
    pub const GPU_ROW_REMAP_PENDING: &str = "GpuRowRemapPending";
    /// A row remapping failed: the memory has no spare row left for a failing one.
    pub const GPU_ROW_REMAP_FAILED: &str = "GpuRowRemapFailed";
    /// At or above the slowdown temperature: the GPU throttles.
    pub const GPU_TEMPERATURE_HIGH: &str = "GpuTemperatureHigh";
    /// Drawing more than [`POWER_TOLERANCE_PERCENT`] % above the enforced limit.
    pub const GPU_POWER_OVER_LIMIT: &str = "GpuPowerOverLimit";
    /// A GPU bound to the `nvidia` driver on PCI is missing from NVML's device list.
    pub const GPU_NOT_VISIBLE_TO_NVML: &str = "GpuNotVisibleToNvml";
    /// A physical interface is administratively up but has no link.
    pub const NIC_LINK_DOWN: &str = "NicLinkDown";
    /// An RDMA port is not `ACTIVE`.
    pub const RDMA_PORT_DOWN: &str = "RdmaPortDown";
}

/// How far above its enforced power limit a GPU may read before it is a reason: a GPU under
/// load sits at its limit (capping is normal), and the reading itself is only accurate to a
/// few percent; well above the limit means capping is not holding.
pub const POWER_TOLERANCE_PERCENT: u64 = 5;

/// Whether the node is eligible for work, with the reasons it is not.
///
/// [`assess`] always gives `healthy == reasons.is_empty()`. The `Default` value (unhealthy,
/// no reason) stands for a node that was not assessed, never for a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealth {
    /// True exactly when there is no reason: the node can take work.
    pub healthy: bool,
    /// Every problem found, sorted by subject then code, so that equal hardware state gives
    /// an identical list.
    pub reasons: Vec<HealthReason>,
}

/// One reason a node is not healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReason {
    /// Stable machine-readable CamelCase code, one of [`code`].
    pub code: String,
    /// The part concerned: `gpu3`, a NIC name (`ens1f0`), an RDMA port (`mlx5_0/1`), or the PCI
    /// address of a GPU NVML does not list.
    pub subject: String,
    /// What is wrong, for people. Never holds a live reading, so it changes only when the
    /// state does.
    pub message: String,
}

impl HealthReason {
    fn new(code: &str, subject: impl Into<String>, message: String) -> Self {
        Self {
            code: code.to_owned(),
            subject: subject.into(),
            message,
        }
    }
}

impl NodeHealth {
    /// The health these reasons make: sorted by subject (in natural order, so `gpu2` comes
    /// before `gpu10`), then code, then message; healthy when there are none.
    pub fn from_reasons(mut reasons: Vec<HealthReason>) -> Self {
        reasons.sort_by(order);
        Self {
            healthy: reasons.is_empty(),
            reasons,
        }
    }
}

fn order(a: &HealthReason, b: &HealthReason) -> Ordering {
    natural_cmp(&a.subject, &b.subject)
        .then_with(|| a.subject.cmp(&b.subject))
        .then_with(|| a.code.cmp(&b.code))
        .then_with(|| a.message.cmp(&b.message))
}

/// Judges the node from its discovered parts. Pure: the same parts give the same health.
pub fn assess(
    nics: &[Nic],
    rdma: &[RdmaDevice],
    gpus: &GpuInventory,
    pci_devices: &[PciDevice],
) -> NodeHealth {
    let mut reasons = Vec::new();
    for gpu in &gpus.devices {
        gpu_reasons(gpu, &mut reasons);
    }
    if gpus.source == GpuSource::Nvml {
        invisible_gpus(gpus, pci_devices, &mut reasons);
    }
    reasons.extend(nics.iter().filter(|n| link_down(n)).map(nic_reason));
    for device in rdma {
        reasons.extend(device.ports.iter().filter_map(|p| port_reason(device, p)));
    }
    NodeHealth::from_reasons(reasons)
}

/// `GPU 3 (0000:61:00.0)`, the way messages name a GPU.
fn gpu_name(gpu: &Gpu) -> String {
    match &gpu.pci_bus_id {
        Some(id) => format!("GPU {} ({id})", gpu.index),
        None => format!("GPU {}", gpu.index),
    }
}

/// Milliwatts as whole watts, for messages.
fn watts(mw: u32) -> u32 {
    mw / 1000
}

fn gpu_reasons(gpu: &Gpu, out: &mut Vec<HealthReason>) {
    let Some(h) = &gpu.health else {
        return;
    };
    let subject = format!("gpu{}", gpu.index);
    let name = gpu_name(gpu);
    let mut add = |code: &str, message: String| out.push(HealthReason::new(code, subject.clone(), message));
    if let Some(n) = h.ecc_uncorrected_volatile.filter(|n| *n > 0) {
        add(
            code::GPU_ECC_UNCORRECTABLE,
            format!("{name} has had {n} uncorrected ECC error(s) since the driver loaded"),
        );
    }
    if h.retired_pages_pending == Some(true) {
        add(
            code::GPU_RETIRED_PAGES_PENDING,
            format!("{name} has memory pages pending retirement; they are retired at the next GPU reset"),
        );
    }
    if let Some(rows) = h.remapped_rows {
        if rows.pending {
            add(
                code::GPU_ROW_REMAP_PENDING,
                format!("{name} has a row remapping pending; it takes effect at the next GPU reset"),
            );
        }
        if rows.failed {
            add(
                code::GPU_ROW_REMAP_FAILED,
                format!(
                    "{name} failed to remap a memory row ({} uncorrectable row(s) remapped)",
                    rows.uncorrectable
                ),
            );
        }
    }
    if let Some(slowdown) = temperature_high(h) {
        add(
            code::GPU_TEMPERATURE_HIGH,
            format!("{name} is at or above its slowdown temperature of {slowdown} C and throttles"),
        );
    }
    if let Some(limit) = power_over_limit(h) {
        add(
            code::GPU_POWER_OVER_LIMIT,
            format!(
                "{name} draws more than {POWER_TOLERANCE_PERCENT} % above its enforced power limit of {} W: power capping is not holding",
                watts(limit)
            ),
        );
    }
}

/// The slowdown threshold, when the live temperature has reached it.
fn temperature_high(h: &GpuHealth) -> Option<u32> {
    let (temperature, slowdown) = (h.temperature_c?, h.temperature_slowdown_c?);
    (temperature >= slowdown).then_some(slowdown)
}

/// The enforced limit, when the live power draw is above it by more than the tolerance.
fn power_over_limit(h: &GpuHealth) -> Option<u32> {
    let (power, limit) = (h.power_mw?, h.power_limit_mw?);
    let over = u64::from(power) * 100 > u64::from(limit) * (100 + POWER_TOLERANCE_PERCENT);
    over.then_some(limit)
}

/// GPUs bound to the `nvidia` driver on PCI that NVML does not list (fallen off the bus, or
/// failed to initialise). GPUs without a driver or bound to another one (`vfio-pci`) are left
/// out: NVML cannot see them by design.
fn invisible_gpus(gpus: &GpuInventory, pci_devices: &[PciDevice], out: &mut Vec<HealthReason>) {
    let listed = |address: &str| {
        gpus.devices
            .iter()
            .any(|g| g.pci_bus_id.as_deref() == Some(address))
    };
    for device in pci_devices {
        if device.is_nvidia_gpu() && device.driver.as_deref() == Some("nvidia") && !listed(&device.address) {
            out.push(HealthReason::new(
                code::GPU_NOT_VISIBLE_TO_NVML,
                device.address.clone(),
                format!(
                    "GPU at {} (device {}) is bound to the nvidia driver but not in NVML's device list",
                    device.address, device.device_id
                ),
            ));
        }
    }
}

/// A physical interface (on PCI, not a virtual function) that is administratively up but whose
/// operational state is `down`. An interface that is administratively down is unused on
/// purpose; one whose admin state is unknown is not judged.
fn link_down(nic: &Nic) -> bool {
    nic.pci_address.is_some() && !nic.is_vf && nic.admin_up == Some(true) && nic.operstate == "down"
}

fn nic_reason(nic: &Nic) -> HealthReason {
    let at = nic
        .pci_address
        .as_deref()
        .map(|a| format!(" ({a})"))
        .unwrap_or_default();
    HealthReason::new(
        code::NIC_LINK_DOWN,
        nic.name.clone(),
        format!("{}{at} is administratively up but its link is down", nic.name),
    )
}

/// A port whose state is known and not `ACTIVE`. An unreadable state is a warning of its own,
/// not a verdict.
fn port_reason(device: &RdmaDevice, port: &RdmaPort) -> Option<HealthReason> {
    let state = port.state.as_deref()?;
    if port.is_active() {
        return None;
    }
    let phys = port.phys_state.as_deref().unwrap_or("unknown");
    Some(HealthReason::new(
        code::RDMA_PORT_DOWN,
        format!("{}/{}", device.name, port.port),
        format!(
            "{} port {} is {state} (physical state {phys})",
            device.name, port.port
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::RemappedRows;

    fn healthy_gpu(index: u32) -> Gpu {
        Gpu {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: None,
            memory_bytes: None,
            pci_bus_id: Some(format!("0000:{:02x}:00.0", 0x10 + index)),
            pci_device_id: Some("2330".into()),
            compute_capability: None,
            architecture: None,
            mig_mode: None,
            mig_devices: Vec::new(),
            nvlinks_active: None,
            numa_node: None,
            driver_loaded: true,
            driver: Some("nvidia".into()),
            device_path: None,
            health: Some(GpuHealth {
                ecc_enabled: Some(true),
                ecc_uncorrected_volatile: Some(0),
                ecc_uncorrected_aggregate: Some(0),
                retired_pages_pending: Some(false),
                remapped_rows: Some(RemappedRows::default()),
                temperature_slowdown_c: Some(87),
                temperature_shutdown_c: Some(92),
                power_limit_mw: Some(700_000),
                temperature_c: Some(35),
                power_mw: Some(120_000),
            }),
        }
    }

    fn nvml(devices: Vec<Gpu>) -> GpuInventory {
        GpuInventory {
            source: GpuSource::Nvml,
            nvml_error: None,
            driver_version: None,
            cuda_driver_version: None,
            devices,
        }
    }

    fn pci_gpu(address: &str, driver: Option<&str>) -> PciDevice {
        PciDevice {
            address: address.into(),
            vendor_id: "10de".into(),
            device_id: "2330".into(),
            class: "030200".into(),
            driver: driver.map(str::to_owned),
            numa_node: None,
        }
    }

    fn nic(name: &str, operstate: &str, admin_up: Option<bool>) -> Nic {
        Nic {
            name: name.into(),
            mac: None,
            mtu: None,
            operstate: operstate.into(),
            admin_up,
            link_type: Some("ether".into()),
            speed_mbps: None,
            driver: Some("ice".into()),
            pci_address: Some("0000:05:00.0".into()),
            numa_node: None,
            physical: true,
            is_vf: false,
            sriov: None,
            device_path: None,
        }
    }

    fn hca(name: &str, state: Option<&str>) -> RdmaDevice {
        RdmaDevice {
            name: name.into(),
            node_guid: None,
            firmware: None,
            node_type: None,
            hca_type: None,
            board_id: None,
            ports: vec![RdmaPort {
                port: 1,
                state: state.map(str::to_owned),
                phys_state: Some("Disabled".into()),
                rate: None,
                rate_gbps: None,
                link_layer: None,
                netdev: None,
            }],
            netdevs: Vec::new(),
            pci_address: None,
            numa_node: None,
            device_path: None,
        }
    }

    /// The codes and subjects of one GPU's health on an otherwise empty node.
    fn gpu_verdicts(change: impl FnOnce(&mut GpuHealth)) -> Vec<(String, String)> {
        let mut gpu = healthy_gpu(3);
        if let Some(h) = gpu.health.as_mut() {
            change(h);
        }
        let health = assess(&[], &[], &nvml(vec![gpu]), &[]);
        assert_eq!(health.healthy, health.reasons.is_empty());
        health.reasons.into_iter().map(|r| (r.code, r.subject)).collect()
    }

    fn one(code: &str, subject: &str) -> Vec<(String, String)> {
        vec![(code.to_owned(), subject.to_owned())]
    }

    #[test]
    fn healthy_gpus_give_a_healthy_node() {
        let health = assess(&[], &[], &nvml(vec![healthy_gpu(0), healthy_gpu(1)]), &[]);
        assert_eq!(
            health,
            NodeHealth {
                healthy: true,
                reasons: Vec::new()
            }
        );
        // A GPU without health (the PCI scan) is not judged.
        let mut bare = healthy_gpu(0);
        bare.health = None;
        assert!(assess(&[], &[], &nvml(vec![bare]), &[]).healthy);
    }

    #[test]
    fn ecc_and_memory_repair_verdicts() {
        assert_eq!(
            gpu_verdicts(|h| h.ecc_uncorrected_volatile = Some(2)),
            one(code::GPU_ECC_UNCORRECTABLE, "gpu3")
        );
        // The lifetime counter alone is history, not a verdict.
        assert_eq!(gpu_verdicts(|h| h.ecc_uncorrected_aggregate = Some(9)), []);
        assert_eq!(
            gpu_verdicts(|h| h.retired_pages_pending = Some(true)),
            one(code::GPU_RETIRED_PAGES_PENDING, "gpu3")
        );
        let rows = |pending, failed| RemappedRows {
            correctable: 0,
            uncorrectable: 1,
            pending,
            failed,
        };
        assert_eq!(
            gpu_verdicts(|h| h.remapped_rows = Some(rows(true, false))),
            one(code::GPU_ROW_REMAP_PENDING, "gpu3")
        );
        assert_eq!(
            gpu_verdicts(|h| h.remapped_rows = Some(rows(false, true))),
            one(code::GPU_ROW_REMAP_FAILED, "gpu3")
        );
        assert_eq!(gpu_verdicts(|h| h.remapped_rows = Some(rows(false, false))), []);
    }

    #[test]
    fn temperature_reaches_slowdown() {
        assert_eq!(gpu_verdicts(|h| h.temperature_c = Some(86)), []);
        assert_eq!(
            gpu_verdicts(|h| h.temperature_c = Some(87)),
            one(code::GPU_TEMPERATURE_HIGH, "gpu3")
        );
        // Unknown threshold or reading: nothing to judge.
        assert_eq!(
            gpu_verdicts(|h| {
                h.temperature_c = Some(99);
                h.temperature_slowdown_c = None;
            }),
            []
        );
    }

    #[test]
    fn power_at_the_limit_is_capping_above_it_is_a_fault() {
        assert_eq!(gpu_verdicts(|h| h.power_mw = Some(700_000)), []);
        assert_eq!(
            gpu_verdicts(|h| h.power_mw = Some(735_000)),
            [],
            "exactly 5 % over"
        );
        assert_eq!(
            gpu_verdicts(|h| h.power_mw = Some(735_001)),
            one(code::GPU_POWER_OVER_LIMIT, "gpu3")
        );
        assert_eq!(
            gpu_verdicts(|h| {
                h.power_mw = Some(u32::MAX);
                h.power_limit_mw = Some(u32::MAX);
            }),
            [],
            "no overflow"
        );
    }

    #[test]
    fn messages_hold_no_live_reading() {
        let hot = |t: u32, p: u32| {
            let mut gpu = healthy_gpu(0);
            if let Some(h) = gpu.health.as_mut() {
                h.temperature_c = Some(t);
                h.power_mw = Some(p);
            }
            assess(&[], &[], &nvml(vec![gpu]), &[])
        };
        let a = hot(90, 800_000);
        assert_eq!(a.reasons.len(), 2);
        assert_eq!(a, hot(91, 810_000));
    }

    #[test]
    fn gpu_on_pci_but_not_in_nvml() {
        let pci = [
            pci_gpu("0000:10:00.0", Some("nvidia")),
            pci_gpu("0000:11:00.0", Some("nvidia")),
            pci_gpu("0000:12:00.0", Some("vfio-pci")),
            pci_gpu("0000:13:00.0", None),
        ];
        let health = assess(&[], &[], &nvml(vec![healthy_gpu(0)]), &pci);
        let found: Vec<(&str, &str)> = health
            .reasons
            .iter()
            .map(|r| (r.code.as_str(), r.subject.as_str()))
            .collect();
        assert_eq!(found, [(code::GPU_NOT_VISIBLE_TO_NVML, "0000:11:00.0")]);
        // Without NVML there is no list to be missing from.
        let mut scan = nvml(Vec::new());
        scan.source = GpuSource::PciScan;
        assert!(assess(&[], &[], &scan, &pci).healthy);
    }

    #[test]
    fn nic_link_down_only_when_meant_to_be_up() {
        let verdict = |n: Nic| assess(&[n], &[], &nvml(Vec::new()), &[]).reasons;
        let down = verdict(nic("ens1f0", "down", Some(true)));
        assert_eq!(down.len(), 1);
        assert_eq!(
            (down[0].code.as_str(), down[0].subject.as_str()),
            (code::NIC_LINK_DOWN, "ens1f0")
        );
        assert!(
            verdict(nic("ens1f0", "down", Some(false))).is_empty(),
            "admin down"
        );
        assert!(
            verdict(nic("ens1f0", "down", None)).is_empty(),
            "admin state unknown"
        );
        assert!(verdict(nic("ens1f0", "up", Some(true))).is_empty());
        let mut vf = nic("ens1f0v0", "down", Some(true));
        vf.is_vf = true;
        assert!(verdict(vf).is_empty(), "a VF");
        let mut software = nic("docker0", "down", Some(true));
        software.pci_address = None;
        software.physical = false;
        assert!(verdict(software).is_empty(), "not on PCI");
    }

    #[test]
    fn rdma_port_not_active() {
        let health = assess(
            &[],
            &[
                hca("mlx5_0", Some("ACTIVE")),
                hca("mlx5_1", Some("DOWN")),
                hca("mlx5_2", None),
            ],
            &nvml(Vec::new()),
            &[],
        );
        assert!(!health.healthy);
        assert_eq!(health.reasons.len(), 1);
        let r = &health.reasons[0];
        assert_eq!(
            (r.code.as_str(), r.subject.as_str()),
            (code::RDMA_PORT_DOWN, "mlx5_1/1")
        );
        assert!(
            r.message.contains("DOWN") && r.message.contains("Disabled"),
            "{}",
            r.message
        );
    }

    #[test]
    fn reasons_are_sorted_by_subject_then_code() {
        let mut gpu10 = healthy_gpu(10);
        let mut gpu2 = healthy_gpu(2);
        for g in [&mut gpu10, &mut gpu2] {
            if let Some(h) = g.health.as_mut() {
                h.temperature_c = Some(95);
                h.ecc_uncorrected_volatile = Some(1);
            }
        }
        let a = assess(&[], &[], &nvml(vec![gpu10.clone(), gpu2.clone()]), &[]);
        let b = assess(&[], &[], &nvml(vec![gpu2, gpu10]), &[]);
        assert_eq!(a, b);
        let order: Vec<(&str, &str)> = a
            .reasons
            .iter()
            .map(|r| (r.subject.as_str(), r.code.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("gpu2", code::GPU_ECC_UNCORRECTABLE),
                ("gpu2", code::GPU_TEMPERATURE_HIGH),
                ("gpu10", code::GPU_ECC_UNCORRECTABLE),
                ("gpu10", code::GPU_TEMPERATURE_HIGH),
            ]
        );
    }

    #[test]
    fn serialized_names() {
        let health =
            NodeHealth::from_reasons(vec![HealthReason::new(code::NIC_LINK_DOWN, "ens1f0", "m".into())]);
        assert_eq!(
            serde_json::to_value(&health).unwrap(),
            serde_json::json!({
                "healthy": false,
                "reasons": [{"code": "NicLinkDown", "subject": "ens1f0", "message": "m"}]
            })
        );
    }
}
