//! The consume loop: a session with the broker at a time, one task per delivery, and
//! what happens between sessions and at the end.
//!
//! A delivery's task is a future driven by the consume loop itself (a
//! [`FuturesUnordered`]), not a runtime task of its own: a task mostly awaits the broker
//! (its CPU work goes to the worker pool, or takes microseconds), and spawning one per
//! message cost a sixth more CPU per message in scheduling, wake-ups between the
//! runtime's threads and copies of the future (README, "Performance"). A task whose body
//! is heavy (hundreds of phones or more, see `pipeline::Weight`) does run as a runtime
//! task of its own, which parses beside the loop when the runtime has more than one
//! thread (its lookups go to the pool in any case).
//! Tasks in flight are driven whatever the loop is doing: consuming, reconnecting or
//! shutting down.
//!
//! [`serve`] connects (to the nodes of `AMQP_URL` in turn, see `broker::Failover`;
//! waiting with capped backoff only once every node has failed), hands each delivery to the
//! `pipeline` as a task of its own, reconnects when the session is lost or a task finds
//! it broken (a closed channel is also caught by a check every second), moves messages
//! the AMQP client cannot decode to the DLQ (`sweeper`) before consuming again, and on
//! shutdown stops consuming, requeues what was prefetched but not started, lets tasks in
//! flight finish and closes the connection, all within the shutdown deadline.

use super::pipeline::{Pipeline, Weight};
use super::sweeper::Sweeper;
use crate::broker::{self, Failover, Session};
use crate::ops::health::Health;
use crate::ops::metrics::Outcome;
use crate::platform::shutdown::Shutdown;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

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
/// How long a session a task found broken is given to say why through its consumer
/// (see [`ended_by_a_task`]); it answers at once when the connection failed.
const CAUSE_WAIT: Duration = Duration::from_millis(250);

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
    /// The broker delivered a message lapin cannot decode (see `sweeper`).
    Undecodable(String),
}

impl SessionEnd {
    /// The end of a session whose consumer failed with `error`: a delivery lapin could not
    /// decode is swept, anything else is a lost connection.
    fn of_consumer_error(error: &lapin::Error) -> Self {
        match error.kind() {
            lapin::ErrorKind::ParsingError(_) => Self::Undecodable(error.to_string()),
            _ => Self::Lost(format!("lost the broker connection: {error}")),
        }
    }
}

/// What tasks report to the session that runs them.
#[derive(Debug, Default)]
struct SessionState {
    /// Cancelled by a task that found the session broken.
    broken: CancellationToken,
    /// Set once a task of this session was answered and acked.
    answered: AtomicBool,
}

/// The tasks in flight: one future per delivery, across sessions, driven by the consume
/// loop whatever else it awaits.
#[derive(Default)]
struct Tasks(FuturesUnordered<BoxFuture<'static, ()>>);

impl Tasks {
    /// Adds a delivery's task: a future of the loop's own, or for a heavy body a runtime
    /// task of its own (aborted if dropped, as at the shutdown deadline the loop's own are).
    fn add(&mut self, task: impl Future<Output = ()> + Send + 'static, weight: Weight) {
        if weight == Weight::Light {
            self.0.push(task.boxed());
        } else {
            let own = AbortOnDropHandle::new(tokio::spawn(task));
            self.0.push(async move { own.await.unwrap_or_default() }.boxed());
        }
    }

    /// Drives the tasks until one ends; never resolves while there are none (for a
    /// `select!` branch).
    async fn one_ended(&mut self) {
        match self.0.next().await {
            Some(()) => {}
            None => std::future::pending().await,
        }
    }

    /// Runs `work` to its end while driving the tasks.
    async fn alongside<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = self.one_ended() => {}
            }
        }
    }

    /// Waits `delay`, or less if shutdown is requested, driving the tasks; true when the
    /// wait was complete.
    async fn pause(&mut self, shutdown: &Shutdown, delay: Duration) -> bool {
        self.alongside(async {
            tokio::select! {
                _ = shutdown.cancelled() => false,
                _ = tokio::time::sleep(delay) => true,
            }
        })
        .await
    }

    /// Closes the session's connection, driving the tasks.
    async fn close(&mut self, session: &Session, shutdown: &Shutdown) {
        self.alongside(close_session(session, shutdown)).await;
    }

    /// Lets the tasks finish until `deadline`, then abandons the rest (the broker
    /// requeues their deliveries when the connection closes).
    async fn drain(&mut self, deadline: Instant) {
        let in_flight = self.0.len();
        let drained = tokio::time::timeout_at(deadline.into(), async { while self.0.next().await.is_some() {} }).await;
        match drained {
            Ok(()) => info!(in_flight, "in-flight tasks finished"),
            Err(_) => {
                warn!(
                    left = self.0.len(),
                    "shutdown deadline: abandoning tasks still running; the broker requeues them"
                );
                self.0.clear();
            }
        }
    }
}

