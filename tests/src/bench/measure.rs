//! One process's wall time and peak memory, each from runs of its own: what the benchmarks
//! that compare spokelet's commands with another tool's measure.
// Reading a child's peak RSS needs ptrace and waitpid, which libc only offers unsafely.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::proc_status_kib;

/// Spawns `cmd` with its output discarded and returns its wall time.
pub fn wall_time(cmd: &mut Command) -> Result<Duration, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for {cmd:?}: {e}"))?;
    let wall = start.elapsed();
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}"));
    }
    Ok(wall)
}

/// Makes a raw `ptrace` request on `pid`.
fn ptrace(request: libc::c_uint, pid: libc::pid_t, data: usize) -> Result<(), String> {
    // SAFETY: the requests used here (SETOPTIONS, CONT) only act on a stopped
    // tracee of ours; `addr` is unused by them and `data` is an integer
    // (options or a signal number), never dereferenced.
    let rc = unsafe {
        libc::ptrace(
            request,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    if rc == -1 {
        return Err(format!(
            "ptrace({request}) on {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn waitpid(pid: libc::pid_t) -> Result<libc::c_int, String> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable int for the duration of the call.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    if rc != pid {
        return Err(format!("waitpid({pid}): {}", std::io::Error::last_os_error()));
    }
    Ok(status)
}

/// The peak RSS of one run of `cmd`, in KiB, as the child's own `VmHWM`.
///
/// `wait4`'s `ru_maxrss` cannot be used: at `execve` the kernel folds the
/// high-water mark of the address space being replaced into the process's
/// `maxrss`, and right after `fork` (or during `vfork`) that address space is
/// the parent's. Every child would then report at least this benchmark's own
/// RSS. Instead the child is traced with `PTRACE_O_TRACEEXIT`, which stops it
/// just before its memory is released, so `/proc/<pid>/status` still shows
/// the final `VmHWM` of the program itself.
pub fn peak_rss_kib(cmd: &mut Command) -> Result<u64, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before `execve` and only
    // makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_TRACEME, 0, null, null) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| e.to_string())?;
    // The child stops with SIGTRAP once `execve` has succeeded.
    let status = waitpid(pid)?;
    if !libc::WIFSTOPPED(status) {
        return Err(format!("{cmd:?} did not stop at exec (status {status})"));
    }
    // EXITKILL: never leave a stopped child behind if we bail out.
    let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
    ptrace(libc::PTRACE_SETOPTIONS, pid, options as usize)?;
    ptrace(libc::PTRACE_CONT, pid, 0)?;
    let exit_event = libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8);
    let mut peak = None;
    loop {
        let status = waitpid(pid)?;
        if libc::WIFEXITED(status) {
            if libc::WEXITSTATUS(status) != 0 {
                return Err(format!("{cmd:?} exited with {}", libc::WEXITSTATUS(status)));
            }
            break;
        }
        if libc::WIFSIGNALED(status) {
            return Err(format!("{cmd:?} killed by signal {}", libc::WTERMSIG(status)));
        }
        if status >> 8 == exit_event {
            peak = u32::try_from(pid).ok().and_then(|p| proc_status_kib(p, "VmHWM"));
            ptrace(libc::PTRACE_CONT, pid, 0)?;
        } else {
            // Any other stop is a signal for the child: pass it on.
            let signal = usize::try_from(libc::WSTOPSIG(status)).unwrap_or(0);
            ptrace(libc::PTRACE_CONT, pid, signal)?;
        }
    }
    peak.ok_or_else(|| format!("no VmHWM for {cmd:?} at exit"))
}
