//! Hub connection settings: the reference-format YAML file (`url`, `caFile`, ...) and the `--hub-*` flags.
//!
//! Flags (and their `SPOKELET_*` environment variables) override the file, field by field.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::tls::{PemSource, TlsOptions};
use spokelet_base::duration::parse_duration;

/// Bad hub settings.
#[derive(Debug, thiserror::Error)]
pub enum HubConfigError {
    /// The hub config file cannot be read.
    #[error("reading hub config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The hub config file is not valid YAML of the expected shape.
    #[error("parsing hub config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    /// A required setting is missing.
    #[error("hub setting missing: {0}")]
    Missing(&'static str),
    /// The hub URL cannot be used.
    #[error("invalid hub url {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Plaintext was asked for without explicitly allowing it.
    #[error(
        "hub url {0:?} is plaintext; refusing to send credentials and works unencrypted (set --insecure-plaintext to allow it)"
    )]
    Plaintext(String),
    /// Both an inline value and a file were given for the same input, or two settings that
    /// exclude each other.
    #[error("both {0} and {1} are set; use one")]
    Conflict(&'static str, &'static str),
    /// A TLS setting that is not understood.
    #[error("invalid minTLSVersion {0:?}: expected \"1.2\" or \"1.3\"")]
    TlsVersion(String),
}

/// Which hub API spokelet talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HubTransport {
    /// CloudEvents over gRPC (OCM "grpc" driver, Maestro).
    Grpc,
    /// The hub's Kubernetes API (classic klusterlet).
    Kube,
}

/// HTTP/2 keepalive, as the reference config spells it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KeepAliveConfig {
    /// Send HTTP/2 pings at all. Off by default: hub heartbeats already detect dead streams.
    pub enable: bool,
    /// Interval between pings.
    #[serde(deserialize_with = "de_duration")]
    pub time: Duration,
    /// How long to wait for a ping's answer before dropping the connection.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Ping even when no stream is open.
    pub permit_without_stream: bool,
}

impl Default for KeepAliveConfig {
    fn default() -> Self {
        // The reference defaults.
        KeepAliveConfig {
            enable: false,
            time: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            permit_without_stream: false,
        }
    }
}

/// Durations are Go-style strings (`30s`) in the reference format; bare numbers are seconds.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        /// Seconds.
        Num(u64),
        /// `30s`, `1m30s`, ...
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Duration::from_secs(n)),
        Raw::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// The hub connection config file, in the reference implementation's field names.
#[derive(Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HubConfigFile {
    /// Hub address: `https://host:port`, `host:port` (TLS), or `http://host:port` (plaintext).
    pub url: Option<String>,
    /// CA bundle file that signs the hub's certificate.
    pub ca_file: Option<PathBuf>,
    /// CA bundle inline (PEM or base64 of PEM).
    pub ca_data: Option<String>,
    /// Client certificate file.
    pub client_cert_file: Option<PathBuf>,
    /// Client certificate inline.
    pub client_cert_data: Option<String>,
    /// Client key file.
    pub client_key_file: Option<PathBuf>,
    /// Client key inline.
    pub client_key_data: Option<String>,
    /// Bearer token inline.
    pub token: Option<String>,
    /// Bearer token file, re-read on each connect so rotated tokens are picked up.
    pub token_file: Option<PathBuf>,
    /// HTTP/2 pings; absent means none (see [`KeepAliveConfig`]).
    pub keep_alive_config: Option<KeepAliveConfig>,
    /// Our extension: `"1.2"` also allows TLS 1.2; default is TLS 1.3 only.
    #[serde(rename = "minTLSVersion")]
    pub min_tls_version: Option<String>,
    /// Our extension: allow an `http://` URL (logged loudly on every connect).
    pub insecure_plaintext: Option<bool>,
}

impl fmt::Debug for HubConfigFile {
    // Inline key and token stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfigFile")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("ca_data", &self.ca_data.as_ref().map(|_| "<set>"))
            .field("client_cert_file", &self.client_cert_file)
            .field(
                "client_cert_data",
                &self.client_cert_data.as_ref().map(|_| "<set>"),
            )
            .field("client_key_file", &self.client_key_file)
            .field(
                "client_key_data",
                &self.client_key_data.as_ref().map(|_| "<redacted>"),
            )
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("keep_alive_config", &self.keep_alive_config)
            .field("min_tls_version", &self.min_tls_version)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .finish()
    }
}

