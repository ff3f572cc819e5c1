//! Every message the service publishes besides a report's body: the report's properties,
//! and the copies of a received message (dead-letter and retry), built by one routine
//! from one table of rules. Pure: no I/O.
//!
//! A copy is built, never cloned. Properties the broker acts on would turn the copy
//! against the service: a `CC` or `BCC` header re-routes it (back into the task queue: a
//! loop), `expiration` makes it vanish, and a `user_id` that is not the service's own
//! makes the broker close the publishing channel. [`RULES`] says, for each property, what
//! a dead-letter copy and a retry copy do with it:
//!
//! | property | dead-letter copy | retry copy |
//! |---|---|---|
//! | `content_type`, `content_encoding`, `correlation_id`, `message_id`, `timestamp`, `type`, `app_id` | kept | kept |
//! | `reply_to`, `priority` | moved under `x-original-<name>` | kept |
//! | `expiration`, `user_id`, `cluster_id` | moved under `x-original-<name>` | dropped |
//! | `delivery_mode` | moved under `x-original-delivery-mode`; the copy is persistent (2) | persistent (2) |
//! | headers | nested as a table under `x-original-headers` | kept, without `CC` and `BCC` |
//!
//! A dead-letter copy adds `x-rejection-reason`, `x-rejection-detail`, `x-rejected-at`,
//! `x-rejected-by`, `x-original-queue`, `x-original-exchange`, `x-original-routing-key`,
//! `x-original-redelivered` and, after retries, [`ATTEMPTS_HEADER`]; a retry copy sets
//! [`ATTEMPTS_HEADER`]; a renewed copy (a redelivered task put back fresh, so a quorum
//! queue's delivery limit never drops it) is a retry copy that keeps the attempts it had.
//! Neither carries `CC`, `BCC` or the queue's `x-delivery-count`. Original headers nested deeper than [`MAX_HEADER_DEPTH`] or
//! larger than [`MAX_HEADER_BYTES`] are not copied (`x-original-headers-dropped` says
//! why): the copy must fit in one AMQP frame, and walking a table must never recurse
//! without bound.
//!
//! The routine ([`copy`]) reads an [`Original`] and writes a [`Draft`]: lapin's
//! `BasicProperties` for messages lapin delivered, the raw client's [`RawProperties`] for
//! messages only it can read (their strings escaped, `\xNN` for bytes that are not
//! UTF-8, so any client can read the copy).

use crate::message::clip_detail;
use amqp_raw::{RawProperties, RawTable, RawValue, escape_bytes};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::SystemTime;

/// The header counting a task's failed processing attempts.
pub const ATTEMPTS_HEADER: &str = "x-attempts";
/// Header tables nested deeper than this are not copied: the raw client's decoding limit,
/// one limit for both clients.
pub const MAX_HEADER_DEPTH: usize = amqp_raw::MAX_TABLE_DEPTH;
/// Header tables larger than this (encoded) are not copied: with the rest of the copy's
/// properties they must fit in one frame (`broker::FRAME_MAX`, 128 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The properties of a report: persistent JSON carrying the task's correlation id (a
/// short string: the message module only accepts ids that fit).
pub fn report_properties(correlation_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_correlation_id(short_lossy(correlation_id))
        .with_app_id("report-service".into())
        .with_timestamp(unix_seconds())
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where and how a message was received, for a dead-letter copy's headers.
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
    /// For a person; cut to `message::MAX_DETAIL_BYTES`.
    pub detail: String,
    /// `x-rejected-at`, as `message::format_timestamp` writes it.
    pub at: String,
    /// `x-rejected-by`: which instance.
    pub by: &'a str,
    /// Processing attempts made, for `retries_exhausted`.
    pub attempts: Option<u32>,
}

/// What a copy is for.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// The dead-letter copy of a message received from `origin`, rejected for `reason`.
    DeadLetter {
        /// Where it came from.
        origin: Origin<'a>,
        /// Why it is dead-lettered.
        reason: &'a Reason<'a>,
    },
    /// A failed task's copy for its retry queue.
    Retry {
        /// Attempts failed so far, this one included.
        attempts: u32,
    },
    /// A redelivered task's fresh copy for its own queue: as a retry copy, its attempts
    /// unchanged.
    Renew,
}

/// A property of the AMQP basic class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // each is the AMQP property of its name (`Type` is `type`)
pub enum Property {
    ContentType,
    ContentEncoding,
    Headers,
    DeliveryMode,
    Priority,
    CorrelationId,
    ReplyTo,
    Expiration,
    MessageId,
    Timestamp,
    Type,
    UserId,
    AppId,
    ClusterId,
}

/// What a copy does with one property of the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The copy has it as the original had it.
    Keep,
    /// The copy carries it as a header of this name.
    Under(&'static str),
    /// The copy does not have it.
    Drop,
}

