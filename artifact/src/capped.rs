//! The pull side's requests to a registry, every answer read through a cap: manifests, tag
//! lists, signature payloads, token answers and error bodies are read only up to a limit of
//! their own, and a layer streams.
//!
//! Written here rather than taken from oci-client, which spokelet uses to push and for its
//! types: oci-client reads each of these answers whole, however large, so one registry (or
//! anything in its place) answering a 2 GiB manifest, tag list or error page would take the
//! agent's memory with it. The errors are oci-client's own, so retries and status reasons read
//! them as before.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use futures::StreamExt;
use oci_client::Reference;
use oci_client::errors::{OciDistributionError, OciEnvelope};
use oci_client::secrets::RegistryAuth;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use spokelet_base::lock::lock;

/// The largest manifest (or image index) read: the distribution spec's own 4 MiB, which
/// registries accept at least and a Flux artifact's manifest stays far below.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest page of a tag list: 100,000 tags of 128 characters, the longest a tag may be,
/// for a registry that ignores the page size.
pub const MAX_TAG_LIST_BYTES: usize = 16 * 1024 * 1024;
/// The largest token answer: tokens are a few KiB, with room for large claims.
pub const MAX_TOKEN_BYTES: usize = 1024 * 1024;
/// The most of an error answer read; the message a status carries is cut far shorter.
pub const MAX_ERROR_BYTES: usize = 64 * 1024;

/// How long the registry client waits on the network. Without them a registry that accepts the
/// connection and then says nothing holds the pull (and, above it, a reconcile) until the
/// source's own `timeout`; with them such a registry fails one request in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To open a connection (TCP and TLS).
    pub connect: std::time::Duration,
    /// Between two reads of an answer: a stalled stream fails after this long without a byte,
    /// however long the whole download takes.
    pub read: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: std::time::Duration::from_secs(10),
            read: std::time::Duration::from_secs(30),
        }
    }
}

/// An HTTP client for one registry's pulls, with the credentials of one source.
pub(crate) struct CappedClient {
    http: reqwest::Client,
    /// `https`, or `http` for a source with `insecure: true`.
    scheme: &'static str,
    auth: RegistryAuth,
    /// The `Authorization` value that last worked, by repository: a token is asked for once,
    /// and again only when the registry refuses it (expired).
    authorizations: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for CappedClient {
    // Credentials and tokens are not worth printing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedClient")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// What a request asks for, to name it in an over-limit error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted<'a> {
    /// `manifest`, `tag list`, ...
    pub what: &'a str,
    /// Bytes of the answer read at most.
    pub cap: usize,
}

impl CappedClient {
    /// A client trusting only the PEM certificates `ca` when given, else the usual roots.
    pub(crate) fn new(
        insecure: bool,
        auth: RegistryAuth,
        ca: Option<&[u8]>,
        timeouts: Timeouts,
    ) -> Result<CappedClient, OciDistributionError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read)
            .user_agent(concat!("spokelet/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem)?;
            builder = builder.tls_certs_only(certs);
        }
        Ok(CappedClient {
            http: builder.build()?,
            scheme: if insecure { "http" } else { "https" },
            auth,
            authorizations: Mutex::new(HashMap::new()),
        })
    }

    /// `GET /v2/<repository>/<path>`, its answer read whole up to `wanted.cap`; the body and
    /// the answer's headers.
    pub(crate) async fn get(
        &self,
        repo: &Reference,
        path: &str,
        accept: &[&str],
        wanted: Wanted<'_>,
    ) -> Result<(Vec<u8>, HeaderMap), OciDistributionError> {
        let response = self.send(Method::GET, repo, path, accept).await?;
        let headers = response.headers().clone();
        let body = read_capped(response, wanted).await?;
        Ok((body, headers))
    }

    /// `HEAD /v2/<repository>/<path>`: the answer's headers.
    pub(crate) async fn head(
        &self,
        repo: &Reference,
        path: &str,
        accept: &[&str],
    ) -> Result<HeaderMap, OciDistributionError> {
        let response = self.send(Method::HEAD, repo, path, accept).await?;
        Ok(response.headers().clone())
    }

    /// `GET /v2/<repository>/<path>` whose body the caller streams (a layer).
    pub(crate) async fn stream(
        &self,
        repo: &Reference,
        path: &str,
    ) -> Result<reqwest::Response, OciDistributionError> {
        self.send(Method::GET, repo, path, &[]).await
    }

