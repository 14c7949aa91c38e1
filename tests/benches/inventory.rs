//! Wall time and peak RSS of `spokelet inventory --output json` against `lshw -json`.
//!
//! Every run is a fresh process. Wall time comes from plain runs (spawn,
//! `wait4`). Peak RSS comes from separate runs in which the child is traced
//! and its `VmHWM` read at exit (see [`peak_rss_kib`] for why `ru_maxrss`
//! will not do). Scenarios: this machine, the `hgx-h100` fixture with the
//! NVML test double and without NVML (PCI scan), and `lshw -json` on this
//! machine, in the same run.
//! `SPOKELET_BENCH_RUNS` overrides the number of runs (default 20).
//!
//! Run with `cargo bench -p spokelet-e2e --bench inventory`. It measures the binaries that
//! `cargo build --release` makes (built first if they are not up to date).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use spokelet_e2e::bench::{ms, peak_rss_kib, percentile, print_table, release_binary, wall_time};
use spokelet_hardware::Inventory;
use spokelet_hardware::testing::{ShimVariant, build_nvml_shim};

/// Runs per scenario unless `SPOKELET_BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 20;
/// Unmeasured runs first, so that every scenario starts with a warm page
/// cache and none pays for the first load of its binary.
const WARMUP_RUNS: usize = 2;

/// The speed and memory goals versus lshw.
const TARGET_SPEEDUP: f64 = 10.0;
const TARGET_RSS_RATIO: f64 = 0.5;

#[derive(Clone)]
struct Stats {
    name: String,
    runs: usize,
    median: Duration,
    p90: Duration,
    max_rss_kib: u64,
}

fn bench(name: &str, runs: usize, make: &dyn Fn() -> Command) -> Result<Stats, String> {
    for _ in 0..WARMUP_RUNS {
        wall_time(&mut make())?;
    }
    let mut walls = Vec::with_capacity(runs);
    let mut max_rss_kib = 0;
    // Interleaved, so that both measurements see the same machine load.
    for _ in 0..runs {
        walls.push(wall_time(&mut make())?);
        max_rss_kib = max_rss_kib.max(peak_rss_kib(&mut make())?);
    }
    walls.sort_unstable();
    Ok(Stats {
        name: name.to_owned(),
        runs,
        median: percentile(&walls, 0.5),
        p90: percentile(&walls, 0.9),
        max_rss_kib,
    })
}

/// Checks once, outside the timings, that the command really prints an
/// inventory: timing a binary that prints nothing would be meaningless.
fn check_inventory(mut cmd: Command) -> Result<Inventory, String> {
    let out = cmd.output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!("{cmd:?} did not print an inventory as JSON ({e}); is `spokelet inventory` wired into main?")
    })
}

