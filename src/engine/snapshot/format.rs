//! The snapshot's two file formats, pure bytes in and out (little-endian throughout).
//!
//! The base (`SNAPSHOT_PATH`): magic `RSCACHE\0`, format version (u32), generation
//! (u64), the identity of the data the entries were computed from (the digest of every
//! segment's name and file identity: u128; total size, segment count: u64), write time
//! (u64 ms), entry count (u64), the entries
//! ([`ENTRY_LEN`] bytes each), and a CRC-32 of everything before it.
//!
//! The journal (`SNAPSHOT_PATH.journal`): magic `RSJOURN\0`, format version (u32), the
//! generation of the base it extends (u64), then batches appended one per write: entry
//! count (u32), the entries, a CRC-32 of the count and entries. A batch torn by a crash
//! fails its check and ends the journal there.

use crate::data::DataIdentity;
use crate::data::stats::CallStats;
use crate::engine::cache::CachedPhone;
use std::io::Write;

const BASE_MAGIC: [u8; 8] = *b"RSCACHE\0";
const JOURNAL_MAGIC: [u8; 8] = *b"RSJOURN\0";
/// Bumped whenever a layout changes; other versions are moved aside at startup.
pub const FORMAT_VERSION: u32 = 3;
pub(super) const BASE_HEADER_LEN: usize = 8 + 4 + 8 + 16 + 8 * 2 + 8 + 8;
pub(super) const JOURNAL_HEADER_LEN: usize = 8 + 4 + 8;
pub(super) const ENTRY_LEN: usize = 8 * 6 + 16 * 4;
const CHECKSUM_LEN: usize = 4;

/// A decoded base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Which base this is; a journal extends only the base of its generation.
    pub generation: u64,
    /// The data the entries were computed from.
    pub identity: DataIdentity,
    /// When it was written (milliseconds since the Unix epoch).
    pub written_ms: u64,
    /// The cached phones.
    pub entries: Vec<CachedPhone>,
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file cannot be read.
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with the magic bytes.
    #[error("not a cache snapshot (bad magic bytes)")]
    NotASnapshot,
    /// Another format version.
    #[error("snapshot format version {found}; this build reads version {FORMAT_VERSION}")]
    Version {
        /// The version the file says it has.
        found: u32,
    },
    /// The size does not match the entry count in the header.
    #[error("snapshot is truncated or padded: {len} bytes where its header implies {expected}")]
    Length {
        /// The file's size.
        len: usize,
        /// The size its header implies.
        expected: usize,
    },
    /// The contents do not match the checksum.
    #[error("snapshot checksum mismatch (corrupted)")]
    Checksum,
}