    /// Sends a request, authorizing it as the registry asks on a 401 (once), and turns an
    /// unsuccessful answer into oci-client's error for it.
    async fn send(
        &self,
        method: Method,
        repo: &Reference,
        path: &str,
        accept: &[&str],
    ) -> Result<reqwest::Response, OciDistributionError> {
        let url = format!(
            "{}://{}/v2/{}/{path}",
            self.scheme,
            repo.resolve_registry(),
            repo.repository()
        );
        let known = lock(&self.authorizations).get(repo.repository()).cloned();
        let authorization = known.or_else(|| self.bearer());
        let mut response = self
            .request(&method, &url, accept, authorization.as_deref())
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
            if let Some(value) = self.authorize(repo, challenge).await? {
                response = self.request(&method, &url, accept, Some(&value)).await?;
                if response.status().is_success() {
                    lock(&self.authorizations).insert(repo.repository().to_string(), value);
                }
            }
        }
        if response.status().is_success() {
            return Ok(response);
        }
        Err(answer_error(response, &url).await)
    }

    async fn request(
        &self,
        method: &Method,
        url: &str,
        accept: &[&str],
        authorization: Option<&str>,
    ) -> Result<reqwest::Response, OciDistributionError> {
        let mut request = self.http.request(method.clone(), url);
        if !accept.is_empty() {
            request = request.header(ACCEPT, accept.join(", "));
        }
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        Ok(request.send().await?)
    }

    /// A bearer token given as the credential itself (no exchange needed).
    fn bearer(&self) -> Option<String> {
        match &self.auth {
            RegistryAuth::Bearer(token) => Some(format!("Bearer {token}")),
            _ => None,
        }
    }

    /// The `Authorization` value the registry's challenge asks for: Basic credentials, or a
    /// token from its token service (asked with the Basic credentials, when there are any).
    /// None when it asks for nothing this client can give.
    async fn authorize(
        &self,
        repo: &Reference,
        challenge: Option<reqwest::header::HeaderValue>,
    ) -> Result<Option<String>, OciDistributionError> {
        let Some(challenge) = challenge.as_ref().and_then(|c| c.to_str().ok()) else {
            return Ok(None);
        };
        let basic = match &self.auth {
            RegistryAuth::Basic(user, password) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            _ => None,
        };
        let Some(params) = bearer_challenge(challenge) else {
            // A Basic challenge (or one we do not know): the credentials as they are.
            return Ok(basic);
        };
        let Some(realm) = params.get("realm") else {
            return Ok(basic);
        };
        let scope = format!("repository:{}:pull", repo.repository());
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = params.get("service") {
            query.push(("service", service));
        }
        let mut request = self.http.get(realm.as_str()).query(&query);
        if let Some(value) = &basic {
            request = request.header(AUTHORIZATION, value);
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            let text = read_capped(
                response,
                Wanted {
                    what: "token error",
                    cap: MAX_ERROR_BYTES,
                },
            )
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
            return Err(OciDistributionError::AuthenticationFailure(text));
        }
        let body = read_capped(
            response,
            Wanted {
                what: "token answer",
                cap: MAX_TOKEN_BYTES,
            },
        )
        .await?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| OciDistributionError::RegistryTokenDecodeError(e.to_string()))?;
        let token = answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| OciDistributionError::RegistryTokenDecodeError("no token in the answer".into()))?;
        Ok(Some(format!("Bearer {token}")))
    }
}

/// A token service's answer: `token`, or OAuth2's `access_token`.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

/// The parameters of a `Bearer realm="...",service="..."` challenge; None for another scheme.
fn bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start_matches(',').trim();
    }
    Some(params)
}

/// Reads an answer's body up to `wanted.cap` bytes: a larger one (announced or sent) is an
/// error, and never more than the cap is held.
pub(crate) async fn read_capped(
    response: reqwest::Response,
    wanted: Wanted<'_>,
) -> Result<Vec<u8>, OciDistributionError> {
    let over = || {
        OciDistributionError::SpecViolationError(format!(
            "the registry's {} is over the {} byte limit; the rest of it was not read",
            wanted.what, wanted.cap
        ))
    };
    if response.content_length().is_some_and(|n| n > wanted.cap as u64) {
        return Err(over());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > wanted.cap {
            return Err(over());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// oci-client's error for an unsuccessful answer, from at most [`MAX_ERROR_BYTES`] of its body.
async fn answer_error(response: reqwest::Response, url: &str) -> OciDistributionError {
    let status = response.status();
    let body = read_capped(
        response,
        Wanted {
            what: "error answer",
            cap: MAX_ERROR_BYTES,
        },
    )
    .await
    .unwrap_or_else(|e| e.to_string().into_bytes());
    if status == StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError { url: url.to_string() };
    }
    if status.is_client_error()
        && let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(&body)
    {
        return OciDistributionError::RegistryError {
            envelope,
            url: url.to_string(),
        };
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url: url.to_string(),
        message: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_read_with_quoted_and_bare_values() {
        let p = bearer_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#)
            .unwrap();
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a:pull");
        let p = bearer_challenge("bearer realm=https://auth.example/token, service=reg").unwrap();
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg");
        assert!(bearer_challenge(r#"Basic realm="registry""#).is_none());
    }
}
