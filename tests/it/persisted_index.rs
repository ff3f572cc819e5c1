//! Indexes kept between starts (README, "Persisted indexes"): a restart reads each data
//! file's index instead of scanning the file again, and answers exactly as before; an
//! index of another version of the file, or a damaged one, is never used (rebuilt and
//! counted); index files of data files that are gone are removed; replicas sharing the
//! directory leave it whole.

use crate::support;

use report_service::app::Running;
use report_service::data::IndexFiles;
use report_service::ops::metrics::IndexEvent;
use report_service::platform::clock::SystemClock;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use support::amqp::{Client, Names, WAIT, data_file, expected_data, next_json};
use support::{start_service, task};

/// Waits (bounded) until the service has stored `n` index files.
async fn stored(service: &Running, n: u64) {
    let deadline = Instant::now() + WAIT;
    while service.metrics().index_files_with(IndexEvent::Written) < n {
        assert!(Instant::now() < deadline, "no index file written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn events(service: &Running) -> [u64; 3] {
    let m = service.metrics();
    [IndexEvent::Loaded, IndexEvent::Built, IndexEvent::Refused].map(|e| m.index_files_with(e))
}

/// The index dir of a test (`INDEX_DIR`), apart from the snapshot's.
fn settings(index_dir: &Path) -> Vec<(&'static str, String)> {
    vec![("INDEX_DIR", index_dir.display().to_string()), ("CACHE_TTL_SECS", "0".to_owned())]
}

async fn start(names: &Names, data: &Path, dir: &Path, index_dir: &Path) -> Running {
    let settings = settings(index_dir);
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    start_service(names, data, dir, &settings, Arc::new(SystemClock)).await
}

#[tokio::test]
async fn a_restart_reads_the_stored_index_and_answers_exactly_as_before() {
    let names = Names::unique("idxrestart");
    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("indexes");
    let (data, records) = data_file(dir.path(), 20, 300);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;

    let first = start(&names, &data, dir.path(), &index_dir).await;
    assert_eq!(events(&first), [0, 1, 0], "the first start builds");
    let with_built_index = first.metrics().memory_bound_bytes.get();
    stored(&first, 1).await;
    assert!(IndexFiles::new(&index_dir).file_of(&data).exists());
    // Once stored, the first start serves the file too: its memory bound drops by the
    // built index's heap, and it answers the same.
    let deadline = Instant::now() + WAIT;
    while first.metrics().memory_bound_bytes.get() >= with_built_index {
        assert!(Instant::now() < deadline, "the built index is still served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.send(&task(3, &[4, 5, 6])).await;
    assert_eq!(next_json(&mut reports).await.0["data"], expected_data(&records, &[4, 5, 6]));
    first.stop().await.unwrap();

    let second = start(&names, &data, dir.path(), &index_dir).await;
    assert_eq!(events(&second), [1, 0, 0], "the restart reads it");
    for (id, phones) in [(1, vec![1, 2, 3, 7]), (2, vec![19, 0, 99])] {
        client.send(&task(id, &phones)).await;
        let (report, _) = next_json(&mut reports).await;
        assert_eq!(report["data"], expected_data(&records, &phones));
    }
    second.stop().await.unwrap();
}

/// A data file replaced while the service was down (new inode, new size), and an index
/// file damaged on disk: neither stored index is used; the file is indexed anew, the
/// reason logged and counted, and the answers are the new file's.
#[tokio::test]
async fn an_index_of_another_file_or_a_damaged_one_is_never_used() {
    let names = Names::unique("idxstale");
    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("indexes");
    let (data, _) = data_file(dir.path(), 10, 200);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let first = start(&names, &data, dir.path(), &index_dir).await;
    stored(&first, 1).await;
    first.stop().await.unwrap();

    // Replaced by rename while stopped, as the contract says.
    let other = tempfile::tempdir().unwrap();
    let (replacement, records) = data_file(other.path(), 10, 250);
    std::fs::rename(&replacement, &data).unwrap();
    let second = start(&names, &data, dir.path(), &index_dir).await;
    assert_eq!(events(&second), [0, 0, 1], "refused: it indexes the old file");
    client.send(&task(1, &[1, 2, 7])).await;
    assert_eq!(next_json(&mut reports).await.0["data"], expected_data(&records, &[1, 2, 7]));
    stored(&second, 1).await;
    second.stop().await.unwrap();

    // One flipped byte in the middle of the stored index.
    let file = IndexFiles::new(&index_dir).file_of(&data);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let third = start(&names, &data, dir.path(), &index_dir).await;
    assert_eq!(events(&third), [0, 0, 1], "refused: damaged");
    client.send(&task(2, &[3, 7])).await;
    assert_eq!(next_json(&mut reports).await.0["data"], expected_data(&records, &[3, 7]));
    stored(&third, 1).await;
    third.stop().await.unwrap();
}

/// A directory of segments: each gets an index file; a segment joined later too; the
/// index file of a segment that was removed goes (once it is old enough that no replica
/// can still be writing it).
#[tokio::test]
async fn each_segment_has_its_index_file_and_a_removed_segments_goes() {
    let names = Names::unique("idxsegments");
    let dir = tempfile::tempdir().unwrap();
    let (data_dir, index_dir) = (dir.path().join("calls"), dir.path().join("indexes"));
    std::fs::create_dir_all(&data_dir).unwrap();
    for day in ["2026-11-01", "2026-11-02", "2026-11-03"] {
        let (file, _) = data_file(dir.path(), 5, 100);
        std::fs::rename(file, data_dir.join(format!("{day}.json"))).unwrap();
    }
    let _client = Client::new(&names).await;
    let first = start(&names, &data_dir, dir.path(), &index_dir).await;
    stored(&first, 3).await;
    first.stop().await.unwrap();
    let files = IndexFiles::new(&index_dir);
    let gone = data_dir.join("2026-11-02.json");
    let gone_index = files.file_of(&gone);
    assert!(gone_index.exists());
    std::fs::remove_file(&gone).unwrap();
    // Older than the grace period another replica's fresh index file gets.
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&gone_index).unwrap().set_modified(old).unwrap();

    let second = start(&names, &data_dir, dir.path(), &index_dir).await;
    assert_eq!(events(&second), [2, 0, 0]);
    let deadline = Instant::now() + WAIT;
    while second.metrics().index_files_with(IndexEvent::Removed) < 1 {
        assert!(Instant::now() < deadline, "the orphan index file was not removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!gone_index.exists());
    assert!(files.file_of(&data_dir.join("2026-11-01.json")).exists(), "the others stay");
    second.stop().await.unwrap();
}

/// Three replicas start at once on one data file and one index directory: each builds
/// and stores the same index, atomically, or (started after another stored it) reads it;
/// a fourth start reads it.
#[tokio::test]
async fn replicas_sharing_the_index_directory_leave_it_whole() {
    let names = Names::unique("idxreplicas");
    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("indexes");
    let (data, records) = data_file(dir.path(), 20, 500);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let (a, b, c) = tokio::join!(
        start(&names, &data, dir.path(), &index_dir),
        start(&names, &data, dir.path(), &index_dir),
        start(&names, &data, dir.path(), &index_dir)
    );
    // Which replicas build depends on how their starts interleave: one whose index file
    // appeared before it indexed reads that file and has nothing to store.
    let deadline = Instant::now() + WAIT;
    for replica in [&a, &b, &c] {
        loop {
            let [loaded, built, refused] = events(replica);
            assert_eq!(loaded + built + refused, 1, "one data file, indexed once");
            if loaded == 1 || replica.metrics().index_files_with(IndexEvent::Written) == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "a replica that built its index never stored it");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let built = [&a, &b, &c].iter().filter(|r| events(r)[1] == 1).count();
    assert!(built >= 1, "someone built the index");
    for replica in [a, b, c] {
        replica.stop().await.unwrap();
    }
    let leftovers: Vec<_> = std::fs::read_dir(&index_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "one index file, no temporaries: {leftovers:?}");
    let fourth = start(&names, &data, dir.path(), &index_dir).await;
    assert_eq!(events(&fourth), [1, 0, 0]);
    client.send(&task(9, &[4, 5, 7])).await;
    assert_eq!(next_json(&mut reports).await.0["data"], expected_data(&records, &[4, 5, 7]));
    fourth.stop().await.unwrap();
}
