//! Dialing the hub: the endpoint (timeouts, keepalive), the mTLS connector and the bearer
//! token, giving the client one session uses for its subscription and its publishes.

use spokelet_proto::CloudEventServiceClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::options::{GrpcError, GrpcHubOptions};
use crate::config::HubSettings;
use crate::config::TokenSource;
use crate::tls::{ClientTls, HubConnector};

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub(crate) struct Auth {
    /// The header value, marked sensitive so it is never logged by tonic/hyper.
    header: Option<AsciiMetadataValue>,
}

impl Auth {
    /// Reads the token now: a token file is read at each connect, so a rotated token is used.
    fn new(token: Option<&TokenSource>) -> Result<Auth, GrpcError> {
        let header = match token {
            None => None,
            Some(src) => {
                let token = src
                    .read()
                    .map_err(|e| GrpcError::Token(format!("reading {src:?}: {e}")))?;
                let mut v: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| GrpcError::Token("token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Auth { header })
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.header.is_some() {
            "Auth(<bearer>)"
        } else {
            "Auth(none)"
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The client type of one session.
pub(crate) type Client = CloudEventServiceClient<InterceptedService<Channel, Auth>>;

/// The endpoint to dial, with the connect timeout and keepalive settings.
fn endpoint(opts: &GrpcHubOptions) -> Result<Endpoint, GrpcError> {
    let s = &opts.settings;
    let mut endpoint = if s.url.plaintext {
        tracing::warn!(url = %s.url.uri(), "connecting to the hub WITHOUT TLS (insecure plaintext): works, status and credentials travel unencrypted");
        Endpoint::from_shared(s.url.uri()).map_err(GrpcError::Connect)?
    } else {
        // tonic must not add TLS itself (our connector does), so it sees http; requests still
        // carry the https origin.
        let dial = format!("http://{}:{}", s.url.host, s.url.port);
        let origin: tonic::transport::Uri = s
            .url
            .uri()
            .parse()
            .map_err(|e: http_uri::InvalidUri| GrpcError::Url(e.to_string()))?;
        Endpoint::from_shared(dial)
            .map_err(GrpcError::Connect)?
            .origin(origin)
    };
    endpoint = endpoint.connect_timeout(opts.connect_timeout).tcp_nodelay(true);
    if s.keep_alive.enable {
        endpoint = endpoint
            .http2_keep_alive_interval(s.keep_alive.time)
            .keep_alive_timeout(s.keep_alive.timeout)
            .keep_alive_while_idle(s.keep_alive.permit_without_stream);
    }
    Ok(endpoint)
}

/// Dials the hub and builds a client.
pub(super) async fn connect(opts: &GrpcHubOptions, tls: Option<&ClientTls>) -> Result<Client, GrpcError> {
    let s = &opts.settings;
    let endpoint = endpoint(opts)?;
    let channel = match tls {
        None => endpoint.connect().await.map_err(GrpcError::Connect)?,
        Some(tls) => {
            let connector: HubConnector = tls.connector(&s.url.host, s.url.port)?;
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(GrpcError::Connect)?
        }
    };
    let auth = Auth::new(s.token.as_ref())?;
    Ok(CloudEventServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(opts.max_message_size)
        .max_encoding_message_size(opts.max_message_size))
}

/// `http::uri` through tonic, so no direct `http` dependency is needed.
mod http_uri {
    pub(super) use tonic::codegen::http::uri::InvalidUri;
}

/// A client of the hub `settings` name, for the registration's own subscriptions (the join,
/// the membership): dialed with the transport's defaults and TLS.
pub(crate) async fn dial_hub(settings: &HubSettings) -> Result<Client, GrpcError> {
    let tls = client_tls(settings)?;
    connect(&GrpcHubOptions::new(settings.clone()), tls.as_ref()).await
}

/// The TLS client `settings` ask for: none for a plaintext URL, which must be opted into.
pub(super) fn client_tls(settings: &HubSettings) -> Result<Option<ClientTls>, GrpcError> {
    if !settings.url.plaintext {
        return Ok(Some(ClientTls::new(settings.tls.clone())?));
    }
    if !settings.insecure_plaintext {
        return Err(GrpcError::Plaintext(settings.url.uri()));
    }
    Ok(None)
}
