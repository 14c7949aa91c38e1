//! The harness's error type: every failure says which component failed and, for a
//! process that did not come up, carries the tail of that process's log.

use std::path::PathBuf;

/// Everything that can go wrong while starting, using or stopping test servers.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A server binary could not be found by any of the lookup rules.
    #[error(
        "{binary} not found (looked in: {searched}); run tests/env/install.sh, or point \
         {env_var} or KUBEBUILDER_ASSETS at a binary"
    )]
    BinaryNotFound {
        /// File name of the binary, e.g. `kube-apiserver`.
        binary: String,
        /// The environment variable that overrides the lookup.
        env_var: String,
        /// The places that were tried, in order.
        searched: String,
    },

    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Generating keys or certificates failed.
    #[error("certificate generation failed ({context}): {source}")]
    Pki {
        /// Which certificate was being made.
        context: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },

    /// A user certificate can carry at most [`crate::pki::MAX_GROUPS`] groups.
    #[error("user {user:?}: {groups} groups requested, a harness certificate carries at most 2")]
    TooManyGroups {
        /// The user's common name.
        user: String,
        /// How many groups were asked for.
        groups: usize,
    },

    /// A kubeconfig could not be turned into a client configuration.
    #[error("kubeconfig {path} is unusable: {source}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },

    /// Building or using a Kubernetes client failed.
    #[error("kubernetes client error ({context}): {source}")]
    Kube {
        /// What the client was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },

    /// A server process exited or never became ready; `log_tail` is the end of its log.
    #[error(
        "{component} of cluster {cluster:?} did not become ready: {reason}\n\
         --- last lines of {log_path} ---\n{log_tail}"
    )]
    StartFailed {
        /// Which cluster (or `registry`).
        cluster: String,
        /// `etcd`, `kube-apiserver`, `kube-controller-manager`, `docker-registry`.
        component: String,
        /// What was observed.
        reason: String,
        /// The process's log file.
        log_path: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// A server process of a running cluster (or registry) has exited.
    #[error(
        "{component} of cluster {cluster:?} is no longer running\n\
         --- last lines of {log_path} ---\n{log_tail}"
    )]
    ProcessDied {
        /// Which cluster (or `registry`).
        cluster: String,
        /// Which server.
        component: String,
        /// The process's log file.
        log_path: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// Serialising a generated file (kubeconfig, registry config) failed.
    #[error("could not serialise {what}: {source}")]
    Serialize {
        /// Which file.
        what: String,
        /// The underlying error.
        #[source]
        source: serde_yaml::Error,
    },

    /// A manifest the harness ships (CRD, RBAC) could not be used.
    #[error("manifest {what}: {reason}")]
    InvalidManifest {
        /// Which manifest.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The agent binary could not be built for a benchmark.
    #[error("building the spokelet binary failed: {0}")]
    AgentBuild(String),

    /// A condition polled with [`crate::eventually`] never held.
    #[error("{what}: still not true after {attempts} checks; last observation: {last}")]
    NotReached {
        /// What was expected.
        what: String,
        /// How many checks were made.
        attempts: u32,
        /// Why the last check failed.
        last: String,
    },

    /// The shared cluster failed to start earlier in this test process.
    #[error("the shared spoke cluster failed to start: {0}")]
    SharedClusterFailed(String),

    /// The helper thread that spawns server processes is gone (it never exits by design).
    #[error("the process-spawning thread is not running")]
    SpawnerGone,
}

impl HarnessError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps an rcgen error with the certificate being made.
    pub(crate) fn pki(context: impl Into<String>, source: rcgen::Error) -> Self {
        HarnessError::Pki {
            context: context.into(),
            source,
        }
    }

    /// Wraps a kube error with what the client was doing.
    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        HarnessError::Kube {
            context: context.into(),
            source,
        }
    }

    /// True when a start failed because a port we picked was taken in the meantime,
    /// which is worth a retry with fresh ports.
    pub(crate) fn is_port_race(&self) -> bool {
        match self {
            HarnessError::StartFailed { reason, log_tail, .. } => [reason, log_tail]
                .iter()
                .any(|s| s.contains("address already in use")),
            _ => false,
        }
    }
}
