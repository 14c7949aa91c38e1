//! Long-running commands: the admin endpoint, the component, and a drained shutdown around them.

use prometheus_client::metrics::info::Info;

use crate::{
    admin::{AdminError, AdminServer, RunContext},
    config::RunCommand,
    lock::lock,
    run::RunError,
    shutdown::{self, Drained},
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
    let trigger = async {
        match shutdown::signal().await {
            Ok(signal) => tracing::info!(signal, "received shutdown signal"),
            Err(err) => {
                // Without a handler the default action (exit) still applies; keep running.
                tracing::error!(error = %err, "cannot watch for shutdown signals");
                std::future::pending::<()>().await;
            }
        }
    };
    run_until(cmd, RunContext::new(), trigger).await
}

/// [`run`] with the shutdown trigger and context supplied by the caller, so tests (and
/// embedders) can run a whole agent in-process and stop it without signals.
pub async fn run_until<S>(cmd: RunCommand, ctx: RunContext, trigger: S) -> Result<(), DaemonError>
where
    S: std::future::Future<Output = ()>,
{
    register_build_info(&ctx);
    let admin = AdminServer::bind(cmd.admin.admin_addr, ctx.registry.clone(), ctx.health.clone()).await?;
    tracing::info!(addr = %admin.local_addr()?, "admin endpoint listening (/metrics, /healthz, /readyz)");
    let admin_task = tokio::spawn(admin.serve(ctx.shutdown.clone()));

    let engine = crate::run::run(cmd.run, cmd.hub, ctx.clone());
    let outcome = shutdown::drain(engine, trigger, ctx.shutdown.clone(), cmd.admin.shutdown_grace).await;

    // Whatever happened to the engine, stop the admin endpoint too.
    ctx.shutdown.cancel();
    let admin_result = admin_task.await;
    match outcome {
        Drained::Finished(result) | Drained::Drained(result) => result?,
        Drained::GraceExpired => return Err(DaemonError::GraceExpired(cmd.admin.shutdown_grace)),
    }
    match admin_result {
        Ok(result) => result?,
        Err(join) => tracing::warn!(error = %join, "admin endpoint task ended abnormally"),
    }
    tracing::info!("shut down cleanly");
    Ok(())
}
