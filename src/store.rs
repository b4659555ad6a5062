//! The embedded store: completed, held and not-replayable keys, bounded and expiring.
//!
//! Bounds (`max_entries`, `max_bytes`) count stored records, held keys and the slots
//! reserved by flights in progress. Only completed records (responses and not-replayable
//! markers) are evictable, least recently used first; held keys and in-flight slots never
//! are, so when nothing is evictable a new key is refused ([`StoreFull`]) rather than
//! weakening the guarantee silently. Capacity evictions and expiries are counted apart.
//!
//! One mutex guards the maps: every operation is a few hash and B-tree steps with no I/O
//! and no allocation beyond the entry itself, so contention stays short.
//!
//! Time is `tokio::time::Instant` so the coordination tests can run under paused time.

use crate::key::{DedupKey, Fingerprint};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// A complete upstream response as kept for replay: end-to-end headers only.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// Status code.
    pub status: u16,
    /// End-to-end headers in upstream order, multi-valued headers as separate entries.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body.
    pub body: Bytes,
    /// When the upstream call completed; `Age` is counted from here.
    pub completed_at: Instant,
}

impl StoredResponse {
    /// Bytes this response counts against `max_bytes`: status, headers and body as serialized.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        (16 + headers + self.body.len()) as u64
    }
}

/// The answer a held key gives until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// 502 (reset, cut off, upstream 502) or 504 (timeout, upstream 504).
    pub status: u16,
    /// When the key is freed: the call's start plus the upstream total deadline.
    pub until: Instant,
}

/// What a completed key holds.
#[derive(Debug, Clone)]
pub enum Record {
    /// A stored response, replayed to later requests.
    Response(Arc<StoredResponse>),
    /// The response was streamed to the leader only; later requests get 409 not-replayable.
    NotReplayable,
    /// Outcome unknown: later requests get 502/504 until the hold ends. Never evicted.
    Held(Held),
}

/// A record found by [`MemoryStore::get`].
#[derive(Debug, Clone)]
pub struct Found {
    /// The record.
    pub record: Record,
    /// The fingerprint of the request that created it, to detect key misuse.
    pub fingerprint: Fingerprint,
    /// When it expires.
    pub expires: Instant,
}

/// No slot can be freed for a new key: everything left is in flight or held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store is full of keys in flight or held")]
pub struct StoreFull;

/// Counters read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Records evicted to make room (each weakens the guarantee for its key).
    pub evicted_capacity: AtomicU64,
    /// Records removed because their retention ended.
    pub evicted_expired: AtomicU64,
    /// Records currently kept (stored, not-replayable and held).
    pub entries: AtomicU64,
    /// Bytes currently kept.
    pub bytes: AtomicU64,
    /// Keys currently held as outcome unknown.
    pub held: AtomicU64,
}

struct Entry {
    record: Record,
    fingerprint: Fingerprint,
    expires: Instant,
    /// Tie-breaker in the expiry index, unique per entry.
    seq: u64,
    bytes: u64,
}

struct Inner {
    /// Evictable records in recency order.
    lru: LruCache<DedupKey, Entry>,
    /// Held keys: never evicted, only expired.
    held: HashMap<DedupKey, Entry>,
    /// Every entry by expiry, for sweeping in time order.
    expiry: BTreeMap<(Instant, u64), DedupKey>,
    /// Slots taken by flights in progress.
    reserved: usize,
    bytes: u64,
    seq: u64,
}

/// Bounded in-memory store.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: u64,
    stats: Arc<StoreStats>,
}

