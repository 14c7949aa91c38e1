//! Mutual TLS to the hub with rustls: CA and client certificate from files or inline data, reloaded on rotation.
//!
//! The client certificate is served by [`ReloadingClientCert`], a rustls certificate resolver that
//! checks the files' modification stamps at every handshake and re-reads them when they changed,
//! so a rotated certificate is used by the next connection while established connections (and the
//! streams on them) carry on untouched. The CA bundle is checked the same way each time a
//! connection is made ([`ClientTls::config`]). [`HubConnector`] is the tower service tonic dials
//! through, so our own `ClientConfig` (not tonic's) is the one in use.

use std::fmt;
use std::future::Future;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use spokelet_base::lock::lock;

/// TLS setup and connection failures. Messages name files, never their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {what} from {path}: {source}")]
    Read {
        /// Which input (CA, client certificate, client key).
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input holds no usable PEM of the expected kind.
    #[error("{what} from {origin}: {reason}")]
    Pem {
        /// Which input (CA, client certificate, client key).
        what: &'static str,
        /// File path or "inline data".
        origin: String,
        /// What is wrong (never the data itself).
        reason: String,
    },
    /// No CA was configured: without one the hub's certificate cannot be verified.
    #[error("no CA configured for the hub (caFile/caData or --hub-ca-file)")]
    NoCa,
    /// Only one of client certificate and client key was configured.
    #[error("client certificate and client key must be configured together")]
    HalfIdentity,
    /// rustls refused the configuration (bad CA certificate, key not matching the certificate, ...).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The hub address has no usable host name for certificate verification.
    #[error("invalid server name {0:?} for TLS verification")]
    ServerName(String),
    /// TCP connect to the hub failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// host:port dialled.
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (untrusted hub certificate, wrong name, our certificate refused, ...).
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        /// host:port dialled.
        addr: String,
        /// Underlying error; its message carries the rustls reason.
        #[source]
        source: std::io::Error,
    },
}

/// Where a PEM input comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PemSource {
    /// A file, re-read when its modification stamp changes.
    File(PathBuf),
    /// Inline bytes (PEM, or base64 of PEM as the reference config format writes `...Data`).
    Inline(Vec<u8>),
}

impl fmt::Debug for PemSource {
    // Inline data may be a private key: show only its length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::File(p) => f.debug_tuple("File").field(p).finish(),
            PemSource::Inline(b) => write!(f, "Inline(<{} bytes>)", b.len()),
        }
    }
}

impl PemSource {
    /// Describes the origin for error messages.
    fn origin(&self) -> String {
        match self {
            PemSource::File(p) => p.display().to_string(),
            PemSource::Inline(_) => "inline data".to_string(),
        }
    }

    /// The file's current stamp; None for inline data (which never changes).
    fn stamp(&self) -> Option<FileStamp> {
        match self {
            PemSource::File(p) => FileStamp::of(p),
            PemSource::Inline(_) => None,
        }
    }

    /// The PEM bytes (inline base64 is decoded).
    pub(crate) fn read(&self, what: &'static str) -> Result<Vec<u8>, TlsError> {
        match self {
            PemSource::File(p) => std::fs::read(p).map_err(|source| TlsError::Read {
                what,
                path: p.clone(),
                source,
            }),
            PemSource::Inline(b) => Ok(decode_inline(b)),
        }
    }
}

/// Inline data is PEM when it looks like PEM, otherwise base64 of PEM (how YAML carries `[]byte`).
fn decode_inline(b: &[u8]) -> Vec<u8> {
    let trimmed = b.trim_ascii();
    if trimmed.starts_with(b"-----BEGIN") {
        return trimmed.to_vec();
    }
    let compact: Vec<u8> = trimmed
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .unwrap_or_else(|_| trimmed.to_vec())
}

/// What identifies a version of a file: modification time and length. Secret volumes swap a
/// symlink and editors rename over the file; both change the stamp of the path we follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    /// Modification time (nanosecond resolution on the filesystems we care about).
    modified: Option<SystemTime>,
    /// Length, to catch rewrites within one timestamp tick.
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let md = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: md.modified().ok(),
            len: md.len(),
        })
    }
}

/// Settings for the hub TLS client.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA bundle that signs the hub's serving certificate (required).
    pub ca: Option<PemSource>,
    /// Our client certificate chain (leaf first).
    pub client_cert: Option<PemSource>,
    /// Our client private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub client_key: Option<PemSource>,
    /// Also offer TLS 1.2. Off by default: TLS 1.3 only, unless a hub needs 1.2.
    pub allow_tls12: bool,
}

