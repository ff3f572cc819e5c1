//! Engine benchmarks: index build, cold aggregation, report serialisation.
//!
//! By default the data is generated at startup (fixed seed) into a temporary directory:
//! 20 phones x 100,000 records in the reference layout (131 MB), so a 10-phone report does
//! exactly the work it does on the reference file. To run on the full reference file:
//!
//!     cargo run --release --bin datagen            # writes data/data.json (1.31 GB)
//!     BENCH_DATA=data/data.json cargo bench --bench engine

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use report_service::clock::SystemClock;
use report_service::compute::compute;
use report_service::data::{Dataset, PhoneIndex};
use report_service::datagen::{self, Layout, Options};
use report_service::engine::{CacheSettings, Engine};
use report_service::message::{CorrelationId, Limits, PhoneReport, Report, complete_report_json, parse_task};
use report_service::metrics::{Metrics, source};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The phones of the starting service's first sample task (deduplicated) plus one.
const TEN_PHONES: [u64; 10] = [1, 2, 3, 5, 11, 17, 19, 13, 7, 9];

struct Fixture {
    path: PathBuf,
    /// Keeps the generated file alive for the whole run.
    _dir: Option<tempfile::TempDir>,
}

fn fixture(layout: Layout) -> Fixture {
    if let Some(path) = std::env::var_os("BENCH_DATA").filter(|_| layout == Layout::Sorted) {
        return Fixture { path: path.into(), _dir: None };
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data.json");
    let options = Options { phones: 20, per_phone: 100_000, layout, ..Options::default() };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create fixture"));
    datagen::generate(&options, &mut out, &|_| {}).expect("write fixture");
    drop(out);
    Fixture { path, _dir: Some(dir) }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool")
}

fn index_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("index_build");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, layout) in [("sorted", Layout::Sorted), ("shuffled", Layout::Shuffled)] {
        let fixture = fixture(layout);
        let bytes = std::fs::read(&fixture.path).expect("read fixture");
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_with_input(BenchmarkId::new(name, format!("{threads}_threads")), &bytes, |b, bytes| {
                b.iter(|| PhoneIndex::build(black_box(bytes), &pool).expect("valid fixture"))
            });
        }
    }
    group.finish();
}

fn cold_report(c: &mut Criterion) {
    let fixture = fixture(Layout::Sorted);
    let mut group = c.benchmark_group("ten_phones_cold");
    for threads in [1, 2] {
        let pool = pool(threads);
        let dataset = Dataset::open(&fixture.path, &pool).expect("valid fixture");
        let records: u64 = compute(&dataset, &TEN_PHONES, &pool).expect("compute").iter().map(|s| s.records).sum();
        group.throughput(Throughput::Elements(records));
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter(|| compute(&dataset, black_box(&TEN_PHONES), &pool).expect("compute"))
        });
    }
    group.finish();
}

/// A warm report: 10 phones, all cache hits, built and serialised (the service's path
/// after the task is parsed).
fn warm_report(c: &mut Criterion) {
    let fixture = fixture(Layout::Sorted);
    let pool = Arc::new(pool(2));
    let dataset = Dataset::open(&fixture.path, &pool).expect("valid fixture");
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::new(
        dataset,
        CacheSettings { ttl: Duration::from_secs(600), max_entries: 1_000 },
        pool,
        Arc::new(SystemClock),
        Arc::clone(&metrics),
        Box::new(|| {}),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(engine.stats(&TEN_PHONES)).expect("warm up the cache");
    let id = CorrelationId::integer("13242421424214").expect("integer");
    let mut group = c.benchmark_group("ten_phones_warm");
    group.throughput(Throughput::Elements(TEN_PHONES.len() as u64));
    group.bench_function("cache_hits_report_json", |b| {
        b.iter(|| {
            let started = Instant::now();
            let answers = runtime.block_on(engine.stats(black_box(&TEN_PHONES))).expect("hits");
            complete_report_json(&id, SystemTime::now(), answers.iter().map(|a| &a.json[..]), || started.elapsed())
        })
    });
    group.finish();
    assert_eq!(metrics.phones_with(source::COMPUTED), TEN_PHONES.len() as u64, "every timed lookup was a hit");
}

fn report_json(c: &mut Criterion) {
    let fixture = fixture(Layout::Sorted);
    let pool = pool(2);
    let dataset = Dataset::open(&fixture.path, &pool).expect("valid fixture");
    let stats = compute(&dataset, &TEN_PHONES, &pool).expect("compute");
    let id = CorrelationId::integer("13242421424214").expect("integer");
    let mut group = c.benchmark_group("report_json");
    group.throughput(Throughput::Elements(TEN_PHONES.len() as u64));
    group.bench_function("ten_phones_serde_path", |b| {
        b.iter(|| {
            let data = TEN_PHONES.iter().zip(&stats).map(|(&phone, s)| PhoneReport::new(phone, s)).collect();
            Report::complete(id.clone(), SystemTime::now(), data, Duration::from_micros(12)).to_json()
        })
    });
    group.finish();
}

/// Parsing task bodies: the sample task's size, and one of 10,000 phones (~120 KB), where
/// sonic-rs's SIMD (enabled or not at build time) would matter most.
fn task_parse(c: &mut Criterion) {
    let limits = Limits { max_task_bytes: 1 << 20, max_phones: 10_000 };
    let small = br#"{"correlation_id": 13242421424214, "phones": [1, 2, 3, 3, 5, 11, 67, 45, 23, 33]}"#.to_vec();
    let phones: Vec<String> = (0..10_000u64).map(|p| (79_161_000_000 + p * 7).to_string()).collect();
    let large = format!(r#"{{"correlation_id": 1, "phones": [{}]}}"#, phones.join(", ")).into_bytes();
    let mut group = c.benchmark_group("task_parse");
    for (name, body) in [("ten_phones", small), ("ten_thousand_phones", large)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| parse_task(black_box(&body), None, limits).expect("a task")));
    }
    group.finish();
}

criterion_group!(benches, index_build, cold_report, warm_report, report_json, task_parse);
criterion_main!(benches);
