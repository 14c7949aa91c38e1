//! The hub credentials the join earned: kept in a Secret in the agent's namespace (OCM's
//! `hub-kubeconfig-secret` layout) so a restart reuses them, and written as files the hub
//! transport runs from (a kubeconfig for the Kubernetes hub, OCM's gRPC `config.yaml` for
//! the gRPC hub), which it re-reads when a renewal replaces them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

/// The Secret's keys, as OCM's registration agent writes them (the kubeconfig and the gRPC
/// config file are named with the hub settings, which run from them).
use crate::config::{GRPC_CONFIG, KUBECONFIG};
pub(crate) const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";
const CLUSTER: &str = "cluster-name";
const AGENT: &str = "agent-name";

/// Why credentials cannot be kept or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("writing {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the hub credential Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Which transport the credentials are for, so which file they are run from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The hub's Kubernetes API: a kubeconfig.
    Kube,
    /// OCM's CloudEvents gRPC server: its config file format.
    Grpc {
        /// The bootstrap's `minTLSVersion: "1.2"`, carried over.
        allow_tls12: bool,
    },
}

impl Wire {
    /// The file (and Secret key) the transport runs from.
    pub(crate) fn config_file(self) -> &'static str {
        match self {
            Wire::Kube => KUBECONFIG,
            Wire::Grpc { .. } => GRPC_CONFIG,
        }
    }
}

/// A client certificate the hub issued, with what reaching the hub takes.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The transport they are for.
    pub wire: Wire,
    /// The hub's URL, from the bootstrap credential.
    pub server: String,
    /// The CA bundle the hub is verified with (PEM), from the bootstrap kubeconfig; None uses
    /// the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The issued certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// Its private key (PEM); made on the spoke, never sent anywhere.
    pub key_pem: Vec<u8>,
    pub cluster: String,
    pub agent: String,
}

impl std::fmt::Debug for Credentials {
    // The key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("wire", &self.wire)
            .field("server", &self.server)
            .field("cluster", &self.cluster)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials read back from where they were kept, reached at `server` (and `ca_pem`) as
    /// the bootstrap credential names it now.
    fn kept(
        wire: Wire,
        (server, ca_pem): (&str, Option<&[u8]>),
        (cert_pem, key_pem): (Vec<u8>, Vec<u8>),
        (cluster, agent): (&str, &str),
    ) -> Credentials {
        Credentials {
            wire,
            server: server.to_string(),
            ca_pem: ca_pem.map(<[u8]>::to_vec),
            cert_pem,
            key_pem,
            cluster: cluster.to_string(),
            agent: agent.to_string(),
        }
    }

