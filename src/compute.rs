//! Parallel aggregation: the statistics of a list of phones from a dataset, on rayon.
//!
//! Work is cut into units of about [`UNIT_BYTES`] of records, so it spreads across the
//! pool both across phones and within a phone with many records; partial results merge
//! exactly (see `stats`). This module blocks the calling thread: the service calls it
//! from the rayon pool, never from the async runtime.

use crate::data::{Dataset, PhonePrefix, Span, StaleData};
use crate::stats::CallStats;
use rayon::prelude::*;
use std::ops::Range;

/// Bytes of records per unit of parallel work.
const UNIT_BYTES: usize = 256 * 1024;

/// Statistics of each of `phones` (same order, same length). Phones without records get
/// [`CallStats::EMPTY`]. Runs on `pool` and blocks until done.
pub fn compute(dataset: &Dataset, phones: &[u64], pool: &rayon::ThreadPool) -> Result<Vec<CallStats>, StaleData> {
    if !dataset.still_intact() {
        return Err(StaleData::Changed);
    }
    let prefixes: Vec<PhonePrefix> = phones.iter().map(|&phone| PhonePrefix::new(phone)).collect();
    let units = work_units(dataset, phones);
    let partials: Vec<(usize, CallStats)> = pool.install(|| {
        units
            .par_iter()
            .map(|&(slot, ref spans)| {
                let phone = &prefixes[slot];
                let mut stats = CallStats::EMPTY;
                for &span in &dataset.index().spans(phone.phone())[spans.clone()] {
                    stats.merge(&dataset.accumulate(span, phone)?);
                }
                Ok((slot, stats))
            })
            .collect::<Result<_, StaleData>>()
    })?;
    let mut result = vec![CallStats::EMPTY; phones.len()];
    for (slot, stats) in partials {
        result[slot].merge(&stats);
    }
    Ok(result)
}

/// (index into `phones`, range of that phone's spans) units of about `UNIT_BYTES`.
fn work_units(dataset: &Dataset, phones: &[u64]) -> Vec<(usize, Range<usize>)> {
    let mut units = Vec::new();
    for (slot, &phone) in phones.iter().enumerate() {
        let spans: &[Span] = dataset.index().spans(phone);
        let mut first = 0;
        let mut bytes = 0;
        for (i, span) in spans.iter().enumerate() {
            bytes += span.len();
            if bytes >= UNIT_BYTES {
                units.push((slot, first..i + 1));
                first = i + 1;
                bytes = 0;
            }
        }
        if first < spans.len() {
            units.push((slot, first..spans.len()));
        }
    }
    units
}
