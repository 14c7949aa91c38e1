//! The token server of a registry with bearer-token authentication (the `WWW-Authenticate:
//! Bearer realm=...` flow of Docker Hub, GHCR, Harbor and distribution's `auth.token`): it
//! checks a client's basic credentials and hands out a JWT, signed ES256 with a certificate
//! the registry trusts, granting the actions the client asked for.
//!
//! Written here because no token server is packaged; the registry that verifies the tokens
//! is the real one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::HarnessError;
use crate::pki::CertificateAuthority;

/// The `service` the registry names in its challenge and the tokens' audience.
pub const TOKEN_SERVICE: &str = "spokelet-test-registry";
/// The tokens' issuer, as the registry's `auth.token.issuer` expects it.
pub const TOKEN_ISSUER: &str = "spokelet-test-token-issuer";

/// A running token server; dropping it stops listening.
#[derive(Debug)]
pub struct TokenServer {
    port: u16,
    /// PEM of the CA the signing certificate chains to: the registry's `rootcertbundle`.
    pub root_pem: String,
    issued: Arc<AtomicU32>,
    refused: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

/// What the request handler needs, shared by every connection.
struct Issuer {
    users: Vec<(String, String)>,
    key: SigningKey,
    /// The signing certificate, DER, for the JWT's `x5c` header.
    cert_der: Vec<u8>,
    issued: Arc<AtomicU32>,
    refused: Arc<AtomicU32>,
}

impl TokenServer {
    /// Listens on a free loopback port for `users` (name, password).
    pub async fn start(users: &[(String, String)]) -> Result<TokenServer, HarnessError> {
        let ca = CertificateAuthority::new("registry-token-ca")?;
        let signer = ca.issue_server("registry-token-signer", &["127.0.0.1"])?;
        let key = SigningKey::from_pkcs8_pem(&signer.key_pem)
            .map_err(|e| HarnessError::io("reading the token signing key", std::io::Error::other(e)))?;
        let cert_der = rustls_pemfile::certs(&mut signer.cert_pem.as_bytes())
            .next()
            .ok_or_else(|| {
                HarnessError::io(
                    "reading the signing certificate",
                    std::io::Error::other("no certificate"),
                )
            })?
            .map_err(|e| HarnessError::io("reading the signing certificate", e))?
            .to_vec();
        let (listener, port) = crate::process::bind_loopback("the token server").await?;
        let (issued, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let issuer = Arc::new(Issuer {
            users: users.to_vec(),
            key,
            cert_der,
            issued: issued.clone(),
            refused: refused.clone(),
        });
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let issuer = issuer.clone();
                tokio::spawn(async move { issuer.serve(conn).await });
            }
        });
        Ok(TokenServer {
            port,
            root_pem: ca.cert_pem().to_string(),
            issued,
            refused,
            task,
        })
    }

    /// The realm URL the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Tokens handed out so far.
    pub fn issued(&self) -> u32 {
        self.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused (no or wrong credentials) so far.
    pub fn refused(&self) -> u32 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    /// Answers the requests of one connection (clients keep connections alive).
    async fn serve(&self, mut conn: tokio::net::TcpStream) {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                if pending.len() > 64 * 1024 {
                    return;
                }
                continue;
            };
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let (status, body) = self.answer(&head);
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// The status line and body for one request head (GET requests carry no body).
    fn answer(&self, head: &str) -> (&'static str, String) {
        let mut lines = head.lines();
        let target = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default();
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let user = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.trim().strip_prefix("Basic "))
            .and_then(|b| STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|pair| {
                let (name, password) = pair.split_once(':')?;
                self.users
                    .iter()
                    .any(|(n, p)| n == name && p == password)
                    .then(|| name.to_string())
            });
        let Some(user) = user else {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return (
                "401 Unauthorized",
                r#"{"details":"wrong or missing credentials"}"#.to_string(),
            );
        };
        let scopes: Vec<String> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .collect();
        let token = self.token(&user, &scopes);
        self.issued.fetch_add(1, Ordering::SeqCst);
        (
            "200 OK",
            serde_json::json!({"token": token, "expires_in": 300}).to_string(),
        )
    }

    /// A JWT for `user` granting every `repository:NAME:ACTIONS` scope asked for.
    fn token(&self, user: &str, scopes: &[String]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|s| {
                let (kind, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header =
            serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.cert_der)]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{user}-{now}-{}", self.issued.load(Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // ES256 in a JWT is the raw r || s pair (64 bytes), not DER.
        let signature: Signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}
