//! Command-line interface: `clap` flags with `SPOKELET_*` environment fallbacks and an optional YAML config file.
//!
//! Precedence, highest first: a flag on the command line, its `SPOKELET_*` environment
//! variable, the config file (`--config` / `SPOKELET_CONFIG`), the built-in default.
//! The config file is a flat YAML mapping whose keys are the long flag names
//! (`works-dir: /var/lib/spokelet/works`), so every flag is configurable in one place
//! and nothing has two spellings.

use std::{ffi::OsString, path::PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand, parser::ValueSource};

use crate::artifact::ArtifactCommand;
use crate::{hub::HubArgs, inventory::InventoryArgs, run::RunArgs};

/// Read with [`Cli::load`], which layers the config file under flags and environment.
#[derive(Debug, Parser)]
#[command(
    name = "spokelet",
    version,
    about = "Spoke-cluster agent: pulls ManifestWorks from the hub, applies them with drift correction, reports inventory and status.",
    propagate_version = true
)]
pub struct Cli {
    /// YAML file with defaults for any flag; keys are long flag names (e.g. `log-format: json`).
    #[arg(long, env = "SPOKELET_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub log: crate::telemetry::LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Discover this node's hardware (CPU, memory, NICs, RDMA, GPUs, topology) and print it.
    Inventory(InventoryArgs),
    /// Apply ManifestWorks to this cluster and keep them applied (drift correction).
    Run(Box<RunCommand>),
    /// Keep this node's hardware labels and NodeInventory current (the per-node DaemonSet role).
    Node(Box<NodeCommand>),
    /// Flux-format OCI artifacts: package a directory and push it.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
}

/// `spokelet run`: the work engine plus the admin endpoint.
#[derive(Debug, clap::Args)]
pub struct RunCommand {
    #[command(flatten)]
    pub run: RunArgs,
    /// Where works come from: a hub (`--hub-transport grpc|kube`) or, without one, `--works-dir`.
    #[command(flatten)]
    pub hub: HubArgs,
    /// Admin endpoint and shutdown settings.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Re-exported: `spokelet node` is the node crate's command.
pub use spokelet_node::command::NodeCommand;
/// Re-exported: the settings of every long-running command.
pub use spokelet_runtime::serve::AdminArgs;

/// Errors while reading the command line and config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad flags, `--help` or `--version`: clap formats and prints these itself.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The config file is not a YAML mapping of flag names to values.
    #[error("config file {path} is not valid: {message}")]
    Invalid {
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl Cli {
    /// Parse the process's arguments, environment and config file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Parse the given arguments (first is the program name), the environment and config file.
    pub fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let root = Cli::command();
        // A first, forgiving pass finds `--config` and which flags the command line or
        // environment already set, even if a required flag is only in the config file.
        let partial = root
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(argv.iter())?;
        if let Some(path) = partial.get_one::<PathBuf>("config").cloned() {
            let extra = config_file_args(&root, &partial, &path)?;
            argv.extend(extra);
        }
        let matches = root.try_get_matches_from(argv)?;
        Ok(Cli::from_arg_matches(&matches)?)
    }
}

/// Turn the config file's entries into `--flag=value` arguments for every flag that
/// neither the command line nor the environment set.
fn config_file_args(
    root: &clap::Command,
    partial: &clap::ArgMatches,
    path: &PathBuf,
) -> Result<Vec<OsString>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    let Some(map) = read_config_map(path)? else {
        return Ok(Vec::new());
    };
    let (sub_name, sub_matches) = match partial.subcommand() {
        Some((name, m)) => (Some(name), Some(m)),
        None => (None, None),
    };
    let sub_cmd = sub_name.and_then(|n| root.find_subcommand(n));

    let mut out = Vec::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| invalid(format!("key {key:?} is not a string")))?
            .to_string();
        if key == "config" {
            return Err(invalid("`config` cannot point to another config file".into()));
        }
        // Which command owns the flag: the running subcommand, or the root (global flags).
        let found = sub_cmd
            .and_then(|c| find_long(c, &key).map(|a| (a, sub_matches)))
            .or_else(|| find_long(root, &key).map(|a| (a, Some(partial))));
        let Some((arg, matches)) = found else {
            // A key for another subcommand is fine (one file serves them all); a key
            // no subcommand knows is a typo worth failing on.
            if root.get_subcommands().any(|c| find_long(c, &key).is_some()) {
                continue;
            }
            return Err(invalid(format!(
                "unknown key `{key}` (keys are long flag names, see --help)"
            )));
        };
        let already_set = matches
            .and_then(|m| m.value_source(arg.get_id().as_str()))
            .is_some_and(|src| matches!(src, ValueSource::CommandLine | ValueSource::EnvVariable));
        if !already_set {
            push_flag(&mut out, arg, &key, value).map_err(|e| invalid(e.to_string()))?;
        }
    }
    Ok(out)
}

