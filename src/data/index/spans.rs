//! The index as it is kept: its layout, limits and lookups (the module documentation of
//! `index` says why it looks so); `build` makes one, `store` reads one back.

use super::table::{Table, Word};

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
        if high - low <= 32 {
            break;
        }
        let (first, last) = (phones[low], phones[high - 1]);
        if phone < first || phone > last {
            return None;
        }
        let width = (last - first) as u128;
        let guess = low + ((u128::from(phone - first) * (high - 1 - low) as u128) / width.max(1)) as usize;
        match phones[guess].cmp(&phone) {
            std::cmp::Ordering::Equal => return Some(guess),
            std::cmp::Ordering::Less => low = guess + 1,
            std::cmp::Ordering::Greater => high = guess,
        }
    }
    phones[low..high].binary_search(&phone).ok().map(|i| low + i)
}

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
}
