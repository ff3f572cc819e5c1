//! The service's queues: which exist, with which arguments, who may be answered where,
//! and the least broker permissions that covers them.
//!
//! `TASK_QUEUE` is declared durable and, with `QUEUE_TYPE=classic` (the default), with no
//! arguments, exactly as the starting service's clients declare it, so their
//! declarations keep working; `QUEUE_TYPE=quorum` adds `x-queue-type: quorum` to every
//! queue the service declares. A queue that already exists with other arguments is used
//! as it is (`broker::session::declare`).

use super::retry::{self, RetryPolicy};
use crate::broker::{AmqpAddresses, SessionSpec, TlsSettings};
use lapin::types::{AMQPValue, FieldTable};

/// How the service declares its queues (`QUEUE_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// No `x-queue-type` argument: the vhost's default type (classic unless the vhost
    /// says otherwise), as the starting service declared them.
    #[default]
    Classic,
    /// `x-queue-type: quorum` on every queue: replicated over a cluster's nodes.
    Quorum,
}

impl QueueType {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// `arguments` with this type's own added.
    fn arguments(self, mut arguments: FieldTable) -> FieldTable {
        if self == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        arguments
    }
}

/// The three queue names the settings give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// `TASK_QUEUE`.
    pub tasks: String,
    /// `REPORT_QUEUE`.
    pub reports: String,
    /// `DEAD_LETTER_QUEUE`.
    pub dead_letters: String,
}

/// Where the service talks to and which queues it uses.
#[derive(Debug, Clone)]
pub struct Topology {
    /// `AMQP_URL`: one broker or a cluster's nodes.
    pub addresses: AmqpAddresses,
    /// The certificates for `amqps://` URLs.
    pub tls: TlsSettings,
    /// `TASK_QUEUE`.
    pub task_queue: String,
    /// `REPORT_QUEUE`.
    pub report_queue: String,
    /// `DEAD_LETTER_QUEUE`.
    pub dead_letter_queue: String,
    /// `QUEUE_TYPE`.
    pub queue_type: QueueType,
    /// The retry queues, each with its arguments (see `retry`).
    pub retry_queues: Vec<(String, FieldTable)>,
    /// `PREFETCH`.
    pub prefetch: u16,
    /// Shown by `rabbitmqctl list_connections client_properties` and the management UI.
    pub connection_name: String,
}

impl Topology {
    /// The topology of `names` with one retry queue per delay of `retry`. `instance`
    /// names this process (host and pid) in the connection name, so an operator (or a
    /// test) can tell instances apart and close exactly one connection.
    pub fn new(
        addresses: AmqpAddresses,
        tls: TlsSettings,
        names: QueueNames,
        queue_type: QueueType,
        retry: &RetryPolicy,
        prefetch: u16,
        instance: &str,
    ) -> Topology {
        let retry_queues = retry
            .delays()
            .into_iter()
            .map(|delay| {
                let arguments = queue_type.arguments(retry::queue_arguments(&names.tasks, delay));
                (retry::queue_name(&names.tasks, delay), arguments)
            })
            .collect();
        Topology {
            addresses,
            tls,
            connection_name: format!("report-service {instance} queue {}", names.tasks),
            task_queue: names.tasks,
            report_queue: names.reports,
            dead_letter_queue: names.dead_letters,
            queue_type,
            retry_queues,
            prefetch,
        }
    }

    /// What a session with the node at `node` (a position in [`Topology::addresses`])
    /// opens: every queue of the service, then a consumer on the task queue.
    pub fn session(&self, node: usize) -> SessionSpec {
        let plain = || self.queue_type.arguments(FieldTable::default());
        let mut queues = vec![
            (self.task_queue.clone(), plain()),
            (self.report_queue.clone(), plain()),
            (self.dead_letter_queue.clone(), plain()),
        ];
        queues.extend(self.retry_queues.iter().cloned());
        SessionSpec {
            url: self.addresses.urls()[node % self.addresses.len()].clone(),
            tls: self.tls.clone(),
            queues,
            consume: self.task_queue.clone(),
            prefetch: self.prefetch,
            connection_name: self.connection_name.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn topology(names: [&str; 3]) -> Topology {
        let [tasks, reports, dead_letters] = names.map(str::to_owned);
        let retry =
            RetryPolicy { max_attempts: std::num::NonZeroU32::new(5).unwrap(), first_delay: Duration::from_secs(1) };
        Topology::new(
            AmqpAddresses::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(),
            TlsSettings::system_only(),
            QueueNames { tasks, reports, dead_letters },
            QueueType::Classic,
            &retry,
            64,
            "test",
        )
    }

    #[test]
    fn the_minimum_permissions_name_exactly_the_services_resources() {
        let permissions = topology(["task_report", "ready_report", "task_report.dlq"]).permissions();
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
        let permissions = topology(["a+b(c)", "it's", "task_report.dlq"]).permissions();
        assert!(permissions.configure.starts_with(r"^(a\+b\(c\)|a\+b\(c\)\.retry\."), "{}", permissions.configure);
        assert!(permissions.command("/", "u").contains(r"|it'\''s|"), "{}", permissions.command("/", "u"));
    }
}
