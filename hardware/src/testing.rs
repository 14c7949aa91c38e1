//! Test support (feature `test-support`): builds the fake NVML library used to test the NVML path without a GPU.
//!
//! The fake is a small C file implementing the NVML entry points this crate
//! reaches through `nvml-wrapper`, with the real ABI; see
//! `tests/nvml-shim/nvml_shim.c`. It is compiled on demand with the system C
//! compiler rather than by a build script, so that ordinary builds of the
//! crate do not need one. [`write_shim_state`] changes what a built shim
//! reports (GPU count, errors, temperature, power) while a process runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The shim's C source, embedded so dependants (the agent's tests and
/// benchmark) can build it without knowing where this crate lives.
pub const NVML_SHIM_SOURCE: &str = include_str!("../tests/nvml-shim/nvml_shim.c");

/// Which fake board the shim pretends to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimVariant {
    /// 8x H100 SXM5 80GB, MIG supported but off, 18 NVLinks each.
    H100,
    /// As [`ShimVariant::H100`], but GPU 0 has MIG on (3g.40gb, 2g.20gb,
    /// 2x 1g.10gb) and GPU 1 has MIG pending.
    H100Mig,
    /// `nvmlInit_v2` fails with `NVML_ERROR_DRIVER_NOT_LOADED`.
    InitFailure,
}

impl ShimVariant {
    fn define(self) -> Option<&'static str> {
        match self {
            Self::H100 => None,
            Self::H100Mig => Some("-DSHIM_MIG"),
            Self::InitFailure => Some("-DSHIM_INIT_FAIL"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::H100 => "h100",
            Self::H100Mig => "h100-mig",
            Self::InitFailure => "init-failure",
        }
    }
}

/// Why the shim could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No C compiler could be run.
    #[error(
        "cannot run the C compiler `{compiler}` ({source}); the NVML tests build a fake \
         libnvidia-ml.so from C and need one: install gcc or clang, or point CC at a compiler"
    )]
    NoCompiler {
        /// The compiler that was tried.
        compiler: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// The compiler ran and failed.
    #[error("compiling the NVML shim with `{compiler}` failed:\n{stderr}")]
    Compile {
        /// The compiler used.
        compiler: String,
        /// What it printed.
        stderr: String,
    },
    /// Writing the source or the library failed.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ShimError + '_ {
    move |source| ShimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Compiles `variant` into `<dir>/<variant>/libnvidia-ml.so.1` and returns
/// that path. Use a different `dir` for every test: the dynamic loader hands
/// out one shared instance per path, and tests running in parallel threads
/// must not share the fake's state.
pub fn build_nvml_shim(variant: ShimVariant, dir: &Path) -> Result<PathBuf, ShimError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let out_dir = dir.join(variant.name());
    std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir))?;
    let source = out_dir.join("nvml_shim.c");
    std::fs::write(&source, NVML_SHIM_SOURCE).map_err(io_err(&source))?;

    // Build under a unique name and rename, so a concurrent build of the same
    // directory never exposes a half-written library.
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = out_dir.join(format!(".libnvidia-ml.{}.{seq}.so", std::process::id()));
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let mut cmd = Command::new(&compiler);
    cmd.args([
        "-shared",
        "-fPIC",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fvisibility=hidden",
    ]);
    cmd.args(variant.define());
    // `-ldl` for dladdr, with which the shim finds its `state` file (part of
    // libc itself since glibc 2.34, where the flag is harmless).
    cmd.arg("-o").arg(&tmp).arg(&source).arg("-ldl");
    let output = cmd.output().map_err(|source| ShimError::NoCompiler {
        compiler: compiler.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(ShimError::Compile {
            compiler,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let lib = out_dir.join("libnvidia-ml.so.1");
    std::fs::rename(&tmp, &lib).map_err(io_err(&lib))?;
    Ok(lib)
}

/// What a built shim reports at its next `nvmlInit_v2`, beyond its healthy
/// defaults (see the header of `tests/nvml-shim/nvml_shim.c`). GPU indexes
/// are 0-7; the default value is the healthy board.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShimState {
    /// How many GPUs NVML lists (at most 8); fewer removes GPUs from the end,
    /// as if they had fallen off the bus. `None` lists all 8.
    pub gpus: Option<u32>,
    /// Uncorrected ECC errors per GPU (volatile and aggregate counters).
    pub ecc_uncorrected: BTreeMap<u32, u64>,
    /// GPUs with pages pending retirement.
    pub retired_pending: BTreeSet<u32>,
    /// GPUs with a row remapping pending.
    pub remap_pending: BTreeSet<u32>,
    /// GPU temperature in degrees Celsius, per GPU (default 35).
    pub temperature: BTreeMap<u32, u32>,
    /// Power draw in milliwatts, per GPU (default 120000).
    pub power_mw: BTreeMap<u32, u32>,
}

impl ShimState {
    /// The `state` file's text: one `key=value` per line.
    fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.gpus {
            let _ = writeln!(out, "gpus={n}");
        }
        for (gpu, n) in &self.ecc_uncorrected {
            let _ = writeln!(out, "ecc_uncorrected.{gpu}={n}");
        }
        for gpu in &self.retired_pending {
            let _ = writeln!(out, "retired_pending.{gpu}=1");
        }
        for gpu in &self.remap_pending {
            let _ = writeln!(out, "remap_pending.{gpu}=1");
        }
        for (gpu, c) in &self.temperature {
            let _ = writeln!(out, "temperature.{gpu}={c}");
        }
        for (gpu, mw) in &self.power_mw {
            let _ = writeln!(out, "power_mw.{gpu}={mw}");
        }
        out
    }
}

/// Writes `state` next to `library` (a path [`build_nvml_shim`] returned),
/// atomically: a temporary file renamed over the old one, so a concurrent
/// `nvmlInit_v2` reads either the old state or the new one. The shim reads
/// it at every init, so the next discovery sees it.
pub fn write_shim_state(library: &Path, state: &ShimState) -> Result<(), ShimError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = library.parent().unwrap_or_else(|| Path::new(""));
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".state.{}.{seq}.tmp", std::process::id()));
    std::fs::write(&tmp, state.render()).map_err(io_err(&tmp))?;
    let path = dir.join("state");
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_text() {
        assert_eq!(ShimState::default().render(), "");
        let state = ShimState {
            gpus: Some(7),
            ecc_uncorrected: BTreeMap::from([(3, 2)]),
            retired_pending: BTreeSet::from([1]),
            remap_pending: BTreeSet::from([2]),
            temperature: BTreeMap::from([(0, 90)]),
            power_mw: BTreeMap::from([(4, 800_000)]),
        };
        assert_eq!(
            state.render(),
            "gpus=7\necc_uncorrected.3=2\nretired_pending.1=1\nremap_pending.2=1\n\
             temperature.0=90\npower_mw.4=800000\n"
        );
    }
}
