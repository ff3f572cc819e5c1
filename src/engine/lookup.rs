//! The statistics engine: per-phone statistics for a task from the cache, or computed on
//! the worker pool, with concurrent misses of one phone computed once.
//!
//! It owns the data version being served (a set of segments, swapped whole when it
//! changes), the cache and the in-flight computations. It never blocks the async runtime
//! for long: a task's cache lookups take a short lock (a task of hundreds of phones is
//! looked up on the pool), and every computation but the smallest (see
//! `compute::INLINE_BYTES`) runs on the pool and is awaited through a channel.

use crate::data::stats::CallStats;
use crate::data::{DataIdentity, IndexFiles, Located, Segment, Segments, StaleData};
use crate::engine::cache::{Advanced, Answer, Cache, CachedPhone, ENTRY_BYTES, Fate};
use crate::engine::compute;
use crate::engine::flight::{self, Landing, Waiting};
use crate::engine::snapshot::Delta;
use crate::ops::metrics::{Metrics, Source};
use crate::platform::clock::Clock;
use crate::platform::pool::{Abandoned, WorkerPool};
use ahash::AHashMap;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// One version of the data being served. The epoch tells cache entries and in-flight
/// computations of different versions apart.
#[derive(Debug)]
pub struct Loaded {
    /// The mapped, indexed segments.
    pub data: Segments,
    /// Its version number (1 for the data read at startup, then one per change).
    pub epoch: u64,
}

/// Why statistics could not be produced; the task is worth retrying.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The file changed under its index.
    #[error(transparent)]
    Stale(#[from] StaleData),
    /// The computation died (a worker panicked); nothing was produced.
    #[error("the computation was abandoned: {0}")]
    Abandoned(#[from] Abandoned),
}

/// The cache and the in-flight computations. Under one lock, so that a phone whose
/// computation is completing is always seen as either in flight or cached, never as
/// neither (which would start a second computation).
#[derive(Debug)]
struct State {
    cache: Cache,
    /// (epoch, phone) -> its computation, for tasks to join.
    flights: AHashMap<(u64, u64), Waiting>,
}

struct Inner {
    /// Swapped whole by `replace`; each task reads it once, so no report mixes versions.
    data: ArcSwap<Loaded>,
    state: Mutex<State>,
    /// Where computations run (the requests' pool, shared with the pipeline).
    pool: WorkerPool,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Called after entries are cached or dropped: wakes the snapshot writer. Must not
    /// block (it is called on pool threads).
    cache_changed: Box<dyn Fn() + Send + Sync>,
    /// The most entries the cache holds (`CACHE_MAX_ENTRIES`).
    cache_capacity: usize,
    /// Heap the full cache and its snapshot take (`cache_bytes`).
    cache_bytes: usize,
    /// Notified when a computation found the data changed under its index, so the
    /// reload watcher looks at the file now instead of at its next poll.
    stale: tokio::sync::Notify,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("epoch", &self.data.load().epoch).finish_non_exhaustive()
    }
}

/// Cheap to clone: a handle to the shared engine.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// How an [`Engine`] is put together. By default: no cache, the system clock, metrics of
/// its own, and nobody told of cache changes.
pub struct EngineBuilder {
    data: Segments,
    pool: WorkerPool,
    cache: CacheSettings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    cache_changed: Box<dyn Fn() + Send + Sync>,
}

impl EngineBuilder {
    /// How it caches (default: no cache).
    pub fn cache(mut self, cache: CacheSettings) -> EngineBuilder {
        self.cache = cache;
        self
    }

    /// The clock that dates cache entries (tests drive a manual one).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> EngineBuilder {
        self.clock = clock;
        self
    }

    /// Where it counts cache entries, phones and data figures.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> EngineBuilder {
        self.metrics = metrics;
        self
    }

    /// Called after entries are cached or dropped (wakes the snapshot writer). Must not
    /// block: it is called on pool threads.
    pub fn on_cache_change(mut self, changed: impl Fn() + Send + Sync + 'static) -> EngineBuilder {
        self.cache_changed = Box::new(changed);
        self
    }

    /// The engine, serving the dataset it was built with.
    pub fn build(self) -> Engine {
        self.metrics.cache_max_entries.set(self.cache.max_entries as i64);
        record_data_metrics(&self.metrics, &self.data, cache_bytes(&self.cache));
        let cache = Cache::new(self.cache.ttl, self.cache.max_entries);
        let inner = Inner {
            data: ArcSwap::from_pointee(Loaded { data: self.data, epoch: 1 }),
            state: Mutex::new(State { cache, flights: AHashMap::new() }),
            pool: self.pool,
            clock: self.clock,
            metrics: self.metrics,
            cache_changed: self.cache_changed,
            cache_capacity: self.cache.max_entries,
            cache_bytes: cache_bytes(&self.cache),
            stale: tokio::sync::Notify::new(),
        };
        Engine { inner: Arc::new(inner) }
    }
}