impl HubConfigFile {
    /// Reads and parses a hub config file.
    pub fn load(path: &std::path::Path) -> Result<Self, HubConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| HubConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| HubConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses hub config YAML.
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(HubConfigFile::default());
        }
        serde_yaml::from_str(text)
    }
}

/// Hub flags of `spokelet run`.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Hub transport; without one, works come from the local works directory only.
    #[arg(long, env = "SPOKELET_HUB_TRANSPORT", value_enum)]
    pub hub_transport: Option<HubTransport>,

    /// Hub connection file in the reference format (`url`, `caFile`, `clientCertFile`, ...).
    #[arg(long, env = "SPOKELET_HUB_CONFIG", value_name = "FILE")]
    pub hub_config: Option<PathBuf>,

    /// Hub address (`https://host:port` or `host:port`); overrides `url` in the hub config.
    #[arg(long, env = "SPOKELET_HUB_URL")]
    pub hub_url: Option<String>,

    /// CA bundle for the hub's certificate; overrides `caFile`.
    #[arg(long, env = "SPOKELET_HUB_CA_FILE", value_name = "FILE")]
    pub hub_ca_file: Option<PathBuf>,

    /// Client certificate; overrides `clientCertFile`. Reloaded when it changes on disk.
    #[arg(long, env = "SPOKELET_HUB_CLIENT_CERT_FILE", value_name = "FILE")]
    pub hub_client_cert_file: Option<PathBuf>,

    /// Client key; overrides `clientKeyFile`. Reloaded when it changes on disk.
    #[arg(long, env = "SPOKELET_HUB_CLIENT_KEY_FILE", value_name = "FILE")]
    pub hub_client_key_file: Option<PathBuf>,

    /// Bearer token file; overrides `tokenFile`. Re-read on every connect.
    #[arg(long, env = "SPOKELET_HUB_TOKEN_FILE", value_name = "FILE")]
    pub hub_token_file: Option<PathBuf>,

    /// This cluster's name on the hub (the namespace its works live in).
    #[arg(long, env = "SPOKELET_CLUSTER_NAME")]
    pub cluster_name: Option<String>,

    /// This agent's id, the `source` of the status it sends; defaults to the cluster name. Not a
    /// flag of its own: `spokelet run` already has `--agent-id` (the engine's), and the caller
    /// copies it here so there is one spelling.
    #[arg(skip)]
    pub agent_id: Option<String>,

    /// Reconnect when the hub has sent nothing (not even a heartbeat, every 10 s by default) for this long.
    #[arg(long, env = "SPOKELET_HUB_HEARTBEAT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub hub_heartbeat_timeout: Duration,

    /// Allow an `http://` hub URL. Works and status then travel unencrypted; logged on every connect.
    #[arg(long, env = "SPOKELET_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,

    /// Lowest TLS version offered to the hub: `1.3` (the default) or `1.2`, for a hub that
    /// cannot speak 1.3. Overrides the hub file's `minTLSVersion`; logged when 1.2 is allowed.
    #[arg(long, env = "SPOKELET_HUB_MIN_TLS_VERSION", value_name = "VERSION")]
    pub hub_min_tls_version: Option<String>,

    /// Accept a Kubernetes hub whose kubeconfig sets `insecure-skip-tls-verify`: its
    /// certificate is then not verified, so anyone on the path can pose as the hub. Refused
    /// without this flag; logged at every start.
    #[arg(long, env = "SPOKELET_HUB_INSECURE_SKIP_TLS_VERIFY")]
    pub hub_insecure_skip_tls_verify: bool,

    /// Kubeconfig (client certificate) for the hub's API server, for `--hub-transport kube`.
    #[arg(long, env = "SPOKELET_HUB_KUBECONFIG", value_name = "FILE")]
    pub hub_kubeconfig: Option<PathBuf>,

    /// Renew interval of the `managed-cluster-lease` on a Kubernetes hub that serves no
    /// ManagedCluster to the agent; an OCM hub's ManagedCluster sets its own
    /// (`spec.leaseDurationSeconds`), which wins.
    #[arg(long, env = "SPOKELET_HUB_LEASE_DURATION", default_value = "60s", value_parser = parse_duration)]
    pub hub_lease_duration: Duration,

    /// Bootstrap kubeconfig for `--hub-transport kube`, instead of `--hub-kubeconfig`: the
    /// agent joins the hub as OCM's registration agent does (creates its ManagedCluster and a
    /// certificate request, waits for approval and acceptance) and runs from the certificate
    /// issued, kept in `--hub-credentials-secret` and written to `--hub-credentials-dir`.
    #[arg(long, env = "SPOKELET_BOOTSTRAP_HUB_KUBECONFIG", value_name = "FILE")]
    pub bootstrap_hub_kubeconfig: Option<PathBuf>,

    /// Bootstrap config for `--hub-transport grpc`, instead of `--hub-config`, in OCM's gRPC
    /// bootstrap format (`url`, `caFile`/`caData`, a bootstrap client certificate or token):
    /// the agent joins over OCM's gRPC server and runs from the `config.yaml` it writes to
    /// `--hub-credentials-dir` (kept in `--hub-credentials-secret`).
    #[arg(long, env = "SPOKELET_BOOTSTRAP_HUB_CONFIG", value_name = "FILE")]
    pub bootstrap_hub_config: Option<PathBuf>,

    /// Where a joined agent's hub credentials are written (`kubeconfig`, `tls.crt`, `tls.key`).
    #[arg(
        long,
        env = "SPOKELET_HUB_CREDENTIALS_DIR",
        value_name = "DIR",
        default_value = "/var/lib/spokelet/hub"
    )]
    pub hub_credentials_dir: PathBuf,

    /// The Secret, in the agent's namespace, that keeps a joined agent's hub credentials
    /// across restarts (OCM's name and layout).
    #[arg(
        long,
        env = "SPOKELET_HUB_CREDENTIALS_SECRET",
        default_value = "hub-kubeconfig-secret"
    )]
    pub hub_credentials_secret: String,

    /// The spoke's API server URL as the hub is to reach it, written into a ManagedCluster the
    /// agent creates; default: the URL the agent itself uses.
    #[arg(long, env = "SPOKELET_SPOKE_EXTERNAL_SERVER_URL")]
    pub spoke_external_server_url: Option<String>,

    /// The agent's namespace (where the credential Secret lives); copied from `spokelet run`'s
    /// `--agent-namespace` by the caller, like `agent_id`.
    #[arg(skip)]
    pub agent_namespace: Option<String>,
}

