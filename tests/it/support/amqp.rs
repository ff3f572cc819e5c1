//! A test client for the real broker: unique queue names per test, publishing tasks,
//! waiting for reports with a bounded timeout, and deleting the queues afterwards (even
//! when the test panics).

use super::broker::Use;
use amqp_raw::{RawConfirm, RawProperties};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use report_service::broker::TlsSettings;
use report_service::broker::{AmqpUrl, raw};
use report_service::delivery::retry::{RetryPolicy, queue_name};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The broker the tests use: `TEST_AMQP_URL` (README, "Tests"), or RabbitMQ on
/// 127.0.0.1:5672 as guest/guest. Its user needs to be an administrator: the tests add
/// users and policies.
pub(crate) fn amqp_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("TEST_AMQP_URL")
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
    })
}

/// The test broker's parsed URL.
fn test_broker() -> &'static lapin::uri::AMQPUri {
    static URI: std::sync::OnceLock<lapin::uri::AMQPUri> = std::sync::OnceLock::new();
    URI.get_or_init(|| amqp_url().parse().unwrap_or_else(|e| panic!("TEST_AMQP_URL is not an AMQP URL: {e}")))
}

/// `host:port` of the test broker (for a TCP proxy in front of it).
pub(crate) fn broker_address() -> &'static str {
    static ADDRESS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDRESS.get_or_init(|| format!("{}:{}", test_broker().authority.host, test_broker().authority.port))
}

/// The test broker's virtual host (for `rabbitmqctl -p`).
pub(crate) fn vhost() -> &'static str {
    &test_broker().vhost
}

/// The test broker's URL for another user.
pub(crate) fn url_for(user: &str, password: &str) -> String {
    format!("amqp://{user}:{password}@{}/{}", broker_address(), vhost_path())
}

/// The test broker's user and vhost reached through `host_port` (a proxy, a TLS
/// listener) with `scheme`.
pub(crate) fn url_through(scheme: &str, host_port: &str) -> String {
    let user = &test_broker().authority.userinfo;
    format!("{scheme}://{}:{}@{host_port}/{}", user.username, user.password, vhost_path())
}

/// The vhost as a URL path segment (`/` is `%2f`).
fn vhost_path() -> String {
    vhost().bytes().map(|b| if b == b'/' { "%2f".to_owned() } else { (b as char).to_string() }).collect()
}
/// How long a test waits for any single expected message.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// Queue names unique to one test run.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub tasks: String,
    pub reports: String,
    pub dlq: String,
    /// Queues the service declares besides these (its retry queues), deleted with them.
    extra: Arc<std::sync::Mutex<Vec<String>>>,
    /// The test's share of the broker, held as long as any copy of these names.
    _broker: Arc<Use>,
}

/// An id no other call in any test process returns: pid, clock, counter.
pub(crate) fn unique_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}.{}.{}", std::process::id(), nanos % 1_000_000_000, NEXT.fetch_add(1, Ordering::SeqCst))
}

impl Names {
    /// Names for a test that shares the broker with others.
    pub(crate) fn unique(test: &str) -> Names {
        Names::holding(test, Use::shared())
    }

    /// Names for a test that stops the broker: it has the broker to itself.
    pub(crate) fn unique_with_the_broker_to_itself(test: &str) -> Names {
        Names::holding(test, Use::exclusive())
    }

    fn holding(test: &str, broker: Use) -> Names {
        let id = unique_id();
        Names {
            tasks: format!("test.{test}.{id}.tasks"),
            reports: format!("test.{test}.{id}.reports"),
            dlq: format!("test.{test}.{id}.dlq"),
            extra: Arc::default(),
            _broker: Arc::new(broker),
        }
    }

