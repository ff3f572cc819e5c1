//! One computation of a phone's statistics, awaited by every task that asked for the
//! phone while it ran (single flight): the computing side sets the result once, and each
//! waiter reads a copy.
//!
//! A flight is made for every miss, so it is kept small: one allocation, one
//! notification list (a `tokio::sync::watch` channel, used before, keeps eight and wakes
//! them all on every send; on a miss-heavy load that was a visible share of the CPU).

use crate::data::StaleData;
use crate::engine::cache::Answer;
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// What a flight ends with: the answer, or the reason there is none; `None` when the
/// computation ended without one (it panicked or was dropped).
pub(crate) type Landed = Option<Result<Answer, StaleData>>;

#[derive(Debug, Default)]
struct Flight {
    landed: OnceLock<Landed>,
    notify: Notify,
}

/// The computing side. Waiters are woken when it is dropped: with the result set by
/// [`Landing::set`], or with `None` if it was never set.
#[derive(Debug)]
pub(crate) struct Landing(Arc<Flight>);

/// A waiting side; clone one for every task that joins the flight.
#[derive(Debug, Clone)]
pub(crate) struct Waiting(Arc<Flight>);

/// A new flight's two sides.
pub(crate) fn flight() -> (Landing, Waiting) {
    let flight = Arc::new(Flight::default());
    (Landing(Arc::clone(&flight)), Waiting(flight))
}

impl Landing {
    /// Sets the result (only the first call counts). Waiters that look see it at once;
    /// those already waiting are woken when this side is dropped, so a caller holding a
    /// lock can set under it and wake them after releasing it.
    pub(crate) fn set(&self, result: Result<Answer, StaleData>) {
        let _ = self.0.landed.set(Some(result));
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        // Never set: the computation died. Waiters must not wait for ever.
        let _ = self.0.landed.set(None);
        self.0.notify.notify_waiters();
    }
}

impl Waiting {
    /// The flight's result, once it has landed.
    pub(crate) async fn landed(&self) -> Landed {
        loop {
            // Created before the check, so it is woken by a drop between the two.
            let woken = self.0.notify.notified();
            if let Some(landed) = self.0.landed.get() {
                return landed.clone();
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::stats::CallStats;
    use futures_util::FutureExt;

    /// `waiter`'s output, or a failure if it is not woken within seconds.
    async fn woken<F: std::future::Future>(waiter: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("the waiter was never woken")
    }

    /// Comparable (`StaleData` is not).
    fn seen(landed: Landed) -> Option<Result<Answer, String>> {
        landed.map(|result| result.map_err(|error| error.to_string()))
    }

    fn answer(records: u64) -> Answer {
        Answer { stats: CallStats { records, ..CallStats::EMPTY }, json: Arc::from(&b"{}"[..]) }
    }

    #[tokio::test]
    async fn every_waiter_gets_the_result_whenever_it_looks() {
        let (landing, waiting) = flight();
        let early = waiting.clone();
        let mut early = std::pin::pin!(early.landed());
        assert!((&mut early).now_or_never().is_none(), "nothing landed yet");
        landing.set(Ok(answer(7)));
        landing.set(Ok(answer(8)));
        assert_eq!(seen(waiting.landed().await), Some(Ok(answer(7))), "set is seen at once; the first counts");
        drop(landing);
        assert_eq!(seen(woken(early).await), Some(Ok(answer(7))), "a waiter is woken by the drop");
        assert_eq!(seen(waiting.landed().await), Some(Ok(answer(7))));
    }

    #[tokio::test]
    async fn a_landing_dropped_unset_wakes_its_waiters_with_nothing() {
        let (landing, waiting) = flight();
        let task = tokio::spawn({
            let waiting = waiting.clone();
            async move { waiting.landed().await }
        });
        tokio::task::yield_now().await;
        drop(landing);
        assert_eq!(seen(woken(task).await.unwrap()), None);
        assert_eq!(seen(waiting.landed().await), None);
    }

    #[tokio::test]
    async fn a_stale_result_is_passed_on() {
        let (landing, waiting) = flight();
        landing.set(Err(StaleData::Changed));
        drop(landing);
        assert!(matches!(waiting.landed().await, Some(Err(StaleData::Changed))));
    }
}
