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

use crate::key::{DedupKey, Fingerprint, FingerprintTag, ScopeId};
use crate::message::StoredResponse;
use crate::outcome::{Held, Refusal};
use crate::store::memory::packed::Packed;
use hashbrown::HashTable;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
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

/// Slots and index entries reserved at start, at most (beyond it they grow on demand):
/// 1 Mi slots are 120 MiB of address space, which a host with strict overcommit accounting
/// (`vm.overcommit_memory = 2`) counts as committed.
const PREALLOCATE_UP_TO: usize = 1 << 20;

/// A slot index; `NIL` ends a list.
type SlotId = u32;
const NIL: SlotId = SlotId::MAX;

/// Neighbours in a recency list (toward the most and the least recently used).
#[derive(Clone, Copy)]
struct Links {
    newer: SlotId,
    older: SlotId,
}

const UNLINKED: Links = Links {
    newer: NIL,
    older: NIL,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// On the free chain (through `recency.older`).
    Free,
    Response,
    NotReplayable,
    Held,
}

/// One kept key. Times are nanoseconds since the store's epoch: 8 bytes, not 16.
struct Slot {
    key: DedupKey,
    fingerprint: FingerprintTag,
    expires: u64,
    /// Place in its expiry bucket, sorted by `expires`.
    expiry: Links,
    /// Completion of a stored response; the end of a hold.
    at: u64,
    /// The packed response (kind Response).
    data: Option<Packed>,
    /// Place in the store-wide recency list (evictable kinds only).
    recency: Links,
    /// Place in its scope's recency list (evictable kinds only).
    scope_recency: Links,
    scope: u32,
    bytes: u64,
    /// The status a held key answers.
    status: u16,
    kind: Kind,
}

/// A doubly linked recency list threaded through the slots.
#[derive(Clone, Copy)]
struct List {
    newest: SlotId,
    oldest: SlotId,
}

const EMPTY: List = List {
    newest: NIL,
    oldest: NIL,
};

type Field = fn(&mut Slot) -> &mut Links;

fn store_wide(s: &mut Slot) -> &mut Links {
    &mut s.recency
}

fn per_scope(s: &mut Slot) -> &mut Links {
    &mut s.scope_recency
}

fn by_expiry(s: &mut Slot) -> &mut Links {
    &mut s.expiry
}

const NANOS_PER_BUCKET: u64 = 1_000_000_000;

impl List {
    fn push_newest(&mut self, slots: &mut [Slot], id: SlotId, field: Field) {
        *field(&mut slots[id as usize]) = Links {
            newer: NIL,
            older: self.newest,
        };
        match self.newest {
            NIL => self.oldest = id,
            n => field(&mut slots[n as usize]).newer = id,
        }
        self.newest = id;
    }

    /// Links `id` just newer than `older` (`NIL`: as the oldest).
    fn insert_newer_than(&mut self, slots: &mut [Slot], id: SlotId, older: SlotId, field: Field) {
        let newer = match older {
            NIL => self.oldest,
            o => field(&mut slots[o as usize]).newer,
        };
        *field(&mut slots[id as usize]) = Links { newer, older };
        match newer {
            NIL => self.newest = id,
            n => field(&mut slots[n as usize]).older = id,
        }
        match older {
            NIL => self.oldest = id,
            o => field(&mut slots[o as usize]).newer = id,
        }
    }

    fn unlink(&mut self, slots: &mut [Slot], id: SlotId, field: Field) {
        let Links { newer, older } = *field(&mut slots[id as usize]);
        match newer {
            NIL => self.newest = older,
            n => field(&mut slots[n as usize]).older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => field(&mut slots[o as usize]).newer = newer,
        }
        *field(&mut slots[id as usize]) = UNLINKED;
    }
}

/// One scope's share of the store.
struct ScopeUse {
    id: ScopeId,
    /// Records plus reserved slots.
    keys: usize,
    /// Reserved slots plus held records (never evictable).
    pinned: usize,
    /// The scope's evictable records.
    recency: List,
}