    /// Registers the retry queues a service with `settings` declares, for deletion.
    pub(crate) fn expect_service(&self, settings: &[(&str, &str)]) {
        let mut vars: HashMap<String, String> = self.vars().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        vars.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let config = report_service::config::Config::from_vars(&vars).expect("test config");
        let retry = RetryPolicy { max_attempts: config.max_attempts, first_delay: config.retry_delay };
        let mut extra = self.extra.lock().expect("cleanup list");
        for queue in retry.delays().into_iter().map(|delay| queue_name(&config.task_queue, delay)) {
            if !extra.contains(&queue) {
                extra.push(queue);
            }
        }
    }

    /// The service settings for these queues.
    pub(crate) fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AMQP_URL", amqp_url().to_owned()),
            ("TASK_QUEUE", self.tasks.clone()),
            ("REPORT_QUEUE", self.reports.clone()),
            ("DEAD_LETTER_QUEUE", self.dlq.clone()),
        ]
    }
}

/// Deletes the named queues (and those registered with [`Names::expect_service`]) when
/// dropped, on a thread of its own (works while unwinding from a failed assertion,
/// outside any runtime).
pub(crate) struct Cleanup(pub Vec<String>, pub Arc<std::sync::Mutex<Vec<String>>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut queues = std::mem::take(&mut self.0);
        queues.extend(self.1.lock().map(|extra| extra.clone()).unwrap_or_default());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                let Ok(connection) = Connection::connect(amqp_url(), ConnectionProperties::default()).await else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    for queue in queues {
                        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                    }
                }
                let _ = connection.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// A client connection with a confirm-mode channel.
pub(crate) struct Client {
    /// Open for as long as the client is.
    _connection: Connection,
    pub channel: Channel,
    pub names: Names,
    _cleanup: Cleanup,
}

impl Client {
    /// Connects and declares the task, report and dead-letter queues as plain durable
    /// queues (as clients of the starting service do).
    pub(crate) async fn new(names: &Names) -> Client {
        Client::with_arguments(names, FieldTable::default(), FieldTable::default()).await
    }

    /// [`Client::new`], the report queue and the DLQ declared with `reports` and `dlq`
    /// arguments (as an operator's infrastructure tool might).
    pub(crate) async fn with_arguments(names: &Names, reports: FieldTable, dlq: FieldTable) -> Client {
        Client::with_all_arguments(names, FieldTable::default(), reports, dlq).await
    }

    /// [`Client::new`] with every queue a quorum queue, as `QUEUE_TYPE=quorum` declares them.
    pub(crate) async fn quorum(names: &Names) -> Client {
        let quorum = || {
            let mut arguments = FieldTable::default();
            arguments.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
            arguments
        };
        Client::with_all_arguments(names, quorum(), quorum(), quorum()).await
    }

    async fn with_all_arguments(names: &Names, tasks: FieldTable, reports: FieldTable, dlq: FieldTable) -> Client {
        let connection =
            Connection::connect(amqp_url(), ConnectionProperties::default()).await.expect("broker reachable");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        for (queue, arguments) in [(&names.tasks, tasks), (&names.reports, reports), (&names.dlq, dlq)] {
            channel.queue_declare(queue.as_str().into(), durable, arguments).await.expect("declare");
        }
        let cleanup =
            Cleanup(vec![names.tasks.clone(), names.reports.clone(), names.dlq.clone()], Arc::clone(&names.extra));
        Client { _connection: connection, channel, names: names.clone(), _cleanup: cleanup }
    }

