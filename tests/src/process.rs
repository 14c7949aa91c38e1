//! Child processes that cannot outlive the test process.
//!
//! Three layers make sure no server is left behind:
//! 1. [`ManagedProcess`] kills (SIGKILL) and reaps its child when dropped.
//! 2. Every child is started with `PR_SET_PDEATHSIG = SIGKILL`, so the kernel kills it when
//!    the test process dies for any reason, including SIGKILL, where no destructor runs.
//!    The signal fires when the *thread* that forked the child exits, not the process, so
//!    all children are forked by one dedicated thread that lives as long as the process
//!    (test threads come and go; the shared cluster outlives the test that started it).
//! 3. Stale run directories and any process still running from them are removed on the
//!    next run (see [`crate::rundir`]).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::HarnessError;

/// How many log lines a start-up error carries.
const LOG_TAIL_LINES: usize = 40;

/// A server process with its output in a log file; killed and reaped on drop.
#[derive(Debug)]
pub(crate) struct ManagedProcess {
    owner: String,
    component: String,
    log_path: PathBuf,
    child: Option<Child>,
}

impl ManagedProcess {
    /// Starts `program args…` with stdout and stderr appended to `log_path`.
    ///
    /// `owner` names the cluster (or `registry`) in errors; `component` the server.
    pub(crate) fn spawn(
        owner: &str,
        component: &str,
        program: &Path,
        args: &[String],
        log_path: PathBuf,
    ) -> Result<Self, HarnessError> {
        Self::spawn_with_env(owner, component, program, args, &[], log_path)
    }

    /// [`ManagedProcess::spawn`] with extra environment variables.
    pub(crate) fn spawn_with_env(
        owner: &str,
        component: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, String)],
        log_path: PathBuf,
    ) -> Result<Self, HarnessError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io(format!("opening {}", log_path.display()), e))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        if let Some(dir) = log_path.parent() {
            cmd.current_dir(dir);
        }
        sys::die_with_parent(&mut cmd);
        let child = spawn_on_spawner_thread(cmd).map_err(|e| match e {
            SpawnError::Gone => HarnessError::SpawnerGone,
            SpawnError::Io(e) => HarnessError::io(format!("starting {}", program.display()), e),
        })?;
        tracing::debug!(owner, component, pid = child.id(), log = %log_path.display(), "started");
        Ok(ManagedProcess {
            owner: owner.to_string(),
            component: component.to_string(),
            log_path,
            child: Some(child),
        })
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// An error for this process not coming up, with the end of its log.
    pub(crate) fn start_failed(&self, reason: impl Into<String>) -> HarnessError {
        HarnessError::StartFailed {
            cluster: self.owner.clone(),
            component: self.component.clone(),
            reason: reason.into(),
            log_path: self.log_path.clone(),
            log_tail: log_tail(&self.log_path, LOG_TAIL_LINES),
        }
    }

    /// Fails with the log tail if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), HarnessError> {
        match self.exit_status() {
            Some(status) => Err(self.start_failed(format!("exited early ({status})"))),
            None => Ok(()),
        }
    }

    /// Whether the process has exited, without reaping it (so usable through `&self`): a
    /// child that exited stays a zombie until [`ManagedProcess::kill`] waits for it.
    pub(crate) fn has_exited(&self) -> bool {
        let Some(pid) = self.pid() else {
            return true;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        matches!(state, Some("Z" | "X") | None)
    }

    /// An error for this process having died after start-up, with the end of its log.
    pub(crate) fn died(&self) -> HarnessError {
        HarnessError::ProcessDied {
            cluster: self.owner.clone(),
            component: self.component.clone(),
            log_path: self.log_path.clone(),
            log_tail: log_tail(&self.log_path, LOG_TAIL_LINES),
        }
    }

    /// SIGKILL and reap. Test servers hold nothing worth a graceful shutdown, and SIGKILL
    /// cannot be ignored or delayed.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error here means it already exited; wait() still reaps it.
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(owner = %self.owner, component = %self.component, "stopped");
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

enum SpawnError {
    Gone,
    Io(std::io::Error),
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::SyncSender<std::io::Result<Child>>,
}

/// Forks `cmd` on the process-lifetime spawner thread (see the module docs).
fn spawn_on_spawner_thread(cmd: Command) -> Result<Child, SpawnError> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("spokelet-e2e-spawner".into())
            .spawn(move || {
                // Ends only when every sender is gone, and the one sender lives in a static:
                // this thread runs until the process exits.
                for mut request in rx {
                    let result = request.cmd.spawn();
                    let _ = request.reply.send(result);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let sender = sender.as_ref().ok_or(SpawnError::Gone)?;
    let (reply, answer) = mpsc::sync_channel(1);
    sender
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| SpawnError::Gone)?;
    // fork+exec takes milliseconds, so blocking the caller (even an async one) is fine.
    answer
        .recv()
        .map_err(|_| SpawnError::Gone)?
        .map_err(SpawnError::Io)
}

/// The only unsafe code in the harness: one `prctl` in the forked child.
#[allow(unsafe_code)]
mod sys {
    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    /// Makes the child receive SIGKILL when the thread that forks it (the spawner thread,
    /// which lives as long as the process) goes away.
    pub(super) fn die_with_parent(cmd: &mut Command) {
        let parent = std::process::id();
        // SAFETY: `pre_exec` runs the closure in the child between fork and exec, where only
        // async-signal-safe operations are allowed. The closure calls prctl(2) and getppid(2),
        // both async-signal-safe, and builds `io::Error` values from raw OS codes, which does
        // not allocate. It touches no locks and no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If the parent died between fork and prctl, the signal will never come:
                // refuse to exec an orphan.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// `n` distinct free TCP ports on 127.0.0.1.
///
/// All listeners are held until every port is chosen so the same port is not handed out
/// twice; they are released before the servers bind, so another process can still take one
/// in between: callers retry the whole start when a server reports the address in use.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| HarnessError::io("binding 127.0.0.1:0 to find a free port", e))?;
        listeners.push(listener);
    }
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| HarnessError::io("reading a bound port", e))
        })
        .collect()
}