impl Default for HubArgs {
    fn default() -> Self {
        HubArgs {
            hub_transport: None,
            hub_config: None,
            hub_url: None,
            hub_ca_file: None,
            hub_client_cert_file: None,
            hub_client_key_file: None,
            hub_token_file: None,
            cluster_name: None,
            agent_id: None,
            hub_heartbeat_timeout: Duration::from_secs(30),
            hub_min_tls_version: None,
            hub_insecure_skip_tls_verify: false,
            insecure_plaintext: false,
            hub_kubeconfig: None,
            hub_lease_duration: Duration::from_secs(60),
            bootstrap_hub_kubeconfig: None,
            bootstrap_hub_config: None,
            hub_credentials_dir: PathBuf::from("/var/lib/spokelet/hub"),
            hub_credentials_secret: "hub-kubeconfig-secret".to_string(),
            spoke_external_server_url: None,
            agent_namespace: None,
        }
    }
}

/// Where the bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Given inline in the config file: fixed until restart.
    Inline(String),
    /// Read from this file on each connect.
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl TokenSource {
    /// The token now (trimmed); errors name the file only.
    pub fn read(&self) -> Result<String, std::io::Error> {
        match self {
            TokenSource::Inline(t) => Ok(t.trim().to_string()),
            TokenSource::File(p) => Ok(std::fs::read_to_string(p)?.trim().to_string()),
        }
    }
}

/// A parsed hub address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    /// True for `http://`.
    pub plaintext: bool,
    /// Host name or IP (IPv6 in brackets).
    pub host: String,
    /// 443 for `https://` and 80 for `http://` when the URL names none; required without a scheme.
    pub port: u16,
}

