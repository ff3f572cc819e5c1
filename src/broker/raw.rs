//! A minimal AMQP 0-9-1 client for the one thing lapin cannot do: read a message whose
//! properties are not valid in lapin's model.
//!
//! lapin decodes every AMQP short string (`message_id`, `reply_to`, header keys, ...) as
//! UTF-8 and treats a failure, or a header field of a type it does not know, as a fatal
//! connection error. The broker then requeues the message and delivers it again to the
//! next connection: one such message wedges every consumer of the queue. This client keeps
//! every string as bytes, so [`crate::poison`] can receive such a message,
//! copy it to the dead-letter queue and ack it.
//!
//! It speaks just enough of the protocol for that: the handshake (PLAIN), one channel in
//! confirm mode, one consumer (`basic.qos`, `basic.consume`, `basic.cancel`), `basic.ack`,
//! a confirmed `basic.publish`, and closing. No heartbeats, no recovery: each use is a short, bounded exchange, and every
//! call is wrapped in a timeout by its caller. It must not grow into a second client.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// The largest frame this client accepts or asks for (RabbitMQ's default).
const MAX_FRAME: u32 = 128 * 1024;
/// Nested header tables deeper than this are kept as opaque bytes, so decoding never
/// recurses without bound.
const MAX_TABLE_DEPTH: usize = 32;
/// Bodies larger than this are refused rather than buffered (RabbitMQ's own default
/// `max_message_size` is 128 MiB; tasks are far smaller).
const MAX_BODY: u64 = 128 * 1024 * 1024;

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const BASIC: u16 = 60;
const CONFIRM: u16 = 85;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("cannot reach the broker: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the {scope} ({code}): {text}")]
    Closed { scope: &'static str, code: u16, text: String },
    #[error("unexpected AMQP frame: {0}")]
    Protocol(&'static str),
    #[error("the broker does not offer PLAIN authentication")]
    NoPlainAuth,
    #[error("a message of {0} bytes is over this client's limit")]
    TooLarge(u64),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

/// A header table: its bytes as sent, and its fields when they could be decoded (not
/// for an unknown field type, or nesting deeper than [`MAX_TABLE_DEPTH`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTable {
    pub bytes: Vec<u8>,
    pub fields: Option<Vec<(Vec<u8>, RawValue)>>,
}

impl RawTable {
    /// A table received as `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> RawTable {
        let fields = decode_fields(&bytes, 0).ok();
        RawTable { bytes, fields }
    }

    /// A table to send.
    pub fn from_fields(fields: Vec<(Vec<u8>, RawValue)>) -> RawTable {
        let mut w = Writer::default();
        encode_fields(&fields, &mut w);
        RawTable { bytes: w.0, fields: Some(fields) }
    }
}

/// One header value. Type letters as RabbitMQ (and lapin) write them.
#[derive(Debug, Clone, PartialEq)]
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

/// The basic-class properties of a message, every string as bytes.
#[derive(Debug, Clone, Default, PartialEq)]
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

/// A message fetched with `basic.get`, not yet acked.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDelivery {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: Vec<u8>,
    pub routing_key: Vec<u8>,
    pub properties: RawProperties,
    pub body: Vec<u8>,
}

/// How the broker took a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawConfirm {
    Queued,
    /// Acked, but returned first: no queue took it.
    Unroutable,
    Nacked,
}

/// The parts of a broker URL this client needs (from lapin's own URL parser).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub username: String,
    pub password: String,
}

impl Endpoint {
    pub fn from_uri(uri: &lapin::uri::AMQPUri) -> Endpoint {
        Endpoint {
            host: uri.authority.host.clone(),
            port: uri.authority.port,
            vhost: uri.vhost.clone(),
            username: uri.authority.userinfo.username.clone(),
            password: uri.authority.userinfo.password.clone(),
        }
    }
}

/// One connection with one channel (1) in confirm mode.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    /// Bytes read but not yet parsed into frames. Reads go through this buffer, so a
    /// read cut short by a timeout loses nothing (`read` is cancellation-safe; a
    /// half-finished `read_exact` would not be).
    buffer: Vec<u8>,
    frame_max: u32,
    /// Publish sequence numbers, for matching confirms.
    published: u64,
}

