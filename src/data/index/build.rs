//! Building the phone index: one validating pass over the file, in parallel regions,
//! then the spans grouped by phone, bucket by bucket.
//!
//! The pass runs on the rayon pool: the file is cut into regions, each region after the
//! first starts speculatively at a position that looks like a record boundary, and the
//! regions are stitched in file order. A region is kept only when the region before it
//! really ended at its start; otherwise it is scanned again from the true boundary, so
//! the result (and the first error) is exactly that of a serial scan.
//!
//! While scanning, a region that has met few phones (up to `FEW_PHONES`: a call log of a
//! few hundred lines) keeps each phone's spans in a list of its own; the lists are then
//! joined phone by phone, in file order, straight into the final span table. Past that,
//! the region drops every (phone, span) it finds into the bucket of its phone (see
//! `bucket_of`), and grouping never sorts the whole file's spans: each bucket (a few
//! thousand spans, cache-sized) is gathered from the regions in file order and sorted by
//! (phone, offset) on its own, in parallel, straight into its place in the final span
//! table. On a time-ordered file of 20 M records the buckets took the build from 1.1-1.3 s
//! to under 0.6 s; the lists, which hold a span without its phone (8 bytes, not 16), took
//! its peak heap from 29 to 18 bytes a record. Both give the same index.

use super::spans::{IndexSummary, MAX_FILE_LEN, MAX_RECORD_LEN, MAX_SPAN_LEN, PhoneIndex, Span, bucket_of};
use crate::data::error::DataError;
use crate::data::scan::{self, Expected, LastPhone, Malformed, skip_ws};
use crate::platform::pool::WorkerPool;
use rayon::prelude::*;

/// Below this size the file is scanned by one thread.
const PARALLEL_MIN_LEN: usize = 4 << 20;
/// Regions per pool thread, so a slow region does not leave a core idle.
const REGIONS_PER_THREAD: usize = 4;
/// How many candidate boundaries a region tries before it gives up its speculation.
const MAX_CANDIDATES: usize = 64;
/// Buckets are sized for about this many spans each (if each record were a span).
const SPANS_PER_BUCKET: usize = 65_536;
/// At most 2^8 buckets: each region scatters its spans among them as it scans, and
/// more buckets mean more places written at random (measured on 20 M time-ordered
/// records: 2^8 buckets scan in 420-470 ms, 2^10 in 430-600, 2^12 in 450-950). Grouping
/// is linear in a bucket's size (a radix sort), so big buckets cost little there.
const MAX_BUCKET_BITS: u32 = 8;
/// The smallest record (`{"phone":0,"start_date":0,"end_date":0}`), for sizing.
const MIN_RECORD_LEN: usize = 40;

/// How a build cuts its work: into `regions` scanned in parallel, and `1 << bucket_bits`
/// buckets grouped in parallel. [`PhoneIndex::build`] derives both from the file size
/// and the pool; tests set them to drive the stitching and the buckets on small inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildShape {
    /// How many regions the file is cut into and scanned in parallel.
    pub regions: usize,
    /// log2 of the number of hash buckets phones are grouped into.
    pub bucket_bits: u32,
    /// How many phones a region keeps a list of its own for before it moves them into
    /// buckets (see `FEW_PHONES`); 0 puts every span in a bucket from the start.
    pub few_phones: usize,
}

impl BuildShape {
    /// The shape [`PhoneIndex::build`] uses for a file of `len` bytes on `threads`.
    pub fn for_file(len: usize, threads: usize) -> BuildShape {
        let regions = if len < PARALLEL_MIN_LEN { 1 } else { threads * REGIONS_PER_THREAD };
        let most_spans = len / MIN_RECORD_LEN;
        let buckets = most_spans.div_ceil(SPANS_PER_BUCKET).max(1).next_power_of_two();
        let few_phones = FEW_PHONES.min(len / regions / BYTES_PER_LISTED_PHONE);
        BuildShape { regions, bucket_bits: buckets.trailing_zeros().min(MAX_BUCKET_BITS), few_phones }
    }
}

impl PhoneIndex {
    /// Validates `bytes` as a JSON array of call records and indexes it, using the
    /// threads of `pool`.
    pub fn build(bytes: &[u8], pool: &WorkerPool) -> Result<PhoneIndex, DataError> {
        PhoneIndex::build_shaped(bytes, pool, BuildShape::for_file(bytes.len(), pool.threads().current_num_threads()))
    }

