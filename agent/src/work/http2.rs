//! A kube client that talks HTTP/2 to the API server: one TLS connection multiplexes every
//! request and watch of the engine (kube's own connector offers only HTTP/1.1 in ALPN, which
//! means one connection per in-flight request).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use tower::ServiceBuilder;

/// The error type kube's service stack uses.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Client construction failures.
#[derive(Debug, thiserror::Error)]
pub enum Http2ClientError {
    /// TLS or auth settings of the config are unusable.
    #[error("building the HTTP/2 client: {0}")]
    Config(#[from] kube::Error),
}

/// Reads a kubeconfig file (its current context) into a client configuration; used for the
/// spoke (`--kubeconfig`) and for the hub (`--hub-kubeconfig`) alike.
pub async fn config_from_file(path: &std::path::Path) -> Result<Config, kube::config::KubeconfigError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await
}

/// Builds an HTTP/2-capable client from `config` (ALPN offers h2 and http/1.1, so a server
/// without h2 still works). Plain-HTTP servers are spoken to with HTTP/1.1.
pub fn client(config: Config) -> Result<Client, Http2ClientError> {
    let mut tls = config.rustls_client_config()?;
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let hyper_client: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Watches idle for minutes; keep the one connection verified alive.
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
            .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        // The auth layers' errors are boxed; make the connection's error the same type.
        .map_err(|e: hyper_util::client::legacy::Error| -> BoxError { Box::new(e) })
        .service(hyper_client);
    Ok(Client::new(service, config.default_namespace))
}
