//! A data directory of segments: the same answers as one file of the same records (every
//! layout), a segment joined under load without any report mixing two views, cached
//! statistics updated instead of flushed, a malformed segment refused while the rest
//! serves, replaced and removed segments, and a restart on the snapshot of a directory.

use crate::support;

use report_service::data::Segments;
use report_service::engine::compute::compute;
use report_service::ops::metrics::Source;
use report_service::platform::clock::SystemClock;
use report_tools::datagen::{self, Layout, Options};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use support::amqp::{Client, Names, WAIT, expected_data, next_json};
use support::{Dice, RefRecord, Style, pool, reference_parse, reference_stats, render, start_service, task};

/// Writes a segment the supported way: a `.`-file beside it (not a segment), renamed in.
fn put_segment(dir: &Path, name: &str, bytes: &[u8]) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

/// `records` cut into `n` segments (record i to segment `pick(i)`), each rendered in
/// `style`; returns the directory.
fn split(records: &[RefRecord], n: usize, seed: u64, style: Style) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut dice = Dice::new(seed);
    let mut parts: Vec<Vec<RefRecord>> = vec![Vec::new(); n];
    for record in records {
        parts[dice.below(n)].push(*record);
    }
    for (i, part) in parts.iter().enumerate() {
        put_segment(dir.path(), &format!("part-{i:02}.json"), &render(part, style));
    }
    dir
}

/// Every datagen layout, cut into 1, 3 and 7 segments (some of them empty) rendered
/// compact or varied (whitespace, key order, extra fields): every phone's statistics over
/// the directory equal the reference's over all records, and equal the single file's.
#[test]
fn a_directory_of_segments_agrees_with_one_file_of_the_same_records() {
    let pool = pool(2);
    for layout in [Layout::Sorted, Layout::Shuffled, Layout::Pretty, Layout::ManyPhones] {
        let options = Options { phones: 12, per_phone: 150, layout, ..Options::default() };
        let mut bytes = Vec::new();
        datagen::generate(&options, &mut bytes, &|_| {}).unwrap();
        let records = reference_parse(&bytes).unwrap();
        let mut phones: Vec<u64> = records.iter().map(|r| r.phone).collect();
        phones.sort_unstable();
        phones.dedup();
        phones.push(u64::MAX);
        let (_file_dir, file) = support::temp_file(&bytes);
        let single = compute(&Segments::open(&file, &pool).unwrap(), &phones, &pool).unwrap();
        let expected = reference_stats(&records, &phones);
        assert_eq!(single, expected, "{layout:?}: one file");
        for (n, style) in
            [(1, Style::Compact), (3, Style::Varied { seed: 7 }), (7, Style::Compact), (7, Style::Varied { seed: 9 })]
        {
            let dir = split(&records, n, n as u64, style);
            let data = Segments::open(dir.path(), &pool).unwrap();
            assert_eq!(data.parts().len(), n);
            assert_eq!(data.summary().records, records.len() as u64);
            assert_eq!(data.summary().phones, phones.len() - 1, "{layout:?}: distinct phones counted once");
            assert_eq!(compute(&data, &phones, &pool).unwrap(), expected, "{layout:?}, {n} segments, {style:?}");
        }
    }
}

/// `phones` phones with `per_phone` records each, every call lasting `seconds`, starting
/// at `first_start` (so two segments of one phone hold distinct calls).
fn segment(phones: std::ops::Range<u64>, per_phone: u64, seconds: i64, first_start: i64) -> Vec<RefRecord> {
    phones
        .flat_map(|phone| {
            (0..per_phone).map(move |k| {
                let start_date = first_start + k as i64 * 1_000;
                RefRecord { phone, start_date, end_date: start_date + seconds * 1_000 }
            })
        })
        .collect()
}

fn compact(records: &[RefRecord]) -> Vec<u8> {
    render(records, Style::Compact)
}

async fn ask(client: &Client, reports: &mut lapin::Consumer, id: u64, phones: &[u64]) -> Value {
    client.send(&task(id, phones)).await;
    let (report, _) = next_json(reports).await;
    assert_eq!(report["correlation_id"].as_u64(), Some(id));
    report["data"].clone()
}

