//! The phone index: phone -> byte spans of its records, built by one validating pass.
//!
//! A span covers consecutive records of one phone (the separators between them
//! included), capped at [`MAX_SPAN_LEN`] bytes so that one phone's records can be
//! aggregated by several threads. The index holds offsets only; it never borrows the
//! bytes it was built from.
//!
//! The pass runs on the rayon pool: the file is cut into regions, each region after the
//! first starts speculatively at a position that looks like a record boundary, and the
//! regions are stitched in file order. A region is kept only when the region before it
//! really ended at its start; otherwise it is scanned again from the true boundary, so
//! the result (and the first error) is exactly that of a serial scan.
//!
//! Memory: each span is 8 bytes (40-bit offset, 24-bit length) and each phone about
//! 40 bytes in the hash table. While building, each span also carries its phone
//! (16 bytes). A sorted file has about one span per 256 KiB; in the worst case (no two
//! consecutive records share a phone) there is one span per record, so the index is
//! 8 bytes per record plus 40 per phone, and the build peaks at about 24 bytes per
//! record plus 40 per phone.

use super::DataError;
use super::scan::{self, Expected, Malformed, PhonePrefix, skip_ws};
use rayon::prelude::*;

/// Consecutive records of one phone are merged into one span up to this many bytes:
/// the unit of parallel work when aggregating.
pub const MAX_SPAN_LEN: usize = 256 * 1024;
const LEN_BITS: u32 = 24;
/// The largest single record the index can describe.
pub const MAX_RECORD_LEN: usize = (1 << LEN_BITS) - 1;
/// The largest file the 40-bit offsets can describe (1 TiB).
pub const MAX_FILE_LEN: u64 = 1 << 40;
/// Below this size the file is scanned by one thread.
const PARALLEL_MIN_LEN: usize = 4 << 20;
/// Regions per pool thread, so a slow region does not leave a core idle.
const REGIONS_PER_THREAD: usize = 4;
/// How many candidate boundaries a region tries before it gives up its speculation.
const MAX_CANDIDATES: usize = 64;

/// Byte range of one or more consecutive records of one phone, packed in 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(u64);

impl Span {
    fn new(start: usize, end: usize) -> Span {
        debug_assert!(end - start <= MAX_RECORD_LEN && (start as u64) < MAX_FILE_LEN);
        Span(((start as u64) << LEN_BITS) | (end - start) as u64)
    }

    pub fn start(self) -> usize {
        (self.0 >> LEN_BITS) as usize
    }

    pub fn len(self) -> usize {
        (self.0 & ((1 << LEN_BITS) - 1)) as usize
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    pub fn end(self) -> usize {
        self.start() + self.len()
    }
}

/// Figures about an index, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSummary {
    pub records: u64,
    pub phones: usize,
    pub spans: usize,
    /// Records with `end_date < start_date` (kept, reported as a startup warning).
    pub negative_durations: u64,
    /// Heap held by the index (capacity, not length).
    pub heap_bytes: usize,
}

/// Phone -> spans of its records, in file order: a sorted phone table over a span table
/// (compressed-sparse-row layout; 16 bytes per phone, 8 per span, no hashing overhead).
#[derive(Debug)]
pub struct PhoneIndex {
    /// Every phone with records, ascending.
    phones: Vec<u64>,
    /// `spans[starts[i]..starts[i + 1]]` are the spans of `phones[i]`; one longer than
    /// `phones`.
    starts: Vec<usize>,
    /// Grouped by phone; within a phone, in file order.
    spans: Vec<Span>,
    summary: IndexSummary,
}

impl PhoneIndex {
    /// Validates `bytes` as a JSON array of call records and indexes it, using the
    /// threads of `pool`.
    pub fn build(bytes: &[u8], pool: &rayon::ThreadPool) -> Result<PhoneIndex, DataError> {
        let parts = if bytes.len() < PARALLEL_MIN_LEN { 1 } else { pool.current_num_threads() * REGIONS_PER_THREAD };
        PhoneIndex::build_in_regions(bytes, pool, parts)
    }

