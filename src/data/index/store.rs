//! The persisted form of a phone index: one file per data file, so a restart reads the
//! index it built before instead of scanning every byte again.
//!
//! Format (version [`FORMAT_VERSION`], little-endian): the magic `RSINDEX\n`, the version,
//! the identity of the data file it indexes (device, inode, size, modification time),
//! the bucket bits, the summary, the lengths of the data file's path and of the four
//! arrays, the path, the arrays themselves (buckets, phones, starts, spans, 8 bytes an
//! entry), and a CRC-32 of everything before it. A file is used only when its checksum, version, lengths and identity all agree;
//! anything else is refused with the reason (and rebuilt by the caller), never trusted
//! and never a panic.
//!
//! Reading maps the file and uses its arrays in place (they start 8-aligned, the path is
//! padded): the only pass over it is the checksum, over 8 bytes per span and 16 per
//! phone (about 160 MB for a 1.31 GB time-ordered data file), and the index then holds
//! no heap.

use super::spans::{IndexSummary, PhoneIndex, Span};
use super::table::Table;
use crate::data::identity::FileIdentity;
use memmap2::MmapOptions;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The version this build writes and reads; any other is refused (and rebuilt).
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"RSINDEX\n";
/// Magic, version, identity (5 words), bucket bits, summary (4 words), lengths (5 words).
const HEADER_LEN: usize = 8 + 8 + 5 * 8 + 8 + 4 * 8 + 5 * 8;
/// The longest data file path an index file records.
const MAX_PATH: u64 = 4096;
/// Bytes written at a time.
const CHUNK: usize = 1 << 20;

/// Why an index file is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not an index file, or cut short.
    #[error("not an index file of this service, or truncated ({0})")]
    Malformed(&'static str),
    /// Written by another version of the format.
    #[error("index format version {found}, this build reads version {FORMAT_VERSION}")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// The bytes do not match their checksum (torn or damaged).
    #[error("checksum mismatch: the file is torn or damaged")]
    Checksum,
    /// It indexes another version of the data file.
    #[error("it indexes another version of the data file")]
    Identity,
    /// Its parts do not fit together.
    #[error("inconsistent index: {0}")]
    Inconsistent(&'static str),
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Io(String),
}

/// Writes `index` of the data file at `path` (whose identity is `identity`) to `out`.
pub(crate) fn write(index: &PhoneIndex, path: &Path, identity: &FileIdentity, out: &mut impl Write) -> io::Result<()> {
    let path = path.as_os_str().as_bytes();
    if path.len() as u64 > MAX_PATH {
        return Err(io::Error::other("the data file's path is too long to record"));
    }
    let mut out = Checksummed { inner: out, crc: crc32fast::Hasher::new() };
    let summary = index.summary;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    for word in identity_words(identity) {
        header.extend_from_slice(&word.to_le_bytes());
    }
    header.extend_from_slice(&u64::from(index.bucket_bits).to_le_bytes());
    for word in [summary.records, summary.phones as u64, summary.spans as u64, summary.negative_durations] {
        header.extend_from_slice(&word.to_le_bytes());
    }
    for len in [path.len(), index.buckets.len(), index.phones.len(), index.starts.len(), index.spans.len()] {
        header.extend_from_slice(&(len as u64).to_le_bytes());
    }
    debug_assert_eq!(header.len(), HEADER_LEN);
    out.write_all(&header)?;
    out.write_all(path)?;
    // The arrays start 8-aligned, so a mapped file is read in place (`map`).
    out.write_all(&[0u8; 8][..padding(path.len())])?;
    write_words(&mut out, index.buckets.iter().map(|&b| b as u64))?;
    write_words(&mut out, index.phones.iter().copied())?;
    write_words(&mut out, index.starts.iter().map(|&s| s as u64))?;
    write_words(&mut out, index.spans.iter().map(|s| s.0))?;
    let crc = out.crc.clone().finalize();
    out.inner.write_all(&crc.to_le_bytes())
}

/// The path of the data file an index file (`input`) says it indexes, read from its head
/// alone (not checksummed: for tidying up, never for serving).
pub(crate) fn indexed_path(input: &mut impl Read) -> Result<PathBuf, StoreError> {
    let mut header = [0u8; HEADER_LEN];
    input.read_exact(&mut header).map_err(|_| StoreError::Malformed("shorter than a header"))?;
    let (_, lengths) = parse_header(&header)?;
    let mut path = vec![0u8; lengths[0] as usize];
    input.read_exact(&mut path).map_err(|_| StoreError::Malformed("shorter than its header says"))?;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(path)))
}

