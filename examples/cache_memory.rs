//! Heap per cached phone, measured:
//!
//!     cargo run --release --example cache_memory
//!
//! Fills a cache of 100,000 entries with real report entries (11-digit phones, full
//! statistics) through a counting allocator, and prints the heap it holds per entry.

use report_service::data::stats::CallStats;
use report_service::engine::cache::{Answer, Cache};
use report_service::message::phone_json;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[path = "support/counting.rs"]
mod counting;

use counting::CURRENT;

fn main() {
    const ENTRIES: u64 = 100_000;
    let mut stats = CallStats::EMPTY;
    for seconds in [0i64, 7, 12, 31, 59, 120] {
        stats.record(1_684_957_028_364, 1_684_957_028_364 + seconds * 1000);
    }
    let before = CURRENT.load(Ordering::Relaxed);
    let mut cache = Cache::new(Duration::from_secs(600), ENTRIES as usize);
    for i in 0..ENTRIES {
        let phone = 79_161_234_567 + i;
        cache.insert(phone, Answer { stats, json: phone_json(phone, &stats) }, 1, 0);
    }
    // What the snapshot takes, so the change list is empty as in a running service.
    let changes = cache.take_changes(1, 0).len();
    let held = CURRENT.load(Ordering::Relaxed) - before;
    println!(
        "{} entries ({changes} changes taken): heap {:.1} MiB, {:.0} bytes per cached phone",
        cache.len(),
        held as f64 / (1 << 20) as f64,
        held as f64 / ENTRIES as f64
    );
}
