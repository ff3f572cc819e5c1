//! RabbitMQ I/O with lapin: connecting, declaring the topology, consuming tasks and
//! publishing with publisher confirms.
//!
//! Every broker call is bounded by [`BROKER_TIMEOUT`]: lapin can wait forever on a
//! connection whose peer vanished, and a task must never hang on one. This module moves
//! messages; what to send, with which properties, and when to ack is the service's
//! decision. `raw` is the minimal client that reads messages lapin cannot decode.

pub mod raw;

use crate::config::{AmqpUrl, Config};
use crate::tls::TlsSettings;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::future::Future;
use std::time::{Duration, SystemTime};

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
async fn bounded<T>(operation: &'static str, call: impl Future<Output = lapin::Result<T>>) -> Result<T, BrokerError> {
    bounded_by(BROKER_TIMEOUT, operation, call).await
}

/// Runs one broker operation under `limit` (never more than [`BROKER_TIMEOUT`]).
async fn bounded_by<T>(
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

/// Where the service talks to: from [`Config`].
#[derive(Debug, Clone)]
pub struct Topology {
    /// `AMQP_URL`.
    pub url: AmqpUrl,
    /// The certificates for an `amqps://` URL.
    pub tls: TlsSettings,
    /// `TASK_QUEUE`.
    pub task_queue: String,
    /// `REPORT_QUEUE`.
    pub report_queue: String,
    /// `DEAD_LETTER_QUEUE`.
    pub dead_letter_queue: String,
    /// The retry queues, each with its arguments (see `retry`).
    pub retry_queues: Vec<(String, FieldTable)>,
    /// `PREFETCH`.
    pub prefetch: u16,
    /// Shown by `rabbitmqctl list_connections client_properties` and the management UI.
    pub connection_name: String,
}

impl Topology {
    /// `instance` names this process (host and pid) in the connection name, so an
    /// operator (or a test) can tell instances apart and close exactly one connection.
    pub fn from_config(config: &Config, instance: &str) -> Topology {
        let retry = crate::retry::RetryPolicy { max_attempts: config.max_attempts, first_delay: config.retry_delay };
        let retry_queues = retry
            .delays()
            .into_iter()
            .map(|delay| {
                (
                    crate::retry::queue_name(&config.task_queue, delay),
                    crate::retry::queue_arguments(&config.task_queue, delay),
                )
            })
            .collect();
        Topology {
            url: config.amqp_url.clone(),
            tls: config.tls.clone(),
            task_queue: config.task_queue.clone(),
            report_queue: config.report_queue.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            retry_queues,
            prefetch: config.prefetch.get(),
            connection_name: format!("report-service {instance} queue {}", config.task_queue),
        }
    }

    /// The least the service's broker user needs (README, "Production").
    pub fn permissions(&self) -> Permissions {
        let task = literal(&self.task_queue);
        let retry = format!(r"{task}\.retry\.[0-9]+ms");
        let (report, dlq) = (literal(&self.report_queue), literal(&self.dead_letter_queue));
        Permissions {
            configure: format!("^({task}|{retry}|{report}|{dlq})$"),
            write: format!(r"^(amq\.default|{task})$"),
            read: format!(r"^({task}|{retry}|amq\.direct)$"),
        }
    }

    /// Whether `queue` is one the service consumes from or parks messages in: never a
    /// destination for a client's report.
    pub fn is_own_input(&self, queue: &str) -> bool {
        queue == self.task_queue || queue == self.dead_letter_queue || self.retry_queues.iter().any(|(q, _)| q == queue)
    }
}

/// The broker permissions the service needs on its vhost and nothing more: regular
/// expressions over resource names, as `rabbitmqctl set_permissions` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Declaring its queues: the task, report and dead-letter queues, the retry queues.
    pub configure: String,
    /// Publishing through the default exchange (reports, replies, dead-letter and retry
    /// copies), and binding the task queue to `amq.direct`.
    pub write: String,
    /// Consuming tasks; the retry queues (RabbitMQ checks read on a queue declared with
    /// a dead-letter exchange), and `amq.direct` for the binding.
    pub read: String,
}

impl Permissions {
    /// The `rabbitmqctl` command that grants them to `user` on `vhost`, quoted for a
    /// POSIX shell.
    pub fn command(&self, vhost: &str, user: &str) -> String {
        let quote = |text: &str| format!("'{}'", text.replace('\'', r"'\''"));
        format!(
            "rabbitmqctl set_permissions -p {} {} {} {} {}",
            quote(vhost),
            quote(user),
            quote(&self.configure),
            quote(&self.write),
            quote(&self.read)
        )
    }
}

/// `text` as a regular expression that matches exactly it.
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
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
    /// The task queue is declared durable with no arguments, exactly as the starting
    /// service's clients declare it, so their declarations keep working; it is also bound
    /// to `amq.direct` under its own name, as the starting service had it. A queue that
    /// already exists with other arguments is used as it is (see [`declare`]).
    pub async fn open(topology: &Topology) -> Result<Session, BrokerError> {
        let connection = connect(topology).await?;
        let no_arguments = FieldTable::default();
        let mut queues: Vec<(&str, &FieldTable)> = vec![
            (&topology.task_queue, &no_arguments),
            (&topology.report_queue, &no_arguments),
            (&topology.dead_letter_queue, &no_arguments),
        ];
        queues.extend(topology.retry_queues.iter().map(|(name, arguments)| (name.as_str(), arguments)));
        for (queue, arguments) in queues {
            if declare(&connection, queue, arguments).await? == Declared::Existing {
                tracing::info!(
                    queue,
                    "queue exists with other arguments than this service declares; using it as it is"
                );
            }
        }
        let consume_channel = bounded("channel.open", connection.create_channel()).await?;
        let publish_channel = bounded("channel.open", connection.create_channel()).await?;
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
        bounded_by(within, "basic.cancel", cancel).await
    }

    /// Closes the connection; the broker requeues whatever is still unacked.
    pub async fn close(&self, within: Duration) -> Result<(), BrokerError> {
        bounded_by(within, "connection.close", self.connection.close(200, "report-service closing".into())).await
    }
}

