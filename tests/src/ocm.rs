//! The real OCM hub: OCM's own registration controller, work manager, placement controller and
//! CloudEvents gRPC server (`server grpc`), run as processes against a hub API server of their
//! own, with OCM's CRDs from the same OCM module `tests/env/install.sh` built them from.
//!
//! This is the shape OCM's own integration tests use (its controllers against a bare
//! kube-apiserver), minus the cluster-manager operator and the webhooks: accepting a cluster is
//! then setting `spec.hubAcceptsClient` without the webhook's access review, and the
//! `cluster.open-cluster-management.io/clusterset: default` label the webhook would add is not
//! added. Every server binds 127.0.0.1 on a port picked at start, writes its log to
//! `<dir>/<component>.log`, and is killed when the hub is dropped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spokelet_e2e::HarnessError> {
//! use spokelet_e2e::ocm::{OcmHub, OcmHubOptions};
//! let hub = OcmHub::start(OcmHubOptions::default()).await?;
//! hub.accept_cluster("pool-a", 60).await?;
//! let agent = hub.issue_agent("pool-a", "agent")?; // a kubeconfig for the kube transport
//! # Ok(()) }
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject};

use crate::assets::Binary;
use crate::cluster::{Processes, start_budget};
use crate::credentials::write_private;
use crate::ocm_hub::{install_crd_yaml, ocm_crds_dir};
use crate::pki::{CertAndKey, CertificateAuthority};
use crate::process::{ManagedProcess, free_ports};
use crate::{ClusterOptions, HarnessError, KubeCluster, MASTERS_GROUP, UserCredentials, eventually, rundir};

/// The namespace OCM's hub components run in (events, leader election when it is on).
pub const HUB_NAMESPACE: &str = "open-cluster-management-hub";
/// The cluster-scoped API group of ManagedClusters, sets and placements.
pub const CLUSTER_GROUP: &str = "cluster.open-cluster-management.io";
/// The work API group.
pub const WORK_GROUP: &str = "work.open-cluster-management.io";

/// How the hub is started.
#[derive(Debug, Clone)]
pub struct OcmHubOptions {
    /// Also run OCM's CloudEvents gRPC server (mutual TLS, OCM's own authorisation).
    pub grpc: bool,
    /// Extra flags for the registration controller, e.g. `--feature-gates=...`. With `grpc`,
    /// the controller also runs OCM's gRPC registration driver, signing agents' certificates
    /// with the CA the gRPC server trusts.
    pub registration_args: Vec<String>,
    /// The hub API server's options (a label and extra flags; the controller-manager is off
    /// unless set).
    pub cluster: ClusterOptions,
}

impl Default for OcmHubOptions {
    fn default() -> Self {
        OcmHubOptions {
            grpc: false,
            registration_args: Vec::new(),
            cluster: ClusterOptions {
                name: "ocm-hub".into(),
                ..ClusterOptions::hub()
            },
        }
    }
}

/// OCM's gRPC server: where it listens and the CAs of both sides of its mutual TLS.
#[derive(Debug)]
struct GrpcEndpoint {
    /// `https://127.0.0.1:PORT`, as an agent's hub config names it.
    url: String,
    /// Signed the server's certificate; what an agent trusts.
    serving_ca: CertificateAuthority,
    /// Signs agents' client certificates; what the server trusts.
    client_ca: CertificateAuthority,
}

/// A running OCM hub. Dropping it kills OCM's processes, then the API server.
#[derive(Debug)]
pub struct OcmHub {
    // Declared first, so dropped first: OCM's controllers go before their API server.
    processes: Processes,
    cluster: KubeCluster,
    grpc: Option<GrpcEndpoint>,
}

