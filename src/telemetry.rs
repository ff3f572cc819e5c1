//! Logging: JSON lines through `tracing`, filtered by `RUST_LOG`.
//!
//! Events are flattened, so a field written as `event = "..."` appears as a top-level
//! `"event"` key (the readiness line operators grep for).

use tracing_subscriber::EnvFilter;

/// Where log lines go: the worker logs to stdout (as containers expect); commands whose
/// stdout is their output (`report`) log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid RUST_LOG={filter:?}: {reason}")]
pub struct LogFilterError {
    pub filter: String,
    pub reason: String,
}

/// Installs the JSON subscriber. A second call (tests) is a no-op.
pub fn init(filter: &str, target: LogTarget) -> Result<(), LogFilterError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|e| LogFilterError { filter: filter.to_owned(), reason: e.to_string() })?;
    let builder = tracing_subscriber::fmt().json().flatten_event(true).with_current_span(false).with_span_list(false);
    let _ = match target {
        LogTarget::Stdout => builder.with_env_filter(env_filter).with_writer(std::io::stdout).try_init(),
        LogTarget::Stderr => builder.with_env_filter(env_filter).with_writer(std::io::stderr).try_init(),
    };
    Ok(())
}
