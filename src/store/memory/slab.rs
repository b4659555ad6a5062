//! The slab behind [`super::MemoryStore`]: fixed-size slots reused through a free chain,
//! a hash index of slot ids, and the intrusive lists threaded through the slots (store-wide
//! and per-scope recency, expiry buckets). A small data structure of its own, kept apart
//! from the store's rules (what is evictable, quotas) that use it.

use super::packed::Packed;
use super::{Found, Record};
use crate::key::{DedupKey, FingerprintTag, ScopeId};
use crate::outcome::Held;
use hashbrown::HashTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Slots and index entries reserved at start, at most (beyond it they grow on demand):
/// 1 Mi slots are 120 MiB of address space, which a host with strict overcommit accounting
/// (`vm.overcommit_memory = 2`) counts as committed.
pub(super) const PREALLOCATE_UP_TO: usize = 1 << 20;

/// A slot index; `NIL` ends a list.
pub(super) type SlotId = u32;
pub(super) const NIL: SlotId = SlotId::MAX;

/// Neighbours in a recency list (toward the most and the least recently used).
#[derive(Clone, Copy)]
pub(super) struct Links {
    pub(super) newer: SlotId,
    pub(super) older: SlotId,
}

pub(super) const UNLINKED: Links = Links {
    newer: NIL,
    older: NIL,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// On the free chain (through `recency.older`).
    Free,
    Response,
    NotReplayable,
    Held,
}

/// One kept key. Times are nanoseconds since the store's epoch: 8 bytes, not 16.
pub(super) struct Slot {
    pub(super) key: DedupKey,
    pub(super) fingerprint: FingerprintTag,
    pub(super) expires: u64,
    /// Place in its expiry bucket, sorted by `expires`.
    pub(super) expiry: Links,
    /// Completion of a stored response; the end of a hold.
    pub(super) at: u64,
    /// The packed response (kind Response).
    pub(super) data: Option<Packed>,
    /// Place in the store-wide recency list (evictable kinds only).
    pub(super) recency: Links,
    /// Place in its scope's recency list (evictable kinds only).
    pub(super) scope_recency: Links,
    pub(super) scope: u32,
    pub(super) bytes: u64,
    /// The status a held key answers.
    pub(super) status: u16,
    pub(super) kind: Kind,
}

/// A doubly linked recency list threaded through the slots.
#[derive(Clone, Copy)]
pub(super) struct List {
    pub(super) newest: SlotId,
    pub(super) oldest: SlotId,
}

pub(super) const EMPTY: List = List {
    newest: NIL,
    oldest: NIL,
};

pub(super) type Field = fn(&mut Slot) -> &mut Links;

pub(super) fn store_wide(s: &mut Slot) -> &mut Links {
    &mut s.recency
}

pub(super) fn per_scope(s: &mut Slot) -> &mut Links {
    &mut s.scope_recency
}

pub(super) fn by_expiry(s: &mut Slot) -> &mut Links {
    &mut s.expiry
}

pub(super) const NANOS_PER_BUCKET: u64 = 1_000_000_000;

