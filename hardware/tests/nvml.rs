//! The NVML path, exercised through the real nvml-wrapper code against a compiled NVML test double.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Shim, discover_root_with_shim, discover_with_shim, expect, healthy_hgx, shim, verdicts};
use spokelet_hardware::health::code;
use spokelet_hardware::testing::{ShimState, ShimVariant, write_shim_state};
use spokelet_hardware::{
    GpuHealth, GpuSource, Inventory, MigMode, NodeHealth, Relation, RemappedRows, labels, render_table,
};

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

/// What the shim reports for a healthy H100.
const HEALTHY_H100: GpuHealth = GpuHealth {
    ecc_enabled: Some(true),
    ecc_uncorrected_volatile: Some(0),
    ecc_uncorrected_aggregate: Some(0),
    retired_pages_pending: Some(false),
    remapped_rows: Some(RemappedRows {
        correctable: 0,
        uncorrectable: 0,
        pending: false,
        failed: false,
    }),
    temperature_slowdown_c: Some(87),
    temperature_shutdown_c: Some(92),
    power_limit_mw: Some(700_000),
    temperature_c: Some(35),
    power_mw: Some(120_000),
};

/// Sets the shim's runtime state, then discovers the healthy HGX tree through it.
fn discover_in_state(lib: &Shim, root: &std::path::Path, state: &ShimState) -> Inventory {
    write_shim_state(&lib.path, state).unwrap();
    let inv = discover_root_with_shim(root, lib);
    assert!(
        inv.warnings.iter().all(|w| !w.contains("cannot read")),
        "{:#?}",
        inv.warnings
    );
    inv
}

#[test]
fn healthy_shim_gives_a_healthy_node() {
    let lib = shim(ShimVariant::H100);
    let tree = healthy_hgx();
    let inv = discover_root_with_shim(&tree.root, &lib);
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    assert_eq!(
        inv.health,
        NodeHealth {
            healthy: true,
            reasons: Vec::new()
        }
    );
    assert_eq!(inv.gpus.devices.len(), 8);
    for g in &inv.gpus.devices {
        assert_eq!(g.health, Some(HEALTHY_H100), "GPU {}", g.index);
    }
    assert_eq!(
        labels(&inv).get("spokelet.io/node.healthy").map(String::as_str),
        Some("true")
    );
    let table = render_table(&inv);
    assert!(table.contains("Healthy  yes"), "{table}");
    for cell in ["35 C", "87 C", "92 C", "120.0 W", "700.0 W", "0 corr, 0 unc"] {
        assert!(table.contains(cell), "missing {cell}:\n{table}");
    }
}

#[test]
fn ecc_error_on_one_gpu_and_back() {
    let lib = shim(ShimVariant::H100);
    let tree = healthy_hgx();
    let broken = ShimState {
        ecc_uncorrected: BTreeMap::from([(3, 2)]),
        ..ShimState::default()
    };
    let inv = discover_in_state(&lib, &tree.root, &broken);
    assert_eq!(verdicts(&inv), expect(&[(code::GPU_ECC_UNCORRECTABLE, "gpu3")]));
    assert!(!inv.health.healthy);
    let gpu3 = inv.gpus.devices[3].health.as_ref().unwrap();
    assert_eq!(
        (gpu3.ecc_uncorrected_volatile, gpu3.ecc_uncorrected_aggregate),
        (Some(2), Some(2))
    );
    assert!(inv.health.reasons[0].message.contains("2 uncorrected ECC error"));
    assert_eq!(
        labels(&inv).get("spokelet.io/node.healthy").map(String::as_str),
        Some("false")
    );
    let table = render_table(&inv);
    assert!(table.contains("Healthy  no"), "{table}");
    assert!(table.contains("GpuEccUncorrectable  gpu3"), "{table}");

    // The same library, reset: the next discovery is healthy again.
    let inv = discover_in_state(&lib, &tree.root, &ShimState::default());
    assert_eq!(verdicts(&inv), expect(&[]));
    assert!(inv.health.healthy);
}

#[test]
fn gpu_gone_from_nvml_but_still_on_pci() {
    let lib = shim(ShimVariant::H100);
    let tree = healthy_hgx();
    let inv = discover_in_state(
        &lib,
        &tree.root,
        &ShimState {
            gpus: Some(7),
            ..ShimState::default()
        },
    );
    assert_eq!(inv.gpus.devices.len(), 7);
    assert_eq!(
        verdicts(&inv),
        expect(&[(code::GPU_NOT_VISIBLE_TO_NVML, "0000:df:00.0")])
    );
    // The warning stays, for the table and the logs.
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.contains("0000:df:00.0") && w.contains("not visible to NVML")),
        "{:#?}",
        inv.warnings
    );
}

#[test]
fn thermal_power_and_memory_repair_verdicts() {
    let lib = shim(ShimVariant::H100);
    let tree = healthy_hgx();
    let state = ShimState {
        retired_pending: BTreeSet::from([1]),
        remap_pending: BTreeSet::from([2]),
        power_mw: BTreeMap::from([(4, 800_000), (6, 700_000)]),
        temperature: BTreeMap::from([(5, 87), (7, 86)]),
        ..ShimState::default()
    };
    let inv = discover_in_state(&lib, &tree.root, &state);
    assert_eq!(
        verdicts(&inv),
        expect(&[
            (code::GPU_RETIRED_PAGES_PENDING, "gpu1"),
            (code::GPU_ROW_REMAP_PENDING, "gpu2"),
            (code::GPU_POWER_OVER_LIMIT, "gpu4"),
            (code::GPU_TEMPERATURE_HIGH, "gpu5"),
        ]),
        "at the limit (gpu6) and just below slowdown (gpu7) are normal"
    );
    let gpu2 = inv.gpus.devices[2].health.as_ref().unwrap();
    assert!(gpu2.remapped_rows.is_some_and(|r| r.pending && !r.failed));
}

#[test]
fn live_readings_are_not_in_the_document() {
    let lib = shim(ShimVariant::H100);
    let tree = healthy_hgx();
    let reading = |temperature: u32, power: u32| {
        let state = ShimState {
            temperature: BTreeMap::from([(0, temperature), (5, temperature + 50)]),
            power_mw: BTreeMap::from([(0, power)]),
            ..ShimState::default()
        };
        discover_in_state(&lib, &tree.root, &state)
    };
    let (first, second) = (reading(40, 250_000), reading(41, 260_000));
    // The readings differ, and the structs hold them...
    let live = |inv: &Inventory| {
        let h = inv.gpus.devices[0].health.as_ref().unwrap();
        (h.temperature_c, h.power_mw)
    };
    assert_eq!(live(&first), (Some(40), Some(250_000)));
    assert_eq!(live(&second), (Some(41), Some(260_000)));
    // ...but the documents are identical, the hot GPU's verdict included.
    assert_eq!(verdicts(&first), expect(&[(code::GPU_TEMPERATURE_HIGH, "gpu5")]));
    assert_eq!(
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&second).unwrap()
    );
    let json = serde_json::to_value(&first).unwrap();
    let health = &json["gpus"]["devices"][0]["health"];
    assert_eq!(health["temperatureSlowdownC"], 87);
    assert_eq!(health["powerLimitMw"], 700_000);
    assert!(health.get("temperatureC").is_none() && health.get("powerMw").is_none());
}
