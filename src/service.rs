//! The task pipeline and the consume loop around it.
//!
//! [`Pipeline::handle`] turns one delivery into a report (or an error report, or a
//! dead-letter copy), waits for the broker to confirm it, then acks; [`disposition`] is
//! the single place that decides ack, retry or requeue. [`serve`] keeps a session with
//! the broker (reconnecting with capped backoff), runs one task per delivery, and drains
//! on shutdown. CPU work goes to the engine's pool; this module only awaits.

use crate::broker::{self, BrokerError, Publisher, Routed, Session, Topology};
use crate::dead_letter::{self, Origin, Reason};
use crate::engine::{Engine, EngineError};
use crate::health::Health;
use crate::message::{Limits, Rejection, Report, Task, complete_report_json, format_timestamp, parse_task};
use crate::metrics::{Metrics, ReasonLabel, outcome};
use crate::poison::Sweeper;
use crate::retry::{self, NextStep, RetryPolicy};
use crate::shutdown::Shutdown;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::types::ShortString;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// A session that lasts this long (or answers a task) was healthy: the reconnect backoff
/// starts again from its first delay.
const HEALTHY_PERIOD: Duration = Duration::from_secs(10);
/// How often a session checks that its connection and channels are still open (a
/// channel the broker closed raises no event a task would see until it publishes).
const SESSION_CHECK: Duration = Duration::from_secs(1);

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
    /// The statistics could not be produced (the data changed under the index, a
    /// computation died).
    #[error("statistics unavailable: {0}")]
    Engine(#[from] EngineError),
    /// The broker refused the answer (a nack: e.g. the target queue is full and rejects
    /// publishes).
    #[error("the broker refused the answer: {0}")]
    Refused(BrokerError),
    #[error("processing panicked: {0}")]
    Panicked(String),
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
        Err(Failure::Engine(_) | Failure::Refused(_) | Failure::Panicked(_)) => Disposition::Retry,
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
    pub engine: Engine,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub retry: RetryPolicy,
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
        let _in_flight = InFlight::new(&self.metrics);
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
                self.metrics.task(outcome::ANSWERED);
                debug!(delivery_tag = tag, micros, "report published");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::ErrorReported { code, routed }), Ok(())) => {
                self.metrics.task(outcome::ERROR_REPORT);
                info!(delivery_tag = tag, code, "error report published for a task with bad phones");
                warn_unroutable(*routed, &delivery);
            }
            (Ok(Handled::DeadLettered { reason, detail }), Ok(())) => {
                self.metrics.task(outcome::DEAD_LETTERED);
                warn!(
                    delivery_tag = tag,
                    reason,
                    detail = detail.as_str(),
                    bytes = delivery.data.len(),
                    "message dead-lettered"
                );
            }
            (Err(Failure::Session(error)), Ok(())) => {
                self.metrics.task(outcome::REQUEUED);
                warn!(delivery_tag = tag, %error, "task requeued: the broker session failed under it");
            }
            (Err(_), Ok(())) => {} // logged and counted by `retry_later`
            (_, Err(error)) => {
                self.metrics.task(outcome::ABANDONED);
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
            Ok(task) => task,
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
                let body = if offload { self.engine.run_blocking(build).await? } else { build() };
                self.metrics.report_latency.observe(received.started.elapsed().as_secs_f64());
                let routed = self.publish_report(publisher, destination, &body, &id).await?;
                Ok(Handled::Answered { routed })
            }
        }
    }

    /// Parses the body (large ones on the pool).
    async fn parse(&self, delivery: &Delivery) -> Result<Result<Task, Rejection>, EngineError> {
        let property_id = delivery.properties.correlation_id().as_ref().map(|id| id.as_str());
        let limits = self.limits;
        if delivery.data.len() <= OFFLOAD_BODY_BYTES {
            return Ok(parse_task(&delivery.data, property_id, limits));
        }
        let (body, property_id) = (delivery.data.clone(), property_id.map(str::to_owned));
        self.engine.run_blocking(move || parse_task(&body, property_id.as_deref(), limits)).await
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
        let properties = broker::report_properties(correlation_id)?;
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
        let properties = dead_letter::copy_properties(&delivery.properties, origin, &reason);
        publisher.publish_to_own(&self.topology.dead_letter_queue, &delivery.data, properties).await?;
        self.metrics.dead_lettered.get_or_create(&ReasonLabel { reason: code }).inc();
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
                let properties = retry::copy_properties(&delivery.properties, attempts);
                let parked = publisher.publish_to_own(&queue, &delivery.data, properties).await;
                if parked.is_ok() {
                    self.metrics.task(outcome::RETRIED);
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
                    self.metrics.task(outcome::RETRIES_EXHAUSTED);
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
    crate::message::bounded(text)
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
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { first, cap, next: first }
    }

    fn reset(&mut self) {
        self.next = self.first;
    }

    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        // Jitter from the clock's nanoseconds: cheap, and enough to spread a fleet out.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        base.mul_f64(0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0)
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection or the consumer went away, or a task found the session broken.
    Lost(String),
    /// The broker delivered a message lapin cannot decode (see `poison`).
    Undecodable(String),
}