impl RawClient {
    /// Connects, authenticates, opens channel 1 and selects confirm mode. `name` is the
    /// connection name shown in the management UI and `rabbitmqctl list_connections`.
    pub async fn connect(endpoint: &Endpoint, name: &str) -> Result<RawClient, RawError> {
        let mut stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        stream.set_nodelay(true)?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut client = RawClient { stream, buffer: Vec::new(), frame_max: MAX_FRAME, published: 0 };

        let mut start = client.expect_method(0, CONNECTION, 10).await?;
        let (_major, _minor) = (start.u8()?, start.u8()?);
        start.table_bytes()?;
        let mechanisms = start.long_string()?;
        if !mechanisms.split(|&b| b == b' ').any(|m| m == b"PLAIN") {
            return Err(RawError::NoPlainAuth);
        }
        let mut start_ok = Writer::method(CONNECTION, 11);
        let mut properties = Writer::default();
        properties.table_entry(b"product", |w| w.long_string_value(b"report-service"));
        properties.table_entry(b"connection_name", |w| w.long_string_value(name.as_bytes()));
        start_ok.table(&properties.0);
        start_ok.short_string(b"PLAIN");
        let mut response = vec![0];
        response.extend_from_slice(endpoint.username.as_bytes());
        response.push(0);
        response.extend_from_slice(endpoint.password.as_bytes());
        start_ok.long_string(&response);
        start_ok.short_string(b"en_US");
        client.send_method(0, start_ok).await?;

        let mut tune = client.expect_method(0, CONNECTION, 30).await?;
        let channel_max = tune.u16()?;
        let frame_max = tune.u32()?;
        client.frame_max = if frame_max == 0 { MAX_FRAME } else { frame_max.min(MAX_FRAME) };
        let mut tune_ok = Writer::method(CONNECTION, 31);
        tune_ok.u16(channel_max);
        tune_ok.u32(client.frame_max);
        tune_ok.u16(0); // no heartbeats: every exchange is short and bounded by its caller
        client.send_method(0, tune_ok).await?;
        let mut open = Writer::method(CONNECTION, 40);
        open.short_string(endpoint.vhost.as_bytes());
        open.short_string(b"");
        open.u8(0);
        client.send_method(0, open).await?;
        client.expect_method(0, CONNECTION, 41).await?;

        let mut channel_open = Writer::method(CHANNEL, 10);
        channel_open.short_string(b"");
        client.send_method(1, channel_open).await?;
        client.expect_method(1, CHANNEL, 11).await?;
        let mut select = Writer::method(CONFIRM, 10);
        select.u8(0);
        client.send_method(1, select).await?;
        client.expect_method(1, CONFIRM, 11).await?;
        Ok(client)
    }

    /// Limits unacked deliveries to `count` (`basic.qos`).
    pub async fn qos(&mut self, count: u16) -> Result<(), RawError> {
        let mut qos = Writer::method(BASIC, 10);
        qos.u32(0);
        qos.u16(count);
        qos.u8(0);
        self.send_method(1, qos).await?;
        self.expect_method(1, BASIC, 11).await.map(drop)
    }

    /// Starts consuming `queue` (acks required) with consumer priority `priority`: the
    /// broker delivers to the highest-priority consumer that has room, ahead of the
    /// service's ordinary consumers.
    pub async fn consume(&mut self, queue: &[u8], tag: &[u8], priority: i32) -> Result<(), RawError> {
        let mut consume = Writer::method(BASIC, 20);
        consume.u16(0);
        consume.short_string(queue);
        consume.short_string(tag);
        consume.u8(0); // no-local, no-ack, exclusive, no-wait: all off
        let mut arguments = Writer::default();
        arguments.short_string(b"x-priority");
        arguments.u8(b'I');
        arguments.u32(priority as u32);
        consume.table(&arguments.0);
        self.send_method(1, consume).await?;
        self.expect_method(1, BASIC, 21).await.map(drop)
    }

    /// The next delivery to the consumer. Cancellation-safe: a timeout around it loses
    /// no bytes.
    pub async fn next_delivery(&mut self) -> Result<RawDelivery, RawError> {
        let mut deliver = self.expect_method(1, BASIC, 60).await?;
        self.delivery_after(&mut deliver).await
    }

