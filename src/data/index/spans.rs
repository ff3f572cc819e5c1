//! The index as it is kept: its layout, limits and lookups (the module documentation of
//! `index` says why it looks so); `build` makes one, `store` reads one back.

use super::table::{Table, Word};
use crate::data::prefetch;

/// Consecutive records of one phone are merged into one span up to this many bytes:
/// the unit of parallel work when aggregating.
pub const MAX_SPAN_LEN: usize = 256 * 1024;
const LEN_BITS: u32 = 24;
/// The largest single record the index can describe.
pub const MAX_RECORD_LEN: usize = (1 << LEN_BITS) - 1;
/// The largest file the 40-bit offsets can describe (1 TiB).
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// Byte range of one or more consecutive records of one phone, packed in 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Span(pub(super) u64);

// SAFETY: `Span` is `repr(transparent)` over a `u64`: 8 bytes, valid for any bits.
unsafe impl Word for Span {}

impl Span {
    pub(super) fn new(start: usize, end: usize) -> Span {
        debug_assert!(end - start <= MAX_RECORD_LEN && (start as u64) < MAX_FILE_LEN);
        Span(((start as u64) << LEN_BITS) | (end - start) as u64)
    }

    /// The first byte.
    pub fn start(self) -> usize {
        (self.0 >> LEN_BITS) as usize
    }

    /// Its length in bytes.
    pub fn len(self) -> usize {
        (self.0 & ((1 << LEN_BITS) - 1)) as usize
    }

    /// Whether it holds no byte.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// One past the last byte.
    pub fn end(self) -> usize {
        self.start() + self.len()
    }
}

/// Figures about an index, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSummary {
    /// Records in the file.
    pub records: u64,
    /// Distinct phones.
    pub phones: usize,
    /// Runs of consecutive records of one phone.
    pub spans: usize,
    /// Records with `end_date < start_date` (kept, reported as a startup warning).
    pub negative_durations: u64,
    /// Heap held by the index (capacity, not length).
    pub heap_bytes: usize,
}

/// Phone -> spans of its records, in file order.
#[derive(Debug)]
pub struct PhoneIndex {
    /// log2 of the number of buckets.
    pub(super) bucket_bits: u32,
    /// `phones[buckets[b]..buckets[b + 1]]` are the phones of bucket `b`; one longer
    /// than the number of buckets.
    pub(super) buckets: Table<usize>,
    /// Every phone with records: by bucket, ascending within a bucket.
    pub(super) phones: Table<u64>,
    /// `spans[starts[i]..starts[i + 1]]` are the spans of `phones[i]`; one longer than
    /// `phones`.
    pub(super) starts: Table<usize>,
    /// Grouped by phone; within a phone, in file order.
    pub(super) spans: Table<Span>,
    pub(super) summary: IndexSummary,
}

/// The position of `phone` in `phones` (ascending), by interpolation: a bucket holds
/// phones spread over the whole number range (a hash chose them), so the position is
/// well predicted by the value, and a few probes replace a binary search's dozen cache
/// misses on a bucket of 30,000 phones. Skewed values only make it fall back sooner to
/// the binary search it ends with.
#[inline]
fn find(phones: &[u64], phone: u64) -> Option<usize> {
    let (mut low, mut high) = (0usize, phones.len());
    for _ in 0..4 {
        if high - low <= SHORT_RUN {
            break;
        }
        if phone < phones[low] || phone > phones[high - 1] {
            return None;
        }
        let guess = interpolate(&phones[low..high], phone) + low;
        match phones[guess].cmp(&phone) {
            std::cmp::Ordering::Equal => return Some(guess),
            std::cmp::Ordering::Less => low = guess + 1,
            std::cmp::Ordering::Greater => high = guess,
        }
    }
    phones[low..high].binary_search(&phone).ok().map(|i| low + i)
}

/// Below this many phones [`find`] goes straight to a binary search.
const SHORT_RUN: usize = 32;

/// Where in `phones` (ascending, `phones[0] <= phone <= phones[last]`) `phone` would be
/// if the values were spread evenly.
#[inline]
fn interpolate(phones: &[u64], phone: u64) -> usize {
    let (first, last) = (phones[0], phones[phones.len() - 1]);
    let width = u128::from(last - first).max(1);
    ((u128::from(phone - first) * (phones.len() - 1) as u128) / width) as usize
}

