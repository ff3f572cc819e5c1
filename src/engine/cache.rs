//! The per-phone statistics cache: a TTL map of bounded size whose entries belong to one
//! version (epoch) of data.json, and which remembers what changed since the snapshot
//! last asked.
//!
//! A plain data structure: it has no lock and no clock of its own (the engine owns the
//! lock and passes the time in), and it knows nothing of files or JSON (an [`Answer`]'s
//! report entry is made by whoever computes it).
//!
//! Bounded by entries (`CACHE_MAX_ENTRIES`), not bytes: every entry has the same size
//! (fixed-width statistics and a report entry of at most ~270 bytes), so a count bounds
//! memory exactly and costs nothing to keep. When full, an entry is evicted by CLOCK
//! (second chance): entries sit in a ring of slots, a hit sets a slot's bit, and the
//! hand clears bits as it passes until it finds an entry that was not asked for since
//! its last pass (or is expired, or of old data). That approximates least-recently-used
//! with one bit per entry and O(1) amortised work under the engine's lock, keeps the
//! phones clients ask for again, and lets the one-off phones of a miss-heavy load go
//! first. All entries have the same TTL, so evicting by age instead would throw out the
//! hot phones as readily as the cold.

use crate::data::stats::CallStats;
use ahash::AHashMap;
use std::sync::Arc;
use std::time::Duration;

/// Heap one cached phone takes, its answer's JSON and the ring's bookkeeping included:
/// 435 bytes measured (`cargo run --release --example cache_memory`), rounded up. What
/// `CACHE_MAX_ENTRIES` bounds, and `report_service_memory_bound_bytes` counts.
pub const ENTRY_BYTES: usize = 440;

/// A phone's statistics and its serialised report entry (computed once, appended to
/// every report that hits the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The statistics.
    pub stats: CallStats,
    /// The phone's entry of a report's `data`, serialised.
    pub json: Arc<[u8]>,
}

/// What becomes of a cached entry when the data it was computed from changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Still exact for the new data.
    Keep,
    /// Exact with this answer instead (the old statistics merged with new records).
    Replace(Answer),
    /// No longer known to be exact: dropped, recomputed when next asked for.
    Drop,
}

/// How many entries [`Cache::advance`] kept, replaced and dropped (expired ones and
/// those of other data are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advanced {
    /// Kept as they were.
    pub kept: usize,
    /// Given a new answer.
    pub replaced: usize,
    /// Dropped.
    pub dropped: usize,
}

/// One cached phone, as the snapshot stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedPhone {
    /// The phone.
    pub phone: u64,
    /// Wall-clock expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Its statistics.
    pub stats: CallStats,
}

#[derive(Debug, Clone)]
struct Entry {
    phone: u64,
    answer: Answer,
    expires_ms: u64,
    /// The data version the statistics were computed from.
    epoch: u64,
    /// Asked for since the clock hand last passed.
    referenced: bool,
    /// Changed since the snapshot last took the changes (listed in `changed`).
    unsaved: bool,
}

/// The statistics cache: phone -> answer, each entry kept for the TTL, at most
/// `capacity` entries (CLOCK eviction), with the changes since the last snapshot listed.
#[derive(Debug)]
pub struct Cache {
    /// Zero: caching disabled.
    ttl_ms: u64,
    capacity: usize,
    /// phone -> slot.
    index: AHashMap<u64, usize>,
    /// The ring the clock hand sweeps; `None` is a free slot.
    slots: Vec<Option<Entry>>,
    /// Free slots (freed by expiry or a data swap), reused before evicting.
    free: Vec<usize>,
    hand: usize,
    /// Slots changed since the last [`Cache::take_changes`], each once.
    changed: Vec<usize>,
}

impl Cache {
    /// A cache of at most `capacity` entries (at least one), each kept for `ttl`.
    pub fn new(ttl: Duration, capacity: usize) -> Cache {
        Cache {
            ttl_ms: ttl.as_millis() as u64,
            capacity: capacity.max(1),
            index: AHashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            changed: Vec::new(),
        }
    }

    /// Whether it caches at all (a TTL above zero).
    pub fn enabled(&self) -> bool {
        self.ttl_ms > 0
    }

