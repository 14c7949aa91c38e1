//! Fetching an `OCIRepository`'s artifact: credentials and CA from its Secrets, the pull (or
//! the one-request check of an unchanged one) within its `timeout`, into the shared cache.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::digest::Digest;
use spokelet_artifact::registry::{ArtifactRef, Pulled, Registry, RegistryError};
use spokelet_artifact::signature::CosignKeys;
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_base::lock::lock;

use crate::objects::{DEFAULT_TIMEOUT, FluxObject, OciRepositorySpec};

/// The longest a pull may take, whatever the source's `timeout` asks: a hub cannot make one
/// source hold the agent's pull for an hour.
pub const MAX_PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a source could not be fetched; each knows the Flux condition reason it reports.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Secret {namespace}/{name}: {message}")]
    Secret {
        namespace: String,
        name: String,
        message: String,
    },
    /// The work's identity may not read the Secret: the API server said so.
    #[error("Secret {namespace}/{name}: {message}")]
    Forbidden {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("pulling {url} took longer than its timeout of {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error(
        "{url} is {why}; refused unless the agent allows it (--artifact-allow-insecure, and the host in --artifact-insecure-hosts when that is set)"
    )]
    Insecure { url: String, why: &'static str },
    #[error("verify ({provider}): {why}; nothing was unpacked")]
    Verification { provider: String, why: String },
}

impl SourceError {
    /// Whether the artifact failed (or could not undergo) signature verification.
    pub fn is_verification(&self) -> bool {
        self.reason() == "VerificationError"
    }

    /// The `Ready` condition reason, as source-controller names it.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceError::Secret { .. } => "AuthenticationFailed",
            // The API server's own reason, as for a manifest it refuses the work's executor.
            SourceError::Forbidden { .. } => "Forbidden",
            SourceError::Registry(RegistryError::Request {
                source:
                    oci_client::errors::OciDistributionError::AuthenticationFailure(_)
                    | oci_client::errors::OciDistributionError::UnauthorizedError { .. },
                ..
            }) => "AuthenticationFailed",
            SourceError::Verification { .. }
            | SourceError::Registry(RegistryError::Unsigned { .. } | RegistryError::BadSignature { .. }) => {
                "VerificationError"
            }
            _ => "OCIArtifactPullFailed",
        }
    }
}

/// Which registries an agent-side opt-in allows beyond the ordinary: plain HTTP
/// (`insecure: true`) and loopback or link-local addresses, which reach the agent's own node
/// (a node-local service, the cloud metadata endpoint) and which a hub must not be able to
/// point a pull, and its credentials, at by itself. Set by `--artifact-allow-insecure` and
/// `--artifact-insecure-hosts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsecureRegistries {
    /// Such registries are allowed at all.
    pub allow: bool,
    /// When not empty, only these hosts (`host` or `host:port`, as the URL names them).
    pub hosts: Vec<String>,
}

impl InsecureRegistries {
    /// Refuses a pull from `url` (plain HTTP when `insecure`) that needs the opt-in it lacks.
    pub fn check(&self, url: &str, insecure: bool) -> Result<(), SourceError> {
        let host = registry_host(url);
        let why = if insecure {
            "plain HTTP (insecure: true)"
        } else if is_local(host) {
            "a loopback or link-local address"
        } else {
            return Ok(());
        };
        let listed = self.hosts.is_empty()
            || self
                .hosts
                .iter()
                .any(|h| h == host || Some(h.as_str()) == host.rsplit_once(':').map(|(name, _)| name));
        if self.allow && listed {
            return Ok(());
        }
        Err(SourceError::Insecure {
            url: url.to_string(),
            why,
        })
    }
}

/// Whether `host` (`name`, `name:port`, `[v6]:port`) is a loopback or link-local address, or
/// `localhost`. A name that only resolves to one is not caught here (no lookup is made).
fn is_local(host: &str) -> bool {
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = bare.to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => false,
    }
}

/// Pulls sources into one cache with one set of limits; cheap to clone.
#[derive(Clone)]
pub struct SourceFetcher {
    cache: ArtifactCache,
    limits: UnpackLimits,
    /// Plain-HTTP and local registries the agent allows.
    insecure: InsecureRegistries,
    /// One registry client per distinct settings (host, plain HTTP, credentials, CA), kept
    /// across fetches: a check every interval then reuses its connection and the token the
    /// registry gave, instead of a new TLS handshake and token exchange each time.
    registries: Arc<Mutex<HashMap<String, Registry>>>,
}

