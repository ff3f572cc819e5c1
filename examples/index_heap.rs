//! Heap used by the phone index, besides the mapping:
//!
//!     cargo run --release --example index_heap -- data/data.json
//!
//! Counts every allocation while the file is mapped and indexed, and prints the peak
//! during the build and what the index keeps afterwards. The allocation peak counts
//! reserved capacity; the resident anonymous memory (RssAnon, sampled every 2 ms) is
//! what the machine actually had to provide.

use report_service::data::Dataset;
use std::sync::atomic::Ordering;

#[path = "support/counting.rs"]
mod counting;

use counting::{CURRENT, PEAK};

/// Resident anonymous memory of this process, in bytes (0 if the system does not say).
fn rss_anon() -> usize {
    report_service::platform::heap::resident_anonymous_bytes().unwrap_or(0) as usize
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "data/data.json".into());
    let pool = report_service::platform::pool::WorkerPool::new(
        "example",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )?;
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let rss_before = rss_anon();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (dataset, rss_peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_anon());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        let dataset = Dataset::open(path.as_ref(), &pool);
        done.store(true, Ordering::Relaxed);
        (dataset, sampler.join().unwrap_or(0))
    });
    let dataset = dataset?;
    let summary = dataset.index().summary();
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    let kept = CURRENT.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    println!(
        "{path}: {} records, {} phones, {} spans, built in {:?}",
        summary.records,
        summary.phones,
        summary.spans,
        dataset.build_time()
    );
    println!(
        "heap kept by the index: {:.2} MiB ({:.2} bytes/record); peak while building: {:.2} MiB ({:.2} bytes/record)",
        mib(kept),
        kept as f64 / summary.records.max(1) as f64,
        mib(peak),
        peak as f64 / summary.records.max(1) as f64
    );
    let rss = rss_peak.saturating_sub(rss_before);
    println!(
        "peak resident anonymous memory while building: {:.2} MiB ({:.2} bytes/record)",
        mib(rss),
        rss as f64 / summary.records.max(1) as f64
    );
    Ok(())
}
