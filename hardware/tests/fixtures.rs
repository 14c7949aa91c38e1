//! Discovery on the committed fixture trees (NVML disabled or absent): counts, fields and labels.

mod common;

use std::collections::BTreeMap;

use common::{copy_fixture, discover_fixture, discover_root, expect, fixture, verdicts};
use spokelet_hardware::health::code;
use spokelet_hardware::{
    DiscoverOptions, GpuSource, Inventory, NvmlSource, PeerKind, Relation, Sriov, discover, labels,
    render_table,
};

fn label_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn nic<'a>(inv: &'a Inventory, name: &str) -> &'a spokelet_hardware::Nic {
    inv.nics
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no NIC {name}"))
}

#[test]
fn plain_vm() {
    let inv = discover_fixture("plain-vm");
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    assert_eq!(inv.hostname, "vm");
    assert_eq!(inv.kernel, "6.18.44-fc-v657");
    assert_eq!(inv.architecture, "x86_64");

    let cpu = &inv.cpu;
    assert_eq!(cpu.vendor.as_deref(), Some("AuthenticAMD"));
    assert_eq!(cpu.model_name.as_deref(), Some("AMD EPYC"));
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads, cpu.numa_nodes),
        (1, 2, 2, 1)
    );
    assert!(cpu.flags.iter().any(|f| f == "avx512f"));
    assert!(cpu.flags.iter().any(|f| f == "avx_vnni"));
    assert!(!cpu.flags.iter().any(|f| f.starts_with("amx")));

    assert_eq!(inv.memory.total_bytes, Some(24_684_092 * 1024));
    assert_eq!(inv.memory.numa.len(), 1);
    assert_eq!(inv.memory.numa[0].total_bytes, Some(7_301_332 * 1024));
    assert_eq!(inv.memory.numa[0].cpu_list.as_deref(), Some("0-1"));
    let sizes: Vec<u64> = inv.memory.hugepages.iter().map(|p| p.size_kib).collect();
    assert_eq!(sizes, [2048, 1_048_576]);
    assert!(inv.memory.hugepages.iter().all(|p| p.total == 0 && p.free == 0));

    let names: Vec<&str> = inv.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["eth0", "ifb0", "ifb1", "lo"]);
    let eth0 = nic(&inv, "eth0");
    assert!(eth0.physical && !eth0.is_vf);
    assert_eq!(eth0.driver.as_deref(), Some("virtio_net"));
    assert_eq!(eth0.pci_address.as_deref(), Some("0000:00:03.0"));
    assert_eq!(eth0.mac.as_deref(), Some("02:fc:00:00:00:01"));
    assert_eq!(eth0.mtu, Some(1400));
    assert_eq!(eth0.operstate, "up");
    assert_eq!(eth0.admin_up, Some(true));
    assert_eq!(nic(&inv, "ifb0").admin_up, Some(false));
    assert_eq!(
        verdicts(&inv),
        expect(&[]),
        "virtual interfaces down are no fault"
    );
    assert_eq!(eth0.speed_mbps, None, "virtio reports -1: unknown");
    assert_eq!(eth0.numa_node, None, "numa_node -1 means unknown");
    assert_eq!(eth0.sriov, None);
    assert_eq!(
        eth0.device_path.as_deref(),
        Some("/sys/devices/pci0000:00/0000:00:03.0")
    );
    let lo = nic(&inv, "lo");
    assert!(!lo.physical);
    assert_eq!(lo.link_type.as_deref(), Some("loopback"));
    assert_eq!(lo.driver, None);

    assert!(inv.rdma.is_empty());
    assert_eq!(inv.gpus.source, GpuSource::PciScan);
    assert!(inv.gpus.devices.is_empty());
    assert_eq!(
        inv.gpus.nvml_error.as_deref(),
        Some("NVML disabled by configuration")
    );
    assert!(inv.topology.is_empty());
    let pci: Vec<&str> = inv.pci_devices.iter().map(|d| d.address.as_str()).collect();
    assert_eq!(
        pci,
        ["0000:00:03.0"],
        "only network/display/accelerator classes are listed"
    );

    let expected = label_map(&[
        ("feature.node.kubernetes.io/cpu-cpuid.AVX", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX2", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512BF16", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512BW", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512CD", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512DQ", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512F", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512VL", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVXVNNI", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.F16C", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.FMA3", "true"),
        ("feature.node.kubernetes.io/cpu-model.vendor_id", "AMD"),
        (
            "feature.node.kubernetes.io/kernel-version.full",
            "6.18.44-fc-v657",
        ),
        ("feature.node.kubernetes.io/kernel-version.major", "6"),
        ("feature.node.kubernetes.io/kernel-version.minor", "18"),
        ("feature.node.kubernetes.io/kernel-version.revision", "44"),
        ("feature.node.kubernetes.io/pci-1af4.present", "true"),
        ("spokelet.io/cpu.sockets", "1"),
        ("spokelet.io/node.healthy", "true"),
        ("spokelet.io/numa.nodes", "1"),
    ]);
    assert_eq!(labels(&inv), expected);
}

