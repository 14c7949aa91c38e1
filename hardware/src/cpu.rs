//! CPU model, topology (sockets, cores, threads, NUMA nodes) and AI-relevant ISA flags.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sysfs::{self, Root, Warnings};

/// What the node's CPUs are and how many there are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// `GenuineIntel`, `AuthenticAMD`, or on arm64 the implementer's name
    /// (`ARM`, `NVIDIA`, `Ampere`...), since arm64 has no `vendor_id`.
    pub vendor: Option<String>,
    /// Marketing name from `model name`; on arm64, which has none, the core
    /// name derived from the part number (e.g. `Neoverse-V2`).
    pub model_name: Option<String>,
    /// Kernel architecture name (`x86_64`, `aarch64`).
    pub architecture: String,
    /// Physical packages (distinct `physical_package_id`).
    pub sockets: u32,
    /// Physical cores (distinct package/core id pairs).
    pub cores: u32,
    /// Logical CPUs online (hardware threads).
    pub threads: u32,
    /// NUMA nodes the kernel knows about; 1 on kernels built without NUMA.
    pub numa_nodes: u32,
    /// The subset of ISA flags that matters for AI workloads (vector, matrix
    /// and low-precision extensions), in `/proc/cpuinfo` spelling. The full
    /// list is ~150 entries and mostly noise for scheduling decisions.
    pub flags: Vec<String>,
}

/// ISA flags worth reporting, with the name node-feature-discovery uses for
/// its `cpu-cpuid.<NAME>` label. Order is the order they are reported in.
pub(crate) const AI_FLAGS: &[(&str, &str)] = &[
    // x86: AVX family and the AVX-512 subsets used by inference kernels.
    ("avx", "AVX"),
    ("avx2", "AVX2"),
    ("fma", "FMA3"),
    ("f16c", "F16C"),
    ("avx512f", "AVX512F"),
    ("avx512bw", "AVX512BW"),
    ("avx512cd", "AVX512CD"),
    ("avx512dq", "AVX512DQ"),
    ("avx512vl", "AVX512VL"),
    ("avx512_vnni", "AVX512VNNI"),
    ("avx512_bf16", "AVX512BF16"),
    ("avx512_fp16", "AVX512FP16"),
    ("avx_vnni", "AVXVNNI"),
    // x86: Advanced Matrix Extensions (Sapphire Rapids and later).
    ("amx_tile", "AMXTILE"),
    ("amx_bf16", "AMXBF16"),
    ("amx_int8", "AMXINT8"),
    ("amx_fp16", "AMXFP16"),
    // arm64: NEON, SVE and the BF16/Int8 matrix-multiply extensions.
    ("asimd", "ASIMD"),
    ("sve", "SVE"),
    ("sve2", "SVE2"),
    ("bf16", "BF16"),
    ("i8mm", "I8MM"),
];

/// Fields of `/proc/cpuinfo` we use; only the first processor's model and
/// flags are kept (hybrid parts list the same ISA on every core).
#[derive(Debug, Default)]
struct CpuinfoSummary {
    vendor: Option<String>,
    model_name: Option<String>,
    flags: Vec<String>,
    /// arm64 `CPU implementer` / `CPU part`, for naming when there is no
    /// `model name`.
    implementer: Option<String>,
    part: Option<String>,
    /// `processor` entries: the logical CPU count if sysfs has nothing.
    processors: u32,
    /// (`physical id`, `core id`) pairs, the x86 fallback for topology.
    cores: BTreeSet<(u32, u32)>,
    packages: BTreeSet<u32>,
    /// Guessed from the fields present, for kernels without
    /// `/proc/sys/kernel/arch`.
    architecture: Option<&'static str>,
}

fn parse_cpuinfo(text: &str) -> CpuinfoSummary {
    let mut s = CpuinfoSummary::default();
    let mut package: Option<u32> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            // A blank line ends a processor block.
            package = None;
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => s.processors = s.processors.saturating_add(1),
            "vendor_id" if s.vendor.is_none() => s.vendor = Some(value.to_owned()),
            "model name" if s.model_name.is_none() => s.model_name = Some(value.to_owned()),
            // x86 says `flags`, arm64 says `Features`.
            "flags" | "Features" if s.flags.is_empty() => {
                let present: BTreeSet<&str> = value.split_ascii_whitespace().collect();
                s.flags = AI_FLAGS
                    .iter()
                    .filter(|(flag, _)| present.contains(flag))
                    .map(|(flag, _)| (*flag).to_owned())
                    .collect();
                if key == "flags" {
                    s.architecture = Some(if present.contains("lm") { "x86_64" } else { "i686" });
                }
            }
            "CPU implementer" if s.implementer.is_none() => s.implementer = Some(value.to_owned()),
            "CPU part" if s.part.is_none() => s.part = Some(value.to_owned()),
            "CPU architecture" if s.architecture.is_none() => {
                s.architecture = Some(if value == "8" || value.starts_with("AArch64") {
                    "aarch64"
                } else {
                    "arm"
                });
            }
            "physical id" => {
                package = value.parse().ok();
                if let Some(p) = package {
                    s.packages.insert(p);
                }
            }
            "core id" => {
                if let (Some(p), Ok(c)) = (package, value.parse()) {
                    s.cores.insert((p, c));
                }
            }
            _ => {}
        }
    }
    s
}