    /// Phones held (some perhaps expired, until swept).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds no phone.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The statistics of `phone` if cached from data `epoch` and not expired at `now_ms`.
    /// An expired entry, or one of older data, is dropped on the way; one of newer data
    /// (asked for by a task that started before a data change) is left alone.
    pub fn get(&mut self, phone: u64, epoch: u64, now_ms: u64) -> Option<Answer> {
        let slot = *self.index.get(&phone)?;
        let entry = self.slots[slot].as_mut()?;
        if entry.epoch == epoch && now_ms < entry.expires_ms {
            entry.referenced = true;
            return Some(entry.answer.clone());
        }
        if entry.epoch < epoch || now_ms >= entry.expires_ms {
            self.vacate(slot);
        }
        None
    }

    /// Caches the answer for `phone` computed from data `epoch` (no-op when disabled),
    /// evicting another entry when full.
    pub fn insert(&mut self, phone: u64, answer: Answer, epoch: u64, now_ms: u64) {
        if self.enabled() {
            let expires_ms = now_ms.saturating_add(self.ttl_ms);
            self.put(Entry { phone, answer, expires_ms, epoch, referenced: false, unsaved: false }, epoch, now_ms);
        }
    }

    /// Puts back entries restored from a snapshot of data `epoch`, skipping expired ones;
    /// returns how many were kept. Expiry is kept as stored, never extended. Later
    /// entries of a phone replace earlier ones; beyond the capacity, the latest stay.
    /// They count as saved (the snapshot holds them already).
    pub fn restore(
        &mut self,
        phones: &[CachedPhone],
        epoch: u64,
        now_ms: u64,
        answer: impl Fn(&CachedPhone) -> Answer,
    ) {
        if !self.enabled() {
            return;
        }
        for p in phones.iter().filter(|p| now_ms < p.expires_ms) {
            // Never trust a stored expiry beyond our own TTL (a snapshot from a
            // configuration with a longer TTL).
            let expires_ms = p.expires_ms.min(now_ms.saturating_add(self.ttl_ms));
            let entry =
                Entry { phone: p.phone, answer: answer(p), expires_ms, epoch, referenced: false, unsaved: false };
            self.put(entry, epoch, now_ms);
        }
        self.changed.clear();
        for entry in self.slots.iter_mut().flatten() {
            entry.unsaved = false;
        }
    }

    /// Drops every expired and other-epoch entry; returns how many were dropped.
    pub fn purge(&mut self, epoch: u64, now_ms: u64) -> usize {
        let stale: Vec<usize> = (0..self.slots.len())
            .filter(|&slot| self.slots[slot].as_ref().is_some_and(|e| e.epoch != epoch || now_ms >= e.expires_ms))
            .collect();
        for &slot in &stale {
            self.vacate(slot);
        }
        stale.len()
    }

    /// The live entries of data `epoch` changed since the last call, each once; the
    /// snapshot's increment. Costs what changed, not what is cached. Changed entries of
    /// another epoch stay listed (the data moved on between the caller's look at it and
    /// this call: the next call, for the new epoch, takes them).
    pub fn take_changes(&mut self, epoch: u64, now_ms: u64) -> Vec<CachedPhone> {
        let mut changes = Vec::with_capacity(self.changed.len());
        let slots = &mut self.slots;
        // Filtered in place, so the list keeps its allocation: under a miss-heavy load it
        // grows to tens of thousands of slots between two writes, and growing it again
        // from nothing reallocated it a dozen times a second. What stays listed is the
        // changed entries of another epoch.
        self.changed.retain(|&slot| {
            // A slot reused after an eviction is listed twice: taken once.
            let Some(entry) = slots[slot].as_mut().filter(|e| e.unsaved) else { return false };
            if now_ms >= entry.expires_ms {
                entry.unsaved = false;
                false
            } else if entry.epoch != epoch {
                true
            } else {
                entry.unsaved = false;
                changes.push(CachedPhone {
                    phone: entry.phone,
                    expires_ms: entry.expires_ms,
                    stats: entry.answer.stats,
                });
                false
            }
        });
        self.changed.dedup();
        changes
    }

    /// The live phones of data `epoch` (copied; for deciding what a data change does to
    /// them outside the lock).
    pub fn phones(&self, epoch: u64, now_ms: u64) -> Vec<u64> {
        self.slots.iter().flatten().filter(|e| e.epoch == epoch && now_ms < e.expires_ms).map(|e| e.phone).collect()
    }

