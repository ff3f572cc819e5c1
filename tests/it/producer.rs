//! The producer against the real broker: a load test's counts against an in-process
//! service, a failing run when nothing answers, `send --wait` and `seed`.

use crate::support;

use report_service::broker::AmqpAddresses;
use report_service::broker::TlsSettings;
use report_service::platform::clock::SystemClock;
use report_tools::producer::{self, Client as Producer, LoadOptions};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::amqp::{Client, Names, amqp_url, data_file, expected_data, next_json};
use support::start_service;

fn url() -> AmqpAddresses {
    AmqpAddresses::parse(amqp_url()).unwrap()
}

fn producer_command(names: &Names) -> Command {
    let mut command = Command::new(crate::support::tool("producer"));
    command.envs(names.vars());
    command
}

#[tokio::test]
async fn a_load_test_against_the_service_counts_every_answer() {
    let names = Names::unique("load");
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = data_file(dir.path(), 200, 50);
    let _queues = Client::new(&names).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let client = Producer::connect(&url(), &TlsSettings::system_only(), &names.tasks).await.unwrap();
    let options = LoadOptions {
        tasks: 400,
        concurrency: 32,
        phones_per_task: 10,
        phone_max: 250,
        phone_base: 0,
        hot_set: None,
        disjoint: false,
        idle_timeout: Duration::from_secs(30),
        seed: 9,
    };
    let summary = producer::load(&client, options, &|_| {}).await.unwrap();
    assert_eq!((summary.sent, summary.answered, summary.unanswered, summary.not_sent), (400, 400, 0, 0));
    assert_eq!((summary.error_reports, summary.duplicates), (0, 0));
    assert!(summary.passed());
    assert!(summary.latency.p50_ms > 0.0 && summary.latency.p50_ms <= summary.latency.p99_ms);
    assert!(summary.latency.p99_ms <= summary.latency.max_ms);
    client.close().await;
    service.stop().await.unwrap();
}

/// Nothing consumes the queue: the run gives up after its idle timeout and fails.
#[tokio::test]
async fn an_unanswered_task_makes_the_load_test_fail() {
    let names = Names::unique("unanswered");
    let _queues = Client::new(&names).await;
    let out = tokio::task::spawn_blocking(move || {
        producer_command(&names)
            .args(["load", "--tasks", "5", "--concurrency", "2", "--timeout", "1", "--json"])
            .output()
    })
    .await
    .unwrap()
    .expect("run producer");
    assert!(!out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the JSON summary");
    assert_eq!((summary["sent"].as_u64(), summary["answered"].as_u64()), (Some(2), Some(0)));
    assert_eq!((summary["unanswered"].as_u64(), summary["not_sent"].as_u64()), (Some(2), Some(3)));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 unanswered, 3 not sent"));
}

#[tokio::test]
async fn send_waits_for_and_prints_its_report_and_seed_fills_the_report_queue() {
    let names = Names::unique("send");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 100, 50);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;

    let send_names = names.clone();
    let out = tokio::task::spawn_blocking(move || {
        producer_command(&send_names)
            .args(["send", "--phones", "1,2,2", "--correlation-id", "42", "--wait", "--timeout", "30"])
            .output()
    })
    .await
    .unwrap()
    .expect("run producer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a pretty report");
    assert_eq!(report["correlation_id"], 42);
    assert_eq!(report["data"], expected_data(&records, &[1, 2]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\n  \"status\": \"Complete\""), "pretty-printed");

    let seed_names = names.clone();
    let out =
        tokio::task::spawn_blocking(move || producer_command(&seed_names).arg("seed").output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (report, _) = next_json(&mut reports).await;
        let id = report["correlation_id"].as_u64().unwrap();
        let phones = producer::SAMPLE_TASKS[(id - producer::FIRST_SAMPLE_ID) as usize];
        assert_eq!(report["data"], expected_data(&records, &phones));
        ids.push(id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (producer::FIRST_SAMPLE_ID..producer::FIRST_SAMPLE_ID + 10).collect::<Vec<_>>());
    service.stop().await.unwrap();
}

/// The broker refuses every publish to the task queue (`max-length` 0, `reject-publish`:
/// what a quorum queue does while it elects a leader): the load test publishes each
/// refused task again, with growing pauses, and once the broker takes them again and a
/// consumer answers, every task is answered once and none is given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_test_publishes_refused_tasks_again_until_the_broker_takes_them() {
    let names = Names::unique("refusing");
    let _queues = Client::new(&names).await;
    let policy = support::amqp::Policy::rejecting_publishes(&names.tasks).await;
    let client = Producer::connect(&url(), &TlsSettings::system_only(), &names.tasks).await.unwrap();
    let options = LoadOptions {
        tasks: 10,
        concurrency: 10,
        phones_per_task: 1,
        phone_max: 10,
        phone_base: 0,
        hot_set: None,
        disjoint: false,
        idle_timeout: Duration::from_secs(30),
        seed: 3,
    };
    let refused = Arc::new(tokio::sync::Notify::new());
    let load = tokio::spawn({
        let refused = Arc::clone(&refused);
        async move {
            let progress = |progress: producer::Progress| {
                if progress.republished > 0 {
                    refused.notify_one();
                }
            };
            let summary = producer::load(&client, options, &progress).await;
            client.close().await;
            summary
        }
    });
    tokio::time::timeout(Duration::from_secs(30), refused.notified()).await.expect("a publish is refused");
    // The broker takes publishes again (the policy goes, and with it a quorum queue's
    // filler), and a consumer answers.
    tokio::task::spawn_blocking(move || drop(policy)).await.unwrap();
    let echo_client = Producer::connect(&url(), &TlsSettings::system_only(), &names.tasks).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let echo = tokio::spawn({
        let stop = stop.clone();
        async move { producer::echo(&echo_client, 16, 100, stop).await }
    });
    let summary = tokio::time::timeout(Duration::from_secs(60), load).await.expect("the load ends").unwrap().unwrap();
    stop.cancel();
    assert_eq!((summary.sent, summary.answered, summary.unanswered, summary.refused), (10, 10, 0, 0), "{summary}");
    assert!(summary.republished >= 10, "every task's first publish was refused: {summary}");
    assert_eq!(summary.duplicates, 0);
    assert!(summary.passed());
    echo.await.unwrap().unwrap();
}
