//! Messages the AMQP client cannot decode, moved out of the task queue.
//!
//! lapin decodes every AMQP short string (`message_id`, `reply_to`, header names, ...)
//! as UTF-8, and a header of a type it does not know as an error; either one is fatal to
//! the whole connection. The broker requeues the message and delivers it to the next
//! connection, and the next: without help, one message a Go client wrote with raw UUID
//! bytes in `message_id` wedges every consumer of the queue.
//!
//! When a session ends that way, the consume loop runs a [`Sweeper`] before it consumes
//! again: a short-lived connection of the minimal raw client (the `amqp-raw` crate) consumes the task
//! queue with the highest consumer priority (so it receives the head of the queue ahead
//! of every instance's ordinary consumer), copies each message lapin could not decode
//! to the DLQ (reason `undecodable`, confirmed) and acks it, then closes, which returns
//! every other message it received to the queue unchanged. The copy's strings are
//! escaped (`\xNN` for bytes that are not UTF-8) so any client can read it; its body is
//! the original's.

use super::outgoing::{Origin, Reason, raw_dead_letter_properties};
use super::topology::Topology;
use crate::broker::{AmqpAddresses, TlsSettings};
use crate::message::format_timestamp;
use crate::platform::shutdown::Shutdown;
use amqp_raw::{RawClient, RawConfirm, RawDelivery, RawError, escape_bytes, table_problem};
use std::time::{Duration, Instant, SystemTime};

/// How long the sweeper waits for more messages after the last one it received.
const IDLE: Duration = Duration::from_millis(300);
/// How long it receives at most.
const WINDOW: Duration = Duration::from_secs(2);
/// How long one whole sweep may take.
const SWEEP_LIMIT: Duration = Duration::from_secs(15);
/// Bodies it holds at once, in bytes, at most (it stops receiving beyond).
const MAX_HELD_BYTES: usize = 256 << 20;

/// Moves undecodable messages from the head of the task queue to the DLQ.
#[derive(Debug, Clone)]
pub struct Sweeper {
    addresses: AmqpAddresses,
    tls: TlsSettings,
    task_queue: String,
    dead_letter_queue: String,
    instance: String,
    /// How many messages one sweep may hold: the service's prefetch window, twice, so
    /// the message that broke the session is among them.
    window: u16,
}

impl Sweeper {
    /// A sweeper for `topology`'s task queue, naming `instance` in dead-letter headers.
    pub fn new(topology: &Topology, instance: &str) -> Sweeper {
        Sweeper {
            addresses: topology.addresses.clone(),
            tls: topology.tls.clone(),
            task_queue: topology.task_queue.clone(),
            dead_letter_queue: topology.dead_letter_queue.clone(),
            instance: instance.to_owned(),
            window: topology.prefetch.saturating_mul(2),
        }
    }

    /// One sweep, bounded in time and by shutdown, through the node at position `node`
    /// of the address list or, if it cannot be reached, the next that can; returns how
    /// many messages it moved.
    pub async fn sweep(&self, node: usize, shutdown: &Shutdown) -> Result<u64, RawError> {
        tokio::select! {
            _ = shutdown.cancelled() => Ok(0),
            swept = tokio::time::timeout(SWEEP_LIMIT, self.sweep_once(node)) => swept.unwrap_or(Err(RawError::Timeout(SWEEP_LIMIT))),
        }
    }

