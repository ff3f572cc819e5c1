//! A replaced data.json is noticed, indexed in the background and swapped in whole:
//! new statistics are served, old cache entries never are, a broken replacement leaves
//! the old data serving, and no report ever mixes two files.

use crate::support;

use report_service::ops::metrics::Source;
use report_service::platform::clock::SystemClock;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use support::amqp::{Client, Names, Seen, WAIT, collect, collect_into, next_json};
use support::{start_service, task};

/// `phones` phones with `per_phone` records each, every record lasting `seconds`.
fn uniform_file(phones: u64, per_phone: u64, seconds: i64) -> String {
    let records: Vec<String> = (0..phones)
        .flat_map(|p| {
            (0..per_phone).map(move |k| {
                let start = 1_684_957_028_364 + k as i64 * 1_000;
                format!(r#"{{"phone":{p},"start_date":{start},"end_date":{}}}"#, start + seconds * 1_000)
            })
        })
        .collect();
    format!("[{}]", records.join(","))
}

/// Replaces `path` the supported way: write a new file beside it, rename it over.
fn replace(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

fn avg_and_count(report: &Value) -> Vec<(f64, u64)> {
    let data = report["data"].as_array().expect("data");
    data.iter().map(|p| (p["avg_dur_att"].as_f64().unwrap(), p["cnt_all_attempts"].as_u64().unwrap())).collect()
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_served_and_old_cache_entries_are_not() {
    let names = Names::unique("reload");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    std::fs::write(&data, uniform_file(5, 10, 10)).unwrap();
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service =
        start_service(&names, &data, dir.path(), &[("DATA_POLL_INTERVAL_MS", "20")], Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();

    client.send(&task(1, &[1, 2])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(10.0, 10), (10.0, 10)]);
    client.send(&task(2, &[1, 2])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(10.0, 10), (10.0, 10)]);
    assert_eq!(service.metrics().phones_with(Source::Cache), 2, "cached from the first file");

    replace(&data, &uniform_file(5, 30, 20));
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    client.send(&task(3, &[1, 2])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(20.0, 30), (20.0, 30)]);
    assert_eq!(service.metrics().phones_with(Source::Cache), 2, "no entry of the old file served");
    let metrics = service.metrics().encode();
    assert!(metrics.contains("report_service_data_reloads_total 1"), "{metrics}");
    assert!(metrics.contains("report_service_data_records 150"), "{metrics}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_malformed_replacement_keeps_the_old_data_serving_until_a_good_one_arrives() {
    let names = Names::unique("badreload");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    std::fs::write(&data, uniform_file(3, 10, 10)).unwrap();
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service =
        start_service(&names, &data, dir.path(), &[("DATA_POLL_INTERVAL_MS", "20")], Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();

    let good = uniform_file(3, 10, 30);
    replace(&data, &good[..good.len() - 40]);
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.failed >= 1)).await.unwrap().unwrap();
    client.send(&task(1, &[0])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(10.0, 10)], "still the old file");
    assert!(service.metrics().encode().contains("report_service_data_reload_failures_total 1"));

    replace(&data, &good);
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    client.send(&task(2, &[0])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(30.0, 10)], "the good replacement");
    assert_eq!(*reloads.borrow(), report_service::engine::reload::Reloads { swapped: 1, failed: 1 });
    service.stop().await.unwrap();
}

/// Tasks keep flowing while the file is swapped back and forth (a swapper keeps
/// replacing it until every report is in): every report comes entirely from one file
/// (all its phones show that file's duration and count), and both files served some.
/// 400 tasks are queued before the service starts; when they were all answered before a
/// swap landed (a CI run, 2026-12-03: 400 from the first file, 0 from the second), more
/// are sent, 100 at a time, until both files have served (at most 2,000 in all).
#[tokio::test]
async fn tasks_in_flight_during_swaps_get_internally_consistent_reports() {
    const FIRST: u64 = 400;
    const MORE: u64 = 100;
    const MOST: u64 = 2_000;
    let names = Names::unique("swaps");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    let (a, b) = (uniform_file(20, 2_000, 10), uniform_file(20, 3_000, 20));
    std::fs::write(&data, &a).unwrap();
    let client = Client::new(&names).await;
    let send = async |ids: std::ops::Range<u64>| {
        for i in ids {
            client.send(&task(i, &(0..10).map(|k| (i + k) % 20).collect::<Vec<_>>())).await;
        }
    };
    send(0..FIRST).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(
        &names,
        &data,
        dir.path(),
        &[("DATA_POLL_INTERVAL_MS", "10"), ("PREFETCH", "4"), ("CACHE_TTL_SECS", "0")],
        Arc::new(SystemClock),
    )
    .await;
    let done = tokio_util::sync::CancellationToken::new();
    let swapper = tokio::spawn({
        let (done, data, mut reloads) = (done.clone(), data.clone(), service.reloads());
        async move {
            let mut swaps = 0;
            while !done.is_cancelled() {
                swaps += 1;
                replace(&data, if swaps % 2 == 1 { &b } else { &a });
                tokio::select! {
                    _ = done.cancelled() => {}
                    swapped = reloads.wait_for(|r| r.swapped >= swaps) => { swapped.unwrap(); }
                }
            }
            swaps
        }
    });
    let from = std::cell::RefCell::new([0, 0]);
    let check = |report: &Value| {
        let phones = avg_and_count(report);
        let first = phones[0];
        if first != (10.0, 2_000) && first != (20.0, 3_000) {
            return Err(format!("neither file: {first:?}"));
        }
        if phones.iter().any(|p| *p != first) {
            return Err(format!("a report mixing files: {phones:?}"));
        }
        from.borrow_mut()[usize::from(first.0 == 20.0)] += 1;
        Ok(())
    };
    let mut seen = Seen::default();
    let mut sent = FIRST;
    loop {
        collect_into(&mut reports, &mut seen, sent as usize, &check).await;
        seen.assert_all_right(sent);
        let served = *from.borrow();
        if (served[0] > 0 && served[1] > 0) || sent >= MOST {
            break;
        }
        send(sent..sent + MORE).await;
        sent += MORE;
    }
    done.cancel();
    let swaps = swapper.await.unwrap();
    let from = from.into_inner();
    eprintln!("{sent} tasks, {swaps} swaps; reports from the first file: {}, from the second: {}", from[0], from[1]);
    assert!(from[0] > 0 && from[1] > 0, "swaps happened while tasks were in flight");
    service.stop().await.unwrap();
}

