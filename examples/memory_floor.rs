//! What the memory system alone costs an index build of a data file, on this machine:
//!
//!     cargo run --release --example memory_floor -- data/shuffled.json
//!
//! 1. touching every page of the mapped file once (the page faults every first scan of a
//!    mapping pays, page cache warm);
//! 2. reading every byte of it (the scan's bandwidth, no parsing);
//! 3. scattering one 16-byte (phone, span) item per record into 256 buckets, in file
//!    order, for a file whose records are all in different places (the index build's
//!    scatter on a time-ordered file: one item per record);
//! 4. the whole index build, for comparison.
//!
//! Each on one thread and on two (the file split in halves), best of three.
//!
//! Then what the memory system alone costs a cold report, for the first 10 and the first
//! 100 phones of the index (a cold report's phones, and a burst's: 10 tasks of 10):
//!
//! 5. reading every cache line of each of their records (a byte of each), span by span
//!    in the order the report reads them, prefetching as it does (16 spans ahead), no
//!    parsing: the floor of a report's record reads, on a mapping already touched (as
//!    after an index build) and on a fresh one (as after a restart from a stored index,
//!    every page faulting once);
//! 6. the report's own aggregation of the same spans (`Dataset::aggregate`), for
//!    comparison.
//!
//! Both on one thread and on two (the phones in halves, the same split for both), best of
//! three.

use memmap2::Mmap;
use report_service::data::{Dataset, PhoneIndex, PhonePrefix, READ_AHEAD, Span, prefetch};
use report_service::platform::pool::WorkerPool;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn best(runs: usize, mut f: impl FnMut() -> u64) -> (Duration, u64) {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = f();
            (started.elapsed(), out)
        })
        .min_by_key(|(d, _)| *d)
        .unwrap_or_default()
}

/// Runs `work` on each of `threads` equal parts of `bytes`, at once.
fn split(bytes: &[u8], threads: usize, work: impl Fn(&[u8]) -> u64 + Sync) -> u64 {
    let part = bytes.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = bytes.chunks(part).map(|chunk| scope.spawn(|| work(chunk))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    })
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "data/data.json".into());
    let file = std::fs::File::open(&path)?;
    let len = file.metadata()?.len();
    let records = len / 65; // a compact record is 60-66 bytes
    println!("{path}: {:.2} GB, about {records} records", len as f64 / 1e9);
    for threads in [1, 2] {
        // A fresh mapping each run, so every page faults again (the page cache is warm).
        let (touch, _) = best(3, || {
            // SAFETY: the file is not modified while the example runs.
            let map = unsafe { Mmap::map(&file) }.expect("map");
            split(&map, threads, touch_pages)
        });
        let map = unsafe { Mmap::map(&file) }?;
        let (read, _) = best(3, || {
            split(&map, threads, |part| {
                part.chunks_exact(8).fold(0u64, |acc, w| acc ^ u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            })
        });
        let (scatter, _) = best(3, || {
            split(&map, threads, |part| {
                let per_record = part.len() / 65;
                let mut buckets: Vec<Vec<(u64, u64)>> = (0..256).map(|_| Vec::new()).collect();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ part.len() as u64;
                for i in 0..per_record as u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buckets[(x >> 56) as usize].push((x, i * 65));
                }
                black_box(&buckets);
                buckets.iter().map(|b| b.len() as u64).sum()
            })
        });
        let pool = WorkerPool::new("floor", threads)?;
        let (build, _) = best(3, || PhoneIndex::build(&map, &pool).map(|i| i.summary().spans as u64).unwrap_or(0));
        println!(
            "{threads} thread(s): touch every page {:.0} ms, read every byte {:.0} ms, scatter one item a record {:.0} ms; index build {:.0} ms",
            touch.as_secs_f64() * 1e3,
            read.as_secs_f64() * 1e3,
            scatter.as_secs_f64() * 1e3,
            build.as_secs_f64() * 1e3
        );
    }
    scattered_reads(&path, &file)
}

/// Reads a byte of every page of `part`, so each page of a fresh mapping faults once.
fn touch_pages(part: &[u8]) -> u64 {
    part.iter().step_by(4096).map(|&b| u64::from(b)).sum()
}

/// Runs `work` on each of `threads` equal parts of `phones`, at once.
fn split_phones(phones: &[(u64, &[Span])], threads: usize, work: impl Fn(&[(u64, &[Span])]) -> u64 + Sync) -> u64 {
    let part = phones.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = phones.chunks(part).map(|chunk| scope.spawn(|| work(chunk))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    })
}

/// Reads every cache line of every span of `phones` in `bytes` (a byte of each), the
/// spans `READ_AHEAD` ahead prefetched as the aggregation does, and parses nothing.
fn read_spans(bytes: &[u8], phones: &[(u64, &[Span])]) -> u64 {
    let mut acc = 0u64;
    for &(_, spans) in phones {
        for (i, span) in spans.iter().enumerate() {
            if let Some(ahead) = spans.get(i + READ_AHEAD) {
                prefetch::bytes(bytes, ahead.start());
            }
            // Every cache line of the span, a byte of each: the lines are what costs.
            let record = &bytes[span.start()..span.end()];
            acc += record.iter().step_by(64).map(|&b| u64::from(b)).sum::<u64>();
            acc += u64::from(record.last().copied().unwrap_or(0));
        }
    }
    acc
}

fn scattered_reads(path: &str, file: &std::fs::File) -> anyhow::Result<()> {
    let pool = WorkerPool::new("floor", 2)?;
    let dataset = Dataset::open(path.as_ref(), &pool)?;
    for count in [10, 100] {
        let phones: Vec<u64> = dataset.index().phones().iter().copied().take(count).collect();
        let spans = dataset.spans_of_each(&phones);
        let phones: Vec<(u64, &[Span])> = phones.iter().copied().zip(spans).collect();
        let records: usize = phones.iter().map(|(_, spans)| spans.len()).sum();
        let bytes: usize = phones.iter().flat_map(|(_, spans)| spans.iter()).map(|span| span.len()).sum();
        println!("{count} phones: {} spans, {:.1} MB of records (the whole spans)", records, bytes as f64 / 1e6);
        for threads in [1, 2] {
            // SAFETY: the file is not modified while the example runs.
            let touched = unsafe { Mmap::map(file) }?;
            black_box(split(&touched, 1, touch_pages));
            let (warm, _) = best(3, || split_phones(&phones, threads, |part| read_spans(&touched, part)));
            let (fresh, _) = best(3, || {
                // SAFETY: as above.
                let map = unsafe { Mmap::map(file) }.expect("map");
                split_phones(&phones, threads, |part| read_spans(&map, part))
            });
            let (aggregate, _) = best(3, || {
                split_phones(&phones, threads, |part| {
                    part.iter()
                        .map(|&(phone, spans)| {
                            dataset.aggregate(spans, &PhonePrefix::new(phone)).map(|stats| stats.records).unwrap_or(0)
                        })
                        .sum()
                })
            });
            let per = |d: Duration| d.as_secs_f64() * 1e9 / records.max(1) as f64;
            println!(
                "  {threads} thread(s): read the records {:.1} ms ({:.0} ns a record), on a fresh mapping {:.1} ms ({:.0} ns); aggregate {:.1} ms ({:.0} ns): {:.2}x the read",
                warm.as_secs_f64() * 1e3,
                per(warm),
                fresh.as_secs_f64() * 1e3,
                per(fresh),
                aggregate.as_secs_f64() * 1e3,
                per(aggregate),
                aggregate.as_secs_f64() / warm.as_secs_f64()
            );
        }
    }
    Ok(())
}