    /// A connection to the first node that answers, from position `node` on.
    async fn connect(&self, node: usize) -> Result<RawClient, RawError> {
        let name = format!("report-service {} sweep of {}", self.instance, self.task_queue);
        let urls = self.addresses.urls();
        let mut last = None;
        for offset in 0..urls.len() {
            let url = &urls[(node + offset) % urls.len()];
            match crate::broker::raw::connect(url, &self.tls, &name).await {
                Ok(client) => return Ok(client),
                Err(error) => {
                    tracing::debug!(broker = %url, %error, "the sweep cannot reach this node");
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or(RawError::Protocol("no broker address")))
    }

    async fn sweep_once(&self, node: usize) -> Result<u64, RawError> {
        let mut client = self.connect(node).await?;
        let name = format!("report-service {} sweep of {}", self.instance, self.task_queue);
        let tag = name.as_bytes();
        client.qos(self.window).await?;
        client.consume(self.task_queue.as_bytes(), tag, i32::MAX).await?;
        let mut received: Vec<RawDelivery> = Vec::new();
        let (started, mut held) = (Instant::now(), 0usize);
        while received.len() < usize::from(self.window) && held < MAX_HELD_BYTES {
            let wait = IDLE.min(WINDOW.saturating_sub(started.elapsed()));
            match tokio::time::timeout(wait, client.next_delivery()).await {
                Ok(delivery) => {
                    let delivery = delivery?;
                    held += delivery.body.len();
                    received.push(delivery);
                }
                Err(_) => break,
            }
        }
        received.extend(client.cancel(tag).await?);
        let mut moved = 0;
        for delivery in &received {
            let Some(why) = undecodable(delivery) else { continue };
            let copy = self.dead_letter_copy(delivery, &why);
            match client.publish(self.dead_letter_queue.as_bytes(), &copy, &delivery.body).await? {
                RawConfirm::Queued => {
                    client.ack(delivery.delivery_tag).await?;
                    moved += 1;
                    tracing::warn!(
                        reason = why.as_str(),
                        bytes = delivery.body.len(),
                        "undecodable message dead-lettered"
                    );
                }
                refused => tracing::error!(?refused, "the dead-letter queue did not take an undecodable message"),
            }
        }
        client.close().await;
        Ok(moved)
    }

    /// The DLQ copy, built by `outgoing` from the raw properties (every string escaped).
    fn dead_letter_copy(&self, delivery: &RawDelivery, why: &str) -> amqp_raw::RawProperties {
        let (exchange, routing_key) = (escape_bytes(&delivery.exchange), escape_bytes(&delivery.routing_key));
        let origin = Origin {
            queue: &self.task_queue,
            exchange: &exchange,
            routing_key: &routing_key,
            redelivered: delivery.redelivered,
        };
        let reason = Reason {
            code: "undecodable",
            detail: why.to_owned(),
            at: format_timestamp(SystemTime::now()),
            by: &self.instance,
            attempts: None,
        };
        raw_dead_letter_properties(&delivery.properties, origin, &reason)
    }
}

/// Why lapin cannot decode this message, if it cannot.
pub fn undecodable(delivery: &RawDelivery) -> Option<String> {
    let p = &delivery.properties;
    let strings: [(&str, Option<&Vec<u8>>); 12] = [
        ("exchange", Some(&delivery.exchange)),
        ("routing key", Some(&delivery.routing_key)),
        ("content_type", p.content_type.as_ref()),
        ("content_encoding", p.content_encoding.as_ref()),
        ("correlation_id", p.correlation_id.as_ref()),
        ("reply_to", p.reply_to.as_ref()),
        ("expiration", p.expiration.as_ref()),
        ("message_id", p.message_id.as_ref()),
        ("type", p.kind.as_ref()),
        ("user_id", p.user_id.as_ref()),
        ("app_id", p.app_id.as_ref()),
        ("cluster_id", p.cluster_id.as_ref()),
    ];
    for (name, value) in strings {
        if let Some(value) = value
            && std::str::from_utf8(value).is_err()
        {
            return Some(format!("the {name} {} is not UTF-8", escape_bytes(value)));
        }
    }
    p.headers.as_ref().and_then(|table| table_problem(&table.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_raw::{RawProperties, RawTable, RawValue};

    fn delivery(properties: RawProperties) -> RawDelivery {
        RawDelivery {
            delivery_tag: 1,
            redelivered: false,
            exchange: Vec::new(),
            routing_key: b"task_report".to_vec(),
            properties,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_short_string_that_is_not_utf8_or_a_bad_header_makes_a_message_undecodable() {
        assert_eq!(undecodable(&delivery(RawProperties::default())), None);
        let id = RawProperties { message_id: Some(vec![0x12, 0xff, 0x34]), ..RawProperties::default() };
        assert_eq!(undecodable(&delivery(id)).as_deref(), Some("the message_id \u{12}\\xff4 is not UTF-8"));
        let key = RawTable::from_fields(vec![(vec![0xc3], RawValue::Void)]);
        let headers = RawProperties { headers: Some(key), ..RawProperties::default() };
        assert!(undecodable(&delivery(headers)).unwrap().starts_with("the header name"));
        let value = RawTable::from_fields(vec![(b"k".to_vec(), RawValue::LongString(vec![0xff]))]);
        let fine = RawProperties { headers: Some(value), reply_to: Some(b"r".to_vec()), ..RawProperties::default() };
        assert_eq!(undecodable(&delivery(fine)), None, "header values are bytes for lapin too");
    }
}
