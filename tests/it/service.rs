//! The service against the real broker: every report equal to the reference, every bad
//! input's outcome, concurrency, the cache and its snapshot, and a forced disconnect.
//! Each test has its own randomly named queues and deletes them afterwards.

use crate::support;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use report_service::ops::metrics::Source;
use report_service::platform::clock::{ManualClock, SystemClock};
use report_tools::producer::SAMPLE_TASKS;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::amqp::{self, Client, Names, collect, data_file, expected_data, next, next_json};
use support::{start_service, task};

#[tokio::test]
async fn the_sample_tasks_get_exact_reports_in_the_report_queue() {
    let names = Names::unique("samples");
    let dir = tempfile::tempdir().unwrap();
    // Phones 0..90: 90..99 of the samples are unknown and must report zeros.
    let (data, records) = data_file(dir.path(), 90, 300);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    for (i, phones) in SAMPLE_TASKS.iter().enumerate() {
        client.send(&task(json!(13_242_421_424_214u64 + i as u64), phones)).await;
    }
    for _ in 0..SAMPLE_TASKS.len() {
        let (report, delivery) = next_json(&mut reports).await;
        let id = report["correlation_id"].as_u64().expect("an integer id stays an integer");
        let phones = SAMPLE_TASKS[(id - 13_242_421_424_214) as usize];
        assert_eq!(report["status"], "Complete");
        assert_eq!((report["from"].as_str(), report["to"].as_str()), (Some("report_service"), Some("client")));
        assert_eq!(report["data"], expected_data(&records, &phones), "task {id}");
        assert!(report["total_duration"].as_f64().is_some_and(|d| d >= 0.0));
        let received = report["task_received"].as_str().expect("task_received");
        assert_eq!(received.len(), "2026-11-27 21:22:03.049772".len(), "{received}");
        let props = &delivery.properties;
        assert_eq!(props.correlation_id().as_ref().map(|s| s.as_str().to_owned()), Some(id.to_string()));
        assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        assert_eq!(*props.delivery_mode(), Some(2), "reports are persistent");
    }
    service.stop().await.unwrap();
}

/// Random phone lists (known, unknown and repeated phones, u64 extremes) against the
/// reference, with the cache both cold and warm.
#[tokio::test]
async fn random_tasks_get_reports_equal_to_the_reference() {
    let names = Names::unique("random");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 40, 150);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let mut dice = support::Dice::new(0x5eed);
    let mut tasks = std::collections::HashMap::new();
    for id in 0..120u64 {
        let phones: Vec<u64> = (0..dice.below(15))
            .map(|_| match dice.below(10) {
                0 => u64::MAX,
                1 => 1_000 + dice.below(5) as u64,
                _ => dice.below(45) as u64,
            })
            .collect();
        client.send(&task(json!(id), &phones)).await;
        tasks.insert(id, phones);
    }
    collect(&mut reports, tasks.len(), |report| {
        let id = report["correlation_id"].as_u64().unwrap();
        amqp::agrees(
            &report["data"],
            &expected_data(&records, &tasks[&id]),
            format_args!("task {id}: {:?}", tasks[&id]),
        )
    })
    .await
    .assert_all_right(tasks.len() as u64);
    service.stop().await.unwrap();
}

