//! The embedded store: completed, held and not-replayable keys, bounded and expiring.
//!
//! Bounds (`max_entries`, `max_bytes`) count stored records, held keys and the slots
//! reserved by flights in progress. Only completed records (responses and not-replayable
//! markers) are evictable, least recently used first; held keys and in-flight slots never
//! are, so when nothing is evictable a new key is refused ([`StoreFull`]) rather than
//! weakening the guarantee silently. Capacity evictions and expiries are counted apart.
//!
//! **Per-scope quota** (`store.max_keys_per_scope`): one caller (scope) must not be able to
//! push everyone else's records out. Keys are counted per scope (records and reserved slots).
//! (1) A scope's unevictable keys (in flight plus held) never exceed the quota: past it a new
//! key is refused ([`Refusal::ScopeQuota`], 429). (2) When the store is full, a scope that
//! holds at least its quota of keys makes room only by evicting its own least recently used
//! records; with none left it is refused (429) rather than evicting another scope's. Free
//! room is never refused, so a lone heavy scope may still fill an idle store.
//!
//! One mutex guards the maps: every operation is a few hash and B-tree steps with no I/O
//! and no allocation beyond the entry itself, so contention stays short.
//!
//! Time is `tokio::time::Instant` so the coordination tests can run under paused time.

use crate::key::{DedupKey, Fingerprint, ScopeId};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// What a kept key holds, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A stored response.
    Response,
    /// The not-replayable marker.
    NotReplayable,
    /// Outcome unknown.
    Held,
}

/// Sizes and counters, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Kept records (stored, not-replayable and held).
    pub entries: usize,
    /// Of which held.
    pub held: usize,
    /// Slots reserved by flights in progress.
    pub reserved: usize,
    /// Bytes of kept records.
    pub bytes: u64,
    /// `store.max_entries`.
    pub max_entries: usize,
    /// `store.max_bytes`.
    pub max_bytes: u64,
    /// Records evicted by capacity since start.
    pub evicted_capacity: u64,
    /// Records expired since start.
    pub evicted_expired: u64,
}

/// No slot can be freed for a new key: everything left is in flight or held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store is full of keys in flight or held")]
pub struct StoreFull;

/// Why [`MemoryStore::reserve_for`] refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Nothing is evictable: every entry is in flight or held (503 store-full).
    #[error("the store is full of keys in flight or held")]
    Full,
    /// The scope reached `max_keys_per_scope` (429 scope-quota).
    #[error("the scope holds its quota of keys")]
    ScopeQuota,
}

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
    scope: ScopeId,
}

/// One scope's share of the store.
struct ScopeUse {
    /// Records plus reserved slots.
    keys: usize,
    /// Reserved slots plus held records (never evictable).
    pinned: usize,
    /// The scope's evictable records, least recently used first.
    lru: LruCache<DedupKey, ()>,
}

impl ScopeUse {
    fn new() -> ScopeUse {
        ScopeUse {
            keys: 0,
            pinned: 0,
            lru: LruCache::unbounded(),
        }
    }
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
    /// Per-scope accounting; a scope with no key has no entry.
    scopes: HashMap<ScopeId, ScopeUse>,
}

impl Inner {
    fn scope_keys(&self, scope: &ScopeId) -> usize {
        self.scopes.get(scope).map_or(0, |u| u.keys)
    }

    fn scope_pinned(&self, scope: &ScopeId) -> usize {
        self.scopes.get(scope).map_or(0, |u| u.pinned)
    }

    /// Who makes room for `scope`: a scope at its quota evicts only its own records.
    fn victim(&self, scope: &ScopeId, quota: usize) -> Option<DedupKey> {
        if self.scope_keys(scope) >= quota {
            self.scopes
                .get(scope)
                .and_then(|u| u.lru.peek_lru().map(|(k, _)| *k))
        } else {
            self.lru.peek_lru().map(|(k, _)| *k)
        }
    }

    fn unuse(&mut self, scope: &ScopeId, f: impl FnOnce(&mut ScopeUse)) {
        if let Some(u) = self.scopes.get_mut(scope) {
            f(u);
            if u.keys == 0 {
                self.scopes.remove(scope);
            }
        }
    }
}