/// The full agent binary: `spokelet inventory --output json ARGS`.
fn spokelet(args: &[&str]) -> Command {
    let mut cmd = Command::new(release_binary("spokelet").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("inventory");
    with_inventory_args(cmd, args)
}

/// The lean discovery binary: `spokelet-inventory --output json ARGS`.
fn spokelet_inventory(args: &[&str]) -> Command {
    let bin = release_binary("spokelet-inventory").unwrap_or_else(|e| panic!("{e}"));
    with_inventory_args(Command::new(bin), args)
}

fn with_inventory_args(mut cmd: Command, args: &[&str]) -> Command {
    cmd.args(["--output", "json"]).args(args);
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

fn mib(kib: u64) -> String {
    // Display only.
    #[allow(clippy::cast_precision_loss)]
    let m = kib as f64 / 1024.0;
    format!("{m:.1}")
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

fn print_results(rows: &[Stats], lshw: Option<&Stats>) {
    let header = [
        "command",
        "runs",
        "median ms",
        "p90 ms",
        "max RSS MiB",
        "speed vs lshw",
        "RSS vs lshw",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (speed, rss) = match lshw {
                Some(l) => (
                    format!("{:.1}x", l.median.as_secs_f64() / r.median.as_secs_f64()),
                    format!("{:.2}", ratio(r.max_rss_kib, l.max_rss_kib)),
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            vec![
                r.name.clone(),
                r.runs.to_string(),
                ms(r.median),
                ms(r.p90),
                mib(r.max_rss_kib),
                speed,
                rss,
            ]
        })
        .collect();
    print_table(&header, &cells);
}

fn lshw_path() -> Option<PathBuf> {
    ["/usr/bin/lshw", "/usr/sbin/lshw", "/bin/lshw", "/sbin/lshw"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run() -> Result<(), String> {
    let runs = std::env::var("SPOKELET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_RUNS);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/tests/fixtures/hgx-h100");
    let shim_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let shim = build_nvml_shim(ShimVariant::H100, shim_dir.path()).map_err(|e| e.to_string())?;
    let fixture_args = [
        "--root",
        fixture.to_str().ok_or("fixture path is not UTF-8")?,
        "--nvml-library",
        shim.to_str().ok_or("shim path is not UTF-8")?,
    ];

    let no_nvml_args = [fixture_args[0], fixture_args[1], "--no-nvml"];
    let host = check_inventory(spokelet(&[]))?;
    for cmd in [spokelet(&fixture_args), spokelet_inventory(&fixture_args)] {
        let hgx = check_inventory(cmd)?;
        if hgx.gpus.devices.len() != 8 || hgx.rdma.len() != 8 {
            return Err("the hgx-h100 fixture did not give 8 GPUs and 8 HCAs".to_owned());
        }
    }
    println!(
        "this machine: {} ({} threads, {} NICs, {} GPUs via {}); {runs} runs per command after {WARMUP_RUNS} warm-up runs\n",
        host.hostname,
        host.cpu.threads,
        host.nics.len(),
        host.gpus.devices.len(),
        host.gpus.source
    );

    let mut rows = vec![
        bench("spokelet inventory -o json (this machine)", runs, &|| {
            spokelet(&[])
        })?,
        bench("spokelet inventory -o json (hgx-h100 + NVML shim)", runs, &|| {
            spokelet(&fixture_args)
        })?,
        bench("spokelet inventory -o json (hgx-h100, --no-nvml)", runs, &|| {
            spokelet(&no_nvml_args)
        })?,
        bench("spokelet-inventory -o json (this machine)", runs, &|| {
            spokelet_inventory(&[])
        })?,
        bench("spokelet-inventory -o json (hgx-h100 + NVML shim)", runs, &|| {
            spokelet_inventory(&fixture_args)
        })?,
        bench("spokelet-inventory -o json (hgx-h100, --no-nvml)", runs, &|| {
            spokelet_inventory(&no_nvml_args)
        })?,
    ];
    let lshw = match lshw_path() {
        Some(path) => {
            let stats = bench("lshw -json (this machine)", runs, &|| {
                let mut cmd = Command::new(&path);
                cmd.arg("-json");
                cmd
            })?;
            Some(stats)
        }
        None => {
            println!("lshw is not installed (apt-get install lshw); no comparison\n");
            None
        }
    };
    rows.extend(lshw.clone());
    print_results(&rows, lshw.as_ref());

    let Some(l) = &lshw else {
        return Ok(());
    };
    println!();
    // Rows 0 and 2 are the two binaries on this machine, the like-for-like comparison.
    for ours in [&rows[0], &rows[2]] {
        let speedup = l.median.as_secs_f64() / ours.median.as_secs_f64();
        let rss = ratio(ours.max_rss_kib, l.max_rss_kib);
        let ok = speedup >= TARGET_SPEEDUP && rss < TARGET_RSS_RATIO;
        println!(
            "target for {}: >= {TARGET_SPEEDUP:.0}x faster and < {TARGET_RSS_RATIO} of lshw's peak RSS: {:.1}x, {rss:.2} -> {}",
            ours.name,
            speedup,
            if ok { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; there are no filters to honour.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inventory benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
