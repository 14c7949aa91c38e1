//! Client identities: a certificate/key pair, the kubeconfig file that carries it (certificates
//! embedded, so `kubectl`, the spokelet binary and kube-rs all read the same file) and
//! kube clients built from it.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kube::config::Kubeconfig;

use crate::HarnessError;
use crate::pki::CertAndKey;

/// A client-certificate identity on one cluster.
#[derive(Clone)]
pub struct UserCredentials {
    /// The user name (certificate common name).
    pub common_name: String,
    /// The groups (certificate organisations).
    pub groups: Vec<String>,
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// The client key, PEM (PKCS#8).
    pub key_pem: String,
    server_url: String,
    ca_pem: String,
    kubeconfig_path: PathBuf,
    config: kube::Config,
}

impl std::fmt::Debug for UserCredentials {
    // The key stays out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCredentials")
            .field("common_name", &self.common_name)
            .field("groups", &self.groups)
            .field("server_url", &self.server_url)
            .field("kubeconfig_path", &self.kubeconfig_path)
            .finish_non_exhaustive()
    }
}

impl UserCredentials {
    /// Writes the kubeconfig for `cert` at `kubeconfig_path` (mode 0600) and checks that
    /// kube-rs accepts it, so that [`UserCredentials::client`] cannot fail later.
    pub(crate) fn create(
        cluster_name: &str,
        server_url: &str,
        ca_pem: &str,
        common_name: &str,
        groups: &[&str],
        cert: CertAndKey,
        kubeconfig_path: PathBuf,
    ) -> Result<Self, HarnessError> {
        let yaml = render_kubeconfig(cluster_name, server_url, ca_pem, common_name, &cert)?;
        write_private(&kubeconfig_path, &yaml)?;
        let config = config_from_yaml(&kubeconfig_path, &yaml)?;
        // Building the client stack parses the certificates and key; doing it once here
        // turns a bad identity into an error now instead of a panic in `client()`.
        kube::client::ClientBuilder::try_from(config.clone())
            .map_err(|e| HarnessError::kube(format!("client for {common_name}"), e))?;
        Ok(UserCredentials {
            common_name: common_name.to_string(),
            groups: groups.iter().map(|g| (*g).to_string()).collect(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            server_url: server_url.to_string(),
            ca_pem: ca_pem.to_string(),
            kubeconfig_path,
            config,
        })
    }

    /// The kubeconfig file for this identity (certificates embedded).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The client configuration the kubeconfig describes, for callers that want to adjust
    /// timeouts or headers before building their own client.
    pub fn kube_config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A new client for this identity.
    ///
    /// Each call builds a fresh client on the calling Tokio runtime: a client's connections
    /// belong to the runtime that made them, and tests each run their own runtime.
    pub fn try_client(&self) -> Result<kube::Client, HarnessError> {
        kube::Client::try_from(self.config.clone())
            .map_err(|e| HarnessError::kube(format!("client for {}", self.common_name), e))
    }

    /// A new client for this identity; see [`UserCredentials::try_client`].
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (kube-rs spawns the client's worker task), or if kube-rs
    /// rejects a configuration it already accepted when these credentials were created.
    pub fn client(&self) -> kube::Client {
        match self.try_client() {
            Ok(client) => client,
            Err(e) => panic!("{e}"),
        }
    }

    /// A client that presents this identity to another server, trusting `ca_pem` for that
    /// server's certificate: for tests that check a certificate is refused where it does not
    /// belong.
    pub fn client_for(&self, server_url: &str, ca_pem: &str) -> Result<kube::Client, HarnessError> {
        let cert = CertAndKey {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        };
        let yaml = render_kubeconfig("other", server_url, ca_pem, &self.common_name, &cert)?;
        let config = config_from_yaml(Path::new("<in memory>"), &yaml)?;
        kube::Client::try_from(config)
            .map_err(|e| HarnessError::kube(format!("client for {}", self.common_name), e))
    }

    /// The API server this identity was issued for.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The CA this identity's kubeconfig trusts for the server.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

/// A kubeconfig with one cluster, one user and one context, all named after the cluster,
/// with every certificate inline so the file is self-contained.
fn render_kubeconfig(
    cluster_name: &str,
    server_url: &str,
    ca_pem: &str,
    user: &str,
    cert: &CertAndKey,
) -> Result<String, HarnessError> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": cluster_name,
            "cluster": {
                "server": server_url,
                "certificate-authority-data": BASE64.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": BASE64.encode(&cert.cert_pem),
                "client-key-data": BASE64.encode(&cert.key_pem),
            },
        }],
        "contexts": [{
            "name": cluster_name,
            "context": { "cluster": cluster_name, "user": user, "namespace": "default" },
        }],
        "current-context": cluster_name,
    });
    serde_yaml::to_string(&doc).map_err(|source| HarnessError::Serialize {
        what: format!("kubeconfig for {user}"),
        source,
    })
}

fn config_from_yaml(path: &Path, yaml: &str) -> Result<kube::Config, HarnessError> {
    let kubeconfig_error = |source| HarnessError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kubeconfig = Kubeconfig::from_yaml(yaml).map_err(kubeconfig_error)?;
    kube::Config::try_from(kubeconfig).map_err(kubeconfig_error)
}

/// Writes a file only its owner can read: kubeconfigs and keys hold private keys.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), HarnessError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| HarnessError::io(format!("creating {}", path.display()), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn kubeconfig_round_trips_through_kube() {
        let ca = CertificateAuthority::new("unit CA").unwrap();
        let cert = ca.issue_client_now("alice", &["team"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.kubeconfig");
        let creds = UserCredentials::create(
            "unit",
            "https://127.0.0.1:6443",
            ca.cert_pem(),
            "alice",
            &["team"],
            cert,
            path.clone(),
        )
        .unwrap();
        let config = creds.kube_config();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(config.root_cert.as_ref().map(Vec::len), Some(1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("client-key-data"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "kubeconfig must not be group/world readable");
        assert!(!format!("{creds:?}").contains("PRIVATE"));
    }
}
