//! The connection: handshake, one channel in confirm mode, one consumer, publishing, and
//! the frames they are made of. Reads go through a buffer so a timeout never loses bytes.

use super::codec::{Reader, Writer, decode_properties, encode_properties};
use super::types::{FRAME_MAX, RawConfirm, RawDelivery, RawError, RawProperties, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Bodies larger than this are refused rather than buffered (RabbitMQ's own default
/// `max_message_size` is 128 MiB; tasks are far smaller).
const MAX_BODY: u64 = 128 * 1024 * 1024;

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const BASIC: u16 = 60;
const CONFIRM: u16 = 85;

/// Who the client logs in as, and where: the parts of a broker URL the handshake needs.
/// Its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// The virtual host to open.
    pub vhost: String,
    /// The user (PLAIN authentication).
    pub username: String,
    /// The user's password.
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("vhost", &self.vhost).field("username", &self.username).finish_non_exhaustive()
    }
}

/// One connection with one channel (1) in confirm mode.
#[derive(Debug)]
pub struct RawClient {
    stream: Box<dyn Transport>,
    /// Bytes read but not yet parsed into frames. Reads go through this buffer, so a
    /// read cut short by a timeout loses nothing (`read` is cancellation-safe; a
    /// half-finished `read_exact` would not be).
    buffer: Vec<u8>,
    frame_max: u32,
    /// Publish sequence numbers, for matching confirms.
    published: u64,
}

impl RawClient {
    /// Speaks AMQP over `stream` (a TCP connection, or TLS over one, that the caller
    /// opened): authenticates as `login`, opens channel 1 and selects confirm mode.
    /// `name` is the connection name shown in the management UI and `rabbitmqctl
    /// list_connections`.
    pub async fn open(mut stream: Box<dyn Transport>, login: &Login, name: &str) -> Result<RawClient, RawError> {
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut client = RawClient { stream, buffer: Vec::new(), frame_max: FRAME_MAX, published: 0 };

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
        response.extend_from_slice(login.username.as_bytes());
        response.push(0);
        response.extend_from_slice(login.password.as_bytes());
        start_ok.long_string(&response);
        start_ok.short_string(b"en_US");
        client.send_method(0, start_ok).await?;

        let mut tune = client.expect_method(0, CONNECTION, 30).await?;
        let channel_max = tune.u16()?;
        let frame_max = tune.u32()?;
        client.frame_max = if frame_max == 0 { FRAME_MAX } else { frame_max.min(FRAME_MAX) };
        let mut tune_ok = Writer::method(CONNECTION, 31);
        tune_ok.u16(channel_max);
        tune_ok.u32(client.frame_max);
        tune_ok.u16(0); // no heartbeats: every exchange is short and bounded by its caller
        client.send_method(0, tune_ok).await?;
        let mut open = Writer::method(CONNECTION, 40);
        open.short_string(login.vhost.as_bytes());
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

    /// Acknowledges a message received with [`RawClient::next_delivery`] or [`RawClient::cancel`].
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
        if size > self.frame_max.max(FRAME_MAX) {
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
