//! Where production RabbitMQ runs: a three-node 4.x cluster with quorum queues, a node
//! stopped (or every node in turn) while tasks flow at a steady rate. Nothing may be lost
//! or wrong, and the longest stretch without an answer is measured.
//!
//! These tests need the cluster `scripts/rabbitmq4 cluster` starts (three nodes of Debian
//! trixie's RabbitMQ 4.0 on ports 5674-5676, 4.3's deprecated features denied, a vhost
//! `quorum` whose default queue type is quorum), so they are ignored by a plain
//! `cargo test`; CI runs them with
//!
//!     scripts/rabbitmq4 cluster
//!     TEST_CLUSTER=scripts/rabbitmq4 cargo test --locked --test it cluster -- --ignored --nocapture
//!
//! `TEST_CLUSTER` names the script that stops and starts nodes. The test's own clients
//! (a publisher and a report consumer) reconnect to another node when theirs goes away,
//! and republish what the broker had not confirmed.

use crate::support::amqp::expected_data;
use crate::support::{RefRecord, task};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use parking_lot::Mutex;
use report_service::platform::clock::SystemClock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The node letters of `scripts/rabbitmq4`, in URL order.
const NODES: [&str; 3] = ["a", "b", "c"];
/// Tasks a second, as the measurement (a steady load, not a flood).
const RATE: u64 = 75;

/// The cluster under test: its nodes' URLs on the `quorum` vhost, and the script that
/// stops and starts them.
struct Cluster {
    control: String,
    urls: Vec<String>,
}

impl Cluster {
    fn from_env() -> Cluster {
        let control = std::env::var("TEST_CLUSTER").expect(
            "TEST_CLUSTER names the cluster script (scripts/rabbitmq4); start the cluster with `scripts/rabbitmq4 cluster`",
        );
        let output = Self::run(&control, &["urls", "quorum"]);
        let urls = output.trim().split(',').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(urls.len(), 3, "three nodes: {output}");
        Cluster { control, urls }
    }

    fn run(control: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(control)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {control}: {e}"));
        assert!(out.status.success(), "{control} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn control(&self, args: Vec<String>) {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Self::run(&control, &args)
        })
        .await
        .expect("control the cluster");
    }

    async fn stop(&self, node: usize) {
        self.control(vec!["stop".into(), NODES[node].into()]).await;
    }

    async fn start(&self, node: usize) {
        self.control(vec!["start".into(), NODES[node].into()]).await;
    }

    /// The node whose `host:port` the service reports in `broker_connected`.
    fn node_of(&self, host_port: &str) -> usize {
        self.urls.iter().position(|url| url.contains(host_port)).unwrap_or_else(|| panic!("no node at {host_port}"))
    }

    fn list(&self) -> String {
        self.urls.join(",")
    }

    /// Deletes `queues` (through rabbitmqctl of a node that is up), also when the test
    /// failed.
    fn delete(&self, queues: &[String]) {
        for node in NODES {
            let deleted = queues.iter().all(|queue| {
                std::process::Command::new(&self.control)
                    .args(["ctl", node, "-q", "delete_queue", "-p", "quorum", queue])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .output()
                    .is_ok_and(|out| out.status.success())
            });
            if deleted {
                return;
            }
        }
    }
}

/// Deletes the test's queues when dropped.
struct Queues<'a>(&'a Cluster, Vec<String>);

impl Drop for Queues<'_> {
    fn drop(&mut self) {
        self.0.delete(&self.1);
    }
}

/// A connection with a confirm-mode channel to the first node (from `start`) that
/// answers, retried until one does (the test's own client: it may wait).
async fn connect(urls: &[String], start: usize) -> (usize, Connection, lapin::Channel) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut node = start;
    loop {
        let url = &urls[node % urls.len()];
        // Each step bounded: a node that is going down can leave a handshake unanswered.
        let opened = tokio::time::timeout(BROKER_STEP, async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await.ok()?;
            let channel = connection.create_channel().await.ok()?;
            channel.confirm_select(ConfirmSelectOptions::default()).await.ok()?;
            Some((connection, channel))
        })
        .await;
        if let Ok(Some((connection, channel))) = opened {
            return (node % urls.len(), connection, channel);
        }
        assert!(Instant::now() < deadline, "no node of the cluster answers");
        node += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The longest the test's own clients wait for one broker operation before they give up
/// on the connection and open another (a connection whose node went away can leave a
/// confirm or a close unanswered for ever).
const BROKER_STEP: Duration = Duration::from_secs(10);

