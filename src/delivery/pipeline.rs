//! The task pipeline: one delivery in, one confirmed answer out, then the ack.
//!
//! [`Pipeline::handle`] turns one delivery into a report (or an error report, or a
//! dead-letter copy), waits for the broker to confirm it, then settles the delivery;
//! [`disposition`] is the single place that decides ack, retry or requeue. How deliveries
//! arrive (sessions, reconnects, shutdown) is the `consumer`'s business. CPU work goes to
//! the worker pool; this module only awaits.

use super::topology::Topology;
use crate::broker::{self, BrokerError, Publisher, Routed};
use crate::delivery::outgoing::{self, Origin, Reason};
use crate::delivery::retry::{self, NextStep, RetryPolicy};
use crate::engine::{Engine, EngineError};
use crate::message::{Limits, Rejection, Report, Task, complete_report_json, format_timestamp, parse_task};
use crate::ops::metrics::{Metrics, Outcome};
use crate::platform::pool::{Abandoned, WorkerPool};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::types::ShortString;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::{Instrument, debug, error, info, warn};

/// Bodies above this size (about 300 phones and up) are heavy: their task runs beside the
/// consume loop, as a runtime task of its own.
const HEAVY_BODY_BYTES: usize = 4 * 1024;
/// Bodies above this size are parsed on the pool rather than the async runtime.
const BULKY_BODY_BYTES: usize = 64 * 1024;
/// Reports with more phones than this are built and serialised on the pool.
const OFFLOAD_PHONES: usize = 256;

/// How much work a delivery's body makes, and so where it runs (the body's size is all
/// that is known before it is parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// A few phones, or a body over `MAX_TASK_BYTES` (dead-lettered unread): the task runs
    /// in the consume loop and parses in place.
    Light,
    /// Hundreds of phones: a runtime task of its own, parsed in place (beside the consume
    /// loop when the runtime has more than one thread; its cache lookups and index reads
    /// go to the pool whatever it has, see `engine::lookup::POOL_LOOKUP_PHONES`).
    Heavy,
    /// Thousands: a task of its own, parsed on the worker pool.
    Bulky,
}

impl Weight {
    /// The weight of a body of `bytes`.
    pub fn of(bytes: usize, limits: Limits) -> Weight {
        match bytes {
            _ if bytes > limits.max_task_bytes => Weight::Light,
            _ if bytes > BULKY_BODY_BYTES => Weight::Bulky,
            _ if bytes > HEAVY_BODY_BYTES => Weight::Heavy,
            _ => Weight::Light,
        }
    }
}

/// How a task was answered. Every variant means the broker confirmed the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// A report was published.
    Answered {
        /// Whether a queue took it.
        routed: Routed,
    },
    /// An error report was published.
    ErrorReported {
        /// The error code it carries.
        code: &'static str,
        /// Whether a queue took it.
        routed: Routed,
    },
    /// The message was copied to the dead-letter queue.
    DeadLettered {
        /// The reason code (`x-rejection-reason`).
        reason: &'static str,
        /// For a person.
        detail: String,
    },
}

/// Why a task could not be answered this time.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The statistics could not be produced (the data changed under the index, a
    /// computation died).
    #[error("statistics unavailable: {0}")]
    Engine(#[from] EngineError),
    /// The broker refused the answer (a nack: e.g. the target queue is full and rejects
    /// publishes).
    #[error("the broker refused the answer: {0}")]
    Refused(BrokerError),
    /// A bug: processing panicked (with this message).
    #[error("processing panicked: {0}")]
    Panicked(String),
    /// A job handed to the worker pool (parsing a large body, building a large report)
    /// died there.
    #[error("{0}")]
    Abandoned(#[from] Abandoned),
    /// The session failed under the task (a timeout, a closed channel, an answer the
    /// broker could not route to the service's own queue).
    #[error("the broker session failed: {0}")]
    Session(BrokerError),
}

impl From<BrokerError> for Failure {
    fn from(error: BrokerError) -> Failure {
        if error.breaks_session() { Failure::Session(error) } else { Failure::Refused(error) }
    }
}

/// What happens to the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it: answered, or dead-lettered.
    Ack,
    /// Try it again later: republish it to a retry queue (or, after its last attempt,
    /// to the DLQ), then ack it.
    Retry,
    /// Give it back to the broker now, and reconnect.
    Requeue,
}