/// What tasks report to the session that runs them.
#[derive(Debug, Default)]
struct SessionState {
    /// Cancelled by a task that found the session broken.
    broken: CancellationToken,
    /// Set once a task of this session was answered and acked.
    answered: AtomicBool,
}

/// Consumes tasks until `shutdown`: connects (retrying with backoff), runs each
/// delivery as its own task, reconnects when the session is lost or broken, moves
/// messages lapin cannot decode to the DLQ, and on shutdown stops consuming, requeues
/// what was prefetched but not started, waits for tasks in flight and closes the
/// connection, all within the shutdown deadline.
pub async fn serve(pipeline: Arc<Pipeline>, health: Arc<Health>, sweeper: Sweeper, shutdown: Arc<Shutdown>) {
    let topology = pipeline.topology.clone();
    let metrics = Arc::clone(&pipeline.metrics);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut poison_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut sweep_pending = false;
    let mut sessions = 0u64;
    loop {
        if sweep_pending {
            match sweeper.sweep(&shutdown).await {
                Ok(moved) if moved > 0 => {
                    sweep_pending = false;
                    poison_backoff.reset();
                    health.set_undecodable(false);
                    metrics.consumer_stuck.set(0);
                    metrics.dead_lettered.get_or_create(&ReasonLabel { reason: "undecodable" }).inc_by(moved);
                    metrics
                        .tasks
                        .get_or_create(&crate::metrics::OutcomeLabel { outcome: outcome::DEAD_LETTERED })
                        .inc_by(moved);
                    warn!(
                        moved,
                        queue = topology.dead_letter_queue.as_str(),
                        "moved undecodable messages to the dead-letter queue"
                    );
                }
                Ok(_) => debug!("the undecodable message was not among the messages the sweep received"),
                Err(error) => warn!(%error, "the sweep for undecodable messages failed"),
            }
        }
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
                if pause(&shutdown, delay).await {
                    continue;
                }
                break;
            }
        };
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
        let opened_at = Instant::now();
        let state = Arc::new(SessionState::default());
        let end = run_session(&mut session, &pipeline, &state, &mut tasks, &shutdown, &health).await;
        health.set_consumer_attached(false);
        let healthy = state.answered.load(Ordering::SeqCst) || opened_at.elapsed() >= HEALTHY_PERIOD;
        match end {
            SessionEnd::Shutdown => {
                stop(&mut session, &mut tasks, &shutdown).await;
                return;
            }
            SessionEnd::Lost(why) => {
                warn!(reason = why.as_str(), "the broker session ended; reconnecting");
                if healthy {
                    backoff.reset();
                }
                if opened_at.elapsed() >= HEALTHY_PERIOD && !sweep_pending {
                    health.set_undecodable(false);
                    metrics.consumer_stuck.set(0);
                }
            }
            SessionEnd::Undecodable(why) => {
                metrics.undecodable.inc();
                metrics.consumer_stuck.set(1);
                if !health.undecodable() {
                    error!(
                        reason = why.as_str(),
                        queue = topology.task_queue.as_str(),
                        "the broker delivered a message the AMQP client cannot decode (a property or header name that \
                         is not UTF-8, or a header of an unknown type), which drops the connection; moving it to the \
                         dead-letter queue. If this repeats, the message is stuck at the head of the queue: remove it \
                         by hand (see README, 'Undecodable messages')"
                    );
                }
                health.set_undecodable(true);
                sweep_pending = true;
                let delay = poison_backoff.delay();
                close_session(&session, &shutdown).await;
                if pause(&shutdown, delay).await {
                    continue;
                }
                break;
            }
        }
        close_session(&session, &shutdown).await;
        // Every reconnect waits, so a session that keeps failing never spins.
        if !pause(&shutdown, backoff.delay()).await {
            break;
        }
    }
    drain_tasks(&mut tasks, shutdown.drain_deadline()).await;
}

