//! The service's cold report on an indexed file, the figure `scripts/duckdb-anchor` sets
//! beside DuckDB's query on its loaded table in the same run:
//!
//!     cargo run --release --example cold_report -- FILE PHONE,PHONE,... [RUNS]
//!
//! Indexes FILE once on two threads (as the worker does at startup), then RUNS times
//! (default 11) answers one task for the phones with an empty cache: the engine's whole
//! path after a task is parsed (lookup, single flight, every record of each phone read
//! from the mapping on the pool, the entries cached, the report's JSON built). A fresh
//! engine each run, so nothing is a hit; the page cache is warm, as it is for DuckDB's
//! table. Prints one JSON line: the median, fastest and slowest run in milliseconds and
//! the records read.

use report_service::data::Segments;
use report_service::engine::{CacheSettings, Engine};
use report_service::message::{CorrelationId, complete_report_json};
use report_service::platform::pool::WorkerPool;
use std::time::{Duration, Instant, SystemTime};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: cold_report FILE PHONE,PHONE,... [RUNS]";
    let path = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let phones: Vec<u64> =
        args.next().ok_or_else(|| anyhow::anyhow!(usage))?.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let runs: usize = args.next().map_or(Ok(11), |r| r.parse())?;
    anyhow::ensure!(runs > 0, "RUNS must be at least 1");
    let pool = WorkerPool::new("cold-report", 2)?;
    let data = Segments::open(path.as_ref(), &pool)?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let id = CorrelationId::integer("1").ok_or_else(|| anyhow::anyhow!("correlation id"))?;
    let mut times = Vec::with_capacity(runs);
    let mut records = 0;
    for _ in 0..runs {
        let engine = Engine::builder(data.clone(), pool.clone())
            .cache(CacheSettings { ttl: Duration::from_secs(600), max_entries: phones.len() })
            .build();
        let started = Instant::now();
        let answers = runtime.block_on(engine.stats(&phones))?;
        let report =
            complete_report_json(&id, SystemTime::now(), answers.iter().map(|a| &a.json[..]), || started.elapsed());
        times.push(started.elapsed());
        std::hint::black_box(report);
        records = answers.iter().map(|a| a.stats.records).sum::<u64>();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        r#"{{"median_ms": {:.3}, "fastest_ms": {:.3}, "slowest_ms": {:.3}, "runs": {runs}, "records": {records}}}"#,
        ms(times[runs / 2]),
        ms(times[0]),
        ms(times[runs - 1]),
    );
    Ok(())
}
