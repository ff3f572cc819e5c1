//! The write-behind thread: woken when the cache changes, it saves the changes at most
//! once per `SNAPSHOT_INTERVAL_MS` (coalescing everything that changed in between), and
//! once more at shutdown. It waits on a condvar with a deadline; it never polls.

use super::store::{Delta, Store};
use crate::data::DataIdentity;
use crate::engine::cache::CachedPhone;
use crate::ops::metrics::Metrics;
use parking_lot::{Condvar, Mutex};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Takes what changed in the cache since the last call (called on the writer thread).
pub type Source = Box<dyn Fn() -> Delta + Send>;

/// Every live entry of the cache and the data they belong to (called on the writer
/// thread when it compacts the journal into a new base).
pub type Everything = Box<dyn Fn() -> (DataIdentity, Vec<CachedPhone>) + Send>;

#[derive(Debug, Default)]
struct Signal {
    dirty: bool,
    stop: bool,
}

/// Shared between the writer thread and whoever marks the cache dirty.
#[derive(Debug, Default)]
struct Shared {
    signal: Mutex<Signal>,
    wake: Condvar,
}

/// A handle that marks the cache changed; cheap, never blocks for long. Created first
/// and handed to both the engine (which marks) and the writer (which waits).
#[derive(Debug, Clone, Default)]
pub struct DirtyMarker(Arc<Shared>);

impl DirtyMarker {
    /// Wakes the writer: the cache has changes to save.
    pub fn mark(&self) {
        let mut signal = self.0.signal.lock();
        if !signal.dirty {
            signal.dirty = true;
            self.0.wake.notify_one();
        }
    }
}

/// The write-behind thread. Dropping it (or [`SnapshotWriter::shutdown`]) writes any
/// pending change and joins the thread.
#[derive(Debug)]
pub struct SnapshotWriter {
    shared: Arc<Shared>,
    /// Joined by `shutdown` / `drop`; `None` once joined.
    thread: Option<JoinHandle<()>>,
    /// Number of snapshots written; tests wait on it instead of sleeping.
    written: watch::Receiver<u64>,
}

impl SnapshotWriter {
    /// Starts the writer: after `marker` is marked it writes `source()` to `path`, at
    /// most once per `interval`.
    pub fn spawn(
        marker: DirtyMarker,
        path: PathBuf,
        interval: Duration,
        source: Source,
        everything: Everything,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<SnapshotWriter> {
        let shared = marker.0;
        let (count, written) = watch::channel(0);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("snapshot-writer".into()).spawn(move || {
            let sources = (source, everything);
            writer_loop(&thread_shared, Store::new(path), interval, &sources, &metrics, &count)
        })?;
        Ok(SnapshotWriter { shared, thread: Some(thread), written })
    }

    /// Counts snapshot writes (successful or not).
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }

