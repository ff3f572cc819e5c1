//! The dead-letter copy of a message: which of the original's properties it keeps and
//! what its headers say. Pure: no I/O (the broker module publishes what this builds).
//!
//! The copy is built, never cloned. Properties the broker acts on would turn the copy
//! against the service: a `CC` or `BCC` header re-routes it (back into the task queue: a
//! loop), `expiration` makes it vanish from the DLQ, and a `user_id` that is not the
//! service's own makes the broker close the publishing channel. So the copy keeps only
//! what describes the message:
//!
//! | kept as a property | `content_type`, `content_encoding`, `correlation_id`, `message_id`, `timestamp`, `type`, `app_id` |
//! |---|---|
//! | set | `delivery_mode` 2 (persistent) |
//! | moved under a header | the original headers (`x-original-headers`, a table), `reply_to`, `expiration`, `user_id`, `priority`, `delivery_mode`, `cluster_id` (`x-original-<name>`) |
//!
//! and adds `x-rejection-reason`, `x-rejection-detail`, `x-rejected-at`, `x-rejected-by`,
//! `x-original-queue`, `x-original-exchange`, `x-original-routing-key`,
//! `x-original-redelivered` and, for retried tasks, `x-attempts`. Original headers nested
//! deeper than [`MAX_HEADER_DEPTH`] or larger than [`MAX_HEADER_BYTES`] are not copied
//! (`x-original-headers-dropped` says why): the copy must fit in one AMQP frame, and
//! walking a table must never recurse without bound.

use crate::message::bounded;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Header tables nested deeper than this are not copied.
pub const MAX_HEADER_DEPTH: usize = 32;
/// Header tables larger than this (encoded) are not copied: with the rest of the copy's
/// properties they must fit in one frame (RabbitMQ's default `frame_max` is 128 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Where and how a message was received, for the copy's headers.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The exchange it was published to.
    pub exchange: &'a str,
    /// The routing key it was published with.
    pub routing_key: &'a str,
    /// Whether it had been delivered before.
    pub redelivered: bool,
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone)]
pub struct Reason<'a> {
    /// The stable code (`not_json`, `retries_exhausted`, ...).
    pub code: &'static str,
    /// For a person, at most `MAX_DETAIL_BYTES`.
    pub detail: String,
    /// `x-rejected-at`, as `message::format_timestamp` writes it.
    pub at: String,
    /// `x-rejected-by`: which instance.
    pub by: &'a str,
    /// Processing attempts made, for `retries_exhausted`.
    pub attempts: Option<u32>,
}

/// The properties of the dead-letter copy of a message with `original` properties.
pub fn copy_properties(original: &BasicProperties, origin: Origin<'_>, reason: &Reason<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut text = |key: &str, value: &str| {
        headers.insert(key.into(), AMQPValue::LongString(LongString::from(value.as_bytes())));
    };
    text("x-rejection-reason", reason.code);
    text("x-rejection-detail", &bounded(reason.detail.clone()));
    text("x-rejected-at", &reason.at);
    text("x-rejected-by", reason.by);
    text("x-original-queue", origin.queue);
    text("x-original-exchange", origin.exchange);
    text("x-original-routing-key", origin.routing_key);
    for (key, value) in [
        ("x-original-reply-to", original.reply_to()),
        ("x-original-expiration", original.expiration()),
        ("x-original-user-id", original.user_id()),
        ("x-original-cluster-id", original.cluster_id()),
    ] {
        if let Some(value) = value {
            text(key, value.as_str());
        }
    }
    headers.insert("x-original-redelivered".into(), AMQPValue::Boolean(origin.redelivered));
    for (key, value) in
        [("x-original-priority", original.priority()), ("x-original-delivery-mode", original.delivery_mode())]
    {
        if let Some(value) = value {
            headers.insert(key.into(), AMQPValue::ShortShortUInt(*value));
        }
    }
    if let Some(attempts) = reason.attempts {
        headers.insert(crate::retry::ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    }
    if let Some(original_headers) = original.headers() {
        match copyable(original_headers) {
            Ok(()) => {
                headers.insert("x-original-headers".into(), AMQPValue::FieldTable(original_headers.clone()));
            }
            Err(why) => {
                headers.insert("x-original-headers-dropped".into(), AMQPValue::LongString(why.into_bytes().into()));
            }
        }
    }
    let mut copy = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    if let Some(v) = original.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = original.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    copy
}

