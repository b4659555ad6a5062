//! The embedded store: completed, held and not-replayable keys, bounded and expiring.
//!
//! Bounds (`max_entries`, `max_bytes`) count stored records, held keys and the slots
//! reserved by flights in progress. Only completed records (responses and not-replayable
//! markers) are evictable, least recently used first; held keys and in-flight slots never
//! are, so when nothing is evictable a new key is refused ([`Refusal::StoreFull`]) rather than
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
//! One mutex guards the maps: every operation is a few hash and B-tree steps with no I/O;
//! a response is packed ([`crate::store::memory::packed`]) before the lock is taken, so contention stays
//! short. What an entry costs in memory, and why the layout is what it is: see [`Inner`].
//!
//! Time is `tokio::time::Instant` so the coordination tests can run under paused time.

pub(crate) mod packed;
mod slab;

use slab::{hash_of, Inner, Kind, Links, Slot, SlotId, EMPTY, NIL, PREALLOCATE_UP_TO, UNLINKED};

use crate::key::{DedupKey, Fingerprint, FingerprintTag, ScopeId};
use crate::message::StoredResponse;
use crate::outcome::{Held, Refusal};
use crate::store::memory::packed::Packed;
use hashbrown::HashTable;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// What a completed key holds.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    /// A stored response, replayed to later requests.
    Response(Arc<StoredResponse>),
    /// The response was streamed to the leader only; later requests get 409 not-replayable.
    NotReplayable,
    /// Outcome unknown: later requests get 502/504 until the hold ends. Never evicted.
    Held(Held),
}

/// A record found by [`MemoryStore::get`].
#[derive(Debug, Clone)]
pub(crate) struct Found {
    /// The record.
    pub(crate) record: Record,
    /// The fingerprint of the request that created it (half of it), to detect key misuse.
    pub(crate) fingerprint: FingerprintTag,
    /// When it expires.
    pub(crate) expires: Instant,
}

/// What a kept key holds, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    /// A stored response.
    Response,
    /// The not-replayable marker.
    NotReplayable,
    /// Outcome unknown.
    Held,
}

/// Sizes and counters, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Kept records (stored, not-replayable and held).
    pub(crate) entries: usize,
    /// Of which held.
    pub(crate) held: usize,
    /// Slots reserved by flights in progress.
    pub(crate) reserved: usize,
    /// Bytes of kept records.
    pub(crate) bytes: u64,
    /// `store.max_entries`.
    pub(crate) max_entries: usize,
    /// `store.max_bytes`.
    pub(crate) max_bytes: u64,
    /// Records evicted by capacity since start.
    pub(crate) evicted_capacity: u64,
    /// Records expired since start.
    pub(crate) evicted_expired: u64,
}

/// Counters read by the metrics endpoint.
#[derive(Debug, Default)]
pub(crate) struct StoreStats {
    /// Records evicted to make room (each weakens the guarantee for its key).
    pub(crate) evicted_capacity: AtomicU64,
    /// Records removed because their retention ended.
    pub(crate) evicted_expired: AtomicU64,
    /// Records currently kept (stored, not-replayable and held).
    pub(crate) entries: AtomicU64,
    /// Bytes currently kept.
    pub(crate) bytes: AtomicU64,
    /// Keys currently held as outcome unknown.
    pub(crate) held: AtomicU64,
}

/// Bounded in-memory store.
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: u64,
    /// `store.max_keys_per_scope`; `usize::MAX` when unlimited.
    scope_quota: usize,
    stats: Arc<StoreStats>,
}

