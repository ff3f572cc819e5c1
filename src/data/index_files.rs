//! Where persisted indexes live: one file per data file (segment), in a directory of its
//! own choosing (`INDEX_DIR`; beside the snapshot by default, as the data volume may be
//! read-only), so that a restart reads what it indexed before.
//!
//! A data file's index file is named after a hash of the data file's absolute path
//! (`reportidx-<32 hex digits>.idx`), holds that path, and is tied to the file's identity
//! (device, inode, size, modification time): a replaced or rewritten data file gets its
//! index rebuilt, never an old one. Writes are atomic (temporary, fsync, rename), so
//! replicas sharing the directory (compose's `--scale`) never see each other's half
//! written files; two that build the same index write the same bytes, the last rename
//! wins. Index files whose data file no longer exists are removed (once they are a
//! minute old: a younger one may be another replica's, for a file this one has not seen).

use super::identity::FileIdentity;
use super::index::PhoneIndex;
use super::index::store::{self, StoreError};
use crate::platform::atomic_file::AtomicFile;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const PREFIX: &str = "reportidx-";
const SUFFIX: &str = ".idx";

/// The directory of index files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFiles {
    dir: PathBuf,
}

/// What loading a data file's index found.
#[derive(Debug)]
pub enum Stored {
    /// The index, for exactly this version of the data file.
    Index(PhoneIndex),
    /// No index file for this data file.
    Missing,
    /// An index file that cannot be used (another version of the data file, another
    /// format, torn or damaged): why. The caller builds the index anew.
    Refused(StoreError),
}

impl IndexFiles {
    /// Index files in `dir` (created when the first is written).
    pub fn new(dir: impl Into<PathBuf>) -> IndexFiles {
        IndexFiles { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index file of the data file at `data`.
    pub fn file_of(&self, data: &Path) -> PathBuf {
        let absolute = absolute(data);
        self.dir.join(format!("{PREFIX}{:032x}{SUFFIX}", fnv128(absolute.as_os_str().as_encoded_bytes())))
    }

    /// The stored index of the data file at `data`, if it indexes exactly `identity`.
    pub fn load(&self, data: &Path, identity: &FileIdentity) -> Stored {
        let path = self.file_of(data);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Stored::Missing,
            Err(e) => return Stored::Refused(StoreError::Io(e.to_string())),
        };
        match store::map(&file, identity) {
            Ok(index) => Stored::Index(index),
            Err(error) => Stored::Refused(error),
        }
    }

    /// Stores `index` of the data file at `data` (identity `identity`), atomically.
    pub fn save(&self, data: &Path, identity: &FileIdentity, index: &PhoneIndex) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let target = self.file_of(data);
        let file = AtomicFile::create(&target)?;
        let mut out = BufWriter::with_capacity(1 << 20, file.file());
        store::write(index, &absolute(data), identity, &mut out)?;
        out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.commit()
    }

    /// Removes index files of data files that no longer exist (and unreadable ones, and
    /// temporaries left by a crash), at least `older_than` old; returns how many.
    pub fn remove_stale(&self, older_than: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // A temporary left by a crash mid-write (`.reportidx-….idx.tmp-…`).
            let temporary = name.starts_with(&format!(".{PREFIX}")) && name.contains(&format!("{SUFFIX}.tmp-"));
            let index_file = name.starts_with(PREFIX) && name.ends_with(SUFFIX);
            if !(index_file || temporary) {
                continue;
            }
            let old_enough = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() >= older_than);
            if !old_enough {
                continue;
            }
            let indexed = std::fs::File::open(entry.path())
                .ok()
                .filter(|_| !temporary)
                .and_then(|file| store::indexed_path(&mut BufReader::new(file)).ok());
            let orphan = match indexed {
                Some(data) => !data.exists(),
                None => true,
            };
            if orphan && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// `path` made absolute against the current directory (not canonicalised: a symlinked
/// data directory keeps its name, as the service opens it).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// FNV-1a, 128 bits: file names stable across processes and builds.
fn fnv128(bytes: &[u8]) -> u128 {
    bytes
        .iter()
        .fold(0x6c62272e07bb014262b821756295c58d, |h, &b| (h ^ u128::from(b)).wrapping_mul(0x1000000000000000000013b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::pool::WorkerPool;

    fn data(dir: &Path, name: &str) -> (PathBuf, PhoneIndex, FileIdentity) {
        let path = dir.join(name);
        let bytes = crate::data::testdata::records(5, 100, true);
        std::fs::write(&path, &bytes).unwrap();
        let index = PhoneIndex::build(&bytes, &WorkerPool::new("test", 1).unwrap()).unwrap();
        (path.clone(), index, FileIdentity::of_path(&path).unwrap())
    }

    #[test]
    fn a_saved_index_loads_for_the_same_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let files = IndexFiles::new(dir.path().join("indexes"));
        let (path, index, identity) = data(dir.path(), "a.json");
        assert!(matches!(files.load(&path, &identity), Stored::Missing));
        files.save(&path, &identity, &index).unwrap();
        match files.load(&path, &identity) {
            Stored::Index(loaded) => assert_eq!(loaded.summary().records, index.summary().records),
            other => panic!("{other:?}"),
        }
        // The file replaced by rename: a new inode, the old index refused.
        let (_, _, replaced) = data(dir.path(), "a.json");
        assert!(matches!(files.load(&path, &replaced), Stored::Refused(StoreError::Identity)));
        let (other, _, other_identity) = data(dir.path(), "b.json");
        assert_ne!(files.file_of(&other), files.file_of(&path));
        assert!(matches!(files.load(&other, &other_identity), Stored::Missing));
    }

    #[test]
    fn index_files_of_data_files_that_are_gone_are_removed_once_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let files = IndexFiles::new(dir.path());
        let (kept, index, identity) = data(dir.path(), "kept.json");
        let (gone, gone_index, gone_identity) = data(dir.path(), "gone.json");
        files.save(&kept, &identity, &index).unwrap();
        files.save(&gone, &gone_identity, &gone_index).unwrap();
        std::fs::write(dir.path().join("reportidx-garbage.idx"), b"not an index").unwrap();
        std::fs::write(dir.path().join(".reportidx-0.idx.tmp-AbCdEf"), b"half written").unwrap();
        std::fs::write(dir.path().join("cache.snapshot"), b"not ours").unwrap();
        std::fs::remove_file(&gone).unwrap();
        assert_eq!(files.remove_stale(Duration::from_secs(60)), 0, "too young: maybe another replica's");
        assert_eq!(files.remove_stale(Duration::ZERO), 3, "the orphan, the unreadable one, the temporary");
        assert!(files.file_of(&kept).exists() && !files.file_of(&gone).exists());
        assert!(dir.path().join("cache.snapshot").exists(), "only index files are touched");
    }
}
