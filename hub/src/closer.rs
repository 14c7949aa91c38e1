//! Stopping a hub transport after the engine: its tasks are cancelled only once the engine is
//! done, so the last statuses it produced while draining still reach the hub.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Stops a hub transport.
#[derive(Debug)]
pub struct HubCloser {
    /// The transport's own token: cancelled only after the engine has stopped, so the last
    /// statuses the engine produced while draining still reach the hub.
    stop: CancellationToken,
    /// Transport tasks to wait for.
    tasks: Vec<JoinHandle<()>>,
}

impl HubCloser {
    /// A closer of the transport tasks `tasks`, which end once `stop` is cancelled.
    pub fn new(stop: CancellationToken, tasks: Vec<JoinHandle<()>>) -> Self {
        HubCloser { stop, tasks }
    }

    /// Cancel the transport and wait for its tasks (each bounds its own final flush).
    pub async fn close(self) {
        self.stop.cancel();
        for task in self.tasks {
            if let Err(err) = task.await {
                tracing::warn!(error = %err, "hub transport task ended abnormally");
            }
        }
    }
}
