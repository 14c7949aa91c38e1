//! Joining a hub: spokelet beside OCM's own registration agent (`registration agent`, the
//! klusterlet's half that joins), on the same real OCM hub and spoke, both as operators run
//! them (spokelet's release binary), printing tables:
//!
//! 1. join: from the process's start to its ManagedCluster `ManagedClusterConditionAvailable`
//!    True, the bootstrap request approved by the hub itself (OCM's `ManagedClusterAutoApproval`
//!    with the bootstrap users listed), a new cluster each run, over the hub's Kubernetes API
//!    and over OCM's gRPC server (`--registration-auth=grpc` for OCM's agent);
//! 2. idle cost: the requests each joined, idle agent sends the hub over a quiet window, read
//!    from the hub API server's audit log by user and scaled to an hour, by verb and resource.
//!    spokelet is also the work agent: its watch of ManifestWorks is in its count; OCM's
//!    registration agent alone has none. Over gRPC the hub's API server sees OCM's gRPC server
//!    act for every agent, so only the Kubernetes-hub agents are counted.
//!
//! A renewal with work updates in flight is timed by the `hub_join` tests, which print it.
//! Run with `cargo bench -p spokelet-e2e --bench registration`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use spokelet_e2e::bench::{percentile, print_table, release_binary};
use spokelet_e2e::ocm::{OcmHub, OcmHubOptions, condition_status, managed_clusters};
use spokelet_e2e::ocm_hub::install_ocm_crd;
use spokelet_e2e::{Binary, ClusterOptions, create_namespace, shared_spoke};

/// Joins timed per agent.
const RUNS: usize = 5;
/// The joined agents are left alone this long before their requests are counted...
const SETTLE: Duration = Duration::from_secs(15);
/// ...over this window (four lease renewals at OCM's default 60 s).
const IDLE: Duration = Duration::from_secs(240);
/// The goal for a join to `Available` once approved.
const TARGET: Duration = Duration::from_secs(5);

/// OCM's agent's namespace when it cannot read its pod's.
const OCM_NAMESPACE: &str = "open-cluster-management-agent";

const SPOKELET_BOOTSTRAP: &str = "system:bootstrap:bench-spokelet";
const OCM_BOOTSTRAP: &str = "system:bootstrap:bench-ocm";
const SPOKELET_GRPC_BOOTSTRAP: &str = "system:bootstrap:bench-spokelet-grpc";
const OCM_GRPC_BOOTSTRAP: &str = "system:bootstrap:bench-ocm-grpc";

/// A child process killed when dropped, its output in a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(program: &Path, args: &[String], log: PathBuf, tmp: &Path) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            // library-go writes a self-signed serving certificate under $TMPDIR.
            .env("TMPDIR", tmp)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        Proc { child, log }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Which agent joins, over which wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Joiner {
    Spokelet,
    Ocm,
    SpokeletGrpc,
    OcmGrpc,
}

impl Joiner {
    const ALL: [Joiner; 4] = [
        Joiner::Spokelet,
        Joiner::Ocm,
        Joiner::SpokeletGrpc,
        Joiner::OcmGrpc,
    ];

    fn label(self) -> &'static str {
        match self {
            Joiner::Spokelet => "spokelet, Kubernetes hub",
            Joiner::Ocm => "OCM registration agent, Kubernetes hub",
            Joiner::SpokeletGrpc => "spokelet, OCM's gRPC server",
            Joiner::OcmGrpc => "OCM registration agent, OCM's gRPC server",
        }
    }

    fn agent_id(self) -> &'static str {
        match self {
            Joiner::Spokelet => "spokelet",
            Joiner::Ocm => "ocm",
            Joiner::SpokeletGrpc => "spokeletg",
            Joiner::OcmGrpc => "ocmg",
        }
    }

    /// Whether its idle requests can be told apart on the hub: over gRPC the hub API sees
    /// OCM's server, not the agent.
    fn on_kube_hub(self) -> bool {
        matches!(self, Joiner::Spokelet | Joiner::Ocm)
    }
}