    /// Moves the live entries of data `from` to data `to`, each as `fate` decides, and
    /// drops every other entry. Entries moved count as changed, since a snapshot of the
    /// new data must hold them. Costs one call of `fate` per entry.
    pub fn advance(
        &mut self,
        from: u64,
        to: u64,
        now_ms: u64,
        mut fate: impl FnMut(u64, &CallStats) -> Fate,
    ) -> Advanced {
        let mut advanced = Advanced::default();
        for slot in 0..self.slots.len() {
            let decided = match &self.slots[slot] {
                None => continue,
                Some(e) if e.epoch != from || now_ms >= e.expires_ms => None,
                Some(e) => Some(fate(e.phone, &e.answer.stats)),
            };
            let Some(entry) = self.slots[slot].as_mut() else { continue };
            match decided {
                None => {
                    self.vacate(slot);
                    continue;
                }
                Some(Fate::Drop) => {
                    self.vacate(slot);
                    advanced.dropped += 1;
                    continue;
                }
                Some(Fate::Keep) => advanced.kept += 1,
                Some(Fate::Replace(answer)) => {
                    entry.answer = answer;
                    advanced.replaced += 1;
                }
            }
            entry.epoch = to;
            if !entry.unsaved {
                entry.unsaved = true;
                self.changed.push(slot);
            }
        }
        advanced
    }

    /// Every live entry of data `epoch` (for a full snapshot; tests).
    pub fn fresh_entries(&self, epoch: u64, now_ms: u64) -> Vec<CachedPhone> {
        self.slots
            .iter()
            .flatten()
            .filter(|e| e.epoch == epoch && now_ms < e.expires_ms)
            .map(|e| CachedPhone { phone: e.phone, expires_ms: e.expires_ms, stats: e.answer.stats })
            .collect()
    }

    fn put(&mut self, mut entry: Entry, epoch: u64, now_ms: u64) {
        let slot = match self.index.get(&entry.phone) {
            Some(&slot) => slot,
            None => {
                let slot = self.free_slot(epoch, now_ms);
                self.index.insert(entry.phone, slot);
                slot
            }
        };
        let was_unsaved = self.slots[slot].as_ref().is_some_and(|e| e.unsaved && e.phone == entry.phone);
        entry.unsaved = true;
        if !was_unsaved {
            self.changed.push(slot);
        }
        self.slots[slot] = Some(entry);
    }

    /// A slot for a new entry: a free one, a new one below the capacity, else the
    /// clock's victim (whose entry is dropped).
    fn free_slot(&mut self, epoch: u64, now_ms: u64) -> usize {
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        if self.slots.len() < self.capacity {
            self.slots.push(None);
            return self.slots.len() - 1;
        }
        loop {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            match self.slots[slot].as_mut() {
                Some(entry) if entry.referenced && entry.epoch == epoch && now_ms < entry.expires_ms => {
                    entry.referenced = false;
                }
                Some(_) => {
                    self.evict(slot);
                    return slot;
                }
                None => return slot,
            }
        }
    }

    /// Empties `slot` for reuse by the caller (it is not put on the free list).
    fn evict(&mut self, slot: usize) {
        if let Some(entry) = self.slots[slot].take() {
            self.index.remove(&entry.phone);
        }
    }