/// A listener on a free port of 127.0.0.1 for one of the harness's own servers (`what`, for
/// errors), and its port.
pub(crate) async fn bind_loopback(what: &str) -> Result<(tokio::net::TcpListener, u16), HarnessError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| HarnessError::io(format!("binding {what}"), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| HarnessError::io(format!("reading the port of {what}"), e))?
        .port();
    Ok((listener, port))
}

/// The last `lines` lines of a log file (at most its last 64 KiB), or a note why not.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A plain-HTTP GET against `127.0.0.1:port`, returning the status code and body.
///
/// Used for etcd's `/health` and the registry's `/v2/` while they start; both speak HTTP/1.x
/// without TLS, so a few lines of tokio beat another HTTP client dependency.
pub(crate) async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    // A server that accepted but hangs must not stall the readiness loop.
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(4).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let text: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        std::fs::write(&path, text.join("\n")).unwrap();
        assert_eq!(log_tail(&path, 2), "line 98\nline 99");
        assert!(log_tail(&dir.path().join("missing"), 2).starts_with("<cannot read"));
    }

    #[test]
    fn kill_reaps_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ManagedProcess::spawn(
            "unit",
            "sleep",
            Path::new("/bin/sleep"),
            &["600".to_string()],
            dir.path().join("sleep.log"),
        )
        .unwrap();
        let pid = p.pid().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        assert!(!p.has_exited());
        p.kill();
        assert!(p.has_exited());
        assert!(p.pid().is_none());
        // Reaped, not a zombie: the pid is gone (or, rarely, reused by an unrelated process).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }

    #[tokio::test]
    async fn exited_process_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ManagedProcess::spawn(
            "unit",
            "sh",
            Path::new("/bin/sh"),
            &[
                "-c".to_string(),
                "echo boom: address already in use; exit 3".to_string(),
            ],
            dir.path().join("sh.log"),
        )
        .unwrap();
        let mut attempts = 0;
        let err = loop {
            if let Err(e) = p.check_running() {
                break e;
            }
            attempts += 1;
            assert!(attempts < 500, "sh did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(err.is_port_race(), "{err}");
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }
}