/// The ring provider: one crypto backend for the whole process, never OpenSSL.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM blob.
fn parse_certs(
    pem: &[u8],
    what: &'static str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut BufReader::new(pem)).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        what,
        origin: origin.to_string(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            origin: origin.to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Parses the first private key in a PEM blob.
fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "client key";
    match rustls_pemfile::private_key(&mut BufReader::new(pem)) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(TlsError::Pem {
            what: WHAT,
            origin: origin.to_string(),
            reason: "no PRIVATE KEY block".into(),
        }),
        // The parser's error names a PEM section problem, not key material.
        Err(e) => Err(TlsError::Pem {
            what: WHAT,
            origin: origin.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Loads the CA bundle into a root store.
fn load_roots(src: &PemSource) -> Result<RootCertStore, TlsError> {
    const WHAT: &str = "CA bundle";
    let pem = src.read(WHAT)?;
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(&pem, WHAT, &src.origin())? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Loads certificate and key and checks they belong together.
fn load_identity(
    cert: &PemSource,
    key: &PemSource,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_certs(
        &cert.read("client certificate")?,
        "client certificate",
        &cert.origin(),
    )?;
    let key_der = parse_key(&key.read("client key")?, &key.origin())?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key_der, provider)?))
}

/// The loaded client identity and the stamps of the files it came from.
struct IdentityState {
    /// Stamps of (certificate, key) when last loaded; compared at each handshake.
    stamps: (Option<FileStamp>, Option<FileStamp>),
    /// What handshakes present.
    key: Arc<CertifiedKey>,
    /// Number of successful loads, for logs and tests.
    loads: u64,
}

/// A client-certificate resolver that re-reads certificate and key when their files change.
///
/// A failed reload (for example the certificate already replaced but the key not yet) keeps the
/// previous identity and logs a warning; the next handshake tries again.
pub struct ReloadingClientCert {
    cert: PemSource,
    key: PemSource,
    /// Crypto provider that turns the key into a signer.
    provider: Arc<CryptoProvider>,
    /// Current identity; a std mutex because rustls calls `resolve` synchronously.
    state: Mutex<IdentityState>,
}

impl fmt::Debug for ReloadingClientCert {
    // Never print key material; the paths are enough to tell which identity this is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingClientCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("loads", &lock(&self.state).loads)
            .finish()
    }
}

impl ReloadingClientCert {
    /// Loads the identity now; fails if it cannot be loaded (a bad identity must stop start-up).
    pub fn new(cert: PemSource, key: PemSource, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamps = (cert.stamp(), key.stamp());
        let loaded = load_identity(&cert, &key, &provider)?;
        Ok(ReloadingClientCert {
            cert,
            key,
            provider,
            state: Mutex::new(IdentityState {
                stamps,
                key: loaded,
                loads: 1,
            }),
        })
    }

    /// The identity to present now, reloaded first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (self.cert.stamp(), self.key.stamp());
        let mut st = lock(&self.state);
        if stamps != st.stamps {
            match load_identity(&self.cert, &self.key, &self.provider) {
                Ok(k) => {
                    st.key = k;
                    st.stamps = stamps;
                    st.loads += 1;
                    tracing::info!(cert = ?self.cert, loads = st.loads, "hub client certificate reloaded");
                }
                Err(e) => {
                    // Keep the stamps old so the next handshake retries the reload.
                    tracing::warn!(error = %e, "hub client certificate changed but cannot be loaded; keeping the previous one");
                }
            }
        }
        st.key.clone()
    }

    /// How many times the identity was loaded (1 after start-up).
    pub fn loads(&self) -> u64 {
        lock(&self.state).loads
    }
}

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(&self, _root_hints: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The CA-dependent part of the client config, rebuilt when the CA file changes.
struct CaState {
    /// Stamp of the CA file when the config was built.
    stamp: Option<FileStamp>,
    /// The config handed to new connections.
    config: Arc<ClientConfig>,
}

/// Everything the hub TLS client needs; cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    /// Clones share it, so every connection sees the same reloaded CA and identity.
    inner: Arc<ClientTlsInner>,
}