    /// Empties `slot` and puts it on the free list.
    fn vacate(&mut self, slot: usize) {
        if self.slots[slot].is_some() {
            self.evict(slot);
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(records: u64) -> CallStats {
        CallStats { records, ..CallStats::EMPTY }
    }

    fn answer(records: u64) -> Answer {
        Answer { stats: stats(records), json: Arc::from(&b"{}"[..]) }
    }

    fn cache(ttl_secs: u64, capacity: usize) -> Cache {
        Cache::new(Duration::from_secs(ttl_secs), capacity)
    }

    #[test]
    fn an_entry_is_served_until_its_ttl_and_not_after() {
        let mut cache = cache(600, 10);
        cache.insert(7, answer(3), 1, 1_000);
        assert_eq!(cache.get(7, 1, 1_000 + 599_999), Some(answer(3)));
        assert_eq!(cache.get(7, 1, 1_000 + 600_000), None);
        assert!(cache.is_empty(), "the expired entry is dropped");
    }

    /// What counts as live, everywhere it is asked: an entry of the epoch asked for,
    /// strictly before its expiry. Phone 1 expires at 1,000, phone 2 at 2,000; phone 3
    /// belongs to epoch 2.
    #[test]
    fn live_means_this_epoch_and_strictly_before_expiry_for_every_reader() {
        let mut cache = cache(1, 10);
        assert!(cache.is_empty());
        cache.insert(1, answer(1), 1, 0);
        cache.insert(2, answer(2), 1, 1_000);
        cache.insert(3, answer(3), 2, 0);
        assert!(!cache.is_empty());
        let sorted = |mut phones: Vec<u64>| {
            phones.sort();
            phones
        };
        assert_eq!(sorted(cache.phones(1, 999)), [1, 2]);
        assert_eq!(sorted(cache.phones(1, 1_000)), [2], "phone 1 expires at 1,000 exactly");
        assert_eq!(sorted(cache.phones(2, 0)), [3]);
        let fresh =
            |cache: &Cache, epoch, now| sorted(cache.fresh_entries(epoch, now).iter().map(|e| e.phone).collect());
        assert_eq!(fresh(&cache, 1, 999), [1, 2]);
        assert_eq!(fresh(&cache, 1, 1_000), [2]);
        // Purging for epoch 1 at 1,000 drops phone 1 (expired) and phone 3 (other data).
        assert_eq!(cache.purge(1, 1_000), 2);
        assert_eq!((cache.len(), cache.get(2, 1, 1_999)), (1, Some(answer(2))));
        assert_eq!(cache.purge(1, 1_999), 0, "nothing live is purged");
    }

    /// The snapshot journal lists a phone once however often it changes between two
    /// takes, and again after each take in which it changed.
    #[test]
    fn a_phone_changed_twice_is_journaled_once_and_again_after_it_was_saved() {
        let mut cache = cache(600, 10);
        cache.insert(5, answer(1), 1, 0);
        cache.insert(5, answer(2), 1, 0);
        let taken = cache.take_changes(1, 0);
        assert_eq!(taken.iter().map(|c| (c.phone, c.stats.records)).collect::<Vec<_>>(), [(5, 2)]);
        assert!(cache.take_changes(1, 0).is_empty(), "nothing changed since");
        cache.insert(5, answer(3), 1, 0);
        let taken = cache.take_changes(1, 0);
        assert_eq!(taken.iter().map(|c| (c.phone, c.stats.records)).collect::<Vec<_>>(), [(5, 3)]);
    }

    #[test]
    fn advancing_keeps_replaces_or_drops_each_entry_and_lists_them_for_the_snapshot() {
        let mut cache = cache(600, 10);
        for phone in 1..=4 {
            cache.insert(phone, answer(phone), 1, 0);
        }
        cache.insert(9, answer(9), 7, 0);
        assert_eq!(cache.take_changes(1, 0).len(), 4, "the epoch-7 entry stays listed");
        let advanced = cache.advance(1, 2, 10, |phone, stats| match phone {
            1 => Fate::Keep,
            2 => Fate::Replace(answer(stats.records + 100)),
            _ => Fate::Drop,
        });
        assert_eq!(advanced, Advanced { kept: 1, replaced: 1, dropped: 2 });
        assert_eq!((cache.get(1, 2, 10), cache.get(2, 2, 10)), (Some(answer(1)), Some(answer(102))));
        assert_eq!((cache.get(3, 2, 10), cache.get(1, 1, 10)), (None, None), "a task of the old data misses");
        assert_eq!(cache.len(), 2, "and leaves the new entry; 9, of other data, was dropped");
        let mut saved: Vec<u64> = cache.take_changes(2, 10).iter().map(|c| c.phone).collect();
        saved.sort();
        assert_eq!(saved, [1, 2], "moved entries are saved again");
        let mut phones = cache.phones(2, 10);
        phones.sort();
        assert_eq!(phones, [1, 2]);
    }

    #[test]
    fn entries_of_another_data_version_are_never_served() {
        let mut cache = cache(600, 10);
        cache.insert(7, answer(3), 1, 0);
        assert_eq!(cache.get(7, 2, 1), None);
        assert_eq!(cache.get(7, 1, 1), None, "dropped when seen under the new epoch");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let mut cache = cache(0, 10);
        cache.insert(7, answer(3), 1, 0);
        assert_eq!(cache.get(7, 1, 0), None);
        cache.restore(&[CachedPhone { phone: 1, expires_ms: 10, stats: stats(1) }], 1, 0, |p| answer(p.stats.records));
        assert!(cache.is_empty());
    }

    #[test]
    fn restore_skips_expired_entries_and_caps_expiry_at_the_ttl() {
        let mut cache = cache(10, 10);
        cache.restore(
            &[
                CachedPhone { phone: 1, expires_ms: 5_000, stats: stats(1) },
                CachedPhone { phone: 2, expires_ms: 99_000_000, stats: stats(2) },
                CachedPhone { phone: 3, expires_ms: 4_000, stats: stats(3) },
            ],
            1,
            4_000,
            |p| answer(p.stats.records),
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(1, 1, 4_999).map(|a| a.stats), Some(stats(1)));
        assert_eq!(cache.get(2, 1, 13_999).map(|a| a.stats), Some(stats(2)));
        assert_eq!(cache.get(2, 1, 14_000), None, "capped at now + ttl");
        assert_eq!(cache.get(3, 1, 4_000), None);
        assert!(cache.take_changes(1, 4_000).is_empty(), "restored entries are already saved");
    }

    #[test]
    fn purge_and_fresh_entries_see_only_live_entries_of_the_epoch() {
        let mut cache = cache(1, 10);
        cache.insert(1, answer(1), 1, 0);
        cache.insert(2, answer(2), 1, 500);
        cache.insert(3, answer(3), 2, 500);
        let fresh = cache.fresh_entries(1, 1_200);
        assert_eq!(fresh, vec![CachedPhone { phone: 2, expires_ms: 1_500, stats: stats(2) }]);
        assert_eq!(cache.purge(1, 1_200), 2);
        assert_eq!(cache.len(), 1);
    }

    /// Never more than the capacity; a phone asked for again survives the sweep that
    /// evicts the phones asked for once.
    #[test]
    fn when_full_the_clock_evicts_what_was_not_asked_for_again() {
        let mut cache = cache(600, 4);
        for phone in 0..4 {
            cache.insert(phone, answer(phone), 1, 0);
        }
        assert_eq!(cache.get(2, 1, 1), Some(answer(2)), "2 is hot");
        for phone in 10..16 {
            cache.insert(phone, answer(phone), 1, 2);
            assert!(cache.len() <= 4);
            assert!(cache.get(2, 1, 3).is_some(), "2 stays while it is asked for");
        }
        assert_eq!(cache.len(), 4);
        for cold in [0, 1, 3] {
            assert_eq!(cache.get(cold, 1, 4), None, "{cold} went first");
        }
    }

    #[test]
    fn expired_entries_are_evicted_before_live_ones() {
        let mut cache = cache(10, 2);
        cache.insert(1, answer(1), 1, 0);
        cache.insert(2, answer(2), 1, 9_000);
        assert!(cache.get(1, 1, 1).is_some());
        // At 10 s, 1 has expired though it was asked for; 2 has not.
        cache.insert(3, answer(3), 1, 10_000);
        assert_eq!(cache.get(1, 1, 10_001), None);
        assert!(cache.get(2, 1, 10_001).is_some() && cache.get(3, 1, 10_001).is_some());
    }

    #[test]
    fn changes_are_what_changed_since_last_taken_each_once() {
        let mut cache = cache(600, 3);
        cache.insert(1, answer(1), 1, 0);
        cache.insert(2, answer(2), 1, 0);
        cache.insert(1, answer(5), 1, 0);
        let phones =
            |changes: Vec<CachedPhone>| changes.into_iter().map(|c| (c.phone, c.stats.records)).collect::<Vec<_>>();
        assert_eq!(phones(cache.take_changes(1, 1)), [(1, 5), (2, 2)]);
        assert!(cache.take_changes(1, 1).is_empty());
        cache.insert(3, answer(3), 1, 2);
        cache.insert(4, answer(4), 1, 2);
        let taken = phones(cache.take_changes(1, 3));
        assert_eq!(taken.len(), 2, "{taken:?}");
        assert!(taken.contains(&(4, 4)), "the new entry, in whichever slot it took");
        assert!(cache.take_changes(2, 3).is_empty(), "nothing of another data version");
        // An entry of newer data than the caller asked for stays listed, for the call
        // that asks for its data, and is taken then, once.
        cache.insert(5, answer(5), 2, 4);
        assert!(cache.take_changes(1, 4).is_empty());
        assert_eq!(phones(cache.take_changes(2, 4)), [(5, 5)]);
        assert!(cache.take_changes(2, 4).is_empty());
    }
}