/// The maps behind the mutex. Layout, for the cost of an entry (BENCHMARKS.md): records
/// live in one slab of fixed-size slots reused through a free chain; the key is stored once,
/// in its slot; the hash index holds only 4-byte slot ids (the keys are keyed blake3
/// digests, uniformly distributed and not chosen by clients, so their first 8 bytes are the
/// hash); both recency orders are intrusive lists in the slots; so is the expiry order,
/// in buckets of one second of expiry (a B-tree of buckets, each a list sorted by expiry:
/// records arrive nearly in expiry order, so the sorted insert walks back a step or two,
/// and the first bucket's oldest record is always the next to expire). A B-tree set of
/// (expiry, slot) instead would cost 32 bytes per entry, the lists cost 8. The slab does
/// not shrink: its peak is bounded by `max_entries`.
struct Inner {
    epoch: Instant,
    slots: Vec<Slot>,
    free: SlotId,
    index: HashTable<SlotId>,
    /// Expiry order: one bucket per second of expiry, each a list sorted by `expires`.
    expiry: BTreeMap<u64, List>,
    /// Evictable records (stored and not-replayable), store-wide.
    recency: List,
    /// Kept records (stored, not-replayable and held).
    live: usize,
    held: usize,
    /// Slots taken by flights in progress.
    reserved: usize,
    bytes: u64,
    scopes: Vec<ScopeUse>,
    scope_ids: HashMap<ScopeId, u32>,
    free_scopes: Vec<u32>,
}

fn hash_of(key: &DedupKey) -> u64 {
    u64::from_le_bytes([
        key.0[0], key.0[1], key.0[2], key.0[3], key.0[4], key.0[5], key.0[6], key.0[7],
    ])
}

impl Inner {
    fn tick(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn instant(&self, tick: u64) -> Instant {
        self.epoch + Duration::from_nanos(tick)
    }

    fn lookup(&self, key: &DedupKey) -> Option<SlotId> {
        self.index
            .find(hash_of(key), |&id| self.slots[id as usize].key == *key)
            .copied()
    }

    fn scope(&self, id: &ScopeId) -> Option<&ScopeUse> {
        self.scope_ids.get(id).map(|&i| &self.scopes[i as usize])
    }

    fn scope_keys(&self, scope: &ScopeId) -> usize {
        self.scope(scope).map_or(0, |u| u.keys)
    }

    fn scope_pinned(&self, scope: &ScopeId) -> usize {
        self.scope(scope).map_or(0, |u| u.pinned)
    }

    /// The scope's accounting slot, created on first use.
    fn use_scope(&mut self, id: ScopeId) -> u32 {
        if let Some(&i) = self.scope_ids.get(&id) {
            return i;
        }
        let u = ScopeUse {
            id,
            keys: 0,
            pinned: 0,
            recency: EMPTY,
        };
        let i = match self.free_scopes.pop() {
            Some(i) => {
                self.scopes[i as usize] = u;
                i
            }
            None => {
                self.scopes.push(u);
                (self.scopes.len() - 1) as u32
            }
        };
        self.scope_ids.insert(id, i);
        i
    }

    /// Lowers a scope's counts; a scope left with no key gives its accounting slot back.
    fn unuse(&mut self, i: u32, pinned: bool) {
        let u = &mut self.scopes[i as usize];
        u.keys = u.keys.saturating_sub(1);
        if pinned {
            u.pinned = u.pinned.saturating_sub(1);
        }
        if u.keys == 0 {
            let id = u.id;
            self.scope_ids.remove(&id);
            self.free_scopes.push(i);
        }
    }

    /// Who makes room for `scope`: a scope at its quota evicts only its own records.
    fn victim(&self, scope: &ScopeId, quota: usize) -> Option<SlotId> {
        let id = if self.scope_keys(scope) >= quota {
            self.scope(scope)?.recency.oldest
        } else {
            self.recency.oldest
        };
        (id != NIL).then_some(id)
    }

    /// Applies `op` (link as newest, or unlink) to both recency orders of an evictable
    /// record: store-wide and its scope's.
    fn in_both_recency_orders(
        &mut self,
        id: SlotId,
        op: fn(&mut List, &mut [Slot], SlotId, Field),
    ) {
        let scope = self.slots[id as usize].scope as usize;
        let Inner {
            slots,
            recency,
            scopes,
            ..
        } = self;
        op(recency, slots, id, store_wide);
        op(&mut scopes[scope].recency, slots, id, per_scope);
    }

    fn link_newest(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::push_newest);
    }

