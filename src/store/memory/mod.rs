//! The embedded store: completed, held and not-replayable keys, bounded and expiring.
//!
//! Bounds (`max_entries`, `max_bytes`) count stored records, held keys and the slots
//! reserved by flights in progress. Only completed records (responses and not-replayable
//! markers) are evictable; held keys and in-flight slots never are, so when nothing is
//! evictable a new key is refused ([`Refusal::StoreFull`]) rather than weakening the
//! guarantee silently. Capacity evictions and expiries are counted apart.
//!
//! **Who pays for room** ([`Limits`]). Every key is counted against its [`Owner`]: its scope
//! (mintable at will) and its client (the address through trusted hops, which a caller
//! cannot mint beyond the addresses it has). Rules, checked in this order:
//! 1. Keys nobody can evict (in flight plus held) are capped per scope
//!    (`max_keys_per_scope`: 429 [`Refusal::ScopeQuota`]), per client (`max_keys_per_client`:
//!    429 [`Refusal::ClientQuota`]) and store-wide (`max_pinned`: 503 store-full), so that
//!    neither one caller nor many can pin the whole store and push every stored response
//!    out.
//! 2. When room is needed, a scope at its quota gives up only its own least recently used
//!    records; then a client at its quota (keys, or bytes over `max_bytes_per_client`)
//!    gives up only its own; otherwise the **heaviest client** gives up its least recently
//!    used record: the client whose evictable records use the largest share of a client's
//!    allowance (the larger of their count over `max_keys_per_client` and their bytes over
//!    `max_bytes_per_client`). A caller minting scopes or keys from one address therefore
//!    only ever replaces its own records once the store is full; a light client loses a
//!    record only when it is the heaviest.
//! 3. Free room is never refused: a lone heavy client may still fill an idle store.
//!
//! **Records shared through Redis.** A record this process also wrote to the shared store
//! carries that write's fence ([`SharedRef`]); when the record is evicted for room (or
//! cannot be kept at all), the store tells [`MemoryStore::set_on_evict`]'s hook, which
//! deletes it there too. So what one replica writes to Redis is bounded by its own store and
//! divided between clients by the same rules.
//!
//! One mutex guards the maps: every operation is a few hash and B-tree steps with no I/O;
//! a response is packed ([`crate::store::memory::packed`]) before the lock is taken, so
//! contention stays short. What an entry costs in memory, and why the layout is what it is:
//! see [`Inner`].
//!
//! Time is `tokio::time::Instant` so the coordination tests can run under paused time.

pub(crate) mod packed;
mod slab;

use slab::{
    hash_of, Allowance, Groups, Inner, Kind, Links, Slot, SlotId, NIL, PREALLOCATE_UP_TO, UNLINKED,
};

use crate::key::{DedupKey, Fingerprint, FingerprintTag};
use crate::message::StoredResponse;
use crate::outcome::{Held, Refusal};
use crate::owner::Owner;
use crate::store::memory::packed::Packed;
use hashbrown::HashTable;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
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

/// The store's bounds and what one owner may take of them (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `store.max_entries`: records plus reserved slots.
    pub(crate) max_entries: usize,
    /// `store.max_bytes`: bytes of records.
    pub(crate) max_bytes: u64,
    /// `store.max_pinned`: reserved slots plus held records, store-wide.
    pub(crate) max_pinned: usize,
    /// `store.max_keys_per_scope`.
    pub(crate) scope_keys: usize,
    /// `store.max_keys_per_client`.
    pub(crate) client_keys: usize,
    /// `store.max_bytes_per_client`.
    pub(crate) client_bytes: u64,
}

impl Limits {
    /// Only the store-wide bounds: no quota and no cap on pinned keys below `max_entries`.
    #[cfg(test)]
    pub(crate) fn bounds(max_entries: usize, max_bytes: u64) -> Limits {
        Limits {
            max_entries,
            max_bytes,
            max_pinned: usize::MAX,
            scope_keys: usize::MAX,
            client_keys: usize::MAX,
            client_bytes: u64::MAX,
        }
    }
}

/// A record this process also wrote to the shared store: the token of the claim its write
/// replaced, which fences a delete there (only that write is deleted, never a later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SharedRef(pub(crate) [u8; 16]);

/// Told, outside the lock, of shared records evicted for room or not kept at all.
pub(crate) type OnEvict = Box<dyn Fn(Vec<(DedupKey, SharedRef)>) + Send + Sync>;

/// Bounded in-memory store.
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    limits: Limits,
    stats: Arc<StoreStats>,
    on_evict: OnceLock<OnEvict>,
}