#[test]
fn hgx_h100_without_nvml() {
    let inv = discover_fixture("hgx-h100");
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    assert_eq!(inv.hostname, "hgx-h100-01");

    let cpu = &inv.cpu;
    assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
    assert_eq!(cpu.model_name.as_deref(), Some("Intel(R) Xeon(R) Platinum 8480+"));
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads, cpu.numa_nodes),
        (2, 112, 224, 2)
    );
    for flag in [
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "avx_vnni",
    ] {
        assert!(cpu.flags.iter().any(|f| f == flag), "missing {flag}");
    }

    let mem = &inv.memory;
    assert_eq!(mem.total_bytes, Some(2_113_148_088 * 1024));
    assert_eq!(mem.numa.len(), 2);
    assert_eq!(mem.numa[1].node, 1);
    assert_eq!(mem.numa[1].cpu_list.as_deref(), Some("56-111,168-223"));
    assert_eq!(mem.numa[0].hugepages[0].size_kib, 2048);
    assert_eq!(
        (mem.numa[0].hugepages[0].total, mem.numa[0].hugepages[0].free),
        (512, 500)
    );
    assert_eq!(
        (mem.hugepages[1].size_kib, mem.hugepages[1].total),
        (1_048_576, 64)
    );

    assert_eq!(inv.nics.len(), 14);
    assert_eq!(inv.nics.iter().filter(|n| n.physical).count(), 12);
    let pf0 = nic(&inv, "ens1f0");
    assert_eq!(
        pf0.sriov,
        Some(Sriov {
            total_vfs: 128,
            num_vfs: 2
        })
    );
    assert_eq!(pf0.speed_mbps, Some(25_000));
    assert_eq!(pf0.driver.as_deref(), Some("ice"));
    assert_eq!(pf0.numa_node, Some(0));
    let pf1 = nic(&inv, "ens1f1");
    assert_eq!(
        pf1.sriov,
        Some(Sriov {
            total_vfs: 128,
            num_vfs: 0
        })
    );
    assert_eq!((pf1.operstate.as_str(), pf1.speed_mbps), ("down", None));
    assert_eq!(pf1.admin_up, Some(false), "unused port, down on purpose");
    let vf = nic(&inv, "ens1f0v1");
    assert!(vf.is_vf && vf.physical);
    assert_eq!(vf.driver.as_deref(), Some("iavf"));
    let ib = nic(&inv, "ibp28s0");
    assert_eq!(ib.link_type.as_deref(), Some("infiniband"));
    assert_eq!(ib.speed_mbps, Some(400_000));
    assert!(!nic(&inv, "docker0").physical);

    assert_eq!(inv.rdma.len(), 8);
    let active: usize = inv
        .rdma
        .iter()
        .flat_map(|d| &d.ports)
        .filter(|p| p.is_active())
        .count();
    assert_eq!(active, 7);
    let mlx0 = &inv.rdma[0];
    assert_eq!(mlx0.name, "mlx5_0");
    assert_eq!(mlx0.node_guid.as_deref(), Some("b83f:d203:00a1:b2c0"));
    assert_eq!(mlx0.firmware.as_deref(), Some("28.39.1002"));
    assert_eq!(mlx0.node_type.as_deref(), Some("CA"));
    assert_eq!(mlx0.hca_type.as_deref(), Some("MT4129"));
    assert_eq!(mlx0.pci_address.as_deref(), Some("0000:1c:00.0"));
    assert_eq!(mlx0.numa_node, Some(0));
    assert_eq!(mlx0.netdevs, ["ibp28s0"]);
    let port = &mlx0.ports[0];
    assert_eq!(port.port, 1);
    assert_eq!(port.state.as_deref(), Some("ACTIVE"));
    assert_eq!(port.phys_state.as_deref(), Some("LinkUp"));
    assert_eq!(port.rate.as_deref(), Some("400 Gb/sec (4X NDR)"));
    assert_eq!(port.rate_gbps, Some(400.0));
    assert_eq!(port.link_layer.as_deref(), Some("InfiniBand"));
    assert_eq!(port.netdev.as_deref(), Some("ibp28s0"));
    assert_eq!(inv.rdma[7].ports[0].state.as_deref(), Some("DOWN"));
    assert_eq!(inv.rdma[5].numa_node, Some(1));

    // Without NVML the GPUs are still counted from PCI (NVSwitches are not).
    let gpus = &inv.gpus;
    assert_eq!(gpus.source, GpuSource::PciScan);
    assert_eq!(gpus.devices.len(), 8);
    assert_eq!(
        gpus.driver_version.as_deref(),
        Some("550.54.15"),
        "from the loaded module"
    );
    for (i, g) in gpus.devices.iter().enumerate() {
        assert_eq!(g.index as usize, i);
        assert_eq!(g.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g.pci_device_id.as_deref(), Some("2330"));
        assert_eq!(g.architecture.as_deref(), Some("hopper"));
        assert!(g.driver_loaded);
        assert_eq!(g.driver.as_deref(), Some("nvidia"));
        assert_eq!(g.numa_node, Some(u32::from(i >= 4)));
    }
    assert_eq!(inv.pci_devices.len(), 20);

    // Each GPU shares a PCIe switch with exactly one HCA (and its IPoIB netdev).
    assert_eq!(inv.topology.len(), 8);
    for (i, t) in inv.topology.iter().enumerate() {
        let first = &t.peers[0];
        assert_eq!(
            (first.kind, first.name.as_str()),
            (PeerKind::Rdma, format!("mlx5_{i}").as_str())
        );
        assert_eq!(first.relation, Relation::PcieSwitch);
        let switch: Vec<&str> = t
            .peers
            .iter()
            .filter(|p| p.relation == Relation::PcieSwitch)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(switch.len(), 2, "{switch:?}");
        // The other HCAs on the same socket are NUMA-local only.
        let numa_hcas = t
            .peers
            .iter()
            .filter(|p| p.kind == PeerKind::Rdma && p.relation == Relation::Numa)
            .count();
        assert_eq!(numa_hcas, 3);
    }
    // The Ethernet card is on socket 0's chipset root complex.
    assert!(
        inv.topology[0]
            .peers
            .iter()
            .any(|p| p.name == "ens1f0" && p.relation == Relation::Numa)
    );
    assert!(!inv.topology[7].peers.iter().any(|p| p.name == "ens1f0"));

    let l = labels(&inv);
    assert!(
        !l.keys().any(|k| k.starts_with("nvidia.com/")),
        "GFD labels need NVML: {l:#?}"
    );
    for (k, v) in [
        ("spokelet.io/gpu.source", "pci-scan"),
        ("spokelet.io/gpu.count", "8"),
        ("spokelet.io/gpu.product", "NVIDIA-H100-80GB-HBM3"),
        ("spokelet.io/gpu.driver-loaded", "true"),
        ("spokelet.io/numa.nodes", "2"),
        ("spokelet.io/rdma.devices", "8"),
        ("spokelet.io/rdma.ports-active", "7"),
        ("spokelet.io/rdma.max-rate-gbps", "400"),
        ("spokelet.io/rdma.link-layer", "InfiniBand"),
        ("spokelet.io/topology.gpu-rdma", "pcie-switch"),
        ("feature.node.kubernetes.io/pci-10de.present", "true"),
        ("feature.node.kubernetes.io/pci-15b3.present", "true"),
        ("feature.node.kubernetes.io/network-sriov.capable", "true"),
        ("feature.node.kubernetes.io/network-sriov.configured", "true"),
        ("feature.node.kubernetes.io/custom-rdma.capable", "true"),
        ("feature.node.kubernetes.io/memory-numa", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AMXTILE", "true"),
        ("feature.node.kubernetes.io/cpu-cpuid.AVX512FP16", "true"),
        ("feature.node.kubernetes.io/cpu-model.vendor_id", "Intel"),
        ("spokelet.io/node.healthy", "false"),
    ] {
        assert_eq!(l.get(k).map(String::as_str), Some(v), "{k}");
    }

    // mlx5_7's cable is unplugged: its port and its IPoIB interface are down.
    // ens1f1 is down too, but administratively, and the PCI-scanned GPUs are
    // not judged.
    assert_eq!(
        verdicts(&inv),
        expect(&[
            (code::NIC_LINK_DOWN, "ibp224s0"),
            (code::RDMA_PORT_DOWN, "mlx5_7/1"),
        ])
    );
    let port = &inv.health.reasons[1].message;
    assert!(port.contains("DOWN") && port.contains("Disabled"), "{port}");
}