/// Shared part of [`ClientTls`].
struct ClientTlsInner {
    /// CA source, re-checked per connection.
    ca: PemSource,
    /// Client identity, re-checked per handshake; None when the hub authenticates by token only.
    identity: Option<Arc<ReloadingClientCert>>,
    /// TLS 1.2 allowed as well as 1.3.
    allow_tls12: bool,
    /// The provider the identity's signer also comes from; a config may not mix two.
    provider: Arc<CryptoProvider>,
    /// The config new connections get, with the CA stamp it was built from.
    ca_state: Mutex<CaState>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.inner.ca)
            .field("identity", &self.inner.identity)
            .field("allow_tls12", &self.inner.allow_tls12)
            .finish()
    }
}

impl ClientTls {
    /// Loads CA and identity now, so a broken setup fails at start-up with a clear error.
    pub fn new(opts: TlsOptions) -> Result<Self, TlsError> {
        let provider = provider();
        let ca = opts.ca.ok_or(TlsError::NoCa)?;
        let identity = match (opts.client_cert, opts.client_key) {
            (Some(c), Some(k)) => Some(Arc::new(ReloadingClientCert::new(c, k, provider.clone())?)),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        let stamp = ca.stamp();
        let config = build_config(&ca, identity.as_ref(), opts.allow_tls12, &provider)?;
        Ok(ClientTls {
            inner: Arc::new(ClientTlsInner {
                ca,
                identity,
                allow_tls12: opts.allow_tls12,
                provider,
                ca_state: Mutex::new(CaState { stamp, config }),
            }),
        })
    }

    /// The config for a new connection; rebuilt first if the CA file changed. A CA that fails to
    /// load keeps the previous config (logged), so a half-written bundle cannot cut us off.
    pub fn config(&self) -> Arc<ClientConfig> {
        let inner = &self.inner;
        let stamp = inner.ca.stamp();
        let mut st = lock(&inner.ca_state);
        if stamp != st.stamp {
            match build_config(
                &inner.ca,
                inner.identity.as_ref(),
                inner.allow_tls12,
                &inner.provider,
            ) {
                Ok(c) => {
                    st.config = c;
                    st.stamp = stamp;
                    tracing::info!(ca = ?inner.ca, "hub CA bundle reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hub CA bundle changed but cannot be loaded; keeping the previous one")
                }
            }
        }
        st.config.clone()
    }

    /// The client identity resolver, if a client certificate is configured.
    pub fn identity(&self) -> Option<&Arc<ReloadingClientCert>> {
        self.inner.identity.as_ref()
    }

    /// A connector dialling `host:port` and verifying the hub as `host`.
    pub fn connector(&self, host: &str, port: u16) -> Result<HubConnector, TlsError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(bare.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))?;
        Ok(HubConnector {
            tls: self.clone(),
            addr: format!("{host}:{port}"),
            server_name,
        })
    }
}

/// Builds a rustls client config: hub verified against `ca`, our identity from the resolver, ALPN h2.
fn build_config(
    ca: &PemSource,
    identity: Option<&Arc<ReloadingClientCert>>,
    allow_tls12: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_cert_resolver(id.clone()),
        None => builder.with_no_client_auth(),
    };
    // gRPC runs over HTTP/2 only; servers that enforce ALPN refuse clients that do not offer h2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed TLS 1.3 session sends no client certificate, so after a
    // rotation the hub would keep seeing the old identity. A full handshake per (rare) reconnect
    // is the price.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Tower service tonic dials through: TCP, then a TLS handshake with our config.
#[derive(Clone)]
pub struct HubConnector {
    /// TLS client state (config reloaded per connection).
    tls: ClientTls,
    /// host:port to dial; taken from the configured URL rather than tonic's URI, whose scheme we
    /// set to http so tonic does not try to add its own TLS layer.
    addr: String,
    /// Name the hub certificate must carry (DNS name or IP address).
    server_name: ServerName<'static>,
}

impl fmt::Debug for HubConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConnector")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl HubConnector {
    /// Dials and handshakes once.
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, TlsError> {
        let addr = self.addr.clone();
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| TlsError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // Small gRPC frames (status updates, heartbeats) should not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.tls.config());
        let stream = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| TlsError::Handshake {
                addr: addr.clone(),
                source,
            })?;
        tracing::debug!(%addr, "TLS connection to hub established");
        Ok(stream)
    }
}

