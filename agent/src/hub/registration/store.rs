//! The hub credentials the join earned: kept in a Secret in the agent's namespace (OCM's
//! `hub-kubeconfig-secret` layout) so a restart reuses them, and written as files the hub
//! transport runs from, which it re-reads when a renewal replaces them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

/// The Secret's keys, as OCM's registration agent writes them.
pub(crate) const KUBECONFIG: &str = "kubeconfig";
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

/// A client certificate the hub issued, with what reaching the hub takes.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The hub API server's URL, from the bootstrap kubeconfig.
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
            .field("server", &self.server)
            .field("cluster", &self.cluster)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Credentials {
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

    /// Writes the files the hub transport reads into `dir`: the key and certificate first,
    /// each through a file renamed into place (a reader never sees half of one), the
    /// kubeconfig last. Returns the kubeconfig's path.
    pub fn write_files(&self, dir: &Path) -> Result<PathBuf, StoreError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::File { path, source }
        };
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        write_atomic(&dir.join(KEY), &self.key_pem, true)?;
        write_atomic(&dir.join(CERT), &self.cert_pem, false)?;
        let kubeconfig = dir.join(KUBECONFIG);
        write_atomic(&kubeconfig, self.kubeconfig().as_bytes(), false)?;
        Ok(kubeconfig)
    }

    /// Saves them in the Secret `namespace/name` (created, or replaced whole).
    pub async fn save(&self, spoke: &kube::Client, namespace: &str, name: &str) -> Result<(), StoreError> {
        let api: Api<Secret> = Api::namespaced(spoke.clone(), namespace);
        let err = |source| StoreError::Secret {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        let data: BTreeMap<String, ByteString> = [
            (KUBECONFIG, self.kubeconfig().into_bytes()),
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
    /// bootstrap kubeconfig's, which may have moved since); None when there is no Secret or it
    /// lacks a key.
    pub async fn load(
        spoke: &kube::Client,
        namespace: &str,
        name: &str,
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
        let (Some(cert_pem), Some(key_pem), Some(cluster), Some(agent)) =
            (field(CERT), field(KEY), field(CLUSTER), field(AGENT))
        else {
            return Ok(None);
        };
        Ok(Some(Credentials {
            server: server.to_string(),
            ca_pem: ca_pem.map(<[u8]>::to_vec),
            cert_pem,
            key_pem,
            cluster: String::from_utf8_lossy(&cluster).into_owned(),
            agent: String::from_utf8_lossy(&agent).into_owned(),
        }))
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
}