/// Consumes tasks until `shutdown`: connects (retrying with backoff), runs each
/// delivery as its own task, reconnects when the session is lost or broken, moves
/// messages lapin cannot decode to the DLQ, and on shutdown stops consuming, requeues
/// what was prefetched but not started, waits for tasks in flight and closes the
/// connection, all within the shutdown deadline.
pub async fn serve(pipeline: Arc<Pipeline>, health: Arc<Health>, sweeper: Sweeper, shutdown: Arc<Shutdown>) {
    let topology = pipeline.topology.clone();
    let metrics = Arc::clone(&pipeline.metrics);
    let mut tasks = Tasks::default();
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut poison_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failover = Failover::new(&topology.addresses, Failover::seed_of(&pipeline.instance));
    let mut sweep_pending = false;
    let mut sessions = 0u64;
    loop {
        if sweep_pending {
            match tasks.alongside(sweeper.sweep(failover.current(), &shutdown)).await {
                Ok(moved) if moved > 0 => {
                    sweep_pending = false;
                    poison_backoff.reset();
                    health.set_undecodable(false);
                    metrics.consumer_stuck.set(0);
                    metrics.dead_lettered_as("undecodable", moved);
                    metrics.tasks_ended(Outcome::DeadLettered, moved);
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
        let spec = topology.session(failover.current());
        let opened = tasks
            .alongside(async {
                tokio::select! {
                    _ = shutdown.cancelled() => None,
                    opened = Session::open(&spec) => Some(opened),
                }
            })
            .await;
        let mut session = match opened {
            None => break,
            Some(Ok(session)) => session,
            Some(Err(error)) => {
                // Another node may answer at once; wait only once every node has failed.
                let round_failed = failover.failed();
                let delay = if round_failed { backoff.delay() } else { Duration::ZERO };
                warn!(
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    broker = %spec.url,
                    next = %topology.addresses.urls()[failover.current()],
                    "cannot reach the broker"
                );
                if tasks.pause(&shutdown, delay).await {
                    continue;
                }
                break;
            }
        };
        if sessions > 0 {
            metrics.reconnects.inc();
        }
        sessions += 1;
        failover.succeeded();
        health.set_consumer_attached(true);
        metrics.broker_node(Some(&spec.url.node()));
        info!(
            event = "Consumer connected and ready to consume messages.",
            queue = topology.task_queue.as_str(),
            prefetch = topology.prefetch,
            broker = %spec.url,
            node = spec.url.node().as_str(),
            nodes = topology.addresses.len()
        );
        let opened_at = Instant::now();
        let state = Arc::new(SessionState::default());
        let end = run_session(&mut session, &pipeline, &state, &mut tasks, &shutdown, &health).await;
        health.set_consumer_attached(false);
        metrics.broker_node(None);
        let healthy = state.answered.load(Ordering::SeqCst) || opened_at.elapsed() >= HEALTHY_PERIOD;
        match end {
            SessionEnd::Shutdown => {
                stop(&mut session, &mut tasks, &shutdown).await;
                return;
            }
            SessionEnd::Lost(why) => {
                warn!(reason = why.as_str(), broker = %spec.url, "the broker session ended; reconnecting");
                if opened_at.elapsed() >= HEALTHY_PERIOD && !sweep_pending {
                    health.set_undecodable(false);
                    metrics.consumer_stuck.set(0);
                }
                tasks.close(&session, &shutdown).await;
                let delay = if healthy {
                    // It served well until now: the node is likely restarting. Try the
                    // next one at once; with a single node, wait the first backoff step.
                    backoff.reset();
                    failover.lost();
                    if topology.addresses.len() > 1 { Duration::ZERO } else { backoff.delay() }
                } else if failover.failed() {
                    backoff.delay()
                } else {
                    Duration::ZERO
                };
                if tasks.pause(&shutdown, delay).await {
                    continue;
                }
                break;
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
                tasks.close(&session, &shutdown).await;
                if tasks.pause(&shutdown, delay).await {
                    continue;
                }
                break;
            }
        }
    }
    tasks.drain(shutdown.drain_deadline()).await;
}

/// One delivery's task: the pipeline, then what it tells the session. A panic is
/// caught here so that it cannot end the consume loop that drives every other task.
async fn run_task(
    pipeline: Arc<Pipeline>,
    publisher: broker::Publisher,
    state: Arc<SessionState>,
    delivery: lapin::message::Delivery,
) {
    match AssertUnwindSafe(pipeline.handle(delivery, &publisher)).catch_unwind().await {
        Ok(Ok(())) => state.answered.store(true, Ordering::SeqCst),
        Ok(Err(broken)) => {
            warn!(reason = broken.0.as_str(), "the broker session is broken; reconnecting");
            state.broken.cancel();
        }
        Err(_) => error!(
            "a task panicked outside its pipeline; its delivery is requeued by the broker when the channel closes"
        ),
    }
}

/// Runs one session until it ends.
async fn run_session(
    session: &mut Session,
    pipeline: &Arc<Pipeline>,
    state: &Arc<SessionState>,
    tasks: &mut Tasks,
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
            _ = state.broken.cancelled() => return ended_by_a_task(session).await,
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
            () = tasks.one_ended() => {}
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (pipeline, publisher, state) = (Arc::clone(pipeline), session.publisher.clone(), Arc::clone(state));
                    let weight = Weight::of(delivery.data.len(), pipeline.limits);
                    tasks.add(run_task(pipeline, publisher, state, delivery), weight);
                }
                Some(Err(error)) => return SessionEnd::of_consumer_error(&error),
                None => return SessionEnd::Lost("the broker cancelled the consumer".into()),
            },
        }
    }
}

