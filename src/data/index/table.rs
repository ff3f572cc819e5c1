//! One of the index's arrays: built in memory, or read in place from a mapped index file
//! (see `store`), so a restart costs neither a copy nor heap for the index.

use memmap2::Mmap;
use std::sync::Arc;

/// An element type a table may view in a mapped file.
///
/// # Safety
///
/// Implementors are 8 bytes, 8-aligned at most, and valid for every bit pattern (a plain
/// integer, or a `repr(transparent)` wrapper of one).
pub(crate) unsafe trait Word: Copy {}

// SAFETY: 8-byte integers, valid for any bits (`usize` is 8 bytes: see the assertion).
unsafe impl Word for u64 {}
// SAFETY: as above; the index only builds for 64-bit targets (40-bit offsets).
unsafe impl Word for usize {}
const _: () = assert!(size_of::<usize>() == 8, "the index needs a 64-bit target");

/// `len` entries, in memory or in a mapped file.
#[derive(Debug)]
pub(crate) enum Table<T: Word> {
    /// Built here.
    Owned(Vec<T>),
    /// In place in an index file: `len` little-endian words from byte `offset`.
    Mapped {
        /// The index file, mapped read-only; shared by the index's tables.
        file: Arc<Mmap>,
        /// Where the words start (a multiple of 8).
        offset: usize,
        /// How many.
        len: usize,
    },
}

impl<T: Word> Table<T> {
    /// The `len` words at `offset` of `file`, if they lie within it, 8-aligned, on a
    /// little-endian machine (the file's byte order).
    pub(crate) fn mapped(file: &Arc<Mmap>, offset: usize, len: usize) -> Option<Table<T>> {
        let end = len.checked_mul(8).and_then(|bytes| bytes.checked_add(offset))?;
        let fits = end <= file.len() && offset.is_multiple_of(8) && (file.as_ptr() as usize).is_multiple_of(8);
        (fits && cfg!(target_endian = "little")).then(|| Table::Mapped { file: Arc::clone(file), offset, len })
    }

    /// Heap it holds (none when mapped: the page cache holds the file).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Table::Owned(words) => words.capacity() * size_of::<T>(),
            Table::Mapped { .. } => 0,
        }
    }
}

impl<T: Word> std::ops::Deref for Table<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Table::Owned(words) => words,
            Table::Mapped { file, offset, len } => {
                let bytes = &file[*offset..*offset + *len * 8];
                // SAFETY: `Table::mapped` checked that these bytes lie within the mapping
                // and start 8-aligned, and that the machine is little-endian like the
                // file; `T: Word` is 8 bytes and valid for any bits. The slice borrows
                // `self`, which keeps the mapping alive. The file is never written in
                // place (index files are replaced by rename, see `index_files`), so the
                // bytes do not change under the slice.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), *len) }
            }
        }
    }
}

impl<T: Word> From<Vec<T>> for Table<T> {
    fn from(words: Vec<T>) -> Table<T> {
        Table::Owned(words)
    }
}