impl HubUrl {
    /// Parses `https://host:port`, `http://host:port` or `host:port`.
    pub fn parse(url: &str) -> Result<HubUrl, HubConfigError> {
        let bad = |reason: &str| HubConfigError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (plaintext, rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
            (false, r, Some(443))
        } else if let Some(r) = url.strip_prefix("http://") {
            (true, r, Some(80))
        } else if url.contains("://") {
            return Err(bad("scheme must be https:// or http://"));
        } else {
            (false, url, None)
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') {
            return Err(bad("expected host:port without path or user info"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed IPv6 bracket"))?;
            (format!("[{h}]"), tail.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("empty host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("port is not a number"))?,
            None => default_port.ok_or_else(|| bad("missing port"))?,
        };
        Ok(HubUrl {
            plaintext,
            host,
            port,
        })
    }

    /// `scheme://host:port` for logs and tonic.
    pub fn uri(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.plaintext { "http" } else { "https" },
            self.host,
            self.port
        )
    }
}

/// Everything the gRPC transport needs, merged from file and flags.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Where to dial; a plaintext URL also needs `insecure_plaintext`.
    pub url: HubUrl,
    /// TLS inputs (unused for plaintext).
    pub tls: TlsOptions,
    /// Bearer token, sent as `authorization: Bearer ...` when set.
    pub token: Option<TokenSource>,
    /// HTTP/2 pings, off unless enabled (hub heartbeats already detect dead streams).
    pub keep_alive: KeepAliveConfig,
    /// This cluster's name on the hub: the subscription's cluster and the namespace of its works.
    pub cluster_name: String,
    /// Our agent id (status `source`).
    pub agent_id: String,
    /// Reconnect after this long without any message from the hub.
    pub heartbeat_timeout: Duration,
    /// Plaintext explicitly allowed.
    pub insecure_plaintext: bool,
}

/// Picks the file or the inline value, refusing both.
fn pick(
    file: Option<PathBuf>,
    data: Option<String>,
    names: (&'static str, &'static str),
) -> Result<Option<PemSource>, HubConfigError> {
    match (file, data) {
        (Some(_), Some(_)) => Err(HubConfigError::Conflict(names.0, names.1)),
        (Some(f), None) => Ok(Some(PemSource::File(f))),
        (None, Some(d)) => Ok(Some(PemSource::Inline(d.into_bytes()))),
        (None, None) => Ok(None),
    }
}

/// Settings of the Kubernetes-hub transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeHubSettings {
    /// Kubeconfig for the hub API server (with a bootstrap, the one the join writes).
    pub kubeconfig: PathBuf,
    /// Join with a bootstrap credential first.
    pub bootstrap: Option<BootstrapSettings>,
    /// Our cluster name (the namespace of our works and lease).
    pub cluster_name: String,
    /// Our agent id (lease holder).
    pub agent_id: String,
    /// Lease duration and renew interval.
    pub lease_duration: Duration,
    /// What the connection may relax (plain http, an unverified certificate, TLS 1.2).
    pub security: HubSecurity,
}

/// The selected transport with its settings.
#[derive(Debug, Clone)]
pub enum ResolvedHub {
    /// CloudEvents over gRPC: pass to [`GrpcHubOptions::new`](super::grpc::GrpcHubOptions::new).
    Grpc(HubSettings),
    /// CloudEvents over gRPC after joining with `bootstrap` (`--bootstrap-hub-config`); the
    /// transport's settings come from the config the join writes.
    GrpcJoin {
        bootstrap: Box<HubSettings>,
        join: BootstrapSettings,
    },
    /// Kubernetes API: build a client with
    /// [`client_from_kubeconfig`](super::kube_hub::client_from_kubeconfig).
    Kube(KubeHubSettings),
}

/// How to join with a bootstrap credential (`--bootstrap-hub-kubeconfig` or
/// `--bootstrap-hub-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapSettings {
    /// The bootstrap kubeconfig or gRPC config.
    pub credential: PathBuf,
    /// Where the credentials are written.
    pub dir: PathBuf,
    /// The Secret keeping them, in the agent's namespace.
    pub secret: String,
    pub agent_namespace: String,
    /// `--spoke-external-server-url`.
    pub spoke_url: Option<String>,
}