    /// Cancels the consumer; returns the deliveries that arrived before the broker
    /// confirmed the cancel.
    pub async fn cancel(&mut self, tag: &[u8]) -> Result<Vec<RawDelivery>, RawError> {
        let mut cancel = Writer::method(BASIC, 30);
        cancel.short_string(tag);
        cancel.u8(0);
        self.send_method(1, cancel).await?;
        let mut late = Vec::new();
        loop {
            let mut reply = self.next_method(1).await?;
            match reply.method {
                (BASIC, 31) => return Ok(late),
                (BASIC, 60) => late.push(self.delivery_after(&mut reply).await?),
                _ => return Err(RawError::Protocol("expected basic.cancel-ok")),
            }
        }
    }

    async fn delivery_after(&mut self, deliver: &mut MethodReader) -> Result<RawDelivery, RawError> {
        let _consumer_tag = deliver.short_string()?;
        let delivery_tag = deliver.u64()?;
        let redelivered = deliver.u8()? & 1 == 1;
        let exchange = deliver.short_string()?;
        let routing_key = deliver.short_string()?;
        let (properties, body) = self.content().await?;
        Ok(RawDelivery { delivery_tag, redelivered, exchange, routing_key, properties, body })
    }

    /// Acknowledges a message fetched by [`RawClient::get`].
    pub async fn ack(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut ack = Writer::method(BASIC, 80);
        ack.u64(delivery_tag);
        ack.u8(0);
        self.send_method(1, ack).await
    }

    /// Publishes through the default exchange to `queue` (mandatory) and waits for the
    /// broker's confirm.
    pub async fn publish(
        &mut self,
        queue: &[u8],
        properties: &RawProperties,
        body: &[u8],
    ) -> Result<RawConfirm, RawError> {
        let mut publish = Writer::method(BASIC, 40);
        publish.u16(0);
        publish.short_string(b"");
        publish.short_string(queue);
        publish.u8(0b01); // mandatory
        self.send_method(1, publish).await?;
        let mut header = Writer::default();
        header.u16(BASIC);
        header.u16(0);
        header.u64(body.len() as u64);
        encode_properties(properties, &mut header);
        self.send_frame(FRAME_HEADER, 1, &header.0).await?;
        for chunk in body.chunks(self.frame_max as usize - 8) {
            self.send_frame(FRAME_BODY, 1, chunk).await?;
        }
        self.published += 1;
        let mut returned = false;
        loop {
            let mut reply = self.next_method(1).await?;
            match reply.method {
                (BASIC, 50) => {
                    self.content().await?;
                    returned = true;
                }
                (BASIC, 80 | 120) => {
                    let tag = reply.u64()?;
                    let multiple = reply.u8()? & 1 == 1;
                    if tag == self.published || (multiple && tag >= self.published) {
                        return Ok(match (reply.method.1, returned) {
                            (120, _) => RawConfirm::Nacked,
                            (_, true) => RawConfirm::Unroutable,
                            (_, false) => RawConfirm::Queued,
                        });
                    }
                }
                _ => return Err(RawError::Protocol("expected a publisher confirm")),
            }
        }
    }

    /// Closes the connection (the broker requeues whatever is unacked). Best effort.
    pub async fn close(mut self) {
        let mut close = Writer::method(CONNECTION, 50);
        close.u16(200);
        close.short_string(b"done");
        close.u16(0);
        close.u16(0);
        if self.send_method(0, close).await.is_ok() {
            // Wait for close-ok, skipping whatever else is in flight; errors mean closed.
            while let Ok(frame) = self.read_frame().await {
                if frame.channel == 0 && frame.payload.get(..4) == Some(&[0, 10, 0, 51]) {
                    break;
                }
            }
        }
    }

