//! Following the data: every `DATA_POLL_INTERVAL_MS` (and at once when a computation
//! finds a file changed in place) what `DATA_PATH` holds is compared with what is being
//! served; new files are indexed in the background and joined to the served data whole.
//!
//! For a single data.json the contract is "write a new file, rename it over the old
//! one": the new file is indexed while the old one keeps serving, then swapped in, and
//! the cache starts afresh. For a data directory it is "write a segment elsewhere (or as a
//! `.`-file), rename it in": only the new segment is indexed, and the cached statistics
//! are updated rather than dropped (see [`Engine::join`]); a segment replaced or removed
//! costs only that segment's phones their cache entries.
//!
//! A file that is still being written (copied into place rather than renamed) keeps
//! changing size and mtime, so what the path holds must hold still for
//! [`Settling::SETTLE`] (or one poll, if shorter) before anything is indexed. Indexing
//! runs on a pool of its own (one thread), so a reload never queues ahead of cache
//! misses on the statistics pool. A file that fails to index is logged and counted, the
//! rest keeps serving (a replaced segment keeps its previous version), and the watcher
//! tries it again only when it changes again.

use crate::data::segments::{self, Segment};
use crate::data::{DataIdentity, FileIdentity, IndexFiles, Segments};
use crate::engine::Engine;
use crate::engine::lookup::Loaded;
use crate::ops::metrics::{IndexEvent, Metrics};
use crate::platform::pool::WorkerPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How many data changes were served and how many files failed, for whoever waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Changes indexed and served (a new data.json, or a set of segments joined).
    pub swapped: u64,
    /// Files (a data.json or a segment) that could not be indexed.
    pub failed: u64,
}

/// Where the watcher looks and what it uses.
#[derive(Debug)]
pub struct Watch {
    /// The data file or directory.
    pub path: PathBuf,
    /// How often it is checked (`DATA_POLL_INTERVAL_MS`).
    pub every: Duration,
    /// Indexes new files; its own threads, not the statistics pool's.
    pub pool: WorkerPool,
    /// Where indexes are kept between starts (`INDEX_DIR`).
    pub index_files: IndexFiles,
}

/// Index files younger than this are never removed: another replica sharing the
/// directory may have written one for a file this one has not seen yet.
const INDEX_FILE_GRACE: Duration = Duration::from_secs(60);

/// Stores the indexes of `data` that were built here (not read from `files`), removes
/// index files of data files that are gone, and counts and logs what it did; then has
/// `engine` serve the stored files in place of the built copies (see
/// [`Engine::use_stored_indexes`]), so that the heap a build leaves behind is freed
/// rather than kept for the life of the process. Blocking (file writes): run it on
/// `reload`, the reload pool, which also gives the freed memory back (see
/// `release_after`).
pub fn persist_indexes(engine: &Engine, data: Segments, files: &IndexFiles, metrics: &Metrics, reload: &WorkerPool) {
    let started = Instant::now();
    let (mut written, mut failed) = (0u64, 0u64);
    for (path, result) in data.persist(files) {
        match result {
            Ok(true) => written += 1,
            Ok(false) => {}
            Err(error) => {
                failed += 1;
                warn!(%error, data = %path.display(), dir = %files.dir().display(), "cannot store the data file's index; the next start indexes it again");
            }
        }
    }
    // Held no longer: the swap below frees the built copies once tasks are done with them.
    drop(data);
    let removed = files.remove_stale(INDEX_FILE_GRACE) as u64;
    metrics.index_files(IndexEvent::Written, written);
    metrics.index_files(IndexEvent::WriteFailed, failed);
    metrics.index_files(IndexEvent::Removed, removed);
    if written + failed + removed > 0 {
        info!(written, failed, removed, millis = started.elapsed().as_millis() as u64, dir = %files.dir().display(), "index files stored");
    }
    let replaced = if written > 0 { engine.use_stored_indexes(files) } else { None };
    if replaced.is_some() {
        let index_heap_bytes = engine.current().data.summary().heap_bytes;
        info!(index_heap_bytes, "serving the stored index files; the indexes built in memory are freed");
    }
    // Whatever was built here (stored or not), its peak is freed by now or once the
    // replaced copies are: given back once, off the way to readiness and off the one-shot
    // `report` (which exits instead).
    if written + failed > 0 {
        release_after(replaced.unwrap_or_default(), engine.clone(), reload.clone());
    }
}