/// Clients kept at most; past it the map is emptied (rotated credentials leave old entries).
const MAX_REGISTRY_CLIENTS: usize = 64;

impl std::fmt::Debug for SourceFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceFetcher")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl SourceFetcher {
    pub fn new(cache: ArtifactCache, limits: UnpackLimits, insecure: InsecureRegistries) -> SourceFetcher {
        SourceFetcher {
            cache,
            limits,
            insecure,
            registries: Arc::default(),
        }
    }

    pub fn cache(&self) -> &ArtifactCache {
        &self.cache
    }

    /// Fetches `repo`'s artifact; when it is still `known`'s, one tag lookup and nothing else.
    /// Its Secrets are read with `reader`, the work's identity (its executor's, when it names
    /// one): a work never reads a Secret through the agent's own rights that its executor
    /// could not read.
    pub async fn fetch(
        &self,
        reader: &kube::Client,
        repo: &FluxObject<OciRepositorySpec>,
        known: Option<&Pulled>,
    ) -> Result<Pulled, SourceError> {
        let spec = &repo.spec;
        // Before any Secret is read: credentials never go to a registry the agent refuses.
        self.insecure.check(&spec.url, spec.insecure)?;
        let keys = self.keys(reader, repo).await?;
        let auth = self.auth(reader, repo).await?;
        let ca = self.ca(reader, repo).await?;
        let registry = self.registry(&spec.url, spec.insecure, auth, ca.as_deref());
        let wanted = ArtifactRef {
            tag: spec.reference.tag.clone(),
            semver: spec.reference.semver.clone(),
            semver_filter: spec.reference.semver_filter.clone(),
            digest: spec.reference.digest.clone(),
            layer_media_type: spec.layer_selector.as_ref().and_then(|l| l.media_type.clone()),
        };
        let asked = spec.timeout.unwrap_or(DEFAULT_TIMEOUT);
        // The hub picks `timeout`; the agent bounds how long one pull may take.
        let timeout = asked.min(MAX_PULL_TIMEOUT);
        if timeout < asked {
            tracing::debug!(url = %spec.url, ?asked, limit = ?MAX_PULL_TIMEOUT, "the source's timeout is cut to the agent's limit");
        }
        let pull = registry.refresh(
            &spec.url,
            &wanted,
            &self.cache,
            &self.limits,
            known,
            keys.as_ref(),
        );
        let pulled = tokio::time::timeout(timeout, pull)
            .await
            .map_err(|_| SourceError::Timeout {
                url: spec.url.clone(),
                timeout,
            })??;
        Ok(pulled)
    }

    /// Removes every cache entry but the layers in `in_use` (those of the sources held now).
    pub fn collect_garbage(&self, in_use: HashSet<Digest>) {
        let cache = self.cache.clone();
        // Removing directories is blocking work; it never holds up a reconcile.
        tokio::task::spawn_blocking(move || match cache.collect_garbage(&in_use) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "artifact cache entries no source uses were removed"),
            Err(e) => tracing::warn!(error = %e, "artifact cache garbage collection failed"),
        });
    }

    /// The client for these settings, made once.
    fn registry(&self, url: &str, insecure: bool, auth: RegistryAuth, ca: Option<&[u8]>) -> Registry {
        // Hashed, so the map holds no credentials in its keys.
        let mut h = Sha256::new();
        let who = match &auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Basic(u, p) => format!("basic\0{u}\0{p}"),
            RegistryAuth::Bearer(t) => format!("bearer\0{t}"),
        };
        for part in [
            registry_host(url).as_bytes(),
            &[u8::from(insecure)],
            who.as_bytes(),
            ca.unwrap_or_default(),
        ] {
            h.update(part);
            h.update([0]);
        }
        let key = hex::encode(h.finalize());
        let mut clients = lock(&self.registries);
        if clients.len() >= MAX_REGISTRY_CLIENTS && !clients.contains_key(&key) {
            clients.clear();
        }
        clients
            .entry(key)
            .or_insert_with(|| Registry::with_roots(insecure, auth, ca))
            .clone()
    }

    /// The public keys of `verify` (every `*.pub` entry of its Secret). Fail closed: an
    /// artifact that asks to be verified is never unpacked unverified, so keyless
    /// verification, `notation` and unusable keys are errors, never skipped checks.
    async fn keys(
        &self,
        reader: &kube::Client,
        repo: &FluxObject<OciRepositorySpec>,
    ) -> Result<Option<CosignKeys>, SourceError> {
        let Some(v) = &repo.spec.verify else {
            return Ok(None);
        };
        let refuse = |why: &str| SourceError::Verification {
            provider: v.provider.clone(),
            why: why.to_string(),
        };
        if v.provider != "cosign" {
            return Err(refuse("only cosign is supported"));
        }
        let Some(r) = &v.secret_ref else {
            return Err(refuse(
                "keyless verification is not supported; give a Secret of public keys",
            ));
        };
        if !v.match_oidc_identity.is_empty() {
            return Err(refuse(
                "matchOIDCIdentity is keyless verification, which is not supported",
            ));
        }
        let secret = secret(reader, &repo.namespace, &r.name).await?;
        let data = secret.data.unwrap_or_default();
        let pems: Vec<(&str, &[u8])> = data
            .iter()
            .filter(|(k, _)| k.ends_with(".pub"))
            .map(|(k, v)| (k.as_str(), v.0.as_slice()))
            .collect();
        CosignKeys::from_pems(pems)
            .map(Some)
            .map_err(|e| SourceError::Verification {
                provider: v.provider.clone(),
                why: format!("Secret {}/{}: {e}", repo.namespace, r.name),
            })
    }

    /// Credentials from `secretRef`: a docker config (`.dockerconfigjson`) entry for the
    /// registry host, or `username` and `password` keys; anonymous without one.
    async fn auth(
        &self,
        reader: &kube::Client,
        repo: &FluxObject<OciRepositorySpec>,
    ) -> Result<RegistryAuth, SourceError> {
        let Some(r) = &repo.spec.secret_ref else {
            return Ok(RegistryAuth::Anonymous);
        };
        let secret = secret(reader, &repo.namespace, &r.name).await?;
        let err = |message: String| SourceError::Secret {
            namespace: repo.namespace.clone(),
            name: r.name.clone(),
            message,
        };
        let host = registry_host(&repo.spec.url);
        credentials(&secret, host).map_err(|e| err(e.to_string()))
    }

    /// The CA bundle of `certSecretRef` (`ca.crt`). Client certificates are refused by name:
    /// the registry client cannot present one, and dropping it silently would fail later and
    /// less clearly.
    async fn ca(
        &self,
        reader: &kube::Client,
        repo: &FluxObject<OciRepositorySpec>,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(r) = &repo.spec.cert_secret_ref else {
            return Ok(None);
        };
        let secret = secret(reader, &repo.namespace, &r.name).await?;
        let err = |message: &str| SourceError::Secret {
            namespace: repo.namespace.clone(),
            name: r.name.clone(),
            message: message.to_string(),
        };
        let data = secret.data.unwrap_or_default();
        if data.contains_key("tls.crt") || data.contains_key("tls.key") {
            return Err(err(
                "client certificates (tls.crt, tls.key) for registries are not supported; only ca.crt",
            ));
        }
        match data.get("ca.crt") {
            Some(ca) => Ok(Some(ca.0.clone())),
            None => Err(err("has no ca.crt")),
        }
    }
}