    /// The content header and body frames that follow a get-ok or a return.
    async fn content(&mut self) -> Result<(RawProperties, Vec<u8>), RawError> {
        let frame = self.read_frame().await?;
        if frame.kind != FRAME_HEADER {
            return Err(RawError::Protocol("expected a content header"));
        }
        let mut header = Reader::new(&frame.payload);
        let (_class, _weight, size) = (header.u16()?, header.u16()?, header.u64()?);
        if size > MAX_BODY {
            return Err(RawError::TooLarge(size));
        }
        let properties = decode_properties(&mut header)?;
        let mut body = Vec::with_capacity(size as usize);
        while (body.len() as u64) < size {
            let frame = self.read_frame().await?;
            if frame.kind != FRAME_BODY {
                return Err(RawError::Protocol("expected a body frame"));
            }
            body.extend_from_slice(&frame.payload);
        }
        Ok((properties, body))
    }

    async fn expect_method(&mut self, channel: u16, class: u16, method: u16) -> Result<MethodReader, RawError> {
        let reply = self.next_method(channel).await?;
        if reply.method != (class, method) {
            return Err(RawError::Protocol("the broker answered with another method"));
        }
        Ok(reply)
    }

    /// The next method frame on `channel`; a close from the broker becomes an error.
    async fn next_method(&mut self, channel: u16) -> Result<MethodReader, RawError> {
        let frame = self.read_frame().await?;
        if frame.kind != FRAME_METHOD {
            return Err(RawError::Protocol("expected a method frame"));
        }
        let mut reader = MethodReader::new(frame.payload)?;
        match reader.method {
            (CONNECTION, 50) | (CHANNEL, 40) => {
                let scope = if reader.method.0 == CONNECTION { "connection" } else { "channel" };
                let code = reader.u16()?;
                let text = String::from_utf8_lossy(&reader.short_string()?).into_owned();
                Err(RawError::Closed { scope, code, text })
            }
            _ if frame.channel == channel => Ok(reader),
            _ => Err(RawError::Protocol("a method frame on another channel")),
        }
    }

