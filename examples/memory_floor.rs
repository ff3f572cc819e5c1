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

use memmap2::Mmap;
use report_service::data::PhoneIndex;
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
            split(&map, threads, |part| part.iter().step_by(4096).map(|&b| u64::from(b)).sum())
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
    Ok(())
}
