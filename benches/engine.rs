//! Engine benchmarks: index build, cold aggregation, report serialisation, task parsing,
//! on the three shapes of data: the reference layout (grouped by phone), the same records
//! in time order (`shuffled`), and a phone book of millions of numbers (`many_phones`).
//!
//! By default the data is generated at startup (fixed seed) into a temporary directory:
//! 20 phones x 100,000 records grouped and shuffled (131 MB each), so a 10-phone report
//! does exactly the work it does on the reference file, and 1 M numbers x 2 calls for the
//! phone book. To run on the full-size files, put them in one directory:
//!
//!     cargo run --release --bin datagen -- --out /data/data.json
//!     cargo run --release --bin datagen -- --layout shuffled --out /data/shuffled.json
//!     cargo run --release --bin datagen -- --layout many-phones --phones 10000000 \
//!         --per-phone 2 --phone-base 79000000000 --out /data/many-phones.json
//!     BENCH_DATA=/data cargo bench --bench engine

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use report_service::data::{Dataset, IndexFiles, PhoneIndex, Segment, Segments};
use report_service::engine::compute::compute;
use report_service::engine::{CacheSettings, Engine};
use report_service::message::{
    CorrelationId, Limits, PhoneReport, Report, complete_report_json, parse_task, phone_json,
};
use report_service::ops::metrics::{Metrics, Source};
use report_service::platform::pool::WorkerPool;
use report_tools::datagen::{self, Layout, Options};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The phones of the starting service's first sample task (deduplicated) plus one.
const TEN_PHONES: [u64; 10] = [1, 2, 3, 5, 11, 17, 19, 13, 7, 9];

struct Fixture {
    path: PathBuf,
    /// Ten phones with records in this file.
    phones: [u64; 10],
    /// Keeps the generated file alive for the whole run.
    _dir: Option<tempfile::TempDir>,
}

/// The first phone number of the phone-book fixture and file.
const BOOK_BASE: u64 = 79_000_000_000;

/// The fixture of `layout`: `$BENCH_DATA/<name>` when set, else generated.
fn fixture(layout: Layout) -> Fixture {
    let (name, options) = match layout {
        Layout::ManyPhones => (
            "many-phones.json",
            Options { phones: 1_000_000, per_phone: 2, phone_base: BOOK_BASE, layout, ..Options::default() },
        ),
        Layout::Shuffled => ("shuffled.json", Options { phones: 20, per_phone: 100_000, layout, ..Options::default() }),
        _ => ("data.json", Options { phones: 20, per_phone: 100_000, layout, ..Options::default() }),
    };
    // Phones of the book drawn with a fixed stride (most have a record or two).
    let phones = match layout {
        Layout::ManyPhones => std::array::from_fn(|i| BOOK_BASE + 7_919 * i as u64),
        _ => TEN_PHONES,
    };
    if let Some(dir) = std::env::var_os("BENCH_DATA") {
        return Fixture { path: PathBuf::from(dir).join(name), phones, _dir: None };
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create fixture"));
    datagen::generate(&options, &mut out, &|_| {}).expect("write fixture");
    drop(out);
    Fixture { path, phones, _dir: Some(dir) }
}

const SHAPES: [(&str, Layout); 3] =
    [("sorted", Layout::Sorted), ("shuffled", Layout::Shuffled), ("many_phones", Layout::ManyPhones)];

fn pool(threads: usize) -> WorkerPool {
    WorkerPool::new("bench", threads).expect("pool")
}

fn index_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("index_build");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, layout) in SHAPES {
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

/// A restart's index: each shape's stored index read back (mapped and checksummed in
/// place) instead of scanning the file, as `Segments::open_persisted` does at startup.
fn index_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("index_load");
    group.sample_size(20);
    for (name, layout) in SHAPES {
        let fixture = fixture(layout);
        let pool = pool(2);
        let dir = tempfile::tempdir().expect("index dir");
        let files = IndexFiles::new(dir.path());
        let built = Segments::open_persisted(&fixture.path, &pool, &files).expect("valid fixture");
        assert!(built.persist(&files).iter().all(|(_, written)| matches!(written, Ok(true))));
        group.throughput(Throughput::Bytes(std::fs::metadata(files.file_of(&fixture.path)).expect("stored").len()));
        group.bench_function(BenchmarkId::new(name, "stored_index"), |b| {
            b.iter(|| {
                let loaded = Segments::open_persisted(black_box(&fixture.path), &pool, &files).expect("loads");
                assert_eq!(loaded.index_origins(), (1, 0, 0), "read, not built");
                loaded
            })
        });
    }
    group.finish();
}

