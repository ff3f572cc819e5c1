//! Prometheus metrics: what an operator watches. Every counter and gauge the service
//! updates is declared here, with its help text; `/metrics` encodes them.
//!
//! Updating a metric is an atomic add; nothing here blocks or allocates on the hot path
//! (label sets are `&'static str`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;

/// How a task ended (the `outcome` label of `report_service_tasks_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// A report was published.
    Answered,
    /// An error report was published (invalid phones).
    ErrorReport,
    /// The message was copied to the dead-letter queue (not a task).
    DeadLettered,
    /// Processing failed; the task was parked in a retry queue.
    Retried,
    /// Processing failed on every attempt; the task was dead-lettered.
    RetriesExhausted,
    /// The session failed under the task; it was requeued.
    Requeued,
    /// A redelivery from a queue that counts deliveries, put back as a fresh copy.
    Renewed,
    /// The channel died before the task could be settled; the broker redelivers it.
    Abandoned,
}

impl Outcome {
    /// The label value, as Prometheus shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::ErrorReport => "error_report",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Retried => "retried",
            Outcome::RetriesExhausted => "retries_exhausted",
            Outcome::Requeued => "requeued",
            Outcome::Renewed => "renewed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Where a phone's statistics came from (the `source` label of
/// `report_service_phones_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// Cache hit.
    Cache,
    /// Cache miss computed by this task.
    Computed,
    /// Cache miss joined to another task's computation of the same phone.
    Shared,
    /// A phone with no records: nothing to compute or cache.
    NoRecords,
}

impl Source {
    /// The label value, as Prometheus shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Computed => "computed",
            Source::Shared => "shared",
            Source::NoRecords => "no_records",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: Source,
}

/// The `reason` label of `report_service_dead_lettered_total`: the dead-letter reason
/// code (`not_json`, `too_deep`, `retries_exhausted`, `undecodable`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// What happened to a persisted index (the `event` label of
/// `report_service_index_files_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum IndexEvent {
    /// A data file's index was read from its index file.
    Loaded,
    /// A data file was indexed by scanning it (no index file yet).
    Built,
    /// An index file could not be used (another version of the data file, another
    /// format, torn, damaged): the data file was indexed anew.
    Refused,
    /// An index file was written.
    Written,
    /// Writing an index file failed.
    WriteFailed,
    /// An index file of a data file that no longer exists was removed.
    Removed,
}

impl IndexEvent {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexEvent::Loaded => "loaded",
            IndexEvent::Built => "built",
            IndexEvent::Refused => "refused",
            IndexEvent::Written => "written",
            IndexEvent::WriteFailed => "write_failed",
            IndexEvent::Removed => "removed",
        }
    }
}

