//! The hub client: the kubeconfig, one HTTP/2 connection, and a client certificate that follows
//! rotation on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::client::ConfigExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::error::KubeHubError;
pub use crate::config::HubSecurity;
use crate::tls::{PemSource, ReloadingClientCert};
use spokelet_kube_client::{Guards, IdentityVersion};

/// Reads a hub kubeconfig (client-certificate authentication) into a client configuration.
pub async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config, KubeHubError> {
    spokelet_kube_client::config_from_file(path)
        .await
        .map_err(|source| KubeHubError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
}

/// Builds a hub client from a kubeconfig (client-certificate authentication) with nothing
/// relaxed; see [`hub_client`].
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, KubeHubError> {
    hub_client(config_from_kubeconfig(path).await?, path, HubSecurity::default())
}

impl HubSecurity {
    /// Refuses what `config` asks for that the flags do not allow, and warns about what they do.
    pub fn check(&self, config: &kube::Config, kubeconfig: &Path) -> Result<(), KubeHubError> {
        if config.cluster_url.scheme_str() == Some("http") {
            if !self.allow_plaintext {
                return Err(KubeHubError::Plaintext {
                    server: config.cluster_url.to_string(),
                });
            }
            tracing::warn!(server = %config.cluster_url, "the hub server is plain http (--insecure-plaintext): works, status and the agent's credentials travel unencrypted");
        }
        if config.accept_invalid_certs {
            if !self.allow_unverified {
                return Err(KubeHubError::Unverified {
                    kubeconfig: kubeconfig.display().to_string(),
                });
            }
            tracing::warn!(kubeconfig = %kubeconfig.display(), "the hub's certificate is NOT verified (insecure-skip-tls-verify with --hub-insecure-skip-tls-verify): anyone on the path can pose as the hub and send works");
        }
        if self.allow_tls12 {
            tracing::warn!("TLS 1.2 is offered to the hub as well as 1.3 (--hub-min-tls-version 1.2)");
        }
        Ok(())
    }
}

/// Builds the hub client for `config`, read from the kubeconfig at `kubeconfig`: one HTTP/2
/// connection (the watch, status writes and lease share it) whose client certificate follows
/// rotation when the kubeconfig names it by file (see [`hub_tls_config`]). Once the certificate
/// files change, the next request opens a new connection that presents the new certificate;
/// the watch carries on over the old connection until it ends, and the engine is told nothing.
///
/// `security` says what may be relaxed ([`HubSecurity::check`] refuses the rest first).
pub fn hub_client(
    config: kube::Config,
    kubeconfig: &Path,
    security: HubSecurity,
) -> Result<kube::Client, KubeHubError> {
    gated_hub_client(config, kubeconfig, security, Guards::default())
}

/// [`hub_client`] with [`Guards`]: writes to the hub (statuses, the cluster lease, finalizers)
/// pass only while the gate is open, so a replica that lost the work-engine lease tells the hub
/// nothing more, not even what it had queued; a `401` from the hub is signalled (a joined
/// agent's certificate no longer taken: it joins again).
pub fn gated_hub_client(
    config: kube::Config,
    kubeconfig: &Path,
    security: HubSecurity,
    guards: Guards,
) -> Result<kube::Client, KubeHubError> {
    security.check(&config, kubeconfig)?;
    let HubTls {
        config: tls,
        identity,
    } = hub_tls_config(&config, kubeconfig, security.allow_tls12)?;
    let identity_version = identity.map(|identity| -> IdentityVersion {
        // `current` re-reads the files if they changed (logging the reload), `loads` counts it.
        Arc::new(move || {
            let _ = identity.current();
            identity.loads()
        })
    });
    // HTTP/2: the hub sees little traffic, and one connection crosses proxies and firewalls
    // most easily.
    Ok(spokelet_kube_client::client_with_tls(
        config,
        tls,
        identity_version,
        spokelet_kube_client::HttpVersion::Http2,
        guards,
    )?)
}

/// Where the hub kubeconfig's client certificate comes from: it decides whether rotation on disk
/// can be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCertSource {
    /// `client-certificate` and `client-key` files (absolute paths): re-read when they change.
    Files {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
    /// Certificate or key embedded (`client-certificate-data` / `client-key-data`, which kube
    /// prefers over files): loaded once, so rotating it needs a restart.
    Embedded,
    /// No client certificate in the kubeconfig, or one an exec plugin issues (kube's own client
    /// config handles both; a half-configured pair is refused by kube with its own error).
    Other,
}

/// Reads where the client certificate of `auth` comes from. Relative paths are relative to
/// `kubeconfig_dir`, the directory of the kubeconfig file, as kube and kubectl resolve them.
pub fn client_cert_source(auth: &kube::config::AuthInfo, kubeconfig_dir: &Path) -> ClientCertSource {
    // An exec plugin's certificate wins over the user's in kube; it is not ours to reload.
    if auth.exec.is_some() {
        return ClientCertSource::Other;
    }
    if auth.client_certificate_data.is_some() || auth.client_key_data.is_some() {
        return ClientCertSource::Embedded;
    }
    match (&auth.client_certificate, &auth.client_key) {
        (Some(cert), Some(key)) => ClientCertSource::Files {
            cert: kubeconfig_dir.join(cert),
            key: kubeconfig_dir.join(key),
        },
        _ => ClientCertSource::Other,
    }
}

/// The TLS side of the hub client.
#[derive(Debug)]
pub struct HubTls {
    /// The hub verified against the kubeconfig's CA (the system's roots where it names none),
    /// TLS 1.3 only unless TLS 1.2 is allowed; the client certificate kube resolves for the
    /// kubeconfig (data, files or exec plugin), or `identity` when set.
    pub config: rustls::ClientConfig,
    /// The client certificate from the kubeconfig's files, re-read when they change; None when
    /// the kubeconfig embeds it or has none ([`ClientCertSource`]).
    pub identity: Option<Arc<ReloadingClientCert>>,
}

/// The TLS config of the hub client (see [`HubTls::config`]), with the client certificate served
/// by a [`ReloadingClientCert`] over the kubeconfig's certificate and key files when it names
/// files. The resolver checks the files' stamps when asked (each handshake, and each request
/// through [`hub_client`]; no background task) and logs a reload as "hub client certificate
/// reloaded", as it does for the gRPC transport.
pub fn hub_tls_config(
    config: &kube::Config,
    kubeconfig: &Path,
    allow_tls12: bool,
) -> Result<HubTls, KubeHubError> {
    let mut tls = verifying_config(config, allow_tls12)?;
    // kube's own config for the kubeconfig only lends its client certificate: it resolves every
    // way a kubeconfig names one, but offers TLS 1.2 and cannot be narrowed once built.
    tls.client_auth_cert_resolver = config.rustls_client_config()?.client_auth_cert_resolver;
    // `Path::join` keeps absolute paths as they are, so already-resolved paths pass unchanged.
    let dir = kubeconfig.parent().unwrap_or(Path::new(""));
    let identity = match client_cert_source(&config.auth_info, dir) {
        ClientCertSource::Files { cert, key } => {
            tracing::debug!(cert = %cert.display(), key = %key.display(),
                "hub client certificate is reloaded from its files when they change");
            // The signer must come from the provider the rest of the config uses.
            let provider = tls.crypto_provider().clone();
            let identity = Arc::new(ReloadingClientCert::new(
                PemSource::File(cert),
                PemSource::File(key),
                provider,
            )?);
            tls.client_auth_cert_resolver = identity.clone();
            // A resumed TLS 1.3 session sends no certificate: the server keeps the identity of
            // the session it resumes, so a new connection would still be the old certificate.
            // Connections to the hub are few (one HTTP/2 connection), so full handshakes cost nothing.
            tls.resumption = rustls::client::Resumption::disabled();
            Some(identity)
        }
        ClientCertSource::Embedded => {
            tracing::info!(
                kubeconfig = %kubeconfig.display(),
                "the hub kubeconfig embeds the client certificate (client-certificate-data); rotating it \
                 needs a restart, or client-certificate and client-key file paths to reload it on rotation"
            );
            None
        }
        ClientCertSource::Other => None,
    };
    Ok(HubTls {
        config: tls,
        identity,
    })
}

/// A config verifying the hub as the kubeconfig says: against its CA (the system's roots when it
/// names none), or not at all with `insecure-skip-tls-verify` (allowed only by
/// [`HubSecurity::allow_unverified`]); TLS 1.3 only unless `allow_tls12`.
fn verifying_config(config: &kube::Config, allow_tls12: bool) -> Result<rustls::ClientConfig, KubeHubError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(KubeHubError::Tls)?;
    let builder = if config.accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UnverifiedHub(provider)))
    } else {
        builder.with_root_certificates(hub_roots(config)?)
    };
    Ok(builder.with_no_client_auth())
}