/// An engine over `layout`'s fixture (two threads, a ten-minute TTL, at most
/// `max_entries` cached), its metrics, and a runtime to drive it; the fixture is kept so a
/// generated file lives as long as the engine.
struct Served {
    engine: Engine,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Runtime,
    _fixture: Fixture,
}

fn served(layout: Layout, max_entries: usize) -> Served {
    let fixture = fixture(layout);
    let pool = pool(2);
    let dataset = Segments::open(&fixture.path, &pool).expect("valid fixture");
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::builder(dataset, pool)
        .cache(CacheSettings { ttl: Duration::from_secs(600), max_entries })
        .metrics(Arc::clone(&metrics))
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    Served { engine, metrics, runtime, _fixture: fixture }
}

/// A miss on the phone book through the engine, as a task meets it: ten numbers never
/// asked for before (a lookup in the index of ~1 M numbers, single flight, a handful of
/// records read, the answer and its JSON cached, CLOCK eviction once the cache is full).
fn phone_book_miss(c: &mut Criterion) {
    let Served { engine, metrics, runtime, _fixture } = served(Layout::ManyPhones, 100_000);
    let mut next = 0u64;
    let mut group = c.benchmark_group("phone_book_miss");
    group.throughput(Throughput::Elements(10));
    group.bench_function("ten_new_numbers", |b| {
        b.iter(|| {
            // A stride coprime with 1 M walks every number once before repeating one.
            let phones: [u64; 10] = std::array::from_fn(|_| {
                next += 1;
                BOOK_BASE + (next * 7_919) % 1_000_000
            });
            runtime.block_on(engine.stats(black_box(&phones))).expect("stats")
        })
    });
    group.finish();
    let hits = metrics.phones_with(Source::Cache);
    let all = hits + metrics.phones_with(Source::Computed) + metrics.phones_with(Source::NoRecords);
    assert!(hits * 100 <= all, "misses, not hits: {hits} of {all}");
}

/// What a snapshot compaction copies under the engine's lock: every live entry of a
/// cache filled by phone-book misses (100,000 numbers asked for; those with records
/// cached).
fn snapshot_base(c: &mut Criterion) {
    let Served { engine, runtime, _fixture, .. } = served(Layout::ManyPhones, 100_000);
    for chunk in 0..10_000u64 {
        let phones: [u64; 10] = std::array::from_fn(|i| BOOK_BASE + chunk * 10 + i as u64);
        runtime.block_on(engine.stats(&phones)).expect("stats");
    }
    let cached = engine.snapshot_base().1.len();
    assert!(cached > 50_000, "a full cache: {cached}");
    let mut group = c.benchmark_group("snapshot_base");
    group.throughput(Throughput::Elements(cached as u64));
    group.bench_function("phone_book_cache", |b| b.iter(|| engine.snapshot_base()));
    group.finish();
}

/// Ten phones, all computed (no cache): every record of each read from the mapping.
fn cold_report(c: &mut Criterion) {
    let mut group = c.benchmark_group("ten_phones_cold");
    for (name, layout) in SHAPES {
        let fixture = fixture(layout);
        for threads in [1, 2] {
            let pool = pool(threads);
            let dataset = Segments::open(&fixture.path, &pool).expect("valid fixture");
            let phones = fixture.phones;
            let records: u64 = compute(&dataset, &phones, &pool).expect("compute").iter().map(|s| s.records).sum();
            group.throughput(Throughput::Elements(records.max(1)));
            group.bench_function(BenchmarkId::new(name, format!("{threads}_threads")), |b| {
                b.iter(|| compute(&dataset, black_box(&phones), &pool).expect("compute"))
            });
        }
    }
    group.finish();
}

/// A warm report: 10 phones, all cache hits, built and serialised (the service's path
/// after the task is parsed).
fn warm_report(c: &mut Criterion) {
    let Served { engine, metrics, runtime, _fixture } = served(Layout::Sorted, 1_000);
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
    assert_eq!(metrics.phones_with(Source::Computed), TEN_PHONES.len() as u64, "every timed lookup was a hit");
}

