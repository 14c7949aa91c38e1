//! Hostile and broken trees: missing files, garbage, non-UTF-8, symlink loops, enormous files.
//! Discovery must return partial results with warnings and never panic.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use spokelet_hardware::{DiscoverOptions, Inventory, NvmlSource, discover, labels, render_table};

fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(target, p).unwrap();
}

/// A sparse file of `len` bytes: enormous, but free to create.
fn huge(root: &Path, rel: &str, len: u64) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::File::create(p).unwrap().set_len(len).unwrap();
}

fn run(root: &Path) -> Inventory {
    let inv = discover(&DiscoverOptions {
        root: root.to_path_buf(),
        nvml: NvmlSource::Disabled,
    });
    // Every consumer must cope with whatever came back.
    let _ = render_table(&inv);
    let _ = labels(&inv);
    serde_json::to_string(&inv).unwrap();
    inv
}

fn has_warning(inv: &Inventory, needle: &str) -> bool {
    inv.warnings.iter().any(|w| w.contains(needle))
}

#[track_caller]
fn assert_warning(inv: &Inventory, needle: &str) {
    assert!(
        has_warning(inv, needle),
        "no warning containing {needle:?}: {:#?}",
        inv.warnings
    );
}

#[test]
fn empty_root_gives_warnings_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let inv = run(dir.path());
    assert_eq!(inv.hostname, "");
    assert_eq!(inv.cpu.threads, 0);
    assert_eq!(inv.cpu.numa_nodes, 1);
    assert_eq!(inv.memory.total_bytes, None);
    assert!(inv.nics.is_empty() && inv.rdma.is_empty() && inv.gpus.devices.is_empty());
    for path in [
        "proc/sys/kernel/hostname",
        "proc/cpuinfo",
        "proc/meminfo",
        "sys/devices/system/cpu/online",
        "sys/class/net",
        "sys/bus/pci/devices",
    ] {
        assert_warning(&inv, path);
    }
}

#[test]
fn missing_root_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not-there");
    let inv = run(&root);
    assert_warning(&inv, &root.display().to_string());
}

