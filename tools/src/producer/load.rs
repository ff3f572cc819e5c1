//! The load test: keeps C tasks in flight, matches replies by correlation id, and
//! measures each task from publish to reply.

use super::client::{Client, ClientError, amqp, is_error_report, persistent_json, reply_id, task_body};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, BasicQosOptions};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// The load to generate.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// How many tasks to have answered.
    pub tasks: u64,
    /// How many are in flight at once.
    pub concurrency: usize,
    /// Phones per task.
    pub phones_per_task: usize,
    /// Phones are drawn from `phone_base..phone_base + phone_max`...
    pub phone_max: u64,
    /// The first phone number of the range (79000000000 for `datagen --layout
    /// many-phones --phone-base 79000000000`).
    pub phone_base: u64,
    /// ...or from `0..hot_set` when set (a warm cache).
    pub hot_set: Option<u64>,
    /// Task `i` asks for phones `i*K .. (i+1)*K` (mod the range) instead of random ones:
    /// no phone shared between tasks, so a cold cache stays cold for every task.
    pub disjoint: bool,
    /// Give up on the remaining tasks after this long without a reply.
    pub idle_timeout: Duration,
    /// The random seed for phone choice.
    pub seed: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[allow(missing_docs)] // each is the percentile of its name
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// What a load test saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoadSummary {
    /// Tasks asked for.
    pub tasks: u64,
    /// Tasks kept in flight.
    pub concurrency: usize,
    /// Tasks published (each counted once, however often it was published).
    pub sent: u64,
    /// Publishes the broker refused (a nack, or a channel error before the confirm),
    /// each published again after a pause: a client's duty under publisher confirms, and
    /// what a node's restart can cause while a quorum queue elects its leader.
    pub republished: u64,
    /// Tasks the broker refused on every one of `PUBLISH_ATTEMPTS` attempts: never
    /// accepted, so also counted unanswered.
    pub refused: u64,
    /// Distinct tasks answered.
    pub answered: u64,
    /// Answers that were error reports.
    pub error_reports: u64,
    /// Reports for tasks already answered (at-least-once redeliveries).
    pub duplicates: u64,
    /// Sent and not answered before the idle timeout.
    pub unanswered: u64,
    /// Not sent because the run gave up first.
    pub not_sent: u64,
    /// Seconds from the first publish to the last answer.
    pub elapsed_s: f64,
    /// Distinct tasks answered per second.
    pub throughput_per_s: f64,
    /// Publish-to-report latency.
    pub latency: Latency,
}

impl LoadSummary {
    /// A run passes when every task was sent and answered, none with an error report.
    pub fn passed(&self) -> bool {
        self.unanswered == 0 && self.not_sent == 0 && self.error_reports == 0
    }
}

/// The summary as the producer prints it: counts, throughput, latency percentiles.
impl std::fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency;
        writeln!(
            f,
            "tasks {} (concurrency {}): sent {}, republished {}, refused {}, answered {}, error reports {}, duplicates {}, unanswered {}, not sent {}",
            self.tasks,
            self.concurrency,
            self.sent,
            self.republished,
            self.refused,
            self.answered,
            self.error_reports,
            self.duplicates,
            self.unanswered,
            self.not_sent
        )?;
        writeln!(f, "{:.0} tasks/s over {:.2} s", self.throughput_per_s, self.elapsed_s)?;
        write!(
            f,
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        )
    }
}

/// How often a task is published before it counts as refused.
const PUBLISH_ATTEMPTS: u32 = 8;
/// The pause before a refused task's second attempt; it doubles for each further one,
/// up to `MAX_REPUBLISH_PAUSE`: the attempts span about 16 s, longer than a quorum
/// queue's leader election after a node's restart.
const REPUBLISH_PAUSE: Duration = Duration::from_millis(200);
const MAX_REPUBLISH_PAUSE: Duration = Duration::from_secs(5);

/// The pause after the `attempt`-th refusal of a task.
fn republish_pause(attempt: u32) -> Duration {
    REPUBLISH_PAUSE.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(MAX_REPUBLISH_PAUSE)
}

/// What a load test has done so far: given to its `progress` callback after each answer
/// and each publish the broker refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Distinct tasks answered.
    pub answered: u64,
    /// Publishes refused and made again.
    pub republished: u64,
    /// Tasks given up on after `PUBLISH_ATTEMPTS` refusals.
    pub refused: u64,
}

/// The sender's refusals, counted where the receiver reads them, and a wake-up for it:
/// refusals are progress too (and, while everything is refused, the only progress).
#[derive(Debug, Default)]
struct Refusals {
    republished: AtomicU64,
    refused: AtomicU64,
    changed: Notify,
}

