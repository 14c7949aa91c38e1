//! What the benchmarks share: the agent binary, process memory readings, percentiles and tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::HarnessError;

mod floors;
mod kubectl;
mod measure;
mod server_cost;

pub use floors::{ocm_shaped_floor, raw_creates, resource_of};
pub use kubectl::{kubectl, kubectl_apply};
pub use measure::{peak_rss_kib, wall_time};
pub use server_cost::{Cost, Mark, print_costs, request_counts, request_delta};

/// The `spokelet` binary, for benchmarks that run the agent as its own process (so its memory
/// is measured alone). See [`release_binary`].
pub fn spokelet_binary() -> Result<PathBuf, HarnessError> {
    release_binary("spokelet")
}

/// A binary of the workspace as `cargo build --release` makes it, the build an operator ships:
/// `SPOKELET_BIN_DIR` wins; otherwise `cargo build --release` runs first (a no-op when up to
/// date). The benchmark must not build the binary itself with other options: a different
/// package selection or profile resolves other features and rebuilds the agent, and the
/// figures would then be of a binary nobody runs.
pub fn release_binary(name: &str) -> Result<PathBuf, HarnessError> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Ok(dir) = std::env::var("SPOKELET_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let dir = BUILT
        .get_or_init(build_release)
        .clone()
        .map_err(HarnessError::AgentBuild)?;
    Ok(dir.join(name))
}

/// The node role's lean binary as the image ships it: `cargo build --profile release-small
/// --bin spokelet-node -p spokelet-node` (see the workspace's Cargo.toml), or `SPOKELET_BIN_DIR`'s.
pub fn node_binary() -> Result<PathBuf, HarnessError> {
    if let Ok(dir) = std::env::var("SPOKELET_BIN_DIR") {
        return Ok(PathBuf::from(dir).join("spokelet-node"));
    }
    cargo_build(&[
        "--profile",
        "release-small",
        "--bin",
        "spokelet-node",
        "-p",
        "spokelet-node",
    ])
    .map_err(HarnessError::AgentBuild)?;
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release-small/spokelet-node"))
}

/// Runs `cargo build --release` in the workspace; returns `target/release`.
fn build_release() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/deps/<bench> -> target/release
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected location {}", exe.display()))?;
    cargo_build(&["--release"])?;
    Ok(dir.to_path_buf())
}

/// `cargo build ARGS` in the workspace.
fn cargo_build(args: &[&str]) -> Result<(), String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace).arg("build").args(args);
    // Cargo runs this benchmark with variables describing it (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Build scripts such as ring's ask to rerun when those change, so
    // passing them on would rebuild the TLS stack and the agent instead of reusing the build.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if is_per_target_cargo_var(&name) {
            cmd.env_remove(&name);
        }
    }
    let status = cmd.status().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("cargo build {} exited with {status}", args.join(" ")));
    }
    Ok(())
}

/// Whether `name` is one of the variables cargo sets for the target it runs (as opposed to
/// settings of cargo itself, such as `CARGO_HOME` or `CARGO_TARGET_DIR`, which must be kept).
fn is_per_target_cargo_var(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_CFG_",
    ];
    const NAMES: &[&str] = &["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

/// A `VmXXX:` field of `/proc/<pid>/status`, in KiB (`VmHWM` = peak RSS, `VmRSS` = now).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat` (`pid` 0 means
/// this process). Clock ticks are taken as 100 per second, the value on every Linux
/// architecture this runs on (USER_HZ).
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after its closing parenthesis are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 11 and 12 after the state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time used so far by each of the given processes, by command name (`/proc/<pid>/comm`).
pub fn cpu_by_process(pids: &[u32]) -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    for pid in pids {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|_| pid.to_string());
        *out.entry(name).or_insert(Duration::ZERO) += proc_cpu(*pid).unwrap_or_default();
    }
    out
}

/// The `p` quantile (0.0..=1.0) of sorted samples (nearest rank); zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Milliseconds with two decimals, for table cells.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Prints a left-aligned first column and right-aligned others, with a rule under the header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_string()).collect()];
    cells.extend(rows.iter().cloned());
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in cells.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  "));
        if i == 0 {
            println!(
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1))
            );
        }
    }
}

