//! Test support (feature `test-support`): builds the fake NVML library used to test the NVML path without a GPU.
//!
//! The fake is a small C file implementing the NVML entry points this crate
//! reaches through `nvml-wrapper`, with the real ABI; see
//! `tests/nvml-shim/nvml_shim.c`. It is compiled on demand with the system C
//! compiler rather than by a build script, so that ordinary builds of the
//! crate do not need one.

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
    cmd.arg("-o").arg(&tmp).arg(&source);
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
