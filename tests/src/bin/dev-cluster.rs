//! Starts a throw-away Kubernetes cluster on loopback for trying spokelet by hand, prints
//! how to reach it, and tears it down on Ctrl-C.
//!
//! ```text
//! cargo run -p spokelet-e2e --bin dev-cluster            # spoke with controller-manager
//! cargo run -p spokelet-e2e --bin dev-cluster -- --hub   # also a second cluster, "hub"
//! ```
//!
//! Needs the binaries from `tests/env/install.sh`.

use spokelet_e2e::{ClusterOptions, HarnessError, KubeCluster, OciRegistry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dev-cluster: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), HarnessError> {
    let with_hub = std::env::args().skip(1).any(|a| a == "--hub");
    eprintln!("starting spoke cluster…");
    let spoke = KubeCluster::start(ClusterOptions::spoke()).await?;
    let hub = if with_hub {
        eprintln!("starting hub cluster…");
        Some(KubeCluster::start(ClusterOptions::hub()).await?)
    } else {
        None
    };
    let registry = OciRegistry::start().await?;

    describe(&spoke);
    if let Some(hub) = &hub {
        describe(hub);
    }
    println!("registry: {} (plain HTTP, no auth)", registry.host());
    println!();
    println!("export KUBECONFIG={}", spoke.kubeconfig_path().display());
    println!("Ctrl-C stops everything and deletes the files above.");

    let interrupted = tokio::signal::ctrl_c().await;
    eprintln!("stopping…");
    registry.stop().await;
    if let Some(hub) = hub {
        hub.stop().await;
    }
    spoke.stop().await;
    interrupted.map_err(|e| HarnessError::Io {
        context: "waiting for Ctrl-C".into(),
        source: e,
    })
}

fn describe(cluster: &KubeCluster) {
    println!("{}:", cluster.name());
    println!("  server:     {}", cluster.server_url());
    println!("  kubeconfig: {}", cluster.kubeconfig_path().display());
    println!("  logs:       {}", cluster.dir().display());
}
