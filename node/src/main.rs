//! `spokelet-node`: the node role (`spokelet node`) as a lean binary of its own.
//!
//! The same code, flags and `SPOKELET_*` variables as `spokelet node`. Its package links the
//! node role, the hub transports (the gRPC one serves the bare-metal `--hub-config`) and the
//! work wire, never the work engine, Flux or the artifact code. It matters for a process that runs on
//! every node: most of a small service's resident memory is the pages of its executable that
//! it touches, and the kernel maps them in 64 KiB fault-around chunks, so a 22 MB binary costs
//! some 12 MiB of file-backed memory even when only discovery and one API client run. The
//! DaemonSet runs this binary.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use spokelet_node::command::{self, NodeCommand};
use spokelet_runtime::telemetry;

/// Keep this node's hardware labels and NodeInventory current (the per-node DaemonSet role).
#[derive(Debug, Parser)]
#[command(name = "spokelet-node", version)]
struct Cli {
    #[command(flatten)]
    log: telemetry::LogArgs,

    #[command(flatten)]
    node: NodeCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = cli.log.init() {
        eprintln!("spokelet-node: {err}");
        return ExitCode::from(2);
    }
    // One thread: the role does one thing at a time (discovery runs on the blocking pool).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("spokelet-node: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command::node(cli.node)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("spokelet node failed: {err}");
            ExitCode::FAILURE
        }
    }
}