/// Closes `connection`, waiting at most [`BROKER_STEP`].
async fn close(connection: &Connection, why: &str) {
    let _ = tokio::time::timeout(BROKER_STEP, connection.close(200, why.into())).await;
}

/// What the steady load saw.
#[derive(Default)]
struct Ledger {
    sent: BTreeMap<u64, Instant>,
    answered: BTreeMap<u64, Instant>,
    duplicates: u64,
    wrong: Vec<String>,
}

/// Publishes `total` tasks at [`RATE`] per second to `queue`, each confirmed; a task
/// whose publish or confirm failed is sent again through another node.
async fn publish_steadily(urls: Vec<String>, queue: String, total: u64, ledger: Arc<Mutex<Ledger>>, start: usize) {
    let (mut node, mut connection, mut channel) = connect(&urls, start).await;
    let every = Duration::from_micros(1_000_000 / RATE);
    let began = tokio::time::Instant::now();
    let mut id = 0;
    while id < total {
        tokio::time::sleep_until(began + every * id as u32).await;
        let body = task(id, &phones_of(id));
        let properties = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let publish = async {
            match channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await
            {
                Ok(confirm) => matches!(confirm.await, Ok(lapin::Confirmation::Ack(_))),
                Err(_) => false,
            }
        };
        let confirmed = tokio::time::timeout(BROKER_STEP, publish).await.unwrap_or(false);
        if confirmed {
            ledger.lock().sent.entry(id).or_insert_with(Instant::now);
            id += 1;
        } else {
            close(&connection, "reconnecting").await;
            (node, connection, channel) = connect(&urls, node + 1).await;
        }
    }
    close(&connection, "done").await;
}

/// The phones task `id` asks for: three of the data's ten, varying with the id.
fn phones_of(id: u64) -> Vec<u64> {
    vec![id % 10, (id / 10) % 10, 7]
}

