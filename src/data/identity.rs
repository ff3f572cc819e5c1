//! Which data a dataset, a cache entry or a snapshot belongs to.
//!
//! A file's identity is what the filesystem says about it (device, inode, size,
//! modification time): a file replaced by rename gets a new inode; one rewritten in
//! place gets a new size or mtime. It is cheap to read, so the reload watcher can poll it.
//! The identity of the data being served ([`DataIdentity`]) covers every segment: a
//! digest of each one's name and file identity.

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

/// Identity of the whole data being served: the single data file, or the set of segments
/// of a data directory (names and file identities). Two sets differ in it when any
/// segment was added, removed, renamed over or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataIdentity {
    /// FNV-1a (128-bit) of every segment's name and file identity, in name order.
    pub digest: u128,
    /// Total size in bytes.
    pub len: u64,
    /// How many segments.
    pub segments: u64,
}

impl DataIdentity {
    /// The identity of `segments`: (name, file identity) pairs, in name order.
    pub fn of<'a>(segments: impl IntoIterator<Item = (&'a str, FileIdentity)>) -> DataIdentity {
        let mut digest = Fnv128::new();
        let (mut len, mut count) = (0, 0);
        for (name, file) in segments {
            digest.write(&(name.len() as u64).to_le_bytes());
            digest.write(name.as_bytes());
            for word in [file.device, file.inode, file.len] {
                digest.write(&word.to_le_bytes());
            }
            digest.write(&file.modified_ns.to_le_bytes());
            len += file.len;
            count += 1;
        }
        DataIdentity { digest: digest.0, len, segments: count }
    }
}

/// FNV-1a, 128 bits: stable across processes and builds (unlike the hash maps' seeded
/// hashers), which a snapshot written by one process and read by the next needs.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;

    fn new() -> Fnv128 {
        Fnv128(Fnv128::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u128::from(byte)).wrapping_mul(Fnv128::PRIME);
        }
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

    #[test]
    fn a_data_identity_changes_with_any_segment_and_is_stable() {
        let file = |inode| FileIdentity { device: 1, inode, len: 10, modified_ns: 5 };
        let one = DataIdentity::of([("a.json", file(1)), ("b.json", file(2))]);
        assert_eq!(one, DataIdentity::of([("a.json", file(1)), ("b.json", file(2))]));
        assert_eq!((one.len, one.segments), (20, 2));
        for other in [
            DataIdentity::of([("a.json", file(1))]),
            DataIdentity::of([("a.json", file(1)), ("b.json", file(3))]),
            DataIdentity::of([("a.json", file(1)), ("c.json", file(2))]),
            DataIdentity::of([("a.json", file(1)), ("b.json", file(2)), ("c.json", file(3))]),
        ] {
            assert_ne!(one.digest, other.digest);
        }
        // The empty set, and a value fixed across builds (snapshots are read by the next
        // process): FNV-1a 128 of nothing is its offset basis.
        assert_eq!(DataIdentity::of([]).digest, 0x6c62272e07bb014262b821756295c58d);
    }
}