impl Engine {
    /// An engine serving `data`, computing on `pool`; see [`EngineBuilder`].
    pub fn builder(data: Segments, pool: WorkerPool) -> EngineBuilder {
        EngineBuilder {
            data,
            pool,
            cache: CacheSettings { ttl: Duration::ZERO, max_entries: 1 },
            clock: Arc::new(crate::platform::clock::SystemClock),
            metrics: Arc::new(Metrics::new()),
            cache_changed: Box::new(|| {}),
        }
    }

    /// The data version being served now.
    pub fn current(&self) -> Arc<Loaded> {
        self.inner.data.load_full()
    }

    /// The pool it computes on.
    pub fn pool(&self) -> &WorkerPool {
        &self.inner.pool
    }

    /// Serves `data` from now on, dropping the whole cache (a new data file). Tasks
    /// already running finish on the version they started with; entries of older
    /// versions are dropped and never served again.
    pub fn replace(&self, data: Segments) -> u64 {
        record_data_metrics(&self.inner.metrics, &data, self.inner.cache_bytes);
        let epoch = self.inner.data.load().epoch + 1;
        self.inner.data.store(Arc::new(Loaded { data, epoch }));
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.state.lock();
        state.cache.purge(epoch, now);
        self.inner.metrics.cache_entries.set(state.cache.len() as i64);
        drop(state);
        (self.inner.cache_changed)();
        epoch
    }

    /// Serves the data through the stored index files of the segments whose indexes were
    /// built here (see [`Segments::with_stored_indexes`]), keeping the epoch and the
    /// cache: the same files, so nothing a task sees changes; the heap copies are freed
    /// when the last task using them ends. Returns the version it replaced, weakly (it
    /// is gone once that last task ends), or `None` when it did not swap: no such file
    /// holds this version, or the data changed meanwhile (a reload won the race; its own
    /// indexes are stored and swapped after it).
    pub fn use_stored_indexes(&self, files: &IndexFiles) -> Option<Weak<Loaded>> {
        let old = self.current();
        let data = old.data.with_stored_indexes(files)?;
        debug_assert_eq!(data.identity(), old.data.identity());
        let next = Arc::new(Loaded { data, epoch: old.epoch });
        let record = Arc::clone(&next);
        let previous = self.inner.data.compare_and_swap(&old, next);
        if !Arc::ptr_eq(&*previous, &old) {
            return None;
        }
        record_data_metrics(&self.inner.metrics, &record.data, self.inner.cache_bytes);
        Some(Arc::downgrade(&old))
    }

    /// Serves the current segments without those named in `removed` and with `added`
    /// (a name in both, or an added name already served, is a replacement), keeping the
    /// cache: the statistics are exact partials that merge, so a cached phone the change
    /// does not touch stays as it is, one with records in the added segments only gets
    /// them merged in, and one with records in a segment that goes (removed or replaced)
    /// is dropped and recomputed when next asked for.
    ///
    /// Blocks: it reads the added segments' records of the cached phones they touch, on
    /// `pool` (the reload watcher's own), before the swap; the engine's lock is held only
    /// to list the cached phones and, after the swap, to move the entries (one lookup per
    /// entry in the changed segments' indexes). Tasks see the old set or the new one,
    /// whole. Fails, changing nothing, if an added segment changed while it was read.
    pub fn join(&self, added: Vec<Arc<Segment>>, removed: &[String], pool: &WorkerPool) -> Result<Joined, StaleData> {
        let old = self.current();
        let next = old.data.changed(&added, removed);
        let going = old.data.going(&added, removed);
        let cached = self.inner.state.lock().cache.phones(old.epoch, self.inner.clock.now_ms());
        let touched: Vec<u64> =
            cached.into_iter().filter(|&phone| in_any(&added, phone) && !in_any(&going, phone)).collect();
        let partials = compute::compute(&Segments::of(added.clone()), &touched, pool)?;
        let partials: AHashMap<u64, CallStats> = touched.into_iter().zip(partials).collect();

        record_data_metrics(&self.inner.metrics, &next, self.inner.cache_bytes);
        let epoch = old.epoch + 1;
        self.inner.data.store(Arc::new(Loaded { data: next, epoch }));
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.state.lock();
        let locked = std::time::Instant::now();
        let advanced = state.cache.advance(old.epoch, epoch, now, |phone, stats| {
            if in_any(&going, phone) {
                return Fate::Drop;
            }
            if !in_any(&added, phone) {
                return Fate::Keep;
            }
            // Cached after the list above was taken: its new records were not read.
            let Some(partial) = partials.get(&phone) else { return Fate::Drop };
            let mut merged = *stats;
            merged.merge(partial);
            Fate::Replace(answer(phone, merged))
        });
        self.inner.metrics.cache_entries.set(state.cache.len() as i64);
        let cache_locked = locked.elapsed();
        drop(state);
        (self.inner.cache_changed)();
        Ok(Joined { epoch, cache: advanced, cache_locked })
    }