impl EncodeLabelValue for IndexEvent {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IndexEventLabel {
    event: IndexEvent,
}

/// The `node` label of `report_service_broker_connected`: `host:port` of a broker node
/// (never a URL: no user, no password).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// All of the service's metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tasks: Family<OutcomeLabel, Counter>,
    phones: Family<SourceLabel, Counter>,
    dead_lettered: Family<ReasonLabel, Counter>,
    broker_connected: Family<NodeLabel, Gauge>,
    index_files: Family<IndexEventLabel, Counter>,
    /// The node `broker_connected` shows as 1, if any: set by the consume loop only.
    connected_node: parking_lot::Mutex<Option<String>>,
    /// `report_service_report_latency_seconds`.
    pub report_latency: Histogram,
    /// `report_service_tasks_in_flight`.
    pub tasks_in_flight: Gauge,
    /// `report_service_index_build_seconds`.
    pub index_build_seconds: Gauge<f64, AtomicU64>,
    /// `report_service_cache_entries`.
    pub cache_entries: Gauge,
    /// `report_service_cache_max_entries` (`CACHE_MAX_ENTRIES`).
    pub cache_max_entries: Gauge,
    /// `report_service_memory_bound_bytes`: the heap the settings and the data imply.
    pub memory_bound_bytes: Gauge,
    /// `report_service_heap_resident_bytes`: resident anonymous memory, read at scrape.
    pub heap_resident_bytes: Gauge,
    /// `report_service_ready`: 1 when `/health` answers 200, set at scrape.
    pub ready: Gauge,
    /// `report_service_data_unserved_seconds`: how long the data path has held other
    /// data than is served (0 when they agree).
    pub data_unserved_seconds: Gauge<f64, AtomicU64>,
    /// `report_service_snapshot_writes_total`.
    pub snapshot_writes: Counter,
    /// `report_service_snapshot_failures_total`.
    pub snapshot_failures: Counter,
    /// `report_service_broker_reconnects_total`.
    pub reconnects: Counter,
    /// `report_service_reply_to_refused_total`.
    pub reply_to_refused: Counter,
    /// `report_service_undecodable_deliveries_total`.
    pub undecodable: Counter,
    /// `report_service_consumer_stuck`.
    pub consumer_stuck: Gauge,
    /// `report_service_data_reloads_total`.
    pub data_reloads: Counter,
    /// `report_service_data_reload_failures_total`.
    pub data_reload_failures: Counter,
    /// `report_service_data_bytes`.
    pub data_bytes: Gauge,
    /// `report_service_data_records`.
    pub data_records: Gauge,
    /// `report_service_data_phones`.
    pub data_phones: Gauge,
    /// `report_service_data_segments`.
    pub data_segments: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under the `report_service_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("report_service");
        let metrics = Metrics {
            tasks: Family::default(),
            phones: Family::default(),
            dead_lettered: Family::default(),
            broker_connected: Family::default(),
            index_files: Family::default(),
            connected_node: parking_lot::Mutex::new(None),
            // 50 us .. ~3.3 s
            report_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            tasks_in_flight: Gauge::default(),
            index_build_seconds: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_max_entries: Gauge::default(),
            memory_bound_bytes: Gauge::default(),
            heap_resident_bytes: Gauge::default(),
            ready: Gauge::default(),
            data_unserved_seconds: Gauge::default(),
            snapshot_writes: Counter::default(),
            snapshot_failures: Counter::default(),
            reconnects: Counter::default(),
            reply_to_refused: Counter::default(),
            undecodable: Counter::default(),
            consumer_stuck: Gauge::default(),
            data_reloads: Counter::default(),
            data_reload_failures: Counter::default(),
            data_bytes: Gauge::default(),
            data_records: Gauge::default(),
            data_phones: Gauge::default(),
            data_segments: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("tasks", "Tasks handled, by outcome", metrics.tasks.clone());
        registry.register("phones", "Phones reported, by where their statistics came from", metrics.phones.clone());
        registry.register(
            "dead_lettered",
            "Messages copied to the dead-letter queue, by reason",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "report_latency_seconds",
            "Seconds from receipt of a task to its report being ready to publish",
            metrics.report_latency.clone(),
        );
        registry.register(
            "tasks_in_flight",
            "Tasks received and not yet acked or requeued",
            metrics.tasks_in_flight.clone(),
        );
        registry.register(
            "index_build_seconds",
            "Seconds the last data.json validation and indexing took",
            metrics.index_build_seconds.clone(),
        );
        registry.register("cache_entries", "Phones in the statistics cache", metrics.cache_entries.clone());
        registry.register(
            "cache_max_entries",
            "The most phones the cache holds (CACHE_MAX_ENTRIES)",
            metrics.cache_max_entries.clone(),
        );
        registry.register(
            "memory_bound_bytes",
            "Heap the settings and the data imply: index heap, a full cache, and a fixed allowance",
            metrics.memory_bound_bytes.clone(),
        );
        registry.register(
            "heap_resident_bytes",
            "Resident anonymous memory of the process (RssAnon: the heap, not the mapped data)",
            metrics.heap_resident_bytes.clone(),
        );
        registry.register(
            "ready",
            "1 when /health answers 200 (indexed, consuming, not stuck), else 0",
            metrics.ready.clone(),
        );
        registry.register(
            "data_unserved_seconds",
            "Seconds the data path has held other data than is served (a change not yet indexed, or refused)",
            metrics.data_unserved_seconds.clone(),
        );
        registry.register(
            "index_files",
            "Persisted indexes of data files: loaded, built, refused, written, write_failed, removed",
            metrics.index_files.clone(),
        );
        registry.register("snapshot_writes", "Cache snapshots written", metrics.snapshot_writes.clone());
        registry.register("snapshot_failures", "Cache snapshot writes that failed", metrics.snapshot_failures.clone());
        registry.register(
            "broker_reconnects",
            "Reconnections to the broker after a lost connection",
            metrics.reconnects.clone(),
        );
        registry.register(
            "broker_connected",
            "1 for the broker node (host:port) the consumer is attached to, 0 for nodes it was attached to before",
            metrics.broker_connected.clone(),
        );
        registry.register(
            "reply_to_refused",
            "Tasks whose reply_to named one of the service's own queues (answered to the report queue)",
            metrics.reply_to_refused.clone(),
        );
        registry.register(
            "undecodable_deliveries",
            "Connections lost to a message the AMQP client cannot decode",
            metrics.undecodable.clone(),
        );
        registry.register(
            "consumer_stuck",
            "1 while an undecodable message blocks the task queue, else 0",
            metrics.consumer_stuck.clone(),
        );
        registry.register(
            "data_reloads",
            "Changes of the data (a new data.json, or segments added, replaced or removed) indexed and served",
            metrics.data_reloads.clone(),
        );
        registry.register(
            "data_reload_failures",
            "New data files or segments that could not be indexed",
            metrics.data_reload_failures.clone(),
        );
        registry.register("data_bytes", "Size of the data being served", metrics.data_bytes.clone());
        registry.register("data_records", "Records in the data being served", metrics.data_records.clone());
        registry.register("data_phones", "Distinct phones in the data being served", metrics.data_phones.clone());
        registry.register("data_segments", "Files (segments) of the data being served", metrics.data_segments.clone());
        Metrics { registry, ..metrics }
    }

    /// Counts `n` tasks that ended with `outcome`.
    pub fn tasks_ended(&self, outcome: Outcome, n: u64) {
        self.tasks.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
    }

    /// Counts one task that ended with `outcome`.
    pub fn task(&self, outcome: Outcome) {
        self.tasks_ended(outcome, 1);
    }

    /// Counts `n` messages dead-lettered for `reason` (a dead-letter reason code).
    pub fn dead_lettered_as(&self, reason: &'static str, n: u64) {
        self.dead_lettered.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// Counts `count` phones reported from `source`.
    pub fn phones_from(&self, source: Source, count: u64) {
        if count > 0 {
            self.phones.get_or_create(&SourceLabel { source }).inc_by(count);
        }
    }

    /// Counts `n` persisted-index events.
    pub fn index_files(&self, event: IndexEvent, n: u64) {
        if n > 0 {
            self.index_files.get_or_create(&IndexEventLabel { event }).inc_by(n);
        }
    }

    /// Persisted-index events so far, for tests and logs.
    pub fn index_files_with(&self, event: IndexEvent) -> u64 {
        self.index_files.get_or_create(&IndexEventLabel { event }).get()
    }

    /// The consumer is attached to `node` (`host:port`), or to none.
    pub fn broker_node(&self, node: Option<&str>) {
        let mut current = self.connected_node.lock();
        if let Some(previous) = current.take() {
            self.broker_connected.get_or_create(&NodeLabel { node: previous }).set(0);
        }
        if let Some(node) = node {
            self.broker_connected.get_or_create(&NodeLabel { node: node.to_owned() }).set(1);
            *current = Some(node.to_owned());
        }
    }

    /// The node (`host:port`) the consumer is attached to now, if any.
    pub fn broker_node_now(&self) -> Option<String> {
        self.connected_node.lock().clone()
    }

    /// A counter's current value, for tests and logs.
    pub fn tasks_with(&self, outcome: Outcome) -> u64 {
        self.tasks.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// Phones reported from `source` so far, for tests and logs.
    pub fn phones_with(&self, source: Source) -> u64 {
        self.phones.get_or_create(&SourceLabel { source }).get()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_metric_is_exposed() {
        let metrics = Metrics::new();
        metrics.task(Outcome::Answered);
        metrics.phones_from(Source::Cache, 3);
        metrics.broker_node(Some("rabbit-1:5672"));
        metrics.broker_node(Some("rabbit-2:5672"));
        metrics.index_files(IndexEvent::Loaded, 2);
        let text = metrics.encode();
        for name in [
            "report_service_tasks_total{outcome=\"answered\"} 1",
            "report_service_phones_total{source=\"cache\"} 3",
            "report_service_report_latency_seconds_bucket",
            "report_service_index_build_seconds",
            "report_service_cache_entries",
            "report_service_snapshot_writes_total",
            "report_service_snapshot_failures_total",
            "report_service_broker_reconnects_total",
            "report_service_reply_to_refused_total",
            "report_service_undecodable_deliveries_total",
            "report_service_consumer_stuck",
            "report_service_data_reloads_total",
            "report_service_data_reload_failures_total",
            "report_service_data_records",
            "report_service_broker_connected{node=\"rabbit-1:5672\"} 0",
            "report_service_broker_connected{node=\"rabbit-2:5672\"} 1",
            "report_service_index_files_total{event=\"loaded\"} 2",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
