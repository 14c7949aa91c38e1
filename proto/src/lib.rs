//! CloudEvents gRPC wire types (`io.cloudevents.v1`) and the event-type strings spokelet speaks.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

/// Generated messages and the `CloudEventService` client and server stubs.
pub mod cloudevents {
    #![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
    tonic::include_proto!("io.cloudevents.v1");
}

pub use cloudevents::{
    CloudEvent, CloudEventAttributeValue, PublishRequest, SubscriptionRequest,
    cloud_event::Data,
    cloud_event_attribute_value::Attr,
    cloud_event_service_client::CloudEventServiceClient,
    cloud_event_service_server::{CloudEventService, CloudEventServiceServer},
};

/// The CloudEvents spec version every event carries.
pub const SPEC_VERSION: &str = "1.0";

/// Data type of OCM work payloads (ManifestBundles).
pub const MANIFEST_BUNDLES: &str = "io.open-cluster-management.works.v1alpha1.manifestbundles";

/// Event type of the hub's liveness heartbeat.
pub const HEARTBEAT: &str = "io.open-cluster-management.cloudevents.heartbeat";

/// Data type of OCM ManagedClusters: the plain group name, no `io.` prefix (the status travels as
/// `<this>.status.update_request`).
pub const MANAGED_CLUSTERS: &str = "cluster.open-cluster-management.io.v1.managedclusters";

/// Data type of certificate signing requests on OCM's gRPC registration: the agent sends a
/// whole CSR as `<this>.spec.create_request`; the hub sends CSRs of the cluster back as spec
/// events, the signed certificate in `status.certificate`.
pub const CERTIFICATE_SIGNING_REQUESTS: &str = "certificates.k8s.io.v1.certificatesigningrequests";

/// Data type of coordination leases on OCM's gRPC registration: the agent renews the cluster
/// lease with `<this>.spec.update_request` carrying the whole Lease.
pub const LEASES: &str = "coordination.k8s.io.v1.leases";

/// Data type of spokelet's own per-node inventory and health reports (`docs/PROTOCOL.md`):
/// `<this>.status.update_request` carries a NodeInventory, `<this>.status.delete_request` says
/// the node is gone. Node services subscribe with it to hear the hub's heartbeats.
pub const NODE_INVENTORIES: &str = "io.spokelet.nodes.v1alpha1.nodeinventories";