/// Why a session that a task found broken ended. lapin fails every call in flight and
/// the consumer with the same error, in no set order; when that error is a delivery it
/// could not decode, the session must end as [`SessionEnd::Undecodable`] so the message
/// is swept. Ended as merely lost, it came back behind the same tasks on every reconnect,
/// failed them again before they were answered, and nothing was answered any more. The
/// consumer is read until its error, for at most [`CAUSE_WAIT`]; deliveries read
/// meanwhile are dropped unsettled, and the broker requeues them when the connection
/// closes, as it does every delivery prefetched when a session is lost.
async fn ended_by_a_task(session: &mut Session) -> SessionEnd {
    let deadline = tokio::time::Instant::now() + CAUSE_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, session.consumer.next()).await {
            Ok(Some(Ok(_unsettled))) => {}
            Ok(Some(Err(error))) => return SessionEnd::of_consumer_error(&error),
            _ => return SessionEnd::Lost("a task found the session broken".into()),
        }
    }
}

/// The shutdown sequence of the live session, within the shutdown deadline: stop
/// consuming, requeue deliveries prefetched but not started, let tasks in flight finish
/// until the drain deadline, close the connection.
async fn stop(session: &mut Session, tasks: &mut Tasks, shutdown: &Shutdown) {
    let requeued = tasks
        .alongside(async {
            if let Err(error) = session.stop_consuming(shutdown.left_until(shutdown.drain_deadline())).await {
                warn!(%error, "cannot cancel the consumer; closing the connection requeues what is unhandled");
            }
            let mut requeued = 0u64;
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_millis(50), session.consumer.next()).await
            {
                if broker::requeue_within(&delivery, shutdown.left_until(shutdown.drain_deadline())).await.is_ok() {
                    requeued += 1;
                }
            }
            requeued
        })
        .await;
    if requeued > 0 {
        info!(requeued, "requeued tasks that were prefetched but not started");
    }
    tasks.drain(shutdown.drain_deadline()).await;
    close_session(session, shutdown).await;
}

async fn close_session(session: &Session, shutdown: &Shutdown) {
    let within =
        if shutdown.is_cancelled() { shutdown.left_until(shutdown.close_deadline()) } else { broker::BROKER_TIMEOUT };
    if let Err(error) = session.close(within).await {
        debug!(%error, "closing the broker connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the loop awaits (a reconnect, a pause, the shutdown), the tasks in flight
    /// go on: here the work waits for what a task sends, which never comes unless the
    /// task is driven.
    #[tokio::test]
    async fn tasks_in_flight_are_driven_while_the_loop_awaits_other_work() {
        let mut tasks = Tasks::default();
        let (send, receive) = tokio::sync::oneshot::channel();
        let task = async move {
            tokio::task::yield_now().await;
            send.send(7).unwrap();
        };
        tasks.add(task, Weight::Light);
        let got = tokio::time::timeout(Duration::from_secs(10), tasks.alongside(receive)).await;
        assert_eq!(got.expect("the task was not driven").unwrap(), 7);
    }

    /// With nothing in flight the loop must wait for its other branches, not spin on an
    /// empty set that is always ready.
    #[tokio::test]
    async fn no_task_ends_while_there_are_none() {
        let mut tasks = Tasks::default();
        assert!(tasks.one_ended().now_or_never().is_none());
        tasks.add(async {}, Weight::Light);
        assert!(tasks.one_ended().now_or_never().is_some());
        assert!(tasks.one_ended().now_or_never().is_none());
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