/// Large tasks (bodies of thousands of phones, each run as a task of its own) and small
/// ones (driven by the consume loop) at once: every report is the reference's.
#[tokio::test]
async fn large_and_small_tasks_at_once_get_reports_equal_to_the_reference() {
    let names = Names::unique("largesmall");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 40, 150);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let mut tasks = std::collections::HashMap::new();
    for id in 0..40u64 {
        let phones: Vec<u64> = if id % 4 == 0 {
            // About 14 KB: known phones among thousands of unknown ones.
            (0..2_000).map(|k| (k * 7 + id) % 3_000).collect()
        } else {
            (0..8).map(|k| (id * 3 + k) % 45).collect()
        };
        let body = task(json!(id), &phones);
        assert_eq!(body.len() > 4 * 1024, id % 4 == 0);
        client.send(&body).await;
        tasks.insert(id, phones);
    }
    collect(&mut reports, tasks.len(), |report| {
        let id = report["correlation_id"].as_u64().unwrap();
        amqp::agrees(&report["data"], &expected_data(&records, &tasks[&id]), format_args!("task {id}"))
    })
    .await
    .assert_all_right(tasks.len() as u64);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn reply_to_string_ids_property_ids_duplicates_and_unknown_phones() {
    let names = Names::unique("variants");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 20, 200);
    let client = Client::new(&names).await;
    let reply_queue = client.reply_queue().await;
    let mut replies = client.consume(&reply_queue).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;

    let to_reply_queue = BasicProperties::default().with_reply_to(reply_queue.as_str().into());
    client.send_raw(task(json!("abc-1"), &[7, 7, 3, 79_161_234_567]).as_bytes(), to_reply_queue).await;
    let (report, delivery) = next_json(&mut replies).await;
    assert_eq!(report["correlation_id"], "abc-1", "a string id stays a string");
    assert_eq!(report["data"], expected_data(&records, &[7, 3, 79_161_234_567]));
    assert_eq!(report["data"][2]["cnt_all_attempts"], 0);
    assert_eq!(report["data"][2]["min_price_att"], Value::Null);
    assert_eq!(delivery.properties.correlation_id().as_ref().map(|s| s.as_str()), Some("abc-1"));

    let with_property = BasicProperties::default().with_correlation_id("from-property".into());
    client.send_raw(br#"{"phones": [1, 2]}"#, with_property).await;
    let (report, delivery) = next_json(&mut reports).await;
    assert_eq!(report["correlation_id"], "from-property");
    assert_eq!(report["data"], expected_data(&records, &[1, 2]));
    assert_eq!(delivery.properties.correlation_id().as_ref().map(|s| s.as_str()), Some("from-property"));

    client.send(&task(json!(-5), &[])).await;
    let (report, _) = next_json(&mut reports).await;
    assert_eq!((report["correlation_id"].as_i64(), report["data"].clone()), (Some(-5), json!([])));
    service.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_dead_lettered_or_answered_with_an_error_report_and_the_service_keeps_going() {
    let names = Names::unique("badinput");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 10, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let mut dead = client.consume(&names.dlq).await;
    let service = start_service(
        &names,
        &data,
        dir.path(),
        &[("MAX_TASK_BYTES", "4096"), ("MAX_PHONES_PER_TASK", "5")],
        Arc::new(SystemClock),
    )
    .await;

    let oversize = format!(r#"{{"correlation_id": 1, "phones": [{}1]}}"#, "1, ".repeat(2000));
    let dead_letters: [(&[u8], &str); 8] = [
        (b"this is not json", "not_json"),
        (b"", "not_json"),
        (br#"{"correlation_id": 1, "phones": [1, 2"#, "not_json"),
        (b"{\"correlation_id\": \"\xff\xfe\", \"phones\": [1]}", "not_json"),
        (oversize.as_bytes(), "too_large"),
        (b"[1, 2, 3]", "no_correlation_id"),
        (br#"{"phones": [1, 2]}"#, "no_correlation_id"),
        (br#"{"correlation_id": {"a": 1}, "phones": [1]}"#, "no_correlation_id"),
    ];
    for (body, _) in &dead_letters {
        client.send_raw(body, BasicProperties::default().with_message_id("m".into())).await;
    }
    // Tasks run concurrently (a large body as a task of its own), so the copies may come
    // in any order: each is matched to what was sent by its body, copied unchanged.
    let mut unseen = dead_letters.to_vec();
    for _ in 0..dead_letters.len() {
        let delivery = next(&mut dead).await;
        let at = unseen.iter().position(|(body, _)| delivery.data == *body);
        let (_, reason) = unseen.swap_remove(at.expect("a dead letter whose body is one sent, copied unchanged, once"));
        let headers = delivery.properties.headers().clone().expect("headers");
        let header = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(header("x-rejection-reason"), reason);
        assert!(!header("x-rejection-detail").is_empty());
        assert!(!header("x-rejected-at").is_empty());
        assert_eq!(header("x-original-queue"), names.tasks);
        assert_eq!(delivery.properties.message_id().as_ref().map(|m| m.as_str()), Some("m"), "properties kept");
    }

    let error_reports = [
        (r#"{"correlation_id": 11}"#, "missing_phones"),
        (r#"{"correlation_id": 12, "phones": "1,2"}"#, "phones_not_array"),
        (r#"{"correlation_id": 13, "phones": [1, -2]}"#, "invalid_phone"),
        (r#"{"correlation_id": 14, "phones": [1.5]}"#, "invalid_phone"),
        (r#"{"correlation_id": 15, "phones": ["3"]}"#, "invalid_phone"),
        (r#"{"correlation_id": 16, "phones": [1, 2, 3, 4, 5, 6]}"#, "too_many_phones"),
    ];
    for (body, _) in &error_reports {
        client.send(body).await;
    }
    for (i, (_, code)) in error_reports.iter().enumerate() {
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["correlation_id"], 11 + i as u64);
        assert_eq!(report["status"], "Error");
        assert_eq!(report["error"]["code"], *code);
        assert!(report["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(report["data"], json!([]));
    }

    client.send(&task(json!(99), &[1, 2])).await;
    let (report, _) = next_json(&mut reports).await;
    assert_eq!(
        (report["correlation_id"].clone(), report["data"].clone()),
        (json!(99), expected_data(&records, &[1, 2]))
    );
    // Outcomes are counted after the ack: stop (which drains every task) before reading.
    let metrics = Arc::clone(service.metrics());
    service.stop().await.unwrap();
    let metrics = metrics.encode();
    assert!(metrics.contains(r#"report_service_tasks_total{outcome="dead_lettered"} 8"#), "{metrics}");
    assert!(metrics.contains(r#"report_service_dead_lettered_total{reason="not_json"} 4"#), "{metrics}");
    assert!(metrics.contains(r#"report_service_tasks_total{outcome="error_report"} 6"#), "{metrics}");
}

/// 200 tasks at once, all sharing phones 7 and 8: every task answered, and each shared
/// phone computed exactly once (the rest joined its computation or hit the cache).
#[tokio::test]
async fn two_hundred_tasks_at_once_are_answered_and_a_shared_phone_is_computed_once() {
    let names = Names::unique("burst");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 300, 200);
    let client = Client::new(&names).await;
    for i in 0..200u64 {
        client.send(&task(json!(i), &[7, 8, 10 + i])).await;
    }
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[("PREFETCH", "200")], Arc::new(SystemClock)).await;
    let seen = collect(&mut reports, 200, |report| {
        let i = report["correlation_id"].as_u64().unwrap();
        amqp::agrees(&report["data"], &expected_data(&records, &[7, 8, 10 + i]), format_args!("task {i}"))
    })
    .await;
    seen.assert_all_right(200);
    for (id, (_, count)) in &seen.reports {
        assert_eq!(*count, 1, "task {id} answered once");
    }
    let metrics = service.metrics();
    assert_eq!(metrics.phones_with(Source::Computed), 2 + 200, "7 and 8 once each, plus one distinct phone per task");
    assert_eq!(metrics.phones_with(Source::Shared) + metrics.phones_with(Source::Cache), 2 * 199);
    service.stop().await.unwrap();
}

/// The cache serves a repeated phone until its TTL passes on the (driven) clock.
#[tokio::test]
async fn a_cached_phone_is_served_until_its_ttl_then_computed_again() {
    let names = Names::unique("ttl");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 10, 100);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[("CACHE_TTL_SECS", "60")], clock.clone()).await;
    let metrics = Arc::clone(service.metrics());
    let mut ask = async |id: u64| {
        client.send(&task(json!(id), &[1, 2])).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["data"], expected_data(&records, &[1, 2]));
        (metrics.phones_with(Source::Computed), metrics.phones_with(Source::Cache))
    };
    assert_eq!(ask(1).await, (2, 0), "first: both computed");
    assert_eq!(ask(2).await, (2, 2), "second: both cached");
    clock.advance(Duration::from_secs(59));
    assert_eq!(ask(3).await, (2, 4), "59 s later: still cached");
    clock.advance(Duration::from_secs(1));
    assert_eq!(ask(4).await, (4, 4), "60 s later: expired, computed again");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_zero_ttl_disables_the_cache() {
    let names = Names::unique("nocache");
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = data_file(dir.path(), 10, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[("CACHE_TTL_SECS", "0")], Arc::new(SystemClock)).await;
    for id in 0..3 {
        client.send(&task(json!(id), &[1])).await;
        next_json(&mut reports).await;
    }
    assert_eq!((service.metrics().phones_with(Source::Computed), service.metrics().phones_with(Source::Cache)), (3, 0));
    assert!(service.snapshot_writes().is_none());
    service.stop().await.unwrap();
    assert!(!dir.path().join("cache.snapshot").exists());
}

/// The snapshot written by one instance is restored by the next, in the same test.
#[tokio::test]
async fn a_restarted_service_restores_the_cache_from_its_snapshot() {
    let names = Names::unique("restore");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 10, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;

    let first = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    let mut writes = first.snapshot_writes().expect("cache enabled");
    client.send(&task(json!(1), &[1, 2, 3])).await;
    next_json(&mut reports).await;
    tokio::time::timeout(amqp::WAIT, writes.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
    first.stop().await.unwrap();

    let second = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    client.send(&task(json!(2), &[3, 2, 1])).await;
    let (report, _) = next_json(&mut reports).await;
    assert_eq!(report["data"], expected_data(&records, &[3, 2, 1]));
    assert_eq!((second.metrics().phones_with(Source::Cache), second.metrics().phones_with(Source::Computed)), (3, 0));
    second.stop().await.unwrap();
}

/// Truncated and garbage snapshots: logged, moved aside, and the service answers.
#[tokio::test]
async fn a_corrupt_snapshot_is_moved_aside_and_the_service_starts_empty() {
    let names = Names::unique("corrupt");
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    for (case, bytes) in [("garbage", b"definitely not a snapshot".to_vec()), ("truncated", vec![])] {
        let dir = tempfile::tempdir().unwrap();
        let (data, records) = data_file(dir.path(), 10, 100);
        let snapshot = dir.path().join("cache.snapshot");
        let bytes = if case == "truncated" {
            // A real snapshot cut short.
            let first = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
            let mut writes = first.snapshot_writes().unwrap();
            client.send(&task(json!(0), &[4])).await;
            next_json(&mut reports).await;
            tokio::time::timeout(amqp::WAIT, writes.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
            first.stop().await.unwrap();
            let full = std::fs::read(&snapshot).unwrap();
            full[..full.len() - 7].to_vec()
        } else {
            bytes
        };
        std::fs::write(&snapshot, &bytes).unwrap();
        let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("cache.snapshot.corrupt-"))
            .collect();
        assert_eq!(moved.len(), 1, "{case}: moved aside");
        assert_eq!(std::fs::read(moved[0].path()).unwrap(), bytes, "{case}: kept for inspection");
        client.send(&task(json!(1), &[4])).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["data"], expected_data(&records, &[4]), "{case}");
        assert_eq!(service.metrics().phones_with(Source::Computed), 1, "{case}: empty cache");
        service.stop().await.unwrap();
    }
}

/// The broker closes the service's connection while 1,000 tasks are queued or in
/// flight: the service reconnects by itself and every task is answered, correctly.
/// (Prefetch 4 and no cache keep the service busy for longer than `rabbitmqctl` takes.)
#[tokio::test]
async fn a_connection_closed_by_the_broker_mid_load_loses_no_task() {
    let names = Names::unique("forceclose");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 50, 2_000);
    let client = Client::new(&names).await;
    let tasks = 1_000u64;
    let phones = |i: u64| [i % 50, (i + 1) % 50, (i + 7) % 50];
    for i in 0..tasks {
        client.send(&task(json!(i), &phones(i))).await;
    }
    let mut reports = client.consume(&names.reports).await;
    let vars = [("PREFETCH", "4"), ("CACHE_TTL_SECS", "0")];
    let service = start_service(&names, &data, dir.path(), &vars, Arc::new(SystemClock)).await;
    let (first, _) = next_json(&mut reports).await;
    let closed = tokio::task::spawn_blocking({
        let queue = names.tasks.clone();
        move || amqp::close_connection_named(&format!("queue {queue}"))
    })
    .await
    .unwrap();
    assert_eq!(closed, 1, "exactly the service's connection");
    let check = |report: &serde_json::Value| {
        let i = report["correlation_id"].as_u64().unwrap();
        amqp::agrees(&report["data"], &expected_data(&records, &phones(i)), format_args!("task {i}"))
    };
    let mut seen = amqp::Seen::default();
    seen.note(first, check);
    amqp::collect_into(&mut reports, &mut seen, tasks as usize, check).await;
    seen.assert_all_right(tasks);
    let metrics = Arc::clone(service.metrics());
    assert!(service.health().ready(), "attached again");
    service.stop().await.unwrap();
    assert!(metrics.reconnects.get() >= 1, "the close happened while tasks were left");
}

/// Queues an operator already created with arguments of their own (a quorum report
/// queue, a DLQ with a length limit) are used as they are, where declaring them without
/// arguments would fail with PRECONDITION_FAILED and never attach; the task queue keeps
/// the starting service's plain declaration.
#[tokio::test]
async fn queues_an_operator_declared_with_other_arguments_are_used_as_they_are() {
    let names = Names::unique("existing");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 10, 100);
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let mut limited = lapin::types::FieldTable::default();
    limited.insert("x-max-length".into(), AMQPValue::LongLongInt(1_000));
    let client = Client::with_arguments(&names, quorum, limited).await;
    let mut reports = client.consume(&names.reports).await;
    let mut dead = client.consume(&names.dlq).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    client.send(&task(json!(1), &[1, 2])).await;
    let (report, _) = next_json(&mut reports).await;
    assert_eq!(report["data"], expected_data(&records, &[1, 2]));
    client.send_raw(b"not json", BasicProperties::default()).await;
    let copy = next(&mut dead).await;
    assert_eq!(copy.data, b"not json");
    assert!(service.health().ready());
    service.stop().await.unwrap();
}

/// A crash between creating a snapshot's temporary file and renaming it leaves the
/// temporary behind: the next start removes it (old ones only; a young one may be another
/// instance's write in progress).
#[tokio::test]
async fn snapshot_temporaries_left_by_a_crash_are_removed_at_startup() {
    let names = Names::unique("leftovers");
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = data_file(dir.path(), 10, 100);
    let _client = Client::new(&names).await;
    let old = dir.path().join(".cache.snapshot.tmp-crashed");
    let young = dir.path().join(".cache.snapshot.tmp-writing");
    for file in [&old, &young] {
        std::fs::write(file, b"partial").unwrap();
    }
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3_600);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(an_hour_ago).unwrap();
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    assert!(!old.exists(), "the crash's leftover is gone");
    assert!(young.exists(), "a write that may be in progress is left alone");
    service.stop().await.unwrap();
}

/// The cache never holds more than `CACHE_MAX_ENTRIES` phones; phones asked for again
/// stay while one-off phones are evicted; every answer stays right.
#[tokio::test]
async fn the_cache_is_bounded_by_its_entry_limit_and_keeps_the_phones_asked_for_again() {
    let names = Names::unique("bounded");
    let dir = tempfile::tempdir().unwrap();
    let (data, records) = data_file(dir.path(), 40, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(
        &names,
        &data,
        dir.path(),
        &[("CACHE_MAX_ENTRIES", "4"), ("PREFETCH", "1")],
        Arc::new(SystemClock),
    )
    .await;
    let metrics = Arc::clone(service.metrics());
    // Phone 1 is asked for with every task; the others once each.
    for (id, cold) in (10..30u64).enumerate() {
        client.send(&task(json!(id), &[1, cold])).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["data"], expected_data(&records, &[1, cold]));
        assert!(metrics.cache_entries.get() <= 4, "{} entries", metrics.cache_entries.get());
    }
    assert_eq!(metrics.phones_with(Source::Cache), 19, "phone 1 was computed once and then always hit");
    assert_eq!(metrics.phones_with(Source::Computed), 21);
    service.stop().await.unwrap();
}