/// Bounded in-memory store.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: u64,
    /// `store.max_keys_per_scope`; `usize::MAX` when unlimited.
    scope_quota: AtomicUsize,
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
                scopes: HashMap::new(),
            }),
            max_entries,
            max_bytes,
            scope_quota: AtomicUsize::new(usize::MAX),
            stats: Arc::new(StoreStats::default()),
        }
    }

    /// Sets `max_keys_per_scope` (see the module doc); `usize::MAX` turns the quota off.
    pub fn set_scope_quota(&self, quota: usize) {
        self.scope_quota.store(quota.max(1), Ordering::Relaxed);
    }

    /// Keys (records and reserved slots) currently counted for `scope`.
    pub fn scope_keys(&self, scope: &ScopeId) -> usize {
        self.inner.lock().scope_keys(scope)
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
                let (f, scope) = (found(e), e.scope);
                if let Some(u) = inner.scopes.get_mut(&scope) {
                    u.lru.promote(key);
                }
                return Some(f);
            }
        } else {
            return None;
        }
        self.remove_locked(&mut inner, key, Removal::Expired);
        None
    }

    /// Takes a slot for a new flight, evicting the least recently used record if needed.
    /// Accounts it to the default scope (see [`MemoryStore::reserve_for`]).
    pub fn reserve(&self, now: Instant) -> Result<(), StoreFull> {
        self.reserve_for(now, ScopeId::default())
            .map_err(|_| StoreFull)
    }

    /// Takes a slot for a new flight of `scope`, evicting the least recently used record if
    /// needed, within the scope's quota (see the module doc).
    pub fn reserve_for(&self, now: Instant, scope: ScopeId) -> Result<(), Refusal> {
        let quota = self.scope_quota.load(Ordering::Relaxed);
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
        if inner.scope_pinned(&scope) >= quota {
            return Err(Refusal::ScopeQuota);
        }
        while inner.lru.len() + inner.held.len() + inner.reserved >= self.max_entries {
            let Some(victim) = inner.victim(&scope, quota) else {
                // At its quota with nothing of its own to give up: other scopes' records
                // stay. With nothing evictable at all, the store is simply full.
                return Err(if inner.lru.is_empty() {
                    Refusal::Full
                } else {
                    Refusal::ScopeQuota
                });
            };
            self.remove_locked(&mut inner, &victim, Removal::Capacity);
        }
        inner.reserved += 1;
        let u = inner.scopes.entry(scope).or_insert_with(ScopeUse::new);
        u.keys += 1;
        u.pinned += 1;
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
        self.settle_for(key, ScopeId::default(), record, now)
    }

    /// [`MemoryStore::settle`] for a slot reserved by [`MemoryStore::reserve_for`]. A scope
    /// at its quota makes room for its record only from its own records; with none left the
    /// record is not kept (counted as a capacity eviction) rather than evicting another's.
    pub fn settle_for(
        &self,
        key: DedupKey,
        scope: ScopeId,
        record: Option<(Record, Fingerprint, Instant)>,
        now: Instant,
    ) -> bool {
        let quota = self.scope_quota.load(Ordering::Relaxed);
        let mut inner = self.inner.lock();
        inner.reserved = inner.reserved.saturating_sub(1);
        inner.unuse(&scope, |u| {
            u.keys = u.keys.saturating_sub(1);
            u.pinned = u.pinned.saturating_sub(1);
        });
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
            let Some(victim) = inner.victim(&scope, quota) else {
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
            scope,
        };
        let held = matches!(entry.record, Record::Held(_));
        let u = inner.scopes.entry(scope).or_insert_with(ScopeUse::new);
        u.keys += 1;
        if held {
            u.pinned += 1;
        } else {
            u.lru.put(key, ());
        }
        if held {
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

    /// Unexpired kept keys whose hex form starts with `prefix`, at most `limit` of them.
    pub fn find(&self, prefix: &str, limit: usize, now: Instant) -> Vec<(DedupKey, Kept)> {
        let inner = self.inner.lock();
        let kind = |e: &Entry| match e.record {
            Record::Response(_) => Kept::Response,
            Record::NotReplayable => Kept::NotReplayable,
            Record::Held(_) => Kept::Held,
        };
        inner
            .held
            .iter()
            .chain(inner.lru.iter())
            .filter(|(k, e)| e.expires > now && k.has_hex_prefix(prefix))
            .take(limit)
            .map(|(k, e)| (*k, kind(e)))
            .collect()
    }

    /// Unexpired held keys, the soonest freed first.
    pub fn held(&self, now: Instant) -> Vec<(DedupKey, Held)> {
        let inner = self.inner.lock();
        let mut all: Vec<(DedupKey, Held)> = inner
            .held
            .iter()
            .filter_map(|(k, e)| match e.record {
                Record::Held(h) if e.expires > now => Some((*k, h)),
                _ => None,
            })
            .collect();
        all.sort_by_key(|(_, h)| h.until);
        all
    }

    /// Sizes, bounds and eviction counters.
    pub fn summary(&self) -> Summary {
        let inner = self.inner.lock();
        Summary {
            entries: inner.lru.len() + inner.held.len(),
            held: inner.held.len(),
            reserved: inner.reserved,
            bytes: inner.bytes,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            evicted_capacity: self.stats.evicted_capacity.load(Ordering::Relaxed),
            evicted_expired: self.stats.evicted_expired.load(Ordering::Relaxed),
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
        let held = matches!(entry.record, Record::Held(_));
        inner.unuse(&entry.scope, |u| {
            u.keys = u.keys.saturating_sub(1);
            if held {
                u.pinned = u.pinned.saturating_sub(1);
            } else {
                u.lru.pop(key);
            }
        });
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

    fn scope(n: u8) -> ScopeId {
        ScopeId([n; 16])
    }

    #[tokio::test(start_paused = true)]
    async fn a_scope_at_its_quota_evicts_only_its_own_records() {
        let s = MemoryStore::new(6, 1 << 20);
        s.set_scope_quota(2);
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        // The victim stores two records, then the store fills with the abuser's.
        for k in 1..=2 {
            s.reserve_for(now, scope(1)).unwrap();
            assert!(s.settle_for(key(k), scope(1), Some((resp(b"v", now), fp(), far)), now));
        }
        for k in 10..40 {
            s.reserve_for(now, scope(2)).unwrap();
            assert!(s.settle_for(key(k), scope(2), Some((resp(b"a", now), fp(), far)), now));
        }
        // Free room was never refused; once full, the abuser only ever replaced its own.
        assert_eq!(s.len(), (6, 0));
        assert_eq!(s.scope_keys(&scope(1)), 2);
        assert_eq!(s.scope_keys(&scope(2)), 4);
        assert!(s.get(&key(1), now).is_some() && s.get(&key(2), now).is_some());
        assert!(s.get(&key(39), now).is_some() && s.get(&key(35), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 26);
        // A third scope under its quota still evicts the least recently used record overall.
        s.reserve_for(now, scope(3)).unwrap();
        assert_eq!(s.scope_keys(&scope(2)), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_and_held_keys_of_one_scope_never_pass_its_quota() {
        let s = MemoryStore::new(100, 1 << 20);
        s.set_scope_quota(2);
        let now = Instant::now();
        let held = Held {
            status: 502,
            until: now + Duration::from_secs(30),
        };
        s.reserve_for(now, scope(1)).unwrap();
        s.settle_for(
            key(1),
            scope(1),
            Some((Record::Held(held), fp(), held.until)),
            now,
        );
        s.reserve_for(now, scope(1)).unwrap();
        assert_eq!(s.reserve_for(now, scope(1)), Err(Refusal::ScopeQuota));
        // Other scopes are not affected.
        s.reserve_for(now, scope(2)).unwrap();
        // The hold ends: the scope may start a new key again.
        let later = held.until;
        s.reserve_for(later, scope(1)).unwrap();
        assert_eq!(s.scope_keys(&scope(1)), 2);
        // Every slot released: no per-scope bookkeeping is left behind.
        for sc in [1, 1, 2] {
            s.settle_for(key(9), scope(sc), None, later);
        }
        assert_eq!(s.scope_keys(&scope(1)), 0);
        assert_eq!(s.inner.lock().scopes.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_with_nothing_evictable_is_store_full_not_quota() {
        let s = MemoryStore::new(2, 1 << 20);
        s.set_scope_quota(1);
        let now = Instant::now();
        s.reserve_for(now, scope(1)).unwrap();
        s.reserve_for(now, scope(2)).unwrap();
        assert_eq!(s.reserve_for(now, scope(3)), Err(Refusal::Full));
        s.settle_for(
            key(2),
            scope(2),
            Some((resp(b"b", now), fp(), now + Duration::from_secs(60))),
            now,
        );
        s.settle_for(
            key(1),
            scope(1),
            Some((resp(b"a", now), fp(), now + Duration::from_secs(60))),
            now,
        );
        // Scope 3, under its quota, evicts the least recently used record (scope 2's).
        s.reserve_for(now, scope(3)).unwrap();
        assert!(s.get(&key(2), now).is_none());
        // Scope 1, at its quota, gives up its own record, never scope 3's slot.
        s.reserve_for(now, scope(1)).unwrap();
        assert!(s.get(&key(1), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 2);
        assert_eq!(s.len(), (0, 2));
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