    /// Resolves when a computation finds the data file changed in place.
    pub async fn stale_data(&self) {
        self.inner.stale.notified().await;
    }

    /// The answer (statistics and report entry) for each of `phones` (distinct), all
    /// from one data version. A task of more than [`POOL_LOOKUP_PHONES`] is looked up on
    /// the pool, so that its cache lookups and index reads do not hold the async thread.
    pub async fn stats(&self, phones: &[u64]) -> Result<Vec<Answer>, EngineError> {
        let Lookup { mut result, waits } = if phones.len() > POOL_LOOKUP_PHONES {
            let (engine, phones) = (self.clone(), phones.to_vec());
            self.inner.pool.run(move || engine.look_up(&phones)).await?
        } else {
            self.look_up(phones)
        };
        for (i, flight) in waits {
            result[i] = Some(flight.landed().await.ok_or(Abandoned)??);
        }
        result.into_iter().map(|answer| answer.ok_or(EngineError::Abandoned(Abandoned))).collect()
    }

    /// What can be known of `phones` without waiting: the cached answers, the phones
    /// without records, and a flight for each of the rest, joined or started here (the
    /// phones this task computes are computed inline when they are few records, else
    /// on the pool). Never blocks on another task.
    fn look_up(&self, phones: &[u64]) -> Lookup {
        let loaded = self.current();
        let epoch = loaded.epoch;
        let now = self.inner.clock.now_ms();
        let mut result: Vec<Option<Answer>> = vec![None; phones.len()];
        let mut waits = Vec::new();
        let mut owned = Vec::new();
        let mut hits = 0;
        let mut missing = Vec::new();
        // Where the missed phones' records are (`missing` order), and which of them this
        // task computes (`owned` order).
        let mut located = Located::default();
        let mut owned_slots = Vec::new();
        {
            let mut state = self.inner.state.lock();
            for (i, &phone) in phones.iter().enumerate() {
                match state.cache.get(phone, epoch, now) {
                    Some(answer) => {
                        result[i] = Some(answer);
                        hits += 1;
                    }
                    None => missing.push(i),
                }
            }
        }
        let mut empty = 0;
        if !missing.is_empty() {
            // The index is read outside the lock, the misses side by side: on a phone book
            // each lookup is a chain of cache misses, and they would hold every other task.
            let asked: Vec<u64> = missing.iter().map(|&i| phones[i]).collect();
            located = loaded.data.locate(&asked);
            let mut state = self.inner.state.lock();
            for (k, &i) in missing.iter().enumerate() {
                let phone = phones[i];
                if let Some(answer) = state.cache.get(phone, epoch, now) {
                    // Cached by another task since the look above.
                    result[i] = Some(answer);
                    hits += 1;
                } else if !located.has_records(k) {
                    // Nothing to compute, and not cached: unknown phones cannot grow the cache.
                    result[i] = Some(answer(phone, CallStats::EMPTY));
                    empty += 1;
                } else {
                    let flight = match state.flights.get(&(epoch, phone)) {
                        Some(flight) => flight.clone(),
                        None => {
                            let (landing, waiting) = flight::flight();
                            state.flights.insert((epoch, phone), waiting.clone());
                            owned.push((phone, landing));
                            owned_slots.push(k);
                            waiting
                        }
                    };
                    waits.push((i, flight));
                }
            }
        }
        let metrics = &self.inner.metrics;
        metrics.phones_from(Source::Cache, hits);
        metrics.phones_from(Source::NoRecords, empty);
        metrics.phones_from(Source::Computed, owned.len() as u64);
        metrics.phones_from(Source::Shared, (waits.len() - owned.len()) as u64);
        if !owned.is_empty() {
            let located = located.select(&owned_slots);
            if located.bytes() <= compute::INLINE_BYTES {
                // A few records (a phone book's phones have a handful each): reading them
                // here costs less than the hop to the pool and back (see `compute`).
                self.inner.compute_flights(&loaded, owned, Some(&located));
            } else {
                let inner = Arc::clone(&self.inner);
                // The computation publishes its own results, so it completes (and fills
                // the cache for everyone) even if this task is dropped while waiting. It
                // looks the phones up again there: what `located` borrows stays here.
                self.inner.pool.spawn(move || inner.compute_flights(&loaded, owned, None));
            }
        }
        Lookup { result, waits }
    }