/// The ack decision for every outcome, in one place.
///
/// - Answered, error-reported or dead-lettered: the answer (or the copy) is confirmed
///   by the broker, so the task is done: **ack**. A report confirmed as unroutable to a
///   client's `reply_to` (the queue is gone, so is its client) is acked too:
///   redelivering it would only loop.
/// - The task itself failed (the engine failed, the broker refused the answer, the
///   processing panicked): **retry** after a growing delay, counted in the message, and
///   dead-lettered as `retries_exhausted` after `MAX_ATTEMPTS` (see `retry`). Never a hot
///   requeue loop.
/// - The session failed (a timeout, a closed channel, an answer lost on its way to the
///   service's own report queue or DLQ): the task is not at fault and nothing is acked
///   before its answer is safe, so **requeue** it and reconnect (which redeclares the
///   queues). If the channel is gone the nack fails as well, and the broker requeues the
///   delivery itself when it sees the channel close.
///
/// Nothing is ever rejected without requeue: a message we cannot use is first copied to
/// the dead-letter queue, then acked.
pub fn disposition(result: &Result<Handled, Failure>) -> Disposition {
    match result {
        Ok(Handled::Answered { .. } | Handled::ErrorReported { .. } | Handled::DeadLettered { .. }) => Disposition::Ack,
        Err(Failure::Engine(_) | Failure::Refused(_) | Failure::Panicked(_) | Failure::Abandoned(_)) => {
            Disposition::Retry
        }
        Err(Failure::Session(_)) => Disposition::Requeue,
    }
}

/// Where a report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination<'a> {
    /// The service's report queue: it must take the report.
    ReportQueue,
    /// The client's own queue: if it is gone, so is the client.
    ReplyTo(&'a str),
}

/// Everything a task needs besides its delivery and the session's publisher.
#[derive(Debug)]
pub struct Pipeline {
    /// Statistics and the cache.
    pub engine: Engine,
    /// For parsing large bodies and building large reports.
    pub pool: WorkerPool,
    /// What a task may be.
    pub limits: Limits,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// How often and how long after a failure a task is tried again.
    pub retry: RetryPolicy,
    /// Which queues are whose.
    pub topology: Topology,
    /// This instance's name, in dead-letter headers (`x-rejected-by`).
    pub instance: String,
}

/// When a delivery arrived: wall time for the report, a monotonic start for durations.
#[derive(Debug, Clone, Copy)]
struct Received {
    at: SystemTime,
    started: Instant,
}

/// Counts a task in flight for as long as it lives, however it ends (a panic, an abort).
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> InFlight<'a> {
        metrics.tasks_in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.tasks_in_flight.dec();
    }
}

impl Pipeline {
    /// Answers one delivery and acks, retries or requeues it. An error means the session
    /// must not be trusted any more: the caller reconnects.
    pub async fn handle(&self, delivery: Delivery, publisher: &Publisher) -> Result<(), SessionBroken> {
        // Every log line of the task carries its correlation id (recorded once the body
        // is parsed, or from the AMQP property until then) and its delivery tag.
        let property = delivery.properties.correlation_id().as_ref().map(|id| id.as_str().to_owned());
        let span = tracing::info_span!("task", delivery_tag = delivery.delivery_tag, correlation_id = property);
        self.handle_in_span(delivery, publisher).instrument(span).await
    }

