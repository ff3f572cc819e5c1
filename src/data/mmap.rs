//! The memory mapping of data.json: the one `unsafe` of the crate that rests on a promise
//! from outside the process (that data.json is replaced by rename, never rewritten in
//! place: see [`Mapping::new`]).
//!
//! The crate holds nine `unsafe` blocks and one `unsafe trait`, each with its `SAFETY`
//! note: the mapping here and its one caller (`Dataset::open`); the mapping of an index
//! file and the view of its arrays in place (`data::index::store`, `data::index::table`,
//! whose `Word` trait says which types may be viewed so); the run-time AVX2 dispatch and
//! the prefetch hint in `data::prefetch`; setting `RUST_MIN_STACK` before any thread exists
//! (`platform::stack`); and `malloc_trim` and `prctl` (`platform::heap`).
//!
//! The mapping is read-only and shared. It owns the open file, so the mapped inode stays
//! alive even when data.json is replaced by rename; the reload watcher then maps the new
//! file and drops this one when the last report using it finishes.

use super::identity::FileIdentity;
use memmap2::Mmap;
use std::fs::File;
use std::io;

/// A read-only view of one version of a data file.
#[derive(Debug)]
pub(super) struct Mapping {
    map: Mmap,
    /// Kept open so `still_intact` can stat the mapped inode, not whatever the path
    /// names now.
    file: File,
    identity: FileIdentity,
}

impl Mapping {
    /// Maps `file` read-only.
    ///
    /// # Safety
    ///
    /// The caller must ensure that, for the lifetime of the mapping, nobody truncates
    /// the file or writes to it in place. The bytes are handed out as `&[u8]`, which the
    /// compiler assumes immutable: a concurrent in-place write makes reads return
    /// arbitrary (torn) bytes, and a truncation makes any read of a page past the new end
    /// raise SIGBUS, which kills the process. Replacing the file by rename is safe: the
    /// mapping keeps the old inode's blocks alive until it is dropped.
    pub(super) unsafe fn new(file: File) -> io::Result<Mapping> {
        let meta = file.metadata()?;
        // SAFETY: forwarded to our caller, see `# Safety` above.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Mapping { map, file, identity: FileIdentity::of_metadata(&meta) })
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The identity of the file as it was when it was mapped.
    pub(super) fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Whether the mapped file still has the size and modification time it was mapped
    /// with: one `fstat`, checked before every aggregation, so a file rewritten or
    /// truncated in place is noticed before its pages are read rather than after.
    pub(super) fn still_intact(&self) -> bool {
        self.file.metadata().is_ok_and(|meta| {
            let now = FileIdentity::of_metadata(&meta);
            now.len == self.identity.len && now.modified_ns == self.identity.modified_ns
        })
    }
}
