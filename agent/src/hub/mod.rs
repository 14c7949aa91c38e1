//! Hub transports: receive ManifestWorks from the hub and send their status back, over mutual TLS.
//!
//! - [`grpc`]: CloudEvents over gRPC (OCM "grpc" driver / Maestro), see [`GrpcHub::start`].
//! - [`kube_hub`]: the hub's Kubernetes API (classic klusterlet), see [`kube_hub::KubeHub::start`].
//! - [`cloudevents`]: the pure event codec.
//! - [`tls`]: rustls client with certificate rotation.
//! - [`config`]: the reference-format config file and the `--hub-*` flags ([`HubArgs`]).
//! - [`connect`]: opens the configured transport for `spokelet run` ([`HubConnection::open`]).

pub mod cloudevents;
pub mod config;
pub mod connect;
pub mod grpc;
pub mod kube_hub;
pub mod metrics;
pub mod tls;

pub use config::{HubArgs, HubConfigError, HubSettings, HubTransport, KubeHubSettings, ResolvedHub};
pub use connect::{ConnectError, HubCloser, HubConnection, HubSource};
pub use grpc::{GrpcError, GrpcHub, GrpcHubOptions, GrpcStatusSink, GrpcWorkSource, HubHandle, HubState};
pub use metrics::HubMetrics;
