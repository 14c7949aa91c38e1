//! `spokelet node` as a long-running command: the node role served with the admin endpoint and
//! a drained shutdown.

use spokelet_runtime::admin::RunContext;
use spokelet_runtime::serve::{AdminArgs, ServeError, serve, signalled};

use crate::role::{NodeArgs, NodeError};

/// `spokelet node`: the node role plus the admin endpoint.
#[derive(Debug, clap::Args)]
pub struct NodeCommand {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Admin endpoint and shutdown settings.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Serve the admin endpoint and keep the node's labels and NodeInventory current until SIGTERM.
pub async fn node(cmd: NodeCommand) -> Result<(), ServeError<NodeError>> {
    node_until(cmd, RunContext::new(), signalled()).await
}

/// [`node`] with the shutdown trigger and context supplied by the caller (tests, embedders).
pub async fn node_until<S>(cmd: NodeCommand, ctx: RunContext, trigger: S) -> Result<(), ServeError<NodeError>>
where
    S: std::future::Future<Output = ()>,
{
    let NodeCommand { node, admin } = cmd;
    serve(&admin, ctx, trigger, |ctx| crate::role::run(node, ctx)).await
}
