//! One version of a data file: mapped read-only, validated and indexed once
//! ([`Dataset::open`]), or its index read back from its index file
//! ([`Dataset::open_persisted`]), then read span by span ([`Dataset::aggregate`]).

use super::error::DataError;
use super::identity::FileIdentity;
use super::index::{BuildShape, PhoneIndex, Span};
use super::index_files::{IndexFiles, Stored};
use super::mmap::Mapping;
use super::prefetch;
use super::scan::{self, PhonePrefix};
use super::stats::{CallStats, Tally};
use crate::platform::pool::WorkerPool;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bytes under an index no longer match it: the file was changed in place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StaleData {
    /// Its size or modification time changed.
    #[error("data file was truncated or rewritten in place since it was indexed")]
    Changed,
    /// A span no longer starts with the phone's record.
    #[error("data file changed under the index: byte {offset} no longer holds a record of phone {phone}")]
    Mismatch {
        /// The span's first byte.
        offset: u64,
        /// The phone the index has there.
        phone: u64,
    },
}

/// How a dataset's index came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOrigin {
    /// Read from its index file (see `data::index_files`).
    Loaded,
    /// Built by scanning the file: there was no index file, or none was asked for.
    Built,
    /// Built by scanning the file because its index file could not be used (why).
    Rebuilt(String),
}

/// One version of data.json, mapped and indexed.
#[derive(Debug)]
pub struct Dataset {
    /// Shared with the copy [`Dataset::with_stored_index`] makes.
    mapping: Arc<Mapping>,
    index: PhoneIndex,
    path: PathBuf,
    build_time: Duration,
    origin: IndexOrigin,
}

impl Dataset {
    /// Maps and indexes the file at `path` on `pool`, validating every record.
    pub fn open(path: &Path, pool: &WorkerPool) -> Result<Dataset, DataError> {
        Dataset::open_with(path, pool, None)
    }

    /// [`Dataset::open`], the index built in the given shape (see
    /// [`PhoneIndex::build_shaped`]); for tests of the parallel index build.
    #[doc(hidden)]
    pub fn open_with(path: &Path, pool: &WorkerPool, shape: Option<BuildShape>) -> Result<Dataset, DataError> {
        Dataset::open_from(path, pool, shape, None)
    }

    /// [`Dataset::open`], reading the index from `files` when it holds one of exactly
    /// this version of the file (validating nothing but the index file then: the file was
    /// validated when the index was built); else building it (see [`Dataset::persist`]).
    pub fn open_persisted(path: &Path, pool: &WorkerPool, files: &IndexFiles) -> Result<Dataset, DataError> {
        Dataset::open_from(path, pool, None, Some(files))
    }