    /// Puts back snapshot entries computed from the data being served; returns how many
    /// are cached afterwards.
    pub fn restore(&self, entries: &[CachedPhone]) -> usize {
        let epoch = self.current().epoch;
        let mut state = self.inner.state.lock();
        state.cache.restore(entries, epoch, self.inner.clock.now_ms(), |p| answer(p.phone, p.stats));
        self.inner.metrics.cache_entries.set(state.cache.len() as i64);
        state.cache.len()
    }

    /// What the snapshot should save now: the entries changed since the last call, of
    /// the file being served. Under the lock every task takes, so it copies only what
    /// changed.
    pub fn snapshot_delta(&self) -> Delta {
        let loaded = self.current();
        let now_ms = self.inner.clock.now_ms();
        let mut state = self.inner.state.lock();
        let entries = state.cache.take_changes(loaded.epoch, now_ms);
        let capacity = self.inner.cache_capacity;
        drop(state);
        Delta { identity: loaded.data.identity(), entries, now_ms, capacity }
    }

    /// Every live cache entry of the data being served, and that data's identity: what
    /// a new snapshot base holds. Copies the whole cache under the lock (one pass over
    /// its slots, a few milliseconds for 100,000 entries), once per compaction.
    pub fn snapshot_base(&self) -> (DataIdentity, Vec<CachedPhone>) {
        let loaded = self.current();
        let entries = self.inner.state.lock().cache.fresh_entries(loaded.epoch, self.inner.clock.now_ms());
        (loaded.data.identity(), entries)
    }

    /// Every live cache entry (tests and tools; copies the whole cache under the lock).
    pub fn cached(&self) -> Vec<CachedPhone> {
        let loaded = self.current();
        self.inner.state.lock().cache.fresh_entries(loaded.epoch, self.inner.clock.now_ms())
    }
}

impl Inner {
    /// Computes the phones this task owns (located in `loaded` already if `located` is
    /// given, in `owned` order), caches them and hands every waiter its result. Runs on
    /// the pool, or inline for a few records.
    fn compute_flights(&self, loaded: &Loaded, owned: Vec<(u64, Landing)>, located: Option<&Located<'_>>) {
        /// Removes the flights if the computation ends without landing them (a panic),
        /// so no later task joins a computation that will never finish.
        struct Land<'a> {
            state: &'a Mutex<State>,
            epoch: u64,
            phones: Vec<u64>,
        }
        impl Drop for Land<'_> {
            fn drop(&mut self) {
                if self.phones.is_empty() {
                    return;
                }
                let mut state = self.state.lock();
                for phone in &self.phones {
                    state.flights.remove(&(self.epoch, *phone));
                }
            }
        }
        let phones: Vec<u64> = owned.iter().map(|(phone, _)| *phone).collect();
        let mut land = Land { state: &self.state, epoch: loaded.epoch, phones };
        let computed = match located {
            Some(located) => compute::compute_located(&loaded.data, &land.phones, located, &self.pool),
            None => compute::compute(&loaded.data, &land.phones, &self.pool),
        };
        if computed.is_err() {
            self.stale.notify_one();
        }
        let now = self.clock.now_ms();
        let current = self.data.load().epoch == loaded.epoch;
        // Report entries are serialised here, on the pool, once per computation.
        let answers: Result<Vec<Answer>, StaleData> =
            computed.map(|all| land.phones.iter().zip(all).map(|(&phone, stats)| answer(phone, stats)).collect());
        let mut state = self.state.lock();
        for (k, (phone, landing)) in owned.iter().enumerate() {
            let result = answers.as_ref().map(|all| all[k].clone()).map_err(Clone::clone);
            if let (Ok(answer), true) = (&result, current) {
                state.cache.insert(*phone, answer.clone(), loaded.epoch, now);
            }
            state.flights.remove(&(loaded.epoch, *phone));
            landing.set(result);
        }
        // Landed: every flight was removed above, under the same lock as the cache
        // inserts; nothing is left for the guard.
        land.phones.clear();
        self.metrics.cache_entries.set(state.cache.len() as i64);
        let changed = current && answers.is_ok() && state.cache.enabled();
        drop(state);
        // Wakes the tasks waiting for these phones, outside the lock.
        drop(owned);
        if changed {
            (self.cache_changed)();
        }
    }
}

