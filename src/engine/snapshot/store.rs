//! The snapshot's files on disk: loading them at startup, appending each write's
//! changes to the journal, starting a new base when the data changes, and compacting the
//! journal into the base when it outgrows it.
//!
//! A write costs what changed, not what is cached: the changed entries are appended as
//! one checksummed batch and synced. Once the journal is larger than the base, both are
//! replaced by a new base of the cache's live entries (written atomically, with the next
//! generation), so the disk holds at most about twice the live entries and compaction's
//! cost is spread over the appends that caused it. A new base's journal is started after the base is in place;
//! a journal of an older generation is ignored, so a crash between the two loses
//! nothing that the new base does not hold.
//!
//! Replicas may share the files (`compose up --scale`). Every write holds an exclusive
//! lock on `<path>.lock` (a `flock`, so it is released if the process dies) and, under
//! it, checks that the base and journal on disk are still the ones it opened: another
//! replica may have started a new base (new data, or a fold). If they are not, the write
//! appends the writer's whole cache, not just its changes, to the live files, since what
//! it appended before went to files no longer there. The last writer wins a base; every
//! writer's entries reach it.

use super::format::{
    BASE_HEADER_LEN, Base, BaseHeader, JOURNAL_HEADER_LEN, SnapshotError, decode_base, decode_base_header,
    decode_journal, encode_journal_header, write_base, write_batch,
};
use crate::data::DataIdentity;
use crate::engine::cache::CachedPhone;
use crate::platform::atomic_file::{self, AtomicFile};
use std::fs::TryLockError;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The journal is compacted into the base once it is larger than the base and at least
/// this large.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// Bytes a write of the base or of a batch of the journal encodes before handing them to
/// the file: the encoding never holds a second copy of the cache.
const WRITE_BUFFER: usize = 64 << 10;

/// Heap a compaction holds while it runs, for a cache of `capacity` entries: the copy of
/// the cache it writes, and the buffer it encodes through.
pub fn fold_bytes(capacity: usize) -> usize {
    capacity.saturating_mul(size_of::<CachedPhone>()).saturating_add(WRITE_BUFFER)
}

/// Every live entry of the cache and the data they were computed from: what a compaction
/// writes as the new base (see [`Store::write`]).
type Everything<'a> = &'a dyn Fn() -> (DataIdentity, Vec<CachedPhone>);

/// What one write of the snapshot saves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The data the entries were computed from.
    pub identity: DataIdentity,
    /// The entries changed since the last write.
    pub entries: Vec<CachedPhone>,
    /// For dropping expired entries when compacting.
    pub now_ms: u64,
    /// At most this many entries are kept when compacting (the cache's capacity).
    pub capacity: usize,
}

/// A snapshot read at startup: the base's entries, then the journal's, in order (a
/// later entry of a phone replaces an earlier one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The data the entries were computed from.
    pub identity: DataIdentity,
    /// The cached phones.
    pub entries: Vec<CachedPhone>,
    /// The journal ended in a batch torn by a crash (dropped).
    pub torn: bool,
}

/// Where the journal of the base at `path` lives.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut journal = path.as_os_str().to_owned();
    journal.push(".journal");
    PathBuf::from(journal)
}

/// The snapshot at `path`; `Ok(None)` when there is none. A base that cannot be used is
/// an error; a journal that cannot be used (or belongs to another base) is ignored.
pub fn load(path: &Path) -> Result<Option<Restored>, SnapshotError> {
    // Shared with other readers, so a replica's write cannot replace the base between
    // reading it and its journal. Best effort: without the lock the generation check
    // still keeps a journal from being read as another base's.
    let lock = open_lock(path).ok().filter(|lock| acquire(lock, Share::Shared, LOCK_WAIT).is_ok());
    let loaded = load_unlocked(path);
    drop(lock);
    loaded
}

