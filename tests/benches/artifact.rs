//! Artifact pulls against `skopeo copy` on the real registry (prints tables):
//!
//! 1. pull + verify + unpack of a 50 MB artifact by `spokelet artifact pull` (a fresh cache
//!    each run, the agent's own code path) against `skopeo copy docker://... dir:...` of the
//!    same artifact, in the same run: wall time and peak RSS per process; then the same with a
//!    500 MB artifact (fewer runs), where peak memory must still be under 32 MiB;
//! 2. the unchanged-artifact check the agent makes on every interval (`Registry::refresh`
//!    with the artifact it holds): requests per check, read from the registry's access log,
//!    and time per check.
//!
//! Run with `cargo bench -p spokelet-e2e --bench artifact`. `SPOKELET_BENCH_RUNS` overrides
//! the runs of the 50 MB scenario (default 5); `SPOKELET_BENCH_LARGE_MB` the large size
//! (default 500, 0 skips it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::RngCore;
use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::registry::{ArtifactRef, Registry, RegistryAuth};
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_e2e::OciRegistry;
use spokelet_e2e::bench::{ms, peak_rss_kib, percentile, print_table, spokelet_binary, wall_time};

const UNCHANGED_CHECKS: usize = 200;
/// The memory goal for a pull, whatever the artifact's size.
const MAX_PULL_RSS_MIB: f64 = 32.0;

fn runs() -> usize {
    std::env::var("SPOKELET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Writes `mb` MiB of random (incompressible) files under `dir`, 1 MiB each, in a few
/// directories: the compressed artifact is as large as the content.
fn random_tree(dir: &Path, mb: usize) {
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1024 * 1024];
    for i in 0..mb {
        let sub = dir.join(format!("part-{}", i % 8));
        std::fs::create_dir_all(&sub).unwrap();
        rng.fill_bytes(&mut buf);
        std::fs::write(sub.join(format!("blob-{i:04}.bin")), &buf).unwrap();
    }
}

struct Row {
    tool: String,
    runs: usize,
    median: Duration,
    p90: Duration,
    rss_mib: f64,
}

/// Wall time and peak RSS of `make()` over `runs` runs, each with `reset()` before it.
fn measure(tool: &str, runs: usize, reset: &dyn Fn(), make: &dyn Fn() -> Command) -> Row {
    let mut walls = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        reset();
        walls.push(wall_time(&mut make()).unwrap_or_else(|e| panic!("{tool}: {e}")));
        reset();
        rss = rss.max(peak_rss_kib(&mut make()).unwrap_or_else(|e| panic!("{tool}: {e}")));
    }
    walls.sort_unstable();
    Row {
        tool: tool.to_string(),
        runs,
        median: percentile(&walls, 0.5),
        p90: percentile(&walls, 0.9),
        rss_mib: rss as f64 / 1024.0,
    }
}

/// One size: push it, then time spokelet's pull and skopeo's copy, interleaved.
async fn pull_scenario(registry: &OciRegistry, mb: usize, runs: usize) -> Vec<Row> {
    let src = tempfile::tempdir().unwrap();
    random_tree(src.path(), mb);
    let url = format!("oci://{}/bench/blob{mb}", registry.host());
    let client = Registry::new(true, RegistryAuth::Anonymous);
    client
        .push_dir(&url, "v1", src.path(), "bench", "v1")
        .await
        .unwrap();
    drop(src);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let copy = work.path().join("copy");
    let reset = || {
        let _ = std::fs::remove_dir_all(&cache);
        let _ = std::fs::remove_dir_all(&copy);
    };
    let bin = spokelet_binary().unwrap_or_else(|e| panic!("{e}"));
    let reference = format!("{url}:v1");
    let spokelet = || {
        let mut c = Command::new(&bin);
        c.args(["artifact", "pull", &reference, "--insecure", "--cache"])
            .arg(&cache);
        // The default 100 MiB layer limit would refuse the large artifact.
        c.arg(format!(
            "--artifact-max-compressed-bytes={}",
            (mb + 16) * 1024 * 1024
        ));
        c
    };
    let docker = format!("docker://{}/bench/blob{mb}:v1", registry.host());
    let skopeo = || {
        let mut c = Command::new("skopeo");
        c.args(["--insecure-policy", "copy", "--src-tls-verify=false", &docker])
            .arg(format!("dir:{}", copy.display()));
        c
    };
    // Once untimed, to check both really fetch it.
    reset();
    let out = spokelet().output().unwrap();
    assert!(
        out.status.success(),
        "spokelet pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = skopeo().output().unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = measure(
        &format!("spokelet artifact pull ({mb} MB: fetch, verify, unpack)"),
        runs,
        &reset,
        &spokelet,
    );
    let theirs = measure(
        &format!("skopeo copy docker:// dir: ({mb} MB: fetch)"),
        runs,
        &reset,
        &skopeo,
    );
    vec![ours, theirs]
}