/// Waits `delay`, or less if shutdown is requested; true when the wait was complete.
async fn pause(shutdown: &Shutdown, delay: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Runs one session until it ends.
async fn run_session(
    session: &mut Session,
    pipeline: &Arc<Pipeline>,
    state: &Arc<SessionState>,
    tasks: &mut JoinSet<()>,
    shutdown: &Shutdown,
    health: &Health,
) -> SessionEnd {
    let mut check = tokio::time::interval(SESSION_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let healthy_after = tokio::time::sleep(HEALTHY_PERIOD);
    tokio::pin!(healthy_after);
    let mut healthy_seen = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = state.broken.cancelled() => return SessionEnd::Lost("a task found the session broken".into()),
            _ = check.tick() => {
                if !session.is_open() {
                    return SessionEnd::Lost("the connection or a channel was closed".into());
                }
            }
            _ = &mut healthy_after, if !healthy_seen => {
                healthy_seen = true;
                if health.undecodable() {
                    info!("the consumer has run cleanly since the undecodable message; clearing the stuck state");
                    health.set_undecodable(false);
                    pipeline.metrics.consumer_stuck.set(0);
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_panic(joined),
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (pipeline, publisher, state) = (Arc::clone(pipeline), session.publisher.clone(), Arc::clone(state));
                    tasks.spawn(async move {
                        match pipeline.handle(delivery, &publisher).await {
                            Ok(()) => state.answered.store(true, Ordering::SeqCst),
                            Err(broken) => {
                                warn!(reason = broken.0.as_str(), "the broker session is broken; reconnecting");
                                state.broken.cancel();
                            }
                        }
                    });
                }
                Some(Err(error)) => {
                    return match error.kind() {
                        lapin::ErrorKind::ParsingError(_) => SessionEnd::Undecodable(error.to_string()),
                        _ => SessionEnd::Lost(format!("lost the broker connection: {error}")),
                    };
                }
                None => return SessionEnd::Lost("the broker cancelled the consumer".into()),
            },
        }
    }
}

/// The shutdown sequence of the live session, within the shutdown deadline: stop
/// consuming, requeue deliveries prefetched but not started, let tasks in flight finish
/// until the drain deadline, close the connection.
async fn stop(session: &mut Session, tasks: &mut JoinSet<()>, shutdown: &Shutdown) {
    if let Err(error) = session.stop_consuming(shutdown.left_until(shutdown.drain_deadline())).await {
        warn!(%error, "cannot cancel the consumer; closing the connection requeues what is unhandled");
    }
    let mut requeued = 0u64;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_millis(50), session.consumer.next()).await {
        if broker::requeue_within(&delivery, shutdown.left_until(shutdown.drain_deadline())).await.is_ok() {
            requeued += 1;
        }
    }
    if requeued > 0 {
        info!(requeued, "requeued tasks that were prefetched but not started");
    }
    drain_tasks(tasks, shutdown.drain_deadline()).await;
    close_session(session, shutdown).await;
}

async fn close_session(session: &Session, shutdown: &Shutdown) {
    let within =
        if shutdown.is_cancelled() { shutdown.left_until(shutdown.close_deadline()) } else { broker::BROKER_TIMEOUT };
    if let Err(error) = session.close(within).await {
        debug!(%error, "closing the broker connection");
    }
}

async fn drain_tasks(tasks: &mut JoinSet<()>, deadline: Instant) {
    let in_flight = tasks.len();
    let drained = tokio::time::timeout_at(deadline.into(), async {
        while let Some(joined) = tasks.join_next().await {
            log_panic(joined);
        }
    })
    .await;
    match drained {
        Ok(()) => info!(in_flight, "in-flight tasks finished"),
        Err(_) => {
            warn!(left = tasks.len(), "shutdown deadline: abandoning tasks still running; the broker requeues them");
            tasks.abort_all();
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        error!(%error, "a task panicked outside its pipeline; its delivery is requeued by the broker when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::StaleData;

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
        for result in [stale, refused, panicked] {
            assert_eq!(disposition(&result), Disposition::Retry, "{result:?}");
        }
        let timeout = Err(Failure::from(BrokerError::Timeout { operation: "publisher confirm" }));
        let lost = Err(Failure::from(BrokerError::Unroutable { queue: "ready_report".into() }));
        let closed = Err(Failure::from(BrokerError::ChannelClosed { operation: "ack" }));
        for result in [timeout, lost, closed] {
            assert_eq!(disposition(&result), Disposition::Requeue, "{result:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        let delays: Vec<Duration> = (0..10).map(|_| backoff.delay()).collect();
        assert!(delays[0] >= FIRST_RETRY.mul_f64(0.8) && delays[0] <= FIRST_RETRY.mul_f64(1.2));
        assert!(delays.iter().all(|d| *d <= MAX_RETRY.mul_f64(1.2)));
        assert!(delays[9] >= MAX_RETRY.mul_f64(0.8));
        backoff.reset();
        assert!(backoff.delay() <= FIRST_RETRY.mul_f64(1.2));
    }
}
