//! Bounded retries: when a task's processing fails, it is tried again later, with a
//! growing delay, and after [`RetryPolicy::max_attempts`] it is dead-lettered with reason
//! `retries_exhausted`. Pure policy; the pipeline applies it, `outgoing` builds the copy.
//!
//! The count travels with the message, so it holds across redeliveries, instances and
//! restarts: a failed task is republished (publisher-confirmed) with the header
//! [`ATTEMPTS_HEADER`] set to the failures so far, into a retry queue whose
//! `x-message-ttl` is the delay, and which dead-letters expired messages back into the
//! task queue; then the original is acked. No instance holds the task while it waits,
//! so a failing task never occupies a prefetch slot or a core. One retry queue exists
//! per distinct delay (`<TASK_QUEUE>.retry.<ms>ms`): per-message TTLs would expire only
//! at the head of a shared queue. A crash between the confirmed republish and the ack
//! leaves two copies (answered twice at worst, as at-least-once allows); a crash while
//! processing is not counted (the broker redelivers the task as it was).

use super::outgoing::ATTEMPTS_HEADER;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use std::num::NonZeroU32;
use std::time::Duration;

/// Delays double from the configured first delay up to this.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// The longest suffix the service adds to `TASK_QUEUE` for its retry queues
/// (`.retry.300000ms`), so queue names stay within AMQP's 255 bytes.
pub const QUEUE_SUFFIX_MAX_LEN: usize = ".retry.300000ms".len();

/// How many times a task is attempted and how long it waits between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a failing task is dead-lettered (`MAX_ATTEMPTS`, default 5).
    pub max_attempts: NonZeroU32,
    /// The wait after the first failure (`RETRY_DELAY_MS`, default 1 s); it doubles with
    /// each further failure, up to [`MAX_DELAY`].
    pub first_delay: Duration,
}

/// What to do with a task whose attempt number `attempt` just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Republish it with `attempts` recorded, to come back after `delay`.
    Retry {
        /// Attempts made so far, this one included.
        attempts: u32,
        /// How long it waits in its retry queue.
        delay: Duration,
    },
    /// Dead-letter it with reason `retries_exhausted`.
    GiveUp {
        /// Attempts made, all failed.
        attempts: u32,
    },
}

impl RetryPolicy {
    /// The step after a failure of a message that had already failed `previous` times.
    pub fn after_failure(&self, previous: u32) -> NextStep {
        let attempts = previous.saturating_add(1);
        if attempts >= self.max_attempts.get() {
            NextStep::GiveUp { attempts }
        } else {
            NextStep::Retry { attempts, delay: self.delay(attempts) }
        }
    }

    /// The wait after the `failures`-th failure (1-based): first, doubled each time.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first_delay.saturating_mul(1 << doublings).min(MAX_DELAY)
    }

    /// Every delay a retry can use, ascending and distinct: one retry queue each.
    pub fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = (1..self.max_attempts.get()).map(|n| self.delay(n)).collect();
        delays.dedup();
        delays
    }
}

/// The retry queue for `delay`.
pub fn queue_name(task_queue: &str, delay: Duration) -> String {
    format!("{task_queue}.retry.{}ms", delay.as_millis())
}

/// The arguments a retry queue is declared with: messages wait `delay`, then return to
/// the task queue through the default exchange.
pub fn queue_arguments(task_queue: &str, delay: Duration) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(task_queue.as_bytes().into()));
    arguments
}

/// The header a quorum queue sets on a redelivery: how often it was delivered before.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// A redelivery whose [`DELIVERY_COUNT_HEADER`] is at least this is renewed (put back as a
/// fresh copy) before it is handled. Quorum queues drop (or dead-letter) a message after
/// a delivery limit, 20 by default in RabbitMQ 4.x and any number by policy; the service
/// cannot see that limit, so it renews at the first redelivery and the count never
/// grows. Classic queues set no count: nothing changes there.
pub const RENEW_AT_DELIVERY_COUNT: u32 = 1;

/// How often the queue says a message was delivered before (0 without the header).
pub fn delivery_count(properties: &BasicProperties) -> u32 {
    integer_header(properties, DELIVERY_COUNT_HEADER)
}

/// Failed attempts recorded on a message: its [`ATTEMPTS_HEADER`] when that is a
/// non-negative integer, else 0.
pub fn attempts_of(properties: &BasicProperties) -> u32 {
    integer_header(properties, ATTEMPTS_HEADER)
}