/// A base file's bytes: header, entries, CRC-32.
pub fn encode_base(base: &Base) -> Vec<u8> {
    let mut out = Vec::with_capacity(BASE_HEADER_LEN + base.entries.len() * ENTRY_LEN + CHECKSUM_LEN);
    write_base(base, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Writes `base` to `out` as [`encode_base`] encodes it, entry by entry: a compaction
/// writes the cache's whole copy without a second, encoded copy of it in memory.
pub(super) fn write_base(base: &Base, out: &mut impl Write) -> std::io::Result<usize> {
    let mut out = Checksummed::new(out);
    out.write_all(&BASE_MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&base.generation.to_le_bytes())?;
    let id = &base.identity;
    out.write_all(&id.digest.to_le_bytes())?;
    out.write_all(&id.len.to_le_bytes())?;
    out.write_all(&id.segments.to_le_bytes())?;
    out.write_all(&base.written_ms.to_le_bytes())?;
    out.write_all(&(base.entries.len() as u64).to_le_bytes())?;
    for entry in &base.entries {
        out.write_all(&encode_entry(entry))?;
    }
    out.finish()
}

/// The header fields of a base, read without its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BaseHeader {
    pub generation: u64,
    pub identity: DataIdentity,
    pub count: u64,
}

pub(super) fn decode_base_header(bytes: &[u8]) -> Result<BaseHeader, SnapshotError> {
    let mut fields = versioned(bytes, &BASE_MAGIC)?;
    if bytes.len() < BASE_HEADER_LEN {
        return Err(SnapshotError::Length { len: bytes.len(), expected: BASE_HEADER_LEN + CHECKSUM_LEN });
    }
    let generation = fields.u64();
    let identity = DataIdentity { digest: fields.u128(), len: fields.u64(), segments: fields.u64() };
    let _written_ms = fields.u64();
    Ok(BaseHeader { generation, identity, count: fields.u64() })
}

/// A base from its file's bytes, every field and the checksum verified.
pub fn decode_base(bytes: &[u8]) -> Result<Base, SnapshotError> {
    let header = decode_base_header(bytes)?;
    let expected = usize::try_from(header.count)
        .ok()
        .and_then(|n| n.checked_mul(ENTRY_LEN))
        .and_then(|n| n.checked_add(BASE_HEADER_LEN + CHECKSUM_LEN));
    if expected != Some(bytes.len()) {
        return Err(SnapshotError::Length { len: bytes.len(), expected: expected.unwrap_or(usize::MAX) });
    }
    let (body, stored) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if crc32fast::hash(body) != Fields(stored).u32() {
        return Err(SnapshotError::Checksum);
    }
    let mut fields = Fields(&bytes[BASE_HEADER_LEN - 16..]);
    let written_ms = fields.u64();
    let _count = fields.u64();
    let entries = (0..header.count).map(|_| decode_entry(&mut fields)).collect();
    Ok(Base { generation: header.generation, identity: header.identity, written_ms, entries })
}

/// A journal's header for the base of `generation`.
pub(super) fn encode_journal_header(generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(JOURNAL_HEADER_LEN);
    out.extend_from_slice(&JOURNAL_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out
}

/// One batch of entries, as appended to the journal.
#[cfg(test)]
pub(super) fn encode_batch(entries: &[CachedPhone]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN + CHECKSUM_LEN);
    write_batch(entries, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Writes one batch of `entries` to `out` as [`encode_batch`] encodes it, entry by
/// entry; returns its length in bytes.
pub(super) fn write_batch(entries: &[CachedPhone], out: &mut impl Write) -> std::io::Result<usize> {
    let mut out = Checksummed::new(out);
    out.write_all(&(entries.len() as u32).to_le_bytes())?;
    for entry in entries {
        out.write_all(&encode_entry(entry))?;
    }
    out.finish()
}

/// Passes bytes on to a writer, keeping their CRC-32 and count; `finish` appends the
/// checksum.
struct Checksummed<'w, W: Write> {
    out: &'w mut W,
    crc: crc32fast::Hasher,
    len: usize,
}

impl<'w, W: Write> Checksummed<'w, W> {
    fn new(out: &'w mut W) -> Self {
        Checksummed { out, crc: crc32fast::Hasher::new(), len: 0 }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.len += bytes.len();
        self.out.write_all(bytes)
    }

    /// Appends the checksum of everything written; the total length, checksum included.
    fn finish(self) -> std::io::Result<usize> {
        self.out.write_all(&self.crc.finalize().to_le_bytes())?;
        Ok(self.len + CHECKSUM_LEN)
    }
}

/// A decoded journal: the generation it extends, its entries in order, and whether it
/// ended in a batch that failed its check (torn by a crash: the rest is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Journal {
    pub generation: u64,
    pub entries: Vec<CachedPhone>,
    pub torn: bool,
    /// The bytes up to the end of the last whole batch.
    pub valid_len: usize,
}

pub(super) fn decode_journal(bytes: &[u8]) -> Result<Journal, SnapshotError> {
    let mut fields = versioned(bytes, &JOURNAL_MAGIC)?;
    if bytes.len() < JOURNAL_HEADER_LEN {
        return Err(SnapshotError::Length { len: bytes.len(), expected: JOURNAL_HEADER_LEN });
    }
    let generation = fields.u64();
    let mut journal = Journal { generation, entries: Vec::new(), torn: false, valid_len: JOURNAL_HEADER_LEN };
    let mut rest = &bytes[JOURNAL_HEADER_LEN..];
    while !rest.is_empty() {
        let count = Fields(rest).u32() as usize;
        let len = count.checked_mul(ENTRY_LEN).and_then(|n| n.checked_add(4 + CHECKSUM_LEN));
        let Some(batch) = len.and_then(|len| rest.get(..len)) else {
            journal.torn = true;
            break;
        };
        let (body, stored) = batch.split_at(batch.len() - CHECKSUM_LEN);
        if crc32fast::hash(body) != Fields(stored).u32() {
            journal.torn = true;
            break;
        }
        let mut fields = Fields(&body[4..]);
        journal.entries.extend((0..count).map(|_| decode_entry(&mut fields)));
        journal.valid_len += batch.len();
        rest = &rest[batch.len()..];
    }
    Ok(journal)
}

/// The magic and version check shared by both formats; the fields after them.
fn versioned<'a>(bytes: &'a [u8], magic: &[u8; 8]) -> Result<Fields<'a>, SnapshotError> {
    if bytes.len() < magic.len() + 4 || bytes[..magic.len()] != *magic {
        return Err(SnapshotError::NotASnapshot);
    }
    let mut fields = Fields(&bytes[magic.len()..]);
    let found = fields.u32();
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Version { found });
    }
    Ok(fields)
}