/// Starts the real `spokelet run --hub-transport grpc` against the test hub at `hub_url` as
/// `cluster`, with a client certificate from `pki` and its log in `dir/agent.log`; the
/// certificate files go to `dir` too, which must outlive the process.
pub fn spawn_grpc_agent(
    binary: &Path,
    hub_url: &str,
    pki: &crate::cloudevents_hub::HubPki,
    cluster: &str,
    kubeconfig: &Path,
    dir: &Path,
) -> Result<std::process::Child, crate::cloudevents_hub::TestHubError> {
    let identity = pki.client(cluster, &[])?;
    let file = |name: &str, text: &str| -> std::io::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let ca = file("ca.crt", pki.serving_ca.cert_pem())?;
    let cert = file("tls.crt", &identity.cert_pem)?;
    let key = file("tls.key", &identity.key_pem)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = std::process::Command::new(binary)
        .args([
            "run",
            "--hub-transport",
            "grpc",
            "--hub-url",
            hub_url,
            "--cluster-name",
            cluster,
        ])
        .arg("--hub-ca-file")
        .arg(&ca)
        .arg("--hub-client-cert-file")
        .arg(&cert)
        .arg("--hub-client-key-file")
        .arg(&key)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--admin-addr", "127.0.0.1:0", "--log-level", "warn"])
        .env_remove("SPOKELET_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(child)
}

/// How a drift sample disturbs an applied ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Merge-patch its `data.index`.
    Edit,
    /// Delete it.
    Delete,
}

/// One drift sample: tampers with ConfigMap `name` (whose `data.index` the agent applies as
/// `index`), then polls every 2 ms until the agent has put it back (the value restored, and after
/// a delete a new, live object). Returns the time from the change to the correction; panics
/// after a minute. Callers should pause between samples so they stay independent.
pub async fn drift_sample(
    api: &kube::Api<k8s_openapi::api::core::v1::ConfigMap>,
    name: &str,
    index: &str,
    how: Tamper,
) -> Duration {
    use kube::api::{DeleteParams, Patch, PatchParams};
    let fail = |e: kube::Error| -> ! { panic!("drift sample on {name}: {e}") };
    let t = std::time::Instant::now();
    let old_uid = match how {
        Tamper::Edit => {
            let patch = serde_json::json!({"data": {"index": "tampered"}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| fail(e));
            None
        }
        Tamper::Delete => {
            let uid = api.get(name).await.unwrap_or_else(|e| fail(e)).metadata.uid;
            api.delete(name, &DeleteParams::default())
                .await
                .unwrap_or_else(|e| fail(e));
            uid
        }
    };
    loop {
        if let Some(c) = api.get_opt(name).await.unwrap_or_else(|e| fail(e)) {
            let restored = c.data.as_ref().and_then(|d| d.get("index")).map(String::as_str) == Some(index);
            if restored && c.metadata.uid != old_uid && c.metadata.deletion_timestamp.is_none() {
                return t.elapsed();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "drift on {name} never corrected"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The test CloudEvents hub (heartbeat 10 s, the reference hub's default) and the real agent
/// binary subscribed to it as `cluster`, its files and log in `dir`.
pub async fn start_hub_and_agent(
    binary: &Path,
    cluster: &str,
    kubeconfig: &Path,
    dir: &Path,
) -> (crate::cloudevents_hub::TestHub, std::process::Child) {
    use crate::cloudevents_hub::{HubPki, TestHub, TestHubOptions};
    let pki = HubPki::generate().unwrap_or_else(|e| panic!("hub PKI: {e}"));
    let mut opts = TestHubOptions::new(&pki).unwrap_or_else(|e| panic!("hub options: {e}"));
    opts.heartbeat = Duration::from_secs(10);
    let hub = TestHub::start(opts)
        .await
        .unwrap_or_else(|e| panic!("hub start: {e}"));
    let agent = spawn_grpc_agent(binary, &hub.url(), &pki, cluster, kubeconfig, dir)
        .unwrap_or_else(|e| panic!("agent start: {e}"));
    while hub.subscriber_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (hub, agent)
}

/// When the hub received, after its first `before` events, a spec resync request listing
/// exactly `works` works; panics after two minutes without one.
pub async fn resync_listing(
    hub: &crate::cloudevents_hub::TestHub,
    before: usize,
    works: usize,
) -> std::time::Instant {
    let give_up = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let found = hub.received_since(before).into_iter().find(|r| {
            r.event.r#type.ends_with("spec.resync_request")
                && r.json()
                    .and_then(|j| j["resourceVersions"].as_array().map(Vec::len))
                    .is_some_and(|n| n == works)
        });
        if let Some(r) = found {
            return r.at;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "no resync listing {works} works after the hub restarted"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_per_target_cargo_variables_are_dropped() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_BIN_EXE_spokelet",
            "OUT_DIR",
        ] {
            assert!(is_per_target_cargo_var(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_TERM_COLOR",
            "PATH",
        ] {
            assert!(!is_per_target_cargo_var(name), "{name}");
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn reads_this_process_memory() {
        let pid = std::process::id();
        // RSS first: other test threads may grow the process between the two reads.
        let rss = proc_status_kib(pid, "VmRSS").unwrap();
        let hwm = proc_status_kib(pid, "VmHWM").unwrap();
        assert!(hwm >= rss && rss > 0, "VmHWM {hwm} VmRSS {rss}");
        assert_eq!(proc_status_kib(pid, "VmNope"), None);
    }
}