/// A new segment renamed in is indexed and joined; phones it does not touch stay cached,
/// phones it touches get its records merged into their cached statistics (served as
/// cache hits, equal to the reference over both segments), and no phone is recomputed.
#[tokio::test]
async fn a_new_segment_updates_cached_statistics_instead_of_flushing_them() {
    let names = Names::unique("segadd");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("calls");
    std::fs::create_dir(&data).unwrap();
    let monday = segment(0..6, 40, 10, 1_700_000_000_000);
    put_segment(&data, "2026-11-23.json", &compact(&monday));
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service =
        start_service(&names, &data, dir.path(), &[("DATA_POLL_INTERVAL_MS", "20")], Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();
    let phones = [0, 1, 2, 3, 4, 5];
    assert_eq!(ask(&client, &mut reports, 1, &phones).await, expected_data(&monday, &phones));
    let metrics = Arc::clone(service.metrics());
    assert_eq!(metrics.phones_with(Source::Computed), 6);

    let tuesday = segment(3..9, 25, 40, 1_700_086_400_000);
    put_segment(&data, "2026-11-24.json", &compact(&tuesday));
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    let both: Vec<RefRecord> = monday.iter().chain(&tuesday).copied().collect();
    assert_eq!(ask(&client, &mut reports, 2, &phones).await, expected_data(&both, &phones));
    assert_eq!(metrics.phones_with(Source::Computed), 6, "nothing recomputed: 0-2 kept, 3-5 updated");
    assert_eq!(metrics.phones_with(Source::Cache), 6);
    assert_eq!(ask(&client, &mut reports, 3, &[6, 7, 8]).await, expected_data(&both, &[6, 7, 8]));
    assert_eq!(metrics.phones_with(Source::Computed), 9, "phones new in the segment are computed");
    let text = metrics.encode();
    assert!(
        text.contains("report_service_data_segments 2") && text.contains("report_service_data_records 390"),
        "{text}"
    );
    service.stop().await.unwrap();
}

/// Tasks flow while a segment is joined: every report equals the reference over the
/// segments before the join or over those after it, never a mix, and both views answer.
#[tokio::test]
async fn a_segment_joined_under_load_never_gives_a_report_of_two_views() {
    let names = Names::unique("segload");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("calls");
    std::fs::create_dir(&data).unwrap();
    let first = segment(0..20, 300, 10, 1_700_000_000_000);
    put_segment(&data, "a.json", &compact(&first));
    let added = segment(0..20, 200, 50, 1_700_100_000_000);
    let after: Vec<RefRecord> = first.iter().chain(&added).copied().collect();
    // A report mixing the views is caught only if every phone's figures differ.
    for phone in 0..20 {
        assert_ne!(expected_data(&first, &[phone]), expected_data(&after, &[phone]), "phone {phone}");
    }
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(
        &names,
        &data,
        dir.path(),
        &[("DATA_POLL_INTERVAL_MS", "10"), ("PREFETCH", "8")],
        Arc::new(SystemClock),
    )
    .await;
    let mut reloads = service.reloads();
    let phones_of = |i: u64| -> Vec<u64> { (0..10).map(|k| (i * 3 + k) % 20).collect() };
    let (mut after_seen, mut id) = (0, 0u64);
    let mut renamed = false;
    // The last task sent before the join was seen complete: every later one must get
    // the new view.
    let mut joined_after: Option<u64> = None;
    while after_seen < 100 {
        // A window of 8 tasks in flight; the segment lands after 100 reports.
        for _ in 0..8 {
            id += 1;
            client.send(&task(id, &phones_of(id))).await;
        }
        for _ in 0..8 {
            let (report, _) = next_json(&mut reports).await;
            let id = report["correlation_id"].as_u64().unwrap();
            let phones = phones_of(id);
            if report["data"] == expected_data(&first, &phones) {
                assert!(joined_after.is_none_or(|last| id <= last), "task {id}, sent after the join, got the old view");
            } else {
                assert_eq!(report["data"], expected_data(&after, &phones), "task {id}: neither view");
                after_seen += 1;
            }
        }
        if id >= 100 && !renamed {
            put_segment(&data, "b.json", &compact(&added));
            renamed = true;
        }
        if renamed && joined_after.is_none() && reloads.borrow().swapped >= 1 {
            joined_after = Some(id);
        }
        assert!(id < 50_000, "the segment was never joined");
    }
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped == 1)).await.unwrap().unwrap();
    service.stop().await.unwrap();
}

