//! A real OCI registry on loopback: Debian's `docker-registry` (the CNCF distribution
//! registry), with its own config file and storage in a scratch directory.
//!
//! The packaged `/etc/docker/registry/config.yml` listens on every interface and asks for
//! htpasswd auth, so it is never used: the config written here binds 127.0.0.1 on a free
//! port, without authentication or TLS (clients use `--tls-verify=false` / plain HTTP).

use std::path::Path;
use std::time::Instant;

use crate::HarnessError;
use crate::assets::Binary;
use crate::cluster::{Processes, start_budget};
use crate::credentials::write_private;
use crate::process::{ManagedProcess, free_ports, http_get};
use crate::rundir;

const START_ATTEMPTS: u32 = 3;

/// A running registry; dropping it kills the process and deletes its storage.
#[derive(Debug)]
pub struct OciRegistry {
    port: u16,
    processes: Processes,
}

impl OciRegistry {
    /// Starts a registry and waits until `GET /v2/` answers 200.
    pub async fn start() -> Result<Self, HarnessError> {
        let mut attempt = 1;
        loop {
            match Self::start_once().await {
                Err(e) if e.is_port_race() && attempt < START_ATTEMPTS => {
                    tracing::warn!(attempt, "registry port taken during start; retrying");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once() -> Result<Self, HarnessError> {
        let binary = Binary::DockerRegistry.find()?;
        let dir = rundir::component_dir("registry")?;
        let mut processes = Processes::new(dir.clone());
        let port = free_ports(1)?[0];
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(|e| HarnessError::io(format!("creating {}", storage.display()), e))?;
        let config = serde_json::json!({
            "version": 0.1,
            "log": { "level": "info", "fields": { "service": "registry" } },
            "storage": {
                "filesystem": { "rootdirectory": storage.display().to_string() },
                "delete": { "enabled": true },
            },
            "http": { "addr": format!("127.0.0.1:{port}") },
            // The storage health check would only add log noise.
            "health": { "storagedriver": { "enabled": false } },
        });
        let config = serde_yaml::to_string(&config).map_err(|source| HarnessError::Serialize {
            what: "registry config".into(),
            source,
        })?;
        let config_path = dir.join("config.yml");
        write_private(&config_path, &config)?;

        let registry = processes.push(ManagedProcess::spawn(
            "registry",
            "docker-registry",
            &binary,
            &["serve".to_string(), config_path.display().to_string()],
            dir.join("docker-registry.log"),
        )?);
        let deadline = Instant::now() + start_budget();
        loop {
            registry.check_running()?;
            let last = match http_get(port, "/v2/").await {
                Ok((200, _)) => break,
                Ok((status, body)) => format!("/v2/ answered {status}: {body}"),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(registry.start_failed(format!("not ready in time; last probe: {last}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::info!(port, dir = %dir.display(), "registry ready");
        Ok(OciRegistry { port, processes })
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/repo:tag`).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Fails, with the end of its log, if the registry process has exited.
    pub fn check_running(&self) -> Result<(), HarnessError> {
        match self.processes.list.iter().find(|p| p.has_exited()) {
            Some(dead) => Err(dead.died()),
            None => Ok(()),
        }
    }

    /// The registry's scratch directory (config, storage, log).
    pub fn dir(&self) -> &Path {
        &self.processes.dir
    }

    /// Kills the registry and deletes its storage (what dropping does), off the executor.
    pub async fn stop(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}