impl BootstrapSettings {
    /// The kubeconfig the Kubernetes hub's join writes and its transport runs from.
    pub fn runs_from(&self) -> PathBuf {
        kubeconfig_in(&self.dir)
    }

    /// The flags the transport runs with after a gRPC join: the joined config file instead
    /// of the bootstrap, and none of the bootstrap's credential flags.
    pub fn joined_args(&self, args: &HubArgs) -> HubArgs {
        HubArgs {
            hub_config: Some(grpc_config_in(&self.dir)),
            bootstrap_hub_config: None,
            hub_client_cert_file: None,
            hub_client_key_file: None,
            hub_token_file: None,
            ..args.clone()
        }
    }
}

impl HubArgs {
    /// The bootstrap settings around the bootstrap credential `file`.
    fn bootstrap(&self, file: Option<&PathBuf>) -> Option<BootstrapSettings> {
        file.map(|k| BootstrapSettings {
            credential: k.clone(),
            dir: self.hub_credentials_dir.clone(),
            secret: self.hub_credentials_secret.clone(),
            agent_namespace: self
                .agent_namespace
                .clone()
                .unwrap_or_else(|| "spokelet-system".to_string()),
            spoke_url: self.spoke_external_server_url.clone(),
        })
    }

    /// Merges the file (if any) under the flags. `Ok(None)` when no hub transport is selected.
    pub fn resolve(&self) -> Result<Option<ResolvedHub>, HubConfigError> {
        match self.hub_transport {
            None => Ok(None),
            Some(HubTransport::Grpc) => self.resolve_grpc().map(Some),
            Some(HubTransport::Kube) => self.resolve_kube().map(|k| Some(ResolvedHub::Kube(k))),
        }
    }

    /// The gRPC transport's settings: from `--hub-config` (and flags), or a join with
    /// `--bootstrap-hub-config` first.
    fn resolve_grpc(&self) -> Result<ResolvedHub, HubConfigError> {
        if self.bootstrap_hub_kubeconfig.is_some() {
            return Err(HubConfigError::Conflict(
                "--hub-transport grpc",
                "--bootstrap-hub-kubeconfig (use --bootstrap-hub-config)",
            ));
        }
        match (
            &self.hub_config,
            self.bootstrap(self.bootstrap_hub_config.as_ref()),
        ) {
            (Some(_), Some(_)) => Err(HubConfigError::Conflict("--hub-config", "--bootstrap-hub-config")),
            (None, Some(join)) => {
                let bootstrap = self.merge(HubConfigFile::load(&join.credential)?)?;
                Ok(ResolvedHub::GrpcJoin {
                    bootstrap: Box::new(bootstrap),
                    join,
                })
            }
            (file, None) => {
                let file = match file {
                    Some(p) => HubConfigFile::load(p)?,
                    None => HubConfigFile::default(),
                };
                self.merge(file).map(ResolvedHub::Grpc)
            }
        }
    }

