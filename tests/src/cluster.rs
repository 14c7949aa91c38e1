//! One real Kubernetes control plane on loopback: its own etcd, kube-apiserver and,
//! optionally, kube-controller-manager, with a fresh PKI and its own scratch directory.
//!
//! Everything binds 127.0.0.1 on ports picked at start. Every process writes its output to
//! `<dir>/<component>.log`; a start that fails returns the end of the failing log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;

use crate::HarnessError;
use crate::assets::Binary;
use crate::credentials::{UserCredentials, write_private};
use crate::pki::ClusterPki;
use crate::process::{ManagedProcess, free_ports, http_get};
use crate::rundir;

/// The admin identity: `system:masters` passes every authorization check.
pub const ADMIN_USER: &str = "spokelet-admin";
/// The group that makes a user a cluster admin.
pub const MASTERS_GROUP: &str = "system:masters";

/// Controllers the controller-manager runs unless [`ClusterOptions::controllers`] says
/// otherwise: garbage collection and namespace deletion (the delete paths depend on them),
/// service accounts and their tokens, the aggregated `admin`/`edit`/`view` roles, and the
/// workload controllers so that applied Deployments, Jobs, … get realistic status.
/// Scheduling, nodes, volumes and cloud controllers are left out: there are no nodes.
pub const DEFAULT_CONTROLLERS: &[&str] = &[
    "garbagecollector",
    "namespace",
    "serviceaccount",
    "serviceaccount-token",
    "root-ca-cert-publisher",
    "clusterrole-aggregation",
    "deployment",
    "replicaset",
    "statefulset",
    "daemonset",
    "job",
    "cronjob",
    "endpoint",
    "endpointslice",
];

/// The service CIDR; `10.0.0.1` (the `kubernetes` service) is in the serving certificate.
const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";
/// Starts that fail because a picked port was taken meanwhile are retried this often.
const START_ATTEMPTS: u32 = 3;
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Also run kube-controller-manager (garbage collection, namespace deletion, …).
    pub controller_manager: bool,
    /// A label for logs and directory names, e.g. `spoke` or `hub`.
    pub name: String,
    /// `--etcd-prefix` for the API server (default `/registry`). Each cluster has its own
    /// etcd anyway; this exists for tests of prefix handling.
    pub etcd_prefix: Option<String>,
    /// Controller-manager `--controllers`; empty means [`DEFAULT_CONTROLLERS`].
    pub controllers: Vec<String>,
    /// Extra kube-apiserver flags, e.g. `--feature-gates=…`, appended last.
    pub extra_apiserver_args: Vec<String>,
    /// Sign approved client-certificate requests (signer `kubernetes.io/kube-apiserver-client`)
    /// with the cluster's client CA, for this long at most: the controller-manager then runs
    /// its `csrsigning` controller. None: requests are never signed.
    pub csr_signing: Option<std::time::Duration>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions::spoke()
    }
}

impl ClusterOptions {
    /// A spoke: with controller-manager.
    pub fn spoke() -> Self {
        ClusterOptions {
            controller_manager: true,
            name: "spoke".to_string(),
            etcd_prefix: None,
            controllers: Vec::new(),
            extra_apiserver_args: Vec::new(),
            csr_signing: None,
        }
    }

    /// A hub: API server only, which is all a hub transport needs. Without the
    /// controller-manager, deleted namespaces stay `Terminating` and the aggregated
    /// `admin`/`edit`/`view` roles have no rules; set `controller_manager` where that matters.
    pub fn hub() -> Self {
        ClusterOptions {
            controller_manager: false,
            name: "hub".to_string(),
            ..ClusterOptions::spoke()
        }
    }
}

/// A running control plane. Dropping it (or [`KubeCluster::stop`]) kills and reaps every
/// process and deletes its directory.
#[derive(Debug)]
pub struct KubeCluster {
    name: String,
    server_url: String,
    etcd_url: String,
    pki: ClusterPki,
    admin: UserCredentials,
    controller_manager: bool,
    users: AtomicU32,
    processes: Processes,
}