/// Whether `table` may be copied into another message's headers; if not, why. Walks
/// at most [`MAX_HEADER_DEPTH`] levels, so a hostile table costs no recursion beyond
/// that (it must be checked before it is cloned: cloning recurses through every level).
pub fn copyable(table: &FieldTable) -> Result<(), String> {
    match table_size(table, 1) {
        Some(bytes) if bytes <= MAX_HEADER_BYTES => Ok(()),
        Some(bytes) => Err(format!("{bytes} bytes, over the {MAX_HEADER_BYTES}-byte limit")),
        None => Err(format!("nested deeper than {MAX_HEADER_DEPTH} levels")),
    }
}

/// The encoded size of a table's fields (plus its length prefix); `None` when it nests
/// deeper than [`MAX_HEADER_DEPTH`].
fn table_size(table: &FieldTable, depth: usize) -> Option<usize> {
    if depth > MAX_HEADER_DEPTH {
        return None;
    }
    let mut size = 4;
    for (key, value) in table.inner() {
        size += 1 + key.as_str().len() + value_size(value, depth)?;
    }
    Some(size)
}

/// The encoded size of one value with its type letter.
fn value_size(value: &AMQPValue, depth: usize) -> Option<usize> {
    let payload = match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 4 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldTable(t) => table_size(t, depth + 1)?,
        AMQPValue::FieldArray(items) => {
            if depth + 1 > MAX_HEADER_DEPTH {
                return None;
            }
            let mut size = 4;
            for item in items.as_slice() {
                size += value_size(item, depth + 1)?;
            }
            size
        }
    };
    Some(1 + payload)
}