/// True once `bytes` holds a whole processor block: a blank line after some
/// content. On arm64 the implementer fields follow the `processor` lines of
/// all CPUs on older kernels, so wait for them too when they are due.
fn first_block_complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(2).position(|w| w == b"\n\n") else {
        return false;
    };
    let head = &bytes[..end];
    let arm = head.windows(8).any(|w| w == b"Features");
    !arm || head.windows(15).any(|w| w == b"CPU implementer")
}

/// Names for arm64 `CPU implementer` codes, from the Arm ARM's MIDR table.
fn arm_implementer(code: &str) -> Option<&'static str> {
    Some(match code {
        "0x41" => "ARM",
        "0x42" => "Broadcom",
        "0x43" => "Cavium",
        "0x46" => "Fujitsu",
        "0x48" => "HiSilicon",
        "0x4e" => "NVIDIA",
        "0x50" => "APM",
        "0x51" => "Qualcomm",
        "0x61" => "Apple",
        "0xc0" => "Ampere",
        _ => return None,
    })
}

/// Core names for the Arm-designed parts found in servers (Grace is
/// Neoverse-V2, Graviton 3 is V1, Graviton 4 is V2, Ampere Altra is N1).
fn arm_part(implementer: &str, part: &str) -> Option<&'static str> {
    Some(match (implementer, part) {
        ("0x41", "0xd0c") => "Neoverse-N1",
        ("0x41", "0xd40") => "Neoverse-V1",
        ("0x41", "0xd49") => "Neoverse-N2",
        ("0x41", "0xd4f") => "Neoverse-V2",
        ("0x41", "0xd84") => "Neoverse-V3",
        ("0x41", "0xd8e") => "Neoverse-N3",
        ("0x41", "0xd08") => "Cortex-A72",
        ("0x41", "0xd0b") => "Cortex-A76",
        ("0xc0", "0xac3") => "AmpereOne",
        _ => return None,
    })
}

/// More CPUs than any Linux build supports (`NR_CPUS` tops out at 8192 on
/// distribution kernels); a cpulist claiming more is garbage, and expanding
/// it would cost memory.
const MAX_CPUS: u32 = 1 << 16;

/// Parses a kernel cpulist (`0-55,112-167`) into CPU numbers. `None` for
/// malformed lists and lists larger than [`MAX_CPUS`].
pub(crate) fn parse_cpulist(list: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = range.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if first > last || last >= MAX_CPUS {
            return None;
        }
        cpus.extend(first..=last);
        if cpus.len() > MAX_CPUS as usize {
            return None;
        }
    }
    Some(cpus)
}

/// Topology as sysfs sees it, for online CPUs.
#[derive(Debug, Default)]
struct SysTopology {
    threads: u32,
    packages: u32,
    cores: u32,
}

/// Counts the groups `cpus` fall into, reading one sibling list per group
/// rather than one id per CPU: on a 2x56-core machine that is 112 reads for
/// cores and 2 for packages, instead of 448. `names` are the current and
/// pre-5.x attribute names.
fn count_groups(dir: &Path, cpus: &[u32], names: [&str; 2], warnings: &mut Warnings) -> u32 {
    let mut seen = vec![false; cpus.iter().max().map_or(0, |m| *m as usize + 1)];
    let mut groups: u32 = 0;
    for &cpu in cpus {
        if seen[cpu as usize] {
            continue;
        }
        groups = groups.saturating_add(1);
        seen[cpu as usize] = true;
        let topology = dir.join(format!("cpu{cpu}/topology"));
        let read = sysfs::read_attr(&topology.join(names[0])).and_then(|v| match v {
            Some(v) => Ok(Some((v, names[0]))),
            None => sysfs::read_attr(&topology.join(names[1])).map(|v| v.map(|v| (v, names[1]))),
        });
        match read {
            Ok(Some((list, name))) => match parse_cpulist(&list) {
                Some(siblings) => {
                    for s in siblings {
                        if let Some(slot) = seen.get_mut(s as usize) {
                            *slot = true;
                        }
                    }
                }
                None => warnings.push(sysfs::SysfsError::Parse {
                    path: topology.join(name),
                    value: sysfs::excerpt(&list),
                    expected: "a CPU list",
                }),
            },
            // Counted as a group of its own; nothing else to learn.
            Ok(None) => {}
            Err(e) => warnings.push(e),
        }
    }
    groups
}

