//! System memory: total, per NUMA node, and huge pages per page size.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sysfs::{self, Root, Warnings};

/// Memory as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryInfo {
    /// `MemTotal`: usable RAM, i.e. installed memory minus what firmware and
    /// the kernel image reserve. `None` when `/proc/meminfo` is unreadable.
    pub total_bytes: Option<u64>,
    /// One entry per NUMA node; empty on kernels without NUMA support.
    pub numa: Vec<NumaMemory>,
    /// System-wide huge page pools, one per supported page size.
    pub hugepages: Vec<HugePages>,
}

/// Memory attached to one NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaMemory {
    /// Node number (the `N` in `nodeN`).
    pub node: u32,
    /// `MemTotal` of this node.
    pub total_bytes: Option<u64>,
    /// CPUs local to this node in kernel cpulist form (`0-55,112-167`), the
    /// form `taskset` and CPU-manager policies take.
    pub cpu_list: Option<String>,
    /// Huge page pools allocated on this node.
    pub hugepages: Vec<HugePages>,
}

/// One huge page pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HugePages {
    /// Page size in KiB (2048 for 2 MiB pages, 1048576 for 1 GiB pages), as
    /// in the kernel's `hugepages-<size>kB` directory names.
    pub size_kib: u64,
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`).
    pub free: u64,
}

/// `node0`, `node12`: the per-node directories (as opposed to `online`,
/// `possible`, `has_cpu`...).
fn is_node_dir(name: &str) -> bool {
    name.strip_prefix("node")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Finds `key` in a meminfo-style table (`MemTotal:  24684092 kB`, or with a
/// `Node 0 ` prefix) and returns it in bytes.
fn meminfo_bytes(path: &Path, text: &str, key: &str, warnings: &mut Warnings) -> Option<u64> {
    let line = text.lines().find_map(|line| {
        let line = line.trim_start();
        // Per-node tables prefix every line with `Node <n> `.
        let line = match line.strip_prefix("Node ") {
            Some(rest) => rest.split_once(' ').map_or(rest, |(_, l)| l.trim_start()),
            None => line,
        };
        line.strip_prefix(key)?.strip_prefix(':').map(str::trim)
    });
    let Some(value) = line else {
        warnings.push(format!("{}: no {key} line", path.display()));
        return None;
    };
    let (number, unit) = value.split_once(' ').map_or((value, ""), |(n, u)| (n, u.trim()));
    let multiplier = match unit {
        "kB" => 1024,
        "" => 1,
        _ => {
            warnings.push(format!("{}: unexpected unit {unit:?} for {key}", path.display()));
            return None;
        }
    };
    match sysfs::parse_value::<u64>(path, number, "a number of kB") {
        Ok(n) => {
            let bytes = n.checked_mul(multiplier);
            if bytes.is_none() {
                warnings.push(format!("{}: {key} of {n} {unit} overflows", path.display()));
            }
            bytes
        }
        Err(e) => {
            warnings.push(e);
            None
        }
    }
}

fn read_meminfo_total(path: &Path, warnings: &mut Warnings) -> Option<u64> {
    match sysfs::read_text(path, sysfs::ATTR_LIMIT) {
        Ok(text) => meminfo_bytes(path, &text, "MemTotal", warnings),
        Err(e) => {
            warnings.push(e);
            None
        }
    }
}

/// Reads every `hugepages-<size>kB` pool under `dir`. A missing directory
/// means the kernel has no hugetlbfs support: no pools, no warning.
fn hugepage_pools(dir: &Path, warnings: &mut Warnings) -> Vec<HugePages> {
    let mut pools = Vec::new();
    for name in warnings.list(dir) {
        let Some(size_kib) = name
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let pool = dir.join(&name);
        let total = warnings.parse(&pool.join("nr_hugepages"), "a page count");
        let free = warnings.parse(&pool.join("free_hugepages"), "a page count");
        if let (Some(total), Some(free)) = (total, free) {
            pools.push(HugePages {
                size_kib,
                total,
                free,
            });
        }
    }
    pools.sort_by_key(|p| p.size_kib);
    pools
}

pub(crate) fn discover(root: &Root, warnings: &mut Warnings) -> MemoryInfo {
    let total_bytes = read_meminfo_total(&root.join("proc/meminfo"), warnings);
    let nodes_dir = root.join("sys/devices/system/node");
    let mut numa = Vec::new();
    for name in warnings.list(&nodes_dir) {
        if !is_node_dir(&name) {
            continue;
        }
        let Some(node) = name.strip_prefix("node").and_then(|n| n.parse().ok()) else {
            continue;
        };
        let dir = nodes_dir.join(&name);
        numa.push(NumaMemory {
            node,
            total_bytes: read_meminfo_total(&dir.join("meminfo"), warnings),
            cpu_list: warnings.attr(&dir.join("cpulist")),
            hugepages: hugepage_pools(&dir.join("hugepages"), warnings),
        });
    }
    MemoryInfo {
        total_bytes,
        numa,
        hugepages: hugepage_pools(&root.join("sys/kernel/mm/hugepages"), warnings),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_system_and_node_tables() {
        let mut w = Warnings::default();
        let p = Path::new("/proc/meminfo");
        let sys = "MemTotal:       24684092 kB\nMemFree:        20758264 kB\n";
        assert_eq!(meminfo_bytes(p, sys, "MemTotal", &mut w), Some(24684092 * 1024));
        let node = "Node 0 MemTotal:        7301332 kB\nNode 0 MemFree:  1 kB\n";
        assert_eq!(meminfo_bytes(p, node, "MemTotal", &mut w), Some(7301332 * 1024));
        let node12 = "Node 12 MemTotal: 5 kB\n";
        assert_eq!(meminfo_bytes(p, node12, "MemTotal", &mut w), Some(5 * 1024));
        assert!(w.into_vec().is_empty());
    }

    #[test]
    fn garbage_becomes_a_warning() {
        let mut w = Warnings::default();
        let p = Path::new("/proc/meminfo");
        assert_eq!(meminfo_bytes(p, "MemTotal: lots kB\n", "MemTotal", &mut w), None);
        assert_eq!(meminfo_bytes(p, "MemTotal: 1 MB\n", "MemTotal", &mut w), None);
        assert_eq!(meminfo_bytes(p, "nothing here", "MemTotal", &mut w), None);
        assert_eq!(
            meminfo_bytes(p, "MemTotal: 99999999999999999999 kB", "MemTotal", &mut w),
            None
        );
        assert_eq!(w.into_vec().len(), 4);
    }
}