impl List {
    pub(super) fn push_newest(&mut self, slots: &mut [Slot], id: SlotId, field: Field) {
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
    pub(super) fn insert_newer_than(
        &mut self,
        slots: &mut [Slot],
        id: SlotId,
        older: SlotId,
        field: Field,
    ) {
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

    pub(super) fn unlink(&mut self, slots: &mut [Slot], id: SlotId, field: Field) {
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
pub(super) struct ScopeUse {
    pub(super) id: ScopeId,
    /// Records plus reserved slots.
    pub(super) keys: usize,
    /// Reserved slots plus held records (never evictable).
    pub(super) pinned: usize,
    /// The scope's evictable records.
    pub(super) recency: List,
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
pub(super) struct Inner {
    pub(super) epoch: Instant,
    pub(super) slots: Vec<Slot>,
    pub(super) free: SlotId,
    pub(super) index: HashTable<SlotId>,
    /// Expiry order: one bucket per second of expiry, each a list sorted by `expires`.
    pub(super) expiry: BTreeMap<u64, List>,
    /// Evictable records (stored and not-replayable), store-wide.
    pub(super) recency: List,
    /// Kept records (stored, not-replayable and held).
    pub(super) live: usize,
    pub(super) held: usize,
    /// Slots taken by flights in progress.
    pub(super) reserved: usize,
    pub(super) bytes: u64,
    pub(super) scopes: Vec<ScopeUse>,
    pub(super) scope_ids: HashMap<ScopeId, u32>,
    pub(super) free_scopes: Vec<u32>,
}

pub(super) fn hash_of(key: &DedupKey) -> u64 {
    u64::from_le_bytes([
        key.0[0], key.0[1], key.0[2], key.0[3], key.0[4], key.0[5], key.0[6], key.0[7],
    ])
}

impl Inner {
    pub(super) fn tick(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub(super) fn instant(&self, tick: u64) -> Instant {
        self.epoch + Duration::from_nanos(tick)
    }

    pub(super) fn lookup(&self, key: &DedupKey) -> Option<SlotId> {
        self.index
            .find(hash_of(key), |&id| self.slots[id as usize].key == *key)
            .copied()
    }

    pub(super) fn scope(&self, id: &ScopeId) -> Option<&ScopeUse> {
        self.scope_ids.get(id).map(|&i| &self.scopes[i as usize])
    }

    pub(super) fn scope_keys(&self, scope: &ScopeId) -> usize {
        self.scope(scope).map_or(0, |u| u.keys)
    }

    pub(super) fn scope_pinned(&self, scope: &ScopeId) -> usize {
        self.scope(scope).map_or(0, |u| u.pinned)
    }

    /// The scope's accounting slot, created on first use.
    pub(super) fn use_scope(&mut self, id: ScopeId) -> u32 {
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
    pub(super) fn unuse(&mut self, i: u32, pinned: bool) {
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
    pub(super) fn victim(&self, scope: &ScopeId, quota: usize) -> Option<SlotId> {
        let id = if self.scope_keys(scope) >= quota {
            self.scope(scope)?.recency.oldest
        } else {
            self.recency.oldest
        };
        (id != NIL).then_some(id)
    }

    /// Applies `op` (link as newest, or unlink) to both recency orders of an evictable
    /// record: store-wide and its scope's.
    pub(super) fn in_both_recency_orders(
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

    pub(super) fn link_newest(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::push_newest);
    }

    pub(super) fn unlink_recency(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::unlink);
    }

    /// Marks an evictable record as the most recently used.
    pub(super) fn touch(&mut self, id: SlotId) {
        self.unlink_recency(id);
        self.link_newest(id);
    }

    /// Files a new slot under its expiry: walks back from the bucket's newest past the
    /// records that expire later (few: records arrive nearly in expiry order).
    pub(super) fn file_expiry(&mut self, id: SlotId) {
        let expires = self.slots[id as usize].expires;
        let Inner { slots, expiry, .. } = self;
        let list = expiry.entry(expires / NANOS_PER_BUCKET).or_insert(EMPTY);
        let mut older = list.newest;
        while older != NIL && slots[older as usize].expires > expires {
            older = slots[older as usize].expiry.older;
        }
        list.insert_newer_than(slots, id, older, by_expiry);
    }

    pub(super) fn unfile_expiry(&mut self, id: SlotId) {
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
    pub(super) fn next_to_expire(&self) -> Option<(u64, SlotId)> {
        let (_, list) = self.expiry.first_key_value()?;
        Some((self.slots[list.oldest as usize].expires, list.oldest))
    }

    pub(super) fn alloc(&mut self, slot: Slot) -> SlotId {
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

    pub(super) fn found(&self, id: SlotId) -> Found {
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