/// The rules of every copy: each property's fate in a dead-letter copy and in a retry
/// copy (the table in the module's documentation; a renewed copy follows the retry
/// column). `delivery_mode` is then set to 2.
pub const RULES: [(Property, Fate, Fate); 14] = [
    (Property::ContentType, Fate::Keep, Fate::Keep),
    (Property::ContentEncoding, Fate::Keep, Fate::Keep),
    (Property::Headers, Fate::Under("x-original-headers"), Fate::Keep),
    (Property::DeliveryMode, Fate::Under("x-original-delivery-mode"), Fate::Drop),
    (Property::Priority, Fate::Under("x-original-priority"), Fate::Keep),
    (Property::CorrelationId, Fate::Keep, Fate::Keep),
    (Property::ReplyTo, Fate::Under("x-original-reply-to"), Fate::Keep),
    (Property::Expiration, Fate::Under("x-original-expiration"), Fate::Drop),
    (Property::MessageId, Fate::Keep, Fate::Keep),
    (Property::Timestamp, Fate::Keep, Fate::Keep),
    (Property::Type, Fate::Keep, Fate::Keep),
    (Property::UserId, Fate::Under("x-original-user-id"), Fate::Drop),
    (Property::AppId, Fate::Keep, Fate::Keep),
    (Property::ClusterId, Fate::Under("x-original-cluster-id"), Fate::Drop),
];

/// Headers a retry or renewed copy leaves out: the broker routes on `CC` and `BCC`, and
/// owns `x-delivery-count` (a quorum queue's count of the original's deliveries).
const BROKER_HEADERS: [&str; 3] = ["CC", "BCC", "x-delivery-count"];

/// An original's headers, as a copy can take them.
#[derive(Debug, Clone)]
pub enum Headers<T> {
    /// A table the copy can carry.
    Table(T),
    /// Bytes lapin cannot decode, small enough to carry as a byte array.
    Opaque(Vec<u8>),
    /// Not copied, and why.
    Refused(String),
}

/// A header value a copy writes: `T` is a representation's table, `V` its field value.
#[derive(Debug, Clone)]
pub enum HeaderValue<T, V> {
    /// A long string.
    Text(String),
    /// A boolean.
    Bool(bool),
    /// An unsigned octet.
    Octet(u8),
    /// A signed 64-bit integer.
    Long(i64),
    /// A nested table.
    Table(T),
    /// A field copied as it was.
    Field(V),
    /// A byte array.
    Bytes(Vec<u8>),
}

/// A message's properties as [`copy`] reads them.
pub trait Original {
    /// A header table in this representation.
    type Table;
    /// A header field's value in this representation.
    type Value;
    /// A string property as text (bytes that are not UTF-8 escaped as `\xNN`).
    fn text(&self, property: Property) -> Option<String>;
    /// `delivery_mode`, `priority` or `timestamp`.
    fn number(&self, property: Property) -> Option<u64>;
    /// The headers, if there are any.
    fn headers(&self) -> Option<Headers<Self::Table>>;
    /// The fields of a header table, for a copy that keeps them flat.
    fn fields(table: Self::Table) -> Vec<(String, Self::Value)>;
}

/// A copy being written by [`copy`].
pub trait Draft: Default {
    /// A header table in this representation.
    type Table;
    /// A header field's value in this representation.
    type Value;
    /// What the finished copy is.
    type Output;
    /// Sets a string property.
    fn set_text(&mut self, property: Property, value: &str);
    /// Sets `delivery_mode`, `priority` or `timestamp`.
    fn set_number(&mut self, property: Property, value: u64);
    /// Sets header `key` (replacing any header of that name).
    fn header(&mut self, key: &str, value: HeaderValue<Self::Table, Self::Value>);
    /// The finished copy.
    fn finish(self) -> Self::Output;
}

