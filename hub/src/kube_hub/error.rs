//! What can go wrong with the Kubernetes-hub transport.

use spokelet_kube_client::KubeClientError;

use crate::tls::TlsError;

/// Kubernetes-hub transport failures.
#[derive(Debug, thiserror::Error)]
pub enum KubeHubError {
    /// The hub kubeconfig cannot be read or used.
    #[error("hub kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig path as given.
        path: String,
        /// Why kube could not read or use it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built or a request failed.
    #[error("hub API: {0}")]
    Api(#[from] kube::Error),
    /// The HTTP/2 client for the hub could not be built.
    #[error("hub client: {0}")]
    Client(#[from] KubeClientError),
    /// The client certificate files the hub kubeconfig names cannot be loaded.
    #[error("hub client certificate: {0}")]
    ClientCert(#[from] TlsError),
    /// The hub kubeconfig names an `http://` server and `--insecure-plaintext` is not set.
    #[error(
        "hub server {server} is plain http; refusing to send credentials and works unencrypted (set --insecure-plaintext to allow it)"
    )]
    Plaintext {
        /// The server URL.
        server: String,
    },
    /// The hub kubeconfig sets `insecure-skip-tls-verify` and `--hub-insecure-skip-tls-verify`
    /// is not set.
    #[error(
        "hub kubeconfig {kubeconfig} sets insecure-skip-tls-verify; refusing a hub whose certificate is not verified (set certificate-authority, or --hub-insecure-skip-tls-verify to allow it)"
    )]
    Unverified {
        /// The kubeconfig path.
        kubeconfig: String,
    },
    /// The hub kubeconfig names no CA and the system has no roots.
    #[error(
        "the hub kubeconfig names no certificate-authority and the system has no CA certificates to verify the hub with"
    )]
    NoRoots,
    /// The TLS configuration could not be built.
    #[error("hub TLS: {0}")]
    Tls(rustls::Error),
}