/// Requests and time per unchanged check.
async fn unchanged_checks(registry: &OciRegistry) -> (f64, Duration, Duration) {
    let src = tempfile::tempdir().unwrap();
    random_tree(src.path(), 1);
    let url = format!("oci://{}/bench/unchanged", registry.host());
    let client = Registry::new(true, RegistryAuth::Anonymous);
    client
        .push_dir(&url, "v1", src.path(), "bench", "v1")
        .await
        .unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let wanted = ArtifactRef::tag("v1");
    let known = client.pull(&url, &wanted, &cache, &limits).await.unwrap();
    // Warm the connection and token cache as a running agent has them.
    client
        .refresh(&url, &wanted, &cache, &limits, Some(&known), None)
        .await
        .unwrap();
    let requests = || registry.v2_requests().len();
    let before = requests();
    let mut times = Vec::new();
    for _ in 0..UNCHANGED_CHECKS {
        let t = Instant::now();
        let p = client
            .refresh(&url, &wanted, &cache, &limits, Some(&known), None)
            .await
            .unwrap();
        times.push(t.elapsed());
        assert!(!p.downloaded && p.manifest == known.manifest);
    }
    // The registry writes its access log line after answering; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_check = (requests() - before) as f64 / UNCHANGED_CHECKS as f64;
    times.sort_unstable();
    (per_check, percentile(&times, 0.5), percentile(&times, 0.99))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let registry = OciRegistry::start().await.expect("registry starts");
    let large: usize = std::env::var("SPOKELET_BENCH_LARGE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut rows = pull_scenario(&registry, 50, runs()).await;
    if large > 0 {
        rows.extend(pull_scenario(&registry, large, 2).await);
    }
    println!("\nArtifact pull against skopeo (same registry, same run; peak RSS per process)\n");
    print_table(
        &["tool", "runs", "median", "p90", "peak RSS MiB"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.tool.clone(),
                    r.runs.to_string(),
                    ms(r.median),
                    ms(r.p90),
                    format!("{:.1}", r.rss_mib),
                ]
            })
            .collect::<Vec<_>>(),
    );
    for pair in rows.chunks(2) {
        let [ours, theirs] = pair else { continue };
        println!(
            "{}: {:.2}x skopeo's time; peak RSS {:.1} MiB (goal < {MAX_PULL_RSS_MIB} MiB: {})",
            ours.tool,
            ours.median.as_secs_f64() / theirs.median.as_secs_f64(),
            ours.rss_mib,
            if ours.rss_mib < MAX_PULL_RSS_MIB {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let (per_check, p50, p99) = unchanged_checks(&registry).await;
    println!("\nUnchanged artifact, {UNCHANGED_CHECKS} checks (the agent's per-interval check)\n");
    print_table(
        &["requests per check", "p50", "p99"],
        &[vec![format!("{per_check:.2}"), ms(p50), ms(p99)]],
    );
    registry.stop().await;
}