/// The Secret `namespace/name`, read as `reader`.
async fn secret(reader: &kube::Client, namespace: &str, name: &str) -> Result<Secret, SourceError> {
    let api: Api<Secret> = Api::namespaced(reader.clone(), namespace);
    api.get(name).await.map_err(|e| {
        let (namespace, name, message) = (namespace.to_string(), name.to_string(), e.to_string());
        match e {
            kube::Error::Api(s) if s.code == 403 => SourceError::Forbidden {
                namespace,
                name,
                message,
            },
            _ => SourceError::Secret {
                namespace,
                name,
                message,
            },
        }
    })
}

/// `host[:port]` of `oci://host[:port]/repo`.
pub fn registry_host(url: &str) -> &str {
    let rest = url.strip_prefix("oci://").unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// Why a pull Secret gives no credentials for a registry host.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("holds neither .dockerconfigjson nor username and password")]
    Missing,
    #[error(".dockerconfigjson is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error(".dockerconfigjson has no auths")]
    NoAuths,
    #[error(".dockerconfigjson has no entry for {0}")]
    NoEntry(String),
    #[error("auth of {host} is not base64: {source}")]
    NotBase64 {
        host: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("auth of {0} is not text")]
    NotText(String),
    #[error("auth of {0} is not user:password")]
    NotUserPassword(String),
    #[error("the entry for {0} has neither username and password nor auth")]
    EmptyEntry(String),
}

/// The credentials a Secret holds for `host`.
pub fn credentials(secret: &Secret, host: &str) -> Result<RegistryAuth, CredentialsError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    if let Some(config) = text(".dockerconfigjson") {
        return docker_config(&config, host);
    }
    match (text("username"), text("password")) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u, p)),
        _ => Err(CredentialsError::Missing),
    }
}