/// A task of more phones than this is looked up on the pool (see [`Engine::stats`]): its
/// lookups take a millisecond or more (10,000 phones that all miss on a phone book:
/// several milliseconds), the async thread's time for hundreds of small tasks.
pub const POOL_LOOKUP_PHONES: usize = 256;

/// What [`Engine::look_up`] found: an answer per phone already known, and the flights
/// (with the phone's position) still to wait for.
struct Lookup {
    result: Vec<Option<Answer>>,
    waits: Vec<(usize, Waiting)>,
}

/// What [`Engine::join`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The new data version.
    pub epoch: u64,
    /// Cached phones kept as they were, updated with the new records, or dropped.
    pub cache: Advanced,
    /// How long the cache was locked to move it (tasks' lookups waited that long).
    pub cache_locked: Duration,
}

/// How the engine caches: for how long, and how many phones at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Zero disables the cache.
    pub ttl: Duration,
    /// The most phones held.
    pub max_entries: usize,
}

/// A phone's answer: its statistics and its report entry, serialised once.
fn answer(phone: u64, stats: CallStats) -> Answer {
    Answer { json: crate::message::phone_json(phone, &stats), stats }
}

/// Heap a running service needs besides its index and its cache (the runtime, the
/// prefetched tasks and their reports, lapin's buffers, the allocator's slack): the
/// allowance in `report_service_memory_bound_bytes`. Measured: 25-40 MiB under load on
/// the reference data with an empty cache (README, "Memory").
const MEMORY_ALLOWANCE: usize = 64 << 20;

/// Heap a full cache takes, with what the snapshot writer keeps to fold its journal (a
/// disabled cache keeps neither).
fn cache_bytes(settings: &CacheSettings) -> usize {
    if settings.ttl.is_zero() {
        return 0;
    }
    settings
        .max_entries
        .saturating_mul(ENTRY_BYTES)
        .saturating_add(crate::engine::snapshot::fold_bytes(settings.max_entries))
}

fn record_data_metrics(metrics: &Metrics, data: &Segments, cache_bytes: usize) {
    let summary = data.summary();
    let bound = summary.heap_bytes.saturating_add(cache_bytes).saturating_add(MEMORY_ALLOWANCE);
    metrics.memory_bound_bytes.set(i64::try_from(bound).unwrap_or(i64::MAX));
    metrics.data_bytes.set(data.identity().len as i64);
    metrics.data_records.set(summary.records as i64);
    metrics.data_phones.set(summary.phones as i64);
    metrics.data_segments.set(data.parts().len() as i64);
    metrics.index_build_seconds.set(data.build_time().as_secs_f64());
}

