//! RabbitMQ I/O with lapin: connecting, declaring queues, consuming and publishing with
//! publisher confirms.
//!
//! Every broker call is bounded by [`BROKER_TIMEOUT`]: lapin can wait forever on a
//! connection whose peer vanished, and a task must never hang on one. This module moves
//! messages; what to send, with which properties, and when to ack is the service's
//! decision. `raw` is the minimal client that reads messages lapin cannot decode.

use super::address::AmqpUrl;
use super::tls::TlsSettings;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::future::Future;
use std::time::Duration;

/// The longest any single broker operation (connect, declare, publish, confirm, ack)
/// may take before it is treated as a failure.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// lapin reported an error.
    #[error("{operation} failed: {source}")]
    Amqp {
        /// The AMQP method, e.g. `basic.publish`.
        operation: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not answer in time.
    #[error("{operation} timed out")]
    Timeout {
        /// The AMQP method.
        operation: &'static str,
    },
    /// A publish was nacked.
    #[error("the broker refused (nacked) the message")]
    Nacked,
    /// A publish on a channel without confirms (a bug, never the broker's doing).
    #[error("publisher confirms are not enabled on the channel")]
    Unconfirmed,
    /// A short string over AMQP's 255-byte limit.
    #[error("{what} is longer than 255 bytes")]
    TooLong {
        /// Which property or name.
        what: &'static str,
    },
    /// A publish that no queue took.
    #[error("the broker confirmed the message but no queue named {queue:?} took it")]
    Unroutable {
        /// The routing key (the queue's name).
        queue: String,
    },
    /// An ack or nack the channel refused (it is closed or closing).
    #[error("the broker refused to {operation}: the channel is closed")]
    ChannelClosed {
        /// The AMQP method.
        operation: &'static str,
    },
}

impl BrokerError {
    /// Whether the error means the session cannot be trusted any more (a timeout, a
    /// closed channel or connection, a message lost in routing to one of the service's
    /// own queues), as opposed to the broker refusing one message (a nack).
    pub fn breaks_session(&self) -> bool {
        !matches!(self, BrokerError::Nacked | BrokerError::TooLong { .. })
    }

    /// Whether the broker refused a declaration because the queue exists with other
    /// arguments (`PRECONDITION_FAILED`).
    fn is_precondition_failed(&self) -> bool {
        match self {
            BrokerError::Amqp { source, .. } => match source.kind() {
                lapin::ErrorKind::ProtocolError(error) => error.get_id() == 406,
                _ => false,
            },
            _ => false,
        }
    }
}

/// Runs one broker operation under [`BROKER_TIMEOUT`].
async fn timed<T>(operation: &'static str, call: impl Future<Output = lapin::Result<T>>) -> Result<T, BrokerError> {
    timed_within(BROKER_TIMEOUT, operation, call).await
}

/// Runs one broker operation under `limit` (never more than [`BROKER_TIMEOUT`]).
async fn timed_within<T>(
    limit: Duration,
    operation: &'static str,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit.min(BROKER_TIMEOUT), call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(BrokerError::Amqp { operation, source }),
        Err(_) => Err(BrokerError::Timeout { operation }),
    }
}

fn short(what: &'static str, text: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(text).map_err(|_| BrokerError::TooLong { what })
}

/// What one session opens: where, the queues it declares, the queue it consumes.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The broker node to connect to (one of `AMQP_URL`'s, chosen by `Failover`).
    pub url: AmqpUrl,
    /// The certificates for an `amqps://` URL.
    pub tls: TlsSettings,
    /// Every queue to declare durable, with its arguments, in order.
    pub queues: Vec<(String, FieldTable)>,
    /// The queue to consume (among `queues`).
    pub consume: String,
    /// Unacked deliveries at most (`basic.qos`, per consumer).
    pub prefetch: u16,
    /// Shown by `rabbitmqctl list_connections client_properties` and the management UI.
    pub connection_name: String,
}

/// How a queue the service uses was found at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// Declared (or found) with the arguments the service asks for.
    AsRequested,
    /// It exists with other arguments (an operator's quorum queue, a max-length...): used
    /// as it is.
    Existing,
}

/// One connection: a channel consuming tasks and a confirm-mode channel publishing.
pub struct Session {
    connection: Connection,
    consume_channel: Channel,
    consumer_tag: ShortString,
    /// Deliveries from the task queue.
    pub consumer: Consumer,
    /// The confirm-mode publishing channel.
    pub publisher: Publisher,
}

