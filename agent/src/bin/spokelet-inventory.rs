//! `spokelet-inventory`: the lean bare-metal discovery binary — `spokelet inventory` without the agent.
//!
//! The full `spokelet` binary carries the Kubernetes client, gRPC and the work engine. None of
//! that runs during discovery, but a large executable still costs memory and start-up time:
//! the kernel maps code in 64 KiB fault-around chunks, so a few functions scattered over a
//! 9 MB text segment pull megabytes into the resident set. This binary links only discovery
//! and output, which is what a bare-metal node service (see `deploy/systemd/`) runs every
//! few minutes. Flags and `SPOKELET_*` variables are the same as `spokelet inventory`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use spokelet::{inventory, telemetry};

/// Discover this node's hardware (CPU, memory, NICs, RDMA, GPUs, topology) and print it.
#[derive(Debug, Parser)]
#[command(name = "spokelet-inventory", version)]
struct Cli {
    #[command(flatten)]
    log: telemetry::LogArgs,

    /// What to discover and how to print it.
    #[command(flatten)]
    inventory: inventory::InventoryArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = cli.log.init() {
        eprintln!("spokelet-inventory: {err}");
        return ExitCode::from(2);
    }
    let stdout = std::io::stdout();
    match inventory::run(&cli.inventory, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("inventory failed: {err}");
            ExitCode::FAILURE
        }
    }
}
