//! Starts a throw-away Kubernetes cluster on loopback for trying spokelet by hand, prints
//! how to reach it, and tears it down on Ctrl-C.
//!
//! ```text
//! cargo run -p spokelet-e2e --bin dev-cluster              # spoke with controller-manager
//! cargo run -p spokelet-e2e --bin dev-cluster -- --hub     # also a second, bare cluster, "hub"
//! cargo run -p spokelet-e2e --bin dev-cluster -- --ocm-hub # also the real OCM hub (with its
//!                                                          # gRPC server), cluster1 accepted
//! ```
//!
//! Needs the binaries from `tests/env/install.sh`.

use std::path::Path;

use spokelet_e2e::ocm::{OcmHub, OcmHubOptions};
use spokelet_e2e::{ClusterOptions, HarnessError, KubeCluster, OciRegistry};

/// The cluster name the OCM hub accepts for the agent.
const CLUSTER: &str = "cluster1";

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
    let with_ocm = std::env::args().skip(1).any(|a| a == "--ocm-hub");
    eprintln!("starting spoke cluster…");
    let spoke = KubeCluster::start(ClusterOptions::spoke()).await?;
    let hub = if with_hub {
        eprintln!("starting hub cluster…");
        Some(KubeCluster::start(ClusterOptions::hub()).await?)
    } else {
        None
    };
    let ocm = if with_ocm {
        eprintln!("starting the OCM hub (registration, work manager, placement, gRPC server)…");
        let ocm = OcmHub::start(OcmHubOptions {
            grpc: true,
            ..OcmHubOptions::default()
        })
        .await?;
        ocm.accept_cluster(CLUSTER, 60).await?;
        Some(ocm)
    } else {
        None
    };
    let registry = OciRegistry::start().await?;

    describe(&spoke);
    if let Some(hub) = &hub {
        describe(hub);
    }
    if let Some(ocm) = &ocm {
        describe_ocm(ocm, &spoke)?;
    }
    println!(
        "registry: {} (plain HTTP, no auth; an agent pulling from it needs --artifact-allow-insecure)",
        registry.host()
    );
    println!();
    println!("export KUBECONFIG={}", spoke.kubeconfig_path().display());
    println!("Ctrl-C stops everything and deletes the files above.");

    let interrupted = tokio::signal::ctrl_c().await;
    eprintln!("stopping…");
    registry.stop().await;
    if let Some(ocm) = ocm {
        ocm.stop().await;
    }
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

/// The OCM hub, the agent's credentials for both transports, and the commands that run it.
fn describe_ocm(ocm: &OcmHub, spoke: &KubeCluster) -> Result<(), HarnessError> {
    describe(ocm.cluster());
    let dir = ocm.cluster().dir().join("agent");
    std::fs::create_dir_all(&dir).map_err(|e| HarnessError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let kube_identity = ocm.issue_agent(CLUSTER, "agent")?;
    let grpc_identity = ocm.issue_grpc_agent(CLUSTER, "agent")?;
    let write = |name: &str, text: &str| -> Result<String, HarnessError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| HarnessError::Io {
            context: format!("writing {}", path.display()),
            source: e,
        })?;
        Ok(path.display().to_string())
    };
    let ca = write("grpc-ca.crt", ocm.grpc_ca_pem().unwrap_or_default())?;
    let cert = write("tls.crt", &grpc_identity.cert_pem)?;
    let key = write("tls.key", &grpc_identity.key_pem)?;
    let hub_yaml = write(
        "hub.yaml",
        &format!(
            "url: {}\ncaFile: {ca}\nclientCertFile: {cert}\nclientKeyFile: {key}\n",
            ocm.grpc_url().unwrap_or_default()
        ),
    )?;
    println!(
        "  OCM logs:   {}",
        ocm.log_path("registration-controller")
            .parent()
            .unwrap_or(Path::new(""))
            .display()
    );
    println!("  cluster {CLUSTER} accepted; run the agent with either transport:");
    let spoke_kubeconfig = spoke.kubeconfig_path().display();
    println!(
        "    cargo run -p spokelet -- run --hub-transport kube --hub-kubeconfig {} --cluster-name {CLUSTER} --kubeconfig {spoke_kubeconfig}",
        kube_identity.kubeconfig_path().display()
    );
    println!(
        "    cargo run -p spokelet -- run --hub-transport grpc --hub-config {hub_yaml} --cluster-name {CLUSTER} --kubeconfig {spoke_kubeconfig}"
    );
    println!(
        "  ManifestWorks go to namespace {CLUSTER} on the hub: kubectl --kubeconfig {} -n {CLUSTER} apply -f WORK.yaml",
        ocm.cluster().kubeconfig_path().display()
    );
    Ok(())
}
