//! The sinks the engine and the pool reporter hand to: each fills the outbox the connection task
//! sends from and returns at once.

use std::sync::Arc;

use futures::future::BoxFuture;
use spokelet_work_api::source::{SinkError, StatusSink, StatusUpdate};

use super::book::Shared;

/// Status sink: buffers the latest status per work and returns at once; the connection task
/// delivers it when the hub is reachable.
#[derive(Debug, Clone)]
pub struct GrpcStatusSink {
    /// The outbox it fills, shared with the connection task.
    pub(super) shared: Arc<Shared>,
}

impl StatusSink for GrpcStatusSink {
    fn publish(&self, update: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        let r = self.shared.enqueue_status(update);
        Box::pin(async move { r })
    }
}

/// Pool report sink: latest report per kind, delivered by the connection task with the statuses.
#[derive(Debug, Clone)]
pub struct GrpcReportSink {
    /// The outbox it fills, shared with the connection task.
    pub(super) shared: Arc<Shared>,
}

impl crate::pool_report::PoolReportSink for GrpcReportSink {
    fn cluster_status(&self, status: serde_json::Value, resend: bool) {
        self.shared
            .enqueue_report(crate::cloudevents::ReportBody::ClusterStatus(status), resend);
    }

    fn node_inventory(&self, node: &str, document: Option<serde_json::Value>, resend: bool) {
        self.shared.enqueue_report(
            crate::cloudevents::ReportBody::Node {
                name: node.to_string(),
                document,
            },
            resend,
        );
    }
}