/// Header `name` as a non-negative integer of any AMQP integer type, else 0.
fn integer_header(properties: &BasicProperties, name: &str) -> u32 {
    let Some(value) = properties.headers().as_ref().and_then(|h| h.inner().get(name)) else {
        return 0;
    };
    let n: i128 = match value {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32, first_ms: u64) -> RetryPolicy {
        RetryPolicy { max_attempts: NonZeroU32::new(max).unwrap(), first_delay: Duration::from_millis(first_ms) }
    }

    #[test]
    fn delays_double_from_the_first_to_the_cap() {
        let p = policy(5, 1000);
        let delays: Vec<u64> = (1..=4).map(|n| p.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [1000, 2000, 4000, 8000]);
        assert_eq!(p.delays().len(), 4);
        assert_eq!(policy(100, 1000).delay(40), MAX_DELAY);
        assert_eq!(policy(100, 1000).delays().last(), Some(&MAX_DELAY));
        assert_eq!(policy(100, 1000).delays().len(), 10, "1 s .. 256 s, then the cap: one queue per distinct delay");
        assert!(policy(1, 1000).delays().is_empty(), "one attempt: no retries");
    }

    #[test]
    fn a_task_is_retried_until_its_last_attempt_fails() {
        let p = policy(3, 100);
        assert_eq!(p.after_failure(0), NextStep::Retry { attempts: 1, delay: Duration::from_millis(100) });
        assert_eq!(p.after_failure(1), NextStep::Retry { attempts: 2, delay: Duration::from_millis(200) });
        assert_eq!(p.after_failure(2), NextStep::GiveUp { attempts: 3 });
        assert_eq!(p.after_failure(u32::MAX), NextStep::GiveUp { attempts: u32::MAX });
        assert_eq!(policy(1, 100).after_failure(0), NextStep::GiveUp { attempts: 1 });
    }

    #[test]
    fn the_attempt_count_is_read_from_any_integer_header_and_nothing_else() {
        let with = |value: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(ATTEMPTS_HEADER.into(), value);
            BasicProperties::default().with_headers(headers)
        };
        assert_eq!(attempts_of(&BasicProperties::default()), 0);
        assert_eq!(attempts_of(&with(AMQPValue::LongLongInt(3))), 3);
        assert_eq!(attempts_of(&with(AMQPValue::ShortShortUInt(2))), 2);
        assert_eq!(attempts_of(&with(AMQPValue::ShortShortInt(4))), 4);
        assert_eq!(attempts_of(&with(AMQPValue::ShortInt(5))), 5);
        assert_eq!(attempts_of(&with(AMQPValue::ShortUInt(6))), 6);
        assert_eq!(attempts_of(&with(AMQPValue::LongInt(7))), 7);
        assert_eq!(attempts_of(&with(AMQPValue::LongUInt(8))), 8);
        assert_eq!(attempts_of(&with(AMQPValue::ShortShortInt(-1))), 0);
        assert_eq!(attempts_of(&with(AMQPValue::LongLongInt(-4))), 0);
        assert_eq!(attempts_of(&with(AMQPValue::LongLongInt(i64::MAX))), u32::MAX);
        assert_eq!(attempts_of(&with(AMQPValue::LongString("3".into()))), 0);
    }

    #[test]
    fn a_quorum_queues_delivery_count_is_read_and_absent_means_zero() {
        let with = |value: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(DELIVERY_COUNT_HEADER.into(), value);
            BasicProperties::default().with_headers(headers)
        };
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(1))), 1);
        assert_eq!(delivery_count(&with(AMQPValue::LongInt(20))), 20);
        assert_eq!(attempts_of(&with(AMQPValue::LongLongInt(7))), 0, "a delivery count is no attempt");
    }

    #[test]
    fn retry_queues_return_expired_tasks_to_the_task_queue() {
        let args = queue_arguments("task_report", Duration::from_millis(1500));
        let args = args.inner();
        assert_eq!(args.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(1500)));
        assert_eq!(args.get("x-dead-letter-exchange"), Some(&AMQPValue::LongString("".into())));
        assert_eq!(args.get("x-dead-letter-routing-key"), Some(&AMQPValue::LongString("task_report".into())));
        assert_eq!(queue_name("task_report", Duration::from_millis(1500)), "task_report.retry.1500ms");
        assert!(queue_name("q", MAX_DELAY).len() - 1 <= QUEUE_SUFFIX_MAX_LEN);
    }
}