/// Editing data.json in place breaks the contract; the service still never answers from
/// a file that changed under its index: the next computation notices (size or mtime),
/// the task is requeued, and the watcher re-indexes at once.
#[tokio::test]
async fn a_file_rewritten_in_place_is_never_read_through_the_old_index() {
    use std::io::{Seek, Write};
    let names = Names::unique("inplace");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    let (before, after) = (uniform_file(4, 50, 10), uniform_file(4, 50, 20));
    assert_eq!(before.len(), after.len(), "same size: only the mtime tells");
    std::fs::write(&data, &before).unwrap();
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    // A long poll interval: only the stale-data notification can trigger the reload soon.
    let vars = [("DATA_POLL_INTERVAL_MS", "3600000"), ("CACHE_TTL_SECS", "0")];
    let service = start_service(&names, &data, dir.path(), &vars, Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();
    client.send(&task(1, &[3])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(10.0, 50)]);

    let mut file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.seek(std::io::SeekFrom::Start(0)).unwrap();
    file.write_all(after.as_bytes()).unwrap();
    file.sync_all().unwrap();
    drop(file);
    client.send(&task(2, &[3])).await;
    assert_eq!(avg_and_count(&next_json(&mut reports).await.0), vec![(20.0, 50)]);
    assert!(reloads.borrow_and_update().swapped >= 1);
    let metrics = Arc::clone(service.metrics());
    service.stop().await.unwrap();
    let retried = metrics.tasks_with(report_service::ops::metrics::Outcome::Retried);
    assert!(retried >= 1, "the stale attempt was retried later");
}

/// Three replicas consume one queue and share one snapshot file (as `docker compose up
/// --scale report-service=3` runs them) while data.json is replaced under them. Each
/// writes the snapshot whole and atomically, the last writer wins; a fresh instance
/// restored from it serves the new file's statistics from its cache, and never one of
/// the old file's.
#[tokio::test]
async fn three_replicas_sharing_a_snapshot_while_the_data_is_replaced_restore_correct_answers() {
    let names = Names::unique("replicas");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    std::fs::write(&data, uniform_file(20, 10, 10)).unwrap();
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let fast = [("DATA_POLL_INTERVAL_MS", "20")];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start_service(&names, &data, dir.path(), &fast, Arc::new(SystemClock)).await);
    }
    let phones = |i: u64| [i % 20, (i * 7 + 3) % 20];
    for i in 0..30 {
        client.send(&task(i, &phones(i))).await;
    }
    let seen = collect(&mut reports, 30, |report| {
        let first_file = avg_and_count(report).iter().all(|&p| p == (10.0, 10));
        if first_file { Ok(()) } else { Err(format!("not the first file: {report}")) }
    })
    .await;
    seen.assert_all_right(30);

    replace(&data, &uniform_file(20, 30, 20));
    for replica in &replicas {
        tokio::time::timeout(WAIT, replica.reloads().wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    }
    for i in 100..130 {
        client.send(&task(i, &phones(i))).await;
    }
    collect(&mut reports, 30, |report| {
        let new_file = avg_and_count(report).iter().all(|&p| p == (20.0, 30));
        if new_file { Ok(()) } else { Err(format!("not the new file: {report}")) }
    })
    .await
    .assert_all_right(30);
    // Stopping flushes each replica's snapshot: the last one written wins.
    for replica in replicas {
        replica.stop().await.unwrap();
    }

    let restarted = start_service(&names, &data, dir.path(), &fast, Arc::new(SystemClock)).await;
    let restored = restarted.engine().cached().len();
    assert!(restored > 0, "the shared snapshot of the new file was restored");
    let all: Vec<u64> = (0..20).collect();
    client.send(&task(999, &all)).await;
    let (report, _) = next_json(&mut reports).await;
    assert_eq!(avg_and_count(&report), vec![(20.0, 30); 20], "{report}");
    let metrics = restarted.metrics();
    assert_eq!(metrics.phones_with(Source::Cache), restored as u64, "every restored phone served from the cache");
    assert_eq!(metrics.phones_with(Source::Cache) + metrics.phones_with(Source::Computed), 20);
    restarted.stop().await.unwrap();
}