    /// [`PhoneIndex::build`] cut as `shape` says, whatever the file's size.
    pub fn build_shaped(bytes: &[u8], pool: &WorkerPool, shape: BuildShape) -> Result<PhoneIndex, DataError> {
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(DataError::FileTooLarge { len: bytes.len() as u64, max: MAX_FILE_LEN });
        }
        let bits = shape.bucket_bits.min(MAX_BUCKET_BITS);
        let open = skip_ws(bytes, 0);
        if bytes.get(open) != Some(&b'[') {
            return Err(Malformed::at(bytes, open, Expected::ArrayStart).into());
        }
        let body = skip_ws(bytes, open + 1);
        let regions = if bytes.get(body) == Some(&b']') {
            check_end(bytes, body + 1)?;
            Vec::new()
        } else {
            scan_regions(bytes, body, pool, Cut { parts: shape.regions.max(1), bits, few: shape.few_phones })?
        };
        Ok(pool.threads().install(|| group_by_phone(regions, bits)))
    }
}

/// Items in file order, in chunks that grow geometrically up to 64 Ki items (1 MiB of
/// (phone, span) items): unlike a `Vec` that doubles, growing never copies what is there
/// or holds twice the memory, and thousands of small lists stay small.
///
/// The chunk being filled is kept apart from the full ones, inline in the region's
/// array of lists: a push reads the list's own three words and writes the item, with no
/// second pointer to follow (every record of a time-ordered file is pushed to a list
/// chosen by its phone, so that load sat on the scan's critical path).
#[derive(Debug)]
struct Chunks<T> {
    current: Vec<T>,
    full: Vec<Vec<T>>,
}

impl<T> Default for Chunks<T> {
    fn default() -> Chunks<T> {
        Chunks { current: Vec::new(), full: Vec::new() }
    }
}

impl<T: Copy> Chunks<T> {
    const FIRST_CHUNK: usize = 16;
    const MAX_CHUNK: usize = 1 << 16;

    #[inline]
    fn push(&mut self, item: T) {
        if self.current.len() == self.current.capacity() {
            self.next_chunk();
        }
        self.current.push(item);
    }

    #[cold]
    #[inline(never)]
    fn next_chunk(&mut self) {
        let capacity = match self.current.capacity() {
            0 => Self::FIRST_CHUNK,
            full => (full * 2).min(Self::MAX_CHUNK),
        };
        let filled = std::mem::replace(&mut self.current, Vec::with_capacity(capacity));
        if !filled.is_empty() {
            self.full.push(filled);
        }
    }

    fn is_empty(&self) -> bool {
        self.current.is_empty() && self.full.is_empty()
    }

    fn len(&self) -> usize {
        self.chunks().map(Vec::len).sum()
    }

    /// The chunks, in file order.
    fn chunks(&self) -> impl Iterator<Item = &Vec<T>> {
        self.full.iter().chain(std::iter::once(&self.current))
    }

    /// The chunks, in file order, consumed.
    fn into_chunks(self) -> impl Iterator<Item = Vec<T>> {
        self.full.into_iter().chain(std::iter::once(self.current))
    }
}

/// (phone, span) items of one hash bucket.
type Items = Chunks<(u64, Span)>;

/// Up to this many distinct phones, a region keeps each phone's spans in a list of its
/// own (8 bytes a span) rather than each span with its phone in its phone's hash bucket
/// (16 bytes): a time-ordered file of a few hundred phones has a span per record, and
/// the memory those items take is what its build spends most on (the kernel zeroes every
/// fresh page: README, "Performance"). A region that meets more phones moves its lists
/// into buckets and goes on there (a phone book does so within its first few thousand
/// records).
const FEW_PHONES: usize = 4096;

/// A region keeps lists for at most one phone per this many bytes of it: a list costs
/// about 200 bytes however few spans it gets (its entry, its first chunk, its slot in the
/// map), so on a small region or a machine of many threads (many regions) the lists of
/// phones with a handful of records each would cost more than buckets. At one per 16 KiB
/// they cost at most about 1 % of the file's size.
const BYTES_PER_LISTED_PHONE: usize = 16 * 1024;

/// A region's spans while it has met at most [`FEW_PHONES`] phones: each phone's in file
/// order, in a list of its own.
#[derive(Debug, Default)]
struct FewPhones {
    /// The most phones it keeps lists for.
    limit: usize,
    /// Phone -> its position in `lists`.
    slots: ahash::AHashMap<u64, usize>,
    /// Each phone met and its spans, in the order the phones were met.
    lists: Vec<(u64, Chunks<Span>)>,
    /// The position of the phone pushed last (consecutive spans of one phone are common
    /// even where records alternate between a few phones).
    last: usize,
}