impl OcmHub {
    /// Starts the hub API server, installs OCM's hub CRDs and starts OCM's controllers (and
    /// gRPC server when asked), each waited for until it listens.
    pub async fn start(opts: OcmHubOptions) -> Result<OcmHub, HarnessError> {
        let registration = Binary::OcmRegistration.find()?;
        let work = Binary::OcmWork.find()?;
        let placement = Binary::OcmPlacement.find()?;
        let server = if opts.grpc {
            Some(Binary::OcmServer.find()?)
        } else {
            None
        };
        let cluster = KubeCluster::start(opts.cluster.clone()).await?;
        let admin = cluster.try_client()?;
        install_hub_crds(&admin).await?;
        crate::create_namespace(&admin, HUB_NAMESPACE).await?;

        let dir = rundir::component_dir(&format!("{}-controllers", cluster.name()))?;
        let mut processes = Processes::new(dir.clone());
        // Their own identity, a cluster admin, as the cluster manager's service accounts
        // effectively are for what these tests do.
        let controllers = cluster.issue_user("system:open-cluster-management:hub", &[MASTERS_GROUP])?;
        let kubeconfig = controllers.kubeconfig_path().display().to_string();
        let common = |port: u16| {
            vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--namespace={HUB_NAMESPACE}"),
                "--disable-leader-election".to_string(),
                // Health and metrics; on loopback, never the default 0.0.0.0:8443.
                format!("--listen=127.0.0.1:{port}"),
            ]
        };
        let ports = free_ports(5)?;
        let grpc_files = match opts.grpc {
            true => Some(grpc_server_files(&dir, ports[4])?),
            false => None,
        };
        let mut registration_args = vec!["controller".to_string()];
        registration_args.extend(common(ports[0]));
        if grpc_files.is_some() {
            registration_args.extend([
                "--enabled-registration-drivers=csr,grpc".to_string(),
                format!("--grpc-ca-file={}", dir.join(GRPC_CLIENT_CA).display()),
                format!("--grpc-key-file={}", dir.join(GRPC_CLIENT_CA_KEY).display()),
            ]);
        }
        registration_args.extend(opts.registration_args.iter().cloned());
        let mut work_args = vec!["manager".to_string()];
        work_args.extend(common(ports[1]));
        work_args.push("--feature-gates=ManifestWorkReplicaSet=true".into());
        let mut placement_args = vec!["controller".to_string()];
        placement_args.extend(common(ports[2]));