    /// The next frame other than a heartbeat.
    async fn read_frame(&mut self) -> Result<Frame, RawError> {
        loop {
            if let Some(frame) = self.parse_frame()? {
                if frame.kind == FRAME_HEARTBEAT {
                    continue;
                }
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// A whole frame from the front of the buffer, if one is there.
    fn parse_frame(&mut self) -> Result<Option<Frame>, RawError> {
        let Some(head) = self.buffer.get(..7) else { return Ok(None) };
        let kind = head[0];
        let channel = u16::from_be_bytes([head[1], head[2]]);
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
        if size > self.frame_max.max(MAX_FRAME) {
            return Err(RawError::Protocol("a frame larger than the negotiated maximum"));
        }
        let end = 7 + size as usize;
        match self.buffer.get(end) {
            None => Ok(None),
            Some(&FRAME_END) => {
                let payload = self.buffer[7..end].to_vec();
                self.buffer.drain(..=end);
                Ok(Some(Frame { kind, channel, payload }))
            }
            Some(_) => Err(RawError::Protocol("a frame without its end marker")),
        }
    }

    async fn send_method(&mut self, channel: u16, method: Writer) -> Result<(), RawError> {
        self.send_frame(FRAME_METHOD, channel, &method.0).await
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> Result<(), RawError> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await?;
        Ok(())
    }
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

/// A method frame's payload being read: (class, method) then its arguments.
struct MethodReader {
    method: (u16, u16),
    payload: Vec<u8>,
    at: usize,
}

impl MethodReader {
    fn new(payload: Vec<u8>) -> Result<MethodReader, RawError> {
        let mut reader = Reader::new(&payload);
        let method = (reader.u16()?, reader.u16()?);
        Ok(MethodReader { method, payload, at: 4 })
    }

    fn with<T>(&mut self, read: impl FnOnce(&mut Reader<'_>) -> Result<T, RawError>) -> Result<T, RawError> {
        let mut reader = Reader { bytes: &self.payload, at: self.at };
        let value = read(&mut reader)?;
        self.at = reader.at;
        Ok(value)
    }

    fn u8(&mut self) -> Result<u8, RawError> {
        self.with(|r| r.u8())
    }
    fn u16(&mut self) -> Result<u16, RawError> {
        self.with(|r| r.u16())
    }
    fn u32(&mut self) -> Result<u32, RawError> {
        self.with(|r| r.u32())
    }
    fn u64(&mut self) -> Result<u64, RawError> {
        self.with(|r| r.u64())
    }
    fn short_string(&mut self) -> Result<Vec<u8>, RawError> {
        self.with(|r| r.short_string().map(<[u8]>::to_vec))
    }
    fn long_string(&mut self) -> Result<Vec<u8>, RawError> {
        self.with(|r| r.long_string().map(<[u8]>::to_vec))
    }
    fn table_bytes(&mut self) -> Result<Vec<u8>, RawError> {
        self.long_string()
    }
}

const SHORT: RawError = RawError::Protocol("a frame shorter than its contents");

/// Big-endian reads over a byte slice; running out is a protocol error, never a panic.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RawError> {
        let end = self.at.checked_add(n).ok_or(SHORT)?;
        let slice = self.bytes.get(self.at..end).ok_or(SHORT)?;
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RawError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, RawError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, RawError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, RawError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, RawError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn short_string(&mut self) -> Result<&'a [u8], RawError> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }
    fn long_string(&mut self) -> Result<&'a [u8], RawError> {
        let len = self.u32()?;
        self.take(len as usize)
    }
    fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// Big-endian writes into a buffer.
#[derive(Debug, Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn method(class: u16, method: u16) -> Writer {
        let mut w = Writer::default();
        w.u16(class);
        w.u16(method);
        w
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Short strings longer than 255 bytes are cut: the protocol cannot carry more.
    fn short_string(&mut self, s: &[u8]) {
        let s = &s[..s.len().min(255)];
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s);
    }
    fn long_string(&mut self, s: &[u8]) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
    }
    fn table(&mut self, encoded_fields: &[u8]) {
        self.long_string(encoded_fields);
    }
    fn table_entry(&mut self, key: &[u8], value: impl FnOnce(&mut Writer)) {
        self.short_string(key);
        value(self);
    }
    fn long_string_value(&mut self, s: &[u8]) {
        self.u8(b'S');
        self.long_string(s);
    }
}

/// Property flag bits of the basic class, first property in the highest bit.
mod flag {
    pub const CONTENT_TYPE: u16 = 1 << 15;
    pub const CONTENT_ENCODING: u16 = 1 << 14;
    pub const HEADERS: u16 = 1 << 13;
    pub const DELIVERY_MODE: u16 = 1 << 12;
    pub const PRIORITY: u16 = 1 << 11;
    pub const CORRELATION_ID: u16 = 1 << 10;
    pub const REPLY_TO: u16 = 1 << 9;
    pub const EXPIRATION: u16 = 1 << 8;
    pub const MESSAGE_ID: u16 = 1 << 7;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const TYPE: u16 = 1 << 5;
    pub const USER_ID: u16 = 1 << 4;
    pub const APP_ID: u16 = 1 << 3;
    pub const CLUSTER_ID: u16 = 1 << 2;
    /// Another flags word follows (never for the basic class; tolerated and ignored).
    pub const CONTINUED: u16 = 1;
}

fn decode_properties(r: &mut Reader<'_>) -> Result<RawProperties, RawError> {
    let mut flags = r.u16()?;
    let first = flags;
    while flags & flag::CONTINUED != 0 {
        flags = r.u16()?;
    }
    let flags = first;
    let has = |bit: u16| flags & bit != 0;
    let short = |r: &mut Reader<'_>, bit: u16| -> Result<Option<Vec<u8>>, RawError> {
        if has(bit) { r.short_string().map(|s| Some(s.to_vec())) } else { Ok(None) }
    };
    let mut p = RawProperties {
        content_type: short(r, flag::CONTENT_TYPE)?,
        content_encoding: short(r, flag::CONTENT_ENCODING)?,
        ..RawProperties::default()
    };
    if has(flag::HEADERS) {
        p.headers = Some(RawTable::from_bytes(r.long_string()?.to_vec()));
    }
    if has(flag::DELIVERY_MODE) {
        p.delivery_mode = Some(r.u8()?);
    }
    if has(flag::PRIORITY) {
        p.priority = Some(r.u8()?);
    }
    p.correlation_id = short(r, flag::CORRELATION_ID)?;
    p.reply_to = short(r, flag::REPLY_TO)?;
    p.expiration = short(r, flag::EXPIRATION)?;
    p.message_id = short(r, flag::MESSAGE_ID)?;
    if has(flag::TIMESTAMP) {
        p.timestamp = Some(r.u64()?);
    }
    p.kind = short(r, flag::TYPE)?;
    p.user_id = short(r, flag::USER_ID)?;
    p.app_id = short(r, flag::APP_ID)?;
    p.cluster_id = short(r, flag::CLUSTER_ID)?;
    Ok(p)
}

