//! Following data.json: every `DATA_POLL_INTERVAL_MS` (and at once when a computation
//! finds the file changed in place) the file's identity is compared with the one being
//! served; a new file is indexed on the pool and swapped in whole.
//!
//! The contract for whoever produces data.json is "write a new file, rename it over the
//! old one": the rename is atomic, the old mapping stays valid until its last report is
//! done, and the new file is indexed while the old one keeps serving. A replacement that
//! fails to index is logged and counted, the old data keeps serving, and the watcher
//! tries again only when the file changes again.

use crate::data::{Dataset, FileIdentity};
use crate::engine::Engine;
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How many replacements were swapped in and how many failed, for whoever waits for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    pub swapped: u64,
    pub failed: u64,
}

/// Polls `path` until `shutdown`, swapping replacements into `engine`.
pub async fn watch_data(
    engine: Engine,
    path: PathBuf,
    every: Duration,
    metrics: Arc<Metrics>,
    events: watch::Sender<Reloads>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last replacement that failed to index: not retried until the file changes.
    let mut failed: Option<FileIdentity> = None;
    let mut missing_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = engine.stale_data() => warn!("data.json changed under the index (edited in place?); checking it now"),
        }
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
        if seen == engine.current().dataset.identity() || Some(seen) == failed {
            continue;
        }
        info!(path = %path.display(), bytes = seen.len, "data.json changed; indexing the new file in the background");
        let started = Instant::now();
        let (open_path, pool) = (path.clone(), Arc::clone(engine.pool()));
        // Shutdown does not wait for an index build: the pool job is left to finish (or
        // die with the process) and its result is dropped.
        let built = tokio::select! {
            _ = shutdown.cancelled() => return,
            built = engine.run_blocking(move || Dataset::open(&open_path, &pool)) => built,
        };
        match built {
            Ok(Ok(dataset)) => {
                let summary = dataset.index().summary();
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
