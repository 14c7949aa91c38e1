//! Long-running commands: the admin endpoint, the component, and a drained shutdown around them.

use prometheus_client::metrics::info::Info;

use crate::{
    admin::{AdminError, AdminServer, RunContext},
    config::{AdminArgs, NodeCommand, RunCommand},
    lock::lock,
    run::RunError,
    shutdown::{self, Ending},
};

/// Why a long-running command stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The admin endpoint failed to start or serve.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The work engine failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The node role failed.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// In-flight work did not finish within the grace period after SIGTERM.
    #[error("in-flight work did not finish within the {0:?} shutdown grace period")]
    GraceExpired(std::time::Duration),
}

/// Register `spokelet_build_info{version=…}` so dashboards can tell agent versions apart.
pub fn register_build_info(ctx: &RunContext) {
    let info = Info::new(vec![(
        "version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    )]);
    lock(&ctx.registry).register("build", "spokelet build information", info);
}

/// `spokelet run`: serve the admin endpoint and run the work engine until SIGTERM, then drain.
pub async fn run(cmd: RunCommand) -> Result<(), DaemonError> {
    run_until(cmd, RunContext::new(), signalled()).await
}

/// `spokelet node`: serve the admin endpoint and keep the node's labels and NodeInventory
/// current until SIGTERM.
pub async fn node(cmd: NodeCommand) -> Result<(), DaemonError> {
    node_until(cmd, RunContext::new(), signalled()).await
}

/// [`node`] with the shutdown trigger and context supplied by the caller (tests, embedders).
pub async fn node_until<S>(cmd: NodeCommand, ctx: RunContext, trigger: S) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
{
    let NodeCommand { node, admin } = cmd;
    serve(&admin, ctx, trigger, |ctx| async move {
        crate::node::run(node, ctx).await.map_err(DaemonError::from)
    })
    .await
}

/// Resolves on SIGTERM or SIGINT (never, if the handler cannot be installed: the default
/// action, exit, still applies).
async fn signalled() {
    match shutdown::signal().await {
        Ok(signal) => tracing::info!(signal, "received shutdown signal"),
        Err(err) => {
            tracing::error!(error = %err, "cannot watch for shutdown signals");
            std::future::pending::<()>().await;
        }
    }
}

/// [`run`] with the shutdown trigger and context supplied by the caller, so tests (and
/// embedders) can run a whole agent in-process and stop it without signals.
pub async fn run_until<S>(cmd: RunCommand, ctx: RunContext, trigger: S) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
{
    let RunCommand { run, hub, admin } = cmd;
    serve(&admin, ctx, trigger, |ctx| async move {
        crate::run::run(run, hub, ctx).await.map_err(DaemonError::from)
    })
    .await
}

/// Serves the admin endpoint around `component` and drains it on `trigger` within the grace.
async fn serve<S, F, Fut>(
    admin_args: &AdminArgs,
    ctx: RunContext,
    trigger: S,
    component: F,
) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
    F: FnOnce(RunContext) -> Fut,
    Fut: std::future::Future<Output = Result<(), DaemonError>>,
{
    register_build_info(&ctx);
    let admin = AdminServer::bind(admin_args.admin_addr, ctx.registry.clone(), ctx.health.clone()).await?;
    tracing::info!(addr = %admin.local_addr()?, "admin endpoint listening (/metrics, /healthz, /readyz)");
    let admin_task = tokio::spawn(admin.serve(ctx.shutdown.clone()));

    let work = component(ctx.clone());
    let outcome = shutdown::drain(work, trigger, ctx.shutdown.clone(), admin_args.shutdown_grace).await;

    // Whatever happened to the component, stop the admin endpoint too.
    ctx.shutdown.cancel();
    let admin_result = admin_task.await;
    match outcome {
        Ending::Finished(result) | Ending::Drained(result) => result?,
        Ending::GraceExpired => return Err(DaemonError::GraceExpired(admin_args.shutdown_grace)),
    }
    match admin_result {
        Ok(result) => result?,
        Err(join) => tracing::warn!(error = %join, "admin endpoint task ended abnormally"),
    }
    tracing::info!("shut down cleanly");
    Ok(())
}