    fn open_from(
        path: &Path,
        pool: &WorkerPool,
        shape: Option<BuildShape>,
        files: Option<&IndexFiles>,
    ) -> Result<Dataset, DataError> {
        let open_error = |source| DataError::Open { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(open_error)?;
        // SAFETY: the service's contract with whoever produces data.json is "replace it by
        // rename, never rewrite or truncate it in place" (README, "Data reload"). A
        // rename leaves this mapping's inode intact. Against an in-place change we can only
        // limit the damage: `compute` checks the file's size and mtime before and after it
        // reads, `Dataset::aggregate` checks every record it reads against the index, and
        // the reload watcher notices the new size or mtime and swaps in a fresh index.
        let mapping = Arc::new(unsafe { Mapping::new(file) }.map_err(open_error)?);
        let started = Instant::now();
        let origin = match files.map(|files| files.load(path, &mapping.identity())) {
            Some(Stored::Index(index)) => {
                let build_time = started.elapsed();
                return Ok(Dataset { mapping, index, path: path.to_owned(), build_time, origin: IndexOrigin::Loaded });
            }
            Some(Stored::Refused(why)) => IndexOrigin::Rebuilt(why.to_string()),
            Some(Stored::Missing) | None => IndexOrigin::Built,
        };
        let index = match shape {
            Some(shape) => PhoneIndex::build_shaped(mapping.bytes(), pool, shape)?,
            None => PhoneIndex::build(mapping.bytes(), pool)?,
        };
        Ok(Dataset { mapping, index, path: path.to_owned(), build_time: started.elapsed(), origin })
    }

    /// How its index came to be.
    pub fn index_origin(&self) -> &IndexOrigin {
        &self.origin
    }

    /// Stores its index in `files` unless it was read from there; true when written.
    pub fn persist(&self, files: &IndexFiles) -> std::io::Result<bool> {
        if self.origin == IndexOrigin::Loaded {
            return Ok(false);
        }
        files.save(&self.path, &self.mapping.identity(), &self.index).map(|()| true)
    }

    /// The same file, its index read in place from its index file in `files` instead of
    /// the copy built here; `None` when the index was read from there already, or the
    /// file does not hold exactly this version of the data (it is checked as at startup).
    ///
    /// A built index lives on the heap (285 MiB for a 20 M-record phone book), and an
    /// allocator keeps much of what a build freed around it; a stored one is mapped from
    /// the page cache. So once the built index is stored, serving this copy instead
    /// makes a first start's memory that of every later start.
    pub fn with_stored_index(&self, files: &IndexFiles) -> Option<Dataset> {
        if self.origin == IndexOrigin::Loaded {
            return None;
        }
        let Stored::Index(index) = files.load(&self.path, &self.mapping.identity()) else { return None };
        Some(Dataset {
            mapping: Arc::clone(&self.mapping),
            index,
            path: self.path.clone(),
            build_time: self.build_time,
            origin: IndexOrigin::Loaded,
        })
    }

    /// The spans of each of `phones`, looked up side by side
    /// ([`PhoneIndex::spans_of_each`]), the first records of each already loading (the
    /// caller is about to read them).
    pub fn spans_of_each(&self, phones: &[u64]) -> Vec<&[Span]> {
        let found = self.index.spans_of_each(phones);
        let bytes = self.mapping.bytes();
        for spans in &found {
            for span in spans.iter().take(READ_AHEAD) {
                prefetch::bytes(bytes, span.start());
            }
        }
        found
    }

    /// Its index.
    pub fn index(&self) -> &PhoneIndex {
        &self.index
    }

    /// The file's identity as it was mapped.
    pub fn identity(&self) -> FileIdentity {
        self.mapping.identity()
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long validating and indexing took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Whether the file still has the size and modification time it was indexed with
    /// (one `fstat`; a file rewritten in place keeps neither).
    pub fn still_intact(&self) -> bool {
        self.mapping.still_intact()
    }

    /// Aggregates the records of `phone.phone()` in `spans` (the prefix is computed once
    /// per phone by the caller).
    ///
    /// On a file grouped by phone a span holds thousands of records; on a time-ordered
    /// one each record is a span of its own, somewhere in a gigabyte, and reading it is a
    /// cache and TLB miss. So the records [`READ_AHEAD`] spans ahead are prefetched while
    /// this one is parsed: the misses overlap instead of waiting one at a time.
    ///
    /// The binaries are built for the architecture's baseline, so they run on any x86-64
    /// CPU; this loop alone is also compiled for AVX2 and chosen at run time when the CPU
    /// has it (it is ~9 % faster so: README, "Build and CPU support").
    pub fn aggregate(&self, spans: &[Span], phone: &PhonePrefix) -> Result<CallStats, StaleData> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `aggregate_avx2` may only run on a CPU with AVX2, and this one has
            // it (detected just above; std caches the answer).
            return unsafe { self.aggregate_avx2(spans, phone) };
        }
        self.aggregate_here(spans, phone)
    }

    /// [`Dataset::aggregate`] compiled with AVX2 enabled.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn aggregate_avx2(&self, spans: &[Span], phone: &PhonePrefix) -> Result<CallStats, StaleData> {
        self.aggregate_here(spans, phone)
    }

    /// The aggregation loop, inlined into each variant so each is compiled for its CPU.
    #[inline(always)]
    fn aggregate_here(&self, spans: &[Span], phone: &PhonePrefix) -> Result<CallStats, StaleData> {
        let bytes = self.mapping.bytes();
        // Compact records go to the i64 tally; anything else to the exact aggregate.
        let mut tally = Tally::EMPTY;
        let mut other = CallStats::EMPTY;
        for (i, &span) in spans.iter().enumerate() {
            if let Some(ahead) = spans.get(i + READ_AHEAD) {
                prefetch::bytes(bytes, ahead.start());
            }
            if tally.records() > Tally::MAX_RECORDS / 2 {
                other.merge(&std::mem::replace(&mut tally, Tally::EMPTY).into());
            }
            accumulate_span(bytes, span, phone, &mut tally, &mut other)?;
        }
        other.merge(&tally.into());
        Ok(other)
    }
}

