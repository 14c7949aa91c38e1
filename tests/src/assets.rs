//! Finding the server binaries, following the envtest conventions so that a user with
//! newer binaries can run the same suite against them.
//!
//! Order: `TEST_ASSET_<NAME>`, then `$KUBEBUILDER_ASSETS/<name>`, then
//! `$SPOKELET_TEST_ASSETS/<name>` (default `~/.cache/spokelet/test-assets`, where
//! `tests/env/install.sh` puts what it builds), then `PATH`.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// A binary the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// `etcd`, built by `tests/env/install.sh`.
    Etcd,
    /// `kube-apiserver`, built by `tests/env/install.sh`.
    KubeApiserver,
    /// `kube-controller-manager`, built by `tests/env/install.sh`.
    KubeControllerManager,
    /// `docker-registry` (Debian's CNCF distribution registry).
    DockerRegistry,
    /// `kubectl` of the same release as the servers, built by `tests/env/install.sh`.
    Kubectl,
    /// OCM's `registration` command (`controller`: the hub's registration controller).
    OcmRegistration,
    /// OCM's `work` command (`manager`: the hub's work controllers; `agent`: OCM's work agent).
    OcmWork,
    /// OCM's `placement` command (`controller`).
    OcmPlacement,
    /// OCM's `server` command (`grpc`: OCM's CloudEvents gRPC server).
    OcmServer,
}

impl Binary {
    /// The file name.
    pub fn file_name(self) -> &'static str {
        match self {
            Binary::Etcd => "etcd",
            Binary::KubeApiserver => "kube-apiserver",
            Binary::KubeControllerManager => "kube-controller-manager",
            Binary::DockerRegistry => "docker-registry",
            Binary::Kubectl => "kubectl",
            Binary::OcmRegistration => "ocm-registration",
            Binary::OcmWork => "ocm-work",
            Binary::OcmPlacement => "ocm-placement",
            Binary::OcmServer => "ocm-server",
        }
    }

    /// The environment variable that names this binary directly.
    pub fn env_var(self) -> &'static str {
        match self {
            Binary::Etcd => "TEST_ASSET_ETCD",
            Binary::KubeApiserver => "TEST_ASSET_KUBE_APISERVER",
            Binary::KubeControllerManager => "TEST_ASSET_KUBE_CONTROLLER_MANAGER",
            Binary::DockerRegistry => "TEST_ASSET_DOCKER_REGISTRY",
            Binary::Kubectl => "TEST_ASSET_KUBECTL",
            Binary::OcmRegistration => "TEST_ASSET_OCM_REGISTRATION",
            Binary::OcmWork => "TEST_ASSET_OCM_WORK",
            Binary::OcmPlacement => "TEST_ASSET_OCM_PLACEMENT",
            Binary::OcmServer => "TEST_ASSET_OCM_SERVER",
        }
    }

    /// Resolves the binary's path, or explains where it looked.
    pub fn find(self) -> Result<PathBuf, HarnessError> {
        let name = self.file_name();
        let mut searched = Vec::new();

        // An explicit per-binary override wins, and is not silently skipped when wrong:
        // a user who set it wants that binary or an error.
        if let Some(path) = non_empty_env(self.env_var()) {
            let path = PathBuf::from(path);
            if is_executable(&path) {
                return Ok(path);
            }
            return Err(HarnessError::BinaryNotFound {
                binary: name.to_string(),
                env_var: self.env_var().to_string(),
                searched: format!("{}={} (not an executable file)", self.env_var(), path.display()),
            });
        }

        // KUBEBUILDER_ASSETS commonly holds only etcd, kube-apiserver and kubectl (envtest's
        // download), so a missing file there falls through to the next place.
        let mut dirs: Vec<(String, PathBuf)> = Vec::new();
        if let Some(dir) = non_empty_env("KUBEBUILDER_ASSETS") {
            dirs.push(("KUBEBUILDER_ASSETS".into(), PathBuf::from(dir)));
        }
        dirs.push(("test assets".into(), test_assets_dir()));
        // Kubernetes tools on PATH are of any release; the suite's own come first.
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                dirs.push(("PATH".into(), dir));
            }
        }
        // Debian installs etcd and docker-registry here; a PATH without /usr/bin is rare but
        // cheap to cover.
        dirs.push(("default".into(), PathBuf::from("/usr/bin")));

        for (_, dir) in &dirs {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            searched.push(candidate.display().to_string());
        }
        // PATH often repeats directories, and /usr/bin is also the fallback.
        let mut seen = std::collections::HashSet::new();
        searched.retain(|s| seen.insert(s.clone()));
        Err(HarnessError::BinaryNotFound {
            binary: name.to_string(),
            env_var: self.env_var().to_string(),
            searched: searched.join(", "),
        })
    }
}

/// Where `tests/env/install.sh` caches the binaries it builds.
pub fn test_assets_dir() -> PathBuf {
    if let Some(dir) = non_empty_env("SPOKELET_TEST_ASSETS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/spokelet/test-assets")
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
