//! Per-phone call statistics: exact integer accumulation and the report's semantics.
//!
//! Durations are accumulated as integer milliseconds, so partial results merge exactly
//! in any order and any parallel split gives bit-identical reports. Seconds and prices
//! are derived only when a report is built, each with one correctly rounded division.
//! This module is pure: no I/O, no threads, no clock.

/// Bucket bounds and the price threshold, in milliseconds.
const TEN_SECONDS_MS: i128 = 10_000;
const FIFTEEN_SECONDS_MS: i128 = 15_000;
const THIRTY_SECONDS_MS: i128 = 30_000;

/// Aggregate of a phone's records (or part of them). `Default` is the empty aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallStats {
    /// Calls.
    pub records: u64,
    /// duration <= 10 s
    pub up_to_10s: u64,
    /// 10 s < duration <= 30 s
    pub from_10_to_30s: u64,
    /// duration > 30 s
    pub over_30s: u64,
    /// Smallest duration in ms (`i128::MAX` when there are no records).
    pub min_ms: i128,
    /// Largest duration in ms (`i128::MIN` when there are no records).
    pub max_ms: i128,
    /// Sum of all durations in ms. i128: `end - start` of two i64 needs 65 bits.
    pub total_ms: i128,
    /// Sum of durations strictly over 15 s, in ms.
    pub over_15s_total_ms: i128,
}

impl Default for CallStats {
    fn default() -> Self {
        CallStats::EMPTY
    }
}

impl CallStats {
    /// No call.
    pub const EMPTY: CallStats = CallStats {
        records: 0,
        up_to_10s: 0,
        from_10_to_30s: 0,
        over_30s: 0,
        min_ms: i128::MAX,
        max_ms: i128::MIN,
        total_ms: 0,
        over_15s_total_ms: 0,
    };

    /// Adds one record. A negative duration (`end_date < start_date`) is kept as is.
    #[inline(always)]
    pub fn record(&mut self, start_date: i64, end_date: i64) {
        let ms = i128::from(end_date) - i128::from(start_date);
        self.records += 1;
        self.up_to_10s += u64::from(ms <= TEN_SECONDS_MS);
        self.from_10_to_30s += u64::from(ms > TEN_SECONDS_MS && ms <= THIRTY_SECONDS_MS);
        self.over_30s += u64::from(ms > THIRTY_SECONDS_MS);
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
        self.total_ms += ms;
        if ms > FIFTEEN_SECONDS_MS {
            self.over_15s_total_ms += ms;
        }
    }

    /// Folds `other` into `self`; associative and commutative.
    pub fn merge(&mut self, other: &CallStats) {
        self.records += other.records;
        self.up_to_10s += other.up_to_10s;
        self.from_10_to_30s += other.from_10_to_30s;
        self.over_30s += other.over_30s;
        self.min_ms = self.min_ms.min(other.min_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
        self.total_ms += other.total_ms;
        self.over_15s_total_ms += other.over_15s_total_ms;
    }

    /// Price of the cheapest record (`duration * 10`), `None` without records.
    pub fn min_price(&self) -> Option<f64> {
        (self.records > 0).then(|| price(self.min_ms))
    }

    /// The dearest call's price, if any call.
    pub fn max_price(&self) -> Option<f64> {
        (self.records > 0).then(|| price(self.max_ms))
    }

    /// Mean duration in seconds, `None` without records.
    pub fn avg_duration(&self) -> Option<f64> {
        // One division of two exactly representable numbers (below 2^53), so the result
        // is the double nearest to the true mean.
        (self.records > 0).then(|| self.total_ms as f64 / (self.records as f64 * 1000.0))
    }

    /// Sum of prices of the records longer than 15 s (0 without any).
    pub fn sum_price_over_15s(&self) -> f64 {
        price(self.over_15s_total_ms)
    }
}

/// The hot-path accumulator for one span: the same rules as [`CallStats::record`] in
/// i64, which keeps the aggregation loop in registers. Exact because a span holds at
/// most [`Tally::MAX_RECORDS`] records and every duration added is below
/// [`Tally::MAX_DURATION_MS`] in magnitude, so no sum can reach 2^63.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    records: u64,
    /// Records up to 10 s in the low 32 bits, over 30 s in the high 32 (a span holds
    /// fewer than 2^32 records); the middle bucket is the rest. Six accumulators fit in
    /// registers beside the parser's constants; eight did not.
    short_and_long: u64,
    min_ms: i64,
    max_ms: i64,
    total_ms: i64,
    over_15s_total_ms: i64,
}