/// How many spans ahead [`Dataset::aggregate`] prefetches: enough misses in flight to
/// cover memory latency, few enough to stay in the L1 cache.
pub const READ_AHEAD: usize = 16;

/// Adds the records of `phone` in `span` to `tally` (compact ones) and `other` (the rest).
#[inline(always)]
fn accumulate_span(
    bytes: &[u8],
    span: Span,
    phone: &PhonePrefix,
    tally: &mut Tally,
    other: &mut CallStats,
) -> Result<(), StaleData> {
    let end = span.end();
    if end > bytes.len() {
        return Err(StaleData::Changed);
    }
    let stale = |offset: usize| StaleData::Mismatch { offset: offset as u64, phone: phone.phone() };
    let mut pos = span.start();
    loop {
        let after = match phone.duration::<false>(bytes, pos) {
            Some((ms, after)) => {
                tally.add(ms);
                after
            }
            None => other_layout(bytes, pos, phone.phone(), other).ok_or_else(|| stale(pos))?,
        };
        if after >= end {
            if after > end {
                return Err(stale(pos));
            }
            return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A phone with more compact records than one i64 tally may hold (2^19 of the
    /// longest durations would overflow it) is still summed exactly: the loop moves the
    /// tally into the exact aggregate before it fills. One record's span, repeated, stands
    /// for a phone with a million calls.
    #[test]
    fn a_million_of_the_longest_calls_are_summed_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        // The longest call two thirteen-digit dates can describe (the compact layout).
        let (start, end) = (1_000_000_000_000_i64, 9_999_999_999_999_i64);
        let longest = end - start;
        // Spaces after it: the last bytes of a file take the general path.
        let padding = " ".repeat(256);
        std::fs::write(&path, format!(r#"[{{"phone":5,"start_date":{start},"end_date":{end}}}{padding}]"#)).unwrap();
        let pool = WorkerPool::new("test", 1).unwrap();
        let dataset = Dataset::open(&path, &pool).unwrap();
        let calls = (Tally::MAX_RECORDS * 2 + 1) as usize;
        let spans = vec![dataset.index().spans(5)[0]; calls];
        let prefix = PhonePrefix::new(5);
        assert!(prefix.duration::<true>(dataset.mapping.bytes(), spans[0].start()).is_some(), "a compact record");
        let stats = dataset.aggregate_here(&spans, &prefix).unwrap();
        assert_eq!(stats.records, calls as u64);
        assert_eq!(stats.total_ms, i128::from(longest) * calls as i128);
        assert_eq!(stats.over_15s_total_ms, stats.total_ms);
        assert_eq!((stats.over_30s, stats.up_to_10s), (calls as u64, 0));
        assert_eq!((stats.min_ms, stats.max_ms), (longest as i128, longest as i128));
    }

    /// The AVX2 build of the loop and the baseline one agree on every span, compact
    /// records and others alike. On a CPU without AVX2 there is nothing to compare: the
    /// test says it was skipped rather than compare the baseline with itself.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_and_the_baseline_loops_agree() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2, so only the baseline loop exists");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        let mut bytes = crate::data::testdata::records(7, 3_000, true);
        bytes.truncate(bytes.iter().rposition(|&b| b == b']').unwrap());
        bytes.extend_from_slice(br#", { "end_date": 30001, "x": [1, {"y": "}"}], "phone": 3, "start_date": 0 }]"#);
        std::fs::write(&path, &bytes).unwrap();
        let pool = WorkerPool::new("test", 2).unwrap();
        let dataset = Dataset::open(&path, &pool).unwrap();
        let mut checked = 0;
        for &phone in dataset.index().phones() {
            let prefix = PhonePrefix::new(phone);
            let spans = dataset.index().spans(phone);
            for split in [1, 3, spans.len().max(1)] {
                for part in spans.chunks(split) {
                    // SAFETY: this CPU has AVX2 (checked above).
                    let avx2 = unsafe { dataset.aggregate_avx2(part, &prefix) }.unwrap();
                    assert_eq!(avx2, dataset.aggregate_here(part, &prefix).unwrap(), "phone {phone}");
                    assert_eq!(avx2, dataset.aggregate(part, &prefix).unwrap(), "the dispatch takes the AVX2 loop");
                    checked += avx2.records;
                }
            }
        }
        assert_eq!(checked, 3 * (7 * 3_000 + 1));
    }
}
