//! Logging set-up: `tracing` to stderr as human text or JSON lines.

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event (the default on a terminal or in journald).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines in clusters.
    Json,
}

/// Errors while installing the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directive did not parse (e.g. `--log-level spokelet=loud`).
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed (only possible when embedded).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The logging flags every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter, `tracing` directive syntax (e.g. `info`, `spokelet=debug,kube=warn`).
    #[arg(long, env = "SPOKELET_LOG", global = true, default_value = "info")]
    pub log_level: String,

    /// Log line format (logs go to stderr).
    #[arg(long, env = "SPOKELET_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// [`init`] with these settings.
    pub fn init(&self) -> Result<(), TelemetryError> {
        init(&self.log_level, self.log_format)
    }
}

/// Install the global subscriber. Logs go to stderr so that stdout stays clean
/// for command output (`spokelet inventory --output json | jq`).
pub fn init(filter: &str, format: LogFormat) -> Result<(), TelemetryError> {
    let filter_layer = EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_string(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter_layer);
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(true))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filter_is_a_clear_error() {
        let err = init("spokelet=[[", LogFormat::Text).unwrap_err();
        assert!(err.to_string().contains("invalid log filter"), "{err}");
    }
}
