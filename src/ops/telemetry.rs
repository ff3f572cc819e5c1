//! Logging: JSON lines through `tracing`, filtered by `RUST_LOG`.
//!
//! Events are flattened, so a field written as `event = "..."` appears as a top-level
//! `"event"` key (the readiness line operators grep for). Every line logged while a
//! task is handled carries that task's span, `"span":{"name":"task","delivery_tag":..,
//! "correlation_id":..}`, so the id a client knows finds every line about its task.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Where log lines go: the worker logs to stdout (as containers expect); commands whose
/// stdout is their output (`report`) log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A `RUST_LOG` value that is not a filter.
#[derive(Debug, thiserror::Error)]
#[error("invalid RUST_LOG={filter:?}: {reason}")]
pub struct LogFilterError {
    /// The value.
    pub filter: String,
    /// The parser's complaint.
    pub reason: String,
}

/// Installs the JSON subscriber. A second call (tests) is a no-op.
pub fn init(filter: &str, target: LogTarget) -> Result<(), LogFilterError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|e| LogFilterError { filter: filter.to_owned(), reason: e.to_string() })?;
    // `set_global_default` fails only when a subscriber is already installed: the first
    // one stays, as documented above.
    let _ = match target {
        LogTarget::Stdout => tracing::subscriber::set_global_default(json_lines(env_filter, std::io::stdout)),
        LogTarget::Stderr => tracing::subscriber::set_global_default(json_lines(env_filter, std::io::stderr)),
    };
    Ok(())
}

/// The one log format: flattened JSON events with the innermost span's fields.
fn json_lines<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_logged_for_a_task_carries_its_correlation_id() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = json_lines(EnvFilter::new("info"), move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("task", delivery_tag = 7u64, correlation_id = "42");
            let _entered = span.enter();
            tracing::warn!(event = "report_not_published", "the report was not published");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["event"], "report_not_published");
        assert_eq!(line["span"]["name"], "task");
        assert_eq!(line["span"]["correlation_id"], "42");
        assert_eq!(line["span"]["delivery_tag"], 7);
    }
}