/// The copy of `original` for `purpose`: the one routine behind every dead-letter and
/// retry copy, following [`RULES`].
pub fn copy<T, V, O, D>(original: &O, purpose: Purpose<'_>) -> D::Output
where
    O: Original<Table = T, Value = V>,
    D: Draft<Table = T, Value = V>,
{
    let mut draft = D::default();
    let dead_letter = matches!(purpose, Purpose::DeadLetter { .. });
    for (property, in_dead_letter, in_retry) in RULES {
        let fate = if dead_letter { in_dead_letter } else { in_retry };
        match (property, fate) {
            (_, Fate::Drop) => {}
            (Property::Headers, fate) => copy_headers(original, fate, &mut draft),
            (_, Fate::Keep) => {
                if let Some(text) = original.text(property) {
                    draft.set_text(property, &text);
                } else if let Some(number) = original.number(property) {
                    draft.set_number(property, number);
                }
            }
            (_, Fate::Under(key)) => {
                if let Some(text) = original.text(property) {
                    draft.header(key, HeaderValue::Text(text));
                } else if let Some(number) = original.number(property) {
                    draft.header(key, HeaderValue::Octet(u8::try_from(number).unwrap_or(u8::MAX)));
                }
            }
        }
    }
    draft.set_number(Property::DeliveryMode, 2);
    match purpose {
        Purpose::DeadLetter { origin, reason } => {
            let text = |value: &str| HeaderValue::Text(value.to_owned());
            draft.header("x-rejection-reason", text(reason.code));
            draft.header("x-rejection-detail", HeaderValue::Text(clip_detail(reason.detail.clone())));
            draft.header("x-rejected-at", text(&reason.at));
            draft.header("x-rejected-by", text(reason.by));
            draft.header("x-original-queue", text(origin.queue));
            draft.header("x-original-exchange", text(origin.exchange));
            draft.header("x-original-routing-key", text(origin.routing_key));
            draft.header("x-original-redelivered", HeaderValue::Bool(origin.redelivered));
            if let Some(attempts) = reason.attempts {
                draft.header(ATTEMPTS_HEADER, HeaderValue::Long(i64::from(attempts)));
            }
        }
        Purpose::Retry { attempts } => draft.header(ATTEMPTS_HEADER, HeaderValue::Long(i64::from(attempts))),
        Purpose::Renew => {}
    }
    draft.finish()
}

/// The original's headers into the copy: nested under `key` (dead letters), or kept
/// flat without the routing headers (retries).
fn copy_headers<T, V, O, D>(original: &O, fate: Fate, draft: &mut D)
where
    O: Original<Table = T, Value = V>,
    D: Draft<Table = T, Value = V>,
{
    let Some(headers) = original.headers() else { return };
    match (headers, fate) {
        (Headers::Table(table), Fate::Under(key)) => draft.header(key, HeaderValue::Table(table)),
        (Headers::Table(table), _) => {
            for (name, value) in O::fields(table) {
                if !BROKER_HEADERS.contains(&name.as_str()) {
                    draft.header(&name, HeaderValue::Field(value));
                }
            }
        }
        (Headers::Opaque(bytes), Fate::Under(_)) => draft.header("x-original-headers-raw", HeaderValue::Bytes(bytes)),
        (Headers::Opaque(bytes), _) => {
            let why = format!("{} bytes lapin cannot decode; not copied", bytes.len());
            draft.header("x-original-headers-dropped", HeaderValue::Text(why));
        }
        (Headers::Refused(why), _) => draft.header("x-original-headers-dropped", HeaderValue::Text(why)),
    }
}

/// Whether `table` may be copied into another message's headers; if not, why. Walks
/// at most [`MAX_HEADER_DEPTH`] levels, so a hostile table costs no recursion beyond
/// that (it must be checked before it is cloned: cloning recurses through every level).
pub fn copyable(table: &FieldTable) -> Result<(), String> {
    match table_size(table, 1) {
        Some(bytes) if bytes <= MAX_HEADER_BYTES => Ok(()),
        Some(bytes) => Err(too_large(bytes)),
        None => Err(format!("nested deeper than {MAX_HEADER_DEPTH} levels")),
    }
}

fn too_large(bytes: usize) -> String {
    format!("{bytes} bytes, over the {MAX_HEADER_BYTES}-byte limit")
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
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
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

// --- lapin's properties: messages lapin delivered, copies lapin publishes.

impl Original for BasicProperties {
    type Table = FieldTable;
    type Value = AMQPValue;

    fn text(&self, property: Property) -> Option<String> {
        let value = match property {
            Property::ContentType => self.content_type(),
            Property::ContentEncoding => self.content_encoding(),
            Property::CorrelationId => self.correlation_id(),
            Property::ReplyTo => self.reply_to(),
            Property::Expiration => self.expiration(),
            Property::MessageId => self.message_id(),
            Property::Type => self.kind(),
            Property::UserId => self.user_id(),
            Property::AppId => self.app_id(),
            Property::ClusterId => self.cluster_id(),
            Property::Headers | Property::DeliveryMode | Property::Priority | Property::Timestamp => &None,
        };
        value.as_ref().map(|s| s.as_str().to_owned())
    }

    fn number(&self, property: Property) -> Option<u64> {
        match property {
            Property::DeliveryMode => self.delivery_mode().map(u64::from),
            Property::Priority => self.priority().map(u64::from),
            Property::Timestamp => *self.timestamp(),
            _ => None,
        }
    }

    fn headers(&self) -> Option<Headers<FieldTable>> {
        self.headers().as_ref().map(|table| match copyable(table) {
            Ok(()) => Headers::Table(table.clone()),
            Err(why) => Headers::Refused(format!("{why}; not copied")),
        })
    }

    fn fields(table: FieldTable) -> Vec<(String, AMQPValue)> {
        table.inner().iter().map(|(key, value)| (key.as_str().to_owned(), value.clone())).collect()
    }
}

/// A copy built as lapin's properties.
#[derive(Debug, Default)]
pub struct LapinDraft {
    properties: BasicProperties,
    headers: FieldTable,
}

impl Draft for LapinDraft {
    type Table = FieldTable;
    type Value = AMQPValue;
    type Output = BasicProperties;

    fn set_text(&mut self, property: Property, value: &str) {
        let value = short_lossy(value);
        let p = std::mem::take(&mut self.properties);
        self.properties = match property {
            Property::ContentType => p.with_content_type(value),
            Property::ContentEncoding => p.with_content_encoding(value),
            Property::CorrelationId => p.with_correlation_id(value),
            Property::ReplyTo => p.with_reply_to(value),
            Property::Expiration => p.with_expiration(value),
            Property::MessageId => p.with_message_id(value),
            Property::Type => p.with_type(value),
            Property::UserId => p.with_user_id(value),
            Property::AppId => p.with_app_id(value),
            Property::ClusterId => p.with_cluster_id(value),
            Property::Headers | Property::DeliveryMode | Property::Priority | Property::Timestamp => p,
        };
    }

    fn set_number(&mut self, property: Property, value: u64) {
        let octet = u8::try_from(value).unwrap_or(u8::MAX);
        let p = std::mem::take(&mut self.properties);
        self.properties = match property {
            Property::DeliveryMode => p.with_delivery_mode(octet),
            Property::Priority => p.with_priority(octet),
            Property::Timestamp => p.with_timestamp(value),
            _ => p,
        };
    }

    fn header(&mut self, key: &str, value: HeaderValue<FieldTable, AMQPValue>) {
        let value = match value {
            HeaderValue::Text(text) => AMQPValue::LongString(LongString::from(text.into_bytes())),
            HeaderValue::Bool(b) => AMQPValue::Boolean(b),
            HeaderValue::Octet(n) => AMQPValue::ShortShortUInt(n),
            HeaderValue::Long(n) => AMQPValue::LongLongInt(n),
            HeaderValue::Table(table) => AMQPValue::FieldTable(table),
            HeaderValue::Field(value) => value,
            HeaderValue::Bytes(bytes) => AMQPValue::ByteArray(bytes.into()),
        };
        self.headers.insert(short_lossy(key), value);
    }

    fn finish(self) -> BasicProperties {
        self.properties.with_headers(self.headers)
    }
}

// --- The raw client's properties: messages lapin cannot decode.

impl Original for RawProperties {
    type Table = Vec<(Vec<u8>, RawValue)>;
    type Value = RawValue;

    fn text(&self, property: Property) -> Option<String> {
        let value = match property {
            Property::ContentType => &self.content_type,
            Property::ContentEncoding => &self.content_encoding,
            Property::CorrelationId => &self.correlation_id,
            Property::ReplyTo => &self.reply_to,
            Property::Expiration => &self.expiration,
            Property::MessageId => &self.message_id,
            Property::Type => &self.kind,
            Property::UserId => &self.user_id,
            Property::AppId => &self.app_id,
            Property::ClusterId => &self.cluster_id,
            Property::Headers | Property::DeliveryMode | Property::Priority | Property::Timestamp => &None,
        };
        value.as_deref().map(escape_bytes)
    }

    fn number(&self, property: Property) -> Option<u64> {
        match property {
            Property::DeliveryMode => self.delivery_mode.map(u64::from),
            Property::Priority => self.priority.map(u64::from),
            Property::Timestamp => self.timestamp,
            _ => None,
        }
    }

    fn headers(&self) -> Option<Headers<Self::Table>> {
        let table = self.headers.as_ref()?;
        Some(match &table.fields {
            _ if table.bytes.len() > MAX_HEADER_BYTES => {
                Headers::Refused(format!("{}; not copied", too_large(table.bytes.len())))
            }
            Some(fields) => Headers::Table(readable_fields(fields)),
            None => Headers::Opaque(table.bytes.clone()),
        })
    }

    fn fields(table: Self::Table) -> Vec<(String, RawValue)> {
        table.into_iter().map(|(key, value)| (escape_bytes(&key), value)).collect()
    }
}

/// Header fields with every name escaped (`\xNN` for bytes that are not UTF-8), at every
/// level, so lapin can decode the copy; values are kept (long strings are bytes for lapin).
fn readable_fields(fields: &[(Vec<u8>, RawValue)]) -> Vec<(Vec<u8>, RawValue)> {
    fields.iter().map(|(key, value)| (escape_bytes(key).into_bytes(), readable_value(value))).collect()
}

fn readable_value(value: &RawValue) -> RawValue {
    match value {
        RawValue::Table(fields) => RawValue::Table(readable_fields(fields)),
        RawValue::Array(items) => RawValue::Array(items.iter().map(readable_value).collect()),
        other => other.clone(),
    }
}

/// A copy built as the raw client's properties.
#[derive(Debug, Default)]
pub struct RawDraft {
    properties: RawProperties,
    headers: Vec<(Vec<u8>, RawValue)>,
}

impl Draft for RawDraft {
    type Table = Vec<(Vec<u8>, RawValue)>;
    type Value = RawValue;
    type Output = RawProperties;

    fn set_text(&mut self, property: Property, value: &str) {
        let value = Some(short_lossy(value).as_str().as_bytes().to_vec());
        let p = &mut self.properties;
        match property {
            Property::ContentType => p.content_type = value,
            Property::ContentEncoding => p.content_encoding = value,
            Property::CorrelationId => p.correlation_id = value,
            Property::ReplyTo => p.reply_to = value,
            Property::Expiration => p.expiration = value,
            Property::MessageId => p.message_id = value,
            Property::Type => p.kind = value,
            Property::UserId => p.user_id = value,
            Property::AppId => p.app_id = value,
            Property::ClusterId => p.cluster_id = value,
            Property::Headers | Property::DeliveryMode | Property::Priority | Property::Timestamp => {}
        }
    }

    fn set_number(&mut self, property: Property, value: u64) {
        let octet = u8::try_from(value).unwrap_or(u8::MAX);
        match property {
            Property::DeliveryMode => self.properties.delivery_mode = Some(octet),
            Property::Priority => self.properties.priority = Some(octet),
            Property::Timestamp => self.properties.timestamp = Some(value),
            _ => {}
        }
    }

    fn header(&mut self, key: &str, value: HeaderValue<Self::Table, RawValue>) {
        let value = match value {
            HeaderValue::Text(text) => RawValue::LongString(text.into_bytes()),
            HeaderValue::Bool(b) => RawValue::Bool(b),
            HeaderValue::Octet(n) => RawValue::U8(n),
            HeaderValue::Long(n) => RawValue::I64(n),
            HeaderValue::Table(fields) => RawValue::Table(fields),
            HeaderValue::Field(value) => value,
            HeaderValue::Bytes(bytes) => RawValue::Bytes(bytes),
        };
        let key = short_lossy(key).as_str().as_bytes().to_vec();
        self.headers.retain(|(name, _)| *name != key);
        self.headers.push((key, value));
    }

    fn finish(mut self) -> RawProperties {
        self.properties.headers = Some(RawTable::from_fields(self.headers));
        self.properties
    }
}

/// The dead-letter copy of a message lapin delivered.
pub fn dead_letter_properties(original: &BasicProperties, origin: Origin<'_>, reason: &Reason<'_>) -> BasicProperties {
    copy::<_, _, _, LapinDraft>(original, Purpose::DeadLetter { origin, reason })
}

/// The dead-letter copy of a message only the raw client could read.
pub fn raw_dead_letter_properties(original: &RawProperties, origin: Origin<'_>, reason: &Reason<'_>) -> RawProperties {
    copy::<_, _, _, RawDraft>(original, Purpose::DeadLetter { origin, reason })
}

/// The retry copy of a failed task: everything it needs to be answered, and its
/// attempts so far; persistent.
pub fn retry_properties(original: &BasicProperties, attempts: u32) -> BasicProperties {
    copy::<_, _, _, LapinDraft>(original, Purpose::Retry { attempts })
}

/// The fresh copy of a redelivered task: as the retry copy, its attempts unchanged and
/// without the queue's delivery count.
pub fn renewed_properties(original: &BasicProperties) -> BasicProperties {
    copy::<_, _, _, LapinDraft>(original, Purpose::Renew)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_raw::table_problem;
    use lapin::types::FieldArray;

    fn array(items: Vec<AMQPValue>) -> AMQPValue {
        AMQPValue::FieldArray(FieldArray::from(items))
    }

    fn single(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("v".into(), value);
        table
    }

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

    fn full_original(headers: FieldTable) -> BasicProperties {
        BasicProperties::default()
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
            .with_headers(headers)
    }

    #[test]
    fn the_dead_letter_copy_keeps_what_describes_the_message_and_moves_what_the_broker_acts_on() {
        let mut original_headers = FieldTable::default();
        original_headers.insert("CC".into(), array(vec![AMQPValue::LongString("task_report".into())]));
        original_headers.insert("BCC".into(), array(vec![AMQPValue::LongString("x".into())]));
        original_headers.insert("trace".into(), AMQPValue::LongString("abc".into()));
        let original = full_original(original_headers.clone());
        let copy = dead_letter_properties(&original, origin(), &reason());
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
        assert!(header(&copy, ATTEMPTS_HEADER).is_none());
        let exhausted = Reason { code: "retries_exhausted", attempts: Some(5), ..reason() };
        let copy = dead_letter_properties(&BasicProperties::default(), origin(), &exhausted);
        assert_eq!(header(&copy, ATTEMPTS_HEADER), Some(&AMQPValue::LongLongInt(5)));
    }

    #[test]
    fn the_retry_copy_keeps_what_the_task_needs_and_drops_what_the_broker_acts_on() {
        let mut headers = FieldTable::default();
        headers.insert("CC".into(), AMQPValue::LongString("elsewhere".into()));
        headers.insert("trace".into(), AMQPValue::LongString("t".into()));
        headers.insert("nested".into(), AMQPValue::FieldTable(single(AMQPValue::LongLongInt(3))));
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(1));
        let copy = retry_properties(&full_original(headers), 2);
        assert_eq!(copy.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
        assert_eq!(copy.reply_to().as_ref().map(|s| s.as_str()), Some("replies"));
        assert_eq!(copy.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!((copy.expiration(), copy.user_id(), copy.cluster_id()), (&None, &None, &None));
        assert_eq!((*copy.priority(), *copy.delivery_mode(), *copy.timestamp()), (Some(7), Some(2), Some(17)));
        let copied = copy.headers().as_ref().unwrap().inner();
        assert!(!copied.contains_key("CC"));
        assert_eq!(copied.get("trace"), Some(&AMQPValue::LongString("t".into())));
        assert_eq!(
            copied.get("nested"),
            Some(&AMQPValue::FieldTable(single(AMQPValue::LongLongInt(3)))),
            "a nested table stays a table"
        );
        assert_eq!(copied.get(ATTEMPTS_HEADER), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(copied.len(), 3);
    }

    #[test]
    fn a_renewed_copy_keeps_the_attempts_and_drops_the_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(2));
        headers.insert("trace".into(), AMQPValue::LongString("t".into()));
        let copy = renewed_properties(&full_original(headers));
        let copied = copy.headers().as_ref().unwrap().inner();
        assert_eq!(copied.get(ATTEMPTS_HEADER), Some(&AMQPValue::LongLongInt(2)));
        assert!(!copied.contains_key("x-delivery-count"));
        assert_eq!(copied.get("trace"), Some(&AMQPValue::LongString("t".into())));
        assert_eq!(copy.reply_to().as_ref().map(|s| s.as_str()), Some("replies"));
        assert_eq!((copy.expiration(), *copy.delivery_mode()), (&None, Some(2)));
    }

    #[test]
    fn headers_too_deep_or_too_large_are_not_copied() {
        // Cloning and dropping a table recurse once per level, as the client library's
        // decoding does: a table 10,000 deep needs a large stack (the service gives its
        // threads one, see `platform::stack`), but checking it must not.
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
                let dead = dead_letter_properties(&original, origin(), &reason());
                let retry = retry_properties(&original, 1);
                (
                    header(&dead, "x-original-headers").is_some(),
                    text(&dead, "x-original-headers-dropped"),
                    text(&retry, "x-original-headers-dropped"),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        let dropped = "nested deeper than 32 levels; not copied".to_owned();
        assert_eq!(checked, (false, dropped.clone(), dropped));

        let mut large = FieldTable::default();
        large.insert("big".into(), AMQPValue::LongString(vec![b'x'; MAX_HEADER_BYTES].into()));
        let copy = dead_letter_properties(&BasicProperties::default().with_headers(large), origin(), &reason());
        assert!(text(&copy, "x-original-headers-dropped").starts_with("65549 bytes, over"));

        // Tables and arrays both count as levels: 32 are copied, 33 are not.
        let nested = |levels: usize| {
            let mut table = FieldTable::default();
            table.insert("v".into(), array(vec![AMQPValue::Void]));
            for _ in 0..levels - 2 {
                let mut outer = FieldTable::default();
                outer.insert("a".into(), AMQPValue::FieldTable(table));
                table = outer;
            }
            table
        };
        assert_eq!(copyable(&nested(MAX_HEADER_DEPTH)), Ok(()));
        assert!(copyable(&nested(MAX_HEADER_DEPTH + 1)).is_err());
        // The same with tables alone: 32 levels of tables are copied, 33 are not.
        let tables = |levels: usize| {
            let mut table = FieldTable::default();
            for _ in 1..levels {
                let mut outer = FieldTable::default();
                outer.insert("t".into(), AMQPValue::FieldTable(table));
                table = outer;
            }
            table
        };
        assert_eq!(copyable(&tables(MAX_HEADER_DEPTH)), Ok(()));
        assert_eq!(copyable(&tables(MAX_HEADER_DEPTH + 1)), Err("nested deeper than 32 levels".to_owned()));
        // And arrays in arrays: a table holding 31 nested arrays is 32 levels, 32 are 33.
        let arrays = |levels: usize| {
            let mut value = AMQPValue::Void;
            for _ in 1..levels {
                value = array(vec![value]);
            }
            let mut table = FieldTable::default();
            table.insert("a".into(), value);
            table
        };
        assert_eq!(copyable(&arrays(MAX_HEADER_DEPTH)), Ok(()));
        assert_eq!(copyable(&arrays(MAX_HEADER_DEPTH + 1)), Err("nested deeper than 32 levels".to_owned()));
        // Sizes as encoded: a table's 4-byte length, then per field a 1-byte name length,
        // the name, a type letter and the value (a long string: 4-byte length and bytes).
        let sized = |string_bytes: usize| {
            let mut table = FieldTable::default();
            table.insert("big".into(), AMQPValue::LongString(vec![b'x'; string_bytes].into()));
            table
        };
        assert_eq!(copyable(&sized(MAX_HEADER_BYTES - 13)), Ok(()));
        assert_eq!(copyable(&sized(MAX_HEADER_BYTES - 12)), Err("65537 bytes, over the 65536-byte limit".to_owned()));
        let mut two = sized(100);
        two.insert("n".into(), AMQPValue::LongLongInt(7));
        two.insert("tiny".into(), AMQPValue::Boolean(true));
        let array = AMQPValue::FieldArray(
            vec![AMQPValue::ShortShortInt(1), AMQPValue::LongString(b"ab".to_vec().into())].into(),
        );
        two.insert("list".into(), array);
        two.insert("s".into(), AMQPValue::ShortString("abc".into()));
        two.insert("b".into(), AMQPValue::ByteArray(vec![1, 2, 3, 4, 5].into()));
        // 4 + (1+3+1+4+100) + (1+1+1+8) + (1+4+1+1) + (1+4+1+4+(1+1)+(1+4+2))
        //   + (1+1+1+1+3) + (1+1+1+4+5) = 169
        assert_eq!(table_size(&two, 1), Some(169));
    }

    #[test]
    fn short_strings_from_client_text_never_panic() {
        assert_eq!(short_lossy(&"é".repeat(200)).as_str().len(), 254);
        assert_eq!(short_lossy("ok").as_str(), "ok");
    }

    #[test]
    fn a_report_is_persistent_json_with_its_correlation_id() {
        let p = report_properties("42");
        assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        assert_eq!((*p.delivery_mode(), p.correlation_id().as_ref().map(|s| s.as_str())), (Some(2), Some("42")));
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("report-service"));
        assert!(p.timestamp().is_some_and(|t| t > 1_700_000_000));
    }

    fn raw_origin() -> Origin<'static> {
        Origin { queue: "tasks", exchange: "", routing_key: "tasks", redelivered: false }
    }

    #[test]
    fn the_raw_copy_of_an_undecodable_message_is_readable_and_keeps_the_original_bytes_escaped() {
        let headers = RawTable::from_fields(vec![(vec![b'k', 0xfe], RawValue::LongString(b"v".to_vec()))]);
        let original = RawProperties {
            message_id: Some(vec![0xff; 16]),
            user_id: Some(b"someone".to_vec()),
            reply_to: Some(b"r".to_vec()),
            headers: Some(headers),
            ..RawProperties::default()
        };
        let reason = Reason { code: "undecodable", detail: "why".into(), ..reason() };
        let copy = raw_dead_letter_properties(&original, raw_origin(), &reason);
        assert_eq!(copy.message_id.as_deref(), Some("\\xff".repeat(16).as_bytes()));
        assert_eq!((copy.user_id, copy.reply_to, copy.delivery_mode), (None, None, Some(2)));
        let table = copy.headers.expect("headers");
        assert_eq!(table_problem(&table.bytes), None, "lapin decodes the copy");
        let fields = table.fields.expect("decodable");
        let find = |key: &[u8]| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(find(b"x-rejection-reason"), Some(RawValue::LongString(b"undecodable".to_vec())));
        assert_eq!(find(b"x-original-user-id"), Some(RawValue::LongString(b"someone".to_vec())));
        assert_eq!(find(b"x-original-reply-to"), Some(RawValue::LongString(b"r".to_vec())));
        assert_eq!(
            find(b"x-original-headers"),
            Some(RawValue::Table(vec![(b"k\\xfe".to_vec(), RawValue::LongString(b"v".to_vec()))]))
        );
    }

    /// The lapin and raw drafts of one message, dead-lettered by the one routine, carry
    /// the same properties and headers.
    #[test]
    fn lapin_and_raw_copies_of_the_same_message_agree() {
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString("abc".into()));
        let lapin = dead_letter_properties(&full_original(headers), origin(), &reason());
        let raw_original = RawProperties {
            content_type: Some(b"text/plain".to_vec()),
            content_encoding: Some(b"gzip".to_vec()),
            correlation_id: Some(b"c-1".to_vec()),
            message_id: Some(b"m-1".to_vec()),
            timestamp: Some(17),
            kind: Some(b"task".to_vec()),
            app_id: Some(b"client".to_vec()),
            reply_to: Some(b"replies".to_vec()),
            expiration: Some(b"1".to_vec()),
            user_id: Some(b"someone".to_vec()),
            cluster_id: Some(b"cl".to_vec()),
            priority: Some(7),
            delivery_mode: Some(1),
            headers: Some(RawTable::from_fields(vec![(b"trace".to_vec(), RawValue::LongString(b"abc".to_vec()))])),
        };
        let raw = raw_dead_letter_properties(&raw_original, origin(), &reason());
        let bytes = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().as_bytes().to_vec());
        assert_eq!(raw.content_type, bytes(lapin.content_type()));
        assert_eq!(raw.correlation_id, bytes(lapin.correlation_id()));
        assert_eq!(raw.message_id, bytes(lapin.message_id()));
        assert_eq!(
            (raw.timestamp, raw.delivery_mode, raw.priority),
            (*lapin.timestamp(), *lapin.delivery_mode(), None)
        );
        let raw_names: std::collections::BTreeSet<Vec<u8>> =
            raw.headers.unwrap().fields.unwrap().into_iter().map(|(k, _)| k).collect();
        let lapin_names: std::collections::BTreeSet<Vec<u8>> =
            lapin.headers().as_ref().unwrap().inner().keys().map(|k| k.as_str().as_bytes().to_vec()).collect();
        assert_eq!(raw_names, lapin_names);

        // The retry column too (the service retries only what lapin decoded, but the one
        // routine must honour every fate for both drafts): priority kept as a property,
        // header fields kept flat with their names.
        let lapin = retry_properties(&full_original(FieldTable::default()), 2);
        let raw = copy::<_, _, _, RawDraft>(&raw_original, Purpose::Retry { attempts: 2 });
        assert_eq!((raw.priority, *lapin.priority()), (Some(7), Some(7)));
        assert_eq!((raw.reply_to, raw.expiration, raw.user_id), (Some(b"replies".to_vec()), None, None));
        let fields = raw.headers.unwrap().fields.unwrap();
        assert_eq!(
            fields,
            vec![
                (b"trace".to_vec(), RawValue::LongString(b"abc".to_vec())),
                (ATTEMPTS_HEADER.as_bytes().to_vec(), RawValue::I64(2)),
            ]
        );
    }

    #[test]
    fn undecodable_header_bytes_travel_as_a_byte_array_or_are_dropped_when_too_large() {
        let reason = Reason { code: "undecodable", detail: "why".into(), ..reason() };
        let opaque = RawProperties { headers: Some(RawTable::from_bytes(vec![1, b'k', b'Z'])), ..Default::default() };
        let copy = raw_dead_letter_properties(&opaque, raw_origin(), &reason);
        let fields = copy.headers.unwrap().fields.unwrap();
        assert!(fields.contains(&(b"x-original-headers-raw".to_vec(), RawValue::Bytes(vec![1, b'k', b'Z']))));
        let mut big = vec![4, b'k', b'e', b'y', b'1', b'Z'];
        big.resize(MAX_HEADER_BYTES + 1, 0);
        let huge = RawProperties { headers: Some(RawTable::from_bytes(big)), ..Default::default() };
        let copy = raw_dead_letter_properties(&huge, raw_origin(), &reason);
        let fields = copy.headers.unwrap().fields.unwrap();
        let dropped = fields.iter().find(|(k, _)| k == b"x-original-headers-dropped").map(|(_, v)| v.clone());
        assert!(matches!(dropped, Some(RawValue::LongString(why)) if why.starts_with(b"65537 bytes, over")));
        // Exactly at the limit: still copied.
        let mut at_limit = vec![4, b'k', b'e', b'y', b'1', b'Z'];
        at_limit.resize(MAX_HEADER_BYTES, 0);
        let edge = RawProperties { headers: Some(RawTable::from_bytes(at_limit.clone())), ..Default::default() };
        let fields = raw_dead_letter_properties(&edge, raw_origin(), &reason).headers.unwrap().fields.unwrap();
        assert!(fields.contains(&(b"x-original-headers-raw".to_vec(), RawValue::Bytes(at_limit))));
    }
}
