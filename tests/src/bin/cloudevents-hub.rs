//! `cloudevents-hub`: run the CloudEvents test hub by hand and point a spokelet at it.
//!
//! ```text
//! cargo run -p spokelet-e2e --bin cloudevents-hub -- --works DIR [--cluster NAME] [--port N] [--out DIR]
//! ```
//! Writes a fresh PKI and a ready-to-use hub config (`hub.yaml`) for the agent into `--out`
//! (default `./cloudevents-hub`), sends every ManifestWork YAML file in `--works` to the cluster
//! and prints each status event it receives: work statuses, the pool's ManagedCluster status and
//! node inventories (a node service can report to it too: `spokelet node --hub-config`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::time::Duration;

use spokelet_e2e::cloudevents_hub::{HubPki, TestHub, TestHubOptions};

/// Command-line settings.
#[derive(Debug)]
struct Args {
    /// Directory of ManifestWork YAML files.
    works: Option<PathBuf>,
    /// Cluster name the works are for.
    cluster: String,
    /// Port to listen on (loopback).
    port: u16,
    /// Where the PKI and the agent's hub config go.
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        works: None,
        cluster: "cluster1".into(),
        port: 8090,
        out: PathBuf::from("cloudevents-hub"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--works" => a.works = Some(PathBuf::from(val()?)),
            "--cluster" => a.cluster = val()?,
            "--port" => a.port = val()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--out" => a.out = PathBuf::from(val()?),
            "-h" | "--help" => {
                return Err(
                    "usage: cloudevents-hub --works DIR [--cluster NAME] [--port N] [--out DIR]".into(),
                );
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// Reads `spec` of each ManifestWork file and turns it into a ManifestBundle (`executer` spelling).
fn load_works(dir: &PathBuf) -> Result<Vec<(String, serde_json::Value)>, String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let w: serde_json::Value =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let name = w["metadata"]["name"]
            .as_str()
            .ok_or_else(|| format!("{}: no metadata.name", p.display()))?;
        let spec = &w["spec"];
        let mut bundle = serde_json::json!({ "manifests": spec["workload"]["manifests"].clone() });
        for (from, to) in [
            ("deleteOption", "deleteOption"),
            ("manifestConfigs", "manifestConfigs"),
            ("executor", "executer"),
        ] {
            if !spec[from].is_null() {
                bundle[to] = spec[from].clone();
            }
        }
        out.push((name.to_string(), bundle));
    }
    Ok(out)
}

fn write(path: PathBuf, text: &str) -> Result<(), String> {
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let pki = HubPki::generate().map_err(|e| e.to_string())?;
    let mut opts = TestHubOptions::new(&pki).map_err(|e| e.to_string())?;
    opts.addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    opts.heartbeat = Duration::from_secs(10);
    let hub = TestHub::start(opts).await.map_err(|e| e.to_string())?;

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let client = pki
        .client(
            &args.cluster,
            &["system:open-cluster-management:managed-clusters"],
        )
        .map_err(|e| e.to_string())?;
    write(args.out.join("ca.crt"), pki.serving_ca.cert_pem())?;
    write(args.out.join("tls.crt"), &client.cert_pem)?;
    write(args.out.join("tls.key"), &client.key_pem)?;
    let dir = std::fs::canonicalize(&args.out).map_err(|e| e.to_string())?;
    let cfg = format!(
        "url: {}\ncaFile: {}\nclientCertFile: {}\nclientKeyFile: {}\n",
        hub.url(),
        dir.join("ca.crt").display(),
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    );
    write(args.out.join("hub.yaml"), &cfg)?;
    println!("hub listening on {}", hub.url());
    println!(
        "agent: spokelet run --hub-transport grpc --hub-config {} --cluster-name {}",
        dir.join("hub.yaml").display(),
        args.cluster
    );

    if let Some(dir) = &args.works {
        for (name, bundle) in load_works(dir)? {
            let w = hub.upsert_work(&args.cluster, &name, bundle);
            println!("work {name} uid={} generation={}", w.uid, w.generation);
        }
    }
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let statuses = hub.statuses();
        for s in statuses.iter().skip(seen) {
            let data = s.json().unwrap_or_default();
            let action = s.event.r#type.rsplit('.').next().unwrap_or("");
            let id = s.ext("resourceid").unwrap_or_default();
            if s.event.r#type.starts_with(spokelet_proto::NODE_INVENTORIES) {
                // A node's inventory: its health verdict and GPU count, then the document.
                let inventory = &data["status"]["inventory"];
                println!(
                    "node {action} node={id} healthy={} gpus={} reasons={} data={data}",
                    inventory["health"]["healthy"],
                    data["status"]["gpuCount"],
                    inventory["health"]["reasons"]
                );
            } else if s.event.r#type.starts_with(spokelet_proto::MANAGED_CLUSTERS) {
                println!("cluster {action} cluster={id} status={}", data["status"]);
            } else {
                println!(
                    "{action} work={id} generation={} hash={} data={data}",
                    s.ext("resourceversion").unwrap_or_default(),
                    s.ext("statushash").unwrap_or_default(),
                );
            }
        }
        seen = statuses.len();
    }
    hub.stop().await;
    Ok(())
}