fn load_unlocked(path: &Path) -> Result<Option<Restored>, SnapshotError> {
    let base = match std::fs::read(path) {
        Ok(bytes) => decode_base(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut restored = Restored { identity: base.identity, entries: base.entries, torn: false };
    if let Ok(bytes) = std::fs::read(journal_path(path))
        && let Ok(journal) = decode_journal(&bytes)
        && journal.generation == base.generation
    {
        restored.entries.extend(journal.entries);
        restored.torn = journal.torn;
    }
    Ok(Some(restored))
}

/// The files as the writer last left them.
#[derive(Debug)]
struct Current {
    generation: u64,
    /// The journal's device and inode, to tell whether the file at the journal's path
    /// is still the one open here.
    journal_id: (u64, u64),
    identity: DataIdentity,
    base_bytes: u64,
    journal: std::fs::File,
    journal_bytes: u64,
}

/// The writer's handle on the snapshot files.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// `<path>.lock`, opened at the first write.
    lock: Option<std::fs::File>,
    /// How long a write waits for the lock before it fails (and is retried at the next).
    lock_wait: Duration,
    /// `None` until the first write, and after a failed one (the next write starts over
    /// from what is on disk).
    current: Option<Current>,
}

impl Store {
    /// The snapshot at `path` (base) and `path.journal`; nothing is read yet.
    pub fn new(path: PathBuf) -> Store {
        Store { path, lock: None, lock_wait: LOCK_WAIT, current: None }
    }

    /// Whether this store has written (and so has files another writer may replace).
    pub fn has_written(&self) -> bool {
        self.current.is_some()
    }

    /// Saves `delta`: appended to the journal of the base of its data (resuming the files
    /// on disk when they belong to that data, else starting a new, empty base), and the
    /// journal compacted into a new base holding `everything` the cache holds when it has
    /// outgrown the old one.
    pub fn write(
        &mut self,
        delta: &Delta,
        everything: &dyn Fn() -> (DataIdentity, Vec<CachedPhone>),
    ) -> std::io::Result<()> {
        let written = self.write_inner(delta, everything);
        if written.is_err() {
            self.current = None;
        }
        written
    }

    fn write_inner(&mut self, delta: &Delta, everything: Everything) -> std::io::Result<()> {
        let lock = match self.lock.take() {
            Some(lock) => lock,
            None => open_lock(&self.path)?,
        };
        if let Err(e) = acquire(&lock, Share::Exclusive, self.lock_wait) {
            self.lock = Some(lock);
            return Err(e);
        }
        let written = self.write_locked(delta, everything);
        let unlocked = lock.unlock();
        self.lock = Some(lock);
        written.and(unlocked)
    }

    fn write_locked(&mut self, delta: &Delta, everything: Everything) -> std::io::Result<()> {
        // What this writer appended went to files another replica has since replaced:
        // its whole cache goes into the live ones (when it is still of this data).
        let replaced = match &self.current {
            Some(current) => !self.still_on_disk(current)?,
            None => false,
        };
        if replaced || self.current.as_ref().is_none_or(|c| c.identity != delta.identity) {
            self.current = Some(self.resume_or_start(delta.identity, delta.now_ms)?);
        }
        let Some(current) = self.current.as_mut() else { return Ok(()) };
        let resaved;
        let entries = match replaced.then(everything) {
            Some((identity, mut cached)) if identity == delta.identity => {
                cached.retain(|e| e.expires_ms > delta.now_ms);
                resaved = cached;
                &resaved
            }
            _ => &delta.entries,
        };
        if !entries.is_empty() {
            let len = buffered(&current.journal, |out| write_batch(entries, out))?;
            current.journal.sync_data()?;
            current.journal_bytes += len as u64;
        }
        if current.journal_bytes > current.base_bytes.max(COMPACT_MIN_BYTES) {
            self.compact(delta, everything)?;
        }
        Ok(())
    }

    /// The header of the base on disk, if there is a readable one.
    fn base_header(&self) -> Option<BaseHeader> {
        read_prefix(&self.path, BASE_HEADER_LEN).ok().and_then(|b| decode_base_header(&b).ok())
    }

    /// Whether the base and journal at the store's paths are still those of `current`.
    fn still_on_disk(&self, current: &Current) -> std::io::Result<bool> {
        let journal = match std::fs::metadata(journal_path(&self.path)) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if file_id(&journal) != current.journal_id {
            return Ok(false);
        }
        Ok(self.base_header().is_some_and(|h| h.generation == current.generation && h.identity == current.identity))
    }

    /// The files on disk if their base belongs to `identity`, else a new empty base.
    fn resume_or_start(&self, identity: DataIdentity, now_ms: u64) -> std::io::Result<Current> {
        match self.base_header() {
            Some(header) if header.identity == identity => {
                let base_bytes = std::fs::metadata(&self.path)?.len();
                let journal = journal_path(&self.path);
                let found = std::fs::read(&journal).ok().and_then(|b| decode_journal(&b).ok());
                let valid_len = match found {
                    Some(found) if found.generation == header.generation => found.valid_len,
                    _ => {
                        atomic_file::write(&journal, &encode_journal_header(header.generation))?;
                        JOURNAL_HEADER_LEN
                    }
                };
                let file = std::fs::OpenOptions::new().append(true).open(&journal)?;
                // A batch torn by a crash is cut off, or everything appended after it
                // would be unreadable too.
                file.set_len(valid_len as u64)?;
                let journal_bytes = (valid_len - JOURNAL_HEADER_LEN) as u64;
                Ok(Current {
                    generation: header.generation,
                    journal_id: file_id(&file.metadata()?),
                    identity,
                    base_bytes,
                    journal: file,
                    journal_bytes,
                })
            }
            // A generation that cannot collide with a journal left from before (one that
            // belonged to an unreadable base, say): the wall clock, and later than the last.
            other => {
                let generation = other.map_or(0, |h| h.generation + 1).max(now_ms);
                self.start(Base { generation, identity, written_ms: now_ms, entries: Vec::new() })
            }
        }
    }

    /// Writes `base` (atomically), then its empty journal, and opens the journal.
    fn start(&self, base: Base) -> std::io::Result<Current> {
        let file = AtomicFile::create(&self.path)?;
        let base_bytes = buffered(file.file(), |out| write_base(&base, out))?;
        file.commit()?;
        let journal = journal_path(&self.path);
        atomic_file::write(&journal, &encode_journal_header(base.generation))?;
        let journal = std::fs::OpenOptions::new().append(true).open(&journal)?;
        Ok(Current {
            generation: base.generation,
            journal_id: file_id(&journal.metadata()?),
            identity: base.identity,
            base_bytes: base_bytes as u64,
            journal,
            journal_bytes: 0,
        })
    }

    /// Replaces base and journal with a new base of what the cache holds now (unexpired,
    /// at most `capacity` entries, the latest to expire): the latest entry of every phone
    /// this writer saved that is still worth restoring. Taken from the cache, not read
    /// back from the files: on a miss-heavy load re-reading and decoding them cost the
    /// service about a twentieth of its throughput, and the files may hold another
    /// replica's write meanwhile (the last writer wins). Skipped, to be tried at the next
    /// write, if the cache has meanwhile moved on to other data.
    fn compact(&mut self, delta: &Delta, everything: Everything) -> std::io::Result<()> {
        let Some(current) = self.current.as_ref() else { return Ok(()) };
        let (identity, mut entries) = everything();
        if identity != current.identity {
            return Ok(());
        }
        entries.retain(|e| e.expires_ms > delta.now_ms);
        if entries.len() > delta.capacity {
            entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.expires_ms));
            entries.truncate(delta.capacity);
        }
        let base =
            Base { generation: current.generation + 1, identity: current.identity, written_ms: delta.now_ms, entries };
        self.current = Some(self.start(base)?);
        Ok(())
    }
}