fn report_json(c: &mut Criterion) {
    let fixture = fixture(Layout::Sorted);
    let pool = pool(2);
    let dataset = Segments::open(&fixture.path, &pool).expect("valid fixture");
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
    // What a miss writes per phone (the entry is cached and reused by hits): written by
    // hand, beside the serde path it replaced (sonic-rs into a Vec, copied into the Arc).
    group.bench_function("ten_entries", |b| {
        b.iter(|| TEN_PHONES.iter().zip(&stats).map(|(&phone, s)| phone_json(phone, s)).collect::<Vec<_>>())
    });
    group.bench_function("ten_entries_serde_path", |b| {
        b.iter(|| {
            TEN_PHONES
                .iter()
                .zip(&stats)
                .map(|(&phone, s)| {
                    let mut out = Vec::with_capacity(256);
                    sonic_rs::to_writer(&mut out, &PhoneReport::new(phone, s)).expect("to a Vec");
                    Arc::<[u8]>::from(out)
                })
                .collect::<Vec<_>>()
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

/// A 1 % segment joined with the cache full: indexing the new segment, reading its records
/// of the cached phones, and moving the cache to the new set (the reload watcher's work;
/// tasks keep being answered meanwhile, except while the cache is moved under the lock).
/// On the grouped data every phone is cached and touched; on the phone book 100,000 of
/// its numbers are cached and the segment's 20,000 calls touch about 2 % of them.
fn segment_join(c: &mut Criterion) {
    let mut group = c.benchmark_group("segment_join");
    group.sample_size(10);
    join_case(&mut group, "grouped_all_phones_cached", Layout::Sorted, usize::MAX);
    join_case(&mut group, "phone_book_100000_cached", Layout::ManyPhones, 100_000);
    group.finish();
}

fn join_case(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    layout: Layout,
    cached: usize,
) {
    let fixture = fixture(layout);
    let workers = pool(2);
    let base = Arc::new(Segment::new("base.json", Dataset::open(&fixture.path, &workers).expect("fixture")));
    let all: &[u64] = base.dataset().index().phones();
    let phones: Vec<u64> = all.iter().copied().take(cached).collect();
    // 1 % of the base's records, each of a phone of the base, in a day of their own.
    let records = base.dataset().index().summary().records / 100;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut bytes = b"[".to_vec();
    for i in 0..records {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (phone, start) = (all[(rng % all.len() as u64) as usize], 1_795_824_000_000 + (rng >> 40) as i64);
        let comma = if i > 0 { "," } else { "" };
        bytes.extend_from_slice(
            format!(r#"{comma}{{"phone":{phone},"start_date":{start},"end_date":{}}}"#, start + 61_000).as_bytes(),
        );
    }
    bytes.push(b']');
    let day = tempfile::tempdir().expect("temp dir");
    std::fs::write(day.path().join("2026-11-28.json"), &bytes).expect("write segment");
    let reload = pool(1);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let locked = std::cell::RefCell::new(Vec::new());
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                let engine = Engine::builder(Segments::of(vec![Arc::clone(&base)]), workers.clone())
                    .cache(CacheSettings { ttl: Duration::from_secs(600), max_entries: 100_000 })
                    .build();
                runtime.block_on(engine.stats(&phones)).expect("warm the cache");
                engine
            },
            |engine| {
                let segment = Segment::open(day.path(), "2026-11-28.json", &reload).expect("segment");
                let joined = engine.join(vec![Arc::new(segment)], &[], &reload).expect("join");
                assert_eq!(joined.cache.kept + joined.cache.replaced, phones.len(), "every cached phone moved");
                locked.borrow_mut().push(joined.cache_locked);
                engine
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // Not timed by criterion: how long lookups waited while the cache was moved.
    let mut locked = locked.into_inner();
    locked.sort();
    if let (Some(min), Some(median), Some(max)) = (locked.first(), locked.get(locked.len() / 2), locked.last()) {
        eprintln!("{name}: cache locked for {min:?} / {median:?} / {max:?} (min / median / max)");
    }
}

criterion_group!(
    benches,
    index_build,
    index_load,
    cold_report,
    phone_book_miss,
    snapshot_base,
    warm_report,
    report_json,
    task_parse,
    segment_join
);
criterion_main!(benches);
