//! Wiring: builds the service from a [`Config`] and runs it until shutdown.
//!
//! Startup order: bind `/health` (so it reports "not ready" while loading), index the
//! data on the pool, restore the snapshot, start the snapshot writer and the data
//! watcher, then consume. Shutdown order: stop consuming and drain tasks, stop the
//! watcher, flush the snapshot, stop HTTP.

use crate::config::Config;
use crate::data::{IndexFiles, Segments};
use crate::delivery::consumer;
use crate::delivery::pipeline::Pipeline;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::sweeper::Sweeper;
use crate::delivery::topology::{QueueNames, Topology};
use crate::engine::reload::{self, Reloads};
use crate::engine::snapshot::{self, DirtyMarker, SnapshotWriter};
use crate::engine::{CacheSettings, Engine};
use crate::message::{CorrelationId, Limits, complete_report_json, dedup_phones};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::platform::clock::Clock;
use crate::platform::pool::WorkerPool;
use crate::platform::shutdown::Shutdown;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A snapshot temporary older than this was left by a crash (a write takes
/// milliseconds); younger ones may be another instance's write in progress.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(60);

/// A started service.
#[derive(Debug)]
pub struct Running {
    shutdown: Arc<Shutdown>,
    /// Consumes until shutdown, then flushes the snapshot and stops HTTP. Awaited by
    /// `stopped`.
    main: JoinHandle<()>,
    http_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    engine: Engine,
    snapshot_writes: Option<watch::Receiver<u64>>,
    reloads: watch::Receiver<Reloads>,
}

impl Running {
    /// The `/health` and `/metrics` address actually bound (`HTTP_ADDR` may use port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Its metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Its health, as `/health` reports it.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Its engine (data, cache and statistics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Counts snapshot writes (None when the cache is disabled).
    pub fn snapshot_writes(&self) -> Option<watch::Receiver<u64>> {
        self.snapshot_writes.clone()
    }

    /// Counts data.json replacements swapped in and failed.
    pub fn reloads(&self) -> watch::Receiver<Reloads> {
        self.reloads.clone()
    }

    /// The token that stops the service when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.token().clone()
    }

    /// Waits until the service has stopped (after its shutdown token is cancelled).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.main.await.context("the service's main task failed")
    }

    /// Stops the service and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.token().cancel();
        self.stopped().await
    }
}

