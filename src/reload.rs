//! Following data.json: every `DATA_POLL_INTERVAL_MS` (and at once when a computation
//! finds the file changed in place) the file's identity is compared with the one being
//! served; a new file is indexed in the background and swapped in whole.
//!
//! The contract for whoever produces data.json is "write a new file, rename it over the
//! old one": the rename is atomic, the old mapping stays valid until its last report is
//! done, and the new file is indexed while the old one keeps serving. A file that is
//! still being written (copied into place rather than renamed) keeps changing size and
//! mtime, so a new identity must hold still for [`Settling::SETTLE`] (or one poll, if
//! shorter) before it is indexed. The index build runs on a pool of its own (one thread),
//! so a reload never queues ahead of cache misses on the statistics pool. A replacement
//! that fails to index is logged and counted, the old data keeps serving, and the watcher
//! tries again only when the file changes again.

use crate::data::{Dataset, FileIdentity};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pool::WorkerPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How many replacements were swapped in and how many failed, for whoever waits for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Replacements indexed and served.
    pub swapped: u64,
    /// Replacements that could not be indexed.
    pub failed: u64,
}

/// Where the watcher looks and what it uses.
#[derive(Debug)]
pub struct Watch {
    /// The data file.
    pub path: PathBuf,
    /// How often its identity is checked (`DATA_POLL_INTERVAL_MS`).
    pub every: Duration,
    /// Indexes replacements; its own threads, not the statistics pool's.
    pub pool: WorkerPool,
}

/// Whether a new identity has held still long enough to be indexed. Pure: the caller
/// feeds it what it sees and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settling {
    /// The new identity last seen, and since when.
    candidate: Option<(FileIdentity, Instant)>,
    settle: Duration,
}

/// What to do about the file now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Nothing new (the served file, or one that already failed).
    Nothing,
    /// Changed, but not long enough ago: look again at this instant.
    LookAgainAt(Instant),
    /// Unchanged for the settle time: index it.
    Index(FileIdentity),
}

impl Settling {
    /// A file must hold still this long before it is indexed (or one poll interval,
    /// whichever is shorter).
    pub const SETTLE: Duration = Duration::from_millis(500);

    /// Settling for one poll interval `poll`, at most [`Settling::SETTLE`].
    pub fn new(poll: Duration) -> Settling {
        Settling { candidate: None, settle: poll.min(Settling::SETTLE) }
    }

    /// `seen` at `now`, where `served` is the identity being served and `failed` the
    /// last one that could not be indexed.
    pub fn observe(
        &mut self,
        seen: FileIdentity,
        served: FileIdentity,
        failed: Option<FileIdentity>,
        now: Instant,
    ) -> Settled {
        if seen == served || Some(seen) == failed {
            self.candidate = None;
            return Settled::Nothing;
        }
        match self.candidate {
            Some((candidate, since)) if candidate == seen => {
                if now.duration_since(since) >= self.settle {
                    self.candidate = None;
                    Settled::Index(seen)
                } else {
                    Settled::LookAgainAt(since + self.settle)
                }
            }
            _ => {
                self.candidate = Some((seen, now));
                Settled::LookAgainAt(now + self.settle)
            }
        }
    }
}

/// Polls the file until `shutdown`, swapping replacements into `engine`.
pub async fn watch_data(
    engine: Engine,
    watch: Watch,
    metrics: Arc<Metrics>,
    events: watch::Sender<Reloads>,
    shutdown: CancellationToken,
) {
    let Watch { path, every, pool } = watch;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last replacement that failed to index: not retried until the file changes.
    let mut failed: Option<FileIdentity> = None;
    let mut settling = Settling::new(every);
    let mut look_again: Option<Instant> = None;
    let mut missing_logged = false;
    loop {
        let look_again_at = look_again.unwrap_or_else(|| Instant::now() + every);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = tokio::time::sleep_until(look_again_at.into()), if look_again.is_some() => {}
            _ = engine.stale_data() => warn!("data.json changed under the index (edited in place?); checking it now"),
        }
        look_again = None;
        let seen = match FileIdentity::of_path(&path) {
            Ok(identity) => {
                missing_logged = false;
                identity
            }
            Err(error) => {
                if !missing_logged {
                    warn!(path = %path.display(), %error, "data.json cannot be read; still serving the version already loaded");
                    missing_logged = true;
                }
                continue;
            }
        };
        let served = engine.current().dataset.identity();
        let seen = match settling.observe(seen, served, failed, Instant::now()) {
            Settled::Nothing => continue,
            Settled::LookAgainAt(at) => {
                look_again = Some(at);
                continue;
            }
            Settled::Index(seen) => seen,
        };
        info!(path = %path.display(), bytes = seen.len, "data.json changed; indexing the new file in the background");
        let started = Instant::now();
        let (open_path, build_pool) = (path.clone(), pool.clone());
        // Shutdown does not wait for an index build: the pool job is left to finish (or
        // die with the process) and its result is dropped.
        let built = tokio::select! {
            _ = shutdown.cancelled() => return,
            built = pool.run(move || Dataset::open(&open_path, build_pool.threads())) => built,
        };
        match built {
            Ok(Ok(dataset)) => {
                let summary = dataset.index().summary();
                crate::heap::release_free_memory();
                let epoch = engine.replace(dataset);
                failed = None;
                metrics.data_reloads.inc();
                events.send_modify(|r| r.swapped += 1);
                info!(
                    epoch,
                    records = summary.records,
                    phones = summary.phones,
                    millis = started.elapsed().as_millis() as u64,
                    "new data.json swapped in; statistics of the old file are no longer served"
                );
            }
            Ok(Err(error)) => {
                failed = Some(seen);
                metrics.data_reload_failures.inc();
                events.send_modify(|r| r.failed += 1);
                error!(%error, path = %path.display(), "the replacement data.json cannot be used; still serving the previous version");
            }
            Err(error) => error!(%error, "the reload was abandoned; retrying at the next poll"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(len: u64) -> FileIdentity {
        FileIdentity { device: 1, inode: 2, len, modified_ns: len as i128 }
    }

    /// A file still being written (its size changing at every look) is never indexed;
    /// once it holds still for the settle time, it is.
    #[test]
    fn a_file_is_indexed_only_once_it_holds_still() {
        let mut settling = Settling::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let served = identity(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(settling.observe(served, served, None, at(0)), Settled::Nothing);
        assert_eq!(settling.observe(identity(10), served, None, at(0)), Settled::LookAgainAt(at(500)));
        assert_eq!(settling.observe(identity(20), served, None, at(500)), Settled::LookAgainAt(at(1_000)), "grew");
        assert_eq!(settling.observe(identity(20), served, None, at(700)), Settled::LookAgainAt(at(1_000)));
        assert_eq!(settling.observe(identity(20), served, None, at(1_000)), Settled::Index(identity(20)));
        assert_eq!(
            settling.observe(identity(30), served, Some(identity(30)), at(2_000)),
            Settled::Nothing,
            "failed before"
        );
        let mut fast = Settling::new(Duration::from_millis(20));
        assert_eq!(
            fast.observe(identity(10), served, None, at(0)),
            Settled::LookAgainAt(at(20)),
            "a shorter poll settles sooner"
        );
    }
}
