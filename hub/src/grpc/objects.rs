//! One data type of OCM's gRPC registration (ManagedClusters, leases, certificate signing
//! requests) followed over a subscription: the hub's objects of this cluster as it sends them,
//! and whole objects written back. Used by the join and by the cluster's membership.

use std::time::Duration;

use serde_json::Value;
use spokelet_proto::{PublishRequest, SubscriptionRequest};
use tonic::Streaming;

use super::dial::Client;
use super::options::GrpcError;
use crate::object_events::{ObjectEvent, decode_object, list_request, object_event};

/// How long one RPC (subscribe, publish) may take before it counts as failed.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A subscription to one data type for one cluster, and the client to write with.
pub(crate) struct ObjectFeed {
    client: Client,
    stream: Streaming<spokelet_proto::CloudEvent>,
    /// The event `source` of what we send: the cluster name, as OCM's agent sends it.
    source: String,
    cluster: String,
    data_type: &'static str,
}

/// Why a write was refused, when the hub said: OCM's server answers a failed Kubernetes
/// call with `FailedPrecondition` and the API error as its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The object exists already (a create).
    Exists,
    /// The object changed since the version written on (an update).
    Conflict,
    /// Anything else, with the hub's message.
    Other(String),
}

impl Refusal {
    fn of(status: &tonic::Status) -> Refusal {
        let message = status.message();
        if message.contains("already exists") || message.contains("AlreadyExists") {
            Refusal::Exists
        } else if message.contains("the object has been modified") || message.contains("Conflict") {
            Refusal::Conflict
        } else {
            Refusal::Other(format!("{:?}: {message}", status.code()))
        }
    }
}

impl ObjectFeed {
    /// Subscribes to `data_type` for `cluster` over `client`.
    pub(crate) async fn open(
        client: &Client,
        cluster: &str,
        data_type: &'static str,
    ) -> Result<ObjectFeed, GrpcError> {
        let mut client = client.clone();
        let request = SubscriptionRequest {
            source: String::new(),
            cluster_name: cluster.to_string(),
            data_type: data_type.to_string(),
        };
        let stream = tokio::time::timeout(RPC_TIMEOUT, client.subscribe(request))
            .await
            .map_err(|_| GrpcError::Timeout("subscribe"))?
            .map_err(GrpcError::Subscribe)?
            .into_inner();
        Ok(ObjectFeed {
            client,
            stream,
            source: cluster.to_string(),
            cluster: cluster.to_string(),
            data_type,
        })
    }

    /// Asks the hub for every object of the type it has for the cluster; they come as
    /// `update_request` events on the subscription.
    pub(crate) async fn list(&mut self) -> Result<(), GrpcError> {
        let event = list_request(&self.source, &self.cluster, self.data_type);
        self.send(event).await.map_err(GrpcError::Resync)
    }

    /// Sends `object` whole as `<subresource>.<action>`; the hub's refusal, if it refused.
    pub(crate) async fn write(
        &mut self,
        subresource: &str,
        action: &str,
        object: &Value,
    ) -> Result<Result<(), Refusal>, GrpcError> {
        let event = object_event(
            &self.source,
            &self.cluster,
            self.data_type,
            subresource,
            action,
            object,
        );
        match self.send(event).await {
            Ok(()) => Ok(Ok(())),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Err(Refusal::of(&s))),
            Err(s) => Err(GrpcError::Publish(s)),
        }
    }

    async fn send(&mut self, event: spokelet_proto::CloudEvent) -> Result<(), tonic::Status> {
        let request = PublishRequest { event: Some(event) };
        match tokio::time::timeout(RPC_TIMEOUT, self.client.publish(request)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(tonic::Status::deadline_exceeded("publish timed out")),
        }
    }

    /// The next object event; heartbeats and undecodable events (logged) are skipped. An
    /// error when the stream ends or breaks.
    pub(crate) async fn next(&mut self) -> Result<ObjectEvent, GrpcError> {
        loop {
            let event = self
                .stream
                .message()
                .await
                .map_err(GrpcError::Stream)?
                .ok_or(GrpcError::StreamEnded)?;
            match decode_object(&event, self.data_type, &self.cluster) {
                Ok(Some(object)) => return Ok(object),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, data_type = self.data_type, "skipping an event the agent cannot read")
                }
            }
        }
    }

    /// [`ObjectFeed::next`], or `None` after `within`.
    pub(crate) async fn next_within(&mut self, within: Duration) -> Result<Option<ObjectEvent>, GrpcError> {
        match tokio::time::timeout(within, self.next()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_refusals_are_told_apart_by_its_message() {
        let status = |m: &str| tonic::Status::failed_precondition(m);
        assert_eq!(
            Refusal::of(&status(r#"{"ErrStatus":{"reason":"AlreadyExists"}}"#)),
            Refusal::Exists
        );
        assert_eq!(
            Refusal::of(&status(
                "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version"
            )),
            Refusal::Conflict
        );
        assert!(matches!(Refusal::of(&status("forbidden")), Refusal::Other(m) if m.contains("forbidden")));
    }
}
