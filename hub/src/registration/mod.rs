//! Joining a hub as OCM's registration agent does: with a bootstrap credential the agent
//! creates its ManagedCluster and a certificate signing request with OCM's subject, keeps the
//! certificate the hub issues (a Secret in its namespace, and files the hub transport runs
//! from), and waits until the hub accepts the cluster.
//!
//! - [`csr`]: the key pair and request, and what an issued certificate says.
//! - [`store`]: the kept credentials (Secret and files).
//! - [`join`]: what a join takes on either wire (settings, errors, pace, keeping).
//! - [`over_kube`]: the join over the Kubernetes hub.
//! - [`over_grpc`]: the join over OCM's CloudEvents gRPC server.
//! - [`ensure`]: the kept credentials, or a join over the bootstrap's wire.
//! - [`renew`]: renewal with 20 to 25 % of the certificate's life left, and joining again once
//!   it expired.

pub(crate) mod csr;
pub(crate) mod ensure;
pub(crate) mod join;
pub(crate) mod over_grpc;
pub(crate) mod over_kube;
pub(crate) mod renew;
pub(crate) mod store;

pub use ensure::ensure_joined;
pub use join::{Bootstrap, JoinError, JoinSettings, grpc_config_in, kubeconfig_in, spoke_endpoint};
pub use renew::keep_renewed;
pub use store::Keeping;