#[test]
fn nic_link_down_only_when_administratively_up() {
    let tree = copy_fixture("hgx-h100");
    // ens1f1 brought up without a link: a fault.
    tree.write("sys/class/net/ens1f1/flags", "0x1003\n");
    // ens1f0 taken down by an administrator: not one.
    tree.write("sys/class/net/ens1f0/operstate", "down\n");
    tree.write("sys/class/net/ens1f0/flags", "0x1002\n");
    let inv = discover_root(&tree.root);
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    assert_eq!(
        verdicts(&inv),
        expect(&[
            (code::NIC_LINK_DOWN, "ens1f1"),
            (code::NIC_LINK_DOWN, "ibp224s0"),
            (code::RDMA_PORT_DOWN, "mlx5_7/1"),
        ])
    );
    assert!(
        inv.health.reasons[0].message.contains("0000:05:00.1"),
        "{:?}",
        inv.health.reasons[0]
    );
}

#[test]
fn rdma_port_down_is_a_reason() {
    let tree = copy_fixture("hgx-h100");
    tree.write("sys/class/infiniband/mlx5_1/ports/1/state", "1: DOWN\n");
    tree.write("sys/class/infiniband/mlx5_1/ports/1/phys_state", "2: Polling\n");
    let inv = discover_root(&tree.root);
    assert_eq!(
        verdicts(&inv),
        expect(&[
            (code::NIC_LINK_DOWN, "ibp224s0"),
            (code::RDMA_PORT_DOWN, "mlx5_1/1"),
            (code::RDMA_PORT_DOWN, "mlx5_7/1"),
        ])
    );
    let r = &inv.health.reasons[1];
    assert!(
        r.message.contains("DOWN") && r.message.contains("Polling"),
        "{}",
        r.message
    );
}