/// Starts the service: returns once the data is indexed and consuming has begun (the
/// first connection may still be retrying).
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on HTTP_ADDR={}", config.http_addr))?;
    let http_addr = listener.local_addr()?;
    let http_stop = CancellationToken::new();
    let http =
        tokio::spawn(crate::ops::http::serve(listener, Arc::clone(&health), Arc::clone(&metrics), http_stop.clone()));
    info!(address = %http_addr, "serving /health and /metrics");

    let pool = WorkerPool::new("report-worker", config.worker_threads.get()).context("cannot start the worker pool")?;
    let index_files = IndexFiles::new(&config.index_dir);
    let data = load(&config.data_path, &pool, Some(&index_files)).await?;
    reload::record_index_origins(&data, &metrics);
    let marker = DirtyMarker::default();
    let mark = marker.clone();
    let engine = Engine::builder(data, pool.clone())
        .cache(CacheSettings { ttl: config.cache_ttl, max_entries: config.cache_max_entries.get() })
        .clock(clock)
        .metrics(Arc::clone(&metrics))
        .on_cache_change(move || mark.mark())
        .build();
    let writer = if config.cache_ttl.is_zero() {
        info!("cache disabled (CACHE_TTL_SECS=0): no snapshot is read or written");
        None
    } else {
        let stale = crate::platform::atomic_file::remove_stale_temporaries(&config.snapshot_path, STALE_TEMPORARY);
        if stale > 0 {
            info!(removed = stale, "removed snapshot temporaries left by an earlier crash");
        }
        restore(&config.snapshot_path, &engine);
        let source_engine = engine.clone();
        let source: snapshot::Source = Box::new(move || source_engine.snapshot_delta());
        let base_engine = engine.clone();
        let everything: snapshot::Everything = Box::new(move || base_engine.snapshot_base());
        let writer = SnapshotWriter::spawn(
            marker,
            config.snapshot_path.clone(),
            config.snapshot_interval,
            source,
            everything,
            Arc::clone(&metrics),
        )
        .context("cannot start the snapshot writer")?;
        Some(writer)
    };
    let snapshot_writes = writer.as_ref().map(SnapshotWriter::written);
    health.set_index_ready(true);

    let shutdown = Arc::new(Shutdown::new(CancellationToken::new(), config.shutdown_timeout));
    let instance = instance_name();
    let retry = RetryPolicy { max_attempts: config.max_attempts, first_delay: config.retry_delay };
    let topology = topology(&config, &retry, &instance);
    let pipeline = Arc::new(Pipeline {
        engine: engine.clone(),
        pool,
        limits: Limits { max_task_bytes: config.max_task_bytes.get(), max_phones: config.max_phones_per_task.get() },
        metrics: Arc::clone(&metrics),
        retry,
        topology,
        instance,
    });
    let sweeper = Sweeper::new(&pipeline.topology, &pipeline.instance);
    let serve = consumer::serve(pipeline, Arc::clone(&health), sweeper, Arc::clone(&shutdown));
    let (reload_events, reloads) = watch::channel(Reloads::default());
    let reload_pool = WorkerPool::new("report-reload", 1).context("cannot start the reload thread")?;
    // The indexes built at startup are stored for the next start, on the reload thread,
    // once the service is up (not on the way to readiness).
    let (served, files, index_metrics) = (engine.current().data.clone(), index_files.clone(), Arc::clone(&metrics));
    let (persist_engine, persist_pool) = (engine.clone(), reload_pool.clone());
    reload_pool.spawn(move || reload::persist_indexes(&persist_engine, served, &files, &index_metrics, &persist_pool));
    let watch = reload::Watch {
        path: config.data_path.clone(),
        every: config.data_poll_interval,
        pool: reload_pool,
        index_files,
    };
    let watcher = tokio::spawn(reload::watch_data(
        engine.clone(),
        watch,
        Arc::clone(&metrics),
        reload_events,
        shutdown.token().clone(),
    ));
    let stopping = Arc::clone(&shutdown);
    let main = tokio::spawn(async move {
        serve.await;
        if let Err(error) = watcher.await {
            warn!(%error, "the data watcher failed");
        }
        if let Some(writer) = writer {
            // Joining the writer thread blocks: not on the runtime's threads. If the disk
            // does not finish in time, the process leaves without it: the previous
            // snapshot stays intact (writes are atomic).
            let flush = tokio::task::spawn_blocking(move || writer.shutdown());
            match tokio::time::timeout_at(stopping.flush_deadline().into(), flush).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "the snapshot writer thread could not be joined"),
                Err(_) => warn!("the final snapshot flush did not finish before the shutdown deadline"),
            }
        }
        http_stop.cancel();
        if tokio::time::timeout_at(stopping.deadline().into(), http).await.is_err() {
            warn!("the HTTP endpoint did not stop before the shutdown deadline");
        }
        info!("stopped");
    });
    Ok(Running { shutdown, main, http_addr, metrics, health, engine, snapshot_writes, reloads })
}

/// This process among the fleet: host name and pid, in connection names and dead-letter
/// headers.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host} pid {}", std::process::id())
}

/// The `rabbitmqctl` command granting `AMQP_URL`'s user on its vhost the least the
/// service needs (`report-service permissions`).
pub fn permissions_command(config: &Config) -> String {
    let uri = config.amqp_urls.first().uri();
    let retry = RetryPolicy { max_attempts: config.max_attempts, first_delay: config.retry_delay };
    topology(config, &retry, "").permissions().command(&uri.vhost, &uri.authority.userinfo.username)
}

