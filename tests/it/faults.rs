//! Fault injection against the real broker: forced disconnects, a broker application
//! restart, SIGKILL of the worker, broken snapshots, broken data, and a flood of
//! malformed messages. Each test prints its figures (`--nocapture`) for the README's
//! reliability table. The broker restart has the broker to itself (see
//! `support::broker`); the other faults touch only their own test's connections.

use crate::support;

use report_service::ops::metrics::Source;
use report_service::platform::clock::SystemClock;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use support::amqp::{
    self, Client, Names, Seen, WAIT, collect, collect_into, data_file, expected_data, next, next_json, rabbitmqctl,
};
use support::worker::{READY, Worker};
use support::{start_service, task};

fn phones(i: u64) -> Vec<u64> {
    vec![i % 50, (i * 7 + 3) % 50, (i * 13 + 5) % 50]
}

/// A check of one report (every copy of it) against the reference.
fn matches_reference(records: &[support::RefRecord]) -> impl Fn(&serde_json::Value) -> Result<(), String> + '_ {
    move |report| {
        let i = report["correlation_id"].as_u64().ok_or_else(|| format!("no integer id: {report}"))?;
        amqp::agrees(&report["data"], &expected_data(records, &phones(i)), format_args!("task {i}"))
    }
}

/// A fault scenario's inputs: unique queues, data (50 phones x 2,000 records) and
/// `tasks` persistent tasks already queued.
struct Scenario {
    names: Names,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    records: Arc<Vec<support::RefRecord>>,
    client: Client,
    tasks: u64,
}

async fn scenario(names: Names, tasks: u64) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 50, 2_000);
    let client = Client::new(&names).await;
    for i in 0..tasks {
        client.send(&task(i, &phones(i))).await;
    }
    Scenario { names, dir, data, records, client, tasks }
}

/// Stops the service, prints the figures and asserts every task was answered and no
/// copy was wrong; returns the service's metrics.
async fn finish(
    label: &str,
    seen: &Seen,
    scenario: &Scenario,
    service: report_service::app::Running,
) -> Arc<report_service::ops::metrics::Metrics> {
    let metrics = Arc::clone(service.metrics());
    service.stop().await.unwrap();
    eprintln!(
        "{label}: {}; reconnects {}, cache hits {}, computed {}",
        seen.figures(scenario.tasks),
        metrics.reconnects.get(),
        metrics.phones_with(Source::Cache),
        metrics.phones_with(Source::Computed)
    );
    seen.assert_all_right(scenario.tasks);
    metrics
}

/// A clock that holds itself at its `n`-th read until released: reading it blocks. The
/// engine reads it at the start of every task, so the service freezes mid-load with a
/// full prefetch window in flight, however slow the fault's tool (a `rabbitmqctl` run
/// takes about a second) is to land.
#[derive(Debug)]
struct HeldClock {
    reads: AtomicU64,
    hold_at: AtomicU64,
    held: AtomicBool,
}

impl HeldClock {
    fn new() -> HeldClock {
        HeldClock { reads: AtomicU64::new(0), hold_at: AtomicU64::new(u64::MAX), held: AtomicBool::new(false) }
    }