impl MemoryStore {
    /// A store bounded by `max_entries` keys (including in-flight slots) and `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: u64) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                held: HashMap::new(),
                expiry: BTreeMap::new(),
                reserved: 0,
                bytes: 0,
                seq: 0,
            }),
            max_entries,
            max_bytes,
            stats: Arc::new(StoreStats::default()),
        }
    }

    /// Shared counters for the metrics endpoint.
    pub fn stats(&self) -> Arc<StoreStats> {
        self.stats.clone()
    }

    /// Looks a key up, refreshing its recency. Expired records are not returned.
    pub fn get(&self, key: &DedupKey, now: Instant) -> Option<Found> {
        let mut inner = self.inner.lock();
        let found = |e: &Entry| Found {
            record: e.record.clone(),
            fingerprint: e.fingerprint,
            expires: e.expires,
        };
        if let Some(e) = inner.held.get(key) {
            if e.expires > now {
                return Some(found(e));
            }
        } else if let Some(e) = inner.lru.get(key) {
            if e.expires > now {
                return Some(found(e));
            }
        } else {
            return None;
        }
        self.remove_locked(&mut inner, key, Removal::Expired);
        None
    }

    /// Takes a slot for a new flight, evicting the least recently used record if needed.
    pub fn reserve(&self, now: Instant) -> Result<(), StoreFull> {
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
        while inner.lru.len() + inner.held.len() + inner.reserved >= self.max_entries {
            let Some((key, _)) = inner.lru.peek_lru().map(|(k, e)| (*k, e.seq)) else {
                return Err(StoreFull);
            };
            self.remove_locked(&mut inner, &key, Removal::Capacity);
        }
        inner.reserved += 1;
        Ok(())
    }

    /// Releases a flight's slot and, if given, keeps its record. Returns false when the
    /// record could not be kept (larger than `max_bytes` even after evicting every other
    /// evictable record); that loss is counted as a capacity eviction.
    pub fn settle(
        &self,
        key: DedupKey,
        record: Option<(Record, Fingerprint, Instant)>,
        now: Instant,
    ) -> bool {
        let mut inner = self.inner.lock();
        inner.reserved = inner.reserved.saturating_sub(1);
        let Some((record, fingerprint, expires)) = record else {
            return true;
        };
        self.sweep_locked(&mut inner, now);
        let bytes = match &record {
            Record::Response(r) => r.weight(),
            Record::NotReplayable | Record::Held(_) => 64,
        };
        // A flight's own key may still hold an expired or replaced record.
        self.remove_locked(&mut inner, &key, Removal::Replaced);
        while inner.bytes + bytes > self.max_bytes
            || inner.lru.len() + inner.held.len() + inner.reserved >= self.max_entries
        {
            let Some(victim) = inner.lru.peek_lru().map(|(k, _)| *k) else {
                self.stats.evicted_capacity.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            self.remove_locked(&mut inner, &victim, Removal::Capacity);
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.expiry.insert((expires, seq), key);
        inner.bytes += bytes;
        let entry = Entry {
            record,
            fingerprint,
            expires,
            seq,
            bytes,
        };
        if matches!(entry.record, Record::Held(_)) {
            inner.held.insert(key, entry);
            self.stats.held.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.lru.put(key, entry);
        }
        self.publish(&inner);
        true
    }

    /// Removes a stored record (admin purge). Held keys cannot be purged: the call may run.
    pub fn purge(&self, key: &DedupKey) -> bool {
        let mut inner = self.inner.lock();
        if inner.lru.contains(key) {
            self.remove_locked(&mut inner, key, Removal::Replaced);
            true
        } else {
            false
        }
    }

    /// Drops every expired entry now (the periodic sweeper calls this).
    pub fn sweep(&self, now: Instant) {
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
    }

    /// Number of kept records and reserved flight slots, for tests and the admin view.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.lru.len() + inner.held.len(), inner.reserved)
    }

    fn sweep_locked(&self, inner: &mut Inner, now: Instant) {
        while let Some((&(at, _), &key)) = inner.expiry.first_key_value() {
            if at > now {
                break;
            }
            self.remove_locked(inner, &key, Removal::Expired);
        }
    }

    fn remove_locked(&self, inner: &mut Inner, key: &DedupKey, why: Removal) {
        let entry = match inner.held.remove(key) {
            Some(e) => {
                self.stats.held.fetch_sub(1, Ordering::Relaxed);
                e
            }
            None => match inner.lru.pop(key) {
                Some(e) => e,
                None => return,
            },
        };
        inner.expiry.remove(&(entry.expires, entry.seq));
        inner.bytes -= entry.bytes;
        match why {
            Removal::Capacity => self.stats.evicted_capacity.fetch_add(1, Ordering::Relaxed),
            Removal::Expired => self.stats.evicted_expired.fetch_add(1, Ordering::Relaxed),
            Removal::Replaced => 0,
        };
        self.publish(inner);
    }

    fn publish(&self, inner: &Inner) {
        self.stats.entries.store(
            (inner.lru.len() + inner.held.len()) as u64,
            Ordering::Relaxed,
        );
        self.stats.bytes.store(inner.bytes, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy)]
enum Removal {
    Capacity,
    Expired,
    Replaced,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u8) -> DedupKey {
        DedupKey([n; 32])
    }

    fn resp(body: &'static [u8], now: Instant) -> Record {
        Record::Response(Arc::new(StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::from_static(body),
            completed_at: now,
        }))
    }

    fn fp() -> Fingerprint {
        Fingerprint([0; 32])
    }

    #[tokio::test(start_paused = true)]
    async fn lru_record_is_evicted_for_a_new_flight_but_held_and_reserved_never_are() {
        let s = MemoryStore::new(2, 1 << 20);
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        s.reserve(now).unwrap();
        assert!(s.settle(key(1), Some((resp(b"a", now), fp(), far)), now));
        s.reserve(now).unwrap();
        let held = Held {
            status: 502,
            until: far,
        };
        assert!(s.settle(key(2), Some((Record::Held(held), fp(), far)), now));
        // Full: one stored, one held. A new flight evicts the stored record.
        s.reserve(now).unwrap();
        assert!(s.get(&key(1), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 1);
        // Now one held + one reserved: nothing evictable.
        assert_eq!(s.reserve(now), Err(StoreFull));
        assert!(matches!(
            s.get(&key(2), now).unwrap().record,
            Record::Held(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_and_are_counted_apart() {
        let s = MemoryStore::new(10, 1 << 20);
        let now = Instant::now();
        s.reserve(now).unwrap();
        s.settle(
            key(1),
            Some((resp(b"a", now), fp(), now + Duration::from_secs(5))),
            now,
        );
        assert!(s.get(&key(1), now + Duration::from_secs(4)).is_some());
        assert!(s.get(&key(1), now + Duration::from_secs(5)).is_none());
        assert_eq!(s.stats().evicted_expired.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 0);
        assert_eq!(s.len(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn max_bytes_evicts_least_recently_used() {
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let one = resp(b"0123456789", now);
        let Record::Response(r) = &one else {
            unreachable!()
        };
        let s = MemoryStore::new(100, r.weight() * 2);
        for n in 1..=2 {
            s.reserve(now).unwrap();
            s.settle(key(n), Some((resp(b"0123456789", now), fp(), far)), now);
        }
        // Touch 1 so that 2 is the least recently used.
        assert!(s.get(&key(1), now).is_some());
        s.reserve(now).unwrap();
        s.settle(key(3), Some((resp(b"0123456789", now), fp(), far)), now);
        assert!(s.get(&key(1), now).is_some());
        assert!(s.get(&key(2), now).is_none());
        assert!(s.get(&key(3), now).is_some());
        assert_eq!(s.stats().bytes.load(Ordering::Relaxed), r.weight() * 2);
    }
}
