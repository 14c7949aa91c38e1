//! Human-readable, sectioned text rendering of an inventory.

use std::fmt::Write as _;

use crate::inventory::Inventory;

/// Placeholder for unknown values, so columns stay aligned.
const NONE: &str = "-";

/// How many virtual interface names to list before summarising; a
/// Kubernetes node can have hundreds of veths, which would drown the table.
const VIRTUAL_NAMES_SHOWN: usize = 8;

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| NONE.to_owned(), |v| v.to_string())
}

/// Bytes as GiB (or MiB when small) with one decimal.
fn size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    // Lossy above 2^53 bytes (8 PiB), far beyond any node.
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.1} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

fn plural(n: u32, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Writes rows as left-aligned columns, two spaces apart, indented by two.
fn columns(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from("  ");
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{cell:<w$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

fn section(out: &mut String, title: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push('\n');
}

fn host(inv: &Inventory, out: &mut String) {
    let _ = writeln!(
        out,
        "Host: {}  kernel {}  {}",
        if inv.hostname.is_empty() {
            NONE
        } else {
            &inv.hostname
        },
        if inv.kernel.is_empty() { NONE } else { &inv.kernel },
        inv.architecture
    );
}

fn health(inv: &Inventory, out: &mut String) {
    let h = &inv.health;
    section(out, "Health");
    let _ = writeln!(out, "  Healthy  {}", if h.healthy { "yes" } else { "no" });
    if h.reasons.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = h
        .reasons
        .iter()
        .map(|r| vec![r.code.clone(), r.subject.clone(), r.message.clone()])
        .collect();
    columns(out, &["REASON", "SUBJECT", "MESSAGE"], &rows);
}

fn cpu(inv: &Inventory, out: &mut String) {
    let c = &inv.cpu;
    section(out, "CPU");
    let model = c.model_name.as_deref().unwrap_or(NONE);
    let _ = match &c.vendor {
        Some(v) => writeln!(out, "  Model     {model} ({v})"),
        None => writeln!(out, "  Model     {model}"),
    };
    let _ = writeln!(
        out,
        "  Topology  {}, {}, {}, {}",
        plural(c.sockets, "socket"),
        plural(c.cores, "core"),
        plural(c.threads, "thread"),
        plural(c.numa_nodes, "NUMA node")
    );
    let flags = if c.flags.is_empty() {
        NONE.to_owned()
    } else {
        c.flags.join(" ")
    };
    let _ = writeln!(out, "  AI flags  {flags}");
}

fn hugepages(pools: &[crate::memory::HugePages]) -> String {
    if pools.is_empty() {
        return NONE.to_owned();
    }
    pools
        .iter()
        .map(|p| {
            format!(
                "{}: {} total, {} free",
                size(p.size_kib.saturating_mul(1024)).replace(".0 ", " "),
                p.total,
                p.free
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn memory(inv: &Inventory, out: &mut String) {
    let m = &inv.memory;
    section(out, "Memory");
    let _ = writeln!(out, "  Total      {}", or_dash(m.total_bytes.map(size)));
    let _ = writeln!(out, "  Hugepages  {}", hugepages(&m.hugepages));
    if !m.numa.is_empty() {
        let rows: Vec<Vec<String>> = m
            .numa
            .iter()
            .map(|n| {
                vec![
                    format!("node{}", n.node),
                    or_dash(n.total_bytes.map(size)),
                    or_dash(n.cpu_list.as_deref()),
                    hugepages(&n.hugepages),
                ]
            })
            .collect();
        columns(out, &["NODE", "MEMORY", "CPUS", "HUGEPAGES"], &rows);
    }
}

fn nics(inv: &Inventory, out: &mut String) {
    section(out, "NICs");
    let rows: Vec<Vec<String>> = inv
        .nics
        .iter()
        .filter(|n| n.physical)
        .map(|n| {
            let sriov = match (n.sriov, n.is_vf) {
                (_, true) => "VF".to_owned(),
                (Some(s), _) => format!("{}/{} VFs", s.num_vfs, s.total_vfs),
                (None, _) => NONE.to_owned(),
            };
            // An interface down on purpose says so, apart from a lost link.
            let state = if n.admin_up == Some(false) {
                format!("{} (admin)", n.operstate)
            } else {
                n.operstate.clone()
            };
            vec![
                n.name.clone(),
                state,
                n.speed_mbps
                    .map_or_else(|| NONE.to_owned(), |s| format!("{s} Mb/s")),
                or_dash(n.mtu),
                or_dash(n.link_type.as_deref()),
                or_dash(n.driver.as_deref()),
                or_dash(n.pci_address.as_deref()),
                or_dash(n.numa_node),
                sriov,
                or_dash(n.mac.as_deref()),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("  (no physical interfaces)\n");
    } else {
        columns(
            out,
            &[
                "NAME", "STATE", "SPEED", "MTU", "TYPE", "DRIVER", "PCI", "NUMA", "SR-IOV", "MAC",
            ],
            &rows,
        );
    }
    let virtual_names: Vec<&str> = inv
        .nics
        .iter()
        .filter(|n| !n.physical)
        .map(|n| n.name.as_str())
        .collect();
    if !virtual_names.is_empty() {
        let shown = virtual_names
            .iter()
            .take(VIRTUAL_NAMES_SHOWN)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let more = virtual_names.len().saturating_sub(VIRTUAL_NAMES_SHOWN);
        let _ = if more > 0 {
            writeln!(out, "  virtual: {shown} (+{more} more)")
        } else {
            writeln!(out, "  virtual: {shown}")
        };
    }
}

fn rdma(inv: &Inventory, out: &mut String) {
    section(out, "RDMA");
    if inv.rdma.is_empty() {
        out.push_str("  (none)\n");
        return;
    }
    let mut rows = Vec::new();
    for d in &inv.rdma {
        let ports: Vec<Option<&crate::rdma::RdmaPort>> = if d.ports.is_empty() {
            vec![None]
        } else {
            d.ports.iter().map(Some).collect()
        };
        for p in ports {
            rows.push(vec![
                d.name.clone(),
                or_dash(p.map(|p| p.port)),
                or_dash(p.and_then(|p| p.state.as_deref())),
                or_dash(p.and_then(|p| p.phys_state.as_deref())),
                or_dash(p.and_then(|p| p.rate.as_deref())),
                or_dash(p.and_then(|p| p.link_layer.as_deref())),
                or_dash(p.and_then(|p| p.netdev.as_deref())),
                or_dash(d.pci_address.as_deref()),
                or_dash(d.numa_node),
                or_dash(d.firmware.as_deref()),
            ]);
        }
    }
    columns(
        out,
        &[
            "DEVICE", "PORT", "STATE", "PHYS", "RATE", "LINK", "NETDEV", "PCI", "NUMA", "FIRMWARE",
        ],
        &rows,
    );
}

fn gpus(inv: &Inventory, out: &mut String) {
    let g = &inv.gpus;
    let mut title = format!("GPUs (source: {}", g.source);
    if let Some(v) = &g.driver_version {
        let _ = write!(title, ", driver {v}");
    }
    if let Some(v) = &g.cuda_driver_version {
        let _ = write!(title, ", CUDA {v}");
    }
    title.push(')');
    section(out, &title);
    if let Some(e) = &g.nvml_error {
        let _ = writeln!(out, "  NVML: {e}");
    }
    if g.devices.is_empty() {
        out.push_str("  (none)\n");
        return;
    }
    let mut rows = Vec::new();
    for d in &g.devices {
        let mig = match d.mig_mode {
            Some(m) if m.current => "on".to_owned(),
            Some(m) if m.pending => "pending".to_owned(),
            Some(_) => "off".to_owned(),
            None => NONE.to_owned(),
        };
        rows.push(vec![
            d.index.to_string(),
            d.name.clone(),
            or_dash(d.memory_bytes.map(size)),
            or_dash(d.compute_capability),
            or_dash(d.architecture.as_deref()),
            or_dash(d.pci_bus_id.as_deref()),
            or_dash(d.numa_node),
            or_dash(d.nvlinks_active),
            mig,
            if d.driver_loaded {
                d.driver.clone().unwrap_or_else(|| "loaded".to_owned())
            } else {
                "NOT LOADED".to_owned()
            },
        ]);
    }
    columns(
        out,
        &[
            "IDX", "NAME", "MEMORY", "CC", "ARCH", "PCI", "NUMA", "NVLINK", "MIG", "DRIVER",
        ],
        &rows,
    );
    let migs: Vec<Vec<String>> = g
        .devices
        .iter()
        .flat_map(|d| {
            d.mig_devices.iter().map(move |m| {
                vec![
                    format!("{}:{}", d.index, m.index),
                    or_dash(m.profile.as_deref()),
                    or_dash(m.memory_bytes.map(size)),
                    or_dash(m.multiprocessors),
                    or_dash(m.uuid.as_deref()),
                ]
            })
        })
        .collect();
    if !migs.is_empty() {
        out.push('\n');
        columns(out, &["MIG", "PROFILE", "MEMORY", "SMS", "UUID"], &migs);
    }
    gpu_health(inv, out);
}

/// Milliwatts as watts with one decimal (`120.0 W`), without floating point.
fn watts(mw: u32) -> String {
    format!("{}.{} W", mw / 1000, mw % 1000 / 100)
}

fn celsius(c: u32) -> String {
    format!("{c} C")
}

fn yes_no(v: Option<bool>, yes: &str, no: &str) -> String {
    v.map_or_else(|| NONE.to_owned(), |v| if v { yes } else { no }.to_owned())
}

fn remap(rows: Option<crate::gpu::RemappedRows>) -> String {
    let Some(r) = rows else {
        return NONE.to_owned();
    };
    let mut text = format!("{} corr, {} unc", r.correctable, r.uncorrectable);
    if r.pending {
        text.push_str(", pending");
    }
    if r.failed {
        text.push_str(", FAILED");
    }
    text
}

/// One row of the GPU health table; `None` for a GPU without health (PCI scan).
fn gpu_health_row(d: &crate::gpu::Gpu) -> Option<Vec<String>> {
    let h = d.health.as_ref()?;
    Some(vec![
        d.index.to_string(),
        yes_no(h.ecc_enabled, "on", "off"),
        format!(
            "{} / {}",
            or_dash(h.ecc_uncorrected_volatile),
            or_dash(h.ecc_uncorrected_aggregate)
        ),
        yes_no(h.retired_pages_pending, "pending", "none"),
        remap(h.remapped_rows),
        or_dash(h.temperature_c.map(celsius)),
        or_dash(h.temperature_slowdown_c.map(celsius)),
        or_dash(h.temperature_shutdown_c.map(celsius)),
        or_dash(h.power_mw.map(watts)),
        or_dash(h.power_limit_mw.map(watts)),
    ])
}

fn gpu_health(inv: &Inventory, out: &mut String) {
    let rows: Vec<Vec<String>> = inv.gpus.devices.iter().filter_map(gpu_health_row).collect();
    if rows.is_empty() {
        return;
    }
    out.push('\n');
    columns(
        out,
        &[
            "GPU",
            "ECC",
            "UNCORRECTED (VOL/AGG)",
            "RETIRE",
            "ROW REMAP",
            "TEMP",
            "SLOWDOWN",
            "SHUTDOWN",
            "POWER",
            "LIMIT",
        ],
        &rows,
    );
}

fn topology(inv: &Inventory, out: &mut String) {
    if inv.topology.is_empty() {
        return;
    }
    section(out, "Topology (GPU to network, nearest first)");
    let rows: Vec<Vec<String>> = inv
        .topology
        .iter()
        .map(|t| {
            let peers = if t.peers.is_empty() {
                NONE.to_owned()
            } else {
                // The closest relation tier only: the rest is in the JSON.
                let best = t.peers[0].relation;
                let names: Vec<&str> = t
                    .peers
                    .iter()
                    .filter(|p| p.relation == best)
                    .map(|p| p.name.as_str())
                    .collect();
                format!("{} ({best})", names.join(", "))
            };
            vec![
                t.gpu.to_string(),
                or_dash(t.pci_bus_id.as_deref()),
                or_dash(t.numa_node),
                peers,
            ]
        })
        .collect();
    columns(out, &["GPU", "PCI", "NUMA", "NEAREST"], &rows);
}

fn warnings(inv: &Inventory, out: &mut String) {
    if inv.warnings.is_empty() {
        return;
    }
    section(out, &format!("Warnings ({})", inv.warnings.len()));
    for w in &inv.warnings {
        let _ = writeln!(out, "  - {w}");
    }
}

/// Renders the inventory as a multi-section text table for people.
pub fn render_table(inv: &Inventory) -> String {
    let mut out = String::with_capacity(4096);
    host(inv, &mut out);
    health(inv, &mut out);
    cpu(inv, &mut out);
    memory(inv, &mut out);
    nics(inv, &mut out);
    rdma(inv, &mut out);
    gpus(inv, &mut out);
    topology(inv, &mut out);
    warnings(inv, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(85_520_809_984), "79.6 GiB");
        assert_eq!(size(2048 * 1024), "2.0 MiB");
    }

    #[test]
    fn watts_without_floats() {
        assert_eq!(watts(120_000), "120.0 W");
        assert_eq!(watts(699_950), "699.9 W");
        assert_eq!(watts(0), "0.0 W");
    }

    #[test]
    fn aligned_columns() {
        let mut out = String::new();
        columns(&mut out, &["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(out, "  A     BB\n  long  x\n");
    }
}
