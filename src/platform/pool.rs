//! The worker pool: the threads that do the service's CPU work (index builds, statistics,
//! parsing large task bodies, building large reports), and the one way the async side
//! hands them work and waits for it without blocking the runtime.
//!
//! Every pool is named (its threads are `<name>-<i>` in `top` and in panics), logs a
//! panic in one of its jobs instead of losing it silently, and reports work that died
//! with one error of its own, [`Abandoned`]. The service runs two: `report-worker`
//! (`WORKER_THREADS` threads) for requests, and `report-reload` (one thread) for indexing
//! a replaced data.json, so a reload never queues ahead of a request.

use std::sync::Arc;
use tokio::sync::oneshot;

/// The job did not finish: a worker thread panicked while running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker pool lost the job (a worker thread panicked)")]
pub struct Abandoned;

/// A named rayon pool. Cheap to clone: a handle to the same threads.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    threads: Arc<rayon::ThreadPool>,
}

impl WorkerPool {
    /// Starts `threads` threads named `<name>-<i>`.
    pub fn new(name: &'static str, threads: usize) -> Result<WorkerPool, rayon::ThreadPoolBuildError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{name}-{i}"))
            .panic_handler(move |_| tracing::error!(pool = name, "a worker thread panicked; its job is abandoned"))
            .build()?;
        Ok(WorkerPool { threads: Arc::new(threads) })
    }

    /// The rayon pool, for code that splits its own work across it (`compute`, the
    /// index build). Blocking: call it from the pool's threads, never from async code.
    pub fn threads(&self) -> &rayon::ThreadPool {
        &self.threads
    }

    /// Runs `work` on a pool thread and waits for it without blocking the runtime.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Abandoned> {
        let (sender, receiver) = oneshot::channel();
        self.threads.spawn(move || {
            // The receiver is gone only when the task that asked was dropped (shutdown);
            // the result is then of no use to anyone.
            let _ = sender.send(work());
        });
        receiver.await.map_err(|_| Abandoned)
    }

    /// Runs `work` on a pool thread without waiting for it.
    pub fn spawn(&self, work: impl FnOnce() + Send + 'static) {
        self.threads.spawn(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_named_threads_and_a_panic_is_reported_as_abandoned() {
        let pool = WorkerPool::new("test-pool", 1).unwrap();
        let name = pool.run(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert_eq!(name.as_deref(), Some("test-pool-0"));
        let died = pool.run(|| -> u32 { panic!("injected") }).await;
        assert_eq!(died, Err(Abandoned));
        assert_eq!(pool.run(|| 7).await, Ok(7), "the pool survives its job's panic");
    }
}
