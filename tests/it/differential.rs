//! Differential tests: the indexed, parallel path against a slow serde_json reference,
//! on every layout, at the exact boundary values, with any split of the work.

use crate::support;

use proptest::prelude::*;
use report_service::data::{BuildShape, Dataset, Segments};
use report_service::engine::compute::compute;
use report_service::message::dedup_phones;
use report_tools::datagen::{self, Layout, Options};
use support::{RefRecord, Style, pool, reference_parse, reference_stats, render, temp_file};

/// Durations that sit on or next to every boundary of the semantics, in ms.
const BOUNDARIES_MS: [i64; 13] =
    [0, 1, 9_999, 10_000, 10_001, 14_999, 15_000, 15_001, 29_999, 30_000, 30_001, -1, -5_000];

fn phone() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..6, 1 => Just(u64::MAX), 1 => Just(79_161_234_567)]
}

fn record() -> impl Strategy<Value = RefRecord> {
    let duration = prop_oneof![
        3 => prop::sample::select(BOUNDARIES_MS.to_vec()),
        3 => (0i64..=120).prop_map(|s| s * 1000),
        2 => -1_000i64..200_000,
    ];
    let ordinary = (phone(), 1_684_000_000_000i64..1_700_000_000_000, duration)
        .prop_map(|(phone, start, ms)| RefRecord { phone, start_date: start, end_date: start + ms });
    let extreme = (phone(), prop::sample::select(vec![(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (-1, 0), (0, 0)]))
        .prop_map(|(phone, (start_date, end_date))| RefRecord { phone, start_date, end_date });
    prop_oneof![20 => ordinary, 1 => extreme]
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![Just(Style::Compact), any::<u64>().prop_map(|seed| Style::Varied { seed })]
}

/// A build cut into `regions` regions and `1 << bucket_bits` buckets, each region keeping
/// per-phone lists for up to `few_phones` phones (0: buckets only).
fn shape(regions: usize, bucket_bits: u32, few_phones: usize) -> Option<BuildShape> {
    Some(BuildShape { regions, bucket_bits, few_phones })
}

/// How many phones a region keeps lists for: none, few enough that regions move theirs
/// into buckets part way, or as many as the service does.
fn few_phones() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), 1usize..=3, Just(4096)]
}

/// Asserts the fast path equals the reference for `phones` on `bytes`, indexing with
/// `threads` threads, `regions` regions, `1 << bucket_bits` buckets and per-phone lists
/// for up to `few_phones` phones a region.
fn assert_agrees(
    bytes: &[u8],
    phones: &[u64],
    threads: usize,
    (regions, bucket_bits, few_phones): (usize, u32, usize),
) -> Result<(), TestCaseError> {
    let records = reference_parse(bytes).map_err(|e| TestCaseError::fail(format!("test data invalid: {e}")))?;
    let (_dir, path) = temp_file(bytes);
    let pool = pool(threads);
    let dataset = Segments::single(
        Dataset::open_with(&path, &pool, shape(regions, bucket_bits, few_phones))
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
    );
    let phones = dedup_phones(phones.iter().copied());
    let fast = compute(&dataset, &phones, &pool).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(fast, reference_stats(&records, &phones));
    let summary = dataset.summary();
    prop_assert_eq!(summary.records, records.len() as u64);
    prop_assert_eq!(summary.negative_durations, records.iter().filter(|r| r.end_date < r.start_date).count() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any records, in any layout and order, any phone list, any split of the index
    /// build: identical statistics to the reference.
    #[test]
    fn indexed_parallel_path_agrees_with_the_reference(
        records in prop::collection::vec(record(), 0..300),
        style in style(),
        phones in prop::collection::vec(phone(), 0..12),
        threads in 1usize..=3,
        regions in 1usize..=9,
        bucket_bits in 0u32..=4,
        few_phones in few_phones(),
    ) {
        assert_agrees(&render(&records, style), &phones, threads, (regions, bucket_bits, few_phones))?;
    }

}

proptest! {
    // Cheap cases, and a single mutation rarely lands on an interesting spot: many cases.
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// One byte changed anywhere: accepted exactly when the reference accepts it, and
    /// then with the same statistics.
    #[test]
    fn a_mutated_file_is_accepted_exactly_when_the_reference_accepts_it(
        records in prop::collection::vec(record(), 1..40),
        style in style(),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"{}[],:\"\\ \n0123456789-+.eEtfnulx\x00\xff".to_vec()),
        regions in 1usize..=4,
        bucket_bits in 0u32..=3,
        few_phones in few_phones(),
    ) {
        let mut bytes = render(&records, style);
        let at = at.index(bytes.len());
        bytes[at] = byte;
        let reference = reference_parse(&bytes);
        let (_dir, path) = temp_file(&bytes);
        let pool = pool(2);
        let ours = Dataset::open_with(&path, &pool, shape(regions, bucket_bits, few_phones));
        prop_assert_eq!(ours.is_ok(), reference.is_ok(), "ours: {:?}\nreference: {:?}\ndata: {}", ours.as_ref().err(), reference.as_ref().err(), String::from_utf8_lossy(&bytes));
        if let (Ok(dataset), Ok(records)) = (ours, reference) {
            let phones: Vec<u64> = dedup_phones(records.iter().map(|r| r.phone));
            prop_assert_eq!(compute(&Segments::single(dataset), &phones, &pool).map_err(|e| TestCaseError::fail(e.to_string()))?, reference_stats(&records, &phones));
        }
    }

}

proptest! {
    /// Cutting a file anywhere before its closing bracket is always an error.
    #[test]
    fn a_truncated_file_is_always_rejected(records in prop::collection::vec(record(), 1..20), style in style(), cut in any::<prop::sample::Index>()) {
        let bytes = render(&records, style);
        let close = bytes.iter().rposition(|&b| b == b']').expect("array end");
        let cut = cut.index(close);
        let (_dir, path) = temp_file(&bytes[..cut]);
        prop_assert!(Dataset::open_with(&path, &pool(2), shape(3, 2, 4096)).is_err());
    }
}

/// Every datagen layout at a size where the parallel index build cuts the file into
/// many regions, including the pretty layout whose strings contain `},{`.
#[test]
fn datagen_layouts_agree_with_the_reference_under_parallel_indexing() {
    let base = Options { phones: 7, per_phone: 700, phone_base: 79_161_234_560, seed: 9, ..Options::default() };
    for options in [
        base,
        Options { layout: Layout::Shuffled, ..base },
        Options { layout: Layout::Pretty, ..base },
        Options { layout: Layout::Pretty, shuffle: true, ..base },
        Options { layout: Layout::ManyPhones, phones: 3_000, per_phone: 2, ..base },
    ] {
        let mut bytes = Vec::new();
        datagen::generate(&options, &mut bytes, &|_| {}).expect("generate");
        let mut phones: Vec<u64> = (79_161_234_558..79_161_234_569).collect();
        phones.push(0);
        for (threads, regions, bucket_bits) in [(1, 1, 0), (2, 8, 3), (2, 31, 12)] {
            for few_phones in [0, 2, 4096] {
                assert_agrees(&bytes, &phones, threads, (regions, bucket_bits, few_phones)).unwrap_or_else(|e| {
                    panic!("{options:?} {threads}x{regions}x{bucket_bits}, {few_phones} lists: {e}")
                });
            }
        }
    }
}
