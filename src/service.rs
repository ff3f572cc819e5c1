//! The task pipeline and the consume loop around it.
//!
//! [`Pipeline::handle`] turns one delivery into a report (or an error report, or a
//! dead-letter copy), waits for the broker to confirm it, then acks; [`disposition`] is
//! the single place that decides ack versus requeue. [`serve`] keeps a session with the
//! broker (reconnecting with capped backoff), runs one task per delivery, and drains on
//! shutdown. CPU work goes to the engine's pool; this module only awaits.

use crate::broker::{self, BrokerError, Publisher, Routed, Session, Topology};
use crate::engine::{Engine, EngineError};
use crate::health::Health;
use crate::message::{Limits, Report, Task, complete_report_json, parse_task};
use crate::metrics::{Metrics, ReasonLabel, outcome};
use futures_util::StreamExt;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Bodies above this size are parsed on the pool rather than the async runtime.
const OFFLOAD_BODY_BYTES: usize = 64 * 1024;
/// Reports with more phones than this are built and serialised on the pool.
const OFFLOAD_PHONES: usize = 256;
/// Reconnect delays: doubling from the first to the cap, with +-20 % jitter so a fleet of
/// instances does not reconnect in lockstep after a broker restart.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How a task was answered. Every variant means the broker confirmed the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Answered { routed: Routed },
    ErrorReported { code: &'static str, routed: Routed },
    DeadLettered { reason: &'static str, detail: String },
}

/// Why a task could not be answered this time.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("statistics unavailable: {0}")]
    Engine(#[from] EngineError),
    #[error("the broker did not take the answer: {0}")]
    Publish(#[from] BrokerError),
}

/// What happens to the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    Requeue,
}

/// The ack decision for every outcome, in one place.
///
/// - Answered, error-reported or dead-lettered: the answer (or the copy) is confirmed
///   by the broker, so the task is done: **ack**. A report confirmed as unroutable
///   (its `reply_to` queue is gone, so is its client) is acked too: redelivering it
///   would only loop.
/// - The engine failed (the data file changed under its index, or a computation died):
///   transient, so **requeue**; another attempt, here after the reload or on another
///   instance, succeeds.
/// - The broker did not confirm the answer (timeout, nack, channel error): **requeue**,
///   so nothing is acked before its answer is safe. If the channel is gone the nack
///   fails as well, and the broker requeues the delivery itself when it sees the
///   channel close.
///
/// Nothing is ever rejected without requeue: a message we cannot use is first copied to
/// the dead-letter queue, then acked.
pub fn disposition(result: &Result<Handled, Failure>) -> Disposition {
    match result {
        Ok(Handled::Answered { .. } | Handled::ErrorReported { .. } | Handled::DeadLettered { .. }) => Disposition::Ack,
        Err(Failure::Engine(_) | Failure::Publish(_)) => Disposition::Requeue,
    }
}

/// Everything a task needs besides its delivery and the session's publisher.
#[derive(Debug)]
pub struct Pipeline {
    pub engine: Engine,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

/// When a delivery arrived: wall time for the report, a monotonic start for durations.
#[derive(Debug, Clone, Copy)]
struct Received {
    at: SystemTime,
    started: Instant,
}

impl Pipeline {
    /// Answers one delivery and acks or requeues it. Returns the ack/nack failure, if
    /// any, so the session can tell a dead connection.
    pub async fn handle(&self, delivery: Delivery, publisher: &Publisher) -> Result<(), BrokerError> {
        let received = Received { at: SystemTime::now(), started: Instant::now() };
        self.metrics.tasks_in_flight.inc();
        let result = self.process(&delivery, publisher, received).await;
        let applied = match disposition(&result) {
            Disposition::Ack => broker::ack(&delivery).await,
            Disposition::Requeue => broker::requeue(&delivery).await,
        };
        self.metrics.tasks_in_flight.dec();
        let micros = received.started.elapsed().as_micros() as u64;
        let tag = delivery.delivery_tag;
        match (&result, &applied) {
            (_, Err(error)) => {
                self.metrics.task(outcome::ABANDONED);
                warn!(delivery_tag = tag, %error, "cannot ack or requeue: the broker will redeliver the task");
            }
            (Ok(Handled::Answered { routed }), _) => {
                self.metrics.task(outcome::ANSWERED);
                debug!(delivery_tag = tag, micros, "report published");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::ErrorReported { code, routed }), _) => {
                self.metrics.task(outcome::ERROR_REPORT);
                info!(delivery_tag = tag, code, "error report published for a task with bad phones");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::DeadLettered { reason, detail }), _) => {
                self.metrics.task(outcome::DEAD_LETTERED);
                warn!(
                    delivery_tag = tag,
                    reason,
                    detail = detail.as_str(),
                    bytes = delivery.data.len(),
                    "message dead-lettered"
                );
            }
            (Err(error), _) => {
                self.metrics.task(outcome::REQUEUED);
                warn!(delivery_tag = tag, %error, "task requeued");
            }
        }
        applied
    }

    async fn process(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        received: Received,
    ) -> Result<Handled, Failure> {
        let task = match self.parse(delivery).await? {
            Ok(task) => task,
            Err(rejection) => {
                publisher.dead_letter(delivery, &rejection).await?;
                let reason = rejection.code();
                self.metrics.dead_lettered.get_or_create(&ReasonLabel { reason }).inc();
                return Ok(Handled::DeadLettered { reason, detail: rejection.to_string() });
            }
        };
        let reply_to = delivery.properties.reply_to().as_ref();
        let id = task.correlation_id.as_property().to_owned();
        match task.phones {
            Err(invalid) => {
                let report = Report::error(task.correlation_id, received.at, &invalid, received.started.elapsed());
                self.metrics.report_latency.observe(received.started.elapsed().as_secs_f64());
                let routed = publisher.report(&report.to_json(), &id, reply_to).await?;
                Ok(Handled::ErrorReported { code: invalid.code(), routed })
            }
            Ok(phones) => {
                let answers = self.engine.stats(&phones).await?;
                let offload = phones.len() > OFFLOAD_PHONES;
                let build = move || {
                    let entries = answers.iter().map(|a| &a.json[..]);
                    complete_report_json(&task.correlation_id, received.at, entries, || received.started.elapsed())
                };
                let body = if offload { self.engine.run_blocking(build).await? } else { build() };
                self.metrics.report_latency.observe(received.started.elapsed().as_secs_f64());
                let routed = publisher.report(&body, &id, reply_to).await?;
                Ok(Handled::Answered { routed })
            }
        }
    }

    /// Parses the body (large ones on the pool).
    async fn parse(&self, delivery: &Delivery) -> Result<Result<Task, crate::message::Rejection>, EngineError> {
        let property_id = delivery.properties.correlation_id().as_ref().map(|id| id.as_str());
        let limits = self.limits;
        if delivery.data.len() <= OFFLOAD_BODY_BYTES {
            return Ok(parse_task(&delivery.data, property_id, limits));
        }
        let (body, property_id) = (delivery.data.clone(), property_id.map(str::to_owned));
        self.engine.run_blocking(move || parse_task(&body, property_id.as_deref(), limits)).await
    }
}