    /// Publishes a raw body to the task queue and waits for the broker's confirm.
    pub(crate) async fn send_raw(&self, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                self.names.tasks.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Publishes a persistent task (it survives a broker restart).
    pub(crate) async fn send(&self, body: &str) {
        self.send_raw(body.as_bytes(), BasicProperties::default().with_delivery_mode(2)).await;
    }

    /// A consumer on `queue` (auto-ack off; the helpers below ack).
    pub(crate) async fn consume(&self, queue: &str) -> Consumer {
        let tag = format!("test-consumer-{}", unique_id());
        self.channel
            .basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume")
    }

    /// Stops `consumer` (a queue that must stay full cannot have a consumer emptying it).
    pub(crate) async fn cancel(&self, consumer: Consumer) {
        let options = lapin::options::BasicCancelOptions::default();
        self.channel.basic_cancel(consumer.tag(), options).await.expect("basic.cancel");
    }

    /// An exclusive, server-named queue for `reply_to`.
    pub(crate) async fn reply_queue(&self) -> String {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue =
            self.channel.queue_declare("".into(), options, FieldTable::default()).await.expect("declare reply queue");
        queue.name().as_str().to_owned()
    }
}

/// The next message on `consumer` (acked), or a panic after [`WAIT`].
pub(crate) async fn next(consumer: &mut Consumer) -> Delivery {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a message within the wait limit")
        .expect("consumer open")
        .expect("delivery");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    delivery
}

/// The next message's body as JSON.
pub(crate) async fn next_json(consumer: &mut Consumer) -> (serde_json::Value, Delivery) {
    let delivery = next(consumer).await;
    let json = serde_json::from_slice(&delivery.data).expect("reports are JSON");
    (json, delivery)
}

/// What a collection received: the first copy of every report by correlation id with
/// how many copies arrived, and every copy that disagreed with the reference (each copy
/// is checked on arrival: a redelivered task answered twice must be right both times).
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) reports: HashMap<String, (serde_json::Value, usize)>,
    /// One line per wrong copy: what the check found.
    pub(crate) wrong: Vec<String>,
}

impl Seen {
    /// Distinct correlation ids answered.
    pub(crate) fn answered(&self) -> usize {
        self.reports.len()
    }

    /// Copies beyond the first of each report.
    pub(crate) fn duplicates(&self) -> usize {
        self.reports.values().map(|(_, n)| n - 1).sum()
    }

    /// Checks and counts one report.
    pub(crate) fn note(&mut self, report: serde_json::Value, check: impl Fn(&serde_json::Value) -> Result<(), String>) {
        if let Err(problem) = check(&report) {
            self.wrong.push(problem);
        }
        self.reports.entry(report["correlation_id"].to_string()).or_insert((report, 0)).1 += 1;
    }

    /// The figures a fault scenario prints: answered, duplicates and wrong, as counted.
    pub(crate) fn figures(&self, sent: u64) -> String {
        let (answered, duplicates, wrong) = (self.answered(), self.duplicates(), self.wrong.len());
        format!("sent {sent}, answered {answered}, duplicates {duplicates}, wrong {wrong}")
    }

    /// Fails unless exactly `sent` tasks were answered and no copy was wrong.
    pub(crate) fn assert_all_right(&self, sent: u64) {
        let shown = &self.wrong[..self.wrong.len().min(3)];
        assert!(self.wrong.is_empty(), "{} wrong copies, e.g. {shown:?}", self.wrong.len());
        assert_eq!(self.answered(), sent as usize, "{}", self.figures(sent));
    }
}

/// A check's verdict: `got` equals `expected`, or a line saying where they differ.
pub(crate) fn agrees(
    got: &serde_json::Value,
    expected: &serde_json::Value,
    what: impl std::fmt::Display,
) -> Result<(), String> {
    if got == expected { Ok(()) } else { Err(format!("{what}: got {got}, expected {expected}")) }
}

/// Collects reports, checking each copy with `check`, until `want` distinct correlation
/// ids were seen or none arrived for [`WAIT`]; the caller compares the counts.
pub(crate) async fn collect(
    consumer: &mut Consumer,
    want: usize,
    check: impl Fn(&serde_json::Value) -> Result<(), String>,
) -> Seen {
    let mut seen = Seen::default();
    collect_into(consumer, &mut seen, want, check).await;
    seen
}