    /// The Kubernetes-hub transport's settings: `--hub-kubeconfig`, or a join with
    /// `--bootstrap-hub-kubeconfig` first.
    fn resolve_kube(&self) -> Result<KubeHubSettings, HubConfigError> {
        if self.bootstrap_hub_config.is_some() {
            return Err(HubConfigError::Conflict(
                "--hub-transport kube",
                "--bootstrap-hub-config (use --bootstrap-hub-kubeconfig)",
            ));
        }
        let bootstrap = self.bootstrap(self.bootstrap_hub_kubeconfig.as_ref());
        let kubeconfig = match (&self.hub_kubeconfig, &bootstrap) {
            (Some(_), Some(_)) => {
                return Err(HubConfigError::Conflict(
                    "--hub-kubeconfig",
                    "--bootstrap-hub-kubeconfig",
                ));
            }
            (Some(k), None) => k.clone(),
            (None, Some(b)) => b.runs_from(),
            (None, None) => {
                return Err(HubConfigError::Missing(
                    "--hub-kubeconfig or --bootstrap-hub-kubeconfig",
                ));
            }
        };
        let cluster_name = self
            .cluster_name
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or(HubConfigError::Missing("--cluster-name"))?;
        let agent_id = self
            .agent_id
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| cluster_name.clone());
        let security = HubSecurity {
            allow_plaintext: self.insecure_plaintext,
            allow_unverified: self.hub_insecure_skip_tls_verify,
            allow_tls12: allow_tls12(self.hub_min_tls_version.as_deref())?,
        };
        Ok(KubeHubSettings {
            kubeconfig,
            bootstrap,
            cluster_name,
            agent_id,
            lease_duration: self.hub_lease_duration,
            security,
        })
    }

    /// Merges `file` under the flags.
    pub fn merge(&self, mut file: HubConfigFile) -> Result<HubSettings, HubConfigError> {
        self.drop_overridden_inline(&mut file);
        let url_text = self
            .hub_url
            .clone()
            .or(file.url)
            .ok_or(HubConfigError::Missing("--hub-url or url"))?;
        let url = HubUrl::parse(&url_text)?;
        let insecure_plaintext = self.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
        if url.plaintext && !insecure_plaintext {
            return Err(HubConfigError::Plaintext(url_text));
        }
        let allow_tls12 = allow_tls12(
            self.hub_min_tls_version
                .as_deref()
                .or(file.min_tls_version.as_deref()),
        )?;
        let tls = TlsOptions {
            ca: pick(
                self.hub_ca_file.clone().or(file.ca_file),
                file.ca_data,
                ("caFile", "caData"),
            )?,
            client_cert: pick(
                self.hub_client_cert_file.clone().or(file.client_cert_file),
                file.client_cert_data,
                ("clientCertFile", "clientCertData"),
            )?,
            client_key: pick(
                self.hub_client_key_file.clone().or(file.client_key_file),
                file.client_key_data,
                ("clientKeyFile", "clientKeyData"),
            )?,
            allow_tls12,
        };
        let token = pick_token(self.hub_token_file.clone().or(file.token_file), file.token)?;
        let cluster_name = self
            .cluster_name
            .clone()
            .ok_or(HubConfigError::Missing("--cluster-name"))?;
        if cluster_name.is_empty() {
            return Err(HubConfigError::Missing("--cluster-name"));
        }
        let agent_id = self
            .agent_id
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| cluster_name.clone());
        Ok(HubSettings {
            url,
            tls,
            token,
            keep_alive: file.keep_alive_config.unwrap_or_default(),
            cluster_name,
            agent_id,
            heartbeat_timeout: self.hub_heartbeat_timeout,
            insecure_plaintext,
        })
    }

    /// A flag replaces both spellings of its input in the file, so a file flag does not conflict
    /// with the file's inline data.
    fn drop_overridden_inline(&self, file: &mut HubConfigFile) {
        if self.hub_ca_file.is_some() {
            file.ca_data = None;
        }
        if self.hub_client_cert_file.is_some() {
            file.client_cert_data = None;
        }
        if self.hub_client_key_file.is_some() {
            file.client_key_data = None;
        }
        if self.hub_token_file.is_some() {
            file.token = None;
        }
    }
}

/// Whether `minTLSVersion` allows TLS 1.2 (unset means TLS 1.3 only).
fn allow_tls12(min_tls_version: Option<&str>) -> Result<bool, HubConfigError> {
    match min_tls_version {
        None | Some("1.3") => Ok(false),
        Some("1.2") => Ok(true),
        Some(other) => Err(HubConfigError::TlsVersion(other.to_string())),
    }
}

/// The token file or the inline token, refusing both.
fn pick_token(file: Option<PathBuf>, inline: Option<String>) -> Result<Option<TokenSource>, HubConfigError> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(HubConfigError::Conflict("token", "tokenFile")),
        (Some(f), None) => Ok(Some(TokenSource::File(f))),
        (None, Some(t)) => Ok(Some(TokenSource::Inline(t))),
        (None, None) => Ok(None),
    }
}