/// Runs `write` on `file` through a [`WRITE_BUFFER`] and flushes it; what `write` returned.
fn buffered(
    file: &std::fs::File,
    write: impl FnOnce(&mut BufWriter<&std::fs::File>) -> std::io::Result<usize>,
) -> std::io::Result<usize> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let written = write(&mut out)?;
    out.flush()?;
    Ok(written)
}

/// How long a write (or the startup's read) waits for the lock. A replica holding it
/// while stopped (`docker pause`, SIGSTOP, a hung disk) must not wedge the others: their
/// writes fail and are retried at the next, their shutdown is not held, and a restart
/// reads the files without the lock.
const LOCK_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Share {
    Shared,
    Exclusive,
}

/// Takes `lock` as `share` says, waiting at most `wait` for another holder to let go.
fn acquire(lock: &std::fs::File, share: Share, wait: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let tried = match share {
            Share::Shared => lock.try_lock_shared(),
            Share::Exclusive => lock.try_lock(),
        };
        match tried {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("another writer held the snapshot's lock for {} ms", wait.as_millis()),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Opens (creating it if needed) the lock file of the snapshot at `path`, which every
/// writer sharing the files holds while it writes.
fn open_lock(path: &Path) -> std::io::Result<std::fs::File> {
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(PathBuf::from(lock))
}

/// A file's device and inode.
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// The first `len` bytes of the file at `path` (fewer if it is shorter).
fn read_prefix(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len);
    std::fs::File::open(path)?.take(len as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Moves an unusable snapshot aside: see [`super::quarantine`]. Its journal goes with it
/// (it extends only that base).
pub(super) fn remove_journal(path: &Path) {
    // Best effort: a leftover journal of another generation is ignored at load anyway.
    let _ = std::fs::remove_file(journal_path(path));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::stats::CallStats;

    const DATA: DataIdentity = DataIdentity { digest: 2, len: 3, segments: 1 };
    const OTHER: DataIdentity = DataIdentity { digest: 9, len: 3, segments: 1 };

    fn entry(phone: u64, records: u64, expires_ms: u64) -> CachedPhone {
        CachedPhone { phone, expires_ms, stats: CallStats { records, ..CallStats::EMPTY } }
    }

    fn delta(identity: DataIdentity, entries: Vec<CachedPhone>) -> Delta {
        Delta { identity, entries, now_ms: 100, capacity: 1_000 }
    }

    /// A cache that holds nothing of `DATA` (these writes never compact).
    fn nothing() -> (DataIdentity, Vec<CachedPhone>) {
        (DATA, Vec::new())
    }

    fn records(restored: &Restored) -> Vec<(u64, u64)> {
        restored.entries.iter().map(|e| (e.phone, e.stats.records)).collect()
    }

    #[test]
    fn writes_append_and_a_restart_resumes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        store.write(&delta(DATA, vec![entry(2, 2, 1_000), entry(1, 5, 1_000)]), &nothing).unwrap();
        let base_len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(records(&load(&path).unwrap().unwrap()), [(1, 1), (2, 2), (1, 5)]);
        // Another process (a restart) continues the same files.
        let mut resumed = Store::new(path.clone());
        resumed.write(&delta(DATA, vec![entry(3, 3, 1_000)]), &nothing).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), base_len, "the base was not rewritten");
        assert_eq!(records(&load(&path).unwrap().unwrap()), [(1, 1), (2, 2), (1, 5), (3, 3)]);
    }

    #[test]
    fn new_data_starts_a_new_base_and_the_old_journal_is_never_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        store.write(&delta(OTHER, vec![entry(7, 7, 1_000)]), &nothing).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!((restored.identity, records(&restored)), (OTHER, vec![(7, 7)]));
    }

    /// A journal larger than its base is folded into a new base of what the cache holds:
    /// unexpired entries, at most the capacity (the latest to expire).
    #[test]
    fn a_grown_journal_is_compacted_into_a_base_of_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        let batch: Vec<CachedPhone> = (0..5_000).map(|p| entry(p, 1, 50)).collect();
        store.write(&delta(DATA, batch), &nothing).unwrap();
        let later: Vec<CachedPhone> = (0..5_000).map(|p| entry(p, 2, 1_000 + p)).collect();
        let cached: Vec<CachedPhone> = later.iter().copied().chain([entry(9_999, 3, 99)]).collect();
        let cache = move || (DATA, cached.clone());
        store.write(&Delta { capacity: 3_000, ..delta(DATA, later) }, &cache).unwrap();
        let journal = std::fs::metadata(journal_path(&path)).unwrap().len();
        assert_eq!(journal, JOURNAL_HEADER_LEN as u64, "folded into the base");
        let restored = load(&path).unwrap().unwrap();
        assert_eq!(restored.entries.len(), 3_000);
        assert!(restored.entries.iter().all(|e| e.stats.records == 2 && e.phone >= 2_000), "the latest to expire");
    }

    #[test]
    fn a_batch_torn_by_a_crash_is_dropped_and_the_rest_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        store.write(&delta(DATA, vec![entry(2, 2, 1_000)]), &nothing).unwrap();
        let journal = journal_path(&path);
        let bytes = std::fs::read(&journal).unwrap();
        std::fs::write(&journal, &bytes[..bytes.len() - 5]).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!((records(&restored), restored.torn), (vec![(1, 1)], true));
        // The next process cuts the torn batch off and appends after the last whole one.
        let mut resumed = Store::new(path.clone());
        resumed.write(&delta(DATA, vec![entry(3, 3, 1_000)]), &nothing).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!((records(&restored), restored.torn), (vec![(1, 1), (3, 3)], false));
    }

    /// A fold writes what the cache holds, whatever the files hold meanwhile: here
    /// another replica replaced them with a snapshot of other data (the last writer
    /// wins). Folding what was read back from them wrote an empty base.
    #[test]
    fn a_fold_writes_the_cache_even_after_another_replica_replaced_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        store.write(&delta(DATA, (0..3_000).map(|p| entry(p, 1, 1_000)).collect()), &nothing).unwrap();
        Store::new(path.clone()).write(&delta(OTHER, vec![entry(7, 7, 1_000)]), &nothing).unwrap();
        let later: Vec<CachedPhone> = (0..30_000).map(|p| entry(p, 2, 1_000)).collect();
        // And one expiring at the write's `now_ms` (100): expired, as the cache counts it.
        let cached: Vec<CachedPhone> = later.iter().copied().chain([entry(99_999, 3, 100)]).collect();
        let cache = move || (DATA, cached.clone());
        store.write(&Delta { capacity: 100_000, ..delta(DATA, later) }, &cache).unwrap();
        assert_eq!(std::fs::metadata(journal_path(&path)).unwrap().len(), JOURNAL_HEADER_LEN as u64, "folded");
        let restored = load(&path).unwrap().unwrap();
        assert_eq!(restored.identity, DATA);
        assert_eq!(restored.entries.len(), 30_000);
        assert!(restored.entries.iter().all(|e| e.stats.records == 2));
    }

    /// A cache that has moved on to other data since the changes were taken is not
    /// written as this data's base: the fold waits for the next write.
    #[test]
    fn no_fold_from_a_cache_of_other_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        let batch: Vec<CachedPhone> = (0..20_000).map(|p| entry(p, 1, 1_000)).collect();
        let moved_on = || (OTHER, vec![entry(7, 7, 1_000)]);
        store.write(&delta(DATA, batch), &moved_on).unwrap();
        assert!(std::fs::metadata(journal_path(&path)).unwrap().len() > 1 << 20, "not folded");
        let restored = load(&path).unwrap().unwrap();
        assert_eq!((restored.identity, restored.entries.len()), (DATA, 20_000));
    }

    /// Two replicas of the files at `path`: `a` has appended phone 1 of `DATA`, then `b`
    /// replaced the files with a base of `OTHER` and then one of `DATA` holding phone 8.
    fn files_replaced_under_a_replica(path: &Path) -> (Store, Store) {
        let mut a = Store::new(path.to_owned());
        let mut b = Store::new(path.to_owned());
        a.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        b.write(&delta(OTHER, vec![entry(7, 7, 1_000)]), &nothing).unwrap();
        b.write(&delta(DATA, vec![entry(8, 8, 1_000)]), &nothing).unwrap();
        (a, b)
    }

    /// Replicas sharing the files while the data is replaced: a stale replica writes a
    /// base of the old data, then a new base of the new data, while another replica goes
    /// on appending to the journal it opened before. Its appends went to a journal no
    /// longer on disk, and a restart found nothing of its cache; it now notices the files
    /// are not the ones it opened and saves its whole cache into the live ones.
    #[test]
    fn a_replica_whose_files_another_replaced_saves_its_cache_into_the_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let (mut a, mut b) = files_replaced_under_a_replica(&path);
        // And one expiring at the write's `now_ms` (100): expired, as the cache counts it.
        let a_cache = || (DATA, vec![entry(1, 1, 1_000), entry(2, 2, 1_000), entry(4, 4, 100)]);
        a.write(&delta(DATA, vec![entry(2, 2, 1_000)]), &a_cache).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!(restored.identity, DATA);
        assert_eq!(records(&restored), [(8, 8), (1, 1), (2, 2)]);
        // Both go on appending to the same files.
        b.write(&delta(DATA, vec![entry(9, 9, 1_000)]), &nothing).unwrap();
        a.write(&delta(DATA, vec![entry(3, 3, 1_000)]), &nothing).unwrap();
        assert_eq!(records(&load(&path).unwrap().unwrap()), [(8, 8), (1, 1), (2, 2), (9, 9), (3, 3)]);
    }

    /// The same, but the replica's cache has moved on to other data since its changes
    /// were taken: its cache is not of the data these files hold, so only the changes
    /// (of this data) are appended, never the cache's entries of the other.
    #[test]
    fn a_replica_whose_files_another_replaced_and_whose_cache_moved_on_appends_only_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let (mut a, _b) = files_replaced_under_a_replica(&path);
        let moved_on = || (OTHER, vec![entry(1, 70, 1_000), entry(6, 60, 1_000)]);
        a.write(&delta(DATA, vec![entry(2, 2, 1_000)]), &moved_on).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!((restored.identity, records(&restored)), (DATA, vec![(8, 8), (2, 2)]));
    }

    /// Another replica folded the journal into a new base (a new generation): this one's
    /// next write goes into the new journal, with its whole cache, not into the old one.
    #[test]
    fn a_fold_by_another_replica_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut a = Store::new(path.clone());
        let mut b = Store::new(path.clone());
        a.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        let batch: Vec<CachedPhone> = (10..20_000).map(|p| entry(p, 2, 1_000)).collect();
        let b_cache = {
            let batch = batch.clone();
            move || (DATA, batch.clone())
        };
        b.write(&Delta { capacity: 100_000, ..delta(DATA, batch) }, &b_cache).unwrap();
        assert_eq!(std::fs::metadata(journal_path(&path)).unwrap().len(), JOURNAL_HEADER_LEN as u64, "folded");
        a.write(&delta(DATA, vec![entry(2, 3, 1_000)]), &|| (DATA, vec![entry(1, 1, 1_000), entry(2, 3, 1_000)]))
            .unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!(restored.entries.len(), 19_990 + 2);
        assert_eq!(records(&restored)[19_990..], [(1, 1), (2, 3)]);
    }

    /// A writer that cannot get the lock (another replica holds it, stopped) fails
    /// within its bound rather than waiting forever, and writes once the lock is free.
    #[test]
    fn a_lock_held_elsewhere_fails_the_write_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let held = open_lock(&path).unwrap();
        held.lock().unwrap();
        let mut store = Store { lock_wait: Duration::from_millis(50), ..Store::new(path.clone()) };
        let error = store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(!path.exists(), "nothing written without the lock");
        // The startup's read does not wait on it either.
        assert_eq!(load(&path).unwrap(), None);
        held.unlock().unwrap();
        store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        assert_eq!(records(&load(&path).unwrap().unwrap()), [(1, 1)]);
    }

    /// A fold starts a new generation, so a journal of the base before it (left by a
    /// crash between the new base's rename and its journal's) is never read as extending
    /// the new base.
    #[test]
    fn a_journal_left_from_before_a_fold_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let mut store = Store::new(path.clone());
        store.write(&delta(DATA, vec![entry(1, 1, 1_000)]), &nothing).unwrap();
        let old_journal = std::fs::read(journal_path(&path)).unwrap();
        let cached: Vec<CachedPhone> = (0..20_000).map(|p| entry(p, 2, 1_000)).collect();
        let cache = move || (DATA, cached.clone());
        let batch = (0..20_000).map(|p| entry(p, 2, 1_000)).collect();
        store.write(&Delta { capacity: 100_000, ..delta(DATA, batch) }, &cache).unwrap();
        std::fs::write(journal_path(&path), old_journal).unwrap();
        let restored = load(&path).unwrap().unwrap();
        assert_eq!(restored.entries.len(), 20_000, "only the new base");
        assert!(restored.entries.iter().all(|e| e.stats.records == 2));
    }
}
