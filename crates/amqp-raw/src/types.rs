//! The client's vocabulary: its limits, its error, and the messages, properties and
//! header tables it reads and writes (strings as bytes). No behaviour here beyond
//! data: `codec` encodes and decodes them, `client` moves them.

use std::time::Duration;

/// The byte stream under the client: TCP, or TLS over TCP for `amqps://`.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug> Transport for T {}

/// Nested header tables deeper than this are kept as opaque bytes, so decoding never
/// recurses without bound. report-service copies no deeper table into a dead-letter or
/// retry copy either: one limit for both.
pub const MAX_TABLE_DEPTH: usize = 32;

/// The largest frame this project's AMQP clients accept or ask for (RabbitMQ's default,
/// 128 KiB): this one, and lapin in report-service, which caps its `frame_max` here. It
/// bounds how large (and how deeply nested) a message's headers can be when they reach a
/// decoder.
pub const FRAME_MAX: u32 = 128 * 1024;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The socket failed.
    #[error("cannot reach the broker: {0}")]
    Io(#[from] std::io::Error),
    /// The broker sent `connection.close` or `channel.close`.
    #[error("the broker closed the {scope} ({code}): {text}")]
    Closed {
        /// "connection" or "channel".
        scope: &'static str,
        /// The AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// A frame this client did not expect at this point of the exchange.
    #[error("unexpected AMQP frame: {0}")]
    Protocol(&'static str),
    /// The broker offers no mechanism this client speaks.
    #[error("the broker does not offer PLAIN authentication")]
    NoPlainAuth,
    /// A message body over the client's size limit.
    #[error("a message of {0} bytes is over this client's limit")]
    TooLarge(u64),
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

/// A header table: its bytes as sent, and its fields when they could be decoded (not
/// for an unknown field type, or nesting deeper than 32 levels).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTable {
    /// The table's encoding, exactly as received or as it will be sent.
    pub bytes: Vec<u8>,
    /// Field names (bytes, not necessarily UTF-8) and values, if decodable.
    pub fields: Option<Vec<(Vec<u8>, RawValue)>>,
}

/// One header value. Type letters as RabbitMQ (and lapin) write them.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // each variant is the AMQP field type of its name
pub enum RawValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal { scale: u8, value: u32 },
    LongString(Vec<u8>),
    Array(Vec<RawValue>),
    Timestamp(u64),
    Table(Vec<(Vec<u8>, RawValue)>),
    Bytes(Vec<u8>),
    Void,
}

/// The basic-class properties of a message, every string as bytes. Each field is the
/// AMQP property of its name (`kind` is `type`).
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(missing_docs)]
pub struct RawProperties {
    pub content_type: Option<Vec<u8>>,
    pub content_encoding: Option<Vec<u8>>,
    pub headers: Option<RawTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<Vec<u8>>,
    pub expiration: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
    pub timestamp: Option<u64>,
    pub kind: Option<Vec<u8>>,
    pub user_id: Option<Vec<u8>>,
    pub app_id: Option<Vec<u8>>,
    pub cluster_id: Option<Vec<u8>>,
}

/// A message delivered to the consumer, not yet acked.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDelivery {
    /// The tag to ack it with.
    pub delivery_tag: u64,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: Vec<u8>,
    /// The routing key it was published with.
    pub routing_key: Vec<u8>,
    /// Its properties, undecoded strings kept as bytes.
    pub properties: RawProperties,
    /// Its body.
    pub body: Vec<u8>,
}

/// How the broker took a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawConfirm {
    /// Acked: a queue has it.
    Queued,
    /// Acked, but returned first: no queue took it.
    Unroutable,
    /// Nacked: the broker could not take it.
    Nacked,
}