    /// [`PhoneIndex::build`] with the file cut into (at most) `parts` regions, whatever
    /// its size: lets tests drive the speculative stitching on small inputs.
    pub fn build_in_regions(bytes: &[u8], pool: &rayon::ThreadPool, parts: usize) -> Result<PhoneIndex, DataError> {
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(DataError::FileTooLarge { len: bytes.len() as u64, max: MAX_FILE_LEN });
        }
        let open = skip_ws(bytes, 0);
        if bytes.get(open) != Some(&b'[') {
            return Err(Malformed::at(bytes, open, Expected::ArrayStart).into());
        }
        let body = skip_ws(bytes, open + 1);
        let regions = if bytes.get(body) == Some(&b']') {
            check_end(bytes, body + 1)?;
            Vec::new()
        } else {
            scan_regions(bytes, body, pool, parts.max(1))?
        };
        Ok(pool.install(|| group_by_phone(regions)))
    }

    /// The spans of `phone`'s records (empty when it has none).
    pub fn spans(&self, phone: u64) -> &[Span] {
        let Ok(i) = self.phones.binary_search(&phone) else {
            return &[];
        };
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&first), Some(&end)) => self.spans.get(first..end).unwrap_or(&[]),
            _ => &[],
        }
    }

    pub fn summary(&self) -> IndexSummary {
        self.summary
    }

    /// Every indexed phone, ascending.
    pub fn phones(&self) -> &[u64] {
        &self.phones
    }
}

/// A region's (phone, span) items in file order, in fixed-size chunks: unlike a `Vec`
/// that doubles, growing never holds twice the memory or copies what is there, which
/// bounds the build's peak for files with one span per record.
#[derive(Debug, Default)]
struct Items {
    chunks: Vec<Vec<(u64, Span)>>,
}

impl Items {
    /// 64 Ki items (1 MiB) per chunk.
    const CHUNK: usize = 1 << 16;

    fn push(&mut self, item: (u64, Span)) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < Items::CHUNK => chunk.push(item),
            _ => {
                let mut chunk = Vec::with_capacity(if self.chunks.is_empty() { 16 } else { Items::CHUNK });
                chunk.push(item);
                self.chunks.push(chunk);
            }
        }
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn first(&self) -> Option<&(u64, Span)> {
        self.chunks.first()?.first()
    }

    fn last_mut(&mut self) -> Option<&mut (u64, Span)> {
        self.chunks.last_mut()?.last_mut()
    }
}

/// How a region's scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionEnd {
    /// At the start of the first record at or after the region's stop position.
    Boundary(usize),
    /// Just after the array's closing `]`.
    ArrayEnd(usize),
}

/// The records of one region, in file order.
#[derive(Debug)]
struct Region {
    /// (phone, span) in file order; consecutive records of a phone already merged.
    items: Items,
    /// Set when the first item was merged into the previous region's last one.
    first_merged: bool,
    records: u64,
    negative_durations: u64,
    end: RegionEnd,
}

impl Region {
    /// Whether an item still stands on its own after merging across regions.
    fn has_live_items(&self) -> bool {
        self.items.len() > usize::from(self.first_merged)
    }
}

/// Scans records from `start` (a record boundary) until the first record boundary at
/// or after `stop`, or the end of the array.
fn scan_region(bytes: &[u8], start: usize, stop: usize) -> Result<Region, DataError> {
    let mut region = Region {
        items: Items::default(),
        first_merged: false,
        records: 0,
        negative_durations: 0,
        end: RegionEnd::Boundary(start),
    };
    let mut pos = start;
    // The open span: (phone, start, end).
    let mut open: Option<(u64, usize, usize)> = None;
    // Records are usually grouped by phone: try the previous record's phone first.
    let mut last = PhonePrefix::new(0);
    loop {
        if pos >= stop {
            region.end = RegionEnd::Boundary(pos);
            break;
        }
        let (record, end) = scan::index_record(bytes, pos, &mut last)?;
        if end - pos > MAX_RECORD_LEN {
            return Err(DataError::RecordTooLarge { offset: pos as u64, len: end - pos, max: MAX_RECORD_LEN });
        }
        region.records += 1;
        region.negative_durations += u64::from(record.negative);
        open = match open {
            Some((phone, first, _)) if phone == record.phone && end - first <= MAX_SPAN_LEN => {
                Some((phone, first, end))
            }
            previous => {
                if let Some((phone, first, last)) = previous {
                    region.items.push((phone, Span::new(first, last)));
                }
                Some((record.phone, pos, end))
            }
        };
        pos = skip_ws(bytes, end);
        match bytes.get(pos) {
            Some(b',') => pos = skip_ws(bytes, pos + 1),
            Some(b']') => {
                region.end = RegionEnd::ArrayEnd(pos + 1);
                break;
            }
            _ => return Err(Malformed::at(bytes, pos, Expected::CommaOrArrayEnd).into()),
        }
    }
    if let Some((phone, first, last)) = open {
        region.items.push((phone, Span::new(first, last)));
    }
    Ok(region)
}