    fn unlink_recency(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::unlink);
    }

    /// Marks an evictable record as the most recently used.
    fn touch(&mut self, id: SlotId) {
        self.unlink_recency(id);
        self.link_newest(id);
    }

    /// Files a new slot under its expiry: walks back from the bucket's newest past the
    /// records that expire later (few: records arrive nearly in expiry order).
    fn file_expiry(&mut self, id: SlotId) {
        let expires = self.slots[id as usize].expires;
        let Inner { slots, expiry, .. } = self;
        let list = expiry.entry(expires / NANOS_PER_BUCKET).or_insert(EMPTY);
        let mut older = list.newest;
        while older != NIL && slots[older as usize].expires > expires {
            older = slots[older as usize].expiry.older;
        }
        list.insert_newer_than(slots, id, older, by_expiry);
    }

    fn unfile_expiry(&mut self, id: SlotId) {
        let bucket = self.slots[id as usize].expires / NANOS_PER_BUCKET;
        let Inner { slots, expiry, .. } = self;
        if let Some(list) = expiry.get_mut(&bucket) {
            list.unlink(slots, id, by_expiry);
            if list.newest == NIL {
                expiry.remove(&bucket);
            }
        }
    }

    /// The record that expires next.
    fn next_to_expire(&self) -> Option<(u64, SlotId)> {
        let (_, list) = self.expiry.first_key_value()?;
        Some((self.slots[list.oldest as usize].expires, list.oldest))
    }

    fn alloc(&mut self, slot: Slot) -> SlotId {
        match self.free {
            NIL => {
                self.slots.push(slot);
                (self.slots.len() - 1) as SlotId
            }
            id => {
                self.free = self.slots[id as usize].recency.older;
                self.slots[id as usize] = slot;
                id
            }
        }
    }

    fn found(&self, id: SlotId) -> Found {
        let s = &self.slots[id as usize];
        let record = match (s.kind, &s.data) {
            (Kind::Response, Some(p)) => Record::Response(Arc::new(p.unpack(self.instant(s.at)))),
            (Kind::Held, _) => Record::Held(Held {
                status: s.status,
                until: self.instant(s.at),
            }),
            _ => Record::NotReplayable,
        };
        Found {
            record,
            fingerprint: s.fingerprint,
            expires: self.instant(s.expires),
        }
    }
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
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

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
        let s = MemoryStore::new(2, 1 << 20, usize::MAX);
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        s.reserve(now, ScopeId::default()).unwrap();
        assert!(s.settle(
            key(1),
            ScopeId::default(),
            Some((resp(b"a", now), fp(), far)),
            now
        ));
        s.reserve(now, ScopeId::default()).unwrap();
        let held = Held {
            status: 502,
            until: far,
        };
        assert!(s.settle(
            key(2),
            ScopeId::default(),
            Some((Record::Held(held), fp(), far)),
            now
        ));
        // Full: one stored, one held. A new flight evicts the stored record.
        s.reserve(now, ScopeId::default()).unwrap();
        assert!(s.get(&key(1), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 1);
        // Now one held + one reserved: nothing evictable.
        assert_eq!(s.reserve(now, ScopeId::default()), Err(Refusal::StoreFull));
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
        let s = MemoryStore::new(6, 1 << 20, 2);
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        // The victim stores two records, then the store fills with the abuser's.
        for k in 1..=2 {
            s.reserve(now, scope(1)).unwrap();
            assert!(s.settle(key(k), scope(1), Some((resp(b"v", now), fp(), far)), now));
        }
        for k in 10..40 {
            s.reserve(now, scope(2)).unwrap();
            assert!(s.settle(key(k), scope(2), Some((resp(b"a", now), fp(), far)), now));
        }
        // Free room was never refused; once full, the abuser only ever replaced its own.
        assert_eq!(s.len(), (6, 0));
        assert_eq!(s.scope_keys(&scope(1)), 2);
        assert_eq!(s.scope_keys(&scope(2)), 4);
        assert!(s.get(&key(1), now).is_some() && s.get(&key(2), now).is_some());
        assert!(s.get(&key(39), now).is_some() && s.get(&key(35), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 26);
        // A third scope under its quota still evicts the least recently used record overall.
        s.reserve(now, scope(3)).unwrap();
        assert_eq!(s.scope_keys(&scope(2)), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_and_held_keys_of_one_scope_never_pass_its_quota() {
        let s = MemoryStore::new(100, 1 << 20, 2);
        let now = Instant::now();
        let held = Held {
            status: 502,
            until: now + Duration::from_secs(30),
        };
        s.reserve(now, scope(1)).unwrap();
        s.settle(
            key(1),
            scope(1),
            Some((Record::Held(held), fp(), held.until)),
            now,
        );
        s.reserve(now, scope(1)).unwrap();
        assert_eq!(s.reserve(now, scope(1)), Err(Refusal::ScopeQuota));
        // Other scopes are not affected.
        s.reserve(now, scope(2)).unwrap();
        // The hold ends: the scope may start a new key again.
        let later = held.until;
        s.reserve(later, scope(1)).unwrap();
        assert_eq!(s.scope_keys(&scope(1)), 2);
        // Every slot released: no per-scope bookkeeping is left behind.
        for sc in [1, 1, 2] {
            s.settle(key(9), scope(sc), None, later);
        }
        assert_eq!(s.scope_keys(&scope(1)), 0);
        assert_eq!(s.inner.lock().scope_ids.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_with_nothing_evictable_is_store_full_not_quota() {
        let s = MemoryStore::new(2, 1 << 20, 1);
        let now = Instant::now();
        s.reserve(now, scope(1)).unwrap();
        s.reserve(now, scope(2)).unwrap();
        assert_eq!(s.reserve(now, scope(3)), Err(Refusal::StoreFull));
        s.settle(
            key(2),
            scope(2),
            Some((resp(b"b", now), fp(), now + Duration::from_secs(60))),
            now,
        );
        s.settle(
            key(1),
            scope(1),
            Some((resp(b"a", now), fp(), now + Duration::from_secs(60))),
            now,
        );
        // Scope 3, under its quota, evicts the least recently used record (scope 2's).
        s.reserve(now, scope(3)).unwrap();
        assert!(s.get(&key(2), now).is_none());
        // Scope 1, at its quota, gives up its own record, never scope 3's slot.
        s.reserve(now, scope(1)).unwrap();
        assert!(s.get(&key(1), now).is_none());
        assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 2);
        assert_eq!(s.len(), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_and_are_counted_apart() {
        let s = MemoryStore::new(10, 1 << 20, usize::MAX);
        let now = Instant::now();
        s.reserve(now, ScopeId::default()).unwrap();
        s.settle(
            key(1),
            ScopeId::default(),
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
        let s = MemoryStore::new(100, r.weight() * 2, usize::MAX);
        for n in 1..=2 {
            s.reserve(now, ScopeId::default()).unwrap();
            s.settle(
                key(n),
                ScopeId::default(),
                Some((resp(b"0123456789", now), fp(), far)),
                now,
            );
        }
        // Touch 1 so that 2 is the least recently used.
        assert!(s.get(&key(1), now).is_some());
        s.reserve(now, ScopeId::default()).unwrap();
        s.settle(
            key(3),
            ScopeId::default(),
            Some((resp(b"0123456789", now), fp(), far)),
            now,
        );
        assert!(s.get(&key(1), now).is_some());
        assert!(s.get(&key(2), now).is_none());
        assert!(s.get(&key(3), now).is_some());
        assert_eq!(s.stats().bytes.load(Ordering::Relaxed), r.weight() * 2);
    }

    /// What an entry costs is mostly its slot (BENCHMARKS.md, "stored entries": 200 bytes
    /// beyond the response is the budget); a field added here spends it for every entry.
    #[test]
    fn a_slot_is_120_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 120);
        // The packed response: its bytes plus the Arc's two counters, one allocation.
        let r = StoredResponse {
            status: 200,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            )],
            body: Bytes::from_static(b"ok\n"),
            completed_at: Instant::now(),
        };
        assert_eq!(Packed::pack(&r).len(), 6 + 7 + 12 + 10 + 3);
    }

    /// Walks every structure of the slab and checks it against the counts.
    fn check_invariants(s: &MemoryStore) {
        let inner = s.inner.lock();
        let live: Vec<SlotId> = (0..inner.slots.len() as SlotId)
            .filter(|&i| inner.slots[i as usize].kind != Kind::Free)
            .collect();
        assert_eq!(live.len(), inner.live);
        assert_eq!(inner.index.len(), inner.live);
        for &id in &live {
            assert_eq!(inner.lookup(&inner.slots[id as usize].key), Some(id));
        }
        let walk = |list: List, field: fn(&Slot) -> Links| {
            let (mut n, mut at, mut newer) = (0, list.newest, NIL);
            while at != NIL {
                let l = field(&inner.slots[at as usize]);
                assert_eq!(l.newer, newer);
                (newer, at, n) = (at, l.older, n + 1);
            }
            assert_eq!(newer, list.oldest);
            n
        };
        assert_eq!(walk(inner.recency, |s| s.recency), inner.live - inner.held);
        let mut filed = 0;
        let mut last = 0;
        for (&bucket, &list) in &inner.expiry {
            filed += walk(list, |s| s.expiry);
            let mut at = list.oldest;
            while at != NIL {
                let e = inner.slots[at as usize].expires;
                assert!(e >= last && e / NANOS_PER_BUCKET == bucket);
                last = e;
                at = inner.slots[at as usize].expiry.newer;
            }
        }
        assert_eq!(filed, inner.live);
        let scoped: usize = inner
            .scope_ids
            .values()
            .map(|&i| walk(inner.scopes[i as usize].recency, |s| s.scope_recency))
            .sum();
        assert_eq!(scoped, inner.live - inner.held);
    }

    #[tokio::test(start_paused = true)]
    async fn mixed_retentions_expire_exactly_and_the_slab_stays_consistent() {
        let s = MemoryStore::new(64, 1 << 20, 24);
        let start = Instant::now();
        let mut now = start;
        // key -> expiry, the model.
        let mut model: HashMap<u8, Instant> = HashMap::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let ttls = [900, 1000, 1500, 5000, 5001, 60_000];
        for step in 0..5000 {
            now += Duration::from_millis(next() % 400);
            let k = (next() % 96) as u8;
            match next() % 4 {
                0 | 1 => {
                    let scope = scope((next() % 3) as u8);
                    if s.reserve(now, scope).is_err() {
                        continue;
                    }
                    let ttl = Duration::from_millis(ttls[(next() % 6) as usize]);
                    let record = if next() % 8 == 0 {
                        Record::Held(Held {
                            status: 502,
                            until: now + ttl,
                        })
                    } else {
                        resp(b"x", now)
                    };
                    if s.settle(key(k), scope, Some((record, fp(), now + ttl)), now) {
                        model.insert(k, now + ttl);
                    }
                }
                2 => {
                    let expected = model.get(&k).is_some_and(|&e| e > now);
                    // Evictions may have dropped it; an expired record is never returned.
                    let got = s.get(&key(k), now).is_some();
                    assert!(
                        !got || expected,
                        "step {step}: key {k} returned after expiry"
                    );
                }
                _ => s.sweep(now),
            }
            // Whatever is kept is unexpired once swept.
            s.sweep(now);
            let inner = s.inner.lock();
            let t = inner.tick(now);
            assert!(inner
                .slots
                .iter()
                .all(|sl| sl.kind == Kind::Free || sl.expires > t));
            drop(inner);
            check_invariants(&s);
        }
        // Everything expires in the end, and nothing is left behind.
        s.sweep(now + Duration::from_secs(61));
        check_invariants(&s);
        assert_eq!(s.len(), (0, 0));
        assert_eq!(s.inner.lock().expiry.len(), 0);
        assert_eq!(s.inner.lock().scope_ids.len(), 0);
        assert!(s.stats().evicted_expired.load(Ordering::Relaxed) > 100);
    }
}
