//! Parallel aggregation: the statistics of a list of phones from a dataset, on rayon.
//!
//! Work is cut into units of about `UNIT_BYTES` of records, so it spreads across the
//! pool both across phones and within a phone with many records; partial results merge
//! exactly (see `data::stats`). This module blocks the calling thread: the service calls it
//! from the rayon pool, never from the async runtime.

use crate::data::stats::CallStats;
use crate::data::{Located, PhonePrefix, Segments, StaleData};
use crate::platform::pool::WorkerPool;
use rayon::prelude::*;
use std::ops::Range;

/// Bytes of records per unit of parallel work.
const UNIT_BYTES: usize = 256 * 1024;

/// Work on fewer bytes of records than this is done on the calling thread, whatever it
/// is: a few hundred records (tens of microseconds, even when every one is a cache miss)
/// cost less than handing them to another thread and waking the caller afterwards. A
/// phone book's phones have a handful of calls each, so most of its cache misses are
/// this small.
pub const INLINE_BYTES: usize = 32 * 1024;

/// Statistics of each of `phones` (same order, same length) over every segment of
/// `data`. Phones without records get [`CallStats::EMPTY`]. Runs on `pool` and blocks
/// until done.
///
/// The files are checked before and after they are read: if one was rewritten in place
/// at any moment in between, the numbers may be torn, so none are returned (nothing
/// computed from them is cached, snapshotted or answered; the task is retried on the new
/// file).
pub fn compute(data: &Segments, phones: &[u64], pool: &WorkerPool) -> Result<Vec<CallStats>, StaleData> {
    compute_located(data, phones, &data.locate(phones), pool)
}

/// [`compute`] of phones already located in `data` (by [`Segments::locate`], in the
/// same order): a task's misses are looked up once.
pub fn compute_located(
    data: &Segments,
    phones: &[u64],
    located: &Located<'_>,
    pool: &WorkerPool,
) -> Result<Vec<CallStats>, StaleData> {
    compute_checked(data, phones, located, pool, || {})
}

/// [`compute`], with `meanwhile` run after the records are read and before the final
/// check (tests change the file there).
fn compute_checked(
    data: &Segments,
    phones: &[u64],
    located: &Located<'_>,
    pool: &WorkerPool,
    meanwhile: impl FnOnce(),
) -> Result<Vec<CallStats>, StaleData> {
    if !data.still_intact() {
        return Err(StaleData::Changed);
    }
    let result = aggregate(data, phones, located, pool)?;
    meanwhile();
    if !data.still_intact() {
        return Err(StaleData::Changed);
    }
    Ok(result)
}

/// One unit of work: (index into `phones`, segment, range of that phone's spans in it).
type Unit = (usize, usize, Range<usize>);

fn aggregate(
    data: &Segments,
    phones: &[u64],
    located: &Located<'_>,
    pool: &WorkerPool,
) -> Result<Vec<CallStats>, StaleData> {
    let prefixes: Vec<PhonePrefix> = phones.iter().map(|&phone| PhonePrefix::new(phone)).collect();
    let units = work_units(data, located);
    let unit = |&(slot, part, ref spans): &Unit| -> Result<(usize, CallStats), StaleData> {
        let dataset = data.parts()[part].dataset();
        Ok((slot, dataset.aggregate(&located.spans(part, slot)[spans.clone()], &prefixes[slot])?))
    };
    let partials: Vec<(usize, CallStats)> = if located.bytes() <= INLINE_BYTES {
        units.iter().map(unit).collect::<Result<_, StaleData>>()?
    } else {
        pool.threads().install(|| units.par_iter().map(unit).collect::<Result<_, StaleData>>())?
    };
    let mut result = vec![CallStats::EMPTY; phones.len()];
    for (slot, stats) in partials {
        result[slot].merge(&stats);
    }
    Ok(result)
}

/// Units of about `UNIT_BYTES` of records each.
fn work_units(data: &Segments, located: &Located<'_>) -> Vec<Unit> {
    let mut units = Vec::new();
    for part in 0..data.parts().len() {
        for slot in 0..located.len() {
            let spans = located.spans(part, slot);
            let mut first = 0;
            let mut bytes = 0;
            for (i, span) in spans.iter().enumerate() {
                bytes += span.len();
                if bytes >= UNIT_BYTES {
                    units.push((slot, part, first..i + 1));
                    first = i + 1;
                    bytes = 0;
                }
            }
            if first < spans.len() {
                units.push((slot, part, first..spans.len()));
            }
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    fn dataset(dir: &std::path::Path) -> (std::path::PathBuf, Segments, WorkerPool) {
        let path = dir.join("data.json");
        std::fs::write(&path, br#"[{"phone":3,"start_date":0,"end_date":10000}]"#).unwrap();
        let pool = WorkerPool::new("test", 1).unwrap();
        let data = Segments::open(&path, &pool).unwrap();
        (path, data, pool)
    }

    #[test]
    fn a_file_rewritten_in_place_while_it_is_read_yields_no_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let (path, dataset, pool) = dataset(dir.path());
        assert_eq!(compute(&dataset, &[3], &pool).unwrap()[0].records, 1);
        let rewrite = || {
            let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.seek(std::io::SeekFrom::Start(0)).unwrap();
            file.write_all(br#"[{"phone":3,"start_date":0,"end_date":20000}]"#).unwrap();
            let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
            file.set_modified(later).unwrap();
        };
        let located = dataset.locate(&[3]);
        assert!(matches!(compute_checked(&dataset, &[3], &located, &pool, rewrite), Err(StaleData::Changed)));
        assert!(matches!(compute(&dataset, &[3], &pool), Err(StaleData::Changed)), "and every later read");
    }
}