/// Only whitespace may follow the array.
fn check_end(bytes: &[u8], after_array: usize) -> Result<(), DataError> {
    let pos = skip_ws(bytes, after_array);
    if pos != bytes.len() {
        return Err(Malformed::at(bytes, pos, Expected::EndOfInput).into());
    }
    Ok(())
}

/// Scans the array body from `body` (the first record) in parallel regions and returns
/// them in file order, each starting where the previous one really ended.
fn scan_regions(bytes: &[u8], body: usize, pool: &rayon::ThreadPool, parts: usize) -> Result<Vec<Region>, DataError> {
    let mut starts = vec![body];
    for k in 1..parts {
        let from = body + (bytes.len() - body) * k / parts;
        match candidate_boundary(bytes, from.max(starts[starts.len() - 1] + 1)) {
            Some(at) => starts.push(at),
            None => break,
        }
    }
    let stop_of = |k: usize| starts.get(k + 1).copied().unwrap_or(usize::MAX);
    let mut speculative: Vec<Option<Result<Region, DataError>>> = pool.install(|| {
        (0..starts.len()).into_par_iter().map(|k| Some(scan_region(bytes, starts[k], stop_of(k)))).collect()
    });

    let mut regions = Vec::with_capacity(starts.len());
    let mut next = body;
    for (k, result) in speculative.iter_mut().enumerate() {
        let result = match result.take() {
            Some(result) if starts[k] == next => result,
            // The speculation started at a false boundary: scan from the true one.
            _ => scan_region(bytes, next, stop_of(k)),
        };
        let region = result?;
        let end = region.end;
        regions.push(region);
        match end {
            RegionEnd::Boundary(at) => next = at,
            RegionEnd::ArrayEnd(after) => {
                check_end(bytes, after)?;
                return Ok(regions);
            }
        }
    }
    // The last region stops only at the end of the array or an error.
    unreachable_boundary(bytes, next)
}

/// The last region is scanned with no stop position, so it cannot end at a boundary;
/// kept as an error rather than a panic in case that invariant is ever broken.
#[cold]
fn unreachable_boundary(bytes: &[u8], at: usize) -> Result<Vec<Region>, DataError> {
    Err(Malformed::at(bytes, at, Expected::CommaOrArrayEnd).into())
}