impl KubeCluster {
    /// Starts etcd, kube-apiserver and (if asked) kube-controller-manager and waits until
    /// the API server answers `/readyz` and, with a controller-manager, until it has created
    /// the `default` service account (its controllers are running).
    pub async fn start(opts: ClusterOptions) -> Result<KubeCluster, HarnessError> {
        let mut attempt = 1;
        loop {
            match start_once(&opts).await {
                Err(e) if e.is_port_race() && attempt < START_ATTEMPTS => {
                    tracing::warn!(cluster = %opts.name, attempt, "port taken during start; retrying");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// The label given in [`ClusterOptions::name`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new admin client (`CN=spokelet-admin, O=system:masters`, mutual TLS).
    ///
    /// Each call builds a fresh client on the calling Tokio runtime; see
    /// [`UserCredentials::client`] for why and when it panics.
    pub fn client(&self) -> kube::Client {
        self.admin.client()
    }

    /// [`KubeCluster::client`] without the panic.
    pub fn try_client(&self) -> Result<kube::Client, HarnessError> {
        self.admin.try_client()
    }

    /// The admin identity.
    pub fn admin(&self) -> &UserCredentials {
        &self.admin
    }

    /// A kubeconfig file for the admin identity, certificates embedded.
    pub fn kubeconfig_path(&self) -> &Path {
        self.admin.kubeconfig_path()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        self.server_url.clone()
    }

    /// The CA that signed the API server's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.pki.serving_ca.cert_pem()
    }

    /// The CA the API server trusts for client certificates (PEM).
    pub fn client_ca_pem(&self) -> &str {
        self.pki.client_ca.cert_pem()
    }

    /// `http://127.0.0.1:PORT` of this cluster's etcd.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// Whether a controller-manager runs.
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager
    }

    /// The cluster's scratch directory (PKI, kubeconfigs, logs, etcd data).
    pub fn dir(&self) -> &Path {
        &self.processes.dir
    }

    /// The log file of `component` (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir().join(format!("{component}.log"))
    }

    /// Fails, with the end of its log, if any of the cluster's processes has exited: a
    /// crashed API server otherwise only shows up as refused connections.
    pub fn check_running(&self) -> Result<(), HarnessError> {
        match self.processes.list.iter().find(|p| p.has_exited()) {
            Some(dead) => Err(dead.died()),
            None => Ok(()),
        }
    }

    /// Process ids of the running servers, for tests of the harness itself.
    pub fn pids(&self) -> Vec<u32> {
        self.processes
            .list
            .iter()
            .filter_map(ManagedProcess::pid)
            .collect()
    }

    /// A client certificate for `common_name` in `groups` (at most two), signed by the
    /// cluster's client CA and valid from an hour ago for a year, with a kubeconfig file.
    pub fn issue_user(&self, common_name: &str, groups: &[&str]) -> Result<UserCredentials, HarnessError> {
        let cert = self.pki.client_ca.issue_client_now(common_name, groups)?;
        self.user_from_cert(common_name, groups, cert)
    }

    /// Like [`KubeCluster::issue_user`] with an explicit validity window, e.g. one entirely
    /// in the past for expired-certificate tests.
    pub fn issue_user_with_validity(
        &self,
        common_name: &str,
        groups: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<UserCredentials, HarnessError> {
        let cert = self
            .pki
            .client_ca
            .issue_client(common_name, groups, not_before, not_after)?;
        self.user_from_cert(common_name, groups, cert)
    }

    fn user_from_cert(
        &self,
        common_name: &str,
        groups: &[&str],
        cert: crate::pki::CertAndKey,
    ) -> Result<UserCredentials, HarnessError> {
        let n = self.users.fetch_add(1, Ordering::Relaxed);
        let file = crate::rundir::file_safe(common_name);
        let users_dir = self.dir().join("users");
        std::fs::create_dir_all(&users_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", users_dir.display()), e))?;
        UserCredentials::create(
            &self.name,
            &self.server_url,
            self.ca_pem(),
            common_name,
            groups,
            cert,
            users_dir.join(format!("{file}-{n}.kubeconfig")),
        )
    }

    /// Kills and reaps every process and deletes the directory (what dropping does), off
    /// the async executor.
    pub async fn stop(self) {
        // Reaping and deleting etcd's files block briefly; keep that off the runtime threads.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// A cluster's processes and directory, torn down together: processes in reverse start
/// order (controller-manager, API server, etcd), then the directory.
#[derive(Debug)]
pub(crate) struct Processes {
    pub(crate) dir: PathBuf,
    pub(crate) list: Vec<ManagedProcess>,
}

impl Processes {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Processes {
            dir,
            list: Vec::new(),
        }
    }

    /// Adds a started process and returns it for the readiness wait.
    pub(crate) fn push(&mut self, process: ManagedProcess) -> &mut ManagedProcess {
        self.list.push(process);
        let last = self.list.len() - 1;
        &mut self.list[last]
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        while let Some(mut process) = self.list.pop() {
            process.kill();
        }
        rundir::remove_dir(&self.dir);
    }
}

/// The overall deadline for one component to become ready: generous, because a cold
/// kube-apiserver on two busy cores takes tens of seconds. `SPOKELET_E2E_START_TIMEOUT_SECS`
/// overrides it.
pub(crate) fn start_budget() -> Duration {
    let secs = std::env::var("SPOKELET_E2E_START_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

async fn start_once(opts: &ClusterOptions) -> Result<KubeCluster, HarnessError> {
    // Look everything up before starting anything, so a missing binary fails fast.
    let etcd_bin = Binary::Etcd.find()?;
    let apiserver_bin = Binary::KubeApiserver.find()?;
    let kcm_bin = if opts.controller_manager {
        Some(Binary::KubeControllerManager.find()?)
    } else {
        None
    };

    let dir = rundir::component_dir(&opts.name)?;
    // From here on, an early return drops `processes`, which kills what was started and
    // removes the directory.
    let mut processes = Processes::new(dir.clone());
    let pki = ClusterPki::generate(&opts.name)?;
    let files = PkiFiles::write(&dir, &pki)?;

    let ports = free_ports(3)?;
    let (etcd_port, etcd_peer_port, apiserver_port) = (ports[0], ports[1], ports[2]);
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
    let server_url = format!("https://127.0.0.1:{apiserver_port}");

    // etcd
    let etcd_args = args(&[
        ("--data-dir", path_arg(&dir.join("etcd"))),
        ("--listen-client-urls", etcd_url.clone()),
        ("--advertise-client-urls", etcd_url.clone()),
        ("--listen-peer-urls", peer_url.clone()),
        ("--initial-advertise-peer-urls", peer_url.clone()),
        ("--initial-cluster", format!("default={peer_url}")),
    ]);
    let etcd = processes.push(ManagedProcess::spawn(
        &opts.name,
        "etcd",
        &etcd_bin,
        &etcd_args,
        dir.join("etcd.log"),
    )?);
    wait_for_etcd(etcd, etcd_port).await?;

    // kube-apiserver
    let admin = UserCredentials::create(
        &opts.name,
        &server_url,
        pki.serving_ca.cert_pem(),
        ADMIN_USER,
        &[MASTERS_GROUP],
        pki.client_ca.issue_client_now(ADMIN_USER, &[MASTERS_GROUP])?,
        dir.join("admin.kubeconfig"),
    )?;
    let mut apiserver_args = args(&[
        ("--etcd-servers", etcd_url.clone()),
        ("--bind-address", "127.0.0.1".into()),
        ("--advertise-address", "127.0.0.1".into()),
        ("--secure-port", apiserver_port.to_string()),
        ("--tls-cert-file", path_arg(&files.serving_cert)),
        ("--tls-private-key-file", path_arg(&files.serving_key)),
        // Unused with explicit serving files, but keeps anything else out of /var/run.
        ("--cert-dir", path_arg(&dir.join("apiserver-certs"))),
        ("--client-ca-file", path_arg(&files.client_ca)),
        ("--service-account-key-file", path_arg(&files.sa_pub)),
        ("--service-account-signing-key-file", path_arg(&files.sa_key)),
        ("--service-account-issuer", SERVICE_ACCOUNT_ISSUER.into()),
        ("--service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE.into()),
        ("--authorization-mode", "RBAC".into()),
        ("--allow-privileged", "true".into()),
        // The `kubernetes` service's endpoints would be 127.0.0.1, which endpoint
        // validation rejects; nothing in these tests routes to it.
        ("--endpoint-reconciler-type", "none".into()),
        ("--profiling", "false".into()),
    ]);
    if let Some(prefix) = &opts.etcd_prefix {
        apiserver_args.extend(args(&[("--etcd-prefix", prefix.clone())]));
    }
    apiserver_args.extend(opts.extra_apiserver_args.iter().cloned());
    let apiserver = processes.push(ManagedProcess::spawn(
        &opts.name,
        "kube-apiserver",
        &apiserver_bin,
        &apiserver_args,
        dir.join("kube-apiserver.log"),
    )?);
    let client = admin.try_client()?;
    wait_for_apiserver(apiserver, &client).await?;

    // kube-controller-manager
    if let Some(kcm_bin) = kcm_bin {
        // Its own identity; with `--use-service-account-credentials=false` every controller
        // acts as this user, so it needs more than the `system:kube-controller-manager`
        // role grants: system:masters.
        let kcm_user = UserCredentials::create(
            &opts.name,
            &server_url,
            pki.serving_ca.cert_pem(),
            "system:kube-controller-manager",
            &[MASTERS_GROUP],
            pki.client_ca
                .issue_client_now("system:kube-controller-manager", &[MASTERS_GROUP])?,
            dir.join("kube-controller-manager.kubeconfig"),
        )?;
        let mut controllers = if opts.controllers.is_empty() {
            DEFAULT_CONTROLLERS.join(",")
        } else {
            opts.controllers.join(",")
        };
        if opts.csr_signing.is_some() {
            controllers.push_str(",csrsigning");
        }
        let mut kcm_args = args(&[
            ("--kubeconfig", path_arg(kcm_user.kubeconfig_path())),
            ("--bind-address", "127.0.0.1".into()),
            // No serving endpoint at all: nothing scrapes it, and the default ports would
            // collide between clusters.
            ("--secure-port", "0".into()),
            ("--leader-elect", "false".into()),
            ("--use-service-account-credentials", "false".into()),
            ("--service-account-private-key-file", path_arg(&files.sa_key)),
            ("--root-ca-file", path_arg(&files.serving_ca)),
            ("--controllers", controllers),
            ("--profiling", "false".into()),
        ]);
        if let Some(duration) = opts.csr_signing {
            kcm_args.extend(args(&[
                (
                    "--cluster-signing-kube-apiserver-client-cert-file",
                    path_arg(&files.client_ca),
                ),
                (
                    "--cluster-signing-kube-apiserver-client-key-file",
                    path_arg(&files.client_ca_key),
                ),
                ("--cluster-signing-duration", format!("{}s", duration.as_secs())),
            ]));
        }
        // Before 1.24 the controller-manager also serves plain HTTP on 10252 by default.
        if kube_minor_version(&kcm_bin).await.is_some_and(|minor| minor < 24) {
            kcm_args.extend(args(&[("--port", "0".into())]));
        }
        let kcm = processes.push(ManagedProcess::spawn(
            &opts.name,
            "kube-controller-manager",
            &kcm_bin,
            &kcm_args,
            dir.join("kube-controller-manager.log"),
        )?);
        wait_for_controller_manager(kcm, &client).await?;
    }

    tracing::info!(cluster = %opts.name, %server_url, dir = %dir.display(), "cluster ready");
    Ok(KubeCluster {
        name: opts.name.clone(),
        server_url,
        etcd_url,
        pki,
        admin,
        controller_manager: opts.controller_manager,
        users: AtomicU32::new(0),
        processes,
    })
}

/// Where the PKI lives on disk for the servers' flags.
struct PkiFiles {
    serving_ca: PathBuf,
    client_ca: PathBuf,
    /// The client CA's key: for the controller-manager's signer only.
    client_ca_key: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl PkiFiles {
    fn write(dir: &Path, pki: &ClusterPki) -> Result<Self, HarnessError> {
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", pki_dir.display()), e))?;
        let files = PkiFiles {
            serving_ca: pki_dir.join("serving-ca.crt"),
            client_ca: pki_dir.join("client-ca.crt"),
            client_ca_key: pki_dir.join("client-ca.key"),
            serving_cert: pki_dir.join("apiserver.crt"),
            serving_key: pki_dir.join("apiserver.key"),
            sa_key: pki_dir.join("service-account.key"),
            sa_pub: pki_dir.join("service-account.pub"),
        };
        write_private(&files.serving_ca, pki.serving_ca.cert_pem())?;
        write_private(&files.client_ca, pki.client_ca.cert_pem())?;
        write_private(&files.client_ca_key, &pki.client_ca.key_pem())?;
        write_private(&files.serving_cert, &pki.serving.cert_pem)?;
        write_private(&files.serving_key, &pki.serving.key_pem)?;
        write_private(&files.sa_key, &pki.service_account_key_pem)?;
        write_private(&files.sa_pub, &pki.service_account_pub_pem)?;
        Ok(files)
    }
}

async fn wait_for_etcd(etcd: &mut ManagedProcess, port: u16) -> Result<(), HarnessError> {
    let deadline = Instant::now() + start_budget();
    loop {
        etcd.check_running()?;
        let last = match http_get(port, "/health").await {
            Ok((200, body)) if body.contains("true") => return Ok(()),
            Ok((status, body)) => format!("/health answered {status}: {body}"),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(etcd.start_failed(format!("not healthy in time; last probe: {last}")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn wait_for_apiserver(
    apiserver: &mut ManagedProcess,
    client: &kube::Client,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + start_budget();
    loop {
        apiserver.check_running()?;
        // /readyz exists since 1.16 and, unlike /healthz, waits for the post-start hooks
        // (RBAC bootstrap roles, default namespaces, priority-and-fairness config).
        let last = match http::Request::get("/readyz").body(Vec::new()) {
            Ok(request) => match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => format!("/readyz answered: {body}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(apiserver.start_failed(format!("/readyz not ok in time; last probe: {last}")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The controller-manager has no endpoint here (`--secure-port=0`); the `default` service
/// account appearing shows that it is connected and its controllers are running.
async fn wait_for_controller_manager(
    kcm: &mut ManagedProcess,
    client: &kube::Client,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + start_budget();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    loop {
        kcm.check_running()?;
        let last = match accounts.get_opt("default").await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => "service account default/default not created yet".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(kcm.start_failed(format!("controllers not running in time: {last}")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The minor version a Kubernetes binary reports (`Kubernetes v1.20.2` → 20), for the few
/// flags that differ between releases. `None` if it cannot be told.
async fn kube_minor_version(binary: &Path) -> Option<u32> {
    let output = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .ok()?;
    parse_minor_version(&String::from_utf8_lossy(&output.stdout))
}

fn parse_minor_version(text: &str) -> Option<u32> {
    let version = text.split_whitespace().find(|w| w.starts_with("v1."))?;
    version.trim_start_matches("v1.").split('.').next()?.parse().ok()
}

fn args(pairs: &[(&str, String)]) -> Vec<String> {
    // `--flag=value` rather than two words: boolean flags only take their value this way.
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_versions() {
        assert_eq!(parse_minor_version("Kubernetes v1.20.2\n"), Some(20));
        assert_eq!(parse_minor_version("Kubernetes v1.31.0-rc.1"), Some(31));
        assert_eq!(parse_minor_version("etcd Version: 3.4.23"), None);
    }

    #[test]
    fn flags_are_joined_with_equals() {
        assert_eq!(
            args(&[("--leader-elect", "false".into())]),
            vec!["--leader-elect=false".to_string()]
        );
    }
}
