//! The producer's connection: a confirm-mode channel on one of the broker's nodes, the
//! task queue declared as the starting service's clients declare it, task bodies, and
//! how a reply is matched to its task.

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use report_service::broker::{AmqpAddresses, Failover, TlsSettings};
use sonic_rs::JsonValueTrait;
use std::time::{Duration, Instant};

/// The starting service's ten sample tasks; correlation ids 13242421424214..=13242421424223.
pub const SAMPLE_TASKS: [[u64; 10]; 10] = [
    [1, 2, 3, 3, 5, 11, 67, 45, 23, 33],
    [4, 5, 6, 4, 99, 98, 97, 56, 45, 45],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    [17, 18, 19, 20, 21, 22, 23, 24, 25, 36],
    [37, 38, 39, 10, 11, 32, 13, 45, 15, 16],
    [7, 1, 0, 10, 76, 8, 78, 15, 1, 11],
    [83, 81, 91, 11, 51, 44, 7, 15, 25, 76],
    [0, 58, 59, 50, 51, 52, 53, 54, 55, 36],
    [70, 82, 9, 3, 11, 12, 2, 75, 87, 90],
    [66, 8, 99, 55, 33, 44, 66, 77, 43, 39],
];
/// The correlation id of the first sample task; the others follow it.
pub const FIRST_SAMPLE_ID: u64 = 13_242_421_424_214;

/// What went wrong for the producer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// lapin reported an error.
    #[error("{operation} failed: {source}")]
    Amqp {
        /// The AMQP method.
        operation: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker nacked a task.
    #[error("the broker did not confirm a published task")]
    NotConfirmed,
    /// A queue name AMQP cannot carry.
    #[error("`{0}` is not a queue name (at most 255 bytes)")]
    QueueName(String),
    /// `send --wait` saw no report in time.
    #[error("no report within {0:?}")]
    Timeout(Duration),
}

pub(super) fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> ClientError {
    move |source| ClientError::Amqp { operation, source }
}

/// A connection with a confirm-mode channel, the task queue declared.
pub struct Client {
    /// The connection, for the echo consumer's own channel.
    pub(super) connection: Connection,
    /// The confirm-mode channel tasks are published on.
    pub(super) channel: Channel,
    /// The task queue.
    pub(super) task_queue: ShortString,
}

impl Client {
    /// Connects to one of `addresses` (with `tls` for `amqps://`) and declares
    /// `task_queue` (durable). With several nodes it starts at one of its own (so many
    /// producers spread out) and tries each in turn until one answers.
    pub async fn connect(
        addresses: &AmqpAddresses,
        tls: &TlsSettings,
        task_queue: &str,
    ) -> Result<Client, ClientError> {
        let seed = Failover::seed_of(&format!("producer {} {:?}", std::process::id(), Instant::now()));
        let mut order = Failover::new(addresses, seed);
        let mut attempts = addresses.len();
        let connection = loop {
            let url = &addresses.urls()[order.current()];
            let properties = ConnectionProperties::default().with_connection_name("report-service producer".into());
            let runtime = lapin::runtime::default_runtime().map_err(amqp("connect"))?;
            match Connection::connect_uri_with_config(url.uri().clone(), properties, tls.lapin(), runtime).await {
                Ok(connection) => break connection,
                Err(error) if attempts <= 1 => return Err(amqp("connect")(error)),
                Err(_) => {
                    attempts -= 1;
                    order.failed();
                }
            }
        };
        let channel = connection.create_channel().await.map_err(amqp("channel.open"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("confirm.select"))?;
        let task_queue = ShortString::try_new(task_queue).map_err(|_| ClientError::QueueName(task_queue.to_owned()))?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel
            .queue_declare(task_queue.clone(), durable, FieldTable::default())
            .await
            .map_err(amqp("queue.declare"))?;
        Ok(Client { connection, channel, task_queue })
    }

    /// An exclusive, server-named queue and a consumer on it, for `reply_to`.
    pub async fn reply_queue(&self) -> Result<(ShortString, Consumer), ClientError> {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = self
            .channel
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .map_err(amqp("queue.declare"))?;
        let name = queue.name().clone();
        let consume = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let consumer = self
            .channel
            .basic_consume(name.clone(), "producer".into(), consume, FieldTable::default())
            .await
            .map_err(amqp("basic.consume"))?;
        Ok((name, consumer))
    }

    /// Publishes one task body (persistent JSON) and waits for the broker's confirm.
    pub async fn send(&self, body: &[u8], reply_to: Option<&ShortString>) -> Result<(), ClientError> {
        let mut properties = persistent_json();
        if let Some(queue) = reply_to {
            properties = properties.with_reply_to(queue.clone());
        }
        let confirm = self
            .channel
            .basic_publish("".into(), self.task_queue.clone(), BasicPublishOptions::default(), body, properties)
            .await
            .map_err(amqp("basic.publish"))?;
        match confirm.await.map_err(amqp("publisher confirm"))? {
            lapin::Confirmation::Ack(_) => Ok(()),
            _ => Err(ClientError::NotConfirmed),
        }
    }

    /// Closes the connection; the process is about to exit, so a broker that is already
    /// gone is not an error worth reporting.
    pub async fn close(&self) {
        let _ = self.connection.close(200, "producer done".into()).await;
    }
}

/// The properties of every message the producer sends: persistent JSON.
pub(super) fn persistent_json() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// A task body.
pub fn task_body(correlation_id: u64, phones: &[u64]) -> Vec<u8> {
    let mut body = format!(r#"{{"correlation_id": {correlation_id}, "phones": ["#);
    for (i, phone) in phones.iter().enumerate() {
        if i > 0 {
            body.push_str(", ");
        }
        body.push_str(itoa::Buffer::new().format(*phone));
    }
    body.push_str("]}");
    body.into_bytes()
}

/// Sends one task; with `wait`, returns its report from an exclusive reply queue.
pub async fn send_one(
    client: &Client,
    id: u64,
    phones: &[u64],
    wait: Option<Duration>,
) -> Result<Option<Vec<u8>>, ClientError> {
    let Some(timeout) = wait else {
        client.send(&task_body(id, phones), None).await?;
        return Ok(None);
    };
    let (queue, mut replies) = client.reply_queue().await?;
    client.send(&task_body(id, phones), Some(&queue)).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, replies.next()).await {
            Ok(Some(Ok(delivery))) if reply_id(&delivery) == Some(id) => return Ok(Some(delivery.data)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(source))) => return Err(ClientError::Amqp { operation: "consume", source }),
            Ok(None) | Err(_) => return Err(ClientError::Timeout(timeout)),
        }
    }
}

/// The integer correlation id of a reply, read from its AMQP property (set on every
/// report) or, failing that, its body.
pub(super) fn reply_id(delivery: &Delivery) -> Option<u64> {
    if let Some(id) = delivery.properties.correlation_id() {
        return id.as_str().parse().ok();
    }
    sonic_rs::get_from_slice(&delivery.data, &["correlation_id"]).ok()?.as_u64()
}

/// Whether a report says `"status": "Error"`.
pub fn is_error_report(body: &[u8]) -> bool {
    sonic_rs::get_from_slice(body, &["status"]).ok().and_then(|s| s.as_str().map(|s| s == "Error")).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_bodies_are_the_documented_json() {
        assert_eq!(task_body(7, &[1, 2, 79_161_234_567]), br#"{"correlation_id": 7, "phones": [1, 2, 79161234567]}"#);
        assert_eq!(task_body(0, &[]), br#"{"correlation_id": 0, "phones": []}"#);
    }
}