#[test]
fn gpu_without_driver_is_reported_not_loaded() {
    let inv = discover_fixture("gpu-no-driver");
    assert!(inv.warnings.is_empty(), "{:#?}", inv.warnings);
    let gpus = &inv.gpus;
    assert_eq!(gpus.source, GpuSource::PciScan);
    assert_eq!(gpus.devices.len(), 1, "the HDMI audio function is not a GPU");
    let g = &gpus.devices[0];
    assert_eq!(g.name, "NVIDIA L40S");
    assert_eq!(g.pci_bus_id.as_deref(), Some("0000:01:00.0"));
    assert!(!g.driver_loaded);
    assert_eq!(g.driver, None);
    assert_eq!(g.architecture.as_deref(), Some("ada-lovelace"));
    assert_eq!(
        g.compute_capability.map(|c| c.to_string()).as_deref(),
        Some("8.9")
    );
    assert_eq!(g.numa_node, Some(0));
    assert_eq!(gpus.driver_version, None);
    assert_eq!((inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads), (1, 4, 8));
    assert_eq!(inv.topology[0].peers[0].name, "eno1");
    assert_eq!(inv.topology[0].peers[0].relation, Relation::PcieRoot);

    let l = labels(&inv);
    assert_eq!(
        l.get("spokelet.io/gpu.driver-loaded").map(String::as_str),
        Some("false")
    );
    assert_eq!(l.get("spokelet.io/gpu.count").map(String::as_str), Some("1"));
    assert_eq!(
        l.get("spokelet.io/gpu.product").map(String::as_str),
        Some("NVIDIA-L40S")
    );
    assert_eq!(
        l.get("feature.node.kubernetes.io/pci-10de.present")
            .map(String::as_str),
        Some("true")
    );
    assert!(!l.contains_key("nvidia.com/gpu.count"));

    let table = render_table(&inv);
    assert!(table.contains("NOT LOADED"), "{table}");

    // A GPU without a driver is not a health problem (passthrough is intentional).
    assert_eq!(verdicts(&inv), expect(&[]));
    assert_eq!(
        l.get("spokelet.io/node.healthy").map(String::as_str),
        Some("true")
    );
}