/// A malformed segment is refused (counted, logged) while the others keep serving and
/// later segments still join; once it is fixed (renamed over), it joins too. A replaced
/// segment re-indexes only itself and its phones are recomputed; a removed one leaves.
#[tokio::test]
async fn malformed_replaced_and_removed_segments() {
    let names = Names::unique("segbad");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("calls");
    std::fs::create_dir(&data).unwrap();
    let a = segment(0..4, 30, 10, 1_700_000_000_000);
    put_segment(&data, "a.json", &compact(&a));
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service =
        start_service(&names, &data, dir.path(), &[("DATA_POLL_INTERVAL_MS", "20")], Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();
    let metrics = Arc::clone(service.metrics());
    let all = [0, 1, 2, 3, 4, 5, 6];

    let b = segment(2..6, 20, 20, 1_700_100_000_000);
    let broken = compact(&b);
    put_segment(&data, "b.json", &broken[..broken.len() - 30]);
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.failed >= 1)).await.unwrap().unwrap();
    assert_eq!(ask(&client, &mut reports, 1, &all).await, expected_data(&a, &all), "a alone still serves");

    let c = segment(5..7, 10, 40, 1_700_200_000_000);
    put_segment(&data, "c.json", &compact(&c));
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    let ac: Vec<RefRecord> = a.iter().chain(&c).copied().collect();
    assert_eq!(ask(&client, &mut reports, 2, &all).await, expected_data(&ac, &all), "c joined, b still refused");
    assert_eq!(reloads.borrow().failed, 1, "the broken b is not retried while it stays as it is");

    put_segment(&data, "b.json", &broken);
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 2)).await.unwrap().unwrap();
    let abc: Vec<RefRecord> = a.iter().chain(&b).chain(&c).copied().collect();
    assert_eq!(ask(&client, &mut reports, 3, &all).await, expected_data(&abc, &all), "the fixed b joined");

    let computed = metrics.phones_with(Source::Computed);
    let b2 = segment(3..5, 5, 90, 1_700_300_000_000);
    put_segment(&data, "b.json", &compact(&b2));
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 3)).await.unwrap().unwrap();
    let ab2c: Vec<RefRecord> = a.iter().chain(&b2).chain(&c).copied().collect();
    assert_eq!(ask(&client, &mut reports, 4, &all).await, expected_data(&ab2c, &all), "b replaced");
    assert_eq!(metrics.phones_with(Source::Computed) - computed, 4, "only b's old phones 2-5 recomputed");

    std::fs::remove_file(data.join("a.json")).unwrap();
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 4)).await.unwrap().unwrap();
    let b2c: Vec<RefRecord> = b2.iter().chain(&c).copied().collect();
    assert_eq!(ask(&client, &mut reports, 5, &all).await, expected_data(&b2c, &all), "a removed");
    service.stop().await.unwrap();
}

/// The snapshot of a directory belongs to its set of segments: a restart restores it
/// (every phone a cache hit), including entries moved to the new set by a join.
#[tokio::test]
async fn a_restart_on_a_directory_restores_the_snapshot_of_its_segments() {
    let names = Names::unique("segsnap");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("calls");
    std::fs::create_dir(&data).unwrap();
    let a = segment(0..5, 30, 10, 1_700_000_000_000);
    put_segment(&data, "a.json", &compact(&a));
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let settings = [("DATA_POLL_INTERVAL_MS", "20")];
    let service = start_service(&names, &data, dir.path(), &settings, Arc::new(SystemClock)).await;
    let mut reloads = service.reloads();
    let phones = [0, 1, 2, 3, 4];
    ask(&client, &mut reports, 1, &phones).await;
    let b = segment(3..5, 10, 30, 1_700_100_000_000);
    put_segment(&data, "b.json", &compact(&b));
    tokio::time::timeout(WAIT, reloads.wait_for(|r| r.swapped >= 1)).await.unwrap().unwrap();
    service.stop().await.unwrap();

    let service = start_service(&names, &data, dir.path(), &settings, Arc::new(SystemClock)).await;
    let ab: Vec<RefRecord> = a.iter().chain(&b).copied().collect();
    assert_eq!(ask(&client, &mut reports, 2, &phones).await, expected_data(&ab, &phones));
    let metrics = Arc::clone(service.metrics());
    assert_eq!((metrics.phones_with(Source::Cache), metrics.phones_with(Source::Computed)), (5, 0));
    service.stop().await.unwrap();
}

/// `datagen --out DIR/2026-11-28.json` writes that day's calls: every start within the
/// day, the same phones as any other day.
#[test]
fn datagen_writes_a_day_as_a_segment_named_by_its_date() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("2026-11-28.json");
    let status = std::process::Command::new(crate::support::tool("datagen"))
        .args(["--phones", "4", "--per-phone", "25", "--out"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let records = reference_parse(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(records.len(), 100);
    let day = 20_785 * 86_400_000i64;
    assert!(records.iter().all(|r| (day..day + 86_400_000).contains(&r.start_date)));
    let mut phones: Vec<u64> = records.iter().map(|r| r.phone).collect();
    phones.dedup();
    assert_eq!(phones, [0, 1, 2, 3]);
}

/// `producer freshness` renames a segment in and reports when a report first included it.
#[tokio::test]
async fn the_producer_measures_how_fresh_a_new_segment_is() {
    let names = Names::unique("segfresh");
    let _cleanup = Client::new(&names).await; // deletes the queues afterwards
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("calls");
    std::fs::create_dir(&data).unwrap();
    put_segment(&data, "a.json", &compact(&segment(0..3, 10, 10, 1_700_000_000_000)));
    let service =
        start_service(&names, &data, dir.path(), &[("DATA_POLL_INTERVAL_MS", "50")], Arc::new(SystemClock)).await;
    let new = dir.path().join("b.json");
    std::fs::write(&new, compact(&segment(1..2, 7, 10, 1_700_100_000_000))).unwrap();
    let mut command = std::process::Command::new(crate::support::tool("producer"));
    command
        .envs(names.vars())
        .args(["freshness", "--phone", "1", "--timeout", "30", "--segment"])
        .arg(&new)
        .arg("--into")
        .arg(&data);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("phone 1: 10 -> 17 records"), "{stdout}");
    assert!(data.join("b.json").exists() && !new.exists());
    service.stop().await.unwrap();
}