    /// Writes what is pending and stops the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.signal.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the snapshot writer thread panicked");
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn writer_loop(
    shared: &Shared,
    mut store: Store,
    interval: Duration,
    sources: &(Source, Everything),
    metrics: &Metrics,
    count: &watch::Sender<u64>,
) {
    let mut last_write: Option<Instant> = None;
    loop {
        let mut signal = shared.signal.lock();
        while !signal.dirty && !signal.stop {
            shared.wake.wait(&mut signal);
        }
        // Coalesce: changes arriving within `interval` of the last write wait for the
        // next one. A stop request cuts the wait short.
        if let Some(deadline) = last_write.and_then(|at| at.checked_add(interval)) {
            while !signal.stop && Instant::now() < deadline {
                shared.wake.wait_until(&mut signal, deadline);
            }
        }
        let (dirty, stop) = (signal.dirty, signal.stop);
        signal.dirty = false;
        drop(signal);
        // At shutdown a writer with nothing new still checks that another replica has
        // not replaced the files it wrote, and saves its cache into them if it has.
        if dirty || (stop && store.has_written()) {
            write_one(&mut store, sources, metrics);
            count.send_modify(|n| *n += 1);
            last_write = Some(Instant::now());
        }
        if stop {
            return;
        }
    }
}

fn write_one(store: &mut Store, (source, everything): &(Source, Everything), metrics: &Metrics) {
    let delta = source();
    let started = Instant::now();
    match store.write(&delta, everything) {
        Ok(()) => {
            metrics.snapshot_writes.inc();
            tracing::debug!(
                changed = delta.entries.len(),
                micros = started.elapsed().as_micros() as u64,
                "snapshot changes written"
            );
        }
        Err(error) => {
            metrics.snapshot_failures.inc();
            tracing::error!(%error, "cannot write the cache snapshot; the cache keeps serving, the next change retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataIdentity;
    use crate::data::stats::CallStats;
    use crate::engine::cache::CachedPhone;

    const DATA: DataIdentity = DataIdentity { digest: 2, len: 3, segments: 1 };

    fn delta(n: u64) -> Delta {
        let entry = CachedPhone { phone: n, expires_ms: u64::MAX, stats: CallStats::EMPTY };
        Delta { identity: DATA, entries: vec![entry], now_ms: 0, capacity: 100 }
    }

    /// Writes are coalesced and the final change is flushed at shutdown, without sleeping:
    /// the interval is long, so only `shutdown` can trigger the second write.
    #[tokio::test]
    async fn the_writer_coalesces_changes_and_flushes_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&produced);
        let source: Source = Box::new(move || delta(counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1));
        let metrics = Arc::new(Metrics::new());
        let marker = DirtyMarker::default();
        let writer = SnapshotWriter::spawn(
            marker.clone(),
            path.clone(),
            Duration::from_secs(3600),
            source,
            Box::new(|| (DATA, Vec::new())),
            Arc::clone(&metrics),
        )
        .unwrap();
        let mut written = writer.written();
        marker.mark();
        tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
        for _ in 0..100 {
            marker.mark();
        }
        writer.shutdown();
        assert_eq!(produced.load(std::sync::atomic::Ordering::SeqCst), 2, "101 marks, 2 writes");
        let phones: Vec<u64> = super::super::load(&path).unwrap().unwrap().entries.iter().map(|e| e.phone).collect();
        assert_eq!(phones, [1, 2]);
        assert_eq!(metrics.snapshot_writes.get(), 2);
    }

    /// Another replica replaced the files after this writer's last write; the writer has
    /// nothing new at shutdown, yet saves its cache into the new files.
    #[tokio::test]
    async fn at_shutdown_the_writer_saves_its_cache_into_files_another_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source: Source = Box::new(move || {
            let first = !taken.swap(true, std::sync::atomic::Ordering::SeqCst);
            Delta { entries: if first { delta(1).entries } else { Vec::new() }, ..delta(0) }
        });
        let marker = DirtyMarker::default();
        let writer = SnapshotWriter::spawn(
            marker.clone(),
            path.clone(),
            Duration::from_secs(3600),
            source,
            Box::new(|| (DATA, delta(1).entries)),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let mut written = writer.written();
        marker.mark();
        tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
        let mut other = Store::new(path.clone());
        let none = || (DATA, Vec::new());
        other.write(&Delta { identity: DataIdentity { digest: 7, ..DATA }, ..delta(8) }, &none).unwrap();
        other.write(&delta(9), &none).unwrap();
        writer.shutdown();
        let phones: Vec<u64> = super::super::load(&path).unwrap().unwrap().entries.iter().map(|e| e.phone).collect();
        assert_eq!(phones, [9, 1]);
    }

    #[tokio::test]
    async fn a_failed_write_is_counted_and_the_writer_keeps_going() {
        let dir = tempfile::tempdir().unwrap();
        // A parent that is a regular file: no write can succeed (tests run as root,
        // which ignores permission bits).
        std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
        let path = dir.path().join("not-a-dir").join("cache.snapshot");
        let metrics = Arc::new(Metrics::new());
        let marker = DirtyMarker::default();
        let writer = SnapshotWriter::spawn(
            marker.clone(),
            path,
            Duration::from_millis(1),
            Box::new(|| delta(1)),
            Box::new(|| (DATA, Vec::new())),
            Arc::clone(&metrics),
        )
        .unwrap();
        let mut written = writer.written();
        marker.mark();
        tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
        marker.mark();
        tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 2)).await.unwrap().unwrap();
        drop(writer);
        assert_eq!((metrics.snapshot_failures.get(), metrics.snapshot_writes.get()), (2, 0));
    }
}