/// The entry for `host` of a docker config JSON (`auths.<host>`: `username`/`password`, or
/// `auth` as base64 of `user:password`).
fn docker_config(config: &str, host: &str) -> Result<RegistryAuth, CredentialsError> {
    let v: Value = serde_json::from_str(config).map_err(CredentialsError::NotJson)?;
    let auths = v
        .get("auths")
        .and_then(Value::as_object)
        .ok_or(CredentialsError::NoAuths)?;
    let entry = auths
        .iter()
        .find(|(k, _)| {
            let k = k.trim_start_matches("https://").trim_start_matches("http://");
            k.split('/').next() == Some(host)
        })
        .map(|(_, e)| e)
        .ok_or_else(|| CredentialsError::NoEntry(host.to_string()))?;
    let field = |k: &str| entry.get(k).and_then(Value::as_str).map(str::to_string);
    if let (Some(u), Some(p)) = (field("username"), field("password")) {
        return Ok(RegistryAuth::Basic(u, p));
    }
    let Some(auth) = field("auth") else {
        return Err(CredentialsError::EmptyEntry(host.to_string()));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|source| CredentialsError::NotBase64 {
            host: host.to_string(),
            source,
        })?;
    let decoded = String::from_utf8(decoded).map_err(|_| CredentialsError::NotText(host.to_string()))?;
    let (u, p) = decoded
        .split_once(':')
        .ok_or_else(|| CredentialsError::NotUserPassword(host.to_string()))?;
    Ok(RegistryAuth::Basic(u.into(), p.into()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_and_local_registries_need_the_agents_opt_in() {
        let off = InsecureRegistries::default();
        assert!(off.check("oci://registry.example/apps/a", false).is_ok());
        for (url, insecure) in [
            ("oci://registry.example/apps/a", true),
            ("oci://127.0.0.1:5000/apps/a", false),
            ("oci://localhost/apps/a", false),
            ("oci://169.254.169.254/latest", false),
            ("oci://[::1]:5000/apps/a", false),
            ("oci://[fe80::1]/apps/a", false),
        ] {
            let err = off.check(url, insecure).unwrap_err().to_string();
            assert!(err.contains("--artifact-allow-insecure"), "{url}: {err}");
        }
        let all = InsecureRegistries {
            allow: true,
            hosts: Vec::new(),
        };
        assert!(all.check("oci://127.0.0.1:5000/apps/a", true).is_ok());
        let listed = InsecureRegistries {
            allow: true,
            hosts: vec!["127.0.0.1:5000".into(), "mirror.lan".into()],
        };
        assert!(listed.check("oci://127.0.0.1:5000/apps/a", false).is_ok());
        assert!(listed.check("oci://mirror.lan:8080/apps/a", true).is_ok());
        assert!(listed.check("oci://169.254.169.254/latest", false).is_err());
    }

    use super::*;
    use k8s_openapi::ByteString;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    #[test]
    fn docker_config_entries_are_found_by_host() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let cfg = format!(
            r#"{{"auths": {{"https://other:5000": {{"auth": "eDp5"}}, "127.0.0.1:5000": {{"auth": "{b64}"}}}}}}"#
        );
        let s = secret(&[(".dockerconfigjson", &cfg)]);
        assert_eq!(
            basic(credentials(&s, "127.0.0.1:5000").unwrap()),
            ("bob".into(), "s3cret".into())
        );
        assert!(
            credentials(&s, "nowhere:1")
                .unwrap_err()
                .to_string()
                .contains("no entry for nowhere:1")
        );
        let plain = r#"{"auths": {"reg.example": {"username": "u", "password": "p"}}}"#;
        let s = secret(&[(".dockerconfigjson", plain)]);
        assert_eq!(
            basic(credentials(&s, "reg.example").unwrap()),
            ("u".into(), "p".into())
        );
    }

    #[test]
    fn basic_auth_secrets_and_unusable_ones() {
        let s = secret(&[("username", "u"), ("password", "p")]);
        assert_eq!(basic(credentials(&s, "h").unwrap()), ("u".into(), "p".into()));
        assert!(credentials(&secret(&[("token", "x")]), "h").is_err());
        assert!(
            credentials(&secret(&[(".dockerconfigjson", "nope")]), "h")
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
    }

    #[test]
    fn hosts_come_from_the_url() {
        assert_eq!(registry_host("oci://127.0.0.1:5000/team/app"), "127.0.0.1:5000");
        assert_eq!(registry_host("oci://ghcr.io/x"), "ghcr.io");
    }
}