impl Session {
    /// Connects, declares the queues and starts consuming.
    ///
    /// The consumed queue is also bound to `amq.direct` under its own name, as the
    /// starting service had it. A queue that already exists with other arguments is used
    /// as it is (see [`declare`]).
    pub async fn open(spec: &SessionSpec) -> Result<Session, BrokerError> {
        let connection = connect(spec).await?;
        for (queue, arguments) in &spec.queues {
            if declare(&connection, queue, arguments).await? == Declared::Existing {
                tracing::info!(
                    queue,
                    "queue exists with other arguments than this service declares; using it as it is"
                );
            }
        }
        let consume_channel = timed("channel.open", connection.create_channel()).await?;
        let publish_channel = timed("channel.open", connection.create_channel()).await?;
        let task_queue = short("queue name", &spec.consume)?;
        timed(
            "queue.bind",
            consume_channel.queue_bind(
                task_queue.clone(),
                "amq.direct".into(),
                task_queue.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        timed("basic.qos", consume_channel.basic_qos(spec.prefetch, BasicQosOptions::default())).await?;
        timed("confirm.select", publish_channel.confirm_select(ConfirmSelectOptions::default())).await?;
        let consumer_tag = short("consumer tag", &format!("{} {}", spec.connection_name, next_tag()))?;
        let consumer = timed(
            "basic.consume",
            consume_channel.basic_consume(
                task_queue,
                consumer_tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let publisher = Publisher { channel: publish_channel };
        Ok(Session { connection, consume_channel, consumer_tag, consumer, publisher })
    }

    /// Whether the connection and both channels are still open.
    pub fn is_open(&self) -> bool {
        self.connection.status().connected()
            && self.consume_channel.status().connected()
            && self.publisher.channel.status().connected()
    }

    /// Asks the broker to stop delivering tasks (deliveries already sent stay unacked
    /// and are requeued when the channel closes, unless handled first).
    pub async fn stop_consuming(&self, within: Duration) -> Result<(), BrokerError> {
        let cancel = self.consume_channel.basic_cancel(self.consumer_tag.clone(), BasicCancelOptions::default());
        timed_within(within, "basic.cancel", cancel).await
    }

    /// Closes the connection; the broker requeues whatever is still unacked.
    pub async fn close(&self, within: Duration) -> Result<(), BrokerError> {
        timed_within(within, "connection.close", self.connection.close(200, "report-service closing".into())).await
    }
}

/// Opens a connection, its frame size capped at [`FRAME_MAX`] unless the URL sets one.
async fn connect(spec: &SessionSpec) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(spec.connection_name.as_str().into());
    let mut uri = spec.url.uri().clone();
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let runtime =
        lapin::runtime::default_runtime().map_err(|source| BrokerError::Amqp { operation: "connect", source })?;
    timed("connect", Connection::connect_uri_with_config(uri, properties, spec.tls.lapin(), runtime)).await
}

/// The largest frame the service accepts, unless `AMQP_URL` says otherwise
/// (`?frame_max=`): the one limit of both AMQP clients (see `amqp_raw::FRAME_MAX`). It
/// bounds how large (and how deeply nested) a message's headers can be when they reach
/// lapin's decoder, which recurses once per nesting level: see `platform::stack` for the
/// stack that takes.
pub const FRAME_MAX: u32 = amqp_raw::FRAME_MAX;

/// Declares `queue` durable with `arguments`. When the broker refuses because the queue
/// exists with other arguments (`PRECONDITION_FAILED`, which also closes the channel),
/// checks on a fresh channel that it exists and uses it as it is.
pub async fn declare(connection: &Connection, queue: &str, arguments: &FieldTable) -> Result<Declared, BrokerError> {
    let name = short("queue name", queue)?;
    let channel = timed("channel.open", connection.create_channel()).await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let declared = timed("queue.declare", channel.queue_declare(name.clone(), durable, arguments.clone())).await;
    let outcome = match declared {
        Ok(_) => Declared::AsRequested,
        Err(error) if error.is_precondition_failed() => {
            let channel = timed("channel.open", connection.create_channel()).await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            timed("queue.declare (passive)", channel.queue_declare(name, passive, FieldTable::default())).await?;
            close_channel(&channel).await;
            return Ok(Declared::Existing);
        }
        Err(error) => return Err(error),
    };
    close_channel(&channel).await;
    Ok(outcome)
}

async fn close_channel(channel: &Channel) {
    if let Err(error) = timed("channel.close", channel.close(200, "declared".into())).await {
        tracing::debug!(%error, "closing a declaration channel");
    }
}

fn next_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whether a published message reached a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// A queue took it.
    Queued,
    /// Confirmed but returned: no queue of that name (e.g. a `reply_to` queue that is gone).
    Unroutable,
}

/// Publishes on the session's confirm-mode channel. Cloned into every task.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Publishes `body` with `properties` through the default exchange to `queue`
    /// (mandatory, so a missing queue is reported) and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<Routed, BrokerError> {
        let queue = short("queue name", queue)?;
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let confirm =
            timed("basic.publish", self.channel.basic_publish("".into(), queue, options, body, properties)).await?;
        match timed("publisher confirm", confirm).await? {
            Confirmation::Ack(None) => Ok(Routed::Queued),
            Confirmation::Ack(Some(_returned)) => Ok(Routed::Unroutable),
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
            Confirmation::NotRequested => Err(BrokerError::Unconfirmed),
        }
    }

    /// [`Publisher::publish`] to one of the service's own queues, which must take it:
    /// a message the broker cannot route there (the queue was deleted) is an error.
    pub async fn publish_to_own(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        match self.publish(queue, body, properties).await? {
            Routed::Queued => Ok(()),
            Routed::Unroutable => Err(BrokerError::Unroutable { queue: queue.to_owned() }),
        }
    }
}

/// Acknowledges a delivery on its channel. A channel that is already closed (lapin
/// then does nothing and says so) is an error: the ack did not happen.
pub async fn ack(delivery: &Delivery) -> Result<(), BrokerError> {
    let done = timed("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await?;
    if done { Ok(()) } else { Err(BrokerError::ChannelClosed { operation: "ack" }) }
}

/// Returns a delivery to its queue for another attempt (the broker sets `redelivered`).
pub async fn requeue(delivery: &Delivery) -> Result<(), BrokerError> {
    requeue_within(delivery, BROKER_TIMEOUT).await
}

/// [`requeue`] bounded by `within` (at shutdown, by what is left of its deadline).
pub async fn requeue_within(delivery: &Delivery, within: Duration) -> Result<(), BrokerError> {
    let nack = delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false });
    let done = timed_within(within, "basic.nack", nack).await?;
    if done { Ok(()) } else { Err(BrokerError::ChannelClosed { operation: "nack" }) }
}