#[test]
fn unloadable_nvml_falls_back_with_reason() {
    let missing = fixture("gpu-no-driver").join("no-such-libnvidia-ml.so.1");
    let inv = discover(&DiscoverOptions {
        root: fixture("gpu-no-driver"),
        nvml: NvmlSource::Library(missing.clone()),
    });
    assert_eq!(inv.gpus.source, GpuSource::PciScan);
    let reason = inv.gpus.nvml_error.as_deref().unwrap();
    assert!(reason.starts_with("cannot load NVML from "), "{reason}");
    assert!(reason.contains(&missing.display().to_string()), "{reason}");
    assert_eq!(inv.gpus.devices.len(), 1);
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.starts_with("1 NVIDIA GPU(s) found on PCI but NVML is unavailable")),
        "{:#?}",
        inv.warnings
    );
}

#[test]
fn library_that_is_not_nvml_is_a_load_error() {
    // A real shared library without any NVML symbol.
    let inv = discover(&DiscoverOptions {
        root: fixture("plain-vm"),
        nvml: NvmlSource::Library("libc.so.6".into()),
    });
    let reason = inv.gpus.nvml_error.as_deref().unwrap();
    assert!(reason.contains("nvmlInit_v2"), "{reason}");
    assert_eq!(inv.gpus.source, GpuSource::PciScan);
}

#[test]
fn json_round_trip_and_camel_case() {
    for name in ["plain-vm", "hgx-h100", "gpu-no-driver"] {
        let inv = discover_fixture(name);
        let json = serde_json::to_string(&inv).unwrap();
        let back: Inventory = serde_json::from_str(&json).unwrap();
        assert_eq!(back, inv, "{name}");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        for key in [
            "hostname",
            "kernel",
            "architecture",
            "cpu",
            "memory",
            "nics",
            "rdma",
            "gpus",
            "topology",
            "warnings",
            "pciDevices",
            "health",
        ] {
            assert!(value.get(key).is_some(), "{name}: missing {key}");
        }
        assert!(value["gpus"].get("nvmlError").is_some());
        assert!(value["cpu"].get("numaNodes").is_some());
        assert!(value["health"]["healthy"].is_boolean());
        assert!(value["health"]["reasons"].is_array());
        assert!(value["nics"][0].get("adminUp").is_some());
    }
}

#[test]
fn every_label_value_is_valid() {
    for name in ["plain-vm", "hgx-h100", "gpu-no-driver"] {
        for (k, v) in labels(&discover_fixture(name)) {
            let (prefix, key_name) = k.split_once('/').unwrap();
            assert!(!prefix.is_empty() && key_name.len() <= 63, "{k}");
            assert!(v.len() <= 63, "{k}={v}");
            assert!(
                v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "{k}={v}"
            );
            assert!(
                v.is_empty()
                    || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && v.ends_with(|c: char| c.is_ascii_alphanumeric())),
                "{k}={v}"
            );
        }
    }
}

#[test]
fn table_has_every_section() {
    let table = render_table(&discover_fixture("hgx-h100"));
    for section in [
        "Health",
        "CPU",
        "Memory",
        "NICs",
        "RDMA",
        "GPUs (source: pci-scan",
        "Topology",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(section)),
            "missing {section}:\n{table}"
        );
    }
    assert!(table.contains("mlx5_0, ibp28s0 (pcie-switch)"), "{table}");
    assert!(table.contains("2/128 VFs"), "{table}");
    assert!(table.contains("Healthy  no"), "{table}");
    assert!(table.contains("RdmaPortDown  mlx5_7/1"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("ens1f1") && l.contains("down (admin)")),
        "{table}"
    );
}