/// What a join needs.
struct Setup {
    spokelet: PathBuf,
    ocm: PathBuf,
    spoke_kubeconfig: PathBuf,
    spoke_url: String,
    spokelet_bootstrap: PathBuf,
    ocm_bootstrap: PathBuf,
    spokelet_grpc_bootstrap: PathBuf,
    ocm_grpc_bootstrap: PathBuf,
    dir: PathBuf,
}

impl Setup {
    /// Starts `who` joining as `cluster`, its namespace on the spoke made.
    async fn start(&self, who: Joiner, cluster: &str, spoke: &kube::Client) -> Proc {
        let ns = match who {
            Joiner::Spokelet | Joiner::SpokeletGrpc => format!("{cluster}-agent"),
            // OCM's agent keeps its Secret in its component namespace, which outside a pod is
            // always this one; the previous run's Secret is removed so each run joins afresh.
            Joiner::Ocm | Joiner::OcmGrpc => OCM_NAMESPACE.to_string(),
        };
        if let Err(e) = create_namespace(spoke, &ns).await
            && !e.to_string().contains("already exists")
        {
            panic!("{e}");
        }
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(spoke.clone(), &ns);
        let _ = secrets.delete("hub-kubeconfig-secret", &Default::default()).await;
        let dir = self.dir.join(cluster);
        std::fs::create_dir_all(&dir).unwrap();
        let path = |p: &Path| p.display().to_string();
        let common = |agent_args: Vec<String>| -> Vec<String> {
            let mut all = agent_args;
            all.extend([
                format!("--cluster-name={cluster}"),
                format!("--agent-id={}", who.agent_id()),
                format!("--kubeconfig={}", path(&self.spoke_kubeconfig)),
            ]);
            all
        };
        let spokelet = |transport: &str, bootstrap: String| {
            common(vec![
                "run".into(),
                format!("--hub-transport={transport}"),
                bootstrap,
                format!("--hub-credentials-dir={}", path(&dir.join("hub"))),
                format!("--agent-namespace={ns}"),
                "--admin-addr=127.0.0.1:0".into(),
                "--pool-report=false".into(),
            ])
        };
        let ocm = |auth: Vec<String>| {
            let mut args = vec![
                "agent".into(),
                format!("--hub-kubeconfig-dir={}", path(&dir.join("hub"))),
                format!("--namespace={ns}"),
                format!("--spoke-external-server-urls={}", self.spoke_url),
                "--disable-leader-election".into(),
                format!("--listen=127.0.0.1:{}", free_port()),
            ];
            args.extend(auth);
            common(args)
        };
        let (program, args) = match who {
            Joiner::Spokelet => (
                &self.spokelet,
                spokelet(
                    "kube",
                    format!("--bootstrap-hub-kubeconfig={}", path(&self.spokelet_bootstrap)),
                ),
            ),
            Joiner::SpokeletGrpc => (
                &self.spokelet,
                spokelet(
                    "grpc",
                    format!("--bootstrap-hub-config={}", path(&self.spokelet_grpc_bootstrap)),
                ),
            ),
            Joiner::Ocm => (
                &self.ocm,
                ocm(vec![format!(
                    "--bootstrap-kubeconfig={}",
                    path(&self.ocm_bootstrap)
                )]),
            ),
            Joiner::OcmGrpc => (
                &self.ocm,
                ocm(vec![
                    "--registration-auth=grpc".into(),
                    format!("--grpc-bootstrap-config={}", path(&self.ocm_grpc_bootstrap)),
                    format!("--grpc-config={}", path(&dir.join("hub").join("config.yaml"))),
                    // OCM 1.2.1's agent names the hub (its hash) from a bootstrap kubeconfig
                    // even when it registers over gRPC.
                    format!("--bootstrap-kubeconfig={}", path(&self.ocm_bootstrap)),
                ]),
            ),
        };
        Proc::start(program, &args, dir.join("agent.log"), &dir)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cluster` is Available; the time since `start`.
/// Waits until `cluster` is Available; the time since `start`, or, after 3 minutes, the end
/// of the agent's log.
async fn until_available(
    clusters: &kube::Api<DynamicObject>,
    cluster: &str,
    start: Instant,
    agent: &Proc,
) -> Result<Duration, String> {
    loop {
        if let Ok(Some(mc)) = clusters.get_opt(cluster).await
            && condition_status(&mc, "ManagedClusterConditionAvailable").as_deref() == Some("True")
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(180) {
            return Err(format!(
                "{cluster} not Available after 3 minutes; agent log:\n{}",
                agent.tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests by `VERB resource[/subresource]` of each user in audit log lines.
fn requests_by_user(lines: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for line in lines.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // One entry per request: its completion, or the start of a long-running watch (which
        // may still be open when the window ends).
        let stage = ev["stage"].as_str().unwrap_or_default();
        let verb = ev["verb"].as_str().unwrap_or_default();
        let counted = match verb {
            "watch" => stage == "ResponseStarted",
            _ => stage == "ResponseComplete",
        };
        if !counted {
            continue;
        }
        let user = ev["user"]["username"].as_str().unwrap_or_default().to_string();
        let mut what = format!("{verb} {}", ev["objectRef"]["resource"].as_str().unwrap_or("-"));
        if let Some(sub) = ev["objectRef"]["subresource"].as_str() {
            what = format!("{what}/{sub}");
        }
        *out.entry(user).or_default().entry(what).or_default() += 1;
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let spokelet = release_binary("spokelet").unwrap_or_else(|e| panic!("{e}"));
    let ocm = Binary::OcmRegistration.find().unwrap_or_else(|e| panic!("{e}"));
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n- level: Metadata\n",
    )
    .unwrap();
    let audit = dir.join("audit.log");
    let hub = OcmHub::start(OcmHubOptions {
        grpc: true,
        registration_args: vec![
            "--feature-gates=ManagedClusterAutoApproval=true".into(),
            format!("--auto-approved-csr-users={SPOKELET_BOOTSTRAP},{OCM_BOOTSTRAP}"),
            format!("--auto-approved-grpc-users={SPOKELET_GRPC_BOOTSTRAP},{OCM_GRPC_BOOTSTRAP}"),
        ],
        cluster: ClusterOptions {
            name: "ocm-hub-join-bench".into(),
            controller_manager: true,
            csr_signing: Some(Duration::from_secs(24 * 3600)),
            extra_apiserver_args: vec![
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", audit.display()),
            ],
            ..ClusterOptions::hub()
        },
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let admin = hub.client();
    let spoke = shared_spoke().await;
    let spoke_client = spoke.client();
    // OCM's agent reads the spoke's ClusterClaims.
    install_ocm_crd(&spoke_client, spokelet_e2e::ocm_hub::CLUSTER_CLAIM_CRD_FILE)
        .await
        .unwrap();
    let spokelet_bootstrap = hub.issue_bootstrap(SPOKELET_BOOTSTRAP).await.unwrap();
    let ocm_bootstrap = hub.issue_bootstrap(OCM_BOOTSTRAP).await.unwrap();
    let grpc_bootstrap = |user: &'static str| {
        let path = dir.join(format!("{user}.yaml").replace(':', "-"));
        let hub = &hub;
        async move {
            hub.issue_grpc_bootstrap(user, &path).await.unwrap();
            path
        }
    };
    let spokelet_grpc_bootstrap = grpc_bootstrap(SPOKELET_GRPC_BOOTSTRAP).await;
    let ocm_grpc_bootstrap = grpc_bootstrap(OCM_GRPC_BOOTSTRAP).await;
    let setup = Setup {
        spokelet,
        ocm,
        spoke_kubeconfig: spoke.kubeconfig_path().to_path_buf(),
        spoke_url: spoke.server_url().trim_end_matches('/').to_string(),
        spokelet_bootstrap: spokelet_bootstrap.kubeconfig_path().to_path_buf(),
        ocm_bootstrap: ocm_bootstrap.kubeconfig_path().to_path_buf(),
        spokelet_grpc_bootstrap,
        ocm_grpc_bootstrap,
        dir: dir.clone(),
    };
    let clusters = managed_clusters(&admin);
    let tag = std::process::id();

    // 1. Joins, alternating, a new cluster each; the last of each stays up for the idle count.
    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    // The reference that could not join here, with why: its row says so instead of a time.
    let mut failed: BTreeMap<&str, String> = BTreeMap::new();
    let mut last = Vec::new();
    for run in 0..RUNS {
        last.clear();
        for who in Joiner::ALL {
            if failed.contains_key(who.label()) {
                continue;
            }
            let cluster = format!("{}-{tag}-{run}", who.agent_id());
            let start = Instant::now();
            let agent = setup.start(who, &cluster, &spoke_client).await;
            let took = match until_available(&clusters, &cluster, start, &agent).await {
                Ok(took) => took,
                // spokelet must join; a reference that cannot is reported, loudly.
                Err(e) if matches!(who, Joiner::Ocm | Joiner::OcmGrpc) => {
                    eprintln!("{}: DID NOT JOIN: {e}", who.label());
                    let why = e.lines().last().unwrap_or_default().to_string();
                    failed.insert(who.label(), why);
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            times.entry(who.label()).or_default().push(took);
            last.push((who, cluster, agent));
        }
    }

    // 2. The last two, joined and idle.
    tokio::time::sleep(SETTLE).await;
    let offset = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    tokio::time::sleep(IDLE).await;
    let text = std::fs::read(&audit).unwrap();
    let window = String::from_utf8_lossy(&text[usize::try_from(offset).unwrap_or(0)..]).into_owned();
    let by_user = requests_by_user(&window);
    let per_hour = 3600.0 / IDLE.as_secs_f64();

    println!(
        "\nJoin: process start to ManagedClusterConditionAvailable=True, bootstrap CSR auto-approved ({RUNS} runs each, same hub and spoke)"
    );
    let rows: Vec<Vec<String>> = Joiner::ALL
        .iter()
        .map(|who| {
            if let Some(why) = failed.get(who.label()) {
                let why: String = why.chars().take(120).collect();
                return vec![who.label().to_string(), format!("did not join: {why}")];
            }
            let mut t = times[who.label()].clone();
            t.sort();
            vec![
                who.label().to_string(),
                secs(percentile(&t, 0.5)),
                secs(*t.last().unwrap()),
                secs(*t.first().unwrap()),
                if *t.last().unwrap() <= TARGET { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    print_table(&["agent", "p50 s", "max s", "min s", "under 5 s"], &rows);

    println!(
        "\nIdle: hub requests of a joined agent, counted over {} s of the hub's audit log, per hour (lease 60 s)",
        IDLE.as_secs()
    );
    let mut rows = Vec::new();
    for (who, cluster, _) in last.iter().filter(|(who, ..)| who.on_kube_hub()) {
        let user = format!("system:open-cluster-management:{cluster}:{}", who.agent_id());
        let counts = by_user.get(&user).cloned().unwrap_or_default();
        let total: u64 = counts.values().sum();
        let detail = counts
            .iter()
            .map(|(k, v)| format!("{k} {:.0}", *v as f64 * per_hour))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(vec![
            who.label().to_string(),
            format!("{:.0}", total as f64 * per_hour),
            detail,
        ]);
    }
    print_table(
        &["agent", "requests/hour", "by verb and resource (per hour)"],
        &rows,
    );
    drop(last);
    hub.stop().await;
}