impl Tally {
    /// Durations from two thirteen-digit dates are below 10^13 ms.
    pub const MAX_DURATION_MS: i64 = 10_000_000_000_000;
    /// Far more than a 16 MiB span can hold (records are at least 40 bytes).
    pub const MAX_RECORDS: u64 = 1 << 19;

    /// No record.
    pub const EMPTY: Tally =
        Tally { records: 0, short_and_long: 0, min_ms: i64::MAX, max_ms: i64::MIN, total_ms: 0, over_15s_total_ms: 0 };

    /// Records added so far.
    #[inline(always)]
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Counts one call of `ms` milliseconds.
    #[inline(always)]
    pub fn add(&mut self, ms: i64) {
        debug_assert!(ms.abs() < Tally::MAX_DURATION_MS && self.records < Tally::MAX_RECORDS);
        self.records += 1;
        self.short_and_long +=
            u64::from(ms <= TEN_SECONDS_MS as i64) | (u64::from(ms > THIRTY_SECONDS_MS as i64) << 32);
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
        self.total_ms += ms;
        self.over_15s_total_ms += if ms > FIFTEEN_SECONDS_MS as i64 { ms } else { 0 };
    }
}

impl From<Tally> for CallStats {
    fn from(t: Tally) -> CallStats {
        if t.records == 0 {
            return CallStats::EMPTY;
        }
        let up_to_10s = t.short_and_long & 0xFFFF_FFFF;
        let over_30s = t.short_and_long >> 32;
        CallStats {
            records: t.records,
            up_to_10s,
            from_10_to_30s: t.records - up_to_10s - over_30s,
            over_30s,
            min_ms: t.min_ms.into(),
            max_ms: t.max_ms.into(),
            total_ms: t.total_ms.into(),
            over_15s_total_ms: t.over_15s_total_ms.into(),
        }
    }
}

