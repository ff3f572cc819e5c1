//! Prometheus metrics: what an operator watches. Every counter and gauge the service
//! updates is declared here, with its help text; `/metrics` encodes them.
//!
//! Updating a metric is an atomic add; nothing here blocks or allocates on the hot path
//! (label sets are `&'static str`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// How a task ended (the `outcome` label of `report_service_tasks_total`).
pub mod outcome {
    pub const ANSWERED: &str = "answered";
    pub const ERROR_REPORT: &str = "error_report";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// The session failed under the task; it was requeued.
    pub const REQUEUED: &str = "requeued";
    /// Processing failed; the task was parked in a retry queue.
    pub const RETRIED: &str = "retried";
    /// Processing failed on every attempt; the task was dead-lettered.
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    /// The channel died before the task could be acked; the broker redelivers it.
    pub const ABANDONED: &str = "abandoned";
}

/// Where a phone's statistics came from (the `source` label of `report_service_phones_total`).
pub mod source {
    /// Cache hit.
    pub const CACHE: &str = "cache";
    /// Cache miss computed by this task.
    pub const COMPUTED: &str = "computed";
    /// Cache miss joined to another task's computation of the same phone.
    pub const SHARED: &str = "shared";
    /// A phone with no records: nothing to compute or cache.
    pub const NO_RECORDS: &str = "no_records";
}

/// All of the service's metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub tasks: Family<OutcomeLabel, Counter>,
    pub phones: Family<SourceLabel, Counter>,
    pub dead_lettered: Family<ReasonLabel, Counter>,
    pub report_latency: Histogram,
    pub tasks_in_flight: Gauge,
    pub index_build_seconds: Gauge<f64, AtomicU64>,
    pub cache_entries: Gauge,
    pub snapshot_writes: Counter,
    pub snapshot_failures: Counter,
    pub reconnects: Counter,
    pub reply_to_refused: Counter,
    pub undecodable: Counter,
    pub consumer_stuck: Gauge,
    pub data_reloads: Counter,
    pub data_reload_failures: Counter,
    pub data_bytes: Gauge,
    pub data_records: Gauge,
    pub data_phones: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("report_service");
        let metrics = Metrics {
            tasks: Family::default(),
            phones: Family::default(),
            dead_lettered: Family::default(),
            // 50 us .. ~3.3 s
            report_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            tasks_in_flight: Gauge::default(),
            index_build_seconds: Gauge::default(),
            cache_entries: Gauge::default(),
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
        registry.register("snapshot_writes", "Cache snapshots written", metrics.snapshot_writes.clone());
        registry.register("snapshot_failures", "Cache snapshot writes that failed", metrics.snapshot_failures.clone());
        registry.register(
            "broker_reconnects",
            "Reconnections to the broker after a lost connection",
            metrics.reconnects.clone(),
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
            "Replacements of data.json indexed and swapped in",
            metrics.data_reloads.clone(),
        );
        registry.register(
            "data_reload_failures",
            "Replacements of data.json that could not be indexed",
            metrics.data_reload_failures.clone(),
        );
        registry.register("data_bytes", "Size of the data.json being served", metrics.data_bytes.clone());
        registry.register("data_records", "Records in the data.json being served", metrics.data_records.clone());
        registry.register("data_phones", "Distinct phones in the data.json being served", metrics.data_phones.clone());
        Metrics { registry, ..metrics }
    }

    pub fn task(&self, outcome: &'static str) {
        self.tasks.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn phones_from(&self, source: &'static str, count: u64) {
        if count > 0 {
            self.phones.get_or_create(&SourceLabel { source }).inc_by(count);
        }
    }

    /// A counter's current value, for tests and logs.
    pub fn tasks_with(&self, outcome: &'static str) -> u64 {
        self.tasks.get_or_create(&OutcomeLabel { outcome }).get()
    }

    pub fn phones_with(&self, source: &'static str) -> u64 {
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
        metrics.task(outcome::ANSWERED);
        metrics.phones_from(source::CACHE, 3);
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
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