impl MemoryStore {
    /// A store within `limits` (see the module doc).
    pub(crate) fn new(limits: Limits) -> MemoryStore {
        let limits = Limits {
            scope_keys: limits.scope_keys.max(1),
            client_keys: limits.client_keys.max(1),
            max_pinned: limits.max_pinned.max(1),
            ..limits
        };
        let max_entries = limits.max_entries;
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
                live: 0,
                held: 0,
                reserved: 0,
                bytes: 0,
                scopes: Groups::new(),
                clients: Groups::new(),
                heavy: BTreeSet::new(),
                allowance: Allowance {
                    keys: limits.client_keys,
                    bytes: limits.client_bytes,
                },
                gone: Vec::new(),
            }),
            limits,
            stats: Arc::new(StoreStats::default()),
            on_evict: OnceLock::new(),
        }
    }

    /// Sets what is told of shared records evicted or not kept (once, at start-up).
    pub(crate) fn set_on_evict(&self, f: OnEvict) {
        let _ = self.on_evict.set(f);
    }

    /// Keys (records and reserved slots) currently counted for `owner`'s scope and client.
    #[cfg(test)]
    pub(crate) fn owner_keys(&self, owner: &Owner) -> (usize, usize) {
        let inner = self.inner.lock();
        (
            inner.scopes.keys(&owner.scope),
            inner.clients.keys(&owner.client),
        )
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

    /// Takes a slot for a new flight of `owner`, making room if needed, within its quotas
    /// (see the module doc).
    pub(crate) fn reserve(&self, now: Instant, owner: Owner) -> Result<(), Refusal> {
        let l = self.limits;
        let mut inner = self.inner.lock();
        self.sweep_locked(&mut inner, now);
        if inner.scopes.pinned(&owner.scope) >= l.scope_keys {
            return Err(Refusal::ScopeQuota);
        }
        if inner.clients.pinned(&owner.client) >= l.client_keys {
            return Err(Refusal::ClientQuota);
        }
        if inner.held + inner.reserved >= l.max_pinned {
            return Err(Refusal::StoreFull);
        }
        while inner.live + inner.reserved >= l.max_entries {
            let victim = match self.victim(&inner, &owner, 0) {
                Ok(v) => v,
                Err(refusal) => {
                    self.tell_evicted(inner);
                    return Err(refusal);
                }
            };
            self.remove_locked(&mut inner, victim, Removal::Capacity);
        }
        inner.reserved += 1;
        let s = inner.scopes.enter(owner.scope) as usize;
        let scope = &mut inner.scopes.list[s];
        scope.keys += 1;
        scope.pinned += 1;
        let c = inner.clients.enter(owner.client) as usize;
        let client = &mut inner.clients.list[c];
        client.keys += 1;
        client.pinned += 1;
        self.tell_evicted(inner);
        Ok(())
    }

    /// Who makes room for a key of `owner` that brings `incoming` bytes (see the module
    /// doc, rule 2); the refusal when nobody may.
    fn victim(&self, inner: &Inner, owner: &Owner, incoming: u64) -> Result<SlotId, Refusal> {
        let l = &self.limits;
        let oldest = |id: SlotId| (id != NIL).then_some(id);
        let scope = inner.scopes.get(&owner.scope);
        let client = inner.clients.get(&owner.client);
        let pick = if let Some(g) = scope.filter(|g| g.keys >= l.scope_keys) {
            oldest(g.recency.oldest).ok_or(Refusal::ScopeQuota)
        } else if let Some(g) =
            client.filter(|g| g.keys >= l.client_keys || g.bytes + incoming > l.client_bytes)
        {
            oldest(g.recency.oldest).ok_or(Refusal::ClientQuota)
        } else {
            inner
                .heaviest()
                .and_then(|c| oldest(inner.clients.list[c as usize].recency.oldest))
                .ok_or(Refusal::StoreFull)
        };
        // With nothing evictable at all, the store is simply full, whoever asks.
        pick.map_err(|r| {
            if inner.live == inner.held {
                Refusal::StoreFull
            } else {
                r
            }
        })
    }

    /// Releases the slot [`MemoryStore::reserve`] took for `owner` and, if given, keeps its
    /// record (`shared`: this process also wrote it to the shared store). Returns false when
    /// the record could not be kept (larger than `max_bytes` even after evicting every other
    /// evictable record, or its owner at a quota with none of its own records left to evict:
    /// another owner's are never taken); that loss is counted as a capacity eviction.
    pub(crate) fn settle(
        &self,
        key: DedupKey,
        owner: Owner,
        record: Option<(Record, Fingerprint, Instant)>,
        shared: Option<SharedRef>,
        now: Instant,
    ) -> bool {
        // Packing (the only allocation) happens before the lock is taken.
        let record = record.map(|(record, fingerprint, expires)| {
            let (kind, data, at, status, bytes) = match record {
                Record::Response(r) => (
                    Kind::Response,
                    Some(Packed::pack(&r, shared)),
                    Some(r.completed_at),
                    0,
                    r.weight(),
                ),
                Record::NotReplayable => (
                    Kind::NotReplayable,
                    shared.map(Packed::reference),
                    None,
                    0,
                    64,
                ),
                Record::Held(h) => (Kind::Held, None, Some(h.until), h.status, 64),
            };
            (kind, data, at, status, bytes, fingerprint.tag(), expires)
        });
        let mut inner = self.inner.lock();
        inner.reserved = inner.reserved.saturating_sub(1);
        if let Some(&i) = inner.scopes.ids.get(&owner.scope) {
            inner.scopes.leave(i, true);
        }
        if let Some(&i) = inner.clients.ids.get(&owner.client) {
            inner.clients.leave(i, true);
        }
        let Some((kind, data, at, status, bytes, fingerprint, expires)) = record else {
            return true;
        };
        self.sweep_locked(&mut inner, now);
        // A flight's own key may still hold an expired or replaced record.
        if let Some(id) = inner.lookup(&key) {
            self.remove_locked(&mut inner, id, Removal::Replaced);
        }
        let kept = self.make_room(&mut inner, &owner, bytes);
        if kept {
            self.insert(
                &mut inner,
                key,
                owner,
                (kind, data, at, status),
                bytes,
                fingerprint,
                expires,
            );
        } else {
            self.stats.evicted_capacity.fetch_add(1, Ordering::Relaxed);
            // Not kept here means not kept there either (the module doc).
            if kind != Kind::Held {
                if let Some(r) = shared {
                    inner.gone.push((key, r));
                }
            }
        }
        self.tell_evicted(inner);
        kept
    }

    /// Evicts until a record of `bytes` fits; false when it cannot (see [`MemoryStore::settle`]).
    fn make_room(&self, inner: &mut Inner, owner: &Owner, bytes: u64) -> bool {
        if bytes > u64::from(u32::MAX) {
            return false;
        }
        while inner.bytes + bytes > self.limits.max_bytes
            || inner.live + inner.reserved >= self.limits.max_entries
        {
            match self.victim(inner, owner, bytes) {
                Ok(victim) => self.remove_locked(inner, victim, Removal::Capacity),
                Err(_) => return false,
            }
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        inner: &mut Inner,
        key: DedupKey,
        owner: Owner,
        (kind, data, at, status): (Kind, Option<Packed>, Option<Instant>, u16),
        bytes: u64,
        fingerprint: FingerprintTag,
        expires: Instant,
    ) {
        let scope = inner.scopes.enter(owner.scope);
        let client = inner.clients.enter(owner.client);
        let slot = Slot {
            key,
            fingerprint,
            expires: inner.tick(expires),
            expiry: UNLINKED,
            at: at.map_or(0, |t| inner.tick(t)),
            data,
            scope_recency: UNLINKED,
            client_recency: UNLINKED,
            scope,
            client,
            // Checked by `make_room`.
            bytes: bytes as u32,
            status,
            kind,
        };
        let id = inner.alloc(slot);
        let Inner { index, slots, .. } = &mut *inner;
        index.insert_unique(hash_of(&key), id, |&i| hash_of(&slots[i as usize].key));
        inner.file_expiry(id);
        inner.bytes += bytes;
        inner.live += 1;
        inner.scopes.list[scope as usize].keys += 1;
        inner.clients.list[client as usize].keys += 1;
        if kind == Kind::Held {
            inner.scopes.list[scope as usize].pinned += 1;
            inner.clients.list[client as usize].pinned += 1;
            inner.held += 1;
            self.stats.held.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.link_newest(id);
        }
        self.publish(inner);
    }

    /// Unlocks, then tells the hook of the shared records evicted under the lock.
    fn tell_evicted(&self, mut inner: parking_lot::MutexGuard<'_, Inner>) {
        if inner.gone.is_empty() {
            return;
        }
        let gone = std::mem::take(&mut inner.gone);
        drop(inner);
        if let Some(f) = self.on_evict.get() {
            f(gone);
        }
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
            max_entries: self.limits.max_entries,
            max_bytes: self.limits.max_bytes,
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
        let (key, kind, bytes) = (slot.key, slot.kind, u64::from(slot.bytes));
        let (scope, client) = (slot.scope, slot.client);
        if kind == Kind::Free {
            return;
        }
        if matches!(why, Removal::Capacity) {
            if let Some(r) = slot.data.as_ref().and_then(Packed::shared_ref) {
                inner.gone.push((key, r));
            }
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
        inner.scopes.leave(scope, held);
        inner.clients.leave(client, held);
        let free = inner.free;
        let slot = &mut inner.slots[id as usize];
        slot.kind = Kind::Free;
        slot.data = None;
        // The free chain runs through the scope links.
        slot.scope_recency = Links {
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