/// A short string from text a client controls: cut at 255 bytes (a character boundary),
/// so building it never fails (lapin's `From<&str>` panics on longer text).
pub fn short_lossy(text: &str) -> ShortString {
    let cut = (0..=text.len().min(255)).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    ShortString::try_new(&text[..cut]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin { queue: "task_report", exchange: "", routing_key: "task_report", redelivered: true }
    }

    fn reason() -> Reason<'static> {
        Reason {
            code: "not_json",
            detail: "x".repeat(10_000),
            at: "2026-11-28 00:00:00.000000".into(),
            by: "host 1",
            attempts: None,
        }
    }

    fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
        props.headers().as_ref()?.inner().get(key)
    }

    fn text(props: &BasicProperties, key: &str) -> String {
        match header(props, key) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn the_copy_keeps_what_describes_the_message_and_moves_what_the_broker_acts_on() {
        let mut original_headers = FieldTable::default();
        original_headers
            .insert("CC".into(), AMQPValue::FieldArray(vec![AMQPValue::LongString("task_report".into())].into()));
        original_headers.insert("BCC".into(), AMQPValue::FieldArray(vec![AMQPValue::LongString("x".into())].into()));
        original_headers.insert("trace".into(), AMQPValue::LongString("abc".into()));
        let original = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_correlation_id("c-1".into())
            .with_message_id("m-1".into())
            .with_timestamp(17)
            .with_type("task".into())
            .with_app_id("client".into())
            .with_reply_to("replies".into())
            .with_expiration("1".into())
            .with_user_id("someone".into())
            .with_cluster_id("cl".into())
            .with_priority(7)
            .with_delivery_mode(1)
            .with_headers(original_headers.clone());
        let copy = copy_properties(&original, origin(), &reason());
        assert_eq!(copy.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(copy.content_encoding().as_ref().map(|s| s.as_str()), Some("gzip"));
        assert_eq!(copy.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!((*copy.timestamp(), *copy.delivery_mode()), (Some(17), Some(2)));
        assert_eq!(copy.kind().as_ref().map(|s| s.as_str()), Some("task"));
        assert_eq!(copy.app_id().as_ref().map(|s| s.as_str()), Some("client"));
        for gone in [copy.reply_to(), copy.expiration(), copy.user_id(), copy.cluster_id()] {
            assert_eq!(*gone, None);
        }
        assert_eq!(*copy.priority(), None);
        assert!(header(&copy, "CC").is_none() && header(&copy, "BCC").is_none(), "nothing the broker routes on");
        assert_eq!(header(&copy, "x-original-headers"), Some(&AMQPValue::FieldTable(original_headers)));
        assert_eq!(text(&copy, "x-original-reply-to"), "replies");
        assert_eq!(text(&copy, "x-original-expiration"), "1");
        assert_eq!(text(&copy, "x-original-user-id"), "someone");
        assert_eq!(text(&copy, "x-original-cluster-id"), "cl");
        assert_eq!(header(&copy, "x-original-priority"), Some(&AMQPValue::ShortShortUInt(7)));
        assert_eq!(header(&copy, "x-original-delivery-mode"), Some(&AMQPValue::ShortShortUInt(1)));
        assert_eq!(header(&copy, "x-original-redelivered"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(text(&copy, "x-rejection-reason"), "not_json");
        assert!(text(&copy, "x-rejection-detail").len() <= crate::message::MAX_DETAIL_BYTES);
        assert_eq!(
            (text(&copy, "x-rejected-by"), text(&copy, "x-original-queue")),
            ("host 1".into(), "task_report".into())
        );
        assert_eq!(text(&copy, "x-original-routing-key"), "task_report");
        assert!(header(&copy, crate::retry::ATTEMPTS_HEADER).is_none());
        let exhausted = Reason { code: "retries_exhausted", attempts: Some(5), ..reason() };
        let copy = copy_properties(&BasicProperties::default(), origin(), &exhausted);
        assert_eq!(header(&copy, crate::retry::ATTEMPTS_HEADER), Some(&AMQPValue::LongLongInt(5)));
    }

    #[test]
    fn headers_too_deep_or_too_large_are_not_copied() {
        // Cloning and dropping a table recurse once per level, as the client library's
        // decoding does: a table 10,000 deep needs a large stack (the service gives its
        // threads one, see `stack`), but checking it must not.
        let checked = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(|| {
                let mut deep = FieldTable::default();
                for _ in 0..10_000 {
                    let mut outer = FieldTable::default();
                    outer.insert("a".into(), AMQPValue::FieldTable(deep));
                    deep = outer;
                }
                let original = BasicProperties::default().with_headers(deep);
                let copy = copy_properties(&original, origin(), &reason());
                (header(&copy, "x-original-headers").is_some(), text(&copy, "x-original-headers-dropped"))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(checked, (false, "nested deeper than 32 levels".to_owned()));

        let mut large = FieldTable::default();
        large.insert("big".into(), AMQPValue::LongString(vec![b'x'; MAX_HEADER_BYTES].into()));
        let copy = copy_properties(&BasicProperties::default().with_headers(large), origin(), &reason());
        assert!(text(&copy, "x-original-headers-dropped").starts_with("65549 bytes, over"));

        // Tables and arrays both count as levels: 32 are copied, 33 are not.
        let nested = |levels: usize| {
            let mut table = FieldTable::default();
            table.insert("v".into(), AMQPValue::FieldArray(vec![AMQPValue::Void].into()));
            for _ in 0..levels - 2 {
                let mut outer = FieldTable::default();
                outer.insert("a".into(), AMQPValue::FieldTable(table));
                table = outer;
            }
            table
        };
        assert_eq!(copyable(&nested(MAX_HEADER_DEPTH)), Ok(()));
        assert!(copyable(&nested(MAX_HEADER_DEPTH + 1)).is_err());
    }

    #[test]
    fn short_strings_from_client_text_never_panic() {
        assert_eq!(short_lossy(&"é".repeat(200)).as_str().len(), 254);
        assert_eq!(short_lossy("ok").as_str(), "ok");
    }
}