/// Encodes `p` as a content header's property flags and list.
fn encode_properties(p: &RawProperties, w: &mut Writer) {
    let mut flags = 0u16;
    let present: [(u16, bool); 14] = [
        (flag::CONTENT_TYPE, p.content_type.is_some()),
        (flag::CONTENT_ENCODING, p.content_encoding.is_some()),
        (flag::HEADERS, p.headers.is_some()),
        (flag::DELIVERY_MODE, p.delivery_mode.is_some()),
        (flag::PRIORITY, p.priority.is_some()),
        (flag::CORRELATION_ID, p.correlation_id.is_some()),
        (flag::REPLY_TO, p.reply_to.is_some()),
        (flag::EXPIRATION, p.expiration.is_some()),
        (flag::MESSAGE_ID, p.message_id.is_some()),
        (flag::TIMESTAMP, p.timestamp.is_some()),
        (flag::TYPE, p.kind.is_some()),
        (flag::USER_ID, p.user_id.is_some()),
        (flag::APP_ID, p.app_id.is_some()),
        (flag::CLUSTER_ID, p.cluster_id.is_some()),
    ];
    for (bit, set) in present {
        if set {
            flags |= bit;
        }
    }
    w.u16(flags);
    let short = |w: &mut Writer, s: &Option<Vec<u8>>| {
        if let Some(s) = s {
            w.short_string(s);
        }
    };
    short(w, &p.content_type);
    short(w, &p.content_encoding);
    if let Some(headers) = &p.headers {
        w.table(&headers.bytes);
    }
    if let Some(mode) = p.delivery_mode {
        w.u8(mode);
    }
    if let Some(priority) = p.priority {
        w.u8(priority);
    }
    short(w, &p.correlation_id);
    short(w, &p.reply_to);
    short(w, &p.expiration);
    short(w, &p.message_id);
    if let Some(timestamp) = p.timestamp {
        w.u64(timestamp);
    }
    short(w, &p.kind);
    short(w, &p.user_id);
    short(w, &p.app_id);
    short(w, &p.cluster_id);
}

/// The content header payload of a message with `properties` and a body of `body_len`
/// bytes: class, weight, body size, properties.
pub fn content_header(properties: &RawProperties, body_len: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u16(BASIC);
    w.u16(0);
    w.u64(body_len);
    encode_properties(properties, &mut w);
    w.0
}

/// Why lapin would fail to decode a header table of these bytes (a field name that is
/// not UTF-8, a field of a type it does not know, a length that overruns), or `None`
/// when it would decode it. Walks any depth with an explicit stack: no recursion.
pub fn table_problem(bytes: &[u8]) -> Option<String> {
    // (end of the table or array being walked, whether it is an array)
    let mut open: Vec<(usize, bool)> = vec![(bytes.len(), false)];
    let mut r = Reader::new(bytes);
    while let Some(&(end, array)) = open.last() {
        if r.at == end {
            open.pop();
            continue;
        }
        if r.at > end {
            return Some("a header field overruns its table".into());
        }
        if !array {
            let Ok(key) = r.short_string() else { return Some("a header table is cut short".into()) };
            if std::str::from_utf8(key).is_err() {
                return Some(format!("the header name {} is not UTF-8", escape_bytes(key)));
            }
        }
        let Ok(kind) = r.u8() else { return Some("a header table is cut short".into()) };
        let fixed = match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' | b'F' | b'A' => {
                let Ok(len) = r.u32() else { return Some("a header table is cut short".into()) };
                let inner_end = r.at.saturating_add(len as usize);
                if inner_end > end {
                    return Some("a header field overruns its table".into());
                }
                match kind {
                    b'F' => open.push((inner_end, false)),
                    b'A' => open.push((inner_end, true)),
                    _ => r.at = inner_end,
                }
                continue;
            }
            other => return Some(format!("a header field of unknown type {}", escape_bytes(&[other]))),
        };
        if r.take(fixed).is_err() {
            return Some("a header table is cut short".into());
        }
    }
    None
}