impl FewPhones {
    /// Adds `span` to `phone`'s list; false (and nothing added) when `phone` is new and
    /// there is no room for another list.
    #[inline]
    fn push(&mut self, (phone, span): (u64, Span)) -> bool {
        if let Some((last, list)) = self.lists.get_mut(self.last)
            && *last == phone
        {
            list.push(span);
            return true;
        }
        let slot = match self.slots.get(&phone) {
            Some(&slot) => slot,
            None if self.lists.len() >= self.limit => return false,
            None => {
                self.slots.insert(phone, self.lists.len());
                self.lists.push((phone, Chunks::default()));
                self.lists.len() - 1
            }
        };
        self.last = slot;
        self.lists[slot].1.push(span);
        true
    }

    /// The same spans as items of `1 << bits` buckets. Within a bucket they are in file
    /// order phone by phone, not across phones: grouping sorts them (`group_bucket`).
    fn into_buckets(self, bits: u32) -> Vec<Items> {
        let mut buckets: Vec<Items> = (0..1usize << bits).map(|_| Items::default()).collect();
        for (phone, list) in self.lists {
            let bucket = &mut buckets[bucket_of(phone, bits)];
            for chunk in list.into_chunks() {
                for span in chunk {
                    bucket.push((phone, span));
                }
            }
        }
        buckets
    }
}

/// Where a region puts its items.
#[derive(Debug)]
enum Sink {
    /// A list per phone, while the region has met few phones.
    Few(FewPhones),
    /// Items by hash bucket of their phone; within a bucket, in file order (but for
    /// those a region moved here from its per-phone lists, see `FewPhones::into_buckets`).
    Buckets(Vec<Items>),
}

impl Sink {
    /// Its items by bucket, whichever way they were kept.
    fn into_buckets(self, bits: u32) -> Vec<Items> {
        match self {
            Sink::Few(few) => few.into_buckets(bits),
            Sink::Buckets(buckets) => buckets,
        }
    }

