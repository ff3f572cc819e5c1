//! The cache snapshot: its file format, atomic writes, restore, and the write-behind
//! thread that persists the cache at most once per interval and at shutdown.
//!
//! Format (little-endian): magic `RSCACHE\0`, format version (u32), the identity of the
//! data.json the entries were computed from (device, inode, size: u64; mtime ns: i128),
//! write time (u64 ms), entry count (u64), the entries (112 bytes each), and a CRC-32 of
//! everything before it. A snapshot is written with `atomic_file` (temporary file,
//! fsync, rename, directory fsync), so a crash leaves the old or the new file, never a
//! torn one. Files moved aside as unusable are bounded in number.

use crate::cache::CachedPhone;
use crate::data::FileIdentity;
use crate::metrics::Metrics;
use crate::stats::CallStats;
use parking_lot::{Condvar, Mutex};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const MAGIC: [u8; 8] = *b"RSCACHE\0";
/// Bumped whenever the layout changes; other versions are moved aside at startup.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 * 3 + 16 + 8 + 8;
const ENTRY_LEN: usize = 8 * 6 + 16 * 4;
const CHECKSUM_LEN: usize = 4;

/// A decoded snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub identity: FileIdentity,
    pub written_ms: u64,
    pub entries: Vec<CachedPhone>,
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a cache snapshot (bad magic bytes)")]
    NotASnapshot,
    #[error("snapshot format version {found}; this build reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("snapshot is truncated or padded: {len} bytes where its header implies {expected}")]
    Length { len: usize, expected: usize },
    #[error("snapshot checksum mismatch (corrupted)")]
    Checksum,
}

pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + snapshot.entries.len() * ENTRY_LEN + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let id = &snapshot.identity;
    for word in [id.device, id.inode, id.len] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&id.modified_ns.to_le_bytes());
    out.extend_from_slice(&snapshot.written_ms.to_le_bytes());
    out.extend_from_slice(&(snapshot.entries.len() as u64).to_le_bytes());
    for e in &snapshot.entries {
        let s = &e.stats;
        for word in [e.phone, e.expires_ms, s.records, s.up_to_10s, s.from_10_to_30s, s.over_30s] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for wide in [s.min_ms, s.max_ms, s.total_ms, s.over_15s_total_ms] {
            out.extend_from_slice(&wide.to_le_bytes());
        }
    }
    let checksum = crc32fast::hash(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Reads little-endian fields in order; lengths are checked before any read.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut bytes = [0u8; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        bytes[..head.len()].copy_from_slice(head);
        self.0 = rest;
        bytes
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i128(&mut self) -> i128 {
        i128::from_le_bytes(self.take())
    }
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < MAGIC.len() + 4 || bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let mut fields = Fields(&bytes[MAGIC.len()..]);
    let found = fields.u32();
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Version { found });
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(SnapshotError::Length { len: bytes.len(), expected: HEADER_LEN + CHECKSUM_LEN });
    }
    let identity =
        FileIdentity { device: fields.u64(), inode: fields.u64(), len: fields.u64(), modified_ns: fields.i128() };
    let written_ms = fields.u64();
    let count = fields.u64();
    let expected = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(ENTRY_LEN))
        .and_then(|n| n.checked_add(HEADER_LEN + CHECKSUM_LEN));
    if expected != Some(bytes.len()) {
        return Err(SnapshotError::Length { len: bytes.len(), expected: expected.unwrap_or(usize::MAX) });
    }
    let (body, stored) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if crc32fast::hash(body) != Fields(stored).u32() {
        return Err(SnapshotError::Checksum);
    }
    let entries = (0..count)
        .map(|_| {
            let (phone, expires_ms) = (fields.u64(), fields.u64());
            let (records, up_to_10s, from_10_to_30s, over_30s) =
                (fields.u64(), fields.u64(), fields.u64(), fields.u64());
            let stats = CallStats {
                records,
                up_to_10s,
                from_10_to_30s,
                over_30s,
                min_ms: fields.i128(),
                max_ms: fields.i128(),
                total_ms: fields.i128(),
                over_15s_total_ms: fields.i128(),
            };
            CachedPhone { phone, expires_ms, stats }
        })
        .collect();
    Ok(Snapshot { identity, written_ms, entries })
}

/// The snapshot at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How many snapshots moved aside are kept for inspection; older ones are deleted.
pub const KEPT_QUARANTINED: usize = 3;