/// The first position at or after `from` that looks like a record boundary
/// (`}` ws `,` ws `{`) and where a record parses. A guess: the stitching checks it.
fn candidate_boundary(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    for _ in 0..MAX_CANDIDATES {
        at += bytes.get(at..)?.iter().position(|&b| b == b'{')?;
        let before = |mut i: usize| {
            while i > 0 && matches!(bytes[i - 1], b' ' | b'\n' | b'\r' | b'\t') {
                i -= 1;
            }
            i.checked_sub(1).map(|j| (j, bytes[j]))
        };
        let looks_like_boundary = match before(at) {
            Some((comma, b',')) => matches!(before(comma), Some((_, b'}'))),
            _ => false,
        };
        if looks_like_boundary && scan::record(bytes, at).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Groups the regions' spans by phone. Sorting (phone, span) pairs in place keeps file
/// order within a phone (span offsets increase through the file) and needs no memory
/// beyond the pairs themselves; the build's peak is 16 bytes per span for the pairs
/// plus the 8 per span and 16 per phone of the finished index.
fn group_by_phone(mut regions: Vec<Region>) -> PhoneIndex {
    merge_across_regions(&mut regions);
    let mut summary = IndexSummary::default();
    let total = regions.iter().map(|r| r.items.len() - usize::from(r.first_merged)).sum();
    let mut items: Vec<(u64, Span)> = Vec::with_capacity(total);
    for region in regions {
        summary.records += region.records;
        summary.negative_durations += region.negative_durations;
        let skip = usize::from(region.first_merged);
        // Chunks are dropped as they are copied, so the pairs exist about once.
        for (k, chunk) in region.items.chunks.into_iter().enumerate() {
            items.extend_from_slice(&chunk[if k == 0 { skip } else { 0 }..]);
        }
    }
    items.par_sort_unstable_by_key(|&(phone, span)| (u128::from(phone) << 64) | u128::from(span.0));
    let distinct = items.windows(2).filter(|pair| pair[0].0 != pair[1].0).count() + usize::from(!items.is_empty());
    let mut phones = Vec::with_capacity(distinct);
    let mut starts = Vec::with_capacity(distinct + 1);
    let mut spans = Vec::with_capacity(items.len());
    for (i, &(phone, span)) in items.iter().enumerate() {
        if phones.last() != Some(&phone) {
            phones.push(phone);
            starts.push(i);
        }
        spans.push(span);
    }
    starts.push(spans.len());
    summary.phones = phones.len();
    summary.spans = spans.len();
    summary.heap_bytes = spans.capacity() * size_of::<Span>()
        + phones.capacity() * size_of::<u64>()
        + starts.capacity() * size_of::<usize>();
    PhoneIndex { phones, starts, spans, summary }
}

/// Merges the last span of a region with the first of the next when both belong to one
/// phone and fit in one span, so region cuts do not fragment the index.
fn merge_across_regions(regions: &mut [Region]) {
    for k in 1..regions.len() {
        let (before, after) = regions.split_at_mut(k);
        let previous = &mut before[k - 1];
        // A region whose only item was merged into its predecessor has no live last item.
        if !previous.has_live_items() {
            continue;
        }
        let (Some(last), Some(first)) = (previous.items.last_mut(), after[0].items.first()) else {
            continue;
        };
        if last.0 == first.0 && first.1.end() - last.1.start() <= MAX_SPAN_LEN {
            last.1 = Span::new(last.1.start(), first.1.end());
            after[0].first_merged = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("test pool")
    }

    fn malformed(text: &[u8]) -> (u64, Expected) {
        match PhoneIndex::build(text, &pool(2)) {
            Err(DataError::Malformed { offset, expected, .. }) => (offset, expected),
            other => panic!("expected a malformed-data error, got {other:?}"),
        }
    }

    #[test]
    fn span_packs_offset_and_length() {
        let span = Span::new((1 << 39) + 5, (1 << 39) + 5 + MAX_RECORD_LEN);
        assert_eq!((span.start(), span.len()), ((1 << 39) + 5, MAX_RECORD_LEN));
    }

    #[test]
    fn empty_array_is_valid_and_empty() {
        for text in ["[]", " [ \n ] \n"] {
            let index = PhoneIndex::build(text.as_bytes(), &pool(1)).expect("valid");
            assert_eq!(index.summary().records, 0);
            assert!(index.spans(0).is_empty());
        }
    }

    #[test]
    fn consecutive_records_of_a_phone_share_one_span() {
        let text = br#"[{"phone":1,"start_date":0,"end_date":1}, {"phone":1,"start_date":0,"end_date":2},{"phone":2,"start_date":0,"end_date":3},{"phone":1,"start_date":5,"end_date":1}]"#;
        let index = PhoneIndex::build(text, &pool(1)).expect("valid");
        let spans = index.spans(1);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            &text[spans[0].start()..spans[0].end()],
            br#"{"phone":1,"start_date":0,"end_date":1}, {"phone":1,"start_date":0,"end_date":2}"#
        );
        let summary = index.summary();
        assert_eq!((summary.records, summary.phones, summary.spans, summary.negative_durations), (4, 2, 3, 1));
    }

    #[test]
    fn file_level_errors_name_offset_and_expectation() {
        assert_eq!(malformed(b""), (0, Expected::ArrayStart));
        assert_eq!(malformed(b"hello"), (0, Expected::ArrayStart));
        assert_eq!(malformed(br#"  {"phone":1,"start_date":0,"end_date":1}"#), (2, Expected::ArrayStart));
        assert_eq!(malformed(b"[1]"), (1, Expected::Record));
        assert_eq!(malformed(br#"[{"phone":1,"start_date":0,"end_date":1},]"#), (41, Expected::Record));
        assert_eq!(malformed(br#"[{"phone":1,"start_date":0,"end_date":1} x"#), (41, Expected::CommaOrArrayEnd));
        assert_eq!(malformed(br#"[{"phone":1,"start_date":0,"end_date":1}"#), (40, Expected::CommaOrArrayEnd));
        assert_eq!(malformed(br#"[{"phone":1,"start_date":0,"end_date":1}] []"#), (42, Expected::EndOfInput));
        assert_eq!(malformed(b"["), (1, Expected::Record));
    }
}