impl MemoryStore {
    /// A store bounded by `max_entries` keys (including in-flight slots) and `max_bytes`,
    /// with `scope_quota` keys per scope (see the module doc; `usize::MAX` for none).
    pub(crate) fn new(max_entries: usize, max_bytes: u64, scope_quota: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                epoch: Instant::now(),
                // Sized for the bound up front: growing by doubling would copy the slab and
                // the index, and the freed old copies linger in RSS. Untouched capacity is
                // address space only, not memory.
                slots: Vec::with_capacity(max_entries.min(PREALLOCATE_UP_TO)),
                free: NIL,
                index: HashTable::with_capacity(max_entries.min(PREALLOCATE_UP_TO)),
                expiry: BTreeMap::new(),
                recency: EMPTY,
                live: 0,
                held: 0,
                reserved: 0,
                bytes: 0,
                scopes: Vec::new(),
                scope_ids: HashMap::new(),
                free_scopes: Vec::new(),
            }),
            max_entries,
            max_bytes,
            scope_quota: scope_quota.max(1),
            stats: Arc::new(StoreStats::default()),
        }
    }

    /// Keys (records and reserved slots) currently counted for `scope`.
    #[cfg(test)]
    pub(crate) fn scope_keys(&self, scope: &ScopeId) -> usize {
        self.inner.lock().scope_keys(scope)
    }

    /// Shared counters for the metrics endpoint.
    pub(crate) fn stats(&self) -> Arc<StoreStats> {
        self.stats.clone()
    }

    /// Looks a key up, refreshing its recency. Expired records are not returned.
    pub(crate) fn get(&self, key: &DedupKey, now: Instant) -> Option<Found> {
        let mut inner = self.inner.lock();
        let id = inner.lookup(key)?;
        let slot = &inner.slots[id as usize];
        if slot.expires <= inner.tick(now) {
            self.remove_locked(&mut inner, id, Removal::Expired);
            return None;
        }
        if slot.kind != Kind::Held {
            inner.touch(id);
        }
        let found = inner.found(id);
        drop(inner);
        Some(found)
    }

    /// Takes a slot for a new flight of `scope`, evicting the least recently used record if
    /// needed, within the scope's quota (see the module doc).
    pub(crate) fn reserve(&self, now: Instant, scope: ScopeId) -> Result<(), Refusal> {
        let quota = self.scope_quota;
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
        if inner.scope_pinned(&scope) >= quota {
            return Err(Refusal::ScopeQuota);
        }
        while inner.live + inner.reserved >= self.max_entries {
            let Some(victim) = inner.victim(&scope, quota) else {
                // At its quota with nothing of its own to give up: other scopes' records
                // stay. With nothing evictable at all, the store is simply full.
                return Err(if inner.recency.oldest == NIL {
                    Refusal::StoreFull
                } else {
                    Refusal::ScopeQuota
                });
            };
            self.remove_locked(&mut inner, victim, Removal::Capacity);
        }
        inner.reserved += 1;
        let i = inner.use_scope(scope) as usize;
        inner.scopes[i].keys += 1;
        inner.scopes[i].pinned += 1;
        Ok(())
    }

    /// Releases the slot [`MemoryStore::reserve`] took for `scope` and, if given, keeps its
    /// record. Returns false when the record could not be kept (larger than `max_bytes` even
    /// after evicting every other evictable record, or its scope at its quota with none of its
    /// own records left to evict: another scope's are never taken); that loss is counted as a
    /// capacity eviction.
    pub(crate) fn settle(
        &self,
        key: DedupKey,
        scope: ScopeId,
        record: Option<(Record, Fingerprint, Instant)>,
        now: Instant,
    ) -> bool {
        let quota = self.scope_quota;
        // Packing (the only allocation) happens before the lock is taken.
        let record = record.map(|(record, fingerprint, expires)| {
            let (kind, data, at, status, bytes) = match record {
                Record::Response(r) => (
                    Kind::Response,
                    Some(Packed::pack(&r)),
                    Some(r.completed_at),
                    0,
                    r.weight(),
                ),
                Record::NotReplayable => (Kind::NotReplayable, None, None, 0, 64),
                Record::Held(h) => (Kind::Held, None, Some(h.until), h.status, 64),
            };
            (kind, data, at, status, bytes, fingerprint, expires)
        });
        let mut inner = self.inner.lock();
        inner.reserved = inner.reserved.saturating_sub(1);
        if let Some(&i) = inner.scope_ids.get(&scope) {
            inner.unuse(i, true);
        }
        let Some((kind, data, at, status, bytes, fingerprint, expires)) = record else {
            return true;
        };
        self.sweep_locked(&mut inner, now);
        // A flight's own key may still hold an expired or replaced record.
        if let Some(id) = inner.lookup(&key) {
            self.remove_locked(&mut inner, id, Removal::Replaced);
        }
        while inner.bytes + bytes > self.max_bytes
            || inner.live + inner.reserved >= self.max_entries
        {
            let Some(victim) = inner.victim(&scope, quota) else {
                self.stats.evicted_capacity.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            self.remove_locked(&mut inner, victim, Removal::Capacity);
        }
        let scope_slot = inner.use_scope(scope);
        let slot = Slot {
            key,
            fingerprint: fingerprint.tag(),
            expires: inner.tick(expires),
            expiry: UNLINKED,
            at: at.map_or(0, |t| inner.tick(t)),
            data,
            recency: UNLINKED,
            scope_recency: UNLINKED,
            scope: scope_slot,
            bytes,
            status,
            kind,
        };
        let id = inner.alloc(slot);
        let Inner { index, slots, .. } = &mut *inner;
        index.insert_unique(hash_of(&key), id, |&i| hash_of(&slots[i as usize].key));
        inner.file_expiry(id);
        inner.bytes += bytes;
        inner.live += 1;
        let u = scope_slot as usize;
        inner.scopes[u].keys += 1;
        if kind == Kind::Held {
            inner.scopes[u].pinned += 1;
            inner.held += 1;
            self.stats.held.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.link_newest(id);
        }
        self.publish(&inner);
        true
    }

    /// Removes a stored record (admin purge). Held keys cannot be purged: the call may run.
    pub(crate) fn purge(&self, key: &DedupKey) -> bool {
        let mut inner = self.inner.lock();
        match inner.lookup(key) {
            Some(id) if inner.slots[id as usize].kind != Kind::Held => {
                self.remove_locked(&mut inner, id, Removal::Replaced);
                true
            }
            _ => false,
        }
    }

    /// Unexpired kept keys whose hex form starts with `prefix`, at most `limit` of them.
    pub(crate) fn find(&self, prefix: &str, limit: usize, now: Instant) -> Vec<(DedupKey, Kept)> {
        let inner = self.inner.lock();
        let now = inner.tick(now);
        inner
            .slots
            .iter()
            .filter(|s| s.kind != Kind::Free && s.expires > now && s.key.has_hex_prefix(prefix))
            .take(limit)
            .map(|s| {
                let kept = match s.kind {
                    Kind::Held => Kept::Held,
                    Kind::NotReplayable => Kept::NotReplayable,
                    _ => Kept::Response,
                };
                (s.key, kept)
            })
            .collect()
    }

    /// Unexpired held keys, the soonest freed first.
    pub(crate) fn held(&self, now: Instant) -> Vec<(DedupKey, Held)> {
        let inner = self.inner.lock();
        let tick = inner.tick(now);
        let mut all: Vec<(DedupKey, Held)> = inner
            .slots
            .iter()
            .filter(|s| s.kind == Kind::Held && s.expires > tick)
            .map(|s| {
                let held = Held {
                    status: s.status,
                    until: inner.instant(s.at),
                };
                (s.key, held)
            })
            .collect();
        all.sort_by_key(|(_, h)| h.until);
        all
    }

    /// Sizes, bounds and eviction counters.
    pub(crate) fn summary(&self) -> Summary {
        let inner = self.inner.lock();
        Summary {
            entries: inner.live,
            held: inner.held,
            reserved: inner.reserved,
            bytes: inner.bytes,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            evicted_capacity: self.stats.evicted_capacity.load(Ordering::Relaxed),
            evicted_expired: self.stats.evicted_expired.load(Ordering::Relaxed),
        }
    }

    /// Drops every expired entry now (the periodic sweeper calls this).
    pub(crate) fn sweep(&self, now: Instant) {
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
    }

    /// Number of kept records and reserved flight slots, for tests and the admin view.
    #[cfg(test)]
    pub(crate) fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.live, inner.reserved)
    }

    fn sweep_locked(&self, inner: &mut Inner, now: Instant) {
        let now = inner.tick(now);
        while let Some((at, id)) = inner.next_to_expire() {
            if at > now {
                break;
            }
            self.remove_locked(inner, id, Removal::Expired);
        }
    }

    fn remove_locked(&self, inner: &mut Inner, id: SlotId, why: Removal) {
        let slot = &inner.slots[id as usize];
        let (key, kind, bytes, scope) = (slot.key, slot.kind, slot.bytes, slot.scope);
        if kind == Kind::Free {
            return;
        }
        let held = kind == Kind::Held;
        if held {
            inner.held -= 1;
            self.stats.held.fetch_sub(1, Ordering::Relaxed);
        } else {
            inner.unlink_recency(id);
        }
        if let Ok(entry) = inner.index.find_entry(hash_of(&key), |&i| i == id) {
            entry.remove();
        }
        inner.unfile_expiry(id);
        inner.bytes -= bytes;
        inner.live -= 1;
        inner.unuse(scope, held);
        let free = inner.free;
        let slot = &mut inner.slots[id as usize];
        slot.kind = Kind::Free;
        slot.data = None;
        slot.recency = Links {
            newer: NIL,
            older: free,
        };
        inner.free = id;
        match why {
            Removal::Capacity => self.stats.evicted_capacity.fetch_add(1, Ordering::Relaxed),
            Removal::Expired => self.stats.evicted_expired.fetch_add(1, Ordering::Relaxed),
            Removal::Replaced => 0,
        };
        self.publish(inner);
    }

    fn publish(&self, inner: &Inner) {
        self.stats
            .entries
            .store(inner.live as u64, Ordering::Relaxed);
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
mod tests;