/// Checks the magic and version of `header`; returns its words and the five lengths.
fn parse_header(header: &[u8; HEADER_LEN]) -> Result<([u64; 10], [u64; 5]), StoreError> {
    if &header[..8] != MAGIC {
        return Err(StoreError::Malformed("no magic number"));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(StoreError::Version { found: version });
    }
    let word = |i: usize| {
        let at = 16 + 8 * i;
        u64::from_le_bytes(std::array::from_fn(|k| header[at + k]))
    };
    let lengths = [word(10), word(11), word(12), word(13), word(14)];
    if lengths[0] > MAX_PATH {
        return Err(StoreError::Malformed("a path longer than any this service writes"));
    }
    Ok((std::array::from_fn(word), lengths))
}

/// The index in the index file `file`, if it indexes exactly `identity`: the file is
/// mapped and its arrays used in place (no copy, no heap); its checksum, lengths and
/// structure are checked first, in one pass over it.
pub(crate) fn map(file: &File, identity: &FileIdentity) -> Result<PhoneIndex, StoreError> {
    let len = file.metadata().map_err(|e| StoreError::Io(e.to_string()))?.len();
    if len < (HEADER_LEN + 4) as u64 {
        return Err(StoreError::Malformed("shorter than a header"));
    }
    // SAFETY: index files are only ever replaced by rename (`index_files` writes a
    // temporary and renames it over), never written or truncated in place, so the mapped
    // bytes stay as they are; a rename leaves this mapping's inode intact. Every byte is
    // checksummed before use, and every lookup is bounds-checked.
    let mapped = unsafe { MmapOptions::new().populate().map(file) }.map_err(|e| StoreError::Io(e.to_string()))?;
    let (body, stored) = mapped.split_at(mapped.len() - 4);
    let header: &[u8; HEADER_LEN] = body[..HEADER_LEN].try_into().map_err(|_| StoreError::Malformed("header"))?;
    let (words, lengths) = parse_header(header)?;
    let path_len = lengths[0] as usize;
    let arrays = HEADER_LEN + path_len + padding(path_len);
    let expected = lengths[1..].iter().try_fold(arrays as u64, |sum, &n| sum.checked_add(n.checked_mul(8)?));
    if expected != Some(body.len() as u64) {
        return Err(StoreError::Malformed("its length does not match its header"));
    }
    if crc32fast::hash(body) != u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]) {
        return Err(StoreError::Checksum);
    }
    if words[..5] != identity_words(identity) {
        return Err(StoreError::Identity);
    }
    let bucket_bits =
        u32::try_from(words[5]).ok().filter(|&b| b < 32).ok_or(StoreError::Inconsistent("bucket bits"))?;
    let mapped = Arc::new(mapped);
    let mut offset = arrays;
    let mut next = |n: u64| {
        let at = offset;
        offset += n as usize * 8;
        (at, n as usize)
    };
    let layout = StoreError::Inconsistent("layout");
    let (at, n) = next(lengths[1]);
    let buckets: Table<usize> = Table::mapped(&mapped, at, n).ok_or(layout.clone())?;
    let (at, n) = next(lengths[2]);
    let phones: Table<u64> = Table::mapped(&mapped, at, n).ok_or(layout.clone())?;
    let (at, n) = next(lengths[3]);
    let starts: Table<usize> = Table::mapped(&mapped, at, n).ok_or(layout.clone())?;
    let (at, n) = next(lengths[4]);
    let spans: Table<Span> = Table::mapped(&mapped, at, n).ok_or(layout)?;
    let ascending_to = |offsets: &[usize], end: usize| {
        offsets.first() == Some(&0) && offsets.last() == Some(&end) && offsets.windows(2).all(|w| w[0] <= w[1])
    };
    if buckets.len() != (1usize << bucket_bits) + 1 || !ascending_to(&buckets, phones.len()) {
        return Err(StoreError::Inconsistent("buckets"));
    }
    if starts.len() != phones.len() + 1 || !ascending_to(&starts, spans.len()) {
        return Err(StoreError::Inconsistent("span starts"));
    }
    if words[7] != phones.len() as u64 || words[8] != spans.len() as u64 {
        return Err(StoreError::Inconsistent("summary"));
    }
    let summary = IndexSummary {
        records: words[6],
        phones: phones.len(),
        spans: spans.len(),
        negative_durations: words[9],
        heap_bytes: 0,
    };
    Ok(PhoneIndex { bucket_bits, buckets, phones, starts, spans, summary })
}