    /// A kubeconfig naming the certificate and key files beside it (relative paths, resolved
    /// against the kubeconfig's own directory, as OCM's hub kubeconfig does).
    pub fn kubeconfig(&self) -> String {
        use base64::Engine;
        let ca = match &self.ca_pem {
            Some(pem) => format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            ),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: hub\n  cluster:\n    server: {server}\n{ca}contexts:\n- name: hub\n  context:\n    cluster: hub\n    user: {user}\ncurrent-context: hub\nusers:\n- name: {user}\n  user:\n    client-certificate: {CERT}\n    client-key: {KEY}\n",
            server = self.server,
            user = self.agent,
        )
    }

    /// OCM's gRPC config file naming the certificate and key files in `dir` (absolute: our
    /// config reader, like OCM's, takes paths as written).
    pub fn grpc_config(&self, dir: &Path) -> String {
        use base64::Engine;
        let mut out = format!("url: {}\n", self.server);
        if let Some(pem) = &self.ca_pem {
            out.push_str(&format!(
                "caData: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            ));
        }
        out.push_str(&format!(
            "clientCertFile: {}\nclientKeyFile: {}\n",
            dir.join(CERT).display(),
            dir.join(KEY).display()
        ));
        if matches!(self.wire, Wire::Grpc { allow_tls12: true }) {
            out.push_str("minTLSVersion: \"1.2\"\n");
        }
        out
    }

    /// The config the transport runs from, for its wire, naming files in `dir`.
    fn config(&self, dir: &Path) -> String {
        match self.wire {
            Wire::Kube => self.kubeconfig(),
            Wire::Grpc { .. } => self.grpc_config(dir),
        }
    }

    /// Writes the files the hub transport reads into `dir`: the key and certificate first,
    /// each through a file renamed into place (a reader never sees half of one), the
    /// config (kubeconfig or gRPC config) last. Returns the config's path.
    pub fn write_files(&self, dir: &Path) -> Result<PathBuf, StoreError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::File { path, source }
        };
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        // Absolute, so the gRPC config names the files wherever the agent runs from.
        let dir = std::path::absolute(dir).map_err(err(dir))?;
        write_atomic(&dir.join(KEY), &self.key_pem, true)?;
        write_atomic(&dir.join(CERT), &self.cert_pem, false)?;
        let config = dir.join(self.wire.config_file());
        write_atomic(&config, self.config(&dir).as_bytes(), false)?;
        Ok(config)
    }

    /// Saves them in the Secret `namespace/name` (created, or replaced whole); a gRPC config
    /// in it names the files in `dir`.
    pub async fn save(
        &self,
        spoke: &kube::Client,
        namespace: &str,
        name: &str,
        dir: &Path,
    ) -> Result<(), StoreError> {
        let api: Api<Secret> = Api::namespaced(spoke.clone(), namespace);
        let err = |source| StoreError::Secret {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        let data: BTreeMap<String, ByteString> = [
            (
                self.wire.config_file(),
                self.config(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
                    .into_bytes(),
            ),
            (CERT, self.cert_pem.clone()),
            (KEY, self.key_pem.clone()),
            (CLUSTER, self.cluster.clone().into_bytes()),
            (AGENT, self.agent.clone().into_bytes()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v)))
        .collect();
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "spokelet".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some(data),
            ..Secret::default()
        };
        match api.get_opt(name).await.map_err(err)? {
            None => api.create(&PostParams::default(), &secret).await.map(drop),
            Some(current) => {
                // Replaced on the version read: two writers cannot both win unseen.
                secret.metadata.resource_version = current.metadata.resource_version;
                api.replace(name, &PostParams::default(), &secret).await.map(drop)
            }
        }
        .map_err(err)
    }

    /// The credentials kept in the Secret `namespace/name`, with `server` and `ca_pem` (the
    /// bootstrap credential's, which may have moved since); None when there is no Secret, it
    /// lacks a key, or it was kept for the other wire.
    pub async fn load(
        spoke: &kube::Client,
        namespace: &str,
        name: &str,
        wire: Wire,
        server: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Option<Credentials>, StoreError> {
        let api: Api<Secret> = Api::namespaced(spoke.clone(), namespace);
        let secret = api.get_opt(name).await.map_err(|source| StoreError::Secret {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        })?;
        let Some(data) = secret.and_then(|s| s.data) else {
            return Ok(None);
        };
        let field = |k: &str| data.get(k).map(|v| v.0.clone());
        if field(wire.config_file()).is_none() {
            return Ok(None);
        }
        let (Some(cert_pem), Some(key_pem), Some(cluster), Some(agent)) =
            (field(CERT), field(KEY), field(CLUSTER), field(AGENT))
        else {
            return Ok(None);
        };
        let (cluster, agent) = (String::from_utf8_lossy(&cluster), String::from_utf8_lossy(&agent));
        Ok(Some(Credentials::kept(
            wire,
            (server, ca_pem),
            (cert_pem, key_pem),
            (&cluster, &agent),
        )))
    }
}

/// Where the credentials a join earned are kept across restarts, beside the files.
#[derive(Clone)]
pub enum Keeping {
    /// A Secret in the agent's namespace on the spoke (OCM's `hub-kubeconfig-secret`).
    Secret {
        spoke: kube::Client,
        namespace: String,
        name: String,
    },
    /// The files alone: the bare-metal node service has no Kubernetes API to keep a Secret in,
    /// and its credentials directory is its own.
    Files,
}

impl std::fmt::Debug for Keeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Keeping {
    /// What keeps them, for the log.
    pub fn describe(&self) -> String {
        match self {
            Keeping::Secret { namespace, name, .. } => format!("Secret {namespace}/{name}"),
            Keeping::Files => "the credentials directory".to_string(),
        }
    }

