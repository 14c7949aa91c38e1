//! `spokelet inventory`: discover this node's hardware and print it.
//!
//! Synchronous on purpose: discovery is a few hundred small file reads and
//! one NVML session, so starting an async runtime would cost more than the
//! work itself.

use std::io::Write;
use std::path::PathBuf;

use spokelet_hardware::{DiscoverOptions, NvmlSource};

/// Output formats for `spokelet inventory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Sectioned text for people.
    #[default]
    Table,
    /// The full inventory as JSON (camelCase fields).
    Json,
    /// The full inventory as YAML.
    Yaml,
    /// The Kubernetes node labels the inventory implies, one `key=value` per
    /// line, sorted.
    Labels,
}

/// Arguments of `spokelet inventory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct InventoryArgs {
    /// Output format: a table for people, JSON or YAML for tools, or the node labels.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table, env = "SPOKELET_INVENTORY_OUTPUT")]
    pub output: OutputFormat,

    /// What to read and how.
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
}

/// Where discovery reads from; shared by `spokelet inventory` and `spokelet node`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DiscoveryArgs {
    /// Filesystem root to read `proc/` and `sys/` from. In a DaemonSet the
    /// host's root is typically mounted at `/host`.
    #[arg(long, default_value = "/", env = "SPOKELET_HOST_ROOT")]
    pub root: PathBuf,

    /// Load NVML from this file instead of the system's
    /// `libnvidia-ml.so.1`.
    #[arg(long, value_name = "PATH", env = "SPOKELET_NVML_LIBRARY")]
    pub nvml_library: Option<PathBuf>,

    /// Do not use NVML; GPUs are found by PCI scan only. Takes precedence
    /// over `--nvml-library`.
    #[arg(long)]
    pub no_nvml: bool,
}

impl Default for DiscoveryArgs {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            nvml_library: None,
            no_nvml: false,
        }
    }
}

impl DiscoveryArgs {
    /// The discovery options these arguments select.
    pub fn discover_options(&self) -> DiscoverOptions {
        let nvml = if self.no_nvml {
            NvmlSource::Disabled
        } else if let Some(path) = &self.nvml_library {
            NvmlSource::Library(path.clone())
        } else {
            NvmlSource::Auto
        };
        DiscoverOptions {
            root: self.root.clone(),
            nvml,
        }
    }
}

impl InventoryArgs {
    /// The discovery options these arguments select.
    pub fn discover_options(&self) -> DiscoverOptions {
        self.discovery.discover_options()
    }
}

/// Why `spokelet inventory` could not print its output. Discovery itself
/// cannot fail (problems are reported as warnings in the output); only
/// writing can.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Writing to the output failed (e.g. a closed pipe).
    #[error("writing the inventory failed: {0}")]
    Write(#[from] std::io::Error),
    #[error("encoding the inventory as JSON failed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding the inventory as YAML failed: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// Runs `spokelet inventory`: discovers the node and writes it to `out` in
/// the requested format.
pub fn run(args: &InventoryArgs, out: &mut impl Write) -> Result<(), InventoryError> {
    let inventory = spokelet_hardware::discover(&args.discover_options());
    // Callers usually hand us stdout, which is line-buffered; build the whole
    // output first and write it once.
    let mut buf = Vec::with_capacity(16 * 1024);
    match args.output {
        OutputFormat::Table => buf.extend_from_slice(spokelet_hardware::render_table(&inventory).as_bytes()),
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut buf, &inventory)?;
            buf.push(b'\n');
        }
        OutputFormat::Yaml => serde_yaml::to_writer(&mut buf, &inventory)?,
        OutputFormat::Labels => {
            // Labels carry no room for warnings; log them so they are not lost.
            for warning in &inventory.warnings {
                tracing::warn!(%warning, "inventory");
            }
            for (key, value) in spokelet_hardware::labels(&inventory) {
                writeln!(buf, "{key}={value}")?;
            }
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: InventoryArgs,
    }

    #[test]
    fn defaults_and_flags() {
        let cli = Cli::try_parse_from(["inventory"]).unwrap();
        assert_eq!(cli.args.output, OutputFormat::Table);
        assert_eq!(cli.args.discovery.root, PathBuf::from("/"));
        assert_eq!(cli.args.discover_options().nvml, NvmlSource::Auto);

        let cli = Cli::try_parse_from([
            "inventory",
            "-o",
            "labels",
            "--root",
            "/host",
            "--nvml-library",
            "/x/libnvidia-ml.so.1",
        ])
        .unwrap();
        assert_eq!(cli.args.output, OutputFormat::Labels);
        let opts = cli.args.discover_options();
        assert_eq!(opts.root, PathBuf::from("/host"));
        assert_eq!(opts.nvml, NvmlSource::Library("/x/libnvidia-ml.so.1".into()));

        let cli = Cli::try_parse_from(["inventory", "--nvml-library", "/x", "--no-nvml"]).unwrap();
        assert_eq!(cli.args.discover_options().nvml, NvmlSource::Disabled);

        assert!(Cli::try_parse_from(["inventory", "--output", "xml"]).is_err());
    }
}
