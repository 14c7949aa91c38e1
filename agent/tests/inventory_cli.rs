//! `spokelet inventory`: every output format on a fixture, through the library entry point and
//! through the real binary (on a fixture and on this machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use spokelet::inventory::{DiscoveryArgs, InventoryArgs, OutputFormat, run};
use spokelet_hardware::testing::{ShimVariant, build_nvml_shim};
use spokelet_hardware::{GpuSource, Inventory};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hardware/tests/fixtures")
        .join(name)
}

/// The NVML test double, built into a directory owned by the caller.
fn shim(dir: &tempfile::TempDir) -> PathBuf {
    build_nvml_shim(ShimVariant::H100, dir.path()).unwrap_or_else(|e| panic!("{e}"))
}

fn output(args: &InventoryArgs) -> String {
    let mut out = Vec::new();
    run(args, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn hgx_args(output: OutputFormat, nvml: &Path) -> InventoryArgs {
    InventoryArgs {
        output,
        discovery: DiscoveryArgs {
            root: fixture("hgx-h100"),
            nvml_library: Some(nvml.to_path_buf()),
            no_nvml: false,
        },
    }
}

#[test]
fn json_yaml_labels_and_table_on_a_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shim(&dir);

    let json: Inventory = serde_json::from_str(&output(&hgx_args(OutputFormat::Json, &lib))).unwrap();
    assert_eq!(json.hostname, "hgx-h100-01");
    assert_eq!(json.gpus.source, GpuSource::Nvml);
    assert_eq!(json.gpus.devices.len(), 8);
    assert_eq!(json.gpus.cuda_driver_version.as_deref(), Some("12.4"));
    assert_eq!(json.rdma.len(), 8);
    assert!(json.warnings.is_empty(), "{:#?}", json.warnings);
    assert!(!json.health.healthy);
    assert!(json.gpus.devices.iter().all(|g| g.health.is_some()));

    let yaml: Inventory = serde_yaml::from_str(&output(&hgx_args(OutputFormat::Yaml, &lib))).unwrap();
    assert_eq!(yaml, json, "YAML and JSON carry the same inventory");

    let labels = output(&hgx_args(OutputFormat::Labels, &lib));
    let lines: Vec<&str> = labels.lines().collect();
    let keys: Vec<&str> = lines.iter().map(|l| l.split_once('=').unwrap().0).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "labels are sorted by key:\n{labels}"
    );
    for want in [
        "nvidia.com/gpu.count=8",
        "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.family=hopper",
        "nvidia.com/cuda.driver-version.full=550.54.15",
        "feature.node.kubernetes.io/pci-10de.present=true",
        "feature.node.kubernetes.io/custom-rdma.capable=true",
        "spokelet.io/rdma.ports-active=7",
        // mlx5_7's cable is unplugged in the fixture.
        "spokelet.io/node.healthy=false",
    ] {
        assert!(lines.contains(&want), "missing {want} in\n{labels}");
    }

    let table = output(&hgx_args(OutputFormat::Table, &lib));
    for section in [
        "Health",
        "CPU",
        "Memory",
        "NICs",
        "RDMA",
        "GPUs (source: nvml, driver 550.54.15, CUDA 12.4)",
        "Topology",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(section)),
            "missing {section}:\n{table}"
        );
    }
}

#[test]
fn no_nvml_wins_over_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shim(&dir);
    let mut args = hgx_args(OutputFormat::Json, &lib);
    args.discovery.no_nvml = true;
    let inv: Inventory = serde_json::from_str(&output(&args)).unwrap();
    assert_eq!(inv.gpus.source, GpuSource::PciScan);
    assert_eq!(inv.gpus.devices.len(), 8);
}

fn spokelet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spokelet"));
    // Only what the test sets applies.
    for var in [
        "SPOKELET_INVENTORY_OUTPUT",
        "SPOKELET_HOST_ROOT",
        "SPOKELET_NVML_LIBRARY",
        "SPOKELET_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn binary_on_this_machine() {
    let json = stdout_of(spokelet().args(["inventory", "--output", "json"]));
    let inv: Inventory = serde_json::from_str(&json).unwrap_or_else(|e| {
        panic!("`spokelet inventory --output json` did not print an inventory ({e}):\n{json}")
    });
    assert!(inv.cpu.threads >= 1);
    assert!(inv.memory.total_bytes.is_some());
    assert_eq!(inv.architecture, std::env::consts::ARCH);

    let table = stdout_of(spokelet().arg("inventory"));
    assert!(table.lines().any(|l| l == "CPU"), "{table}");

    let labels = stdout_of(spokelet().args(["inventory", "-o", "labels"]));
    assert!(
        labels.lines().any(|l| l.starts_with("spokelet.io/numa.nodes=")),
        "{labels}"
    );
}

#[test]
fn binary_takes_settings_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shim(&dir);
    let yaml = stdout_of(
        spokelet()
            .arg("inventory")
            .env("SPOKELET_INVENTORY_OUTPUT", "yaml")
            .env("SPOKELET_HOST_ROOT", fixture("hgx-h100"))
            .env("SPOKELET_NVML_LIBRARY", &lib),
    );
    let inv: Inventory = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(inv.hostname, "hgx-h100-01");
    assert_eq!(inv.gpus.source, GpuSource::Nvml);
    assert_eq!(inv.gpus.devices.len(), 8);
}

#[test]
fn binary_rejects_unknown_format() {
    let out = spokelet()
        .args(["inventory", "--output", "xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
}

#[test]
fn lean_binary_prints_the_same_inventory_as_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shim(&dir);
    let args: Vec<std::ffi::OsString> = vec![
        "--output".into(),
        "json".into(),
        "--root".into(),
        fixture("hgx-h100").into_os_string(),
        "--nvml-library".into(),
        lib.clone().into_os_string(),
    ];
    let mut lean = Command::new(env!("CARGO_BIN_EXE_spokelet-inventory"));
    for var in [
        "SPOKELET_INVENTORY_OUTPUT",
        "SPOKELET_HOST_ROOT",
        "SPOKELET_NVML_LIBRARY",
    ] {
        lean.env_remove(var);
    }
    let from_lean: Inventory = serde_json::from_str(&stdout_of(lean.args(&args))).unwrap();
    let from_agent: Inventory =
        serde_json::from_str(&stdout_of(spokelet().arg("inventory").args(&args))).unwrap();
    assert_eq!(from_lean.gpus.devices.len(), 8);
    assert_eq!(
        serde_json::to_value(&from_lean).unwrap(),
        serde_json::to_value(&from_agent).unwrap(),
        "both binaries run the same discovery"
    );
}