/// The kubeconfig's CA certificates, or the system's roots when it names none (as client-go).
fn hub_roots(config: &kube::Config) -> Result<rustls::RootCertStore, KubeHubError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match &config.root_cert {
        Some(ders) => ders.iter().map(|d| CertificateDer::from(d.clone())).collect(),
        None => rustls_native_certs::load_native_certs().certs,
    };
    for cert in certs {
        roots.add(cert).map_err(KubeHubError::Tls)?;
    }
    if roots.is_empty() {
        return Err(KubeHubError::NoRoots);
    }
    Ok(roots)
}

/// The verifier of `insecure-skip-tls-verify`: any certificate is taken, signatures are still
/// checked (the handshake itself stays sound). Only with [`HubSecurity::allow_unverified`].
#[derive(Debug)]
struct UnverifiedHub(Arc<CryptoProvider>);

impl ServerCertVerifier for UnverifiedHub {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig for the hub with `user` as its user entry (client certificate and key as
    /// file paths or embedded data), trusting the test certificate as CA.
    fn kubeconfig_yaml(user: serde_json::Value) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(include_str!("../testdata/client.crt"));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "hub", "cluster": {
                "server": "https://127.0.0.1:6443", "certificate-authority-data": ca}}],
            "users": [{"name": "agent", "user": user}],
            "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": "agent"}}],
            "current-context": "hub",
        })
        .to_string()
    }

    #[tokio::test]
    async fn client_certificate_files_are_resolved_against_the_kubeconfig_directory() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("tls.crt"), include_str!("../testdata/client.crt")).unwrap();
        std::fs::write(certs.join("tls.key"), include_str!("../testdata/client.key")).unwrap();
        let path = dir.path().join("hub.kubeconfig");
        let user = serde_json::json!({"client-certificate": "certs/tls.crt", "client-key": "certs/tls.key"});
        std::fs::write(&path, kubeconfig_yaml(user)).unwrap();

        // Through the reader the agent uses, from another working directory than the kubeconfig's.
        let config = config_from_kubeconfig(&path).await.unwrap();
        let want = ClientCertSource::Files {
            cert: certs.join("tls.crt"),
            key: certs.join("tls.key"),
        };
        assert_eq!(client_cert_source(&config.auth_info, dir.path()), want);
        // Relative paths not resolved by the reader are resolved here; absolute ones are kept.
        let relative = kube::config::AuthInfo {
            client_certificate: Some("certs/tls.crt".into()),
            client_key: Some(certs.join("tls.key").display().to_string()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&relative, dir.path()), want);

        // The client's TLS config serves the files through the reloading resolver.
        let HubTls {
            config: tls,
            identity,
        } = hub_tls_config(&config, &path, false).unwrap();
        assert_eq!(identity.map(|i| i.loads()), Some(1));
        // No session resumption: it would carry the old certificate's identity to new connections.
        assert!(
            format!("{:?}", tls.resumption).contains("NoClientSessionStorage"),
            "{:?}",
            tls.resumption
        );
        let resolver = format!("{:?}", tls.client_auth_cert_resolver);
        assert!(resolver.contains("ReloadingClientCert"), "{resolver}");
        assert!(resolver.contains("tls.crt"), "{resolver}");
        let served = tls.client_auth_cert_resolver.resolve(&[], &[]).unwrap();
        let pem = include_str!("../testdata/client.crt");
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(served.cert[0], der);
        hub_client(config, &path, HubSecurity::default()).unwrap();

        // A missing file fails at start-up, naming the file.
        std::fs::remove_file(certs.join("tls.key")).unwrap();
        let config = config_from_kubeconfig(&path).await.unwrap();
        let err = hub_tls_config(&config, &path, false).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
    }

    /// A kubeconfig at `server` with embedded credentials, `insecure-skip-tls-verify` as given.
    async fn hub_config(dir: &Path, server: &str, skip_verify: bool) -> (kube::Config, PathBuf) {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut kc: serde_json::Value = serde_json::from_str(&kubeconfig_yaml(serde_json::json!({
            "client-certificate-data": b64(include_str!("../testdata/client.crt")),
            "client-key-data": b64(include_str!("../testdata/client.key")),
        })))
        .unwrap();
        kc["clusters"][0]["cluster"]["server"] = server.into();
        if skip_verify {
            let cluster = kc["clusters"][0]["cluster"].as_object_mut().unwrap();
            cluster.remove("certificate-authority-data");
            cluster.insert("insecure-skip-tls-verify".into(), true.into());
        }
        let path = dir.join("hub.kubeconfig");
        std::fs::write(&path, kc.to_string()).unwrap();
        (config_from_kubeconfig(&path).await.unwrap(), path)
    }

    #[tokio::test]
    async fn plain_http_and_unverified_hubs_are_refused_unless_a_flag_allows_them() {
        let dir = tempfile::tempdir().unwrap();
        let strict = HubSecurity::default();

        let (config, path) = hub_config(dir.path(), "http://127.0.0.1:6443", false).await;
        let err = hub_client(config.clone(), &path, strict).err().expect("refused");
        assert!(matches!(err, KubeHubError::Plaintext { .. }), "{err}");
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let plain = HubSecurity {
            allow_plaintext: true,
            ..strict
        };
        hub_client(config, &path, plain).unwrap();

        let (config, path) = hub_config(dir.path(), "https://127.0.0.1:6443", true).await;
        assert!(config.accept_invalid_certs);
        let err = hub_client(config.clone(), &path, strict).err().expect("refused");
        assert!(matches!(err, KubeHubError::Unverified { .. }), "{err}");
        assert!(
            err.to_string().contains("--hub-insecure-skip-tls-verify"),
            "{err}"
        );
        let unverified = HubSecurity {
            allow_unverified: true,
            ..strict
        };
        hub_client(config, &path, unverified).unwrap();
    }

    #[test]
    fn embedded_or_missing_client_certificates_are_not_reloaded() {
        let dir = Path::new("/etc/spokelet");
        let embedded = kube::config::AuthInfo {
            client_certificate_data: Some("Y2VydA==".into()),
            client_key_data: Some("a2V5".to_string().into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&embedded, dir), ClientCertSource::Embedded);
        // kube prefers embedded data over a file: the file is not what is presented.
        let both = kube::config::AuthInfo {
            client_certificate: Some("tls.crt".into()),
            client_key: Some("tls.key".into()),
            client_key_data: Some("a2V5".to_string().into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&both, dir), ClientCertSource::Embedded);
        assert_eq!(
            client_cert_source(&kube::config::AuthInfo::default(), dir),
            ClientCertSource::Other
        );
        let half = kube::config::AuthInfo {
            client_certificate: Some("tls.crt".into()),
            ..Default::default()
        };
        assert_eq!(client_cert_source(&half, dir), ClientCertSource::Other);
    }

    #[tokio::test]
    async fn embedded_client_certificate_keeps_kubes_identity() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.kubeconfig");
        let user = serde_json::json!({
            "client-certificate-data": b64(include_str!("../testdata/client.crt")),
            "client-key-data": b64(include_str!("../testdata/client.key")),
        });
        std::fs::write(&path, kubeconfig_yaml(user)).unwrap();
        let config = config_from_kubeconfig(&path).await.unwrap();
        let HubTls {
            config: tls,
            identity,
        } = hub_tls_config(&config, &path, false).unwrap();
        assert!(identity.is_none());
        let resolver = format!("{:?}", tls.client_auth_cert_resolver);
        assert!(!resolver.contains("ReloadingClientCert"), "{resolver}");
        assert!(tls.client_auth_cert_resolver.has_certs());
    }
}