/// What the sender waits for besides permits.
enum Event {
    /// The broker confirmed a publish.
    Accepted,
    /// The broker refused attempt `attempt` of task `id` (`body`).
    Refused { id: u64, attempt: u32, body: Vec<u8> },
    /// The pause after a refusal is over: publish the task again.
    Again { id: u64, attempt: u32, body: Vec<u8> },
}

/// Per-task bookkeeping shared by the sender and the receiver.
struct Ledger {
    sent_at: Vec<Option<Instant>>,
    answered: Vec<bool>,
}

/// Runs a load test: keeps `concurrency` tasks in flight until `tasks` are answered (or
/// nothing arrives for `idle_timeout`), measuring each from publish to reply.
/// `progress` is called with what it has done so far after each answer and each refused
/// publish.
pub async fn load(
    client: &Client,
    options: LoadOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<LoadSummary, ClientError> {
    let (queue, mut replies) = client.reply_queue().await?;
    client.channel.basic_qos(0, BasicQosOptions::default()).await.map_err(amqp("basic.qos"))?;
    let n = options.tasks as usize;
    let ledger = Arc::new(parking_lot::Mutex::new(Ledger { sent_at: vec![None; n], answered: vec![false; n] }));
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let stop = CancellationToken::new();
    let started = Instant::now();

    let refusals = Arc::new(Refusals::default());
    let sender = {
        let (ledger, permits, stop, queue) = (Arc::clone(&ledger), Arc::clone(&permits), stop.clone(), queue.clone());
        let refusals = Arc::clone(&refusals);
        let channel = client.channel.clone();
        let task_queue = client.task_queue.clone();
        tokio::spawn(async move {
            let mut rng = options.seed | 1;
            let mut sent = 0u64;
            // Confirms and the pauses before a refused task is published again.
            let mut pending = FuturesUnordered::<BoxFuture<'static, Event>>::new();
            let mut next_id = 0u64;
            while next_id < options.tasks || !pending.is_empty() {
                let (id, attempt, body) = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    Some(event) = pending.next(), if !pending.is_empty() => match event {
                        Event::Accepted => continue,
                        Event::Refused { id, attempt, body } if attempt < PUBLISH_ATTEMPTS => {
                            refusals.republished.fetch_add(1, Ordering::Relaxed);
                            refusals.changed.notify_one();
                            pending.push(async move {
                                tokio::time::sleep(republish_pause(attempt)).await;
                                Event::Again { id, attempt: attempt + 1, body }
                            }.boxed());
                            continue;
                        }
                        Event::Refused { .. } => {
                            // Never to be answered: its slot goes to the next task.
                            refusals.refused.fetch_add(1, Ordering::Relaxed);
                            refusals.changed.notify_one();
                            permits.add_permits(1);
                            continue;
                        }
                        Event::Again { id, attempt, body } => (id, attempt, body),
                    },
                    permit = Arc::clone(&permits).acquire_owned(), if next_id < options.tasks => {
                        // Released by the receiver when the reply arrives.
                        if let Ok(permit) = permit {
                            permit.forget();
                        }
                        let id = next_id;
                        next_id += 1;
                        let phones =
                            if options.disjoint { disjoint_phones(id, &options) } else { pick_phones(&mut rng, &options) };
                        ledger.lock().sent_at[id as usize] = Some(Instant::now());
                        sent += 1;
                        (id, 1, task_body(id, &phones))
                    }
                };
                let properties = persistent_json().with_reply_to(queue.clone());
                let published = channel
                    .basic_publish("".into(), task_queue.clone(), BasicPublishOptions::default(), &body, properties)
                    .await;
                let Ok(confirm) = published else { break };
                pending.push(
                    async move {
                        match confirm.await {
                            Ok(lapin::Confirmation::Ack(_)) => Event::Accepted,
                            _ => Event::Refused { id, attempt, body },
                        }
                    }
                    .boxed(),
                );
            }
            sent
        })
    };
    let progress_now = |answered| Progress {
        answered,
        republished: refusals.republished.load(Ordering::Relaxed),
        refused: refusals.refused.load(Ordering::Relaxed),
    };

    // 1 us .. 10 min at 3 significant digits; infallible for these constant bounds.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds");
    let (mut answered, mut errors, mut duplicates) = (0u64, 0u64, 0u64);
    while answered < options.tasks {
        let next = tokio::select! {
            next = tokio::time::timeout(options.idle_timeout, replies.next()) => next,
            () = refusals.changed.notified() => {
                progress(progress_now(answered));
                continue;
            }
        };
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(source))) => return Err(ClientError::Amqp { operation: "consume", source }),
            Ok(None) | Err(_) => break,
        };
        let Some(id) = reply_id(&delivery).filter(|&id| id < options.tasks) else { continue };
        let fresh = {
            let mut ledger = ledger.lock();
            let first = !ledger.answered[id as usize];
            ledger.answered[id as usize] = true;
            if first && let Some(sent) = ledger.sent_at[id as usize] {
                histogram.saturating_record(sent.elapsed().as_micros() as u64);
            }
            first
        };
        if !fresh {
            duplicates += 1;
            continue;
        }
        answered += 1;
        errors += u64::from(is_error_report(&delivery.data));
        permits.add_permits(1);
        progress(progress_now(answered));
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let sent = sender.await.unwrap_or_default();
    let Progress { republished, refused, .. } = progress_now(answered);
    let ms = |micros: u64| micros as f64 / 1000.0;
    let latency = Latency {
        p50_ms: ms(histogram.value_at_quantile(0.50)),
        p90_ms: ms(histogram.value_at_quantile(0.90)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        p999_ms: ms(histogram.value_at_quantile(0.999)),
        max_ms: ms(histogram.max()),
    };
    Ok(LoadSummary {
        tasks: options.tasks,
        concurrency: options.concurrency,
        sent,
        republished,
        refused,
        answered,
        error_reports: errors,
        duplicates,
        unanswered: sent.saturating_sub(answered),
        not_sent: options.tasks - sent,
        elapsed_s: elapsed.as_secs_f64(),
        throughput_per_s: answered as f64 / elapsed.as_secs_f64().max(1e-9),
        latency,
    })
}