/// `ms / 1000 * 10` as the double nearest to the exact decimal (one division).
fn price(ms: i128) -> f64 {
    ms as f64 / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(durations_ms: &[i64]) -> CallStats {
        let mut stats = CallStats::EMPTY;
        for &ms in durations_ms {
            stats.record(1_684_957_028_364, 1_684_957_028_364 + ms);
        }
        stats
    }

    fn buckets(stats: &CallStats) -> (u64, u64, u64) {
        (stats.up_to_10s, stats.from_10_to_30s, stats.over_30s)
    }

    #[test]
    fn ten_seconds_exactly_is_in_the_first_bucket() {
        assert_eq!(buckets(&of(&[0])), (1, 0, 0));
        assert_eq!(buckets(&of(&[9_999])), (1, 0, 0));
        assert_eq!(buckets(&of(&[10_000])), (1, 0, 0));
        assert_eq!(buckets(&of(&[10_001])), (0, 1, 0));
    }

    #[test]
    fn thirty_seconds_exactly_is_in_the_middle_bucket() {
        assert_eq!(buckets(&of(&[29_999])), (0, 1, 0));
        assert_eq!(buckets(&of(&[30_000])), (0, 1, 0));
        assert_eq!(buckets(&of(&[30_001])), (0, 0, 1));
    }

    /// The hot path's tally puts every boundary in the same bucket as the exact
    /// aggregate: counted by hand, not compared with `CallStats::record`.
    #[test]
    fn the_tally_puts_each_boundary_where_the_contract_does() {
        let tally = |durations: &[i64]| {
            let mut tally = Tally::EMPTY;
            durations.iter().for_each(|&ms| tally.add(ms));
            CallStats::from(tally)
        };
        assert_eq!(buckets(&tally(&[-1, 0, 9_999, 10_000])), (4, 0, 0));
        assert_eq!(buckets(&tally(&[10_001, 15_000, 15_001, 29_999, 30_000])), (0, 5, 0));
        assert_eq!(buckets(&tally(&[30_001, 9_999_999])), (0, 0, 2));
        let priced = tally(&[14_999, 15_000, 15_001, 30_000]);
        assert_eq!((priced.over_15s_total_ms, priced.total_ms), (45_001, 75_000));
        assert_eq!((priced.min_ms, priced.max_ms), (14_999, 30_000));
    }

    #[test]
    fn only_durations_strictly_over_fifteen_seconds_are_priced_in_the_sum() {
        assert_eq!(of(&[14_999]).sum_price_over_15s(), 0.0);
        assert_eq!(of(&[15_000]).sum_price_over_15s(), 0.0);
        assert_eq!(of(&[15_001]).sum_price_over_15s(), 150.01);
        assert_eq!(of(&[15_001, 15_000, 20_000, 14_999]).sum_price_over_15s(), 350.01);
    }

    #[test]
    fn prices_and_mean_are_exact_decimals_at_millisecond_resolution() {
        let stats = of(&[9_999, 10_001, 120_000]);
        assert_eq!(stats.min_price(), Some(99.99));
        assert_eq!(stats.max_price(), Some(1200.0));
        assert_eq!(stats.avg_duration(), Some(46.666666666666664));
        assert_eq!(of(&[10_001, 10_002]).avg_duration(), Some(10.0015));
    }

    #[test]
    fn a_negative_duration_is_kept_and_counts_as_up_to_ten_seconds() {
        let stats = of(&[-5_000, 20_000]);
        assert_eq!(buckets(&stats), (1, 1, 0));
        assert_eq!(stats.min_price(), Some(-50.0));
        assert_eq!(stats.avg_duration(), Some(7.5));
    }

    #[test]
    fn no_records_means_no_min_max_or_mean_and_a_zero_sum() {
        let stats = CallStats::EMPTY;
        assert_eq!((stats.min_price(), stats.max_price(), stats.avg_duration()), (None, None, None));
        assert_eq!(stats.sum_price_over_15s(), 0.0);
        assert_eq!(buckets(&stats), (0, 0, 0));
    }

    #[test]
    fn extreme_dates_do_not_overflow() {
        let mut stats = CallStats::EMPTY;
        stats.record(i64::MIN, i64::MAX);
        stats.record(i64::MAX, i64::MIN);
        assert_eq!(stats.max_ms, i128::from(i64::MAX) - i128::from(i64::MIN));
        assert_eq!(stats.min_ms, -(i128::from(i64::MAX) - i128::from(i64::MIN)));
        assert_eq!(stats.total_ms, 0);
    }

    proptest! {
        /// The i64 hot-path tally and the exact i128 aggregate agree.
        #[test]
        fn a_tally_equals_the_exact_aggregate(durations in prop::collection::vec(prop_oneof![-60_000i64..200_000, -(Tally::MAX_DURATION_MS - 1)..Tally::MAX_DURATION_MS], 0..200)) {
            let mut tally = Tally::EMPTY;
            for &ms in &durations {
                tally.add(ms);
            }
            prop_assert_eq!(CallStats::from(tally), of(&durations));
        }

        /// Any split of the records, merged in any order, equals the serial aggregate.
        #[test]
        fn merging_partial_results_equals_one_pass(durations in prop::collection::vec(-5_000i64..200_000, 0..200), cut in 0usize..200) {
            let cut = cut.min(durations.len());
            let mut merged = of(&durations[cut..]);
            merged.merge(&of(&durations[..cut]));
            prop_assert_eq!(merged, of(&durations));
        }
    }
}