    async fn handle_in_span(&self, delivery: Delivery, publisher: &Publisher) -> Result<(), SessionBroken> {
        let _in_flight = InFlight::new(&self.metrics);
        if retry::delivery_count(&delivery.properties) >= retry::RENEW_AT_DELIVERY_COUNT {
            match self.renew(&delivery, publisher).await {
                Ok(()) => return Ok(()),
                Err(error) if error.breaks_session() => {
                    // The session is going away; if this nack fails too, closing the
                    // channel requeues the delivery all the same.
                    let _ = broker::requeue(&delivery).await;
                    return Err(SessionBroken(error.to_string()));
                }
                // The task queue refused the copy (e.g. full): answer this delivery as it is.
                Err(error) => debug!(%error, "cannot renew a redelivered task; handling it as it is"),
            }
        }
        let received = Received { at: SystemTime::now(), started: Instant::now() };
        let result = match AssertUnwindSafe(self.process(&delivery, publisher, received)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(Failure::Panicked(panic_message(&*panic))),
        };
        let tag = delivery.delivery_tag;
        let applied = match disposition(&result) {
            Disposition::Ack => broker::ack(&delivery).await,
            Disposition::Retry => self.retry_later(&delivery, publisher, &result).await,
            Disposition::Requeue => broker::requeue(&delivery).await,
        };
        let micros = received.started.elapsed().as_micros() as u64;
        match (&result, &applied) {
            (Ok(Handled::Answered { routed }), Ok(())) => {
                self.metrics.task(Outcome::Answered);
                debug!(delivery_tag = tag, micros, "report published");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::ErrorReported { code, routed }), Ok(())) => {
                self.metrics.task(Outcome::ErrorReport);
                info!(delivery_tag = tag, code, "error report published for a task with bad phones");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::DeadLettered { reason, detail }), Ok(())) => {
                self.metrics.task(Outcome::DeadLettered);
                warn!(
                    delivery_tag = tag,
                    reason,
                    detail = detail.as_str(),
                    bytes = delivery.data.len(),
                    "message dead-lettered"
                );
            }
            (Err(Failure::Session(error)), Ok(())) => {
                self.metrics.task(Outcome::Requeued);
                warn!(delivery_tag = tag, %error, "task requeued: the broker session failed under it");
            }
            (Err(_), Ok(())) => {} // logged and counted by `retry_later`
            (_, Err(error)) => {
                self.metrics.task(Outcome::Abandoned);
                warn!(delivery_tag = tag, %error, "cannot settle the task; the broker will redeliver it");
            }
        }
        match (result, applied) {
            (Err(Failure::Session(error)), _) => Err(SessionBroken(error.to_string())),
            (_, Err(error)) if error.breaks_session() => Err(SessionBroken(error.to_string())),
            _ => Ok(()),
        }
    }

    async fn process(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        received: Received,
    ) -> Result<Handled, Failure> {
        let task = match self.parse(delivery).await? {
            Ok(task) => {
                tracing::Span::current().record("correlation_id", task.correlation_id.as_property());
                task
            }
            Err(rejection) => {
                let reason = rejection.code();
                self.dead_letter(delivery, publisher, reason, rejection.to_string(), None).await?;
                return Ok(Handled::DeadLettered { reason, detail: rejection.to_string() });
            }
        };
        let destination = self.destination(delivery.properties.reply_to().as_ref());
        let id = task.correlation_id.as_property().to_owned();
        match task.phones {
            Err(invalid) => {
                let report = Report::error(task.correlation_id, received.at, &invalid, received.started.elapsed());
                self.metrics.report_latency.observe(received.started.elapsed().as_secs_f64());
                let routed = self.publish_report(publisher, destination, &report.to_json(), &id).await?;
                Ok(Handled::ErrorReported { code: invalid.code(), routed })
            }
            Ok(phones) => {
                let answers = self.engine.stats(&phones).await?;
                let offload = phones.len() > OFFLOAD_PHONES;
                let build = move || {
                    let entries = answers.iter().map(|a| &a.json[..]);
                    complete_report_json(&task.correlation_id, received.at, entries, || received.started.elapsed())
                };
                let body = if offload { self.pool.run(build).await? } else { build() };
                self.metrics.report_latency.observe(received.started.elapsed().as_secs_f64());
                let routed = self.publish_report(publisher, destination, &body, &id).await?;
                Ok(Handled::Answered { routed })
            }
        }
    }

    /// Parses the body (bulky ones on the pool).
    async fn parse(&self, delivery: &Delivery) -> Result<Result<Task, Rejection>, Abandoned> {
        let property_id = delivery.properties.correlation_id().as_ref().map(|id| id.as_str());
        let limits = self.limits;
        if Weight::of(delivery.data.len(), limits) != Weight::Bulky {
            return Ok(parse_task(&delivery.data, property_id, limits));
        }
        let (body, property_id) = (delivery.data.clone(), property_id.map(str::to_owned));
        self.pool.run(move || parse_task(&body, property_id.as_deref(), limits)).await
    }

    /// A client's `reply_to`, unless it is empty or names a queue the service consumes
    /// from or parks messages in (which would feed reports back in as tasks): those
    /// reports go to the report queue.
    fn destination<'a>(&self, reply_to: Option<&'a ShortString>) -> Destination<'a> {
        match reply_to.map(ShortString::as_str) {
            None | Some("") => Destination::ReportQueue,
            Some(queue) if self.topology.is_own_input(queue) => {
                self.metrics.reply_to_refused.inc();
                warn!(
                    reply_to = queue,
                    "reply_to names one of the service's own queues; answering to the report queue"
                );
                Destination::ReportQueue
            }
            Some(queue) => Destination::ReplyTo(queue),
        }
    }

    async fn publish_report(
        &self,
        publisher: &Publisher,
        destination: Destination<'_>,
        body: &[u8],
        correlation_id: &str,
    ) -> Result<Routed, BrokerError> {
        let properties = outgoing::report_properties(correlation_id);
        match destination {
            Destination::ReplyTo(queue) => publisher.publish(queue, body, properties).await,
            Destination::ReportQueue => {
                publisher.publish_to_own(&self.topology.report_queue, body, properties).await.map(|()| Routed::Queued)
            }
        }
    }

    /// Copies the delivery to the DLQ (confirmed, and routed there).
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        code: &'static str,
        detail: String,
        attempts: Option<u32>,
    ) -> Result<(), BrokerError> {
        let origin = Origin {
            queue: &self.topology.task_queue,
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            redelivered: delivery.redelivered,
        };
        let reason = Reason { code, detail, at: format_timestamp(SystemTime::now()), by: &self.instance, attempts };
        let properties = outgoing::dead_letter_properties(&delivery.properties, origin, &reason);
        publisher.publish_to_own(&self.topology.dead_letter_queue, &delivery.data, properties).await?;
        self.metrics.dead_lettered_as(code, 1);
        Ok(())
    }

    /// Puts a redelivered task back at the tail of the task queue as a fresh copy
    /// (publisher-confirmed), then acks the redelivery: a queue that counts deliveries (a
    /// quorum queue, whose delivery limit drops a message redelivered too often) starts
    /// counting it again from zero. Its attempts (`x-attempts`) are kept, so failures are
    /// still counted by the retry policy; only interruptions (lost sessions, shutdowns,
    /// sweeps) are forgiven.
    async fn renew(&self, delivery: &Delivery, publisher: &Publisher) -> Result<(), BrokerError> {
        let properties = outgoing::renewed_properties(&delivery.properties);
        publisher.publish_to_own(&self.topology.task_queue, &delivery.data, properties).await?;
        broker::ack(delivery).await?;
        self.metrics.task(Outcome::Renewed);
        info!(
            delivery_tag = delivery.delivery_tag,
            delivery_count = retry::delivery_count(&delivery.properties),
            "redelivered task put back as a fresh copy, so the queue's delivery limit never drops it"
        );
        Ok(())
    }

    /// Parks a failed task in a retry queue, or dead-letters it after its last attempt,
    /// then acks it. If that cannot be done the task is requeued: at once when the
    /// session failed (the caller reconnects), after the retry delay when the broker
    /// refused the copy (so a refusing broker never sees a hot loop).
    async fn retry_later(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        result: &Result<Handled, Failure>,
    ) -> Result<(), BrokerError> {
        let failure = match result {
            Err(failure) => failure.to_string(),
            Ok(_) => String::from("no failure"),
        };
        let tag = delivery.delivery_tag;
        let step = self.retry.after_failure(retry::attempts_of(&delivery.properties));
        let parked = match step {
            NextStep::Retry { attempts, delay } => {
                let queue = retry::queue_name(&self.topology.task_queue, delay);
                let properties = outgoing::retry_properties(&delivery.properties, attempts);
                let parked = publisher.publish_to_own(&queue, &delivery.data, properties).await;
                if parked.is_ok() {
                    self.metrics.task(Outcome::Retried);
                    warn!(
                        delivery_tag = tag,
                        attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        failure,
                        "task failed; retrying later"
                    );
                }
                parked
            }
            NextStep::GiveUp { attempts } => {
                let parked =
                    self.dead_letter(delivery, publisher, "retries_exhausted", failure.clone(), Some(attempts)).await;
                if parked.is_ok() {
                    self.metrics.task(Outcome::RetriesExhausted);
                    error!(delivery_tag = tag, attempts, failure, "task failed on every attempt; dead-lettered");
                }
                parked
            }
        };
        match parked {
            Ok(()) => broker::ack(delivery).await,
            Err(error) if error.breaks_session() => {
                // The session is going away; if this nack fails too, closing the channel
                // requeues the delivery all the same.
                let _ = broker::requeue(delivery).await;
                Err(error)
            }
            Err(error) => {
                let wait = self.retry.delay(1);
                warn!(delivery_tag = tag, %error, wait_ms = wait.as_millis() as u64, "cannot park the failed task; requeueing it after a pause");
                tokio::time::sleep(wait).await;
                broker::requeue(delivery).await
            }
        }
    }
}