#[test]
fn garbage_values_are_warnings_and_the_rest_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "proc/sys/kernel/hostname", "node-1\n");
    write(r, "proc/sys/kernel/osrelease", b"6.1.0-\xff\xfe\n");
    write(
        r,
        "proc/cpuinfo",
        b"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Caf\xe9 CPU\nflags\t: lm avx2\n\
          physical id\t: banana\ncore id\t: 0\n\nno colon here\n: :\n",
    );
    write(r, "proc/meminfo", "MemTotal: lots kB\n");
    write(r, "sys/devices/system/cpu/online", "0-2\n");
    write(r, "sys/devices/system/cpu/cpu0/topology/core_cpus_list", "0-x\n");
    write(
        r,
        "sys/devices/system/cpu/cpu0/topology/package_cpus_list",
        "0-4294967295\n",
    );
    write(
        r,
        "sys/devices/system/cpu/cpu1/topology/core_cpus_list",
        b"\xff\n",
    );
    write(
        r,
        "sys/devices/system/node/node0/meminfo",
        b"Node 0 MemTotal: \xff kB\n",
    );
    write(r, "sys/devices/system/node/nodeZ/meminfo", "ignored\n");
    write(
        r,
        "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        "1e9\n",
    );
    write(
        r,
        "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
        "0\n",
    );
    write(r, "sys/kernel/mm/hugepages/hugepages-bogus/nr_hugepages", "1\n");

    let dev = "sys/devices/pci0000:00/0000:00:03.0";
    write(r, &format!("{dev}/vendor"), "0x8086\n");
    write(r, &format!("{dev}/device"), "0xZZZZ\n");
    write(r, &format!("{dev}/class"), "0x020000\n");
    write(r, &format!("{dev}/numa_node"), "minus one\n");
    write(r, &format!("{dev}/sriov_totalvfs"), "-5\n");
    link(
        r,
        "sys/bus/pci/devices/0000:00:03.0",
        "../../../devices/pci0000:00/0000:00:03.0",
    );
    write(r, "sys/bus/pci/devices/not-an-address", "");
    let net = format!("{dev}/net/eth0");
    write(r, &format!("{net}/mtu"), "abc\n");
    write(r, &format!("{net}/speed"), "fast\n");
    write(r, &format!("{net}/operstate"), b"\xff\xfe\n");
    write(r, &format!("{net}/address"), "aa:bb:cc:dd:ee:ff\n");
    write(r, &format!("{net}/type"), "99999999999\n");
    link(r, &format!("{net}/device"), "../../../0000:00:03.0");
    link(
        r,
        "sys/class/net/eth0",
        "../../devices/pci0000:00/0000:00:03.0/net/eth0",
    );

    let inv = run(r);
    assert_eq!(inv.hostname, "node-1");
    assert_eq!(inv.kernel, "");
    assert_warning(&inv, "osrelease: not valid UTF-8");

    // Lossy cpuinfo: the model survives with a replacement character.
    assert_eq!(inv.cpu.vendor.as_deref(), Some("GenuineIntel"));
    assert_eq!(inv.cpu.model_name.as_deref(), Some("Caf\u{fffd} CPU"));
    assert_eq!(inv.cpu.flags, ["avx2"]);
    assert_warning(&inv, "cpuinfo: not valid UTF-8");
    assert_warning(&inv, "core_cpus_list: unexpected value \"0-x\"");
    assert_warning(&inv, "package_cpus_list: unexpected value \"0-4294967295\"");
    assert_warning(&inv, "cpu1/topology/core_cpus_list: not valid UTF-8");
    // Without usable sibling lists every online CPU counts as its own core.
    assert_eq!((inv.cpu.threads, inv.cpu.cores), (3, 3));

    assert_eq!(inv.memory.total_bytes, None);
    assert_warning(&inv, "meminfo: unexpected value \"lots\"");
    assert_eq!(inv.memory.numa.len(), 1);
    assert_eq!(inv.memory.numa[0].total_bytes, None);
    assert_warning(&inv, "node0/meminfo: not valid UTF-8");
    assert!(inv.memory.hugepages.is_empty());
    assert_warning(&inv, "nr_hugepages: unexpected value \"1e9\"");

    assert_warning(&inv, "skipping \"not-an-address\"");
    assert_warning(&inv, "device: unexpected value \"0xZZZZ\"");
    assert_warning(&inv, "numa_node: unexpected value \"minus one\"");
    assert_warning(&inv, "sriov_totalvfs: unexpected value \"-5\"");

    let eth0 = &inv.nics[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mac.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
    assert_eq!(eth0.pci_address.as_deref(), Some("0000:00:03.0"));
    assert_eq!(
        (eth0.mtu, eth0.speed_mbps, eth0.numa_node, eth0.sriov),
        (None, None, None, None)
    );
    assert_eq!(eth0.operstate, "unknown");
    assert_warning(&inv, "mtu: unexpected value \"abc\"");
    assert_warning(&inv, "speed: unexpected value \"fast\"");
    assert_warning(&inv, "operstate: not valid UTF-8");
    assert_warning(&inv, "type: unexpected value");
}

#[test]
fn absurd_cpu_list_falls_back_to_cpuinfo() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "sys/devices/system/cpu/online", "0-4294967295\n");
    write(
        r,
        "proc/cpuinfo",
        "processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\nprocessor\t: 1\nphysical id\t: 0\ncore id\t: 0\n\n",
    );
    let inv = run(r);
    assert_warning(&inv, "online: unexpected value");
    assert_eq!((inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads), (1, 1, 2));
}