        // (component, binary, arguments, the ports it listens on once up)
        let mut started = vec![
            (
                "registration-controller",
                registration,
                registration_args,
                vec![ports[0]],
            ),
            ("work-manager", work, work_args, vec![ports[1]]),
            ("placement-controller", placement, placement_args, vec![ports[2]]),
        ];
        let grpc = match server.zip(grpc_files) {
            Some((server, (endpoint, config))) => {
                let mut args = vec!["grpc".to_string()];
                args.extend(common(ports[3]));
                args.push(format!("--server-config={}", config.display()));
                started.push(("grpc-server", server, args, vec![ports[3], ports[4]]));
                Some(endpoint)
            }
            None => None,
        };
        for (component, binary, args, listens) in started {
            let process = processes.push(ManagedProcess::spawn_with_env(
                cluster.name(),
                component,
                &binary,
                &args,
                // library-go writes a self-signed serving certificate under $TMPDIR.
                &[("TMPDIR", dir.display().to_string())],
                dir.join(format!("{component}.log")),
            )?);
            for port in listens {
                wait_for_port(process, port).await?;
            }
        }
        tracing::info!(hub = %cluster.server_url(), grpc = ?grpc.as_ref().map(|g| &g.url), "OCM hub ready");
        Ok(OcmHub {
            processes,
            cluster,
            grpc,
        })
    }

    /// The hub's API server.
    pub fn cluster(&self) -> &KubeCluster {
        &self.cluster
    }

    /// A new admin client of the hub.
    pub fn client(&self) -> kube::Client {
        self.cluster.client()
    }

    /// The log of an OCM component (`registration-controller`, `work-manager`,
    /// `placement-controller`, `grpc-server`), for a failing test to show.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.processes.dir.join(format!("{component}.log"))
    }

    /// The last 40 lines of an OCM component's log (see [`OcmHub::log_path`]).
    pub fn log_tail(&self, component: &str) -> String {
        crate::process::log_tail(&self.log_path(component), 40)
    }

    /// Fails, with the end of its log, if any of the hub's processes has exited.
    pub fn check_running(&self) -> Result<(), HarnessError> {
        self.cluster.check_running()?;
        match self.processes.list.iter().find(|p| p.has_exited()) {
            Some(dead) => Err(dead.died()),
            None => Ok(()),
        }
    }

    /// Does what an admin does to let a cluster in (as PaletteAI does when it provisions a
    /// Compute Pool): creates its ManagedCluster with `hubAcceptsClient: true` and
    /// `leaseDurationSeconds`, then waits until OCM's registration controller has accepted it
    /// (`HubAcceptedManagedCluster`) and created its namespace and RBAC.
    pub async fn accept_cluster(&self, name: &str, lease_seconds: u32) -> Result<(), HarnessError> {
        let admin = self.client();
        crate::ocm_hub::create_managed_cluster(&admin, name, Some(lease_seconds)).await?;
        let api = managed_clusters(&admin);
        eventually(&format!("OCM's registration controller to accept {name}"), || {
            let api = api.clone();
            async move {
                let mc = api.get(name).await.map_err(|e| e.to_string())?;
                condition_status(&mc, "HubAcceptedManagedCluster")
                    .filter(|s| s == "True")
                    .map(drop)
                    .ok_or_else(|| format!("conditions: {}", mc.data["status"]["conditions"]))
            }
        })
        .await?;
        // The work agent's rights come with the namespace's RoleBindings.
        let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(admin, name);
        eventually(&format!("the RBAC of {name} in its namespace"), || {
            let bindings = bindings.clone();
            async move {
                let n = bindings
                    .list(&Default::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .len();
                (n >= 2).then_some(()).ok_or(format!("{n} RoleBindings"))
            }
        })
        .await
    }

    /// A kubeconfig for a cluster's agent on the Kubernetes-hub transport, with the identity
    /// OCM's registration agent ends up with (`CN=system:open-cluster-management:<cluster>:<agent>`,
    /// `O=system:open-cluster-management:<cluster>`): the RBAC OCM creates on accept is all it has.
    pub fn issue_agent(&self, cluster: &str, agent: &str) -> Result<UserCredentials, HarnessError> {
        let group = format!("system:open-cluster-management:{cluster}");
        self.cluster.issue_user(&format!("{group}:{agent}"), &[&group])
    }

    /// A bootstrap credential as OCM's cluster manager hands one out: a user in
    /// [`BOOTSTRAP_GROUP`], which OCM's `open-cluster-management:bootstrap` ClusterRole (made
    /// here with the rules of OCM's chart) lets create and read ManagedClusters and
    /// certificate signing requests, and nothing else.
    pub async fn issue_bootstrap(&self, user: &str) -> Result<UserCredentials, HarnessError> {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        let admin = self.client();
        let role: ClusterRole = from_json(serde_json::json!({
            "metadata": {"name": BOOTSTRAP_ROLE},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
                {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
                 "verbs": ["create", "get", "list", "watch"]},
                {"apiGroups": [CLUSTER_GROUP], "resources": ["managedclusters"],
                 "verbs": ["get", "create", "list", "watch"]},
                {"apiGroups": [CLUSTER_GROUP], "resources": ["managedclustersets/join"], "verbs": ["create"]},
            ]
        }))?;
        let binding: ClusterRoleBinding = from_json(serde_json::json!({
            "metadata": {"name": format!("{BOOTSTRAP_ROLE}:managedcluster")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": BOOTSTRAP_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": BOOTSTRAP_GROUP}]
        }))?;
        create_or_keep(&Api::<ClusterRole>::all(admin.clone()), &role).await?;
        create_or_keep(&Api::<ClusterRoleBinding>::all(admin), &binding).await?;
        self.cluster.issue_user(user, &[BOOTSTRAP_GROUP])
    }

    /// `https://127.0.0.1:PORT` of OCM's gRPC server, when started.
    pub fn grpc_url(&self) -> Option<&str> {
        self.grpc.as_ref().map(|g| g.url.as_str())
    }

    /// The CA an agent trusts for the gRPC server (PEM), when started.
    pub fn grpc_ca_pem(&self) -> Option<&str> {
        self.grpc.as_ref().map(|g| g.serving_ca.cert_pem())
    }

    /// A client certificate for a cluster's agent on the gRPC transport, signed by the CA the
    /// gRPC server trusts, with the same subject as [`OcmHub::issue_agent`]'s.
    pub fn issue_grpc_agent(&self, cluster: &str, agent: &str) -> Result<CertAndKey, HarnessError> {
        let grpc = self
            .grpc
            .as_ref()
            .ok_or_else(|| invalid("gRPC client", "the hub runs no gRPC server"))?;
        let group = format!("system:open-cluster-management:{cluster}");
        grpc.client_ca
            .issue_client_now(&format!("{group}:{agent}"), &[&group])
    }

    /// A bootstrap config for the gRPC transport in OCM's format (`url`, `caData`, and a
    /// bootstrap client certificate for `user` in [`BOOTSTRAP_GROUP`], whose rights are OCM's
    /// bootstrap role's, made as [`OcmHub::issue_bootstrap`] makes it), written to `path`.
    pub async fn issue_grpc_bootstrap(&self, user: &str, path: &Path) -> Result<(), HarnessError> {
        use base64::Engine;
        // The role and its binding; the kubeconfig made beside them is not used.
        self.issue_bootstrap(user).await?;
        let grpc = self
            .grpc
            .as_ref()
            .ok_or_else(|| invalid("gRPC bootstrap", "the hub runs no gRPC server"))?;
        let client = grpc.client_ca.issue_client_now(user, &[BOOTSTRAP_GROUP])?;
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        // The URL as OCM writes it: a gRPC target without a scheme (OCM's own agent refuses
        // `https://`); spokelet reads both.
        let yaml = format!(
            "url: {}\ncaData: {}\nclientCertData: {}\nclientKeyData: {}\n",
            grpc.url.trim_start_matches("https://"),
            b64(grpc.serving_ca.cert_pem()),
            b64(&client.cert_pem),
            b64(&client.key_pem)
        );
        write_private(path, &yaml)
    }

    /// Kills OCM's processes and the API server (what dropping does), off the executor.
    pub async fn stop(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// The group OCM's bootstrap credentials are in (its chart binds the bootstrap role to it).
pub const BOOTSTRAP_GROUP: &str = "system:bootstrappers:managedcluster";
/// OCM's ClusterRole for bootstrap credentials.
pub const BOOTSTRAP_ROLE: &str = "open-cluster-management:bootstrap";

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, HarnessError> {
    serde_json::from_value(v).map_err(|e| invalid("bootstrap RBAC", e))
}

/// Creates `obj` unless an object of its name exists.
async fn create_or_keep<K>(api: &Api<K>, obj: &K) -> Result<(), HarnessError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&Default::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(invalid("bootstrap RBAC", e)),
    }
}