/// A task found its session broken (why, for the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SessionBroken(pub String);

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    crate::message::clip_detail(text)
}

fn warn_unroutable(routed: Routed, delivery: &Delivery) {
    if routed == Routed::Unroutable {
        let reply_to = delivery.properties.reply_to().as_ref().map(|q| q.as_str().to_owned());
        warn!(reply_to, "report confirmed but unroutable: no queue of that name (has the client gone?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::StaleData;

    #[test]
    fn a_body_is_heavy_from_4_kib_bulky_from_64_kib_and_light_again_over_the_limit() {
        let limits = Limits { max_task_bytes: 1 << 20, max_phones: 100_000 };
        let weights = [
            (0, Weight::Light),
            (4096, Weight::Light),
            (4097, Weight::Heavy),
            (65_536, Weight::Heavy),
            (65_537, Weight::Bulky),
            (1 << 20, Weight::Bulky),
            ((1 << 20) + 1, Weight::Light),
            (usize::MAX, Weight::Light),
        ];
        for (bytes, weight) in weights {
            assert_eq!(Weight::of(bytes, limits), weight, "{bytes} bytes");
        }
        // A limit below the thresholds: everything over it is read by nobody.
        let small = Limits { max_task_bytes: 1000, max_phones: 8 };
        assert_eq!(Weight::of(5000, small), Weight::Light);
    }

    #[test]
    fn confirmed_answers_are_acked_task_failures_retried_and_session_failures_requeued() {
        let answered = Ok(Handled::Answered { routed: Routed::Queued });
        let unroutable = Ok(Handled::Answered { routed: Routed::Unroutable });
        let error_report = Ok(Handled::ErrorReported { code: "invalid_phone", routed: Routed::Queued });
        let dead = Ok(Handled::DeadLettered { reason: "not_json", detail: String::new() });
        for result in [answered, unroutable, error_report, dead] {
            assert_eq!(disposition(&result), Disposition::Ack, "{result:?}");
        }
        let stale = Err(Failure::Engine(EngineError::Stale(StaleData::Changed)));
        let refused = Err(Failure::from(BrokerError::Nacked));
        let panicked = Err(Failure::Panicked("boom".into()));
        let abandoned = Err(Failure::Abandoned(Abandoned));
        for result in [stale, refused, panicked, abandoned] {
            assert_eq!(disposition(&result), Disposition::Retry, "{result:?}");
        }
        let timeout = Err(Failure::from(BrokerError::Timeout { operation: "publisher confirm" }));
        let lost = Err(Failure::from(BrokerError::Unroutable { queue: "ready_report".into() }));
        let closed = Err(Failure::from(BrokerError::ChannelClosed { operation: "ack" }));
        for result in [timeout, lost, closed] {
            assert_eq!(disposition(&result), Disposition::Requeue, "{result:?}");
        }
    }
}
