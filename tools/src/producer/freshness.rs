//! How fresh the answers are: the time from a segment's rename into the data directory to
//! the first report that includes its records.
//!
//! One phone is asked for back to back (one task in flight, one reply queue) before and
//! after the rename; the first report whose record count for it differs from the count
//! before marks the segment as served. The resolution is one task's round trip.

use super::client::{Client, ClientError, reply_id, task_body};
use futures_util::StreamExt;
use sonic_rs::JsonValueTrait;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FreshnessOptions {
    /// The new segment, already written (on the data directory's filesystem).
    pub segment: PathBuf,
    /// The data directory it is renamed into.
    pub into: PathBuf,
    /// A phone the segment has records of.
    pub phone: u64,
    /// How long to wait for a report that includes it.
    pub timeout: Duration,
}

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Freshness {
    /// From the rename to the first report including the segment.
    pub millis: f64,
    /// Tasks answered after the rename, that one included.
    pub tasks: u64,
    /// The phone's record count before and after.
    pub records_before: u64,
    /// The phone's record count in the first report including the segment.
    pub records_after: u64,
}

/// Why the measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    /// Talking to the broker failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The rename failed.
    #[error("cannot rename {from} into {into}: {source}")]
    Rename {
        /// The segment.
        from: PathBuf,
        /// The data directory.
        into: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A report without the phone's record count.
    #[error("a report without data[0].cnt_all_attempts: {0}")]
    Report(String),
    /// No report included the segment in time.
    #[error("no report included the segment within {0:?} ({1} tasks answered)")]
    Timeout(Duration, u64),
}

/// Renames `options.segment` into `options.into` and measures how long until a report
/// includes it.
pub async fn freshness(client: &Client, options: &FreshnessOptions) -> Result<Freshness, FreshnessError> {
    let (queue, mut replies) = client.reply_queue().await?;
    let mut next_id = 1u64;
    let mut ask = async || -> Result<u64, FreshnessError> {
        let id = next_id;
        next_id += 1;
        client.send(&task_body(id, &[options.phone]), Some(&queue)).await?;
        loop {
            let delivery = tokio::time::timeout(options.timeout, replies.next())
                .await
                .map_err(|_| ClientError::Timeout(options.timeout))?
                .ok_or(ClientError::Timeout(options.timeout))?
                .map_err(|source| ClientError::Amqp { operation: "consume", source })?;
            if reply_id(&delivery) != Some(id) {
                continue;
            }
            let unusable = || FreshnessError::Report(String::from_utf8_lossy(&delivery.data).into_owned());
            let report: sonic_rs::Value = sonic_rs::from_slice(&delivery.data).map_err(|_| unusable())?;
            return report["data"][0]["cnt_all_attempts"].as_u64().ok_or_else(unusable);
        }
    };
    let records_before = ask().await?;
    let target = options.into.join(options.segment.file_name().unwrap_or_default());
    let rename_error =
        |source| FreshnessError::Rename { from: options.segment.clone(), into: options.into.clone(), source };
    std::fs::rename(&options.segment, &target).map_err(rename_error)?;
    let renamed = Instant::now();
    let mut tasks = 0;
    while renamed.elapsed() < options.timeout {
        let records_after = ask().await?;
        tasks += 1;
        if records_after != records_before {
            let millis = renamed.elapsed().as_secs_f64() * 1_000.0;
            return Ok(Freshness { millis, tasks, records_before, records_after });
        }
    }
    Err(FreshnessError::Timeout(options.timeout, tasks))
}