fn encode_entry(e: &CachedPhone) -> [u8; ENTRY_LEN] {
    let s = &e.stats;
    let mut out = [0u8; ENTRY_LEN];
    let words = [e.phone, e.expires_ms, s.records, s.up_to_10s, s.from_10_to_30s, s.over_30s];
    let (narrow, wide) = out.split_at_mut(8 * words.len());
    for (slot, word) in narrow.chunks_exact_mut(8).zip(words) {
        slot.copy_from_slice(&word.to_le_bytes());
    }
    for (slot, word) in wide.chunks_exact_mut(16).zip([s.min_ms, s.max_ms, s.total_ms, s.over_15s_total_ms]) {
        slot.copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn decode_entry(fields: &mut Fields<'_>) -> CachedPhone {
    let (phone, expires_ms) = (fields.u64(), fields.u64());
    let (records, up_to_10s, from_10_to_30s, over_30s) = (fields.u64(), fields.u64(), fields.u64(), fields.u64());
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
}

/// Reads little-endian fields in order; lengths are checked before any read (a short
/// read yields zeros rather than a panic).
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
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<CachedPhone> {
        let mut stats = CallStats::EMPTY;
        stats.record(0, 12_345);
        stats.record(i64::MIN, i64::MAX);
        vec![
            CachedPhone { phone: u64::MAX, expires_ms: 6, stats },
            CachedPhone { phone: 0, expires_ms: 7, stats: CallStats::EMPTY },
        ]
    }

    fn base() -> Base {
        Base {
            generation: 9,
            identity: DataIdentity { digest: u128::MAX - 1, len: 3, segments: 4 },
            written_ms: 5,
            entries: entries(),
        }
    }

    /// A base snapshot cut right after its magic and version is too short, not "not a
    /// snapshot": 12 bytes where the header and checksum need 8+4+8+16+16+8+8 + 4 = 72.
    #[test]
    fn a_base_cut_after_its_version_is_reported_as_too_short() {
        let mut bytes = b"RSCACHE\0".to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let short = decode_base_header(&bytes).err();
        assert!(matches!(short, Some(SnapshotError::Length { len: 12, expected: 72 })), "{short:?}");
        let cut = decode_base_header(&bytes[..11]).err();
        assert!(matches!(cut, Some(SnapshotError::NotASnapshot)), "{cut:?}");
    }

    #[test]
    fn a_base_round_trips_exactly_and_its_header_reads_alone() {
        assert_eq!(decode_base(&encode_base(&base())).unwrap(), base());
        let empty = Base { entries: vec![], ..base() };
        assert_eq!(decode_base(&encode_base(&empty)).unwrap(), empty);
        let header = decode_base_header(&encode_base(&base())).unwrap();
        assert_eq!((header.generation, header.count), (9, 2));
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_of_a_base_is_detected() {
        let bytes = encode_base(&base());
        for len in 0..bytes.len() {
            assert!(decode_base(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= bit;
                assert!(decode_base(&corrupt).is_err(), "bit {bit:#x} of byte {i}");
            }
        }
    }

    #[test]
    fn garbage_and_other_versions_are_named() {
        assert!(matches!(decode_base(b"hello world, not a snapshot"), Err(SnapshotError::NotASnapshot)));
        let mut old = encode_base(&base());
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(decode_base(&old), Err(SnapshotError::Version { found: 1 })));
    }

    /// The layout the module documents, assembled by hand field by field: a batch is its
    /// count, each entry's six u64 and four i128 little-endian, and the CRC-32 of all
    /// that; a base written through a small buffer is the same bytes as one in memory.
    #[test]
    fn a_batch_is_laid_out_as_documented_and_streams_through_any_buffer() {
        let mut expected = 1u32.to_le_bytes().to_vec();
        let e = &entries()[0];
        let s = &e.stats;
        for word in [u64::MAX, 6, 2, 0, 1, 1] {
            expected.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!((s.records, s.up_to_10s, s.from_10_to_30s, s.over_30s), (2, 0, 1, 1));
        for wide in [s.min_ms, s.max_ms, s.total_ms, s.over_15s_total_ms] {
            expected.extend_from_slice(&wide.to_le_bytes());
        }
        let crc = crc32fast::hash(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(expected.len(), 4 + 112 + 4);
        assert_eq!(encode_batch(&entries()[..1]), expected);

        let mut file = Vec::new();
        let mut small = std::io::BufWriter::with_capacity(7, &mut file);
        let len = write_base(&base(), &mut small).unwrap();
        small.flush().unwrap();
        drop(small);
        assert_eq!((len, file), (encode_base(&base()).len(), encode_base(&base())));
    }

    /// A writer that fails half-way fails the write (the caller drops the files).
    #[test]
    fn a_failing_writer_fails_the_write() {
        let mut full = [0u8; 100];
        let mut out: &mut [u8] = &mut full;
        assert!(write_base(&base(), &mut out).is_err());
        let mut out: &mut [u8] = &mut full;
        assert!(write_batch(&entries(), &mut out).is_err());
    }

    /// A journal cut anywhere keeps exactly its whole batches; a flipped bit ends it at
    /// the batch it hit.
    #[test]
    fn a_torn_journal_keeps_its_whole_batches() {
        let mut bytes = encode_journal_header(9);
        let first = encode_batch(&entries()[..1]);
        let second = encode_batch(&entries());
        bytes.extend_from_slice(&first);
        bytes.extend_from_slice(&second);
        let whole = decode_journal(&bytes).unwrap();
        assert_eq!((whole.generation, whole.entries.len(), whole.torn, whole.valid_len), (9, 3, false, bytes.len()));
        for cut in JOURNAL_HEADER_LEN..bytes.len() {
            let journal = decode_journal(&bytes[..cut]).unwrap();
            let expected = if cut < JOURNAL_HEADER_LEN + first.len() { 0 } else { 1 };
            assert_eq!(journal.entries.len(), expected, "cut at {cut}");
            assert_eq!(journal.torn, cut != JOURNAL_HEADER_LEN && cut != JOURNAL_HEADER_LEN + first.len());
        }
        let mut corrupt = bytes.clone();
        corrupt[JOURNAL_HEADER_LEN + first.len() + 9] ^= 0x10;
        let journal = decode_journal(&corrupt).unwrap();
        assert_eq!((journal.entries, journal.torn), (entries()[..1].to_vec(), true));
        assert!(matches!(decode_journal(b"RSCACHE\0\x02\0\0\0"), Err(SnapshotError::NotASnapshot)));
    }
}