/// The service's queues and brokers, from its settings.
fn topology(config: &Config, retry: &RetryPolicy, instance: &str) -> Topology {
    let names = QueueNames {
        tasks: config.task_queue.clone(),
        reports: config.report_queue.clone(),
        dead_letters: config.dead_letter_queue.clone(),
    };
    Topology::new(
        config.amqp_urls.clone(),
        config.tls.clone(),
        names,
        config.queue_type,
        retry,
        config.prefetch.get(),
        instance,
    )
}

/// One report without a broker (`report-service report`): `data` indexed, `phones`
/// computed and the report serialised by the worker's own path, with no cache.
pub async fn report_once(
    data: &Path,
    phones: &[u64],
    correlation_id: &CorrelationId,
    threads: std::num::NonZeroUsize,
) -> anyhow::Result<Vec<u8>> {
    let pool = WorkerPool::new("report-worker", threads.get()).context("cannot start the worker pool")?;
    let data = load(data, &pool, None).await?;
    let engine = Engine::builder(data, pool).build();
    let (received, started) = (std::time::SystemTime::now(), std::time::Instant::now());
    let answers = engine.stats(&dedup_phones(phones.iter().copied())).await?;
    let entries = answers.iter().map(|a| &a.json[..]);
    Ok(complete_report_json(correlation_id, received, entries, || started.elapsed()))
}

/// Maps and indexes the data (a file, or a directory's segments) on the pool, reading
/// each segment's index from `files` when they hold one of exactly that file.
pub async fn load(path: &Path, pool: &WorkerPool, files: Option<&IndexFiles>) -> anyhow::Result<Segments> {
    let (path_buf, build_pool, files) = (path.to_owned(), pool.clone(), files.cloned());
    let data = pool
        .run(move || match &files {
            Some(files) => Segments::open_persisted(&path_buf, &build_pool, files),
            None => Segments::open(&path_buf, &build_pool),
        })
        .await
        .context("the index build was abandoned")?
        .with_context(|| format!("cannot use DATA_PATH={}", path.display()))?;
    let summary = data.summary();
    let (indexes_loaded, indexes_built, indexes_rebuilt) = data.index_origins();
    info!(
        path = %path.display(),
        segments = data.parts().len(),
        indexes_loaded,
        indexes_built,
        indexes_rebuilt,
        bytes = data.identity().len,
        records = summary.records,
        phones = summary.phones,
        spans = summary.spans,
        index_heap_bytes = summary.heap_bytes,
        millis = data.build_time().as_millis() as u64,
        "data indexed"
    );
    if data.parts().is_empty() {
        warn!(path = %path.display(), "the data directory holds no *.json segment yet: every phone has no records");
    }
    if summary.negative_durations > 0 {
        warn!(
            records = summary.negative_durations,
            "records with end_date before start_date: kept, with negative durations"
        );
    }
    Ok(data)
}

/// Restores the snapshot if it belongs to the data being served. A snapshot that cannot
/// be used is logged and moved aside; the service starts with an empty cache.
fn restore(path: &Path, engine: &Engine) {
    let identity = engine.current().data.identity();
    match snapshot::load(path) {
        Ok(None) => info!(path = %path.display(), "no cache snapshot; starting with an empty cache"),
        Ok(Some(snapshot)) if snapshot.identity == identity => {
            if snapshot.torn {
                warn!(path = %path.display(), "the snapshot's last batch was torn by a crash; restoring the rest");
            }
            let restored = engine.restore(&snapshot.entries);
            info!(path = %path.display(), restored, stored = snapshot.entries.len(), "cache restored from snapshot");
        }
        Ok(Some(_)) => info!(path = %path.display(), "cache snapshot belongs to other data; ignored"),
        Err(error) => {
            let now = crate::platform::clock::SystemClock.now_ms();
            // An unreadable file (permissions) may not be movable either: then it stays,
            // and is overwritten by the next snapshot write.
            let aside = snapshot::quarantine(path, now).ok();
            warn!(
                path = %path.display(),
                %error,
                moved_to = aside.as_ref().map(|p| p.display().to_string()),
                "unusable cache snapshot; starting with an empty cache"
            );
        }
    }
}