/// The first position of `phones` [`find`] reads after its ends, if any: its first
/// interpolation guess, or the middle of a short run.
#[inline]
fn first_probe(phones: &[u64], phone: u64) -> Option<usize> {
    match phones {
        [] => None,
        short if short.len() <= SHORT_RUN => Some(short.len() / 2),
        [first, .., last] if (*first..=*last).contains(&phone) => Some(interpolate(phones, phone)),
        _ => None,
    }
}

/// How many phones [`PhoneIndex::spans_of_each`] looks up side by side: enough misses
/// in flight to cover memory latency (a CPU tracks 10-20), few enough to stay in L1.
const LOOKUPS_SIDE_BY_SIDE: usize = 16;

/// The bucket of `phone` among `1 << bits` (Fibonacci hashing: consecutive numbers, the
/// usual shape of a phone book, spread evenly).
#[inline]
pub(super) fn bucket_of(phone: u64, bits: u32) -> usize {
    if bits == 0 { 0 } else { (phone.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize }
}

impl PhoneIndex {
    /// The spans of `phone`'s records (empty when it has none).
    pub fn spans(&self, phone: u64) -> &[Span] {
        let bucket = bucket_of(phone, self.bucket_bits);
        let (Some(&first), Some(&end)) = (self.buckets.get(bucket), self.buckets.get(bucket + 1)) else {
            return &[];
        };
        let Some(i) = self.phones.get(first..end).and_then(|phones| find(phones, phone)) else {
            return &[];
        };
        match (self.starts.get(first + i), self.starts.get(first + i + 1)) {
            (Some(&from), Some(&to)) => self.spans.get(from..to).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The spans of each of `phones`, as [`PhoneIndex::spans`] gives them, with the
    /// phones looked up side by side: a lookup in the index of a phone book is a chain of
    /// four or five dependent cache misses (bucket, the bucket's ends, the probed phone,
    /// its span range, its spans), so each step is taken for every phone, its memory
    /// prefetched, before the next step: the misses of ten phones then wait together
    /// rather than one after another (a task's phones are looked up so on a miss).
    pub fn spans_of_each(&self, phones: &[u64]) -> Vec<&[Span]> {
        let mut found = Vec::with_capacity(phones.len());
        for chunk in phones.chunks(LOOKUPS_SIDE_BY_SIDE) {
            let buckets: Vec<usize> = chunk.iter().map(|&phone| bucket_of(phone, self.bucket_bits)).collect();
            for &bucket in &buckets {
                prefetch::item(&self.buckets, bucket);
            }
            let ranges: Vec<(usize, usize)> = buckets
                .iter()
                .map(|&bucket| match (self.buckets.get(bucket), self.buckets.get(bucket + 1)) {
                    (Some(&first), Some(&end)) if first < end => (first, end),
                    _ => (0, 0),
                })
                .collect();
            for &(first, end) in &ranges {
                if first < end {
                    prefetch::item(&self.phones, first);
                    prefetch::item(&self.phones, end - 1);
                }
            }
            for (&phone, &(first, end)) in chunk.iter().zip(&ranges) {
                if let Some(guess) = self.phones.get(first..end).and_then(|phones| first_probe(phones, phone)) {
                    prefetch::item(&self.phones, first + guess);
                }
            }
            let rows: Vec<Option<usize>> = chunk
                .iter()
                .zip(&ranges)
                .map(|(&phone, &(first, end))| {
                    let i = first + find(self.phones.get(first..end)?, phone)?;
                    prefetch::item(&self.starts, i);
                    Some(i)
                })
                .collect();
            let span_ranges: Vec<Option<(usize, usize)>> = rows
                .iter()
                .map(|&row| {
                    let row = row?;
                    let (&from, &to) = (self.starts.get(row)?, self.starts.get(row + 1)?);
                    prefetch::item(&self.spans, from);
                    Some((from, to))
                })
                .collect();
            found.extend(span_ranges.into_iter().map(|range| match range {
                Some((from, to)) => self.spans.get(from..to).unwrap_or(&[]),
                None => &[],
            }));
        }
        found
    }

    /// Its figures.
    pub fn summary(&self) -> IndexSummary {
        self.summary
    }

    /// The heap its arrays hold (capacity, not length).
    pub(super) fn heap_bytes(&self) -> usize {
        self.spans.heap_bytes() + self.phones.heap_bytes() + self.starts.heap_bytes() + self.buckets.heap_bytes()
    }

    /// Every indexed phone (grouped by bucket, so not in numeric order).
    pub fn phones(&self) -> &[u64] {
        &self.phones
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_finds_every_phone_and_nothing_else() {
        let uniform: Vec<u64> = (0..50_000u64).map(|i| 79_000_000_000 + i * 199).collect();
        let skewed: Vec<u64> = (0..5_000u64).map(|i| i * i * i).chain([u64::MAX - 1, u64::MAX]).collect();
        for phones in [uniform, skewed, vec![5], vec![]] {
            for (i, &phone) in phones.iter().enumerate() {
                assert_eq!(find(&phones, phone), Some(i), "{phone}");
                if phone > 0 && phones.binary_search(&(phone - 1)).is_err() {
                    assert_eq!(find(&phones, phone - 1), None);
                }
            }
            assert_eq!(find(&phones, u64::MAX - 2), None);
        }
    }

    /// On evenly spread values the first guess is the position itself (what makes a
    /// lookup one probe on a phone book's bucket); elsewhere it stays within the run.
    #[test]
    fn interpolation_guesses_evenly_spread_values_exactly() {
        let even: Vec<u64> = (0..1_000u64).map(|i| 79_000_000_000 + i * 199).collect();
        for (i, &phone) in even.iter().enumerate() {
            assert_eq!(interpolate(&even, phone), i);
            assert_eq!(first_probe(&even, phone), Some(i));
        }
        let skewed: Vec<u64> = (0..1_000u64).map(|i| i * i * i).collect();
        assert!(skewed.iter().all(|&phone| interpolate(&skewed, phone) < skewed.len()));
        assert_eq!(first_probe(&even[..SHORT_RUN], even[3]), Some(SHORT_RUN / 2), "a short run: its middle");
        assert_eq!(first_probe(&even, even[0] - 1), None, "below the run: no probe");
        assert_eq!(first_probe(&[], 5), None);
    }

    /// The side-by-side lookup gives exactly what one lookup at a time gives, for phones
    /// with records and without, in buckets long (interpolated) and short (binary
    /// searched), in any order and with repeats.
    #[test]
    fn looking_phones_up_side_by_side_agrees_with_one_at_a_time() {
        let pool = crate::platform::pool::WorkerPool::new("test", 2).unwrap();
        let uniform = (0..40_000u64).map(|i| 79_000_000_000 + i * 199);
        let skewed = (1..2_000u64).map(|i| i * i * i);
        let phones: Vec<u64> = uniform.chain(skewed).chain([u64::MAX >> 12]).collect();
        // Every phone once, then every third phone again: a phone of two spans.
        let json = |phones: &[u64]| {
            let again = phones.iter().step_by(3);
            let calls: Vec<String> = phones
                .iter()
                .chain(again)
                .map(|phone| format!(r#"{{"phone":{phone},"start_date":0,"end_date":1000}}"#))
                .collect();
            format!("[{}]", calls.join(","))
        };
        let shaped = |phones: &[u64], bucket_bits| {
            let shape = super::super::BuildShape { regions: 2, bucket_bits, few_phones: 0 };
            PhoneIndex::build_shaped(json(phones).as_bytes(), &pool, shape).unwrap()
        };
        // 16 buckets of ~2,600 phones (interpolated); 256 of ~4 (binary searched).
        let (long, short) = (shaped(&phones, 4), shaped(&phones[..1_000], 8));
        let runs = |index: &PhoneIndex| index.buckets.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
        assert!(runs(&long).iter().all(|&n| n > SHORT_RUN));
        assert!(runs(&short).iter().all(|&n| n <= SHORT_RUN));
        let empty = PhoneIndex::build(b"[]", &pool).unwrap();
        let mut asked: Vec<u64> = phones.iter().flat_map(|&p| [p, p + 1, p.wrapping_sub(1)]).collect();
        asked.extend([0, u64::MAX, 79_000_000_000, 79_000_000_000]);
        asked.reverse();
        for index in [&long, &short, &empty] {
            let each = index.spans_of_each(&asked);
            assert_eq!(each.len(), asked.len());
            for (phone, spans) in asked.iter().zip(each) {
                assert_eq!(spans, index.spans(*phone), "phone {phone}");
            }
            assert!(index.spans_of_each(&[]).is_empty());
        }
        let index = long;
        assert_eq!(index.spans_of_each(&[phones[3]])[0].len(), 2);
        assert_eq!(index.spans_of_each(&[phones[4]])[0].len(), 1);
    }
}
