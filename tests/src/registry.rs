//! A real OCI registry on loopback: Debian's `docker-registry` (the CNCF distribution
//! registry), with its own config file and storage in a scratch directory.
//!
//! The packaged `/etc/docker/registry/config.yml` listens on every interface and asks for
//! htpasswd auth, so it is never used: the config written here binds 127.0.0.1 on a free
//! port, by default without authentication or TLS (clients use `--tls-verify=false` / plain
//! HTTP). [`RegistryOptions`] adds htpasswd users (bcrypt, as the registry requires) and a
//! TLS certificate from a CA of the test's own.

use std::path::Path;
use std::time::Instant;

use crate::HarnessError;
use crate::assets::Binary;
use crate::cluster::{Processes, start_budget};
use crate::credentials::write_private;
use crate::pki::CertificateAuthority;
use crate::process::{ManagedProcess, free_ports, http_get};
use crate::registry_token::{TOKEN_ISSUER, TOKEN_SERVICE, TokenServer};
use crate::rundir;

/// An htpasswd file of `users`, bcrypt-hashed (the only scheme the registry accepts).
fn htpasswd(users: &[(String, String)]) -> Result<String, HarnessError> {
    let mut out = String::new();
    for (user, password) in users {
        // The lowest cost bcrypt allows: these are throw-away test passwords.
        let hash = bcrypt::hash(password, 4).map_err(|e| {
            HarnessError::io(
                format!("hashing the password of {user}"),
                std::io::Error::other(e),
            )
        })?;
        out.push_str(&format!("{user}:{hash}\n"));
    }
    Ok(out)
}

const START_ATTEMPTS: u32 = 3;

/// How a test registry is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Users (name, password) of htpasswd authentication; none leaves the registry open.
    pub users: Vec<(String, String)>,
    /// Serve HTTPS with a certificate for 127.0.0.1 from a CA made for this registry.
    pub tls: bool,
    /// Bearer-token authentication instead of htpasswd: the registry sends clients to a
    /// [`TokenServer`], which checks `users` and hands out signed tokens.
    pub token: bool,
}

/// A running registry; dropping it kills the process and deletes its storage.
#[derive(Debug)]
pub struct OciRegistry {
    port: u16,
    processes: Processes,
    /// The CA of its certificate, PEM, when it serves TLS.
    ca_pem: Option<String>,
    /// The token server, for a registry with bearer-token authentication.
    token: Option<TokenServer>,
}