/// Consumes `queue`, checking every report against the reference and recording when
/// each task was first answered, reconnecting through another node when its own goes.
async fn consume_reports(
    urls: Vec<String>,
    queue: String,
    records: Arc<Vec<RefRecord>>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    start: usize,
) {
    let mut node = start;
    while !stop.load(Ordering::SeqCst) {
        let (at, connection, channel) = connect(&urls, node).await;
        node = at;
        let consume = channel.basic_consume(
            queue.as_str().into(),
            "cluster-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let mut consumer = match tokio::time::timeout(BROKER_STEP, consume).await {
            Ok(Ok(consumer)) => consumer,
            _ => {
                close(&connection, "reconnecting").await;
                node += 1;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
            match next {
                Err(_) if stop.load(Ordering::SeqCst) => break,
                Err(_) => continue,
                Ok(Some(Ok(delivery))) => {
                    let report: serde_json::Value = serde_json::from_slice(&delivery.data).expect("a JSON report");
                    let id = report["correlation_id"].as_u64().expect("an integer id");
                    let right =
                        report["status"] == "Complete" && report["data"] == expected_data(&records, &phones_of(id));
                    {
                        let mut ledger = ledger.lock();
                        if !right {
                            ledger.wrong.push(report.to_string());
                        }
                        match ledger.answered.entry(id) {
                            std::collections::btree_map::Entry::Occupied(_) => ledger.duplicates += 1,
                            std::collections::btree_map::Entry::Vacant(first) => {
                                first.insert(Instant::now());
                            }
                        }
                    }
                    let _ = tokio::time::timeout(BROKER_STEP, delivery.acker.ack(BasicAckOptions::default())).await;
                }
                Ok(_) => {
                    node += 1;
                    break;
                }
            }
        }
        close(&connection, "done").await;
    }
}

/// The longest a confirmed task may wait for its answer while a node is down.
const MOVED_WITHIN: Duration = Duration::from_secs(8);

/// The longest stretch between `from` and `to` without an answer, and when it began.
fn longest_gap(answers: &BTreeMap<u64, Instant>, from: Instant, to: Instant) -> (Duration, Instant) {
    let mut times: Vec<Instant> = answers.values().copied().filter(|t| *t >= from && *t <= to).collect();
    times.sort();
    let mut edges = vec![from];
    edges.extend(times);
    edges.push(to);
    edges.windows(2).map(|w| (w[1] - w[0], w[0])).max_by_key(|(gap, _)| *gap).unwrap_or((Duration::ZERO, from))
}

/// Runs the steady load through `restarts` (node restarts, each: the node the service is
/// on is stopped for `down`, then started again) and checks the outcome.
async fn steady_load_through(restarts: usize, down: Duration) {
    let cluster = Cluster::from_env();
    let id = format!("{}.{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand_seed());
    let (tasks, reports, dlq) =
        (format!("test.cluster.{id}.tasks"), format!("test.cluster.{id}.reports"), format!("test.cluster.{id}.dlq"));
    let mut all_queues = vec![tasks.clone(), reports.clone(), dlq.clone()];
    all_queues.extend((0..6).map(|n| format!("{tasks}.retry.{}ms", 1000u64 << n)));
    let _cleanup = Queues(&cluster, all_queues);
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = crate::support::amqp::data_file(dir.path(), 10, 200);

    // The report queue exists (a quorum queue) before the first report arrives.
    let (_, connection, channel) = connect(&cluster.urls, 0).await;
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(reports.as_str().into(), durable, quorum).await.expect("declare the report queue");
    // The starting service's clients declare the task queue plain: that must keep
    // working against the service's quorum task queue.
    close(&connection, "declared").await;

    // TEST_CLUSTER_ONE_URL=1: the service is given only the first node's URL, as before
    // address lists, for the README's comparison (it then waits for that node).
    let one_url = std::env::var_os("TEST_CLUSTER_ONE_URL").is_some();
    let service_urls = if one_url { cluster.urls[0].clone() } else { cluster.list() };
    let vars: std::collections::HashMap<String, String> = [
        ("AMQP_URL", service_urls),
        ("QUEUE_TYPE", "quorum".to_owned()),
        ("TASK_QUEUE", tasks.clone()),
        ("REPORT_QUEUE", reports.clone()),
        ("DEAD_LETTER_QUEUE", dlq.clone()),
        ("DATA_PATH", data.display().to_string()),
        ("SNAPSHOT_PATH", dir.path().join("cache.snapshot").display().to_string()),
        ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("WORKER_THREADS", "2".to_owned()),
        ("SHUTDOWN_TIMEOUT_SECS", "20".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = report_service::config::Config::from_vars(&vars).expect("test config");
    let service = report_service::app::start(config, Arc::new(SystemClock)).await.expect("service starts");
    let metrics = Arc::clone(service.metrics());
    let node_now = || metrics.broker_node_now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while node_now().is_none() {
        assert!(Instant::now() < deadline, "the service never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Plain declaration of the task queue, as the starting service's producer does it.
    let (_, connection, channel) = connect(&cluster.urls, 1).await;
    channel
        .queue_declare(tasks.as_str().into(), durable, FieldTable::default())
        .await
        .expect("a plain durable declaration of the quorum task queue is accepted");
    close(&connection, "declared").await;

    let total = RATE * (12 + restarts as u64 * (down.as_secs() + 8));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    // The clients start on a node the service is not on, where there is one.
    let client_node = (cluster.node_of(&node_now().unwrap()) + 1) % 3;
    let consumer = tokio::spawn(consume_reports(
        cluster.urls.clone(),
        reports.clone(),
        Arc::clone(&records),
        Arc::clone(&ledger),
        Arc::clone(&stop),
        client_node,
    ));
    let publisher =
        tokio::spawn(publish_steadily(cluster.urls.clone(), tasks.clone(), total, Arc::clone(&ledger), client_node));

    let mut outages = Vec::new();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The node the service consumes from first, then each other node once.
    let first = cluster.node_of(&node_now().expect("connected before the restart"));
    for node in (0..restarts).map(|i| (first + i) % NODES.len()) {
        let was_on = node_now().is_some_and(|now| cluster.node_of(&now) == node);
        let stopped_at = Instant::now();
        let stopping = cluster.stop(node);
        tokio::pin!(stopping);
        // Failover: the service consumes again, from another node (watched while the
        // node shuts down: it closes its clients' connections first).
        let (mut failover, mut stopped, mut detached) = (None, None, false);
        while failover.is_none() || stopped.is_none() {
            tokio::select! {
                () = &mut stopping, if stopped.is_none() => stopped = Some(stopped_at.elapsed()),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            // Consuming again: from another node, or (one URL) from the same one, back.
            match node_now() {
                None => detached = true,
                Some(now) if failover.is_none() && (cluster.node_of(&now) != node || detached) => {
                    failover = Some(stopped_at.elapsed());
                }
                Some(_) => {}
            }
            let limit = if one_url { Duration::from_secs(120) } else { Duration::from_secs(30) };
            assert!(stopped_at.elapsed() < limit, "not consuming again within {limit:?}");
            if one_url && stopped.is_some() && failover.is_none() && stopped_at.elapsed() >= down {
                // One URL: the service can only wait for its node; start it again.
                cluster.start(node).await;
            }
        }
        let (stopped, failover) = (stopped.unwrap_or_default(), failover.unwrap_or_default());
        tokio::time::sleep(down.saturating_sub(stopped_at.elapsed())).await;
        cluster.start(node).await; // a no-op if it is already up
        outages.push((NODES[node], was_on, stopped_at, stopped, failover));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    publisher.await.expect("publisher");
    let sent_all = Instant::now();
    let deadline = sent_all + Duration::from_secs(90);
    while ledger.lock().answered.len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    consumer.await.expect("consumer");
    service.stop().await.expect("service stops");

    let ledger = ledger.lock();
    let last_answer = ledger.answered.values().max().copied().unwrap_or(sent_all);
    let first_answer = ledger.answered.values().min().copied().unwrap_or(began);
    let (gap, gap_at) = longest_gap(&ledger.answered, first_answer, last_answer);
    let lost: Vec<u64> = ledger.sent.keys().filter(|id| !ledger.answered.contains_key(id)).copied().collect();
    println!(
        "cluster steady load: {} tasks at {RATE}/s, {} sent, {} answered, {} lost, {} wrong, {} duplicates",
        total,
        ledger.sent.len(),
        ledger.answered.len(),
        lost.len(),
        ledger.wrong.len(),
        ledger.duplicates
    );
    for (node, was_on, at, stopped, failover) in &outages {
        let whose = if *was_on { "the service's node" } else { "another node" };
        println!(
            "  node {node} ({whose}) stopped at +{:.1} s (the stop took {:.1} s); the service consumed again {:.2} s after the stop began",
            (*at - began).as_secs_f64(),
            stopped.as_secs_f64(),
            failover.as_secs_f64()
        );
    }
    // The longest a confirmed task waited for its answer: what the service controls. The
    // longest stretch without any answer also holds the test's own client's stalls (its
    // publish waits for a confirm from a node that takes seconds to stop, then it
    // reconnects): a CI run on a slow VM saw a 5.96 s stretch while the service had
    // consumed again 2.67 s after the stop began.
    let slowest = ledger
        .sent
        .iter()
        .filter_map(|(id, sent)| Some(ledger.answered.get(id)?.saturating_duration_since(*sent)))
        .max()
        .unwrap_or_default();
    println!(
        "  longest stretch without an answer: {:.2} s, from +{:.1} s; longest a confirmed task waited for its answer: {:.2} s",
        gap.as_secs_f64(),
        (gap_at - began).as_secs_f64(),
        slowest.as_secs_f64()
    );
    assert_eq!(ledger.sent.len() as u64, total, "every task was published and confirmed");
    assert!(lost.is_empty(), "{} tasks never answered: {:?}", lost.len(), &lost[..lost.len().min(20)]);
    assert!(ledger.wrong.is_empty(), "wrong reports: {:?}", &ledger.wrong[..ledger.wrong.len().min(3)]);
    if !one_url {
        // What the bound tells apart: a service that moves to another node from one that
        // waits for its node to come back (`TEST_CLUSTER_ONE_URL`: 11.65 s and more), so
        // it stays below the time the node is down. It was 5 s until a CI run on a slow
        // VM (2026-12-03) saw 5.66 s with the service consuming from another node 3.02 s
        // after the stop began: the rest is the quorum queues' leaders moving, which is
        // the broker's.
        assert!(MOVED_WITHIN < down, "the bound must be below the outage it tells apart");
        assert!(slowest <= MOVED_WITHIN, "a task waited {slowest:?} for its answer (at most {MOVED_WITHIN:?})");
    }
}

fn rand_seed() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// One node (the one the service consumes from) stopped for 10 s under a steady load:
/// the service fails over to another node at once; 0 lost, 0 wrong, no confirmed task
/// waits more than [`MOVED_WITHIN`] (8 s) for its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RabbitMQ 4 cluster of scripts/rabbitmq4 (TEST_CLUSTER=scripts/rabbitmq4)"]
async fn cluster_a_node_stopped_under_load_loses_nothing_and_answers_resume_within_seconds() {
    steady_load_through(1, Duration::from_secs(10)).await;
}

/// A rolling restart, as at every upgrade: each node in turn (the one the service consumes
/// from first) stopped for 10 s and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RabbitMQ 4 cluster of scripts/rabbitmq4 (TEST_CLUSTER=scripts/rabbitmq4)"]
async fn cluster_a_rolling_restart_loses_nothing_and_answers_resume_within_seconds() {
    steady_load_through(3, Duration::from_secs(10)).await;
}