/// Adds reports to `seen`, checking each copy, until it holds `want` distinct ids or
/// none arrived for [`WAIT`] (what arrived is kept; the caller compares the counts). A
/// report received before (say, the one that showed a fault could be injected) must be
/// noted first, so a redelivered copy of it is not taken for a new task.
pub(crate) async fn collect_into(
    consumer: &mut Consumer,
    seen: &mut Seen,
    want: usize,
    check: impl Fn(&serde_json::Value) -> Result<(), String>,
) {
    while seen.answered() < want {
        let Ok(delivery) = tokio::time::timeout(WAIT, consumer.next()).await else {
            return;
        };
        let delivery = delivery.expect("consumer open").expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        match serde_json::from_slice(&delivery.data) {
            Ok(report) => seen.note(report, &check),
            Err(e) => seen.wrong.push(format!("not JSON ({e}): {}", String::from_utf8_lossy(&delivery.data))),
        }
    }
}

/// The command that runs `rabbitmqctl` against the test broker: `TEST_RABBITMQCTL` (words
/// separated by blanks, e.g. `scripts/rabbitmq4 ctl a`), else `rabbitmqctl` on the PATH,
/// else the one in the compose stack's `rabbitmq` container (Compose v2 or v1).
fn rabbitmqctl_command() -> &'static [String] {
    static COMMAND: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    COMMAND.get_or_init(|| {
        let words = |text: &str| text.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        if let Ok(command) = std::env::var("TEST_RABBITMQCTL")
            && !command.trim().is_empty()
        {
            return words(&command);
        }
        let runs = |program: &str, args: &[&str]| {
            std::process::Command::new(program).args(args).output().is_ok_and(|out| out.status.success())
        };
        if std::process::Command::new("rabbitmqctl").arg("help").output().is_ok() {
            words("rabbitmqctl")
        } else if runs("docker", &["compose", "version"]) {
            words("docker compose exec -T rabbitmq rabbitmqctl")
        } else {
            words("docker-compose exec -T rabbitmq rabbitmqctl")
        }
    })
}

/// Runs `rabbitmqctl` with `args` against the test broker (see [`rabbitmqctl_command`]).
pub(crate) fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    let command = rabbitmqctl_command();
    std::process::Command::new(&command[0])
        .args(&command[1..])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?} (set TEST_RABBITMQCTL): {e}"))
}

/// Closes the broker connection whose client-provided name contains `name`, through
/// `rabbitmqctl`, the way an operator or a network fault would.
pub(crate) fn close_connection_named(name: &str) -> usize {
    let listing = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
    let text = String::from_utf8_lossy(&listing.stdout);
    let pids: Vec<&str> =
        text.lines().filter(|line| line.contains(name)).filter_map(|line| line.split_whitespace().next()).collect();
    for pid in &pids {
        let closed = rabbitmqctl(&["-q", "close_connection", pid, "closed by a fault-injection test"]);
        assert!(closed.status.success(), "{}", String::from_utf8_lossy(&closed.stderr));
    }
    pids.len()
}