/// The ManagedCluster API of a hub.
pub fn managed_clusters(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &cluster_resource("ManagedCluster", "managedclusters"),
    )
}

/// A cluster-group resource of OCM (`ManagedCluster`, `Placement`, ...).
pub fn cluster_resource(kind: &str, plural: &str) -> ApiResource {
    resource(CLUSTER_GROUP, "v1", kind, plural)
}

/// An OCM resource in `group/version`.
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The `status` of condition `type_` of an object.
pub fn condition_status(obj: &DynamicObject, type_: &str) -> Option<String> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}

/// The hub's CRDs, as OCM's cluster manager installs them.
async fn install_hub_crds(client: &kube::Client) -> Result<(), HarnessError> {
    let dir = ocm_crds_dir().join("hub");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            HarnessError::io(
                format!(
                    "reading OCM's hub CRDs in {} (run tests/env/install.sh)",
                    dir.display()
                ),
                e,
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let yaml = std::fs::read_to_string(&file)
            .map_err(|e| HarnessError::io(format!("reading {}", file.display()), e))?;
        install_crd_yaml(client, &file.display().to_string(), &yaml).await?;
    }
    Ok(())
}

/// The CA the gRPC server trusts for clients, and its key (the registration controller signs
/// gRPC agents' certificates with it), in the hub's directory.
const GRPC_CLIENT_CA: &str = "grpc-client-ca.crt";
const GRPC_CLIENT_CA_KEY: &str = "grpc-client-ca.key";

/// The gRPC server's PKI and configuration file (OCM's `--server-config` format).
fn grpc_server_files(dir: &Path, port: u16) -> Result<(GrpcEndpoint, PathBuf), HarnessError> {
    let serving_ca = CertificateAuthority::new("ocm-grpc-serving-ca")?;
    let client_ca = CertificateAuthority::new("ocm-grpc-client-ca")?;
    let serving = serving_ca.issue_server("ocm-grpc", &["127.0.0.1", "localhost"])?;
    let files = [
        ("grpc-tls.crt", serving.cert_pem.as_str()),
        ("grpc-tls.key", serving.key_pem.as_str()),
        (GRPC_CLIENT_CA, client_ca.cert_pem()),
        (GRPC_CLIENT_CA_KEY, &client_ca.key_pem()),
    ];
    for (name, pem) in files {
        write_private(&dir.join(name), pem)?;
    }
    let config = dir.join("grpc-server.yaml");
    let yaml = format!(
        "tls_cert_file: {d}/grpc-tls.crt\ntls_key_file: {d}/grpc-tls.key\nclient_ca_file: {d}/grpc-client-ca.crt\nserver_bind_port: \"{port}\"\n",
        d = dir.display()
    );
    write_private(&config, &yaml)?;
    let endpoint = GrpcEndpoint {
        url: format!("https://127.0.0.1:{port}"),
        serving_ca,
        client_ca,
    };
    Ok((endpoint, config))
}

/// Waits until `process` accepts connections on 127.0.0.1:`port`.
async fn wait_for_port(process: &mut ManagedProcess, port: u16) -> Result<(), HarnessError> {
    let deadline = Instant::now() + start_budget();
    loop {
        process.check_running()?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(process.start_failed(format!("not listening on 127.0.0.1:{port} in time")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn invalid(what: &str, reason: impl ToString) -> HarnessError {
    HarnessError::InvalidManifest {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}