fn sys_topology(root: &Root, warnings: &mut Warnings) -> Option<SysTopology> {
    let dir = root.join("sys/devices/system/cpu");
    let online_path = dir.join("online");
    let online = match sysfs::read_attr(&online_path) {
        Ok(Some(list)) => list,
        Ok(None) => {
            warnings.push(format!(
                "{}: not found; CPU topology taken from /proc/cpuinfo",
                online_path.display()
            ));
            return None;
        }
        Err(e) => {
            warnings.push(e);
            return None;
        }
    };
    let Some(cpus) = parse_cpulist(&online).filter(|c| !c.is_empty()) else {
        warnings.push(sysfs::SysfsError::Parse {
            path: online_path,
            value: sysfs::excerpt(&online),
            expected: "a CPU list",
        });
        return None;
    };
    Some(SysTopology {
        threads: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
        cores: count_groups(&dir, &cpus, ["core_cpus_list", "thread_siblings_list"], warnings),
        packages: count_groups(&dir, &cpus, ["package_cpus_list", "core_siblings_list"], warnings),
    })
}

/// The architecture name: the kernel's own answer when it gives one, else
/// a guess from `/proc/cpuinfo`'s fields.
fn architecture(root: &Root, cpuinfo: &CpuinfoSummary, warnings: &mut Warnings) -> String {
    if let Some(arch) = warnings.attr(&root.join("proc/sys/kernel/arch"))
        && !arch.is_empty()
    {
        return arch;
    }
    cpuinfo.architecture.unwrap_or("unknown").to_owned()
}

/// `numa_nodes` comes from the memory scan, which lists the node
/// directories anyway.
pub(crate) fn discover(root: &Root, numa_nodes: u32, warnings: &mut Warnings) -> CpuInfo {
    // Sysfs topology first: when it is there, only the first processor
    // block of /proc/cpuinfo is needed (model and flags). The kernel builds
    // that file as it is read, sampling every CPU's clock, which takes
    // milliseconds on a machine with hundreds of CPUs.
    let topology = sys_topology(root, warnings);
    let path = root.join("proc/cpuinfo");
    let read = if topology.is_some() {
        sysfs::read_until(&path, sysfs::PROC_LIMIT, first_block_complete)
    } else {
        sysfs::read_bytes(&path, sysfs::PROC_LIMIT)
    };
    let summary = match read {
        Ok(bytes) => {
            // One odd byte in a model name should not cost us the whole
            // table, so decode lossily and say so.
            let text = String::from_utf8_lossy(&bytes);
            if let std::borrow::Cow::Owned(_) = text {
                warnings.push(format!(
                    "{}: not valid UTF-8, invalid bytes replaced",
                    path.display()
                ));
            }
            parse_cpuinfo(&text)
        }
        Err(e) => {
            warnings.push(e);
            CpuinfoSummary::default()
        }
    };

    let (threads, sockets, cores) = match &topology {
        Some(t) => (t.threads, t.packages, t.cores),
        None => (
            summary.processors,
            u32::try_from(summary.packages.len()).unwrap_or(u32::MAX),
            u32::try_from(summary.cores.len()).unwrap_or(u32::MAX),
        ),
    };
    // A CPU always has at least one socket and one core; when neither source
    // gave ids (some VMs and arm64 without topology) fall back to the
    // thread count rather than claiming zero.
    let sockets = sockets.max(u32::from(threads > 0));
    let cores = if cores == 0 { threads } else { cores };

    let vendor = summary.vendor.clone().or_else(|| {
        summary
            .implementer
            .as_deref()
            .and_then(arm_implementer)
            .map(str::to_owned)
    });
    let model_name = summary.model_name.clone().or_else(|| {
        let (imp, part) = (summary.implementer.as_deref()?, summary.part.as_deref()?);
        arm_part(imp, part).map(str::to_owned)
    });

    CpuInfo {
        vendor,
        model_name,
        architecture: architecture(root, &summary, warnings),
        sockets,
        cores,
        threads,
        numa_nodes,
        flags: summary.flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
        assert_eq!(parse_cpulist("0-4294967295"), None, "refuses absurd sizes");
        assert_eq!(parse_cpulist("0-65535,0-65535"), None);
    }

    #[test]
    fn x86_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n\
                    physical id\t: 0\ncore id\t: 0\nflags\t\t: fpu lm avx avx2 avx512f amx_tile amx_bf16\n\n\
                    processor\t: 1\nphysical id\t: 1\ncore id\t: 0\n\n";
        let s = parse_cpuinfo(text);
        assert_eq!(s.vendor.as_deref(), Some("GenuineIntel"));
        assert_eq!(s.processors, 2);
        assert_eq!(s.packages.len(), 2);
        assert_eq!(s.cores.len(), 2);
        assert_eq!(s.flags, ["avx", "avx2", "avx512f", "amx_tile", "amx_bf16"]);
        assert_eq!(s.architecture, Some("x86_64"));
    }

    #[test]
    fn arm64_cpuinfo() {
        let text = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n\
                    CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd4f\n\n";
        let s = parse_cpuinfo(text);
        assert_eq!(s.flags, ["asimd", "sve", "sve2", "bf16", "i8mm"]);
        assert_eq!(s.architecture, Some("aarch64"));
        assert_eq!(arm_implementer(s.implementer.as_deref().unwrap()), Some("ARM"));
        assert_eq!(arm_part("0x41", s.part.as_deref().unwrap()), Some("Neoverse-V2"));
    }
}
