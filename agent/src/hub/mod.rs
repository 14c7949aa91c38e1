//! Where works come from and where their status goes: the hub transports, which receive
//! ManifestWorks from the hub and send status back over mutual TLS, and the file source, a
//! directory standing in for a hub. Each is a [`WorkSource`](spokelet_work_api::source::WorkSource) and
//! a [`StatusSink`](spokelet_work_api::source::StatusSink); the engine (`work/`) knows only those two.
//!
//! - [`grpc`]: CloudEvents over gRPC (OCM "grpc" driver / Maestro), see [`GrpcHub::start`].
//! - [`kube_hub`]: the hub's Kubernetes API (classic klusterlet), see [`kube_hub::KubeHub::start`].
//! - [`file_source`]: works from YAML files in a directory, status written beside them.
//! - [`outbox`]: the latest-status-per-work queue both transports send from.
//! - [`pool_report`]: the pool inventory reports a transport carries ([`PoolReportSink`]).
//! - [`cloudevents`]: the pure event codec.
//! - [`object_events`]: the codec of whole objects (OCM's gRPC registration).
//! - [`tls`]: rustls client with certificate rotation.
//! - [`config`]: the reference-format config file and the `--hub-*` flags ([`HubArgs`]).
//! - [`connect`]: opens the configured transport for `spokelet run` ([`HubConnection::open`]).
//! - [`metrics`]: the `spokelet_hub_*` Prometheus metrics ([`HubMetrics`]).
//! - [`work_events`]: the bounded channel a transport hands the engine ([`HubEvents`]).

pub mod cloudevents;
pub mod config;
pub(crate) mod connect;
pub mod file_source;
pub(crate) mod grpc;
pub mod kube_hub;
pub(crate) mod metrics;
pub(crate) mod object_events;
pub(crate) mod outbox;
pub(crate) mod pool_report;
pub(crate) mod registration;
pub mod tls;
pub(crate) mod work_events;

pub use config::{HubArgs, HubConfigError, HubSettings, HubTransport, KubeHubSettings, ResolvedHub};
pub use connect::{ConnectError, HubCloser, HubConnection};
pub use file_source::{FileSource, FileStatusSink};
pub use grpc::{
    GrpcError, GrpcHub, GrpcHubOptions, GrpcReportSink, GrpcStatusSink, HubHandle, HubState, RecordedWork,
    Subscription,
};
pub use metrics::HubMetrics;
pub use pool_report::PoolReportSink;
pub use work_events::{EVENT_BUFFER, HubEvents};
