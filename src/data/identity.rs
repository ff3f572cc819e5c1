//! Which data.json a dataset, a cache entry or a snapshot belongs to.
//!
//! The identity is what the filesystem says about the file (device, inode, size,
//! modification time): a file replaced by rename gets a new inode; one rewritten in
//! place gets a new size or mtime. It is cheap to read, so the reload watcher can poll it.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Identity of one version of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// `st_dev`.
    pub device: u64,
    /// `st_ino`: a file renamed over the path has another.
    pub inode: u64,
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: i128,
}

impl FileIdentity {
    /// The identity `meta` describes.
    pub fn of_metadata(meta: &Metadata) -> FileIdentity {
        FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// The identity of the file now at `path` (following symlinks, as opening does).
    pub fn of_path(path: &Path) -> std::io::Result<FileIdentity> {
        std::fs::metadata(path).map(|meta| FileIdentity::of_metadata(&meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rewriting_a_file_changes_its_identity_and_rename_changes_the_inode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("data.json");
        std::fs::write(&path, b"[]").expect("write");
        let first = FileIdentity::of_path(&path).expect("stat");
        assert_eq!(first, FileIdentity::of_path(&path).expect("stat"));

        std::fs::OpenOptions::new().append(true).open(&path).and_then(|mut f| f.write_all(b" ")).expect("append");
        let appended = FileIdentity::of_path(&path).expect("stat");
        assert_eq!((appended.inode, appended.len), (first.inode, 3));

        let next = dir.path().join("next.json");
        std::fs::write(&next, b"[ ]").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_ne!(FileIdentity::of_path(&path).expect("stat").inode, first.inode);
    }
}