/// Task `id`'s block of consecutive phones.
fn disjoint_phones(id: u64, options: &LoadOptions) -> Vec<u64> {
    let range = options.hot_set.unwrap_or(options.phone_max).max(1);
    let k = options.phones_per_task as u64;
    (0..k).map(|j| options.phone_base + (id * k + j) % range).collect()
}

/// `phones_per_task` distinct phones (when the range allows) from the configured range.
fn pick_phones(rng: &mut u64, options: &LoadOptions) -> Vec<u64> {
    let range = options.hot_set.unwrap_or(options.phone_max).max(1);
    let mut phones = Vec::with_capacity(options.phones_per_task);
    while phones.len() < options.phones_per_task {
        // xorshift64
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let phone = options.phone_base + *rng % range;
        if !phones.contains(&phone) || phones.len() as u64 >= range {
            phones.push(phone);
        }
    }
    phones
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused task waits 0.2 s, then twice as long after each further refusal, at
    /// most 5 s: its eight attempts span about 16 s.
    #[test]
    fn a_refused_task_waits_longer_after_each_refusal_up_to_five_seconds() {
        let pauses: Vec<u64> =
            (1..PUBLISH_ATTEMPTS).map(|attempt| republish_pause(attempt).as_millis() as u64).collect();
        assert_eq!(pauses, [200, 400, 800, 1_600, 3_200, 5_000, 5_000]);
        assert_eq!(republish_pause(u32::MAX), MAX_REPUBLISH_PAUSE);
    }

    #[test]
    fn picked_phones_are_distinct_and_in_range() {
        let options = LoadOptions {
            tasks: 1,
            concurrency: 1,
            phones_per_task: 10,
            phone_max: 200,
            phone_base: 0,
            hot_set: Some(12),
            disjoint: false,
            idle_timeout: Duration::from_secs(1),
            seed: 3,
        };
        let mut rng = 3;
        for _ in 0..100 {
            let phones = pick_phones(&mut rng, &options);
            assert_eq!(phones.len(), 10);
            assert!(phones.iter().all(|&p| p < 12));
            let mut distinct = phones.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 10);
        }
    }

    #[test]
    fn disjoint_tasks_share_no_phone() {
        let options = LoadOptions {
            tasks: 10,
            concurrency: 10,
            phones_per_task: 10,
            phone_max: 200,
            phone_base: 0,
            hot_set: None,
            disjoint: true,
            idle_timeout: Duration::from_secs(1),
            seed: 1,
        };
        let mut all: Vec<u64> = (0..10).flat_map(|id| disjoint_phones(id, &options)).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_run_passes_only_when_every_task_is_answered_without_errors() {
        let ok = LoadSummary { tasks: 3, sent: 3, answered: 3, ..LoadSummary::default() };
        assert!(ok.passed());
        assert!(!LoadSummary { unanswered: 1, ..ok }.passed());
        assert!(!LoadSummary { not_sent: 1, ..ok }.passed());
        assert!(!LoadSummary { error_reports: 1, ..ok }.passed());
    }
}