#[test]
fn symlink_loops_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    link(r, "sys/class/net/loop0", "loop0");
    link(r, "sys/class/net/ping", "pong");
    link(r, "sys/class/net/pong", "ping");
    // A real netdev whose `device` link loops.
    write(r, "sys/devices/pci0000:00/0000:00:04.0/net/eth1/mtu", "1500\n");
    link(r, "sys/devices/pci0000:00/0000:00:04.0/net/eth1/device", "device");
    link(
        r,
        "sys/class/net/eth1",
        "../../devices/pci0000:00/0000:00:04.0/net/eth1",
    );
    link(r, "sys/bus/pci/devices/0000:00:09.0", "0000:00:09.0");
    write(r, "sys/class/infiniband/mlx5_0/fw_ver", "1.2.3\n");
    link(r, "sys/class/infiniband/mlx5_0/device", "device");
    link(r, "sys/class/infiniband/mlx5_0/ports", "ports");
    write(r, "sys/devices/system/cpu/online", "0\n");
    link(r, "sys/devices/system/cpu/cpu0", "cpu0");

    let inv = run(r);
    let names: Vec<&str> = inv.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["eth1"], "looping entries are skipped, the rest kept");
    assert_eq!(inv.nics[0].mtu, Some(1500));
    assert!(!inv.nics[0].physical);
    assert_eq!(inv.rdma.len(), 1);
    assert_eq!(inv.rdma[0].firmware.as_deref(), Some("1.2.3"));
    assert_eq!(inv.cpu.threads, 1);
    let loops = inv
        .warnings
        .iter()
        .filter(|w| w.contains("many levels of symbolic links"))
        .count();
    assert!(loops >= 7, "{:#?}", inv.warnings);
    for needle in [
        "sys/class/net/loop0",
        "sys/class/net/ping",
        "eth1/device",
        "0000:00:09.0",
        "mlx5_0/device",
        "mlx5_0/ports",
        "cpu0/topology",
    ] {
        assert_warning(&inv, needle);
    }
}

#[test]
fn enormous_files_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    // 1 GiB each, sparse: reading them whole would take seconds and memory.
    huge(r, "proc/cpuinfo", 1 << 30);
    huge(r, "proc/meminfo", 1 << 30);
    huge(r, "sys/class/net/eth0/mtu", 1 << 30);
    write(r, "sys/class/net/eth0/operstate", "up\n");
    huge(r, "proc/sys/kernel/hostname", 1 << 30);

    let inv = run(r);
    assert_warning(&inv, "proc/cpuinfo: larger than 16777216 bytes");
    assert_warning(&inv, "proc/meminfo: larger than 65536 bytes");
    assert_warning(&inv, "mtu: larger than 65536 bytes");
    assert_warning(&inv, "hostname: larger than 65536 bytes");
    assert_eq!(inv.nics[0].mtu, None);
    assert_eq!(inv.nics[0].operstate, "up");
}

#[test]
fn fifos_do_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "sys/class/net/eth0/operstate", "up\n");
    for fifo in [
        "sys/class/net/eth0/mtu",
        "proc/cpuinfo",
        "proc/sys/kernel/hostname",
    ] {
        fs::create_dir_all(r.join(fifo).parent().unwrap()).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(r.join(fifo))
            .status()
            .unwrap();
        assert!(status.success());
    }
    // Nobody ever writes to the FIFOs: discovery must still finish.
    let inv = run(r);
    assert_eq!(inv.nics[0].operstate, "up");
    assert_eq!(inv.nics[0].mtu, None);
}

#[test]
fn non_utf8_names_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let net = r.join("sys/class/net");
    fs::create_dir_all(&net).unwrap();
    fs::create_dir(net.join(std::ffi::OsStr::from_bytes(b"eth\xff"))).unwrap();
    write(r, "sys/class/net/eth0/operstate", "up\n");
    let inv = run(r);
    assert_eq!(inv.nics.len(), 1);
    assert_warning(&inv, "non-UTF-8 name");
}

#[test]
fn unreadable_entries_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    // A directory where a file is expected, and a file where a directory is.
    fs::create_dir_all(r.join("proc/cpuinfo")).unwrap();
    write(r, "sys/class/net", "not a directory\n");
    write(r, "sys/devices/system/node", "nor this\n");
    let inv = run(r);
    assert_warning(&inv, "proc/cpuinfo");
    assert_warning(&inv, "sys/class/net");
    assert_warning(&inv, "sys/devices/system/node");
}