/// A small data file (phones 0..phones, `per_phone` records each, some records of
/// phone 7 at exact boundaries) and its parsed records for the reference.
pub(crate) fn data_file(dir: &Path, phones: u64, per_phone: u64) -> (std::path::PathBuf, Arc<Vec<super::RefRecord>>) {
    let path = dir.join("data.json");
    let mut bytes = Vec::new();
    let options = report_tools::datagen::Options { phones, per_phone, ..report_tools::datagen::Options::default() };
    report_tools::datagen::generate(&options, &mut bytes, &|_| {}).expect("generate");
    // Boundary records for phone 7 at the end: 10.000, 15.000, 15.001, 30.000 s.
    bytes.truncate(bytes.iter().rposition(|&b| b == b']').expect("array end"));
    for ms in [10_000, 15_000, 15_001, 30_000, 30_001] {
        bytes.extend_from_slice(
            format!(r#",{{"phone":7,"start_date":1684957028364,"end_date":{}}}"#, 1_684_957_028_364i64 + ms).as_bytes(),
        );
    }
    bytes.extend_from_slice(b"]\n");
    std::fs::write(&path, &bytes).expect("write data");
    let records = super::reference_parse(&bytes).expect("valid");
    (path, Arc::new(records))
}

/// The expected `data` array of a report for `phones` (deduplicated, in order).
pub(crate) fn expected_data(records: &[super::RefRecord], phones: &[u64]) -> serde_json::Value {
    // Written from the contract (README, "Message contract"), sharing nothing with the
    // crate's report code: each phone once, in first-seen order; prices are duration x 10
    // (milliseconds / 100), the mean in seconds, `null` without calls.
    let mut seen = std::collections::HashSet::new();
    let entries = phones
        .iter()
        .filter(|&&phone| seen.insert(phone))
        .map(|&phone| {
            let ms: Vec<i64> = records.iter().filter(|r| r.phone == phone).map(|r| r.end_date - r.start_date).collect();
            let n = ms.len() as u64;
            let count = |keep: &dyn Fn(i64) -> bool| ms.iter().filter(|&&d| keep(d)).count() as u64;
            let or_null = |value: Option<f64>| value.map_or(serde_json::Value::Null, |v| serde_json::json!(v));
            serde_json::json!({
                "phone": phone,
                "cnt_all_attempts": n,
                "cnt_att_dur": {
                    "10_sec": count(&|d| d <= 10_000),
                    "10_30_sec": count(&|d| d > 10_000 && d <= 30_000),
                    "30_sec": count(&|d| d > 30_000),
                },
                "min_price_att": or_null(ms.iter().min().map(|&d| d as f64 / 100.0)),
                "max_price_att": or_null(ms.iter().max().map(|&d| d as f64 / 100.0)),
                "avg_dur_att": or_null((n > 0).then(|| ms.iter().sum::<i64>() as f64 / (n as f64 * 1000.0))),
                "sum_price_att_over_15": ms.iter().filter(|&&d| d > 15_000).sum::<i64>() as f64 / 100.0,
            })
        })
        .collect();
    serde_json::Value::Array(entries)
}

/// Every message now in `queue`, taken with `basic.get` and acked, oldest first. For
/// checking a queue's exact contents after the service has stopped.
pub(crate) async fn drain_queue(channel: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut messages = Vec::new();
    loop {
        let got = channel.basic_get(queue.into(), lapin::options::BasicGetOptions::default()).await.expect("basic.get");
        let Some(message) = got else { return messages };
        message.ack(BasicAckOptions::default()).await.expect("ack");
        messages.push(message);
    }
}

/// Ready messages in `queue` (passive declare).
pub(crate) async fn ready_messages(channel: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue exists").message_count()
}

/// A string header of a message.
pub(crate) fn header_text(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Runs `rabbitmqctl args`, asserting success.
pub(crate) fn rabbitmqctl_ok(args: &[&str]) -> String {
    let out = rabbitmqctl(args);
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A broker policy applied to exactly one queue while it lives.
pub(crate) struct Policy {
    name: String,
    /// A queue to purge before the policy goes (a filler that kept it full).
    purge: Option<String>,
}

impl Policy {
    pub(crate) fn on_queue(queue: &str, definition: &str) -> Policy {
        let name = format!("test-policy-{queue}");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl_ok(&[
            "-q",
            "set_policy",
            "-p",
            vhost(),
            "--apply-to",
            "queues",
            "--priority",
            "100",
            &name,
            &pattern,
            definition,
        ]);
        Policy { name, purge: None }
    }

    /// `queue` refuses every publish (`max-length` 0, `reject-publish`): the broker nacks
    /// whatever is sent to it. A classic queue refuses the first message already; a
    /// quorum queue takes one message before it counts as full, so a filler is sent
    /// first (and purged when the policy goes): the queue must have no consumer then.
    /// Applied off the async runtime (`rabbitmqctl` blocks).
    pub(crate) async fn rejecting_publishes(queue: &str) -> Policy {
        let name = queue.to_owned();
        let mut policy = tokio::task::spawn_blocking(move || {
            Policy::on_queue(&name, r#"{"max-length":0,"overflow":"reject-publish"}"#)
        })
        .await
        .expect("set the policy");
        let connection = Connection::connect(amqp_url(), ConnectionProperties::default()).await.expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        let filler = BasicProperties::default().with_app_id("test filler".into());
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b"filler", filler)
            .await
            .expect("publish the filler");
        if matches!(confirm.await.expect("confirm"), lapin::Confirmation::Ack(_)) {
            policy.purge = Some(queue.to_owned());
        }
        let _ = connection.close(200, "filler sent".into()).await;
        policy
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        if let Some(queue) = &self.purge {
            // While the policy holds, the filler is all the queue can hold.
            let _ = rabbitmqctl(&["-q", "purge_queue", "-p", vhost(), queue]);
        }
        let _ = rabbitmqctl(&["-q", "clear_policy", "-p", vhost(), &self.name]);
    }
}

/// A second broker user on the test vhost while it lives.
pub(crate) struct BrokerUser {
    pub name: String,
    pub password: String,
}

impl BrokerUser {
    /// With full permissions.
    pub(crate) fn create(label: &str) -> BrokerUser {
        BrokerUser::with_permissions(label, ".*", ".*", ".*")
    }

    /// With exactly these `configure`, `write` and `read` patterns.
    pub(crate) fn with_permissions(label: &str, configure: &str, write: &str, read: &str) -> BrokerUser {
        let name = format!("test-user-{label}-{}", std::process::id());
        let password = "test-password".to_owned();
        // A leftover of a killed run; absent as a rule.
        let _ = rabbitmqctl(&["-q", "delete_user", &name]);
        rabbitmqctl_ok(&["-q", "add_user", &name, &password]);
        rabbitmqctl_ok(&["-q", "set_permissions", "-p", vhost(), &name, configure, write, read]);
        BrokerUser { name, password }
    }

    pub(crate) fn url(&self) -> String {
        url_for(&self.name, &self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["-q", "delete_user", &self.name]);
    }
}

/// Makes the broker close one channel of the connection whose name contains `name` with
/// a channel error, as it does when a client breaks a channel rule: the channel numbered
/// `pick` from its open channels (sorted by number). Returns the channel's number.
pub(crate) fn break_channel_of(name: &str, pick: impl Fn(&[u32]) -> u32) -> u32 {
    let connections = rabbitmqctl_ok(&["-q", "list_connections", "pid", "client_properties"]);
    let connection = connections
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("a connection named {name}"))
        .to_owned();
    let channels = rabbitmqctl_ok(&["-q", "list_channels", "pid", "connection", "number"]);
    let mine: Vec<(String, u32)> = channels
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (pid, conn, number) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
            (conn == connection).then(|| (pid.to_owned(), number))
        })
        .collect();
    let mut numbers: Vec<u32> = mine.iter().map(|(_, n)| *n).collect();
    numbers.sort_unstable();
    let number = pick(&numbers);
    let pid = &mine.iter().find(|(_, n)| *n == number).expect("channel").0;
    // An ack of a delivery tag the channel never sent: the broker closes the channel
    // with PRECONDITION_FAILED, exactly as for a client's own protocol error.
    let code = format!("rabbit_channel:do(rabbit_misc:string_to_pid(\"{pid}\"), {{'basic.ack', 999999999, false}}).");
    rabbitmqctl_ok(&["eval", &code]);
    number
}

/// Publishes with the minimal raw client: properties lapin itself cannot even express.
pub(crate) async fn publish_raw(queue: &str, properties: RawProperties, body: &[u8]) {
    let url = AmqpUrl::parse(amqp_url()).unwrap();
    let mut raw = raw::connect(&url, &TlsSettings::system_only(), "test raw publisher").await.expect("raw connect");
    assert_eq!(raw.publish(queue.as_bytes(), &properties, body).await.expect("publish"), RawConfirm::Queued);
    raw.close().await;
}