/// The config file's mapping; None for an empty file (a valid, if pointless, config).
fn read_config_map(path: &PathBuf) -> Result<Option<serde_yaml::Mapping>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    match doc {
        serde_yaml::Value::Mapping(map) => Ok(Some(map)),
        serde_yaml::Value::Null => Ok(None),
        _ => Err(invalid("expected a mapping of flag names to values".into())),
    }
}

/// A config entry's value that no flag can take.
#[derive(Debug, thiserror::Error)]
enum BadValue {
    #[error("value of `{0}` must be a string, number, boolean or list of those")]
    NotScalar(String),
    #[error("`{0}` is a switch: use true or false")]
    NotSwitch(String),
}

/// Appends the arguments for one config entry: `--key=value` per value (a list repeats the
/// flag), or `--key` for a switch set to true.
fn push_flag(
    out: &mut Vec<OsString>,
    arg: &clap::Arg,
    key: &str,
    value: serde_yaml::Value,
) -> Result<(), BadValue> {
    let is_switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let values = match value {
        serde_yaml::Value::Sequence(items) => items,
        other => vec![other],
    };
    for item in values {
        let scalar = match item {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Number(n) => n.to_string(),
            _ => return Err(BadValue::NotScalar(key.to_string())),
        };
        if !is_switch {
            out.push(OsString::from(format!("--{key}={scalar}")));
            continue;
        }
        match scalar.as_str() {
            "true" => out.push(OsString::from(format!("--{key}"))),
            "false" => {}
            _ => return Err(BadValue::NotSwitch(key.to_string())),
        }
    }
    Ok(())
}

fn find_long<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::LogFormat;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn config_file_fills_what_flags_leave_unset() {
        let file =
            write_config("log-format: json\noutput: yaml\nroot: /from-file\nadmin-addr: 127.0.0.1:1\n");
        let cli = Cli::load_from([
            "spokelet".as_ref(),
            "inventory".as_ref(),
            "--root".as_ref(),
            "/from-flag".as_ref(),
            "--config".as_ref(),
            file.path().as_os_str(),
        ])
        .unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json, "global key from the file");
        let Command::Inventory(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(
            args.discovery.root,
            PathBuf::from("/from-flag"),
            "the flag beats the file"
        );
        assert_eq!(
            args.output,
            crate::inventory::OutputFormat::Yaml,
            "the file beats the default"
        );
        // `admin-addr` belongs to `run`: ignored here rather than rejected.
    }

    /// `spokelet --config FILE inventory`, with FILE holding `text`.
    fn inventory_with_config(text: &str) -> Result<Cli, ConfigError> {
        let file = write_config(text);
        Cli::load_from([
            "spokelet".as_ref(),
            "--config".as_ref(),
            file.path().as_os_str(),
            "inventory".as_ref(),
        ])
    }

    #[test]
    fn config_file_typos_are_rejected_by_name() {
        let err = inventory_with_config("log-formt: json\n").unwrap_err();
        assert!(err.to_string().contains("unknown key `log-formt`"), "{err}");
    }

    #[test]
    fn config_file_must_be_a_mapping_of_scalars() {
        for text in [
            "- a\n- b\n",
            "log-format: {a: b}\n",
            ": : :\n",
            "no-nvml: maybe\n",
        ] {
            let err = inventory_with_config(text).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{text:?}: {err}");
        }
    }

    #[test]
    fn config_file_switches_and_empty_files() {
        let cli = inventory_with_config("no-nvml: true\n").unwrap();
        let Command::Inventory(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert!(args.discovery.no_nvml);
        assert!(inventory_with_config("").is_ok(), "an empty config file is valid");
    }

    #[test]
    fn missing_config_file_names_the_path() {
        let err =
            Cli::load_from(["spokelet", "--config", "/nonexistent/spokelet.yaml", "inventory"]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/spokelet.yaml"), "{err}");
    }
}
