//! The hub transports: ManifestWorks from the hub and their status back, over mutual TLS.
//!
//! The transports receive ManifestWorks from the hub and send status back, and the file
//! source is a directory standing in for a hub. Each is a [`WorkSource`](spokelet_work_api::source::WorkSource) and
//! a [`StatusSink`](spokelet_work_api::source::StatusSink); the engine (`work/`) knows only those two.
//!
//! - [`grpc`]: CloudEvents over gRPC (OCM "grpc" driver / Maestro), see [`GrpcHub::start`].
//! - [`kube_hub`]: the hub's Kubernetes API (classic klusterlet), see [`kube_hub::KubeHub::start`].
//! - [`file_source`]: works from YAML files in a directory, status written beside them.
//! - [`outbox`]: the latest-status-per-work queue both transports send from.
//! - [`pool_report`]: the pool inventory reports a transport carries ([`PoolReportSink`]).
//! - [`closer`]: stops a transport after the engine ([`HubCloser`]).
//! - [`cloudevents`]: the pure event codec.
//! - [`object_events`]: the codec of whole objects (OCM's gRPC registration).
//! - [`tls`]: rustls client with certificate rotation.
//! - [`config`]: the reference-format config file and the `--hub-*` flags ([`HubArgs`]).
//! - [`metrics`]: the `spokelet_hub_*` Prometheus metrics ([`HubMetrics`]).
//! - [`work_events`]: the bounded channel a transport hands the engine ([`HubEvents`]).
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod closer;
pub mod cloudevents;
pub mod config;
pub mod file_source;
pub mod grpc;
pub mod kube_hub;
pub mod metrics;
pub mod object_events;
pub mod outbox;
pub mod pool_report;
pub mod registration;
pub mod tls;
pub mod work_events;

pub use closer::HubCloser;
pub use config::{HubArgs, HubConfigError, HubSettings, HubTransport, KubeHubSettings, ResolvedHub};
pub use file_source::{FileSource, FileStatusSink};
pub use grpc::{
    GrpcError, GrpcHub, GrpcHubOptions, GrpcReportSink, GrpcStatusSink, HubHandle, HubState, RecordedWork,
    Subscription,
};
pub use metrics::HubMetrics;
pub use pool_report::PoolReportSink;
pub use work_events::{EVENT_BUFFER, HubEvents};
