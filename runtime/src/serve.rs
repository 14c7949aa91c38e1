//! Running a long-lived component: the admin endpoint around it, build info, and a drained
//! shutdown on SIGTERM within a grace period.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::metrics::info::Info;
use spokelet_base::duration::parse_duration;
use spokelet_base::lock::lock;

use crate::admin::{AdminError, AdminServer, RunContext};
use crate::shutdown::{self, Ending};

/// Settings of every long-running command.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Where `/metrics`, `/healthz` and `/readyz` listen. Loopback by default so a
    /// bare-metal install exposes nothing; the DaemonSet sets `0.0.0.0:9464`.
    #[arg(long, env = "SPOKELET_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
    pub admin_addr: SocketAddr,

    /// How long in-flight work may take to finish after SIGTERM before we exit anyway.
    #[arg(long, env = "SPOKELET_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// Why a served component stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError<E: std::error::Error + 'static> {
    /// The admin endpoint failed to start or serve.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The component failed.
    #[error(transparent)]
    Component(E),
    /// In-flight work did not finish within the grace period after SIGTERM.
    #[error("in-flight work did not finish within the {0:?} shutdown grace period")]
    GraceExpired(Duration),
}

/// Register `spokelet_build_info{version=…}` so dashboards can tell agent versions apart.
pub fn register_build_info(ctx: &RunContext) {
    let info = Info::new(vec![(
        "version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    )]);
    lock(&ctx.registry).register("build", "spokelet build information", info);
}

/// Resolves on SIGTERM or SIGINT (never, if the handler cannot be installed: the default
/// action, exit, still applies).
pub async fn signalled() {
    match shutdown::signal().await {
        Ok(signal) => tracing::info!(signal, "received shutdown signal"),
        Err(err) => {
            tracing::error!(error = %err, "cannot watch for shutdown signals");
            std::future::pending::<()>().await;
        }
    }
}

/// Serves the admin endpoint around `component` and drains it on `trigger` within the grace.
pub async fn serve<S, F, Fut, E>(
    admin_args: &AdminArgs,
    ctx: RunContext,
    trigger: S,
    component: F,
) -> Result<(), ServeError<E>>
where
    S: std::future::Future<Output = ()>,
    F: FnOnce(RunContext) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
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
        Ending::Finished(result) | Ending::Drained(result) => result.map_err(ServeError::Component)?,
        Ending::GraceExpired => return Err(ServeError::GraceExpired(admin_args.shutdown_grace)),
    }
    match admin_result {
        Ok(result) => result?,
        Err(join) => tracing::warn!(error = %join, "admin endpoint task ended abnormally"),
    }
    tracing::info!("shut down cleanly");
    Ok(())
}
