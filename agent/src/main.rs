//! The `spokelet` binary: parse configuration, start telemetry, run the command, shut down on SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use spokelet::{
    artifact::{self, ArtifactCommand},
    config::{Cli, Command, ConfigError},
    daemon, inventory,
};

/// The multi-threaded runtime of the async commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spokelet")
        .build()
        .context("cannot start the async runtime")
}

/// A single-threaded runtime, for a command with little concurrency (blocking discovery still
/// runs on tokio's blocking pool).
fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    let cli = match Cli::load() {
        Ok(cli) => cli,
        // clap prints help, version and usage errors itself, with the right exit code.
        Err(ConfigError::Clap(err)) => err.exit(),
        Err(err) => {
            eprintln!("spokelet: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = cli.log.init() {
        eprintln!("spokelet: {err}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        // Inventory is a one-shot, synchronous job: no async runtime to start.
        Command::Inventory(args) => {
            let stdout = std::io::stdout();
            inventory::run(&args, &mut stdout.lock()).context("inventory failed")
        }
        Command::Run(cmd) => runtime()?
            .block_on(daemon::run(*cmd))
            .context("spokelet run failed"),
        // The node role does one thing at a time: one thread keeps its memory small.
        Command::Node(cmd) => current_thread_runtime()?
            .block_on(daemon::node(*cmd))
            .context("spokelet node failed"),
        Command::Artifact(ArtifactCommand::Push(args)) => {
            let pushed = runtime()?
                .block_on(artifact::push(&args))
                .context("artifact push failed")?;
            println!("{pushed}");
            Ok(())
        }
        Command::Artifact(ArtifactCommand::Pull(args)) => {
            let pulled = runtime()?
                .block_on(artifact::pull(&args))
                .context("artifact pull failed")?;
            println!("{pulled}");
            Ok(())
        }
    }
}
