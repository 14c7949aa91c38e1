//! The NVML path, exercised through the real nvml-wrapper code against a compiled NVML test double.

mod common;

use common::{discover_with_shim, shim};
use spokelet_hardware::testing::ShimVariant;
use spokelet_hardware::{GpuSource, MigMode, Relation, labels, render_table};

const MIB: u64 = 1024 * 1024;
const BUSES: [&str; 8] = [
    "0000:1b:00.0",
    "0000:43:00.0",
    "0000:52:00.0",
    "0000:61:00.0",
    "0000:9d:00.0",
    "0000:c3:00.0",
    "0000:d1:00.0",
    "0000:df:00.0",
];

#[test]
fn eight_h100s() {
    let lib = shim(ShimVariant::H100);
    let inv = discover_with_shim("hgx-h100", &lib);
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    let gpus = &inv.gpus;
    assert_eq!(gpus.source, GpuSource::Nvml);
    assert_eq!(gpus.nvml_error, None);
    assert_eq!(gpus.driver_version.as_deref(), Some("550.54.15"));
    assert_eq!(gpus.cuda_driver_version.as_deref(), Some("12.4"));
    assert_eq!(gpus.devices.len(), 8);
    for (i, g) in gpus.devices.iter().enumerate() {
        assert_eq!(g.index as usize, i);
        assert_eq!(g.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(
            g.uuid.as_deref(),
            Some(format!("GPU-9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f40{i:02}").as_str())
        );
        assert_eq!(g.memory_bytes, Some(81_559 * MIB));
        assert_eq!(
            g.pci_bus_id.as_deref(),
            Some(BUSES[i]),
            "normalised from 00000000:XX:00.0"
        );
        assert_eq!(g.pci_device_id.as_deref(), Some("2330"));
        assert_eq!(g.compute_capability.map(|c| (c.major, c.minor)), Some((9, 0)));
        assert_eq!(g.architecture.as_deref(), Some("hopper"));
        assert_eq!(
            g.mig_mode,
            Some(MigMode {
                current: false,
                pending: false
            })
        );
        assert!(g.mig_devices.is_empty());
        assert_eq!(g.nvlinks_active, Some(18));
        assert!(g.driver_loaded);
        assert_eq!(g.driver.as_deref(), Some("nvidia"));
        // NUMA node and PCIe position come from the fixture's sysfs.
        assert_eq!(g.numa_node, Some(u32::from(i >= 4)));
        assert!(g.device_path.as_deref().unwrap().ends_with(BUSES[i]));
    }
    for (i, t) in inv.topology.iter().enumerate() {
        assert_eq!(t.peers[0].name, format!("mlx5_{i}"));
        assert_eq!(t.peers[0].relation, Relation::PcieSwitch);
    }

    let l = labels(&inv);
    for (k, v) in [
        ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
        ("nvidia.com/gpu.count", "8"),
        ("nvidia.com/gpu.memory", "81559"),
        ("nvidia.com/gpu.family", "hopper"),
        ("nvidia.com/gpu.compute.major", "9"),
        ("nvidia.com/gpu.compute.minor", "0"),
        ("nvidia.com/cuda.driver-version.full", "550.54.15"),
        ("nvidia.com/cuda.driver-version.major", "550"),
        ("nvidia.com/cuda.runtime-version.full", "12.4"),
        ("nvidia.com/mig.capable", "true"),
        ("spokelet.io/gpu.source", "nvml"),
        ("spokelet.io/gpu.nvlinks-active", "18"),
        ("spokelet.io/topology.gpu-rdma", "pcie-switch"),
    ] {
        assert_eq!(l.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!l.keys().any(|k| k.contains("mig-")));
}

#[test]
fn mig_devices_and_profiles() {
    let lib = shim(ShimVariant::H100Mig);
    let inv = discover_with_shim("hgx-h100", &lib);
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    let gpu0 = &inv.gpus.devices[0];
    assert_eq!(
        gpu0.mig_mode,
        Some(MigMode {
            current: true,
            pending: true
        })
    );
    let profiles: Vec<&str> = gpu0
        .mig_devices
        .iter()
        .filter_map(|m| m.profile.as_deref())
        .collect();
    assert_eq!(profiles, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]);
    let m = &gpu0.mig_devices[2];
    assert_eq!(m.index, 2);
    assert_eq!(
        m.uuid.as_deref(),
        Some("MIG-2b7a1c4d-5e6f-5a0b-9c8d-7e6f5a4b3c02")
    );
    assert_eq!(m.memory_bytes, Some(9984 * MIB));
    assert_eq!(m.multiprocessors, Some(16));

    let gpu1 = &inv.gpus.devices[1];
    assert_eq!(
        gpu1.mig_mode,
        Some(MigMode {
            current: false,
            pending: true
        })
    );
    assert!(gpu1.mig_devices.is_empty());

    let l = labels(&inv);
    assert_eq!(
        l.get("spokelet.io/mig-1g.10gb.count").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        l.get("spokelet.io/mig-3g.40gb.count").map(String::as_str),
        Some("1")
    );
    let table = render_table(&inv);
    assert!(table.contains("3g.40gb"), "{table}");
    assert!(table.contains("pending"), "{table}");
}

#[test]
fn init_failure_falls_back_to_pci_scan_with_reason() {
    let lib = shim(ShimVariant::InitFailure);
    let inv = discover_with_shim("hgx-h100", &lib);
    let gpus = &inv.gpus;
    assert_eq!(gpus.source, GpuSource::PciScan);
    assert_eq!(
        gpus.nvml_error.as_deref(),
        Some("NVML initialization failed: NVIDIA driver is not loaded")
    );
    assert_eq!(gpus.devices.len(), 8, "still counted from PCI");
    assert!(gpus.devices.iter().all(|g| g.uuid.is_none() && g.driver_loaded));
    assert_eq!(
        inv.warnings,
        [
            "8 NVIDIA GPU(s) found on PCI but NVML is unavailable (NVML initialization failed: NVIDIA driver is not loaded); reporting PCI scan only"
        ]
    );
    let json = serde_json::to_value(&inv).unwrap();
    assert_eq!(json["gpus"]["source"], "pci-scan");
    assert_eq!(
        json["gpus"]["nvmlError"],
        "NVML initialization failed: NVIDIA driver is not loaded"
    );
    let table = render_table(&inv);
    assert!(
        table.contains("NVML: NVML initialization failed: NVIDIA driver is not loaded"),
        "{table}"
    );
}

#[test]
fn nvml_gpus_missing_from_sysfs_have_no_placement() {
    // NVML answers for GPUs the (VM-shaped) tree does not have: discovery
    // keeps NVML's view and leaves the sysfs-derived fields empty.
    let lib = shim(ShimVariant::H100);
    let inv = discover_with_shim("plain-vm", &lib);
    assert_eq!(inv.gpus.source, GpuSource::Nvml);
    assert_eq!(inv.gpus.devices.len(), 8);
    assert!(
        inv.gpus
            .devices
            .iter()
            .all(|g| g.numa_node.is_none() && g.device_path.is_none())
    );
    assert!(inv.topology.iter().all(|t| t.peers.is_empty()));
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
}

#[test]
fn repeated_sessions_on_one_library() {
    // Init and shutdown must pair up: a second discovery with the same
    // library (same dlopen handle) sees a clean library again.
    let lib = shim(ShimVariant::H100Mig);
    let first = discover_with_shim("hgx-h100", &lib);
    let second = discover_with_shim("hgx-h100", &lib);
    assert_eq!(first, second);
}