/// `bytes` as text, each byte that is not part of valid UTF-8 written `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn decode_fields(bytes: &[u8], depth: usize) -> Result<Vec<(Vec<u8>, RawValue)>, RawError> {
    let mut r = Reader::new(bytes);
    let mut fields = Vec::new();
    while !r.is_empty() {
        let key = r.short_string()?.to_vec();
        let value = decode_value(&mut r, depth)?;
        fields.push((key, value));
    }
    Ok(fields)
}

fn decode_value(r: &mut Reader<'_>, depth: usize) -> Result<RawValue, RawError> {
    if depth >= MAX_TABLE_DEPTH {
        return Err(RawError::Protocol("header tables nested too deep"));
    }
    let value = match r.u8()? {
        b't' => RawValue::Bool(r.u8()? != 0),
        b'b' => RawValue::I8(r.u8()? as i8),
        b'B' => RawValue::U8(r.u8()?),
        b's' | b'U' => RawValue::I16(r.u16()? as i16),
        b'u' => RawValue::U16(r.u16()?),
        b'I' => RawValue::I32(r.u32()? as i32),
        b'i' => RawValue::U32(r.u32()?),
        b'l' | b'L' => RawValue::I64(r.u64()? as i64),
        b'f' => RawValue::F32(f32::from_bits(r.u32()?)),
        b'd' => RawValue::F64(f64::from_bits(r.u64()?)),
        b'D' => RawValue::Decimal { scale: r.u8()?, value: r.u32()? },
        b'S' => RawValue::LongString(r.long_string()?.to_vec()),
        b'A' => {
            let mut items = Reader::new(r.long_string()?);
            let mut values = Vec::new();
            while !items.is_empty() {
                values.push(decode_value(&mut items, depth + 1)?);
            }
            RawValue::Array(values)
        }
        b'T' => RawValue::Timestamp(r.u64()?),
        b'F' => RawValue::Table(decode_fields(r.long_string()?, depth + 1)?),
        b'x' => RawValue::Bytes(r.long_string()?.to_vec()),
        b'V' => RawValue::Void,
        _ => return Err(RawError::Protocol("a header field of an unknown type")),
    };
    Ok(value)
}

fn encode_fields(fields: &[(Vec<u8>, RawValue)], w: &mut Writer) {
    for (key, value) in fields {
        w.short_string(key);
        encode_value(value, w);
    }
}

fn encode_value(value: &RawValue, w: &mut Writer) {
    let nested = |w: &mut Writer, fill: &dyn Fn(&mut Writer)| {
        let mut inner = Writer::default();
        fill(&mut inner);
        w.long_string(&inner.0);
    };
    match value {
        RawValue::Bool(v) => {
            w.u8(b't');
            w.u8(u8::from(*v));
        }
        RawValue::I8(v) => {
            w.u8(b'b');
            w.u8(*v as u8);
        }
        RawValue::U8(v) => {
            w.u8(b'B');
            w.u8(*v);
        }
        RawValue::I16(v) => {
            w.u8(b's');
            w.u16(*v as u16);
        }
        RawValue::U16(v) => {
            w.u8(b'u');
            w.u16(*v);
        }
        RawValue::I32(v) => {
            w.u8(b'I');
            w.u32(*v as u32);
        }
        RawValue::U32(v) => {
            w.u8(b'i');
            w.u32(*v);
        }
        RawValue::I64(v) => {
            w.u8(b'l');
            w.u64(*v as u64);
        }
        RawValue::F32(v) => {
            w.u8(b'f');
            w.u32(v.to_bits());
        }
        RawValue::F64(v) => {
            w.u8(b'd');
            w.u64(v.to_bits());
        }
        RawValue::Decimal { scale, value } => {
            w.u8(b'D');
            w.u8(*scale);
            w.u32(*value);
        }
        RawValue::LongString(s) => {
            w.u8(b'S');
            w.long_string(s);
        }
        RawValue::Array(values) => {
            w.u8(b'A');
            nested(w, &|inner| values.iter().for_each(|v| encode_value(v, inner)));
        }
        RawValue::Timestamp(v) => {
            w.u8(b'T');
            w.u64(*v);
        }
        RawValue::Table(fields) => {
            w.u8(b'F');
            nested(w, &|inner| encode_fields(fields, inner));
        }
        RawValue::Bytes(b) => {
            w.u8(b'x');
            w.long_string(b);
        }
        RawValue::Void => w.u8(b'V'),
    }
}

