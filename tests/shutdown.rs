//! SIGTERM against the real binary with tasks in flight: it exits 0 within its timeout
//! with the snapshot flushed, and no task is lost (each is answered by it or by a
//! second instance started afterwards on the same queue).

mod support;

use report_service::clock::SystemClock;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use support::amqp::{Client, Names, data_file, expected_data, next_json};
use support::start_service;

/// Waits (bounded) for a line containing `needle` on the child's stdout; returns all
/// lines read so far.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line =
            lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line with {needle:?}; got:\n{}", seen.join("\n")));
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return;
        }
    }
}

#[tokio::test]
async fn sigterm_with_tasks_in_flight_loses_nothing_and_exits_zero() {
    let names = Names::unique("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 50, 2_000);
    let client = Client::new(&names).await;
    let tasks = 300u64;
    let phones = |i: u64| -> Vec<u64> { (0..10).map(|k| (i * 7 + k) % 50).collect() };
    for i in 0..tasks {
        client.send(&json!({ "correlation_id": i, "phones": phones(i) }).to_string()).await;
    }
    let mut reports = client.consume(&names.reports).await;

    let snapshot = dir.path().join("cache.snapshot");
    names.expect_service(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-service"))
        .envs(names.vars())
        .env("DATA_PATH", &data)
        .env("SNAPSHOT_PATH", &snapshot)
        .env("SNAPSHOT_INTERVAL_MS", "600000")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("PREFETCH", "8")
        .env("SHUTDOWN_TIMEOUT_SECS", "20")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start report-service");
    let (sender, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut log = Vec::new();
    wait_for_line(&lines, r#""event":"Consumer connected and ready to consume messages.""#, &mut log);

    // Once the first report is out, tasks are in flight: terminate.
    let (first, _) = next_json(&mut reports).await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    wait_for_line(&lines, "in-flight tasks finished", &mut log);
    assert!(snapshot.exists(), "the snapshot is flushed at shutdown although its interval is 10 minutes");

    // Whatever the first instance did not answer is redelivered to a second one.
    let second = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let check = |report: &serde_json::Value| {
        let i = report["correlation_id"].as_u64().unwrap();
        assert_eq!(report["data"], expected_data(&records, &phones(i)), "task {i}");
    };
    let mut seen = support::amqp::Seen::new();
    support::amqp::note(&mut seen, first, check);
    support::amqp::collect_into(&mut reports, &mut seen, tasks as usize, check).await;
    assert_eq!(seen.len(), tasks as usize, "no task lost");
    let metrics = Arc::clone(second.metrics());
    second.stop().await.unwrap();
    let answered_by_second = metrics.tasks_with(report_service::metrics::Outcome::Answered);
    let duplicates: usize = seen.values().map(|(_, n)| n - 1).sum();
    eprintln!(
        "SIGTERM: sent {tasks}, answered {}, duplicates {duplicates}, wrong 0; {answered_by_second} by the second instance",
        seen.len()
    );
    assert!(answered_by_second > 0, "the scenario needs tasks left after SIGTERM");
}