    /// Its spans by phone, each phone's in file order, whichever way they were kept.
    fn into_lists(self) -> Vec<(u64, Chunks<Span>)> {
        match self {
            Sink::Few(few) => few.lists,
            Sink::Buckets(buckets) => {
                // Within a bucket each phone's items are in file order.
                let mut slots = ahash::AHashMap::new();
                let mut lists: Vec<(u64, Chunks<Span>)> = Vec::new();
                for (phone, span) in buckets.into_iter().flat_map(Items::into_chunks).flatten() {
                    let slot = *slots.entry(phone).or_insert_with(|| {
                        lists.push((phone, Chunks::default()));
                        lists.len() - 1
                    });
                    lists[slot].1.push(span);
                }
                lists
            }
        }
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

/// The records of one region.
#[derive(Debug)]
struct Region {
    /// The region's first item, kept apart: it may continue the previous region's last.
    head: Option<(u64, Span)>,
    /// Its last item (the span still open when the scan stopped), kept apart: it may go
    /// on in the next region. `None` when the region had a single item (then in `head`).
    tail: Option<(u64, Span)>,
    /// Every other item, by phone or by bucket of its phone.
    sink: Sink,
    records: u64,
    negative_durations: u64,
    end: RegionEnd,
}

impl Region {
    fn new(start: usize, few_phones: usize) -> Region {
        Region {
            head: None,
            tail: None,
            sink: Sink::Few(FewPhones { limit: few_phones, ..FewPhones::default() }),
            records: 0,
            negative_durations: 0,
            end: RegionEnd::Boundary(start),
        }
    }

    /// A finished item: the head if it is the first, else into its phone's list or
    /// bucket.
    #[inline]
    fn emit(&mut self, item: (u64, Span), bits: u32) {
        if self.head.is_none() {
            self.head = Some(item);
            return;
        }
        match &mut self.sink {
            Sink::Buckets(buckets) => buckets[bucket_of(item.0, bits)].push(item),
            Sink::Few(few) => {
                if !few.push(item) {
                    self.many_phones(item, bits);
                }
            }
        }
    }

    /// The region met more than [`FEW_PHONES`] phones: its lists become buckets, and
    /// `item` goes into its bucket.
    #[cold]
    #[inline(never)]
    fn many_phones(&mut self, item: (u64, Span), bits: u32) {
        let few = std::mem::replace(&mut self.sink, Sink::Buckets(Vec::new()));
        let mut buckets = few.into_buckets(bits);
        buckets[bucket_of(item.0, bits)].push(item);
        self.sink = Sink::Buckets(buckets);
    }
}

/// How the scan keeps what it finds: `1 << bits` buckets, and per-phone lists for up to
/// `few` phones a region (see [`BuildShape`]).
#[derive(Debug, Clone, Copy)]
struct Cut {
    parts: usize,
    bits: u32,
    few: usize,
}

/// Scans records from `start` (a record boundary) until the first record boundary at
/// or after `stop`, or the end of the array.
fn scan_region(bytes: &[u8], start: usize, stop: usize, cut: Cut) -> Result<Region, DataError> {
    let bits = cut.bits;
    let mut region = Region::new(start, cut.few);
    let mut pos = start;
    // The open span: (phone, start, end).
    let mut open: Option<(u64, usize, usize)> = None;
    let mut last = LastPhone::new();
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
                    region.emit((phone, Span::new(first, last)), bits);
                }
                Some((record.phone, pos, end))
            }
        };
        // The compact layout's separator, `,{`, is taken without scanning for whitespace.
        if bytes.get(end..end + 2) == Some(b",{") {
            pos = end + 1;
            continue;
        }
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
        let item = (phone, Span::new(first, last));
        if region.head.is_none() { region.head = Some(item) } else { region.tail = Some(item) }
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
fn scan_regions(bytes: &[u8], body: usize, pool: &WorkerPool, cut: Cut) -> Result<Vec<Region>, DataError> {
    let parts = cut.parts;
    let mut starts = vec![body];
    for k in 1..parts {
        let from = body + (bytes.len() - body) * k / parts;
        match candidate_boundary(bytes, from.max(starts[starts.len() - 1] + 1)) {
            Some(at) => starts.push(at),
            None => break,
        }
    }
    let stop_of = |k: usize| starts.get(k + 1).copied().unwrap_or(usize::MAX);
    let mut speculative: Vec<Option<Result<Region, DataError>>> = pool.threads().install(|| {
        (0..starts.len()).into_par_iter().map(|k| Some(scan_region(bytes, starts[k], stop_of(k), cut))).collect()
    });

    let mut regions = Vec::with_capacity(starts.len());
    let mut next = body;
    for (k, result) in speculative.iter_mut().enumerate() {
        let result = match result.take() {
            Some(result) if starts[k] == next => result,
            // The speculation started at a false boundary: scan from the true one.
            _ => scan_region(bytes, next, stop_of(k), cut),
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

/// The items at the regions' edges, joined where a phone's span runs on across a cut
/// (a region's last item and the next region's first are adjacent in the file), so
/// region cuts do not fragment the index. A region's first and last items are not
/// adjacent to each other when it has more (they go to the buckets): never joined.
fn join_edges(regions: &mut [Region]) -> Vec<(u64, Span)> {
    let mut edges = Vec::with_capacity(regions.len() * 2);
    // The item that ends where the next region starts.
    let mut carry: Option<(u64, Span)> = None;
    for region in regions {
        if let Some(head) = region.head.take() {
            carry = Some(match carry {
                Some(previous) => joined(previous, head).unwrap_or_else(|| {
                    edges.push(previous);
                    head
                }),
                None => head,
            });
        }
        if let Some(tail) = region.tail.take() {
            edges.extend(carry.replace(tail));
        }
    }
    edges.extend(carry);
    edges
}

/// `next` (the first item of a region) appended to `previous` (the item that ends where
/// that region starts), when it is the same phone's and the span stays within
/// [`MAX_SPAN_LEN`].
fn joined(previous: (u64, Span), next: (u64, Span)) -> Option<(u64, Span)> {
    let (phone, span) = previous;
    (phone == next.0 && next.1.end() - span.start() <= MAX_SPAN_LEN)
        .then(|| (phone, Span::new(span.start(), next.1.end())))
}

/// What grouping one bucket produced: its phones, ascending, and where each one's spans
/// start within the bucket's part of the span table.
#[derive(Debug, Default)]
struct Grouped {
    phones: Vec<u64>,
    starts: Vec<usize>,
}

/// Groups the regions' spans by phone (run on the pool): by their per-phone lists when
/// every region kept them (few phones), else bucket by bucket. Either way gives the same
/// index.
fn group_by_phone(regions: Vec<Region>, bits: u32) -> PhoneIndex {
    if regions.iter().all(|region| matches!(region.sink, Sink::Few(_))) {
        group_few(regions, bits)
    } else {
        group_buckets(regions, bits)
    }
}

/// Groups the spans of regions that kept a list per phone: each phone's lists joined in
/// file order with the items at the regions' edges (joined across cuts as `join_edges`
/// does) in their places, copied into the span table phone by phone, in parallel. No
/// span was ever stored beside its phone, and nothing is sorted but the phones.
fn group_few(regions: Vec<Region>, bits: u32) -> PhoneIndex {
    let mut summary = IndexSummary::default();
    // Each phone's spans, in file order, in pieces.
    let mut pieces: ahash::AHashMap<u64, Vec<Vec<Span>>> = ahash::AHashMap::new();
    let edge = |pieces: &mut ahash::AHashMap<u64, Vec<Vec<Span>>>, item: Option<(u64, Span)>| {
        if let Some((phone, span)) = item {
            pieces.entry(phone).or_default().push(vec![span]);
        }
    };
    // The item that ends where the next region starts.
    let mut carry: Option<(u64, Span)> = None;
    for region in regions {
        summary.records += region.records;
        summary.negative_durations += region.negative_durations;
        if let Some(head) = region.head {
            carry = Some(match carry {
                Some(previous) => joined(previous, head).unwrap_or_else(|| {
                    edge(&mut pieces, Some(previous));
                    head
                }),
                None => head,
            });
        }
        // A region with more than one item: its first can join nothing after it, and
        // comes before the rest.
        if region.tail.is_some() {
            edge(&mut pieces, carry.take());
        }
        for (phone, list) in region.sink.into_lists() {
            pieces.entry(phone).or_default().extend(list.into_chunks().filter(|chunk| !chunk.is_empty()));
        }
        if region.tail.is_some() {
            carry = region.tail;
        }
    }
    edge(&mut pieces, carry);

    let mut phones: Vec<u64> = pieces.keys().copied().collect();
    phones.sort_unstable_by_key(|&phone| (bucket_of(phone, bits), phone));
    let lists: Vec<Vec<Vec<Span>>> = phones.iter().map(|phone| pieces.remove(phone).unwrap_or_default()).collect();
    let sizes: Vec<usize> = lists.iter().map(|chunks| chunks.iter().map(Vec::len).sum()).collect();
    let mut spans = filled(sizes.iter().sum(), Span(0));
    let parts = parts_of(&mut spans, &sizes);
    lists.into_par_iter().zip(parts).for_each(|(chunks, part)| {
        let mut at = 0;
        for chunk in chunks {
            part[at..at + chunk.len()].copy_from_slice(&chunk);
            at += chunk.len();
        }
    });
    let starts = prefix_sums(sizes);
    let bucket_starts: Vec<usize> =
        (0..=1usize << bits).map(|bucket| phones.partition_point(|&phone| bucket_of(phone, bits) < bucket)).collect();
    finish(bits, bucket_starts, phones, starts, spans, summary)
}

/// Groups the regions' spans by phone, bucket by bucket in parallel.
fn group_buckets(mut regions: Vec<Region>, bits: u32) -> PhoneIndex {
    let edges = join_edges(&mut regions);
    let buckets = 1usize << bits;
    let mut summary = IndexSummary::default();
    for region in &regions {
        summary.records += region.records;
        summary.negative_durations += region.negative_durations;
    }
    // A region that kept per-phone lists moves them into buckets (in parallel: one
    // whose first part had few phones may hold millions of spans).
    let by_region: Vec<Vec<Items>> = regions.into_par_iter().map(|region| region.sink.into_buckets(bits)).collect();
    // Bucket-major: each bucket's lists from every region, in file order.
    let mut lists: Vec<Vec<Items>> = (0..buckets).map(|_| Vec::with_capacity(by_region.len())).collect();
    for region in by_region {
        for (bucket, items) in region.into_iter().enumerate() {
            if !items.is_empty() {
                lists[bucket].push(items);
            }
        }
    }
    let mut edges_by_bucket: Vec<Vec<(u64, Span)>> = vec![Vec::new(); buckets];
    for item in edges {
        edges_by_bucket[bucket_of(item.0, bits)].push(item);
    }
    let sizes: Vec<usize> = lists
        .iter()
        .zip(&edges_by_bucket)
        .map(|(lists, edges)| lists.iter().map(Items::len).sum::<usize>() + edges.len())
        .collect();
    let total: usize = sizes.iter().sum();
    let mut spans = filled(total, Span(0));
    // Each bucket writes its own, disjoint part of the span table.
    let parts = parts_of(&mut spans, &sizes);
    let grouped: Vec<Grouped> = lists
        .into_par_iter()
        .zip(edges_by_bucket)
        .zip(parts)
        .map_init(Scratch::default, |scratch, ((lists, edges), part)| group_bucket(scratch, lists, edges, part))
        .collect();
    // Joined one bucket after another, each bucket's lists freed as soon as they are
    // copied (joined in parallel, both were resident at once: a phone book's build
    // peaked 90 MiB higher, for no time this VM could tell from its noise).
    let distinct: usize = grouped.iter().map(|g| g.phones.len()).sum();
    let mut bucket_starts = Vec::with_capacity(buckets + 1);
    let mut phones = Vec::with_capacity(distinct);
    let mut starts = Vec::with_capacity(distinct + 1);
    for (bucket, offset) in grouped.into_iter().zip(prefix_sums(sizes)) {
        bucket_starts.push(phones.len());
        phones.extend_from_slice(&bucket.phones);
        starts.extend(bucket.starts.iter().map(|start| offset + start));
    }
    bucket_starts.push(phones.len());
    starts.push(spans.len());
    finish(bits, bucket_starts, phones, starts, spans, summary)
}

/// `len` copies of `value`, written in parallel (the pages of a table of hundreds of
/// megabytes are faulted in by every thread, not one).
fn filled<T: Copy + Send + Sync>(len: usize, value: T) -> Vec<T> {
    let mut table = Vec::with_capacity(len);
    rayon::iter::repeat_n(value, len).collect_into_vec(&mut table);
    table
}

/// `table` cut into consecutive parts of `sizes` (which sum to at most its length).
fn parts_of<'a, T>(mut table: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let (part, rest) = table.split_at_mut(size);
        parts.push(part);
        table = rest;
    }
    parts
}

/// 0 and the running sums of `sizes`: one longer than them.
fn prefix_sums(sizes: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut sums = vec![0];
    for size in sizes {
        sums.push(sums[sums.len() - 1] + size);
    }
    sums
}

/// The index of grouped tables, its summary completed.
fn finish(
    bits: u32,
    buckets: Vec<usize>,
    phones: Vec<u64>,
    starts: Vec<usize>,
    spans: Vec<Span>,
    mut summary: IndexSummary,
) -> PhoneIndex {
    summary.phones = phones.len();
    summary.spans = spans.len();
    let mut index = PhoneIndex {
        bucket_bits: bits,
        buckets: buckets.into(),
        phones: phones.into(),
        starts: starts.into(),
        spans: spans.into(),
        summary,
    };
    index.summary.heap_bytes = index.heap_bytes();
    index
}

/// Buffers for grouping a bucket, kept per worker thread.
#[derive(Debug, Default)]
struct Scratch {
    gathered: Vec<(u64, Span)>,
    spare: Vec<(u64, Span)>,
}

/// Orders one bucket's items by (phone, offset) into `part`. The lists are consumed (and
/// freed) as they are read.
fn group_bucket(scratch: &mut Scratch, lists: Vec<Items>, edges: Vec<(u64, Span)>, part: &mut [Span]) -> Grouped {
    // A file grouped by phone, or with few phones, gives each bucket one or a few phones
    // whose items arrive already in order: they are written straight into place.
    let in_order = || lists.iter().flat_map(|items| items.chunks().flatten()).chain(edges.iter());
    if in_order().is_sorted() {
        return write_grouped(in_order().copied(), part);
    }
    // A phone book gives a bucket thousands of phones, interleaved: gathered and sorted.
    let gathered = &mut scratch.gathered;
    gathered.clear();
    gathered.reserve(part.len());
    for items in lists {
        for chunk in items.into_chunks() {
            gathered.extend_from_slice(&chunk);
        }
    }
    gathered.extend_from_slice(&edges);
    radix_sort_by_phone(gathered, &mut scratch.spare);
    // Stable by phone: each phone's items are in file order, but for an item joined across
    // a region cut, which was gathered last.
    for run in gathered.chunk_by_mut(|a, b| a.0 == b.0) {
        if !run.is_sorted() {
            run.sort_unstable();
        }
    }
    write_grouped(gathered.iter().copied(), part)
}

/// Writes `items` (in (phone, offset) order) into `part`, noting where each phone starts.
fn write_grouped(items: impl Iterator<Item = (u64, Span)>, part: &mut [Span]) -> Grouped {
    let mut grouped = Grouped::default();
    for (i, ((phone, span), slot)) in items.zip(part.iter_mut()).enumerate() {
        if grouped.phones.last() != Some(&phone) {
            grouped.phones.push(phone);
            grouped.starts.push(i);
        }
        *slot = span;
    }
    grouped
}

/// Sorts `items` by phone, stably: least significant byte first, skipping the bytes all
/// the phones share (the leading bytes of similar numbers). Linear in the items, unlike
/// a comparison sort, which dominated grouping a phone book of millions of numbers.
fn radix_sort_by_phone(items: &mut Vec<(u64, Span)>, spare: &mut Vec<(u64, Span)>) {
    let mut counts = [[0usize; 256]; 8];
    for &(phone, _) in items.iter() {
        for (digit, count) in counts.iter_mut().enumerate() {
            count[((phone >> (8 * digit)) & 0xFF) as usize] += 1;
        }
    }
    for (digit, count) in counts.iter().enumerate() {
        if count.contains(&items.len()) {
            continue;
        }
        let mut next = [0usize; 256];
        let mut sum = 0;
        for (slot, &n) in next.iter_mut().zip(count) {
            *slot = sum;
            sum += n;
        }
        spare.clear();
        spare.resize(items.len(), (0, Span(0)));
        for &item in items.iter() {
            let byte = ((item.0 >> (8 * digit)) & 0xFF) as usize;
            spare[next[byte]] = item;
            next[byte] += 1;
        }
        std::mem::swap(items, spare);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> WorkerPool {
        WorkerPool::new("test", threads).expect("test pool")
    }

    /// A data file of one compact record per phone in `phones`, the `i`th starting at `i`
    /// and ending at `end(i)`.
    fn file_of(phones: &[u64], end: impl Fn(usize) -> usize) -> String {
        let records: Vec<String> = phones
            .iter()
            .enumerate()
            .map(|(i, phone)| format!(r#"{{"phone":{phone},"start_date":{i},"end_date":{}}}"#, end(i)))
            .collect();
        format!("[{}]", records.join(","))
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

    fn shape(regions: usize, bucket_bits: u32, few_phones: usize) -> BuildShape {
        BuildShape { regions, bucket_bits, few_phones }
    }

    /// Every table of two indexes, entry by entry.
    fn assert_same_index(a: &PhoneIndex, b: &PhoneIndex, what: &str) {
        assert_eq!(a.bucket_bits, b.bucket_bits, "{what}");
        assert_eq!(&a.buckets[..], &b.buckets[..], "{what}: buckets");
        assert_eq!(&a.phones[..], &b.phones[..], "{what}: phones");
        assert_eq!(&a.starts[..], &b.starts[..], "{what}: starts");
        assert_eq!(&a.spans[..], &b.spans[..], "{what}: spans");
        let (sa, sb) = (a.summary(), b.summary());
        assert_eq!(
            (sa.records, sa.phones, sa.spans, sa.negative_durations),
            (sb.records, sb.phones, sb.spans, sb.negative_durations),
            "{what}"
        );
    }

    /// Any cut into regions and buckets gives exactly the serial, single-bucket index:
    /// the same phones, and each phone's spans (joined across region cuts) in file order;
    /// and so does keeping spans in per-phone lists, whether every region keeps them to
    /// the end or some move them into buckets part way (`few_phones` below the phones a
    /// region meets), against the build that puts every span in a bucket.
    #[test]
    fn regions_buckets_and_per_phone_lists_never_change_the_index() {
        // Runs of one phone (joined into spans), alternations, a phone that comes back,
        // and a stretch of 500 phones met once each (where lists overflow first).
        let phones: Vec<u64> = (0..3_000)
            .map(|i: u64| match i {
                1_200..1_700 => 50_000 + i,
                _ if i % 97 < 40 => 7,
                _ => i % 13 + (i % 5) * 1_000,
            })
            .collect();
        // Every 101st record ends before it starts (counted in the summary).
        let text = file_of(&phones, |i| if i.is_multiple_of(101) { i.saturating_sub(1) } else { i + 5 });
        let serial = PhoneIndex::build_shaped(text.as_bytes(), &pool(1), shape(1, 0, 0)).unwrap();
        assert_eq!((serial.summary().records, serial.summary().negative_durations), (3_000, 29));
        for (regions, bucket_bits) in [(1, 0), (2, 1), (7, 3), (31, 12)] {
            let bucketed = PhoneIndex::build_shaped(text.as_bytes(), &pool(2), shape(regions, bucket_bits, 0)).unwrap();
            for &phone in serial.phones() {
                assert_eq!(bucketed.spans(phone), serial.spans(phone), "phone {phone}");
            }
            assert!(bucketed.spans(123_456).is_empty());
            assert_eq!(bucketed.summary().spans, serial.summary().spans, "{regions} regions, {bucket_bits} bits");
            for few_phones in [1, 40, 100, FEW_PHONES] {
                let listed =
                    PhoneIndex::build_shaped(text.as_bytes(), &pool(2), shape(regions, bucket_bits, few_phones))
                        .unwrap();
                assert_same_index(
                    &listed,
                    &bucketed,
                    &format!("{regions} regions, {bucket_bits} bits, {few_phones} lists"),
                );
            }
        }
    }

    /// Lists are kept for up to 4,096 phones a region, and for no more than one phone per
    /// 16 KiB of a region: a small file, or a file cut into many regions, lists fewer.
    #[test]
    fn the_shape_keeps_lists_for_as_many_phones_as_its_regions_pay_for() {
        let reference = BuildShape::for_file(1_309_000_002, 2);
        assert_eq!((reference.regions, reference.bucket_bits, reference.few_phones), (8, MAX_BUCKET_BITS, FEW_PHONES));
        assert_eq!(BuildShape::for_file(PARALLEL_MIN_LEN, 2).regions, 8, "parallel from 4 MiB");
        assert_eq!(BuildShape::for_file(PARALLEL_MIN_LEN - 1, 2).regions, 1);
        assert_eq!(BuildShape::for_file(80 << 20, 2).bucket_bits, 5, "2 M records at most: 32 buckets");
        assert_eq!(BuildShape::for_file(1 << 20, 2), BuildShape { regions: 1, bucket_bits: 0, few_phones: 64 });
        let many_threads = BuildShape::for_file(64 << 20, 64);
        assert_eq!((many_threads.regions, many_threads.few_phones), (256, 16));
        assert_eq!(BuildShape::for_file(100, 2).few_phones, 0);
    }

    /// A region keeps a list per phone up to its limit and moves them into buckets at
    /// the first phone past it; and a region's items, kept either way, read back as the
    /// same per-phone lists in file order.
    #[test]
    fn a_region_keeps_per_phone_lists_up_to_its_limit_then_buckets() {
        let text = file_of(&[1, 2, 1, 3, 2, 3, 1], |i| i + 1);
        let scan = |few| scan_region(text.as_bytes(), 1, usize::MAX, Cut { parts: 1, bits: 2, few }).unwrap();
        let lists = |sink: Sink| -> Vec<(u64, Vec<Span>)> {
            let mut lists: Vec<(u64, Vec<Span>)> = sink
                .into_lists()
                .into_iter()
                .map(|(phone, list)| (phone, list.into_chunks().flatten().collect()))
                .collect();
            lists.sort_by_key(|(phone, _)| *phone);
            lists
        };
        let kept = scan(3);
        let Sink::Few(few) = &kept.sink else { panic!("three phones fit three lists") };
        assert_eq!(
            few.lists.iter().map(|(phone, _)| *phone).collect::<Vec<_>>(),
            [2, 1, 3],
            "after the head, in the order met"
        );
        let moved = scan(2);
        assert!(matches!(moved.sink, Sink::Buckets(_)), "a third phone does not fit two lists");
        let listed = lists(kept.sink);
        assert_eq!(listed, lists(moved.sink), "the same spans, by phone, in file order");
        assert_eq!(
            listed.iter().map(|(phone, spans)| (*phone, spans.len())).collect::<Vec<_>>(),
            [(1, 1), (2, 2), (3, 2)]
        );
        assert!(listed.iter().all(|(_, spans)| spans.is_sorted()));
    }

    /// A run of one phone longer than a span's limit, cut by regions, stays in spans of
    /// at most [`MAX_SPAN_LEN`] (split where the cuts fall, not where a serial scan splits
    /// it: at most one more span per cut); short runs across the cuts of a file of over
    /// 1 MiB are joined exactly as a serial scan joins them.
    #[test]
    fn spans_joined_across_region_cuts_stay_within_the_span_limit() {
        let mut phones: Vec<u64> = (0..15_000u64).map(|i| if i % 50 < 30 { 7 } else { 8 + i % 3 }).collect();
        phones.extend(std::iter::repeat_n(9, 10_000));
        let text = file_of(&phones, |i| i + 5);
        assert!(text.len() > 1 << 20);
        let serial = PhoneIndex::build_shaped(text.as_bytes(), &pool(1), shape(1, 0, 0)).unwrap();
        for few_phones in [0, FEW_PHONES] {
            let cut = PhoneIndex::build_shaped(text.as_bytes(), &pool(2), shape(13, 3, few_phones)).unwrap();
            for phone in [7, 8, 10] {
                assert_eq!(cut.spans(phone), serial.spans(phone), "phone {phone}, {few_phones} lists");
            }
            let long = cut.spans(9);
            assert!(long.iter().all(|span| span.len() <= MAX_SPAN_LEN), "{few_phones} lists");
            assert!(long.len() >= 2 && long.len() <= serial.spans(9).len() + 13, "{} spans", long.len());
            assert_eq!(long.first().map(|s| s.start()), serial.spans(9).first().map(|s| s.start()));
            assert_eq!(long.last().map(|s| s.end()), serial.spans(9).last().map(|s| s.end()));
        }
    }

    #[test]
    fn a_region_whose_first_and_last_records_share_a_phone_keeps_them_apart() {
        let text = br#"[{"phone":1,"start_date":0,"end_date":1},{"phone":2,"start_date":0,"end_date":1},{"phone":1,"start_date":0,"end_date":1}]"#;
        for few_phones in [0, FEW_PHONES] {
            let index = PhoneIndex::build_shaped(text, &pool(1), shape(1, 2, few_phones)).unwrap();
            assert_eq!(index.spans(1).len(), 2, "phone 2's record lies between them");
            assert_eq!(index.spans(2).len(), 1);
        }
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