/// Whether any of `parts` has records of `phone`.
fn in_any(parts: &[Arc<Segment>], phone: u64) -> bool {
    parts.iter().any(|part| !part.dataset().index().spans(phone).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::clock::ManualClock;
    use futures_util::FutureExt;
    use futures_util::future::join_all;

    fn dataset(dir: &std::path::Path, pool: &WorkerPool) -> Segments {
        let path = dir.join("data.json");
        std::fs::write(&path, crate::data::testdata::records(5, 1_000, false)).unwrap();
        Segments::open(&path, pool).unwrap()
    }

    /// A one-thread pool blocked until the returned sender is dropped or sent to.
    fn held_pool() -> (WorkerPool, std::sync::mpsc::Sender<()>) {
        let pool = WorkerPool::new("test", 1).unwrap();
        let (release, latch) = std::sync::mpsc::channel::<()>();
        pool.spawn(move || {
            let _ = latch.recv();
        });
        (pool, release)
    }

    fn engine(ttl: Duration, pool: WorkerPool, dir: &std::path::Path) -> (Engine, Arc<Metrics>) {
        let data = dataset(dir, &WorkerPool::new("test-data", 1).unwrap());
        let metrics = Arc::new(Metrics::new());
        let engine = Engine::builder(data, pool)
            .cache(CacheSettings { ttl, max_entries: 1_000 })
            .clock(Arc::new(ManualClock::new(1_000)))
            .metrics(Arc::clone(&metrics))
            .build();
        (engine, metrics)
    }

    #[tokio::test]
    async fn concurrent_misses_of_a_phone_are_computed_once_even_without_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, release) = held_pool();
        let (engine, metrics) = engine(Duration::ZERO, pool, dir.path());
        let mut all = std::pin::pin!(join_all((0..50).map(|_| engine.stats(&[1, 2, 99]))));
        // One poll registers every request while the pool is held: none can finish first.
        assert!((&mut all).now_or_never().is_none());
        release.send(()).unwrap();
        let results = all.await;
        let expected = compute::compute(&engine.current().data, &[1, 2, 99], engine.pool()).unwrap();
        for result in results {
            let stats: Vec<CallStats> = result.unwrap().into_iter().map(|a| a.stats).collect();
            assert_eq!(stats, expected);
        }
        assert_eq!(metrics.phones_with(Source::Computed), 2);
        assert_eq!(metrics.phones_with(Source::Shared), 98);
        assert_eq!(metrics.phones_with(Source::NoRecords), 50, "phone 99 has no records: never computed");
    }

    /// A task of more than `POOL_LOOKUP_PHONES` phones is looked up on the pool (here held,
    /// so it waits), while a small one is looked up at once on the caller's thread; both
    /// answer what the computation gives.
    #[tokio::test]
    async fn a_large_task_is_looked_up_on_the_pool_and_answers_as_a_small_one() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, release) = held_pool();
        let (engine, metrics) = engine(Duration::from_secs(60), pool, dir.path());
        // Phones 0-4 have 1,000 records each; the rest none.
        let large: Vec<u64> = (0..=POOL_LOOKUP_PHONES as u64).collect();
        let mut big = std::pin::pin!(engine.stats(&large));
        assert!((&mut big).now_or_never().is_none());
        assert_eq!(metrics.phones_with(Source::NoRecords), 0, "not looked up on this thread");
        let small = engine.stats(&[900, 901]).now_or_never().expect("looked up here, nothing to wait for").unwrap();
        assert_eq!(small.iter().map(|a| a.stats).collect::<Vec<_>>(), [CallStats::EMPTY; 2]);
        release.send(()).unwrap();
        let answers: Vec<CallStats> = big.await.unwrap().into_iter().map(|a| a.stats).collect();
        assert_eq!(answers, compute::compute(&engine.current().data, &large, engine.pool()).unwrap());
        assert_eq!(answers.iter().filter(|s| s.records == 1_000).count(), 5);
        assert_eq!(metrics.phones_with(Source::Computed), 5);
    }

    #[tokio::test]
    async fn a_computation_outlives_the_task_that_started_it() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, release) = held_pool();
        let (engine, metrics) = engine(Duration::from_secs(60), pool, dir.path());
        let mut owner = Box::pin(engine.stats(&[3]));
        assert!((&mut owner).now_or_never().is_none());
        drop(owner);
        let mut joiner = std::pin::pin!(engine.stats(&[3]));
        assert!((&mut joiner).now_or_never().is_none());
        release.send(()).unwrap();
        assert_eq!(joiner.await.unwrap()[0].stats.records, 1_000);
        assert_eq!((metrics.phones_with(Source::Computed), metrics.phones_with(Source::Shared)), (1, 1));
        assert_eq!(engine.stats(&[3]).await.unwrap()[0].stats.records, 1_000);
        assert_eq!(metrics.phones_with(Source::Cache), 1, "and its result was cached");
    }

    #[tokio::test]
    async fn a_replaced_dataset_is_served_and_old_entries_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WorkerPool::new("test", 2).unwrap();
        let (engine, metrics) = engine(Duration::from_secs(60), pool.clone(), dir.path());
        assert_eq!(engine.stats(&[1]).await.unwrap()[0].stats.records, 1_000);
        let other = tempfile::tempdir().unwrap();
        let path = other.path().join("data.json");
        std::fs::write(&path, br#"[{"phone":1,"start_date":0,"end_date":1000}]"#).unwrap();
        assert_eq!(engine.replace(Segments::open(&path, &pool).unwrap()), 2);
        assert_eq!(engine.stats(&[1]).await.unwrap()[0].stats.records, 1);
        assert_eq!(metrics.phones_with(Source::Cache), 0, "the old entry was never served");
        assert_eq!(engine.cached().len(), 1);
    }

    #[tokio::test]
    async fn stored_indexes_replace_built_ones_keeping_the_epoch_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WorkerPool::new("test", 2).unwrap();
        let (engine, metrics) = engine(Duration::from_secs(60), pool.clone(), dir.path());
        let files = IndexFiles::new(dir.path().join("indexes"));
        assert!(engine.use_stored_indexes(&files).is_none(), "no index file yet");
        let first = engine.stats(&[1, 2]).await.unwrap();
        assert!(engine.current().data.summary().heap_bytes > 0, "built here");
        engine.current().data.persist(&files);
        let bound = metrics.memory_bound_bytes.get();

        let in_use = engine.current();
        let replaced = engine.use_stored_indexes(&files).expect("swapped");
        assert!(Arc::ptr_eq(&replaced.upgrade().unwrap(), &in_use), "it hands back the version it replaced");
        drop(in_use);
        assert_eq!(replaced.strong_count(), 0, "freed once the last task using it is done");
        let now = engine.current();
        assert_eq!((now.epoch, now.data.summary().heap_bytes), (1, 0), "the same version, read in place");
        assert!(metrics.memory_bound_bytes.get() < bound, "the bound no longer counts the built index");
        let again = engine.stats(&[1, 2, 3]).await.unwrap();
        let stats = |answers: &[Answer]| answers.iter().map(|a| a.stats).collect::<Vec<_>>();
        assert_eq!(stats(&again[..2]), stats(&first));
        assert_eq!(metrics.phones_with(Source::Cache), 2, "the cache was kept");
        assert_eq!(again[2].stats, compute::compute(&now.data, &[3], &pool).unwrap()[0]);
        assert_eq!(again[2].stats.records, 1_000);
        assert!(engine.use_stored_indexes(&files).is_none(), "nothing left to swap");
    }

    /// A snapshot's new base is the live entries of the data being served, with that
    /// data's identity; expired ones and those of older data are left out.
    #[tokio::test]
    async fn the_snapshot_base_is_the_live_cache_of_the_served_data() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WorkerPool::new("test", 2).unwrap();
        let (engine, _) = engine(Duration::from_secs(60), pool, dir.path());
        let answers = engine.stats(&[1, 2, 99]).await.unwrap();
        let (identity, mut entries) = engine.snapshot_base();
        assert_eq!(identity, engine.current().data.identity());
        entries.sort_by_key(|e| e.phone);
        let phones: Vec<(u64, CallStats, u64)> = entries.iter().map(|e| (e.phone, e.stats, e.expires_ms)).collect();
        assert_eq!(phones, [(1, answers[0].stats, 61_000), (2, answers[1].stats, 61_000)], "no records: not cached");
    }

    /// The memory bound counts the index's heap, a full cache (440 bytes a phone), the
    /// snapshot compaction's copy of it (a 112-byte entry in memory and 112 encoded) and
    /// the allowance; without a cache, neither of the two.
    #[test]
    fn the_memory_bound_counts_the_cache_and_its_snapshot_only_when_caching() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path(), &WorkerPool::new("test-data", 1).unwrap());
        let index = data.summary().heap_bytes as i64;
        let bound = |ttl: Duration| {
            let metrics = Arc::new(Metrics::new());
            let pool = WorkerPool::new("test", 1).unwrap();
            Engine::builder(data.clone(), pool)
                .cache(CacheSettings { ttl, max_entries: 1_000 })
                .metrics(Arc::clone(&metrics))
                .build();
            metrics.memory_bound_bytes.get()
        };
        assert_eq!(bound(Duration::from_secs(60)), index + 1_000 * (440 + 112) + (64 << 10) + (64 << 20));
        assert_eq!(bound(Duration::ZERO), index + (64 << 20));
    }
}
