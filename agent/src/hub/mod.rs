//! Where works come from and where their status goes: the hub transports, which receive
//! ManifestWorks from the hub and send status back over mutual TLS, and the file source, a
//! directory standing in for a hub. Each is a [`WorkSource`](crate::work::source::WorkSource) and
//! a [`StatusSink`](crate::work::source::StatusSink); the engine (`work/`) knows only those two.
//!
//! - [`grpc`]: CloudEvents over gRPC (OCM "grpc" driver / Maestro), see [`GrpcHub::start`].
//! - [`kube_hub`]: the hub's Kubernetes API (classic klusterlet), see [`kube_hub::KubeHub::start`].
//! - [`file_source`]: works from YAML files in a directory, status written beside them.
//! - [`outbox`]: the latest-status-per-work queue both transports send from.
//! - [`cloudevents`]: the pure event codec.
//! - [`tls`]: rustls client with certificate rotation.
//! - [`config`]: the reference-format config file and the `--hub-*` flags ([`HubArgs`]).
//! - [`connect`]: opens the configured transport for `spokelet run` ([`HubConnection::open`]).
//! - [`metrics`]: the `spokelet_hub_*` Prometheus metrics ([`HubMetrics`]).

pub mod cloudevents;
pub mod config;
pub mod connect;
pub mod file_source;
pub mod grpc;
pub mod kube_hub;
pub mod metrics;
pub mod outbox;
pub mod tls;

pub use config::{HubArgs, HubConfigError, HubSettings, HubTransport, KubeHubSettings, ResolvedHub};
pub use connect::{ConnectError, HubCloser, HubConnection};
pub use file_source::{FileSource, FileStatusSink};
pub use grpc::{GrpcError, GrpcHub, GrpcHubOptions, GrpcStatusSink, HubHandle, HubState, RecordedWork};
pub use metrics::HubMetrics;

/// Work events from a hub transport to the engine (a [`WorkSource`](crate::work::source::WorkSource)).
///
/// Unbounded on purpose: a transport must keep reading its stream or watch while the engine is
/// busy (a gRPC hub's heartbeats would otherwise look missing, a watch would fall behind), and
/// the backlog is bounded by the number of works the hub sends.
pub type HubEvents = tokio::sync::mpsc::UnboundedReceiver<crate::work::source::WorkEvent>;
