//! Messages the AMQP client cannot decode, moved out of the task queue.
//!
//! lapin decodes every AMQP short string (`message_id`, `reply_to`, header names, ...)
//! as UTF-8, and a header of a type it does not know as an error; either one is fatal to
//! the whole connection. The broker requeues the message and delivers it to the next
//! connection, and the next: without help, one message a Go client wrote with raw UUID
//! bytes in `message_id` wedges every consumer of the queue.
//!
//! When a session ends that way, the consume loop runs a [`Sweeper`] before it consumes
//! again: a short-lived connection of the minimal `broker::raw` client consumes the task
//! queue with the highest consumer priority (so it receives the head of the queue ahead
//! of every instance's ordinary consumer), copies each message lapin could not decode
//! to the DLQ (reason `undecodable`, confirmed) and acks it, then closes, which returns
//! every other message it received to the queue unchanged. The copy's strings are
//! escaped (`\xNN` for bytes that are not UTF-8) so any client can read it; its body is
//! the original's.

use crate::broker::Topology;
use crate::broker::raw::{
    Endpoint, RawClient, RawConfirm, RawDelivery, RawError, RawProperties, RawTable, RawValue, escape_bytes,
    table_problem,
};
use crate::dead_letter::{self, MAX_HEADER_BYTES, Origin, Reason, short_lossy};
use crate::message::format_timestamp;
use crate::shutdown::Shutdown;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, ShortString};
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
    endpoint: Option<Endpoint>,
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
        let endpoint = topology
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .ok()
            .map(|uri| Endpoint::from_uri(&uri, &topology.tls));
        Sweeper {
            endpoint,
            task_queue: topology.task_queue.clone(),
            dead_letter_queue: topology.dead_letter_queue.clone(),
            instance: instance.to_owned(),
            window: topology.prefetch.saturating_mul(2),
        }
    }

    /// One sweep, bounded in time and by shutdown; returns how many messages it moved.
    pub async fn sweep(&self, shutdown: &Shutdown) -> Result<u64, RawError> {
        tokio::select! {
            _ = shutdown.cancelled() => Ok(0),
            swept = tokio::time::timeout(SWEEP_LIMIT, self.sweep_once()) => swept.unwrap_or(Err(RawError::Timeout(SWEEP_LIMIT))),
        }
    }

    async fn sweep_once(&self) -> Result<u64, RawError> {
        let Some(endpoint) = &self.endpoint else { return Ok(0) };
        let name = format!("report-service {} sweep of {}", self.instance, self.task_queue);
        let mut client = RawClient::connect(endpoint, &name).await?;
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

    /// The DLQ copy: the dead-letter schema of `dead_letter`, from the original's
    /// properties with every string escaped.
    fn dead_letter_copy(&self, delivery: &RawDelivery, why: &str) -> RawProperties {
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
        let lossy = readable_properties(&delivery.properties);
        let mut copy = dead_letter::copy_properties(&lossy, origin, &reason);
        // A header table lapin cannot decode travels as bytes nobody has to decode.
        if let Some(table) = delivery.properties.headers.as_ref().filter(|t| t.fields.is_none()) {
            let mut headers = copy.headers().clone().unwrap_or_default();
            if table.bytes.len() <= MAX_HEADER_BYTES {
                headers.insert("x-original-headers-raw".into(), AMQPValue::ByteArray(table.bytes.clone().into()));
            } else {
                let why = format!("{} bytes, over the {MAX_HEADER_BYTES}-byte limit", table.bytes.len());
                headers.insert("x-original-headers-dropped".into(), AMQPValue::LongString(why.into()));
            }
            copy = copy.with_headers(headers);
        }
        raw_properties(&copy)
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

fn text(bytes: &[u8]) -> ShortString {
    short_lossy(&escape_bytes(bytes))
}

/// `raw` as lapin's properties, every string escaped; headers only when decodable.
fn readable_properties(raw: &RawProperties) -> BasicProperties {
    let mut p = BasicProperties::default();
    type Setter = fn(BasicProperties, ShortString) -> BasicProperties;
    let strings: [(&Option<Vec<u8>>, Setter); 10] = [
        (&raw.content_type, BasicProperties::with_content_type),
        (&raw.content_encoding, BasicProperties::with_content_encoding),
        (&raw.correlation_id, BasicProperties::with_correlation_id),
        (&raw.reply_to, BasicProperties::with_reply_to),
        (&raw.expiration, BasicProperties::with_expiration),
        (&raw.message_id, BasicProperties::with_message_id),
        (&raw.kind, BasicProperties::with_type),
        (&raw.user_id, BasicProperties::with_user_id),
        (&raw.app_id, BasicProperties::with_app_id),
        (&raw.cluster_id, BasicProperties::with_cluster_id),
    ];
    for (value, set) in strings {
        if let Some(value) = value {
            p = set(p, text(value));
        }
    }
    if let Some(mode) = raw.delivery_mode {
        p = p.with_delivery_mode(mode);
    }
    if let Some(priority) = raw.priority {
        p = p.with_priority(priority);
    }
    if let Some(timestamp) = raw.timestamp {
        p = p.with_timestamp(timestamp);
    }
    if let Some(fields) = raw.headers.as_ref().and_then(|t| t.fields.as_ref()) {
        p = p.with_headers(readable_table(fields));
    }
    p
}

fn readable_table(fields: &[(Vec<u8>, RawValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in fields {
        table.insert(text(key), readable_value(value));
    }
    table
}

fn readable_value(value: &RawValue) -> AMQPValue {
    match value {
        RawValue::Bool(v) => AMQPValue::Boolean(*v),
        RawValue::I8(v) => AMQPValue::ShortShortInt(*v),
        RawValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        RawValue::I16(v) => AMQPValue::ShortInt(*v),
        RawValue::U16(v) => AMQPValue::ShortUInt(*v),
        RawValue::I32(v) => AMQPValue::LongInt(*v),
        RawValue::U32(v) => AMQPValue::LongUInt(*v),
        RawValue::I64(v) => AMQPValue::LongLongInt(*v),
        RawValue::F32(v) => AMQPValue::Float(*v),
        RawValue::F64(v) => AMQPValue::Double(*v),
        RawValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue { scale: *scale, value: *value }),
        RawValue::LongString(s) => AMQPValue::LongString(s.clone().into()),
        RawValue::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(readable_value).collect::<Vec<_>>()))
        }
        RawValue::Timestamp(v) => AMQPValue::Timestamp(*v),
        RawValue::Table(fields) => AMQPValue::FieldTable(readable_table(fields)),
        RawValue::Bytes(b) => AMQPValue::ByteArray(b.clone().into()),
        RawValue::Void => AMQPValue::Void,
    }
}