/// Gives free memory back to the system (see `heap::release_free_memory`) on the reload
/// pool once `replaced` is gone: now if it is, else after the last task using it ends (a
/// task of thousands of phones can take seconds), or after `BUILT_COPY_WAIT` whatever
/// happens. The wait is on a thread of its own: on the one-thread reload pool it would hold
/// up the next data change's build for as long as any task held the replaced version
/// (a CI run, 2026-12-03: a change served 10 s late).
fn release_after(replaced: Weak<Loaded>, engine: Engine, reload: WorkerPool) {
    let release = move || {
        let started = Instant::now();
        crate::platform::heap::release_free_memory(engine.pool());
        info!(millis = started.elapsed().as_millis() as u64, "free memory returned to the system");
    };
    if replaced.strong_count() == 0 {
        return release();
    }
    let waiter = std::thread::Builder::new().name("report-release".into()).spawn({
        let reload = reload.clone();
        move || {
            wait_until_gone(&replaced, BUILT_COPY_WAIT);
            reload.spawn(release);
        }
    });
    if let Err(error) = waiter {
        warn!(%error, "cannot start a thread to wait for the built indexes to be freed; their memory is returned later or not at all");
    }
}

/// How long the release of free memory waits for the last task using a replaced version
/// to end before it runs anyway.
const BUILT_COPY_WAIT: Duration = Duration::from_secs(10);

/// Whether what `weak` points at was dropped within `within`, looked at every 10 ms.
fn wait_until_gone<T>(weak: &Weak<T>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while weak.strong_count() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Counts and logs how `data`'s indexes came to be (read from their files, built, or
/// rebuilt because a file could not be used).
pub fn record_index_origins(data: &Segments, metrics: &Metrics) {
    let (loaded, built, rebuilt) = data.index_origins();
    metrics.index_files(IndexEvent::Loaded, loaded as u64);
    metrics.index_files(IndexEvent::Built, built as u64);
    metrics.index_files(IndexEvent::Refused, rebuilt as u64);
    for (path, why) in data.refused_indexes() {
        warn!(data = %path.display(), reason = why.as_str(), "the data file's stored index cannot be used; indexed it anew");
    }
}

/// Whether new data has held still long enough to be indexed. Pure: the caller feeds it
/// what it sees and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settling<T> {
    /// The new identity last seen, and since when.
    candidate: Option<(T, Instant)>,
    settle: Duration,
}

/// What to do about the data now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<T> {
    /// Nothing new (what is served, or files that already failed).
    Nothing,
    /// Changed, but not long enough ago: look again at this instant.
    LookAgainAt(Instant),
    /// Unchanged for the settle time: index it.
    Index(T),
}

impl<T: Copy + PartialEq> Settling<T> {
    /// A change must hold still this long before it is indexed (or one poll interval,
    /// whichever is shorter).
    pub const SETTLE: Duration = Duration::from_millis(500);

    /// Settling for one poll interval `poll`, at most [`Settling::SETTLE`].
    pub fn new(poll: Duration) -> Settling<T> {
        Settling { candidate: None, settle: poll.min(Self::SETTLE) }
    }

    /// `seen` at `now`, where `served` is the identity being served.
    pub fn observe(&mut self, seen: T, served: T, now: Instant) -> Settled<T> {
        if seen == served {
            self.candidate = None;
            return Settled::Nothing;
        }
        match self.candidate {
            Some((candidate, since)) if candidate == seen => {
                if now.duration_since(since) >= self.settle {
                    self.candidate = None;
                    Settled::Index(seen)
                } else {
                    Settled::LookAgainAt(since + self.settle)
                }
            }
            _ => {
                self.candidate = Some((seen, now));
                Settled::LookAgainAt(now + self.settle)
            }
        }
    }
}

