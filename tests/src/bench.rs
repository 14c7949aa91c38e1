//! What the benchmarks share: the agent binary, process memory readings, percentiles and tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::HarnessError;

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

/// Runs `cargo build --release` in the workspace; returns `target/release`.
fn build_release() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/deps/<bench> -> target/release
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected location {}", exe.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace).args(["build", "--release"]);
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
        return Err(format!("cargo build --release exited with {status}"));
    }
    Ok(dir.to_path_buf())
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

/// Total CPU time used so far by the given processes (those that have exited count as zero).
pub fn total_cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| proc_cpu(*p)).sum()
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

/// Requests the API server has served so far, by `VERB resource[/subresource]`, read from its
/// `apiserver_request_total` counter (every client's requests, controllers' included). Two
/// readings subtracted with [`request_delta`] say what one phase of a benchmark cost in requests.
pub async fn request_counts(
    client: &kube::Client,
) -> Result<std::collections::BTreeMap<String, u64>, kube::Error> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let text = client.request_text(req).await?;
    Ok(parse_request_counts(&text))
}

/// The `apiserver_request_total` series of a Prometheus text page, summed by verb and resource.
fn parse_request_counts(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"'))
                .unwrap_or("")
        };
        let mut key = format!("{} {}", label("verb"), label("resource"));
        if !label("subresource").is_empty() {
            key = format!("{key}/{}", label("subresource"));
        }
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *out.entry(key).or_insert(0) += n;
    }
    out
}

/// `after - before`, keeping only the series that grew.
pub fn request_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// What the API server did during one phase of a benchmark: requests served (every client,
/// controllers included) and CPU per server process.
#[derive(Debug, Default)]
pub struct Cost {
    pub requests: std::collections::BTreeMap<String, u64>,
    pub cpu: std::collections::BTreeMap<String, Duration>,
}

/// A reading of the server's request counters and CPU at the start of a phase.
#[derive(Debug)]
pub struct Mark {
    /// Total CPU of the server processes.
    pub cpu: Duration,
    requests: std::collections::BTreeMap<String, u64>,
    per_process: std::collections::BTreeMap<String, Duration>,
}

impl Mark {
    /// Reads the counters of the API server behind `client` and the CPU of `server`'s processes.
    pub async fn take(client: &kube::Client, server: &[u32]) -> Mark {
        Mark {
            cpu: total_cpu(server),
            requests: request_counts(client)
                .await
                .unwrap_or_else(|e| panic!("API server metrics: {e}")),
            per_process: cpu_by_process(server),
        }
    }

    /// What the server did since this mark.
    pub async fn since(&self, client: &kube::Client, server: &[u32]) -> Cost {
        let now = request_counts(client)
            .await
            .unwrap_or_else(|e| panic!("API server metrics: {e}"));
        let cpu = cpu_by_process(server)
            .into_iter()
            .map(|(p, c)| {
                let d = c.saturating_sub(self.per_process.get(&p).copied().unwrap_or_default());
                (p, d)
            })
            .collect();
        Cost {
            requests: request_delta(&self.requests, &now),
            cpu,
        }
    }
}

/// Prints the requests and server CPU of phases side by side (one column per `(name, cost)`).
pub fn print_costs(title: &str, sides: &[(&str, &Cost)]) {
    let mut keys: Vec<&String> = sides.iter().flat_map(|(_, c)| c.requests.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut header = vec!["request"];
    header.extend(sides.iter().map(|(n, _)| *n));
    let mut rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut row = vec![(*k).clone()];
            row.extend(
                sides
                    .iter()
                    .map(|(_, c)| c.requests.get(*k).copied().unwrap_or(0).to_string()),
            );
            row
        })
        .collect();
    let mut total = vec!["total".to_string()];
    total.extend(
        sides
            .iter()
            .map(|(_, c)| c.requests.values().sum::<u64>().to_string()),
    );
    rows.push(total);
    let mut procs: Vec<&String> = sides.iter().flat_map(|(_, c)| c.cpu.keys()).collect();
    procs.sort();
    procs.dedup();
    for p in procs {
        let mut row = vec![format!("CPU: {p}")];
        row.extend(
            sides
                .iter()
                .map(|(_, c)| format!("{:.2} s", c.cpu.get(p).copied().unwrap_or_default().as_secs_f64())),
        );
        rows.push(row);
    }
    println!();
    println!("{title}");
    print_table(&header, &rows);
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

/// The resource of a built-in object from its apiVersion and kind (plural as kube guesses it).
pub fn resource_of(obj: &serde_json::Value) -> kube::api::ApiResource {
    let api_version = obj["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().unwrap_or("");
    kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind))
}

/// Creates one object through the API as `field_manager`; returns its UID. Panics on failure
/// (a benchmark whose floor fails measures nothing).
async fn create_raw(client: &kube::Client, obj: serde_json::Value, field_manager: Option<&str>) -> String {
    let ar = resource_of(&obj);
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
    let o: kube::api::DynamicObject =
        serde_json::from_value(obj).unwrap_or_else(|e| panic!("not an object: {e}"));
    let pp = kube::api::PostParams {
        dry_run: false,
        field_manager: field_manager.map(String::from),
    };
    let made = kube::Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
        .create(&pp, &o)
        .await
        .unwrap_or_else(|e| panic!("floor create failed: {e}"));
    made.metadata.uid.unwrap_or_default()
}