/// What the hub connection may relax. Each only by its own explicit flag, and each logged as a
/// warning when used: the hub hands the agent cluster-admin work, so by default its server is
/// `https://`, its certificate verified against the kubeconfig's CA, and TLS 1.3 only (as the
/// gRPC transport).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubSecurity {
    /// `--insecure-plaintext`: an `http://` hub server (works and status unencrypted).
    pub allow_plaintext: bool,
    /// `--hub-insecure-skip-tls-verify`: honour the kubeconfig's `insecure-skip-tls-verify`
    /// (anyone on the path can pose as the hub).
    pub allow_unverified: bool,
    /// `--hub-min-tls-version 1.2`: offer TLS 1.2 as well as 1.3.
    pub allow_tls12: bool,
}

/// The file a joined agent's Kubernetes-hub credentials run from, in its credentials directory
/// (also the key in the Secret that keeps them, as OCM's registration agent names it).
pub const KUBECONFIG: &str = "kubeconfig";
/// The gRPC transport's config file (OCM's `config.yaml`, naming the files beside it).
pub const GRPC_CONFIG: &str = "config.yaml";

/// The kubeconfig path the credentials in `dir` are run from.
pub fn kubeconfig_in(dir: &Path) -> PathBuf {
    dir.join(KUBECONFIG)
}

