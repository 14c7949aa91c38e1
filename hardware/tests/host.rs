//! Discovery on the machine running the tests: whatever it is, discovery completes and makes sense.

use spokelet_hardware::{DiscoverOptions, Inventory, NvmlSource, discover, labels, render_table};

#[test]
fn this_machine() {
    let inv = discover(&DiscoverOptions::default());
    assert!(inv.cpu.threads >= 1, "{inv:#?}");
    assert!(inv.cpu.sockets >= 1 && inv.cpu.cores >= 1 && inv.cpu.numa_nodes >= 1);
    assert!(inv.memory.total_bytes.is_some_and(|b| b > 0));
    assert!(!inv.kernel.is_empty());
    assert_eq!(inv.architecture, std::env::consts::ARCH);
    let logical = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(
        inv.cpu.threads as usize >= logical,
        "{} < {logical}",
        inv.cpu.threads
    );
    // Labels and table work on real data too.
    assert!(labels(&inv).contains_key("spokelet.io/numa.nodes"));
    assert!(render_table(&inv).contains("CPU"));
    let back: Inventory = serde_json::from_str(&serde_json::to_string(&inv).unwrap()).unwrap();
    assert_eq!(back, inv);
}

#[test]
fn this_machine_without_nvml() {
    let inv = discover(&DiscoverOptions {
        nvml: NvmlSource::Disabled,
        ..DiscoverOptions::default()
    });
    assert_eq!(
        inv.gpus.nvml_error.as_deref(),
        Some("NVML disabled by configuration")
    );
}
