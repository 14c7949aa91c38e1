//! The hardware fixture trees of `hardware/tests/fixtures/`, copied for a test or benchmark to change.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// The fixture tree `name` (`hgx-h100`, `plain-vm`, `gpu-no-driver`).
pub fn hardware_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hardware/tests/fixtures")
        .join(name)
}

/// Copies the fixture tree `name` to `to` with `cp -a` (its sysfs symlinks kept).
pub fn copy_fixture(name: &str, to: &Path) -> Result<(), HarnessError> {
    let from = hardware_fixture(name);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(to)
        .status()
        .map_err(|e| io_error(&from, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(io_error(
            &from,
            std::io::Error::other(format!("cp -a exited with {status}")),
        ))
    }
}

/// A healthy 8-GPU HGX host at `to`. The committed fixture has one HCA's cable unplugged
/// (mlx5_7 and its netdev down, so the node is unhealthy); here it is plugged back in.
pub fn healthy_hgx(to: &Path) -> Result<(), HarnessError> {
    copy_fixture("hgx-h100", to)?;
    for (file, text) in [
        ("sys/class/infiniband/mlx5_7/ports/1/state", "4: ACTIVE\n"),
        ("sys/class/infiniband/mlx5_7/ports/1/phys_state", "5: LinkUp\n"),
        ("sys/class/net/ibp224s0/operstate", "up\n"),
    ] {
        let path = to.join(file);
        std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
    }
    Ok(())
}

fn io_error(path: &Path, source: std::io::Error) -> HarnessError {
    HarnessError::Io {
        context: format!("fixture {}", path.display()),
        source,
    }
}
