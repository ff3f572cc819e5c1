//! SIGTERM against the real binary with tasks in flight: it exits 0 within its timeout
//! with the snapshot flushed, and no task is lost (each is answered by it or by a
//! second instance started afterwards on the same queue).

use crate::support;

use report_service::platform::clock::SystemClock;
use std::sync::Arc;
use std::time::Duration;
use support::amqp::{self, Client, Names, Seen, collect_into, data_file, expected_data, next_json};
use support::worker::{READY, Worker};
use support::{start_service, task};

#[tokio::test]
async fn sigterm_with_tasks_in_flight_loses_nothing_and_exits_zero() {
    let names = Names::unique("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 50, 2_000);
    let client = Client::new(&names).await;
    let tasks = 300u64;
    let phones = |i: u64| -> Vec<u64> { (0..10).map(|k| (i * 7 + k) % 50).collect() };
    for i in 0..tasks {
        client.send(&task(i, &phones(i))).await;
    }
    let mut reports = client.consume(&names.reports).await;

    let settings = [("SNAPSHOT_INTERVAL_MS", "600000"), ("PREFETCH", "8"), ("SHUTDOWN_TIMEOUT_SECS", "20")];
    let mut worker = Worker::start(&names, &data, dir.path(), &settings);
    worker.wait_for(READY);

    // Once the first report is out, tasks are in flight: terminate.
    let (first, _) = next_json(&mut reports).await;
    worker.terminate();
    let exit = worker.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "exit status {exit:?}");
    assert!(worker.logged_before_exit("in-flight tasks finished"), "{}", worker.log.join("\n"));
    assert!(
        dir.path().join("cache.snapshot").exists(),
        "the snapshot is flushed at shutdown although its interval is 10 minutes"
    );

    // Whatever the first instance did not answer is redelivered to a second one.
    let second = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let check = |report: &serde_json::Value| {
        let i = report["correlation_id"].as_u64().unwrap();
        amqp::agrees(&report["data"], &expected_data(&records, &phones(i)), format_args!("task {i}"))
    };
    let mut seen = Seen::default();
    seen.note(first, check);
    collect_into(&mut reports, &mut seen, tasks as usize, check).await;
    let metrics = Arc::clone(second.metrics());
    second.stop().await.unwrap();
    let answered_by_second = metrics.tasks_with(report_service::ops::metrics::Outcome::Answered);
    eprintln!("SIGTERM: {}; {answered_by_second} by the second instance", seen.figures(tasks));
    seen.assert_all_right(tasks);
    assert!(answered_by_second > 0, "the scenario needs tasks left after SIGTERM");
}
