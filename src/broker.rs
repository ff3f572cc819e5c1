//! RabbitMQ I/O with lapin: connecting, declaring the topology, consuming tasks and
//! publishing reports and dead letters with publisher confirms.
//!
//! Every broker call is bounded by [`BROKER_TIMEOUT`]: lapin can wait forever on a
//! connection whose peer vanished, and a task must never hang on one. This module moves
//! messages; what to send and when to ack is the service's decision.

use crate::config::{AmqpUrl, Config};
use crate::message::Rejection;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::future::Future;
use std::time::{Duration, SystemTime};

/// The longest any single broker operation (connect, declare, publish, confirm, ack)
/// may take before it is treated as a failure.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{operation} failed: {source}")]
    Amqp {
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("{operation} timed out after {BROKER_TIMEOUT:?}")]
    Timeout { operation: &'static str },
    #[error("the broker refused (nacked) the message")]
    Nacked,
    #[error("publisher confirms are not enabled on the channel")]
    Unconfirmed,
    #[error("{what} is longer than 255 bytes")]
    TooLong { what: &'static str },
}

/// Runs one broker operation under [`BROKER_TIMEOUT`].
async fn bounded<T>(operation: &'static str, call: impl Future<Output = lapin::Result<T>>) -> Result<T, BrokerError> {
    match tokio::time::timeout(BROKER_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(BrokerError::Amqp { operation, source }),
        Err(_) => Err(BrokerError::Timeout { operation }),
    }
}

fn short(what: &'static str, text: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(text).map_err(|_| BrokerError::TooLong { what })
}

/// Where the service talks to: from [`Config`].
#[derive(Debug, Clone)]
pub struct Topology {
    pub url: AmqpUrl,
    pub task_queue: String,
    pub report_queue: String,
    pub dead_letter_queue: String,
    pub prefetch: u16,
    /// Shown by `rabbitmqctl list_connections client_properties` and the management UI.
    pub connection_name: String,
}

impl Topology {
    pub fn from_config(config: &Config) -> Topology {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        Topology {
            url: config.amqp_url.clone(),
            task_queue: config.task_queue.clone(),
            report_queue: config.report_queue.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            prefetch: config.prefetch.get(),
            // Unique per instance and queue, so an operator (or a test) can tell
            // instances apart and close exactly one connection.
            connection_name: format!("report-service {host} pid {} queue {}", std::process::id(), config.task_queue),
        }
    }
}

/// One connection: a channel consuming tasks and a confirm-mode channel publishing.
pub struct Session {
    connection: Connection,
    consume_channel: Channel,
    consumer_tag: ShortString,
    pub consumer: Consumer,
    pub publisher: Publisher,
}

impl Session {
    /// Connects, declares the queues and starts consuming.
    ///
    /// The task queue is declared durable with no arguments, exactly as the starting
    /// service's clients declare it, so their declarations keep working; it is also bound
    /// to `amq.direct` under its own name, as the starting service had it.
    pub async fn open(topology: &Topology) -> Result<Session, BrokerError> {
        let properties = ConnectionProperties::default().with_connection_name(topology.connection_name.as_str().into());
        let connection = bounded("connect", Connection::connect(topology.url.expose(), properties)).await?;
        let consume_channel = bounded("channel.open", connection.create_channel()).await?;
        let publish_channel = bounded("channel.open", connection.create_channel()).await?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        for queue in [&topology.task_queue, &topology.report_queue, &topology.dead_letter_queue] {
            let name = short("queue name", queue)?;
            bounded("queue.declare", consume_channel.queue_declare(name, durable, FieldTable::default())).await?;
        }
        let task_queue = short("queue name", &topology.task_queue)?;
        bounded(
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
        bounded("basic.qos", consume_channel.basic_qos(topology.prefetch, BasicQosOptions::default())).await?;
        bounded("confirm.select", publish_channel.confirm_select(ConfirmSelectOptions::default())).await?;
        let consumer_tag = short("consumer tag", &format!("{} {}", topology.connection_name, next_tag()))?;
        let consumer = bounded(
            "basic.consume",
            consume_channel.basic_consume(
                task_queue,
                consumer_tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let publisher = Publisher {
            channel: publish_channel,
            report_queue: short("queue name", &topology.report_queue)?,
            dead_letter_queue: short("queue name", &topology.dead_letter_queue)?,
            task_queue: topology.task_queue.clone(),
        };
        Ok(Session { connection, consume_channel, consumer_tag, consumer, publisher })
    }

    /// Asks the broker to stop delivering tasks (deliveries already sent stay unacked
    /// and are requeued when the channel closes, unless handled first).
    pub async fn stop_consuming(&self) -> Result<(), BrokerError> {
        bounded(
            "basic.cancel",
            self.consume_channel.basic_cancel(self.consumer_tag.clone(), BasicCancelOptions::default()),
        )
        .await
    }

    /// Closes the connection; the broker requeues whatever is still unacked.
    pub async fn close(&self) -> Result<(), BrokerError> {
        bounded("connection.close", self.connection.close(200, "report-service shutting down".into())).await
    }
}

fn next_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whether a published message reached a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Queued,
    /// Confirmed but returned: no queue of that name (e.g. a `reply_to` queue that is gone).
    Unroutable,
}

/// Publishes on the session's confirm-mode channel. Cloned into every task.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    report_queue: ShortString,
    dead_letter_queue: ShortString,
    task_queue: String,
}

impl Publisher {
    /// Publishes a report (persistent JSON with the correlation id) to `reply_to` when
    /// given, else to the report queue, and waits for the broker's confirm.
    pub async fn report(
        &self,
        body: &[u8],
        correlation_id: &str,
        reply_to: Option<&ShortString>,
    ) -> Result<Routed, BrokerError> {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_correlation_id(short("correlation id", correlation_id)?)
            .with_app_id("report-service".into())
            .with_timestamp(unix_seconds());
        let queue = reply_to.unwrap_or(&self.report_queue).clone();
        self.publish(queue, body, properties).await
    }

    /// Copies a message to the dead-letter queue with headers saying why and when.
    pub async fn dead_letter(&self, delivery: &Delivery, rejection: &Rejection) -> Result<Routed, BrokerError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut put = |key: &str, value: String| {
            headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        };
        put("x-rejection-reason", rejection.code().to_owned());
        put("x-rejection-detail", rejection.to_string());
        put("x-rejected-at", crate::message::format_timestamp(SystemTime::now()));
        put("x-rejected-by", "report-service".to_owned());
        put("x-original-queue", self.task_queue.clone());
        headers.insert("x-original-redelivered".into(), AMQPValue::Boolean(delivery.redelivered));
        let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        self.publish(self.dead_letter_queue.clone(), &delivery.data, properties).await
    }

    async fn publish(
        &self,
        queue: ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, BrokerError> {
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let confirm =
            bounded("basic.publish", self.channel.basic_publish("".into(), queue, options, body, properties)).await?;
        match bounded("publisher confirm", confirm).await? {
            Confirmation::Ack(None) => Ok(Routed::Queued),
            Confirmation::Ack(Some(_returned)) => Ok(Routed::Unroutable),
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
            Confirmation::NotRequested => Err(BrokerError::Unconfirmed),
        }
    }
}

/// Acknowledges a delivery on its channel.
pub async fn ack(delivery: &Delivery) -> Result<(), BrokerError> {
    bounded("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await.map(drop)
}

/// Returns a delivery to its queue for another attempt.
pub async fn requeue(delivery: &Delivery) -> Result<(), BrokerError> {
    bounded("basic.nack", delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false })).await.map(drop)
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