fn warn_unroutable(routed: Routed, delivery: &Delivery) {
    if routed == Routed::Unroutable {
        let reply_to = delivery.properties.reply_to().as_ref().map(|q| q.as_str().to_owned());
        warn!(reply_to, "report confirmed but unroutable: no queue of that name (has the client gone?)");
    }
}

/// Capped exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_RETRY }
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }

    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        // Jitter from the clock's nanoseconds: cheap, and enough to spread a fleet out.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        base.mul_f64(0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0)
    }
}

/// Consumes tasks until `shutdown`: connects (retrying with backoff), runs each
/// delivery as its own task, reconnects when the connection is lost, and on shutdown
/// stops consuming, waits up to `drain` for tasks in flight and closes the connection.
/// Tasks still running at the deadline are abandoned; the broker requeues them.
pub async fn serve(
    topology: Topology,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let metrics = Arc::clone(&pipeline.metrics);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new();
    let mut sessions = 0u64;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => None,
            opened = Session::open(&topology) => Some(opened),
        };
        let mut session = match opened {
            None => break,
            Some(Ok(session)) => session,
            Some(Err(error)) => {
                let delay = backoff.delay();
                warn!(%error, retry_in_ms = delay.as_millis() as u64, broker = %topology.url, "cannot reach the broker");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff.reset();
        if sessions > 0 {
            metrics.reconnects.inc();
        }
        sessions += 1;
        health.set_consumer_attached(true);
        info!(
            event = "Consumer connected and ready to consume messages.",
            queue = topology.task_queue.as_str(),
            prefetch = topology.prefetch,
            broker = %topology.url
        );
        // Cancelled by a task whose broker call timed out: the connection is unhealthy.
        let unhealthy = CancellationToken::new();
        let stop = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break true,
                _ = unhealthy.cancelled() => {
                    warn!("a broker call timed out; reconnecting");
                    break false;
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_panic(joined),
                next = session.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (pipeline, publisher, unhealthy) = (Arc::clone(&pipeline), session.publisher.clone(), unhealthy.clone());
                        tasks.spawn(async move {
                            if let Err(BrokerError::Timeout { .. }) = pipeline.handle(delivery, &publisher).await {
                                unhealthy.cancel();
                            }
                        });
                    }
                    Some(Err(error)) => {
                        warn!(%error, "lost the broker connection; reconnecting");
                        break false;
                    }
                    None => {
                        warn!("the broker cancelled the consumer; reconnecting");
                        break false;
                    }
                },
            }
        };
        health.set_consumer_attached(false);
        if stop {
            if let Err(error) = session.stop_consuming().await {
                warn!(%error, "cannot cancel the consumer; closing the connection requeues what is unhandled");
            }
            drain_tasks(&mut tasks, drain).await;
            close(&session).await;
            return;
        }
        close(&session).await;
    }
    drain_tasks(&mut tasks, drain).await;
}