/// Moves an unusable snapshot aside (`<path>.corrupt-<ms>`) so it can be inspected and
/// is not read again, and deletes all but the newest [`KEPT_QUARANTINED`] of them, so a
/// snapshot that keeps breaking never fills the disk.
pub fn quarantine(path: &Path, now_ms: u64) -> std::io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{now_ms}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    let name = path.file_name().map(|n| format!("{}.corrupt-", n.to_string_lossy())).unwrap_or_default();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut moved: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            let ms = file.strip_prefix(&name)?.parse().ok()?;
            Some((ms, entry.path()))
        })
        .collect();
    moved.sort_unstable_by(|a, b| b.cmp(a));
    for (_, old) in moved.into_iter().skip(KEPT_QUARANTINED) {
        // Best effort: a file that cannot be deleted is left, and tried again next time.
        let _ = std::fs::remove_file(old);
    }
    Ok(aside)
}

/// Produces what the snapshot should hold now (called on the writer thread).
pub type Source = Box<dyn Fn() -> Snapshot + Send>;

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
        metrics: Arc<Metrics>,
    ) -> std::io::Result<SnapshotWriter> {
        let shared = marker.0;
        let (count, written) = watch::channel(0);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || writer_loop(&thread_shared, &path, interval, &source, &metrics, &count))?;
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
    path: &Path,
    interval: Duration,
    source: &Source,
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
        if dirty {
            write_one(path, source, metrics);
            count.send_modify(|n| *n += 1);
            last_write = Some(Instant::now());
        }
        if stop {
            return;
        }
    }
}

fn write_one(path: &Path, source: &Source, metrics: &Metrics) {
    let snapshot = source();
    let started = Instant::now();
    match crate::atomic_file::write(path, &encode(&snapshot)) {
        Ok(()) => {
            metrics.snapshot_writes.inc();
            tracing::debug!(
                entries = snapshot.entries.len(),
                micros = started.elapsed().as_micros() as u64,
                "snapshot written"
            );
        }
        Err(error) => {
            metrics.snapshot_failures.inc();
            tracing::error!(%error, path = %path.display(), "cannot write the cache snapshot; the cache keeps serving, the next change retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut stats = CallStats::EMPTY;
        stats.record(0, 12_345);
        stats.record(i64::MIN, i64::MAX);
        Snapshot {
            identity: FileIdentity { device: 1, inode: 2, len: 3, modified_ns: -4 },
            written_ms: 5,
            entries: vec![
                CachedPhone { phone: u64::MAX, expires_ms: 6, stats },
                CachedPhone { phone: 0, expires_ms: 7, stats: CallStats::EMPTY },
            ],
        }
    }

    #[test]
    fn a_snapshot_round_trips_exactly() {
        assert_eq!(decode(&encode(&sample())).unwrap(), sample());
        let empty = Snapshot { entries: vec![], ..sample() };
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= bit;
                assert!(decode(&corrupt).is_err(), "bit {bit:#x} of byte {i}");
            }
        }
    }

    #[test]
    fn garbage_and_other_versions_are_named() {
        assert!(matches!(decode(b"hello world, not a snapshot"), Err(SnapshotError::NotASnapshot)));
        let mut old = encode(&sample());
        old[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode(&old), Err(SnapshotError::Version { found: 0 })));
    }

    #[test]
    fn a_written_snapshot_loads_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        crate::atomic_file::write(&path, &encode(&sample())).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(load(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn quarantine_moves_the_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        std::fs::write(&path, b"junk").unwrap();
        let aside = quarantine(&path, 42).unwrap();
        assert_eq!(aside, dir.path().join("cache.snapshot.corrupt-42"));
        assert!(!path.exists() && aside.exists());
    }

    /// A snapshot that breaks at every start never piles up files: the newest three
    /// stay.
    #[test]
    fn only_the_newest_quarantined_snapshots_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        std::fs::write(dir.path().join("other.corrupt-1"), b"not ours").unwrap();
        for now_ms in [5, 100, 20, 7, 1000] {
            std::fs::write(&path, b"junk").unwrap();
            quarantine(&path, now_ms).unwrap();
        }
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "cache.snapshot.corrupt-100",
                "cache.snapshot.corrupt-1000",
                "cache.snapshot.corrupt-20",
                "other.corrupt-1"
            ]
        );
    }

    /// Writes are coalesced and the final change is flushed at shutdown, without sleeping:
    /// the interval is long, so only `shutdown` can trigger the second write.
    #[tokio::test]
    async fn the_writer_coalesces_changes_and_flushes_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&produced);
        let source: Source = Box::new(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Snapshot { written_ms: n, ..sample() }
        });
        let metrics = Arc::new(Metrics::new());
        let marker = DirtyMarker::default();
        let writer = SnapshotWriter::spawn(
            marker.clone(),
            path.clone(),
            Duration::from_secs(3600),
            source,
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
        assert_eq!(load(&path).unwrap().map(|s| s.written_ms), Some(2));
        assert_eq!(metrics.snapshot_writes.get(), 2);
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
            Box::new(sample),
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