/// Parses a content header payload (as [`content_header`] writes it).
pub fn parse_content_header(payload: &[u8]) -> Result<(u64, RawProperties), RawError> {
    let mut r = Reader::new(payload);
    let (_class, _weight, size) = (r.u16()?, r.u16()?, r.u64()?);
    Ok((size, decode_properties(&mut r)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawProperties {
        RawProperties {
            content_type: Some(b"application/json".to_vec()),
            content_encoding: None,
            headers: Some(RawTable::from_fields(vec![
                (b"plain".to_vec(), RawValue::LongString(b"v".to_vec())),
                (
                    b"\xff\xfe".to_vec(),
                    RawValue::Table(vec![(b"n".to_vec(), RawValue::Array(vec![RawValue::I64(-5), RawValue::Void]))]),
                ),
                (b"d".to_vec(), RawValue::Decimal { scale: 2, value: 12345 }),
                (b"f".to_vec(), RawValue::F64(1.5)),
            ])),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some(b"c".to_vec()),
            reply_to: None,
            expiration: Some(b"1".to_vec()),
            message_id: Some(vec![0x80, 0x81, 0x82]),
            timestamp: Some(1_700_000_000),
            kind: None,
            user_id: Some(b"guest".to_vec()),
            app_id: None,
            cluster_id: Some(b"x".to_vec()),
        }
    }

    #[test]
    fn properties_round_trip_with_bytes_that_are_not_utf8() {
        let header = content_header(&sample(), 42);
        assert_eq!(parse_content_header(&header).unwrap(), (42, sample()));
        let empty = RawProperties::default();
        assert_eq!(parse_content_header(&content_header(&empty, 0)).unwrap(), (0, empty));
    }

    #[test]
    fn an_unknown_field_type_or_deep_nesting_keeps_the_table_as_bytes() {
        let unknown = b"\x01kZ\x00".to_vec();
        assert_eq!(RawTable::from_bytes(unknown.clone()).fields, None);
        assert_eq!(table_problem(&unknown).as_deref(), Some("a header field of unknown type Z"));
        let mut deep = RawValue::Void;
        for _ in 0..MAX_TABLE_DEPTH + 1 {
            deep = RawValue::Table(vec![(b"a".to_vec(), deep)]);
        }
        let table = RawTable::from_fields(vec![(b"a".to_vec(), deep)]);
        let received = RawTable::from_bytes(table.bytes.clone());
        assert_eq!((received.fields, received.bytes), (None, table.bytes.clone()));
        assert_eq!(table_problem(&table.bytes), None, "too deep for this decoder, not for lapin's");
    }

    #[test]
    fn lapin_decodable_tables_are_told_from_undecodable_ones_at_any_depth() {
        let mut nested = RawValue::Array(vec![RawValue::Table(vec![(vec![b'k', 0xff], RawValue::Void)])]);
        for _ in 0..1_000 {
            nested = RawValue::Array(vec![nested]);
        }
        let mut w = Writer::default();
        encode_value(&nested, &mut w);
        let mut table = Writer::default();
        table.short_string(b"a");
        table.0.extend_from_slice(&w.0);
        assert_eq!(table_problem(&table.0).as_deref(), Some("the header name k\\xff is not UTF-8"));
        let fine = RawTable::from_fields(vec![(b"ok".to_vec(), RawValue::LongString(vec![0xff]))]);
        assert_eq!(table_problem(&fine.bytes), None, "long strings are bytes for lapin too");
        assert!(table_problem(&fine.bytes[..fine.bytes.len() - 1]).is_some());
        assert_eq!(escape_bytes(b"a\xffb\xc3\xa9"), "a\\xffbé");
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let header = content_header(&sample(), 42);
        for cut in 0..header.len() {
            let _ = parse_content_header(&header[..cut]);
        }
    }
}
