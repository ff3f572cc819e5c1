//! The cache snapshot: its file formats (`format`), its files on disk (`store`), and the
//! write-behind thread that saves the cache's changes at most once per interval and at
//! shutdown (`writer`).
//!
//! The snapshot is a base file and a journal of increments: each write appends only the
//! entries changed since the previous one, taken from the cache under its lock in time
//! proportional to what changed, never to what is cached. Everything is written with
//! checksums and synced; a base is replaced atomically. A crash loses at most the last
//! interval's changes, never the file. Files moved aside as unusable are bounded in
//! number.

mod format;
mod store;
mod writer;

pub use format::{Base, FORMAT_VERSION, SnapshotError, decode_base, encode_base};
pub use store::{Delta, Restored, Store, fold_bytes, journal_path, load};
pub use writer::{DirtyMarker, Everything, SnapshotWriter, Source};

use std::path::{Path, PathBuf};

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
    store::remove_journal(path);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_moves_the_file_aside_with_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        std::fs::write(&path, b"junk").unwrap();
        std::fs::write(journal_path(&path), b"junk too").unwrap();
        let aside = quarantine(&path, 42).unwrap();
        assert_eq!(aside, dir.path().join("cache.snapshot.corrupt-42"));
        assert!(!path.exists() && aside.exists() && !journal_path(&path).exists());
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
}
