//! Replacing a file atomically: write a temporary file beside it, fsync, rename it over
//! the target, fsync the directory. A crash leaves the old file or the new one, never a
//! torn one; at worst it leaves the temporary, which [`remove_stale_temporaries`] clears.
//!
//! Used for the cache snapshot and by `datagen` (data.json must be replaced by rename,
//! never rewritten in place: see `data::mmap`). Temporaries are named after their target
//! (`.<name>.tmp-XXXXXX`), so cleaning one file's leftovers never touches another's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A file being written; it replaces its target only on [`AtomicFile::commit`], and is
/// removed if dropped before.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Starts writing a replacement for `target` (its directory is created if missing).
    pub fn create(target: &Path) -> std::io::Result<AtomicFile> {
        let dir = directory_of(target);
        std::fs::create_dir_all(dir)?;
        let temp = tempfile::Builder::new().prefix(&temp_prefix(target)).tempfile_in(dir)?;
        Ok(AtomicFile { target: target.to_owned(), temp })
    }

    /// The temporary file, to write the contents to.
    pub fn file(&self) -> &std::fs::File {
        self.temp.as_file()
    }

    /// Makes the file readable by everyone (a temporary starts at 0600): for data.json,
    /// which the service may read as another user.
    pub fn readable_by_all(&self) -> std::io::Result<()> {
        std::fs::set_permissions(self.temp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
    }

    /// fsync, rename over the target, fsync the directory.
    pub fn commit(self) -> std::io::Result<()> {
        self.temp.as_file().sync_all()?;
        let dir = directory_of(&self.target).to_owned();
        self.temp.persist(&self.target).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// Writes `bytes` to `target` atomically.
pub fn write(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = AtomicFile::create(target)?;
    file.temp.write_all(bytes)?;
    file.commit()
}

/// Removes temporaries of `target` last modified more than `older_than` ago (a crash
/// between creating and renaming one leaves it behind); returns how many. Younger ones
/// may belong to a write in progress (another instance sharing the directory), so they
/// stay. Best effort: errors are skipped.
pub fn remove_stale_temporaries(target: &Path, older_than: Duration) -> usize {
    let prefix = temp_prefix(target);
    let Ok(entries) = std::fs::read_dir(directory_of(target)) else { return 0 };
    let now = SystemTime::now();
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|entry| {
            let modified = entry.metadata().and_then(|m| m.modified());
            modified.is_ok_and(|at| now.duration_since(at).is_ok_and(|age| age > older_than))
        })
        .filter(|entry| std::fs::remove_file(entry.path()).is_ok())
        .count()
}

fn directory_of(target: &Path) -> &Path {
    target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn temp_prefix(target: &Path) -> String {
    let name = target.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy());
    format!(".{name}.tmp-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        write(&path, b"first").unwrap();
        write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_file_leaves_the_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        write(&path, b"old").unwrap();
        let mut file = AtomicFile::create(&path).unwrap();
        file.temp.write_all(b"half").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_old_temporaries_of_the_same_target_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let leftover = |name: &str, age_secs: u64| {
            let file = dir.path().join(name);
            std::fs::write(&file, b"x").unwrap();
            let at = SystemTime::now() - Duration::from_secs(age_secs);
            std::fs::File::options().write(true).open(&file).unwrap().set_modified(at).unwrap();
            file
        };
        let stale = leftover(".cache.snapshot.tmp-abc123", 3_600);
        let fresh = leftover(".cache.snapshot.tmp-def456", 0);
        let other = leftover(".data.json.tmp-ghi789", 3_600);
        assert_eq!(remove_stale_temporaries(&path, Duration::from_secs(60)), 1);
        assert!(!stale.exists() && fresh.exists() && other.exists());
    }
}
