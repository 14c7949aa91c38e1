//! Real-server test harness for spokelet: etcd, kube-apiserver, kube-controller-manager and
//! an OCI registry, all on loopback, each with its own ports, PKI and scratch directory.
//!
//! The binaries come from `tests/env/install.sh` (Kubernetes, etcd and OCM built from the Go
//! module proxy at the versions pinned in `tests/env/go/`, docker-registry from Debian) or from
//! the envtest variables; see [`Binary::find`]. [`ocm::OcmHub`] is the real OCM hub.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spokelet_e2e::HarnessError> {
//! use spokelet_e2e::{ClusterOptions, KubeCluster, shared_spoke};
//! let spoke = shared_spoke().await; // one per test binary, with controller-manager
//! let hub = KubeCluster::start(ClusterOptions::hub()).await?; // a second, independent one
//! let alice = hub.issue_user("alice", &["team-a"])?;
//! let _client = alice.client();
//! println!("kubectl --kubeconfig {}", spoke.kubeconfig_path().display());
//! hub.stop().await;
//! # Ok(()) }
//! ```
//!
//! No server outlives the test process: dropping a cluster or registry kills and reaps its
//! processes and deletes its directory; every server is started with `PR_SET_PDEATHSIG`,
//! so it dies with the test process however that ends; a janitor process deletes the run
//! directory after the test process exits; and directories left by killed runs are removed
//! by the next run.
//!
//! Environment:
//! - `TEST_ASSET_ETCD`, `TEST_ASSET_KUBE_APISERVER`, `TEST_ASSET_KUBE_CONTROLLER_MANAGER`,
//!   `TEST_ASSET_DOCKER_REGISTRY`: a specific binary; `KUBEBUILDER_ASSETS`: a directory of
//!   them; `SPOKELET_TEST_ASSETS`: where `tests/env/install.sh` put its builds.
//! - `SPOKELET_E2E_TMPDIR`: parent of the run directories (default `$TMPDIR/spokelet-e2e`).
//! - `SPOKELET_E2E_START_TIMEOUT_SECS`: how long each server may take to become ready
//!   (default 180).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod assets;
mod cluster;
mod credentials;
mod error;
pub mod pki;
mod poll;
mod process;
mod registry;
mod registry_token;
mod rundir;
mod shared;
mod stalling_front;

pub use assets::{Binary, test_assets_dir};
pub use cluster::{ADMIN_USER, ClusterOptions, DEFAULT_CONTROLLERS, KubeCluster, MASTERS_GROUP};
pub use credentials::UserCredentials;
pub use error::HarnessError;
pub use poll::{POLL_ATTEMPTS, POLL_INTERVAL, eventually, eventually_with};
pub use registry::{
    CuttingFront, LayoutBlob, OciRegistry, RateLimitedFront, RegistryOptions, skopeo, write_oci_layout,
};
pub use registry_token::{TOKEN_ISSUER, TOKEN_SERVICE, TokenServer};
pub use shared::{shared_spoke, try_shared_spoke};
pub use stalling_front::StallingFront;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test in this process has used, valid as a namespace or any other
/// object name (a DNS-1123 label): `<prefix>-<pid>-<counter>-<time>`, lower-case, at most
/// 63 characters.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The time part keeps names distinct across processes that share a cluster (for
    // example a dev cluster reused between runs) even if pids repeat.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let suffix = format!("{:x}-{n:x}-{:x}", std::process::id(), nanos & 0xffff);
    let mut clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(63 - 1 - suffix.len());
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{clean}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_unique_and_valid() {
        let a = unique_name("My_Test");
        let b = unique_name("My_Test");
        assert_ne!(a, b);
        for name in [a, b, unique_name(&"x".repeat(100)), unique_name("--")] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
    }
}
pub mod bench;
pub mod cloudevents_hub;
pub mod fixtures;
pub mod ocm;
pub mod ocm_hub;

/// Creates the namespace `name` on the cluster `client` talks to.
pub async fn create_namespace(client: &kube::Client, name: &str) -> Result<(), HarnessError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&kube::api::PostParams::default(), &ns)
        .await
        .map_err(|source| HarnessError::Kube {
            context: format!("creating namespace {name}"),
            source,
        })?;
    Ok(())
}

/// The holder of the Lease `namespace/name` (None when it is absent, released or unreadable).
pub async fn lease_holder(client: &kube::Client, namespace: &str, name: &str) -> Option<String> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), namespace);
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}
