//! Shutdown is an input: a `CancellationToken` that SIGTERM or SIGINT cancels, and
//! that every loop of the service selects on, plus the one deadline that bounds every
//! step after it (`SHUTDOWN_TIMEOUT_SECS`, counted from the moment shutdown begins).
//!
//! The budget, as fractions of the timeout: tasks in flight may finish until 75 %, the
//! broker connection is closed by 85 %, the snapshot is flushed by 95 %; whatever does
//! not finish in its share is abandoned (the broker requeues unacked tasks; the previous
//! snapshot stays valid), so the process exits 0 within the timeout even when the broker
//! stops answering.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The shutdown signal and its deadline.
#[derive(Debug)]
pub struct Shutdown {
    token: CancellationToken,
    timeout: Duration,
    /// Set by the first caller that asks for a deadline after cancellation: every step
    /// measures from the same instant.
    began: OnceLock<Instant>,
}

impl Shutdown {
    /// A shutdown that begins when `token` is cancelled and must end within `timeout`.
    pub fn new(token: CancellationToken, timeout: Duration) -> Shutdown {
        Shutdown { token, timeout, began: OnceLock::new() }
    }

    /// The token whose cancellation begins it.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Waits for it to begin.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// Whether it has begun.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// When shutdown began (the first time anyone asks after it did; before it did, now).
    fn began(&self) -> Instant {
        if self.token.is_cancelled() { *self.began.get_or_init(Instant::now) } else { Instant::now() }
    }

    fn share(&self, fraction: f64) -> Instant {
        self.began() + self.timeout.mul_f64(fraction)
    }

    /// Tasks in flight may finish until then.
    pub fn drain_deadline(&self) -> Instant {
        self.share(0.75)
    }

    /// The broker connection is closed by then.
    pub fn close_deadline(&self) -> Instant {
        self.share(0.85)
    }

    /// The final snapshot is flushed by then.
    pub fn flush_deadline(&self) -> Instant {
        self.share(0.95)
    }

    /// The whole shutdown is over by then.
    pub fn deadline(&self) -> Instant {
        self.share(1.0)
    }

    /// Time left until `deadline` (zero once passed).
    pub fn left_until(&self, deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now())
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT. Installs the handlers before
/// returning, so a signal arriving right after is not missed.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down: no new tasks, finishing the ones in flight");
        token.cancel();
    }))
}

/// A flag set by the first SIGTERM or SIGINT, for synchronous programs (datagen): the
/// handlers run on a thread of their own. A process that is PID 1 in a container ignores
/// a signal it has no handler for; with this one, `docker compose down` stops it at once.
pub fn flag_on_signals() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Installed here, before returning, so a signal right after is not missed.
    let (mut terminate, mut interrupt) = runtime.block_on(async {
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        });
        set.store(true, Ordering::SeqCst);
    })?;
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_deadline_is_measured_from_the_same_instant_and_in_order() {
        let token = CancellationToken::new();
        let shutdown = Shutdown::new(token.clone(), Duration::from_secs(20));
        token.cancel();
        let drain = shutdown.drain_deadline();
        let (close, flush, end) = (shutdown.close_deadline(), shutdown.flush_deadline(), shutdown.deadline());
        assert_eq!(end - drain, Duration::from_secs(5));
        assert!(drain < close && close < flush && flush < end);
        assert_eq!(shutdown.deadline(), end, "fixed once shutdown began");
        assert!(shutdown.left_until(end) <= Duration::from_secs(20));
    }
}
