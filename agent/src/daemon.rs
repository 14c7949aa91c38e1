//! Long-running commands: the admin endpoint, the component, and a drained shutdown around them.

use spokelet_runtime::admin::RunContext;
use spokelet_runtime::serve::{ServeError, serve, signalled};

use crate::config::{NodeCommand, RunCommand};
use crate::run::RunError;

/// Why a long-running command stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The work engine, or its admin endpoint or drain.
    #[error(transparent)]
    Run(#[from] ServeError<RunError>),
    /// The node role, or its admin endpoint or drain.
    #[error(transparent)]
    Node(#[from] ServeError<spokelet_node::NodeError>),
}

/// `spokelet run`: serve the admin endpoint and run the work engine until SIGTERM, then drain.
pub async fn run(cmd: RunCommand) -> Result<(), DaemonError> {
    run_until(cmd, RunContext::new(), signalled()).await
}

/// `spokelet node`: serve the admin endpoint and keep the node's labels and NodeInventory
/// current until SIGTERM.
pub async fn node(cmd: NodeCommand) -> Result<(), DaemonError> {
    Ok(spokelet_node::command::node(cmd).await?)
}

/// [`node`] with the shutdown trigger and context supplied by the caller (tests, embedders).
pub async fn node_until<S>(cmd: NodeCommand, ctx: RunContext, trigger: S) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
{
    Ok(spokelet_node::command::node_until(cmd, ctx, trigger).await?)
}

/// [`run`] with the shutdown trigger and context supplied by the caller, so tests (and
/// embedders) can run a whole agent in-process and stop it without signals.
pub async fn run_until<S>(cmd: RunCommand, ctx: RunContext, trigger: S) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
{
    let RunCommand { run, hub, admin } = cmd;
    Ok(serve(&admin, ctx, trigger, |ctx| crate::run::run(run, hub, ctx)).await?)
}