/// lapin's properties as the raw client sends them.
fn raw_properties(p: &BasicProperties) -> RawProperties {
    let bytes = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().as_bytes().to_vec());
    RawProperties {
        content_type: bytes(p.content_type()),
        content_encoding: bytes(p.content_encoding()),
        headers: p.headers().as_ref().map(|h| RawTable::from_fields(raw_fields(h))),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: bytes(p.correlation_id()),
        reply_to: bytes(p.reply_to()),
        expiration: bytes(p.expiration()),
        message_id: bytes(p.message_id()),
        timestamp: *p.timestamp(),
        kind: bytes(p.kind()),
        user_id: bytes(p.user_id()),
        app_id: bytes(p.app_id()),
        cluster_id: bytes(p.cluster_id()),
    }
}

fn raw_fields(table: &FieldTable) -> Vec<(Vec<u8>, RawValue)> {
    table.inner().iter().map(|(key, value)| (key.as_str().as_bytes().to_vec(), raw_value(value))).collect()
}

fn raw_value(value: &AMQPValue) -> RawValue {
    match value {
        AMQPValue::Boolean(v) => RawValue::Bool(*v),
        AMQPValue::ShortShortInt(v) => RawValue::I8(*v),
        AMQPValue::ShortShortUInt(v) => RawValue::U8(*v),
        AMQPValue::ShortInt(v) => RawValue::I16(*v),
        AMQPValue::ShortUInt(v) => RawValue::U16(*v),
        AMQPValue::LongInt(v) => RawValue::I32(*v),
        AMQPValue::LongUInt(v) => RawValue::U32(*v),
        AMQPValue::LongLongInt(v) => RawValue::I64(*v),
        AMQPValue::Float(v) => RawValue::F32(*v),
        AMQPValue::Double(v) => RawValue::F64(*v),
        AMQPValue::DecimalValue(d) => RawValue::Decimal { scale: d.scale, value: d.value },
        AMQPValue::ShortString(s) => RawValue::LongString(s.as_str().as_bytes().to_vec()),
        AMQPValue::LongString(s) => RawValue::LongString(s.as_bytes().to_vec()),
        AMQPValue::FieldArray(items) => RawValue::Array(items.as_slice().iter().map(raw_value).collect()),
        AMQPValue::Timestamp(v) => RawValue::Timestamp(*v),
        AMQPValue::FieldTable(t) => RawValue::Table(raw_fields(t)),
        AMQPValue::ByteArray(b) => RawValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => RawValue::Void,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_copy_of_an_undecodable_message_is_readable_and_keeps_the_original_bytes_escaped() {
        let topology = Topology {
            url: crate::config::Config::from_vars(&Default::default()).unwrap().amqp_url,
            tls: crate::tls::TlsSettings::system_only(),
            task_queue: "tasks".into(),
            report_queue: "reports".into(),
            dead_letter_queue: "dlq".into(),
            retry_queues: Vec::new(),
            prefetch: 4,
            connection_name: "test".into(),
        };
        let sweeper = Sweeper::new(&topology, "host 1");
        let headers = RawTable::from_fields(vec![(vec![b'k', 0xfe], RawValue::LongString(b"v".to_vec()))]);
        let original = RawProperties {
            message_id: Some(vec![0xff; 16]),
            user_id: Some(b"someone".to_vec()),
            headers: Some(headers),
            ..RawProperties::default()
        };
        let copy = sweeper.dead_letter_copy(&delivery(original), "why");
        assert_eq!(copy.message_id.as_deref(), Some("\\xff".repeat(16).as_bytes()));
        assert_eq!(copy.user_id, None, "moved under x-original-user-id");
        let table = copy.headers.expect("headers");
        assert_eq!(table_problem(&table.bytes), None, "lapin decodes the copy");
        let fields = table.fields.expect("decodable");
        let find = |key: &[u8]| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(find(b"x-rejection-reason"), Some(RawValue::LongString(b"undecodable".to_vec())));
        assert_eq!(find(b"x-original-user-id"), Some(RawValue::LongString(b"someone".to_vec())));
        assert_eq!(
            find(b"x-original-headers"),
            Some(RawValue::Table(vec![(b"k\\xfe".to_vec(), RawValue::LongString(b"v".to_vec()))]))
        );
    }
}