impl tower_service::Service<tonic::transport::Uri> for HubConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, TlsError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::transport::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            match this.connect().await {
                Ok(s) => Ok(TokioIo::new(s)),
                Err(e) => {
                    // The transport logs the failure once, with context; keep this for debugging.
                    tracing::debug!(error = %error_chain(&e), "hub connection failed");
                    Err(e)
                }
            }
        })
    }
}

/// An error and all its sources, `: `-separated (tonic and hyper bury the useful part deep).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair() -> (String, String) {
        let k = rcgen_like::self_signed();
        (k.0, k.1)
    }

    /// Minimal self-signed material without a dev-dependency on rcgen: a fixed test key pair.
    mod rcgen_like {
        pub(super) fn self_signed() -> (String, String) {
            (CERT.to_string(), KEY.to_string())
        }
        // A throwaway EC P-256 self-signed certificate and its key, generated for these tests only.
        const CERT: &str = include_str!("testdata/client.crt");
        const KEY: &str = include_str!("testdata/client.key");
    }

    #[test]
    fn inline_data_accepts_pem_and_base64() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(decode_inline(pem), pem.trim_ascii().to_vec());
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        assert_eq!(decode_inline(b64.as_bytes()), pem.to_vec());
    }

    #[test]
    fn debug_never_shows_inline_bytes() {
        let s = format!(
            "{:?}",
            PemSource::Inline(b"-----BEGIN PRIVATE KEY----- secret".to_vec())
        );
        assert!(!s.contains("secret"), "{s}");
    }

    #[test]
    fn requires_a_ca_and_a_whole_identity() {
        assert!(matches!(
            ClientTls::new(TlsOptions::default()),
            Err(TlsError::NoCa)
        ));
        let (cert, _) = pem_pair();
        let opts = TlsOptions {
            ca: Some(PemSource::Inline(cert.clone().into_bytes())),
            client_cert: Some(PemSource::Inline(cert.into_bytes())),
            ..Default::default()
        };
        assert!(matches!(ClientTls::new(opts), Err(TlsError::HalfIdentity)));
    }

    #[test]
    fn loads_identity_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair();
        let cp = dir.path().join("tls.crt");
        let kp = dir.path().join("tls.key");
        std::fs::write(&cp, &cert).unwrap();
        std::fs::write(&kp, &key).unwrap();
        let tls = ClientTls::new(TlsOptions {
            ca: Some(PemSource::File(cp.clone())),
            client_cert: Some(PemSource::File(cp.clone())),
            client_key: Some(PemSource::File(kp.clone())),
            allow_tls12: false,
        })
        .unwrap();
        let id = tls.identity().unwrap().clone();
        assert_eq!(id.loads(), 1);
        let _ = id.current();
        assert_eq!(id.loads(), 1, "unchanged files are not re-read");
        // A broken rewrite keeps the old identity.
        std::fs::write(
            &kp,
            "garbage that is longer than before to change the length for sure",
        )
        .unwrap();
        let _ = id.current();
        assert_eq!(id.loads(), 1);
        std::fs::write(&kp, &key).unwrap();
        // Make sure the stamp differs even on coarse-mtime filesystems.
        let f = std::fs::File::options().write(true).open(&kp).unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let _ = id.current();
        assert_eq!(id.loads(), 2);
        let cfg = tls.config();
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(!format!("{tls:?}").contains("PRIVATE"));
    }

    #[test]
    fn rejects_mismatched_key() {
        let (cert, _) = pem_pair();
        let other = include_str!("testdata/other.key");
        let r = ClientTls::new(TlsOptions {
            ca: Some(PemSource::Inline(cert.clone().into_bytes())),
            client_cert: Some(PemSource::Inline(cert.into_bytes())),
            client_key: Some(PemSource::Inline(other.as_bytes().to_vec())),
            allow_tls12: false,
        });
        assert!(matches!(r, Err(TlsError::Config(_))), "{r:?}");
    }

    #[test]
    fn server_name_from_ip_and_dns() {
        let (cert, _) = pem_pair();
        let tls = ClientTls::new(TlsOptions {
            ca: Some(PemSource::Inline(cert.into_bytes())),
            ..Default::default()
        })
        .unwrap();
        assert!(tls.connector("127.0.0.1", 1).is_ok());
        assert!(tls.connector("[::1]", 1).is_ok());
        assert!(tls.connector("hub.example.com", 1).is_ok());
        assert!(tls.connector("bad name!", 1).is_err());
    }
}