/// The gRPC config path the credentials in `dir` are run from.
pub fn grpc_config_in(dir: &Path) -> PathBuf {
    dir.join(GRPC_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        hub: HubArgs,
    }

    #[test]
    fn parses_reference_file() {
        let f = HubConfigFile::parse(
            r#"
url: hub.example.com:8090
caFile: /etc/hub/ca.crt
clientCertFile: /etc/hub/tls.crt
clientKeyFile: /etc/hub/tls.key
tokenFile: /etc/hub/token
keepAliveConfig:
  enable: true
  time: 20s
  timeout: 5
  permitWithoutStream: true
"#,
        )
        .unwrap();
        assert_eq!(f.url.as_deref(), Some("hub.example.com:8090"));
        let ka = f.keep_alive_config.clone().unwrap();
        assert!(ka.enable && ka.permit_without_stream);
        assert_eq!(ka.time, Duration::from_secs(20));
        assert_eq!(ka.timeout, Duration::from_secs(5));
        let args = HubArgs {
            cluster_name: Some("c1".into()),
            ..Default::default()
        };
        let s = args.merge(f).unwrap();
        assert_eq!(
            s.url,
            HubUrl {
                plaintext: false,
                host: "hub.example.com".into(),
                port: 8090
            }
        );
        assert_eq!(s.tls.ca, Some(PemSource::File("/etc/hub/ca.crt".into())));
        assert_eq!(s.token, Some(TokenSource::File("/etc/hub/token".into())));
        assert_eq!(s.agent_id, "c1");
        assert!(!s.tls.allow_tls12);
    }

    #[test]
    fn flags_override_file() {
        let cli = Cli::try_parse_from([
            "x",
            "--hub-transport",
            "grpc",
            "--hub-url",
            "https://10.0.0.1:9443",
            "--hub-ca-file",
            "/flag/ca",
            "--cluster-name",
            "c2",
            "--hub-heartbeat-timeout",
            "45s",
        ])
        .unwrap();
        let mut cli = cli;
        cli.hub.agent_id = Some("a2".into());
        let file = HubConfigFile::parse("url: other:1\ncaData: QUJD\ntoken: secret\n").unwrap();
        let s = cli.hub.merge(file).unwrap();
        assert_eq!(s.url.host, "10.0.0.1");
        assert_eq!(s.url.port, 9443);
        assert_eq!(s.tls.ca, Some(PemSource::File("/flag/ca".into())));
        assert_eq!(s.heartbeat_timeout, Duration::from_secs(45));
        assert_eq!(s.agent_id, "a2");
        assert!(!format!("{s:?}").contains("secret"));
        assert_eq!(cli.hub.hub_transport, Some(HubTransport::Grpc));
    }

    #[test]
    fn refuses_plaintext_unless_allowed() {
        let args = HubArgs {
            hub_url: Some("http://127.0.0.1:8090".into()),
            cluster_name: Some("c".into()),
            ..Default::default()
        };
        assert!(matches!(
            args.merge(HubConfigFile::default()),
            Err(HubConfigError::Plaintext(_))
        ));
        let args = HubArgs {
            insecure_plaintext: true,
            ..args
        };
        assert!(args.merge(HubConfigFile::default()).unwrap().url.plaintext);
    }

    #[test]
    fn a_grpc_bootstrap_config_resolves_to_a_join_and_the_joined_flags_to_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = dir.path().join("bootstrap.yaml");
        std::fs::write(&bootstrap, "url: https://hub.example:8090\ntoken: t0ken\n").unwrap();
        let args = HubArgs {
            hub_transport: Some(HubTransport::Grpc),
            bootstrap_hub_config: Some(bootstrap.clone()),
            hub_credentials_dir: dir.path().join("hub"),
            cluster_name: Some("pool-a".into()),
            ..HubArgs::default()
        };
        let Some(ResolvedHub::GrpcJoin { bootstrap: b, join }) = args.resolve().unwrap() else {
            panic!("a join")
        };
        assert_eq!(b.url.uri(), "https://hub.example:8090");
        assert_eq!(join.credential, bootstrap);
        let joined = join.joined_args(&args);
        assert_eq!(
            joined.hub_config,
            Some(dir.path().join("hub").join("config.yaml"))
        );
        assert!(joined.bootstrap_hub_config.is_none());
        // Each bootstrap flag belongs to its own transport, and a join replaces --hub-config.
        let both = HubArgs {
            hub_config: Some(bootstrap.clone()),
            ..args.clone()
        };
        assert!(matches!(both.resolve(), Err(HubConfigError::Conflict(..))));
        let kube = HubArgs {
            hub_transport: Some(HubTransport::Kube),
            ..args.clone()
        };
        assert!(matches!(kube.resolve(), Err(HubConfigError::Conflict(..))));
        let kubeconfig_on_grpc = HubArgs {
            bootstrap_hub_config: None,
            bootstrap_hub_kubeconfig: Some(bootstrap),
            ..args
        };
        assert!(matches!(
            kubeconfig_on_grpc.resolve(),
            Err(HubConfigError::Conflict(..))
        ));
    }

    #[test]
    fn resolves_kube_transport() {
        let cli = Cli::try_parse_from([
            "x",
            "--hub-transport",
            "kube",
            "--hub-kubeconfig",
            "/etc/hub/kubeconfig",
            "--cluster-name",
            "c3",
        ])
        .unwrap();
        let Some(ResolvedHub::Kube(k)) = cli.hub.resolve().unwrap() else {
            panic!("not kube")
        };
        assert_eq!(k.kubeconfig, PathBuf::from("/etc/hub/kubeconfig"));
        assert_eq!(k.lease_duration, Duration::from_secs(60));
        assert_eq!(k.agent_id, "c3");
        let none = Cli::try_parse_from(["x"]).unwrap();
        assert!(none.hub.resolve().unwrap().is_none());
    }

    #[test]
    fn url_forms() {
        assert_eq!(HubUrl::parse("https://h").unwrap().port, 443);
        assert_eq!(HubUrl::parse("[::1]:8090").unwrap().host, "[::1]");
        assert!(HubUrl::parse("h").is_err());
        assert!(HubUrl::parse("grpc://h:1").is_err());
        assert!(HubUrl::parse("https://h:1/path").is_err());
        assert!(HubUrl::parse("https://:1").is_err());
        assert_eq!(HubUrl::parse("https://h:1/").unwrap().uri(), "https://h:1");
    }

    #[test]
    fn conflicts_and_missing() {
        let base = HubArgs {
            hub_url: Some("h:1".into()),
            ..Default::default()
        };
        assert!(matches!(
            base.merge(HubConfigFile::default()),
            Err(HubConfigError::Missing(_))
        ));
        let args = HubArgs {
            cluster_name: Some("c".into()),
            ..base
        };
        let f = HubConfigFile::parse("caFile: /a\ncaData: b\n").unwrap();
        assert!(matches!(args.merge(f), Err(HubConfigError::Conflict(..))));
        let f = HubConfigFile::parse("minTLSVersion: \"1.1\"\n").unwrap();
        assert!(matches!(args.merge(f), Err(HubConfigError::TlsVersion(_))));
        let f = HubConfigFile::parse("minTLSVersion: \"1.2\"\n").unwrap();
        assert!(args.merge(f).unwrap().tls.allow_tls12);
    }
}