impl OciRegistry {
    /// Starts a registry and waits until `GET /v2/` answers 200.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(&RegistryOptions::default()).await
    }

    /// Starts a registry set up as `opts` says.
    pub async fn start_with(opts: &RegistryOptions) -> Result<Self, HarnessError> {
        let mut attempt = 1;
        loop {
            match Self::start_once(opts).await {
                Err(e) if e.is_port_race() && attempt < START_ATTEMPTS => {
                    tracing::warn!(attempt, "registry port taken during start; retrying");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(opts: &RegistryOptions) -> Result<Self, HarnessError> {
        let binary = Binary::DockerRegistry.find()?;
        let dir = rundir::component_dir("registry")?;
        let mut processes = Processes::new(dir.clone());
        let port = free_ports(1)?[0];
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(|e| HarnessError::io(format!("creating {}", storage.display()), e))?;
        let mut config = serde_json::json!({
            "version": 0.1,
            "log": { "level": "info", "fields": { "service": "registry" } },
            "storage": {
                "filesystem": { "rootdirectory": storage.display().to_string() },
                "delete": { "enabled": true },
            },
            "http": { "addr": format!("127.0.0.1:{port}") },
            // The storage health check would only add log noise.
            "health": { "storagedriver": { "enabled": false } },
        });
        let mut token = None;
        if opts.token {
            let server = TokenServer::start(&opts.users).await?;
            let bundle = dir.join("token-root.pem");
            write_private(&bundle, &server.root_pem)?;
            config["auth"] = serde_json::json!({"token": {
                "realm": server.realm(), "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
                "rootcertbundle": bundle.display().to_string()}});
            token = Some(server);
        } else if !opts.users.is_empty() {
            let path = dir.join("htpasswd");
            write_private(&path, &htpasswd(&opts.users)?)?;
            config["auth"] = serde_json::json!({"htpasswd": {"realm": "spokelet-test", "path": path.display().to_string()}});
        }
        let mut ca_pem = None;
        if opts.tls {
            let ca = CertificateAuthority::new("registry-ca")?;
            let leaf = ca.issue_server("registry", &["127.0.0.1"])?;
            let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
            write_private(&cert, &leaf.cert_pem)?;
            write_private(&key, &leaf.key_pem)?;
            config["http"]["tls"] = serde_json::json!({"certificate": cert.display().to_string(), "key": key.display().to_string()});
            ca_pem = Some(ca.cert_pem().to_string());
        }
        let config = serde_yaml::to_string(&config).map_err(|source| HarnessError::Serialize {
            what: "registry config".into(),
            source,
        })?;
        let config_path = dir.join("config.yml");
        write_private(&config_path, &config)?;

        let registry = processes.push(ManagedProcess::spawn(
            "registry",
            "docker-registry",
            &binary,
            &["serve".to_string(), config_path.display().to_string()],
            dir.join("docker-registry.log"),
        )?);
        let deadline = Instant::now() + start_budget();
        loop {
            registry.check_running()?;
            // Any HTTP answer from the plain probe means it serves: 401 asks for the
            // credentials, 400 says "HTTPS expected".
            let last = match http_get(port, "/v2/").await {
                Ok((200, _)) => break,
                Ok((401, _)) if !opts.users.is_empty() || opts.token => break,
                Ok((400, _)) if opts.tls => break,
                Ok((status, body)) => format!("/v2/ answered {status}: {body}"),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(registry.start_failed(format!("not ready in time; last probe: {last}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::info!(port, dir = %dir.display(), "registry ready");
        Ok(OciRegistry {
            port,
            processes,
            ca_pem,
            token,
        })
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/repo:tag`).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The token server of a registry with bearer-token authentication.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// The CA certificate (PEM) of a TLS registry.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Fails, with the end of its log, if the registry process has exited.
    pub fn check_running(&self) -> Result<(), HarnessError> {
        match self.processes.list.iter().find(|p| p.has_exited()) {
            Some(dead) => Err(dead.died()),
            None => Ok(()),
        }
    }

    /// The registry's scratch directory (config, storage, log).
    pub fn dir(&self) -> &Path {
        &self.processes.dir
    }

    /// The registry's access-log lines (combined format, one per answered request) that
    /// contain `needle`, such as `"GET /v2/app/blobs/`. The registry writes a line after it
    /// has answered, so a caller counting requests just made waits a moment first.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        self.log_lines(|l| l.contains(needle))
    }

    /// The access-log lines of `/v2/` requests (GET and HEAD, the ping included), in order.
    pub fn v2_requests(&self) -> Vec<String> {
        self.log_lines(|l| l.contains("\"GET /v2/") || l.contains("\"HEAD /v2/"))
    }

    fn log_lines(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        std::fs::read_to_string(self.processes.dir.join("docker-registry.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| keep(l))
            .map(str::to_string)
            .collect()
    }

    /// Kills the registry and deletes its storage (what dropping does), off the executor.
    pub async fn stop(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// Runs skopeo with a private policy (accept anything) so the host's policy file does not
/// matter; returns success and stdout (or stderr on failure).
pub async fn skopeo<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let output = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run skopeo (run tests/env/install.sh): {e}"));
    let text = if output.status.success() {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    (output.status.success(), text)
}

/// A blob of an OCI layout: its media type and bytes.
#[derive(Debug, Clone, Copy)]
pub struct LayoutBlob<'a> {
    pub media_type: &'a str,
    pub bytes: &'a [u8],
}

/// Writes an OCI image layout at `layout` holding one manifest, tagged `tag`, of `config` and
/// `layers`, as another tool would hand it to `skopeo copy oci:LAYOUT:TAG`. Returns the sha256
/// (hex) of the manifest and of each layer.
pub fn write_oci_layout(
    layout: &Path,
    tag: &str,
    config: LayoutBlob<'_>,
    layers: &[LayoutBlob<'_>],
) -> (String, Vec<String>) {
    use sha2::{Digest as _, Sha256};
    let blobs = layout.join("blobs/sha256");
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&blobs).unwrap_or_else(|e| panic!("creating {}: {e}", blobs.display()));
    let put = |bytes: &[u8]| -> String {
        let digest = hex::encode(Sha256::digest(bytes));
        write(&blobs.join(&digest), bytes);
        digest
    };
    let descriptor = |b: &LayoutBlob<'_>, digest: &str| serde_json::json!({"mediaType": b.media_type, "digest": format!("sha256:{digest}"), "size": b.bytes.len()});
    let config_digest = put(config.bytes);
    let layer_digests: Vec<String> = layers.iter().map(|l| put(l.bytes)).collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor(&config, &config_digest),
        "layers": layers.iter().zip(&layer_digests).map(|(l, d)| descriptor(l, d)).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    write(
        &layout.join("index.json"),
        &serde_json::to_vec(&index).unwrap_or_default(),
    );
    write(&layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    (manifest_digest, layer_digests)
}

/// A plain-HTTP front for a registry that answers the first `rejections` connections with
/// `429 Too Many Requests` and a `Retry-After`, then passes every later connection through
/// untouched: a rate-limited registry, as Docker Hub and mirrors behave. Each rejection
/// closes its connection, so a client's next request opens (and is counted as) a new one.
/// Dropping it stops listening.
#[derive(Debug)]
pub struct RateLimitedFront {
    port: u16,
    rejected: std::sync::Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl RateLimitedFront {
    /// Listens on a free loopback port in front of `registry` (`127.0.0.1:PORT`).
    pub async fn start(registry: &str, rejections: u32, retry_after_s: u32) -> Result<Self, HarnessError> {
        use std::sync::atomic::Ordering;
        let (listener, port) = crate::process::bind_loopback("the rate-limited front").await?;
        let rejected = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = rejected.clone();
        let upstream = registry.to_string();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let reject = counter
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < rejections).then_some(n + 1)
                    })
                    .is_ok();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if reject {
                        reject_one(conn, retry_after_s).await;
                    } else if let Ok(mut to) = tokio::net::TcpStream::connect(&upstream).await {
                        let mut conn = conn;
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut to).await;
                    }
                });
            }
        });
        Ok(RateLimitedFront { port, rejected, task })
    }

    /// `127.0.0.1:PORT` of the front.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections answered with 429 so far.
    pub fn rejected(&self) -> u32 {
        self.rejected.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RateLimitedFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A front that passes requests to the registry but cuts each connection once it has sent
/// `max_bytes` of the registry's answers back: a registry (or a network) that drops a download
/// halfway. Small answers (pings, manifests) pass; a layer larger than the cap never does.
#[derive(Debug)]
pub struct CuttingFront {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingFront {
    /// Listens on a free loopback port in front of `registry` (`127.0.0.1:PORT`).
    pub async fn start(registry: &str, max_bytes: u64) -> Result<Self, HarnessError> {
        use tokio::io::AsyncReadExt;
        let (listener, port) = crate::process::bind_loopback("the cutting front").await?;
        let upstream = registry.to_string();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(to) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = tokio::io::split(conn);
                    let (to_read, mut to_write) = tokio::io::split(to);
                    let requests = tokio::io::copy(&mut client_read, &mut to_write);
                    // Answers pass up to the cap; then both sides are dropped mid-stream.
                    let mut capped = to_read.take(max_bytes);
                    let answers = tokio::io::copy(&mut capped, &mut client_write);
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                    }
                });
            }
        });
        Ok(CuttingFront { port, task })
    }

    /// `127.0.0.1:PORT` of the front.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for CuttingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head and answers it with 429, the way distribution's rate limiters do
/// (an OCI error envelope with code `TOOMANYREQUESTS`), then closes.
async fn reject_one(mut conn: tokio::net::TcpStream, retry_after_s: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"rate limited by the test front"}]}"#;
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after_s}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(answer.as_bytes()).await;
    let _ = conn.shutdown().await;
}