    /// Holds after `n` more reads; blocks the caller until then.
    fn hold_after(&self, n: u64) {
        self.hold_at.store(self.reads.load(SeqCst) + n, SeqCst);
        let deadline = std::time::Instant::now() + WAIT;
        while !self.held.load(SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the clock was not read {n} more times");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn release(&self) {
        self.held.store(false, SeqCst);
    }
}

impl report_service::platform::clock::Clock for HeldClock {
    fn now_ms(&self) -> u64 {
        if self.reads.fetch_add(1, SeqCst) + 1 >= self.hold_at.load(SeqCst) {
            self.hold_at.store(u64::MAX, SeqCst);
            self.held.store(true, SeqCst);
        }
        while self.held.load(SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        report_service::platform::clock::Clock::now_ms(&SystemClock)
    }
}

#[tokio::test]
async fn connections_force_closed_with_two_thousand_tasks_in_flight_lose_nothing() {
    let run = scenario(Names::unique("fault-close"), 2_000).await;
    let mut reports = run.client.consume(&run.names.reports).await;
    let vars = [("PREFETCH", "64"), ("CACHE_TTL_SECS", "0")];
    let clock = Arc::new(HeldClock::new());
    let service = start_service(&run.names, &run.data, run.dir.path(), &vars, clock.clone()).await;
    // Twice: freeze the service mid-load, cut its connection, let it go on: the
    // deliveries it held come back from the broker. (On a thread of its own: a frozen
    // service may freeze this test's runtime too.)
    let faults = tokio::task::spawn_blocking({
        let (queue, metrics, tasks) = (run.names.tasks.clone(), Arc::clone(service.metrics()), run.tasks);
        move || {
            for hold in [300, 700] {
                clock.hold_after(hold);
                let closed = amqp::close_connection_named(&format!("queue {queue}"));
                let answered = metrics.tasks_with(report_service::ops::metrics::Outcome::Answered);
                clock.release();
                assert_eq!(closed, 1);
                assert!(answered < tasks, "the close came after all {answered} tasks were answered");
            }
        }
    });
    let mut seen = Seen::default();
    collect_into(&mut reports, &mut seen, run.tasks as usize, matches_reference(&run.records)).await;
    faults.await.unwrap();
    let metrics = finish("force-close x2", &seen, &run, service).await;
    assert!(metrics.reconnects.get() >= 2);
}

/// `rabbitmqctl stop_app` / `start_app` mid-load: the service reconnects by itself and
/// every persistent task is answered once the broker is back.
#[tokio::test]
async fn a_broker_application_restart_mid_load_loses_nothing() {
    // Its client is kept to the end: the queue cleanup runs when it drops, although its
    // connection dies with the broker.
    let run = scenario(Names::unique_with_the_broker_to_itself("fault-restart"), 2_000).await;
    let mut reports = run.client.consume(&run.names.reports).await;
    let vars = [("PREFETCH", "16"), ("CACHE_TTL_SECS", "0")];
    let clock = Arc::new(HeldClock::new());
    let service = start_service(&run.names, &run.data, run.dir.path(), &vars, clock.clone()).await;
    let mut seen = Seen::default();
    collect_into(&mut reports, &mut seen, 100, matches_reference(&run.records)).await;
    // Frozen mid-load while the broker restarts (see `HeldClock`).
    let (restarted, answered) = tokio::task::spawn_blocking({
        let metrics = Arc::clone(service.metrics());
        move || {
            clock.hold_after(200);
            let stopped = rabbitmqctl(&["-q", "stop_app"]);
            let started = rabbitmqctl(&["-q", "start_app"]);
            let up = rabbitmqctl(&["-q", "await_startup"]);
            let answered = metrics.tasks_with(report_service::ops::metrics::Outcome::Answered);
            clock.release();
            ([stopped, started, up].iter().all(|o| o.status.success()), answered)
        }
    })
    .await
    .unwrap();
    assert!(restarted, "rabbitmqctl stop_app / start_app");
    assert!(answered < run.tasks, "the restart came after all {answered} tasks were answered");
    let client = Client::new(&run.names).await;
    let mut reports = client.consume(&run.names.reports).await;
    collect_into(&mut reports, &mut seen, run.tasks as usize, matches_reference(&run.records)).await;
    let metrics = finish("stop_app/start_app", &seen, &run, service).await;
    assert!(metrics.reconnects.get() >= 1);
}

/// SIGKILL mid-load (no drain, no final snapshot flush), then a restart on the same
/// snapshot: every task answered at least once, and the restored cache gives the same
/// answers as the reference. The worker answers 300 tasks (every one of the 50 phones)
/// and its snapshot holds them; it is then stopped (SIGSTOP) while 1,700 more are
/// queued, so its prefetch window is in flight and the rest waiting when SIGKILL lands,
/// however fast the worker is.
#[tokio::test]
async fn sigkill_mid_load_then_restart_answers_everything_from_a_consistent_cache() {
    let mut run = scenario(Names::unique("fault-kill"), 300).await;
    let mut reports = run.client.consume(&run.names.reports).await;
    let vars = [("PREFETCH", "8"), ("SNAPSHOT_INTERVAL_MS", "20")];
    let mut worker = Worker::start(&run.names, &run.data, run.dir.path(), &vars);
    worker.wait_for(READY);
    let mut seen = Seen::default();
    collect_into(&mut reports, &mut seen, 300, matches_reference(&run.records)).await;
    let snapshot = run.dir.path().join("cache.snapshot");
    let deadline = std::time::Instant::now() + WAIT;
    let stored = || report_service::engine::snapshot::load(&snapshot).ok().flatten().map_or(0, |s| s.entries.len());
    while stored() < 50 {
        assert!(std::time::Instant::now() < deadline, "the snapshot holds {} of 50 phones", stored());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    worker.pause();
    for i in 300..2_000 {
        run.client.send(&task(i, &phones(i))).await;
    }
    run.tasks = 2_000;
    worker.child.kill().expect("SIGKILL");
    worker.child.wait().expect("reaped");

    let service =
        start_service(&run.names, &run.data, run.dir.path(), &[("PREFETCH", "8")], Arc::new(SystemClock)).await;
    collect_into(&mut reports, &mut seen, run.tasks as usize, matches_reference(&run.records)).await;
    let metrics = finish("SIGKILL + restart", &seen, &run, service).await;
    let answered_after = metrics.tasks_with(report_service::ops::metrics::Outcome::Answered);
    assert!(answered_after >= 1_700, "{answered_after} answered after the restart");
    assert_eq!(metrics.phones_with(Source::Computed), 0, "all 50 phones came back from the snapshot");
}

/// The snapshot belongs to the data it was computed from: a restart on the same file
/// restores it (nothing computed), a restart after the file was replaced ignores it
/// and computes every phone again from the new file, never answering with the old
/// figures.
#[tokio::test]
async fn a_restart_on_changed_data_does_not_restore_the_old_snapshot() {
    let names = Names::unique("fault-olddata");
    let dir = tempfile::tempdir().unwrap();
    let (data, old) = data_file(dir.path(), 10, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let phones: Vec<u64> = (0..10).collect();
    let mut ask = async |id: u64| {
        client.send(&task(id, &phones)).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["correlation_id"].as_u64(), Some(id));
        report["data"].clone()
    };
    let first = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    assert_eq!(ask(1).await, expected_data(&old, &phones));
    first.stop().await.unwrap();

    let same = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    assert_eq!(ask(2).await, expected_data(&old, &phones));
    let metrics = Arc::clone(same.metrics());
    same.stop().await.unwrap();
    assert_eq!((metrics.phones_with(Source::Cache), metrics.phones_with(Source::Computed)), (10, 0), "restored");

    // Every call one second longer: new durations, prices and averages for every phone.
    let new: Vec<support::RefRecord> =
        old.iter().map(|r| support::RefRecord { end_date: r.end_date + 1_000, ..*r }).collect();
    let staged = dir.path().join("data.json.new");
    std::fs::write(&staged, support::render(&new, support::Style::Compact)).unwrap();
    std::fs::rename(&staged, &data).unwrap();
    for phone in &phones {
        assert_ne!(expected_data(&old, &[*phone]), expected_data(&new, &[*phone]), "phone {phone} changed");
    }

    let changed = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    assert_eq!(ask(3).await, expected_data(&new, &phones));
    let metrics = Arc::clone(changed.metrics());
    changed.stop().await.unwrap();
    assert_eq!((metrics.phones_with(Source::Cache), metrics.phones_with(Source::Computed)), (0, 10), "recomputed");
}

/// Every kind of broken snapshot: the service starts, answers, and reports the problem.
#[tokio::test]
async fn broken_snapshots_never_stop_the_service() {
    let names = Names::unique("fault-snapshot");
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let older_version = {
        let mut bytes = report_service::engine::snapshot::encode_base(&report_service::engine::snapshot::Base {
            generation: 1,
            identity: report_service::data::DataIdentity { digest: 0, len: 0, segments: 0 },
            written_ms: 0,
            entries: vec![],
        });
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        bytes
    };
    let cases: [(&str, Option<Vec<u8>>); 5] = [
        ("truncated", Some(b"RSCACHE\0\x02\x00\x00\x00short".to_vec())),
        ("garbage", Some(b"\x00\x01 not a snapshot at all".to_vec())),
        ("older format version", Some(older_version)),
        ("unreadable (a directory)", None),
        ("directory not writable (its parent is a file)", None),
    ];
    for (i, (case, bytes)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let (data, records) = data_file(dir.path(), 10, 100);
        let mut snapshot = dir.path().join("cache.snapshot");
        match (&bytes, case) {
            (Some(bytes), _) => std::fs::write(&snapshot, bytes).unwrap(),
            (None, "unreadable (a directory)") => std::fs::create_dir(&snapshot).unwrap(),
            // Tests run as root, which ignores permission bits: a parent that is a
            // regular file makes every write fail regardless.
            (None, _) => {
                std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
                snapshot = dir.path().join("not-a-dir").join("cache.snapshot");
            }
        }
        let vars = [("SNAPSHOT_PATH", snapshot.to_str().unwrap())];
        let service = start_service(&names, &data, dir.path(), &vars, Arc::new(SystemClock)).await;
        let mut writes = service.snapshot_writes().unwrap();
        client.send(&task(i as u64, &[4])).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["data"], expected_data(&records, &[4]), "{case}");
        tokio::time::timeout(WAIT, writes.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
        let metrics = Arc::clone(service.metrics());
        service.stop().await.unwrap();
        let moved_aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("cache.snapshot.corrupt-"));
        let failures = metrics.snapshot_failures.get();
        eprintln!("snapshot {case}: answered, moved aside {moved_aside}, snapshot write failures {failures}");
        if bytes.is_some() || case.starts_with("unreadable") {
            assert!(moved_aside, "{case}: moved aside");
            assert_eq!(failures, 0, "{case}: later writes succeed");
        } else {
            assert!(failures >= 1, "{case}: the failed write is counted");
        }
    }
}

#[tokio::test]
async fn missing_or_malformed_data_at_startup_exits_non_zero_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, br#"[{"phone":1,"start_date":1,"end_date":2},{"phone":"x"}]"#).unwrap();
    for (path, expected) in [
        (dir.path().join("missing.json"), "cannot use DATA_PATH="),
        (malformed, "malformed data at byte 50: expected a non-negative integer `phone`"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_report-service"))
            .env("DATA_PATH", &path)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run report-service");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// 10,000 malformed messages mixed with 1,000 valid tasks, against the real binary:
/// every malformed one dead-lettered, every valid one answered, memory flat.
#[tokio::test]
async fn a_flood_of_malformed_messages_is_dead_lettered_while_valid_tasks_are_answered() {
    let names = Names::unique("fault-flood");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 50, 200);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let mut dead = client.consume(&names.dlq).await;
    let mut worker = Worker::start(&names, &data, dir.path(), &[("MAX_TASK_BYTES", "65536")]);
    worker.wait_for(READY);
    // Warm up the allocator and cache so growth, not first use, is measured.
    for i in 0..200u64 {
        client.send(&task(1_000_000 + i, &phones(i))).await;
    }
    collect(&mut reports, 200, matches_reference(&records)).await.assert_all_right(200);
    let rss_before = worker.rss_kib();
    let bad: [&[u8]; 5] = [b"not json", b"", b"[1,2,3]", br#"{"phones":[1]}"#, b"{\"correlation_id\":\"\xff\"}"];
    let huge = vec![b'x'; 70_000];
    let (mut valid, mut malformed) = (0u64, 0u64);
    for i in 0..11_000u64 {
        if i % 11 == 0 {
            client.send(&task(valid, &phones(valid))).await;
            valid += 1;
        } else {
            let body: &[u8] = if i % 997 == 1 { &huge } else { bad[(i % 5) as usize] };
            client.send_raw(body, lapin::BasicProperties::default()).await;
            malformed += 1;
        }
    }
    let seen = collect(&mut reports, valid as usize, matches_reference(&records)).await;
    for _ in 0..malformed {
        next(&mut dead).await;
    }
    let rss_after = worker.rss_kib();
    eprintln!(
        "flood: {malformed} malformed dead-lettered, valid: {}; RSS {rss_before} KiB -> {rss_after} KiB",
        seen.figures(valid)
    );
    seen.assert_all_right(valid);
    assert!(rss_after < rss_before + 32 * 1024, "memory grew from {rss_before} to {rss_after} KiB");
    drop(worker);
}