/// Opens a connection, its frame size capped at [`FRAME_MAX`] unless the URL sets one.
async fn connect(topology: &Topology) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(topology.connection_name.as_str().into());
    let mut uri: lapin::uri::AMQPUri =
        topology.url.expose().parse().map_err(|_| BrokerError::ChannelClosed { operation: "parse the broker URL" })?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let runtime =
        lapin::runtime::default_runtime().map_err(|source| BrokerError::Amqp { operation: "connect", source })?;
    bounded("connect", Connection::connect_uri_with_config(uri, properties, topology.tls.lapin(), runtime)).await
}

/// The largest frame the service accepts, unless `AMQP_URL` says otherwise
/// (`?frame_max=`). It bounds how large (and how deeply nested) a message's headers can
/// be when they reach lapin's decoder, which recurses once per nesting level: see
/// `stack` for the stack that takes.
pub const FRAME_MAX: u32 = 128 * 1024;

/// Declares `queue` durable with `arguments`. When the broker refuses because the queue
/// exists with other arguments (`PRECONDITION_FAILED`, which also closes the channel),
/// checks on a fresh channel that it exists and uses it as it is.
pub async fn declare(connection: &Connection, queue: &str, arguments: &FieldTable) -> Result<Declared, BrokerError> {
    let name = short("queue name", queue)?;
    let channel = bounded("channel.open", connection.create_channel()).await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let declared = bounded("queue.declare", channel.queue_declare(name.clone(), durable, arguments.clone())).await;
    let outcome = match declared {
        Ok(_) => Declared::AsRequested,
        Err(error) if error.is_precondition_failed() => {
            let channel = bounded("channel.open", connection.create_channel()).await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            bounded("queue.declare (passive)", channel.queue_declare(name, passive, FieldTable::default())).await?;
            close_channel(&channel).await;
            return Ok(Declared::Existing);
        }
        Err(error) => return Err(error),
    };
    close_channel(&channel).await;
    Ok(outcome)
}

async fn close_channel(channel: &Channel) {
    if let Err(error) = bounded("channel.close", channel.close(200, "declared".into())).await {
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
            bounded("basic.publish", self.channel.basic_publish("".into(), queue, options, body, properties)).await?;
        match bounded("publisher confirm", confirm).await? {
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

/// The properties of a report: persistent JSON carrying the task's correlation id.
pub fn report_properties(correlation_id: &str) -> Result<BasicProperties, BrokerError> {
    Ok(BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_correlation_id(short("correlation id", correlation_id)?)
        .with_app_id("report-service".into())
        .with_timestamp(unix_seconds()))
}

/// Acknowledges a delivery on its channel. A channel that is already closed (lapin
/// then does nothing and says so) is an error: the ack did not happen.
pub async fn ack(delivery: &Delivery) -> Result<(), BrokerError> {
    let done = bounded("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await?;
    if done { Ok(()) } else { Err(BrokerError::ChannelClosed { operation: "ack" }) }
}

/// Returns a delivery to its queue for another attempt (the broker sets `redelivered`).
pub async fn requeue(delivery: &Delivery) -> Result<(), BrokerError> {
    requeue_within(delivery, BROKER_TIMEOUT).await
}

/// [`requeue`] bounded by `within` (at shutdown, by what is left of its deadline).
pub async fn requeue_within(delivery: &Delivery, within: Duration) -> Result<(), BrokerError> {
    let nack = delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false });
    let done = bounded_by(within, "basic.nack", nack).await?;
    if done { Ok(()) } else { Err(BrokerError::ChannelClosed { operation: "nack" }) }
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(vars: &[(&str, &str)]) -> Topology {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Topology::from_config(&Config::from_vars(&vars).unwrap(), "test")
    }

    #[test]
    fn the_minimum_permissions_name_exactly_the_services_resources() {
        let permissions = topology(&[]).permissions();
        assert_eq!(
            permissions.configure,
            r"^(task_report|task_report\.retry\.[0-9]+ms|ready_report|task_report\.dlq)$"
        );
        assert_eq!(permissions.write, r"^(amq\.default|task_report)$");
        assert_eq!(permissions.read, r"^(task_report|task_report\.retry\.[0-9]+ms|amq\.direct)$");
        assert_eq!(
            permissions.command("/", "svc"),
            r"rabbitmqctl set_permissions -p '/' 'svc' '^(task_report|task_report\.retry\.[0-9]+ms|ready_report|task_report\.dlq)$' '^(amq\.default|task_report)$' '^(task_report|task_report\.retry\.[0-9]+ms|amq\.direct)$'"
        );
    }

    #[test]
    fn queue_names_are_matched_literally_and_quoted_for_the_shell() {
        let permissions = topology(&[("TASK_QUEUE", "a+b(c)"), ("REPORT_QUEUE", "it's")]).permissions();
        assert!(permissions.configure.starts_with(r"^(a\+b\(c\)|a\+b\(c\)\.retry\."), "{}", permissions.configure);
        assert!(permissions.command("/", "u").contains(r"|it'\''s|"), "{}", permissions.command("/", "u"));
    }
}