async fn close(session: &Session) {
    if let Err(error) = session.close().await {
        debug!(%error, "closing the broker connection");
    }
}

async fn drain_tasks(tasks: &mut JoinSet<()>, drain: Duration) {
    let in_flight = tasks.len();
    let drained = tokio::time::timeout(drain, async {
        while let Some(joined) = tasks.join_next().await {
            log_panic(joined);
        }
    })
    .await;
    match drained {
        Ok(()) => info!(in_flight, "in-flight tasks finished"),
        Err(_) => {
            warn!(left = tasks.len(), "shutdown timeout: abandoning tasks still running; the broker requeues them");
            tasks.abort_all();
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        error!(%error, "a task panicked; its delivery is requeued by the broker when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::StaleData;

    #[test]
    fn confirmed_answers_are_acked_and_failures_requeued() {
        let answered = Ok(Handled::Answered { routed: Routed::Queued });
        let unroutable = Ok(Handled::Answered { routed: Routed::Unroutable });
        let error_report = Ok(Handled::ErrorReported { code: "invalid_phone", routed: Routed::Queued });
        let dead = Ok(Handled::DeadLettered { reason: "not_json", detail: String::new() });
        for result in [answered, unroutable, error_report, dead] {
            assert_eq!(disposition(&result), Disposition::Ack, "{result:?}");
        }
        let stale = Err(Failure::Engine(EngineError::Stale(StaleData::Changed)));
        let unconfirmed = Err(Failure::Publish(BrokerError::Nacked));
        let timeout = Err(Failure::Publish(BrokerError::Timeout { operation: "publisher confirm" }));
        for result in [stale, unconfirmed, timeout] {
            assert_eq!(disposition(&result), Disposition::Requeue, "{result:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.delay()).collect();
        assert!(delays[0] >= FIRST_RETRY.mul_f64(0.8) && delays[0] <= FIRST_RETRY.mul_f64(1.2));
        assert!(delays.iter().all(|d| *d <= MAX_RETRY.mul_f64(1.2)));
        assert!(delays[9] >= MAX_RETRY.mul_f64(0.8));
        backoff.reset();
        assert!(backoff.delay() <= FIRST_RETRY.mul_f64(1.2));
    }
}