    /// The credentials kept, if any (see [`Credentials::load`]); from the files, they are
    /// taken as issued to `cluster`/`agent` (the certificate's subject is checked before use).
    pub async fn load(
        &self,
        dir: &Path,
        wire: Wire,
        (server, ca_pem): (&str, Option<&[u8]>),
        (cluster, agent): (&str, &str),
    ) -> Result<Option<Credentials>, StoreError> {
        match self {
            Keeping::Secret {
                spoke,
                namespace,
                name,
            } => Credentials::load(spoke, namespace, name, wire, server, ca_pem).await,
            Keeping::Files => {
                let (Ok(cert_pem), Ok(key_pem)) =
                    (std::fs::read(dir.join(CERT)), std::fs::read(dir.join(KEY)))
                else {
                    return Ok(None);
                };
                Ok(Some(Credentials::kept(
                    wire,
                    (server, ca_pem),
                    (cert_pem, key_pem),
                    (cluster, agent),
                )))
            }
        }
    }

    /// Keeps `creds` (the files are written by the caller).
    pub async fn save(&self, creds: &Credentials, dir: &Path) -> Result<(), StoreError> {
        match self {
            Keeping::Secret {
                spoke,
                namespace,
                name,
            } => creds.save(spoke, namespace, name, dir).await,
            Keeping::Files => Ok(()),
        }
    }

    /// Whether what keeps them is gone (deleted by someone): the agent then joins again. An
    /// error reading the Secret is not taken as gone.
    pub async fn gone(&self, dir: &Path) -> bool {
        match self {
            Keeping::Secret {
                spoke,
                namespace,
                name,
            } => {
                let api: Api<Secret> = Api::namespaced(spoke.clone(), namespace);
                matches!(api.get_opt(name).await, Ok(None))
            }
            Keeping::Files => !dir.join(CERT).exists() || !dir.join(KEY).exists(),
        }
    }
}

/// Writes `bytes` to `path` through a file beside it renamed into place; `private` files are
/// readable by their owner only.
fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), StoreError> {
    use std::io::Write;
    let err = |source| StoreError::File {
        path: path.to_path_buf(),
        source,
    };
    let aside = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&aside).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&aside, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_make_a_kubeconfig_kube_reads_with_the_certificate_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials {
            wire: Wire::Kube,
            server: "https://hub.example:6443".into(),
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".to_vec()),
            cert_pem: b"cert".to_vec(),
            key_pem: b"key".to_vec(),
            cluster: "pool-a".into(),
            agent: "agent-1".into(),
        };
        let path = creds.write_files(dir.path()).unwrap();
        let config = kube::config::Kubeconfig::read_from(&path).unwrap();
        let user = config.auth_infos[0].auth_info.as_ref().unwrap();
        // Relative in the file, resolved beside it by kube.
        assert!(creds.kubeconfig().contains("client-certificate: tls.crt"));
        let cert = dir.path().join("tls.crt").display().to_string();
        assert_eq!(user.client_certificate.as_deref(), Some(cert.as_str()));
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("tls.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://hub.example:6443"));
    }

    #[test]
    fn the_grpc_files_make_a_config_the_grpc_transport_reads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".to_vec();
        let creds = Credentials {
            wire: Wire::Grpc { allow_tls12: false },
            server: "https://hub.example:8090".into(),
            ca_pem: Some(ca.clone()),
            cert_pem: b"cert".to_vec(),
            key_pem: b"key".to_vec(),
            cluster: "pool-a".into(),
            agent: "agent-1".into(),
        };
        let path = creds.write_files(dir.path()).unwrap();
        assert_eq!(path.file_name().unwrap(), GRPC_CONFIG);
        let file = crate::config::HubConfigFile::load(&path).unwrap();
        assert_eq!(file.url.as_deref(), Some("https://hub.example:8090"));
        assert_eq!(
            file.client_cert_file.as_deref(),
            Some(std::path::absolute(dir.path()).unwrap().join(CERT).as_path())
        );
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(file.ca_data.unwrap())
            .unwrap();
        assert_eq!(decoded, ca);
        assert!(!dir.path().join(KUBECONFIG).exists());
    }
}