/// What should be served given what the path holds (`listing`): each file as listed,
/// except one that already failed to index as it is now, for which the version being
/// served (if any) stays.
pub fn wanted(
    listing: &[(String, FileIdentity)],
    failed: &HashMap<String, FileIdentity>,
    served: &Segments,
) -> Vec<(String, FileIdentity)> {
    listing
        .iter()
        .filter_map(|(name, identity)| {
            if failed.get(name) != Some(identity) {
                return Some((name.clone(), *identity));
            }
            served.get(name).map(|part| (name.clone(), part.dataset().identity()))
        })
        .collect()
}

/// Polls the data until `shutdown`, joining changes into `engine`.
pub async fn watch_data(
    engine: Engine,
    watch: Watch,
    metrics: Arc<Metrics>,
    events: watch::Sender<Reloads>,
    shutdown: CancellationToken,
) {
    let Watch { path, every, pool, index_files } = watch;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Files that failed to index, by segment name: not retried until they change.
    let mut failed: HashMap<String, FileIdentity> = HashMap::new();
    let mut settling = Settling::<DataIdentity>::new(every);
    let mut look_again: Option<Instant> = None;
    let mut missing_logged = false;
    let mut unserved_since: Option<Instant> = None;
    loop {
        let look_again_at = look_again.unwrap_or_else(|| Instant::now() + every);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = tokio::time::sleep_until(look_again_at.into()), if look_again.is_some() => {}
            _ = engine.stale_data() => warn!("a data file changed under the index (edited in place?); checking it now"),
        }
        look_again = None;
        let listing = match segments::list_path(&path) {
            Ok(listing) => {
                missing_logged = false;
                listing
            }
            Err(error) => {
                if !missing_logged {
                    warn!(path = %path.display(), %error, "the data cannot be read; still serving the version already loaded");
                    missing_logged = true;
                }
                continue;
            }
        };
        let served = engine.current();
        // How long what the path holds has differed from what is served (a change not
        // yet settled or indexed, or a file refused): `report_service_data_unserved_seconds`.
        let on_disk = DataIdentity::of(listing.iter().map(|(name, identity)| (name.as_str(), *identity)));
        unserved_since = (on_disk != served.data.identity()).then(|| unserved_since.unwrap_or_else(Instant::now));
        metrics.data_unserved_seconds.set(unserved_since.map_or(0.0, |since| since.elapsed().as_secs_f64()));
        let wanted = wanted(&listing, &failed, &served.data);
        let identity = DataIdentity::of(wanted.iter().map(|(name, identity)| (name.as_str(), *identity)));
        match settling.observe(identity, served.data.identity(), Instant::now()) {
            Settled::Nothing => continue,
            Settled::LookAgainAt(at) => {
                look_again = Some(at);
                continue;
            }
            Settled::Index(_) => {}
        }
        let to_open: Vec<String> = wanted
            .iter()
            .filter(|(name, identity)| served.data.get(name).is_none_or(|p| p.dataset().identity() != *identity))
            .map(|(name, _)| name.clone())
            .collect();
        let removed: Vec<String> = served
            .data
            .parts()
            .iter()
            .filter(|p| !wanted.iter().any(|(name, _)| name == p.name()))
            .map(|p| p.name().to_owned())
            .collect();
        // Not held across the build: the memory release after the index store of the
        // change before waits for that version to be dropped (see `release_after`).
        drop(served);
        info!(path = %path.display(), new = ?to_open, removed = ?removed, "the data changed; indexing the new files in the background");
        let started = Instant::now();
        let (open_path, build_pool, names, files) = (path.clone(), pool.clone(), to_open.clone(), index_files.clone());
        // Shutdown does not wait for an index build: the pool job is left to finish (or
        // die with the process) and its result is dropped.
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            opened = pool.run(move || {
                names.iter().map(|name| Segment::open_persisted(&open_path, name, &build_pool, &files)).collect::<Vec<_>>()
            }) => opened,
        };
        let Ok(opened) = opened else {
            error!("the reload was abandoned; retrying at the next poll");
            continue;
        };
        let mut added = Vec::new();
        for (name, result) in to_open.iter().zip(opened) {
            match result {
                Ok(segment) => {
                    failed.remove(name);
                    added.push(Arc::new(segment));
                }
                Err(error) => {
                    let identity = listing.iter().find(|(n, _)| n == name).map(|(_, identity)| *identity);
                    failed.extend(identity.map(|identity| (name.clone(), identity)));
                    metrics.data_reload_failures.inc();
                    events.send_modify(|r| r.failed += 1);
                    let file = segments::segment_path(&path, name);
                    error!(%error, path = %file.display(), "a new data file cannot be used; still serving the rest (and its previous version, if any)");
                }
            }
        }
        failed.retain(|name, _| listing.iter().any(|(n, _)| n == name));
        if added.is_empty() && removed.is_empty() {
            continue;
        }
        let indexed_ms = started.elapsed().as_millis() as u64;
        // After the swap or join below, the new indexes are stored on the reload pool
        // (queued behind nothing: it is this watcher's own thread).
        let new_segments = Segments::of(added.clone());
        record_index_origins(&new_segments, &metrics);
        let (persist_files, persist_metrics) = (index_files.clone(), Arc::clone(&metrics));
        let persist_engine = engine.clone();
        let persist_pool = pool.clone();
        let persist =
            move || persist_indexes(&persist_engine, new_segments, &persist_files, &persist_metrics, &persist_pool);
        let single_file = |names: &mut dyn Iterator<Item = &str>| names.eq([""]);
        let served = engine.current();
        if single_file(&mut served.data.parts().iter().map(|p| p.name()))
            && single_file(&mut added.iter().map(|p| p.name()))
        {
            let data = served.data.changed(&added, &[]);
            drop(served);
            let summary = data.summary();
            let epoch = engine.replace(data);
            metrics.data_reloads.inc();
            events.send_modify(|r| r.swapped += 1);
            info!(
                epoch,
                records = summary.records,
                phones = summary.phones,
                millis = indexed_ms,
                "new data.json swapped in; statistics of the old file are no longer served"
            );
            pool.spawn(persist);
            continue;
        }
        drop(served);
        let (join_engine, join_pool, names) = (engine.clone(), pool.clone(), removed.clone());
        let joined = pool.run(move || join_engine.join(added, &names, &join_pool)).await;
        match joined {
            Ok(Ok(joined)) => {
                metrics.data_reloads.inc();
                events.send_modify(|r| r.swapped += 1);
                let data = &engine.current().data;
                info!(
                    epoch = joined.epoch,
                    segments = data.parts().len(),
                    records = data.summary().records,
                    indexed_ms,
                    total_ms = started.elapsed().as_millis() as u64,
                    cache_kept = joined.cache.kept,
                    cache_updated = joined.cache.replaced,
                    cache_dropped = joined.cache.dropped,
                    cache_locked_us = joined.cache_locked.as_micros() as u64,
                    "segments joined; reports include them from now on"
                );
                pool.spawn(persist);
            }
            Ok(Err(error)) => warn!(%error, "a new segment changed while it was read; retrying"),
            Err(error) => error!(%error, "the join was abandoned; retrying at the next poll"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_version_is_waited_for_until_it_is_gone_and_no_longer() {
        let gone = Arc::downgrade(&Arc::new(1));
        assert!(wait_until_gone(&gone, Duration::ZERO), "already dropped");
        let held = Arc::new(2);
        let weak = Arc::downgrade(&held);
        assert!(!wait_until_gone(&weak, Duration::from_millis(30)), "still held: the wait ends, unanswered");
        drop(held);
        assert!(wait_until_gone(&weak, Duration::ZERO));
    }

    /// A data file of one record served by an engine without a cache, its index not yet
    /// stored, and a one-thread reload pool: the service just after its startup build.
    struct Served {
        dir: tempfile::TempDir,
        data: std::path::PathBuf,
        index_files: IndexFiles,
        engine: Engine,
        metrics: Arc<Metrics>,
        reload_pool: WorkerPool,
    }

    fn record(phone: u64) -> String {
        format!(r#"{{"phone":{phone},"start_date":0,"end_date":1000}}"#)
    }

    impl Served {
        fn one_record() -> Served {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data.json");
            std::fs::write(&data, format!("[{}]", record(1))).unwrap();
            let index_files = IndexFiles::new(dir.path().join("indexes"));
            std::fs::create_dir_all(index_files.dir()).unwrap();
            let stats_pool = WorkerPool::new("test-stats", 1).unwrap();
            let engine = Engine::builder(Segments::open(&data, &stats_pool).unwrap(), stats_pool).build();
            let reload_pool = WorkerPool::new("test-reload", 1).unwrap();
            Served { dir, data, index_files, engine, metrics: Arc::new(Metrics::new()), reload_pool }
        }
    }

    /// Replaces `data` (in `dir`) by rename with a file of two records.
    fn replace_with_two_records(dir: &std::path::Path, data: &std::path::Path) {
        let next = dir.join("data.json.next");
        std::fs::write(&next, format!("[{},{}]", record(2), record(2))).unwrap();
        std::fs::rename(&next, data).unwrap();
    }

    /// A data change that arrives while the index store of the data before is queued
    /// on the reload thread is served as soon as it is indexed. Until 2026-12-03 that
    /// store, after swapping in the stored index, waited on the reload thread (up to
    /// `BUILT_COPY_WAIT`) for the version it replaced to be dropped, while the watcher
    /// held that version with the change's build queued behind the store: the change was
    /// served 10 s late (the wait now has a thread of its own, see the test after). Here the store
    /// of the startup's index is held back by a gate until the watcher has settled on the
    /// change (its unserved gauge has reached half the settle time, which it sets after
    /// taking the served version), so the two meet in that order every run; the code
    /// before waited out the whole 10 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_indexed_behind_the_index_store_of_the_data_before_is_served_without_waiting_for_it() {
        let Served { dir, data, index_files, engine, metrics, reload_pool } = Served::one_record();
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        reload_pool.spawn(move || {
            let _ = gate.recv();
        });
        // As the service starts: the startup's indexes stored on the reload thread.
        let (store_engine, served, files, store_metrics) =
            (engine.clone(), engine.current().data.clone(), index_files.clone(), Arc::clone(&metrics));
        let store_pool = reload_pool.clone();
        reload_pool.spawn(move || persist_indexes(&store_engine, served, &files, &store_metrics, &store_pool));
        let (events, mut reloads) = watch::channel(Reloads::default());
        let shutdown = CancellationToken::new();
        let every = Duration::from_millis(20);
        let watch = Watch { path: data.clone(), every, pool: reload_pool, index_files };
        let watcher = tokio::spawn(watch_data(engine.clone(), watch, Arc::clone(&metrics), events, shutdown.clone()));

        replace_with_two_records(dir.path(), &data);
        let settled = tokio::time::timeout(Duration::from_secs(30), async {
            // The first look sets the gauge to microseconds, the look that settles to about
            // the settle time (a hair under it can happen: the gauge and the settling read
            // the clock apart), and the watcher then blocks behind the gate: half of it
            // tells the two looks apart.
            while metrics.data_unserved_seconds.get() < every.as_secs_f64() / 2.0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        settled.await.expect("the watcher settles on the change");
        open_gate.send(()).unwrap();
        let released = Instant::now();
        let swapped = tokio::time::timeout(BUILT_COPY_WAIT / 2, reloads.wait_for(|r| r.swapped >= 1)).await;
        assert!(
            swapped.is_ok(),
            "the change was not served within {:?} of the store's release (the store waited for a version the watcher held)",
            BUILT_COPY_WAIT / 2
        );
        let waited = released.elapsed();
        assert_eq!(engine.current().data.summary().records, 2, "the new file is served");
        shutdown.cancel();
        watcher.await.unwrap();
        assert!(waited < BUILT_COPY_WAIT, "{waited:?}");
    }

    /// A task still using the version the index store replaced (a report of thousands of
    /// phones can take seconds) does not hold up the next data change: the release of
    /// free memory waits for it on a thread of its own, not on the one-thread reload
    /// pool the change's build runs on. Until 2026-12-04 the store waited there, so this
    /// change was served only when the holder let go or 10 s had passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_holding_the_replaced_version_does_not_hold_up_the_next_change() {
        let Served { dir, data, index_files, engine, metrics, reload_pool } = Served::one_record();
        // A task in flight, holding the version built at startup.
        let task = engine.current();
        let (store_engine, served, files, store_metrics, store_pool) =
            (engine.clone(), task.data.clone(), index_files.clone(), Arc::clone(&metrics), reload_pool.clone());
        reload_pool.spawn(move || persist_indexes(&store_engine, served, &files, &store_metrics, &store_pool));
        let stored = tokio::time::timeout(Duration::from_secs(30), async {
            while Arc::ptr_eq(&task, &engine.current()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        stored.await.expect("the stored index is served in place of the built one");

        let (events, mut reloads) = watch::channel(Reloads::default());
        let shutdown = CancellationToken::new();
        let watch = Watch { path: data.clone(), every: Duration::from_millis(20), pool: reload_pool, index_files };
        let watcher = tokio::spawn(watch_data(engine.clone(), watch, Arc::clone(&metrics), events, shutdown.clone()));
        replace_with_two_records(dir.path(), &data);
        let swapped = tokio::time::timeout(BUILT_COPY_WAIT / 2, reloads.wait_for(|r| r.swapped >= 1)).await;
        assert!(
            swapped.is_ok(),
            "the change was not served within {:?} while a task held the replaced version",
            BUILT_COPY_WAIT / 2
        );
        assert_eq!(engine.current().data.summary().records, 2, "the new file is served");
        assert_eq!(task.data.summary().records, 1, "the task still reads the version it started with");
        drop(task);
        shutdown.cancel();
        watcher.await.unwrap();
    }

    fn identity(len: u64) -> FileIdentity {
        FileIdentity { device: 1, inode: 2, len, modified_ns: len as i128 }
    }

    /// A file still being written (its size changing at every look) is never indexed;
    /// once it holds still for the settle time, it is.
    #[test]
    fn a_file_is_indexed_only_once_it_holds_still() {
        let mut settling = Settling::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let served = identity(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(settling.observe(served, served, at(0)), Settled::Nothing);
        assert_eq!(settling.observe(identity(10), served, at(0)), Settled::LookAgainAt(at(500)));
        assert_eq!(settling.observe(identity(20), served, at(500)), Settled::LookAgainAt(at(1_000)), "grew");
        assert_eq!(settling.observe(identity(20), served, at(700)), Settled::LookAgainAt(at(1_000)));
        assert_eq!(settling.observe(identity(20), served, at(1_000)), Settled::Index(identity(20)));
        let mut fast = Settling::new(Duration::from_millis(20));
        assert_eq!(
            fast.observe(identity(10), served, at(0)),
            Settled::LookAgainAt(at(20)),
            "a shorter poll settles sooner"
        );
    }

    /// A file that failed stays out (a new one) or keeps its served version (a
    /// replacement) until it changes again; everything else is wanted as listed.
    #[test]
    fn a_failed_file_is_not_wanted_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), br#"[{"phone":1,"start_date":0,"end_date":1}]"#).unwrap();
        let pool = WorkerPool::new("test", 1).unwrap();
        let served = Segments::open(dir.path(), &pool).unwrap();
        let a = served.get("a.json").unwrap().dataset().identity();
        let listing = vec![("a.json".to_owned(), identity(5)), ("b.json".to_owned(), identity(6))];
        let failed: HashMap<String, FileIdentity> =
            [("a.json".to_owned(), identity(5)), ("b.json".to_owned(), identity(6))].into();
        assert_eq!(wanted(&listing, &failed, &served), [("a.json".to_owned(), a)]);
        let changed = vec![("a.json".to_owned(), identity(5)), ("b.json".to_owned(), identity(7))];
        assert_eq!(wanted(&changed, &failed, &served), [("a.json".to_owned(), a), ("b.json".to_owned(), identity(7))]);
        assert_eq!(wanted(&listing, &HashMap::new(), &served), listing);
    }
}
