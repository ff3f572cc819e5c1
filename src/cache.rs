//! The per-phone statistics cache: a TTL map whose entries belong to one version
//! (epoch) of data.json.
//!
//! A plain data structure: it has no lock and no clock of its own (the engine owns the
//! lock and passes the time in), and it knows nothing of files; the snapshot module
//! persists what [`Cache::fresh_entries`] returns.

use crate::message::phone_json;
use crate::stats::CallStats;
use ahash::AHashMap;
use std::sync::Arc;
use std::time::Duration;

/// A phone's statistics and its serialised report entry (computed once, appended to
/// every report that hits the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub stats: CallStats,
    pub json: Arc<[u8]>,
}

impl Answer {
    pub fn new(phone: u64, stats: CallStats) -> Answer {
        Answer { json: phone_json(phone, &stats), stats }
    }
}

/// One cached phone, as the snapshot stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedPhone {
    pub phone: u64,
    /// Wall-clock expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    pub stats: CallStats,
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    expires_ms: u64,
    /// The data version the statistics were computed from.
    epoch: u64,
}

#[derive(Debug)]
pub struct Cache {
    /// Zero: caching disabled.
    ttl_ms: u64,
    entries: AHashMap<u64, Entry>,
}

impl Cache {
    pub fn new(ttl: Duration) -> Cache {
        Cache { ttl_ms: ttl.as_millis() as u64, entries: AHashMap::new() }
    }

    pub fn enabled(&self) -> bool {
        self.ttl_ms > 0
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The statistics of `phone` if cached from data `epoch` and not expired at `now_ms`.
    /// An expired or other-epoch entry is dropped on the way.
    pub fn get(&mut self, phone: u64, epoch: u64, now_ms: u64) -> Option<Answer> {
        let entry = self.entries.get(&phone)?;
        if entry.epoch == epoch && now_ms < entry.expires_ms {
            return Some(entry.answer.clone());
        }
        self.entries.remove(&phone);
        None
    }

    /// Caches the answer for `phone` computed from data `epoch` (no-op when disabled).
    pub fn insert(&mut self, phone: u64, answer: Answer, epoch: u64, now_ms: u64) {
        if self.enabled() {
            let expires_ms = now_ms.saturating_add(self.ttl_ms);
            self.entries.insert(phone, Entry { answer, expires_ms, epoch });
        }
    }

    /// Puts back entries restored from a snapshot of data `epoch`, skipping expired ones;
    /// returns how many were kept. Expiry is kept as stored, never extended.
    pub fn restore(&mut self, phones: &[CachedPhone], epoch: u64, now_ms: u64) -> usize {
        if !self.enabled() {
            return 0;
        }
        let before = self.entries.len();
        for p in phones.iter().filter(|p| now_ms < p.expires_ms) {
            // Never trust a stored expiry beyond our own TTL (a snapshot from a
            // configuration with a longer TTL).
            let expires_ms = p.expires_ms.min(now_ms.saturating_add(self.ttl_ms));
            self.entries.insert(p.phone, Entry { answer: Answer::new(p.phone, p.stats), expires_ms, epoch });
        }
        self.entries.len() - before
    }

    /// Drops expired and other-epoch entries; returns how many were dropped.
    pub fn purge(&mut self, epoch: u64, now_ms: u64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.epoch == epoch && now_ms < e.expires_ms);
        before - self.entries.len()
    }

    /// The live entries of data `epoch`, for the snapshot.
    pub fn fresh_entries(&self, epoch: u64, now_ms: u64) -> Vec<CachedPhone> {
        self.entries
            .iter()
            .filter(|(_, e)| e.epoch == epoch && now_ms < e.expires_ms)
            .map(|(&phone, e)| CachedPhone { phone, expires_ms: e.expires_ms, stats: e.answer.stats })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(records: u64) -> CallStats {
        CallStats { records, ..CallStats::EMPTY }
    }

    fn answer(records: u64) -> Answer {
        Answer::new(7, stats(records))
    }

    #[test]
    fn an_entry_is_served_until_its_ttl_and_not_after() {
        let mut cache = Cache::new(Duration::from_secs(600));
        cache.insert(7, answer(3), 1, 1_000);
        assert_eq!(cache.get(7, 1, 1_000 + 599_999), Some(answer(3)));
        assert_eq!(cache.get(7, 1, 1_000 + 600_000), None);
        assert!(cache.is_empty(), "the expired entry is dropped");
    }

    #[test]
    fn entries_of_another_data_version_are_never_served() {
        let mut cache = Cache::new(Duration::from_secs(600));
        cache.insert(7, answer(3), 1, 0);
        assert_eq!(cache.get(7, 2, 1), None);
        assert_eq!(cache.get(7, 1, 1), None, "dropped when seen under the new epoch");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let mut cache = Cache::new(Duration::ZERO);
        cache.insert(7, answer(3), 1, 0);
        assert_eq!(cache.get(7, 1, 0), None);
        assert_eq!(cache.restore(&[CachedPhone { phone: 1, expires_ms: 10, stats: stats(1) }], 1, 0), 0);
    }

    #[test]
    fn restore_skips_expired_entries_and_caps_expiry_at_the_ttl() {
        let mut cache = Cache::new(Duration::from_secs(10));
        let restored = cache.restore(
            &[
                CachedPhone { phone: 1, expires_ms: 5_000, stats: stats(1) },
                CachedPhone { phone: 2, expires_ms: 99_000_000, stats: stats(2) },
                CachedPhone { phone: 3, expires_ms: 4_000, stats: stats(3) },
            ],
            1,
            4_000,
        );
        assert_eq!(restored, 2);
        assert_eq!(cache.get(1, 1, 4_999).map(|a| a.stats), Some(stats(1)));
        assert_eq!(cache.get(2, 1, 13_999).map(|a| a.stats), Some(stats(2)));
        assert_eq!(cache.get(2, 1, 14_000), None, "capped at now + ttl");
        assert_eq!(cache.get(3, 1, 4_000), None);
    }

    #[test]
    fn purge_and_fresh_entries_see_only_live_entries_of_the_epoch() {
        let mut cache = Cache::new(Duration::from_secs(1));
        cache.insert(1, answer(1), 1, 0);
        cache.insert(2, answer(2), 1, 500);
        cache.insert(3, answer(3), 2, 500);
        let fresh = cache.fresh_entries(1, 1_200);
        assert_eq!(fresh, vec![CachedPhone { phone: 2, expires_ms: 1_500, stats: stats(2) }]);
        assert_eq!(cache.purge(1, 1_200), 2);
        assert_eq!(cache.len(), 1);
    }
}
