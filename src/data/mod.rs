//! data.json: the mapped bytes, the record grammar and the phone index.
//!
//! A [`Dataset`] is one version of the data file, mapped and indexed once. It answers
//! "which byte spans hold phone P's records" and "aggregate the records in this span";
//! it does not decide what to compute or cache, and never schedules threads itself
//! beyond the pool it is handed.

mod identity;
mod index;
mod mmap;
mod number;
pub mod scan;

pub use identity::FileIdentity;
pub use index::{IndexSummary, MAX_FILE_LEN, MAX_RECORD_LEN, MAX_SPAN_LEN, PhoneIndex, Span};
pub use scan::{Expected, Field, Found, Malformed, PhonePrefix};

use crate::stats::{CallStats, Tally};
use mmap::Mapping;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a data file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed data at byte {offset}: expected {expected}, found {found}")]
    Malformed { offset: u64, expected: Expected, found: Found },
    #[error("the record at byte {offset} is {len} bytes; records over {max} bytes are not supported")]
    RecordTooLarge { offset: u64, len: usize, max: usize },
    #[error("the file is {len} bytes; files over {max} bytes are not supported")]
    FileTooLarge { len: u64, max: u64 },
}

impl From<Malformed> for DataError {
    fn from(m: Malformed) -> Self {
        DataError::Malformed { offset: m.offset as u64, expected: m.expected, found: m.found }
    }
}

/// The bytes under an index no longer match it: the file was changed in place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StaleData {
    #[error("data file was truncated or rewritten in place since it was indexed")]
    Changed,
    #[error("data file changed under the index: byte {offset} no longer holds a record of phone {phone}")]
    Mismatch { offset: u64, phone: u64 },
}

/// One version of data.json, mapped and indexed.
#[derive(Debug)]
pub struct Dataset {
    mapping: Mapping,
    index: PhoneIndex,
    path: PathBuf,
    build_time: Duration,
}

impl Dataset {
    /// Maps and indexes the file at `path` on `pool`, validating every record.
    pub fn open(path: &Path, pool: &rayon::ThreadPool) -> Result<Dataset, DataError> {
        Dataset::open_with(path, pool, None)
    }

    /// [`Dataset::open`], indexing in exactly `regions` regions when given (see
    /// [`PhoneIndex::build_in_regions`]); for tests of the parallel index build.
    #[doc(hidden)]
    pub fn open_with(path: &Path, pool: &rayon::ThreadPool, regions: Option<usize>) -> Result<Dataset, DataError> {
        let open_error = |source| DataError::Open { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(open_error)?;
        // SAFETY: the service's contract with whoever produces data.json is "replace it by
        // rename, never rewrite or truncate it in place" (README, "Data reload"). A
        // rename leaves this mapping's inode intact. Against an in-place change we can only
        // limit the damage: `Dataset::accumulate` re-checks the file length before reading
        // and every record it reads against the index, and the reload watcher notices the
        // new size or mtime and swaps in a fresh index.
        let mapping = unsafe { Mapping::new(file) }.map_err(open_error)?;
        let started = Instant::now();
        let index = match regions {
            Some(parts) => PhoneIndex::build_in_regions(mapping.bytes(), pool, parts)?,
            None => PhoneIndex::build(mapping.bytes(), pool)?,
        };
        Ok(Dataset { mapping, index, path: path.to_owned(), build_time: started.elapsed() })
    }

    pub fn index(&self) -> &PhoneIndex {
        &self.index
    }

    pub fn identity(&self) -> FileIdentity {
        self.mapping.identity()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long validating and indexing took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Whether the file still has the length it was indexed with.
    pub fn still_intact(&self) -> bool {
        self.mapping.still_intact()
    }

    /// Aggregates the records of `phone.phone()` in `span` (the prefix is computed once
    /// per phone by the caller).
    pub fn accumulate(&self, span: Span, phone: &PhonePrefix) -> Result<CallStats, StaleData> {
        let bytes = self.mapping.bytes();
        let end = span.end();
        if end > bytes.len() {
            return Err(StaleData::Changed);
        }
        let stale = |offset: usize| StaleData::Mismatch { offset: offset as u64, phone: phone.phone() };
        // Compact records go to the i64 tally; anything else to the exact aggregate.
        let mut tally = Tally::EMPTY;
        let mut other = CallStats::EMPTY;
        let mut pos = span.start();
        loop {
            let after = match phone.duration::<false>(bytes, pos) {
                Some((ms, after)) => {
                    tally.add(ms);
                    after
                }
                None => other_layout(bytes, pos, phone.phone(), &mut other).ok_or_else(|| stale(pos))?,
            };
            if after >= end {
                if after > end {
                    return Err(stale(pos));
                }
                other.merge(&tally.into());
                return Ok(other);
            }
            // Between two records of a span: `,` and maybe whitespace.
            pos = match bytes.get(after) {
                Some(b',') if bytes.get(after + 1) == Some(&b'{') => after + 1,
                _ => {
                    let comma = scan::skip_ws(bytes, after);
                    if bytes.get(comma) != Some(&b',') {
                        return Err(stale(comma));
                    }
                    scan::skip_ws(bytes, comma + 1)
                }
            };
        }
    }
}

/// A record that is not in the compact layout: parsed by the general parser into the
/// exact aggregate. Out of line, so the hot loop keeps its registers.
#[cold]
#[inline(never)]
fn other_layout(bytes: &[u8], pos: usize, phone: u64, stats: &mut CallStats) -> Option<usize> {
    match scan::general_record(bytes, pos) {
        Ok((record, after)) if record.phone == phone => {
            stats.record(record.start_date, record.end_date);
            Some(after)
        }
        _ => None,
    }
}
