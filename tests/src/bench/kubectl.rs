//! `kubectl apply --server-side`, the reference the apply benchmarks run beside the engine.

use std::path::Path;
use std::time::{Duration, Instant};

/// The kubectl binary: `KUBECTL`, else the suite's own (the servers' release).
pub fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| {
        crate::Binary::Kubectl
            .find()
            .map_or_else(|_| "kubectl".into(), |p| p.display().to_string())
    })
}

/// Runs `kubectl apply --server-side`; returns its wall time and its own CPU time (bash's `times`
/// reports the CPU of the children it waited for).
pub fn kubectl_apply(kubeconfig: &Path, file: &Path) -> (Duration, Duration) {
    let t0 = Instant::now();
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            r#""$0" --kubeconfig "$1" apply --server-side --field-manager bench-kubectl -f "$2" >/dev/null && times"#,
        ])
        .arg(kubectl())
        .arg(kubeconfig)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"));
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `times` prints the shell's user/sys times, then its children's: "0m1.234s 0m0.056s".
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cpu = stdout
        .lines()
        .nth(1)
        .map(|l| l.split_whitespace().filter_map(parse_times).sum())
        .unwrap_or_default();
    (took, cpu)
}

/// Parses one of bash's `times` values ("1m2.345s").
fn parse_times(v: &str) -> Option<Duration> {
    let (m, s) = v.strip_suffix('s')?.split_once('m')?;
    Some(Duration::from_secs_f64(
        m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?,
    ))
}