/// The raw-create floor: `objects` created straight through the API, `concurrency` at a time,
/// and nothing else.
pub async fn raw_creates(client: &kube::Client, objects: Vec<serde_json::Value>, concurrency: usize) {
    use futures::StreamExt;
    futures::stream::iter(objects)
        .for_each_concurrent(concurrency, |o| async move {
            create_raw(client, o, None).await;
        })
        .await;
}

/// Label of the objects the OCM-shaped floor creates (not the agent's, so its watches never
/// see them).
const OCM_FLOOR_LABEL: &str = "bench.spokelet.io/ocm-floor";

/// The OCM-shaped floor: the requests any agent keeping OCM's AppliedManifestWork record and
/// correcting drift by watch must send, sent raw and nothing else. Per work (one entry of
/// `works`, `concurrency` works at a time): the record created with its intent, the work's
/// objects created one after another, labelled and owned by it, then the record's status
/// written with their UIDs; meanwhile a label-selected watch is open on each kind. The
/// AppliedManifestWork CRD must be installed; records are named `<record_prefix>-<i>`.
pub async fn ocm_shaped_floor(
    client: &kube::Client,
    works: Vec<Vec<serde_json::Value>>,
    record_prefix: &str,
    concurrency: usize,
) {
    use futures::StreamExt;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut kinds: Vec<kube::api::ApiResource> = works.iter().flatten().map(resource_of).collect();
    kinds.sort_by(|a, b| (&a.group, &a.plural).cmp(&(&b.group, &b.plural)));
    kinds.dedup_by(|a, b| a.group == b.group && a.plural == b.plural);
    for ar in kinds {
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &ar);
        let stop = stop.clone();
        tokio::spawn(async move {
            let wp = kube::api::WatchParams::default().labels(OCM_FLOOR_LABEL);
            let Ok(events) = api.watch(&wp, "0").await else {
                return;
            };
            let mut events = events.boxed();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.next() => if e.is_none() { return },
                }
            }
        });
    }
    // Let the watches open before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = kube::api::ApiResource {
        group: "work.open-cluster-management.io".into(),
        version: "v1".into(),
        api_version: "work.open-cluster-management.io/v1".into(),
        kind: "AppliedManifestWork".into(),
        plural: "appliedmanifestworks".into(),
    };
    let records: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &records);
    futures::stream::iter(works.into_iter().enumerate())
        .for_each_concurrent(concurrency, |(i, objects)| {
            let records = records.clone();
            async move { ocm_floor_work(client, &records, &format!("{record_prefix}-{i}"), objects).await }
        })
        .await;
    stop.cancel();
}

/// One work of [`ocm_shaped_floor`].
async fn ocm_floor_work(
    client: &kube::Client,
    records: &kube::Api<kube::api::DynamicObject>,
    name: &str,
    objects: Vec<serde_json::Value>,
) {
    use serde_json::json;
    let entries: Vec<serde_json::Value> = objects
        .iter()
        .map(|o| {
            let ar = resource_of(o);
            json!({"group": ar.group, "version": ar.version, "resource": ar.plural,
                "namespace": o["metadata"]["namespace"], "name": o["metadata"]["name"]})
        })
        .collect();
    let record: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "work.open-cluster-management.io/v1", "kind": "AppliedManifestWork",
        "metadata": {"name": name,
            "annotations": {"work.spokelet.io/intended-resources": serde_json::to_string(&entries).unwrap_or_default()}},
        "spec": {"hubHash": "ocm-floor", "manifestWorkName": name, "agentID": "bench"}}))
    .unwrap_or_else(|e| panic!("not a record: {e}"));
    let record = records
        .create(&kube::api::PostParams::default(), &record)
        .await
        .unwrap_or_else(|e| panic!("floor record create failed: {e}"));
    let owner = json!([{"apiVersion": "work.open-cluster-management.io/v1", "kind": "AppliedManifestWork",
        "name": name, "uid": record.metadata.uid}]);
    let mut status = Vec::with_capacity(entries.len());
    for (mut o, mut entry) in objects.into_iter().zip(entries) {
        o["metadata"]["labels"] = json!({OCM_FLOOR_LABEL: "true"});
        o["metadata"]["ownerReferences"] = owner.clone();
        entry["uid"] = json!(create_raw(client, o, Some("ocm-floor")).await);
        status.push(entry);
    }
    records
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"appliedResources": status}})),
        )
        .await
        .unwrap_or_else(|e| panic!("floor record status write failed: {e}"));
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
    fn request_counts_sum_by_verb_and_resource() {
        let page = concat!(
            "# TYPE apiserver_request_total counter\n",
            "apiserver_request_total{code=\"201\",component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"} 5\n",
            "apiserver_request_total{code=\"409\",component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"} 2\n",
            "apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"apps\",resource=\"deployments\",scope=\"namespace\",subresource=\"status\",verb=\"PUT\",version=\"v1\"} 3\n",
            "apiserver_request_duration_seconds_count{verb=\"POST\"} 9\n",
        );
        let counts = parse_request_counts(page);
        assert_eq!(counts.get("POST configmaps"), Some(&7));
        assert_eq!(counts.get("PUT deployments/status"), Some(&3));
        assert_eq!(counts.len(), 2);
        let later = parse_request_counts(&page.replace("} 5", "} 9"));
        let d = request_delta(&counts, &later);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![("POST configmaps".to_string(), 4)]
        );
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