/// Zero bytes after a path of `len` bytes, up to the next multiple of 8.
fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

fn identity_words(identity: &FileIdentity) -> [u64; 5] {
    let ns = identity.modified_ns as u128;
    [identity.device, identity.inode, identity.len, ns as u64, (ns >> 64) as u64]
}

fn write_words(out: &mut impl Write, words: impl Iterator<Item = u64>) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(CHUNK);
    for word in words {
        buffer.extend_from_slice(&word.to_le_bytes());
        if buffer.len() >= CHUNK {
            out.write_all(&buffer)?;
            buffer.clear();
        }
    }
    out.write_all(&buffer)
}

/// A writer that checksums what passes through it.
struct Checksummed<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.crc.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::pool::WorkerPool;

    fn index() -> (PhoneIndex, FileIdentity) {
        let bytes = crate::data::testdata::records(7, 300, true);
        let index = PhoneIndex::build(&bytes, &WorkerPool::new("test", 2).unwrap()).unwrap();
        (index, FileIdentity { device: 3, inode: 77, len: bytes.len() as u64, modified_ns: -5 })
    }

    fn encoded(index: &PhoneIndex, identity: &FileIdentity) -> Vec<u8> {
        let mut bytes = Vec::new();
        write(index, Path::new("/data/calls/2026-11-28.json"), identity, &mut bytes).unwrap();
        bytes
    }

    fn decode(bytes: &[u8], identity: &FileIdentity) -> Result<PhoneIndex, StoreError> {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, bytes).unwrap();
        map(&file, identity)
    }

    #[test]
    fn an_index_read_back_is_the_index_written() {
        let (index, identity) = index();
        let back = decode(&encoded(&index, &identity), &identity).unwrap();
        assert_eq!(IndexSummary { heap_bytes: 0, ..back.summary() }, IndexSummary { heap_bytes: 0, ..index.summary() });
        assert_eq!(
            (back.bucket_bits, &*back.buckets, &*back.starts),
            (index.bucket_bits, &*index.buckets, &*index.starts)
        );
        assert_eq!(back.summary().heap_bytes, 0, "used in place");
        for &phone in index.phones() {
            assert_eq!(back.spans(phone), index.spans(phone));
        }
        assert_eq!(back.phones(), index.phones());
        let bytes = encoded(&index, &identity);
        assert_eq!(indexed_path(&mut &bytes[..]).unwrap(), Path::new("/data/calls/2026-11-28.json"));
    }

    #[test]
    fn an_index_of_another_version_of_the_file_is_refused() {
        let (index, identity) = index();
        let bytes = encoded(&index, &identity);
        for other in [
            FileIdentity { inode: 78, ..identity },
            FileIdentity { len: identity.len + 1, ..identity },
            FileIdentity { modified_ns: 0, ..identity },
            FileIdentity { device: 4, ..identity },
        ] {
            assert_eq!(decode(&bytes, &other).err(), Some(StoreError::Identity));
        }
    }

    /// Every truncation and every flipped bit is refused (checksum, length or magic),
    /// never a panic or a wrong index.
    #[test]
    fn every_truncation_and_every_flipped_bit_is_refused() {
        let (index, identity) = index();
        let bytes = encoded(&index, &identity);
        for cut in (0..bytes.len()).step_by(7) {
            assert!(decode(&bytes[..cut], &identity).is_err(), "cut at {cut}");
        }
        for at in (0..bytes.len()).step_by(13) {
            for bit in [0, 3, 7] {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(decode(&damaged, &identity).is_err(), "bit {bit} of byte {at}");
            }
        }
        let mut other_version = bytes.clone();
        other_version[8] = 9;
        assert_eq!(decode(&other_version, &identity).err(), Some(StoreError::Version { found: 9 }));
    }

    /// A file with a valid checksum whose parts contradict each other (as a bug or a
    /// crafted file could write) is refused, not used.
    #[test]
    fn an_inconsistent_index_with_a_valid_checksum_is_refused() {
        let (mut index, identity) = index();
        let mut starts = index.starts.to_vec();
        starts[1] = index.spans.len() + 5;
        index.starts = starts.into();
        assert_eq!(decode(&encoded(&index, &identity), &identity).err(), Some(StoreError::Inconsistent("span starts")));
    }
}
