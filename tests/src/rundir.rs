//! Per-run scratch directories.
//!
//! Every test process gets one run directory, `$TMPDIR/spokelet-e2e/run-<pid>-<starttime>`
//! (override the parent with `SPOKELET_E2E_TMPDIR`), and each cluster or registry a
//! subdirectory of it. The pid and its kernel start time in the name identify the owner
//! even after the pid is reused, so a later run can tell a live run's directory from one
//! left by a killed run.
//!
//! Cleanup happens in three places:
//! - a cluster or registry removes its own directory when dropped;
//! - a janitor (`sh`, in its own process group so a terminal Ctrl-C does not reach it)
//!   waits for end-of-file on a pipe from this process, which the kernel delivers however
//!   this process ends, then removes the run directory. This covers the shared cluster,
//!   which lives in a static and is never dropped;
//! - on first use, directories of runs whose owner is gone are removed, after killing any
//!   process whose command line still names them (covers a janitor that was killed too).

use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::HarnessError;

/// The name of the file in a run directory that records its owner, for humans.
const OWNER_FILE: &str = "owner.pid";

struct RunDir {
    path: PathBuf,
    /// Held open for the life of the process; its closing is the janitor's signal.
    _janitor_pipe: Option<ChildStdin>,
}

/// This process's run directory, created (and stale ones cleaned) on first use.
pub(crate) fn run_dir() -> Result<&'static Path, HarnessError> {
    static RUN_DIR: OnceLock<Result<RunDir, String>> = OnceLock::new();
    RUN_DIR
        .get_or_init(|| create_run_dir().map_err(|e| e.to_string()))
        .as_ref()
        .map(|d| d.path.as_path())
        .map_err(|e| HarnessError::io("creating the run directory", std::io::Error::other(e.clone())))
}

/// `name` with everything but ASCII letters, digits and `-` replaced by `_`, for file names.
pub(crate) fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A fresh directory `<run dir>/<name>-<n>` for one cluster or registry.
pub(crate) fn component_dir(name: &str) -> Result<PathBuf, HarnessError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = run_dir()?.join(format!("{}-{n}", file_safe(name)));
    std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Removes a directory tree, ignoring one that is already gone.
pub(crate) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove test directory");
    }
}

fn base_dir() -> PathBuf {
    match std::env::var_os("SPOKELET_E2E_TMPDIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir().join("spokelet-e2e"),
    }
}

fn create_run_dir() -> Result<RunDir, HarnessError> {
    let base = base_dir();
    std::fs::create_dir_all(&base)
        .map_err(|e| HarnessError::io(format!("creating {}", base.display()), e))?;
    remove_stale_run_dirs(&base);

    let pid = std::process::id();
    let start = process_start_time(pid).unwrap_or(0);
    let path = base.join(format!("run-{pid}-{start}"));
    std::fs::create_dir_all(&path)
        .map_err(|e| HarnessError::io(format!("creating {}", path.display()), e))?;
    std::fs::write(path.join(OWNER_FILE), format!("{pid} {start}\n"))
        .map_err(|e| HarnessError::io(format!("writing {}", path.join(OWNER_FILE).display()), e))?;

    // Without a janitor only the shared cluster's directory lingers (until the next run
    // removes it), so failing to start one is not fatal.
    let janitor_pipe = match start_janitor(&path) {
        Ok(pipe) => Some(pipe),
        Err(e) => {
            tracing::warn!(error = %e, "no janitor for the run directory; the next run removes it");
            None
        }
    };
    Ok(RunDir {
        path,
        _janitor_pipe: janitor_pipe,
    })
}

fn start_janitor(run_dir: &Path) -> std::io::Result<ChildStdin> {
    use std::os::unix::process::CommandExt as _;
    // `cat` returns at end-of-file, i.e. once this process has exited and the kernel closed
    // the pipe. By then PR_SET_PDEATHSIG has SIGKILLed the servers; a dying process may still
    // hold files for a moment, hence the retries.
    const SCRIPT: &str = r#"cat >/dev/null 2>&1
i=0
while [ "$i" -lt 20 ]; do
  rm -rf -- "$1" 2>/dev/null
  [ -e "$1" ] || exit 0
  i=$((i + 1))
  sleep 0.5
done"#;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("spokelet-e2e-janitor")
        .arg(run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C in the terminal interrupts the tests and the
        // servers, but the janitor must survive to clean up after them.
        .process_group(0)
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("janitor has no stdin"))
}

/// Removes run directories whose owning process is gone.
fn remove_stale_run_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((pid, start)) = parse_run_dir_name(name) else {
            continue;
        };
        if process_start_time(pid) == Some(start) {
            continue; // Its owner is alive: another test process running right now.
        }
        kill_processes_mentioning(&path);
        tracing::info!(dir = %path.display(), "removing stale test directory");
        remove_dir(&path);
    }
}

fn parse_run_dir_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix("run-")?;
    let (pid, start) = rest.split_once('-')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from the
    // last ')'. The field after it is field 3, so field 22 is the 20th after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILLs every process whose command line contains `dir`: servers of a dead run that
/// somehow survived it. Matching on the directory (which every server's arguments name)
/// rather than on recorded pids cannot hit an unrelated process that reused a pid.
fn kill_processes_mentioning(dir: &Path) {
    // With the trailing slash `run-1-2` does not match `run-1-23`; servers' arguments name
    // files inside the directory.
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let own = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle.as_slice()) {
            tracing::warn!(pid, dir = %dir.display(), "killing a leftover test server");
            // kill(1) rather than libc::kill keeps the harness free of unsafe code here.
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }

    #[test]
    fn run_dir_names_round_trip() {
        assert_eq!(parse_run_dir_name("run-123-456"), Some((123, 456)));
        assert_eq!(parse_run_dir_name("registry-0"), None);
        assert_eq!(parse_run_dir_name("run-x-1"), None);
    }

    #[test]
    fn stale_dirs_are_removed_and_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let live = base
            .path()
            .join(format!("run-{me}-{}", process_start_time(me).unwrap()));
        // Same pid, different start time: a previous process that had our pid.
        let stale = base.path().join(format!("run-{me}-1"));
        let unrelated = base.path().join("notes");
        for d in [&live, &stale, &unrelated] {
            std::fs::create_dir_all(d).unwrap();
        }
        remove_stale_run_dirs(base.path());
        assert!(live.exists());
        assert!(!stale.exists());
        assert!(unrelated.exists());
    }
}
