//! A TCP front that can be made to stall: a network partition in which connections stay open.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::HarnessError;

/// Passes bytes both ways between its clients and `upstream` until [`StallingFront::stall`];
/// from then on every byte either way is read and dropped, on the connections already open and
/// on new ones. Neither side sees the connection close: a half-open connection, as through a
/// proxy or a firewall that lost its state, where a request sent is neither answered nor
/// refused. Works for TLS too (it never looks at the bytes).
#[derive(Debug)]
pub struct StallingFront {
    port: u16,
    stalled: Arc<AtomicBool>,
    /// Bytes dropped since the stall, both ways.
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingFront {
    /// Listens on a free loopback port in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self, HarnessError> {
        let (listener, port) = crate::process::bind_loopback("the stalling front").await?;
        let stalled = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (s, d) = (stalled.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let Ok(to) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = tokio::io::split(conn);
                let (to_read, to_write) = tokio::io::split(to);
                tokio::spawn(pass(client_read, to_write, s.clone(), d.clone()));
                tokio::spawn(pass(to_read, client_write, s.clone(), d.clone()));
            }
        });
        Ok(StallingFront {
            port,
            stalled,
            dropped,
            task,
        })
    }

    /// `127.0.0.1:PORT` of the front.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// From now on nothing passes, either way.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Bytes dropped since the stall (what the two sides sent each other in vain).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` while not stalled; drops what arrives once stalled.
async fn pass(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    stalled: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            dropped.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Stalled: the other side must not learn of the end either.
    if !stalled.load(Ordering::SeqCst) {
        let _ = to.shutdown().await;
    }
}

impl Drop for StallingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
