//! The slab behind [`super::MemoryStore`]: fixed-size slots reused through a free chain,
//! a hash index of slot ids, the intrusive lists threaded through the slots (per-scope and
//! per-client recency, expiry buckets), the accounting groups (scopes, clients) and the
//! order of clients by weight. A small data structure of its own, kept apart from the
//! store's rules (what is evictable, quotas) that use it.

use super::packed::Packed;
use super::{Found, Record, SharedRef};
use crate::key::{DedupKey, FingerprintTag, ScopeId};
use crate::outcome::Held;
use crate::owner::ClientId;
use hashbrown::HashTable;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
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
    /// The packed response (kind Response); for a record this process also wrote to the
    /// shared store, that write's reference ([`Packed::shared_ref`]).
    pub(super) data: Option<Packed>,
    /// Place in its scope's recency list (evictable kinds only).
    pub(super) scope_recency: Links,
    /// Place in its client's recency list (evictable kinds only).
    pub(super) client_recency: Links,
    pub(super) scope: u32,
    pub(super) client: u32,
    /// Counted against `max_bytes`; a record larger than 4 GiB is never kept.
    pub(super) bytes: u32,
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

pub(super) fn per_scope(s: &mut Slot) -> &mut Links {
    &mut s.scope_recency
}

pub(super) fn per_client(s: &mut Slot) -> &mut Links {
    &mut s.client_recency
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

/// One accounting group's share of the store: a scope or a client.
pub(super) struct Group<Id> {
    pub(super) id: Id,
    /// Records plus reserved slots.
    pub(super) keys: usize,
    /// Reserved slots plus held records (never evictable).
    pub(super) pinned: usize,
    /// The group's evictable records, least recently used last.
    pub(super) recency: List,
    /// How many records `recency` holds, and their bytes.
    pub(super) evictable: usize,
    pub(super) bytes: u64,
}

/// The groups of one kind, by id; a group with no key left gives its slot back.
pub(super) struct Groups<Id> {
    pub(super) list: Vec<Group<Id>>,
    pub(super) ids: HashMap<Id, u32>,
    pub(super) free: Vec<u32>,
}

impl<Id: Copy + Eq + Hash> Groups<Id> {
    pub(super) fn new() -> Groups<Id> {
        Groups {
            list: Vec::new(),
            ids: HashMap::new(),
            free: Vec::new(),
        }
    }

    pub(super) fn get(&self, id: &Id) -> Option<&Group<Id>> {
        self.ids.get(id).map(|&i| &self.list[i as usize])
    }

    #[cfg(test)]
    pub(super) fn keys(&self, id: &Id) -> usize {
        self.get(id).map_or(0, |g| g.keys)
    }

    pub(super) fn pinned(&self, id: &Id) -> usize {
        self.get(id).map_or(0, |g| g.pinned)
    }

    /// The group's slot, created on first use.
    pub(super) fn enter(&mut self, id: Id) -> u32 {
        if let Some(&i) = self.ids.get(&id) {
            return i;
        }
        let g = Group {
            id,
            keys: 0,
            pinned: 0,
            recency: EMPTY,
            evictable: 0,
            bytes: 0,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.list[i as usize] = g;
                i
            }
            None => {
                self.list.push(g);
                (self.list.len() - 1) as u32
            }
        };
        self.ids.insert(id, i);
        i
    }

    /// Lowers a group's counts; a group left with no key gives its slot back.
    pub(super) fn leave(&mut self, i: u32, pinned: bool) {
        let g = &mut self.list[i as usize];
        g.keys = g.keys.saturating_sub(1);
        if pinned {
            g.pinned = g.pinned.saturating_sub(1);
        }
        if g.keys == 0 {
            let id = g.id;
            self.ids.remove(&id);
            self.free.push(i);
        }
    }
}

/// What a client's quota allows, which its weight is measured against.
#[derive(Clone, Copy)]
pub(super) struct Allowance {
    pub(super) keys: usize,
    pub(super) bytes: u64,
}

impl Allowance {
    /// The share of the allowance `evictable` records of `bytes` use, in 2^-32 units: the
    /// larger of the two. Clients are evicted from the heaviest down.
    pub(super) fn weight(&self, evictable: usize, bytes: u64) -> u64 {
        let share = |used: u128, of: u128| (used << 32) / of.max(1);
        let w = share(evictable as u128, self.keys as u128)
            .max(share(bytes as u128, u128::from(self.bytes)));
        u64::try_from(w).unwrap_or(u64::MAX)
    }
}

/// The maps behind the mutex. Layout, for the cost of an entry (BENCHMARKS.md): records
/// live in one slab of fixed-size slots reused through a free chain; the key is stored once,
/// in its slot; the hash index holds only 4-byte slot ids (the keys are keyed blake3
/// digests, uniformly distributed and not chosen by clients, so their first 8 bytes are the
/// hash); both recency orders (the record's scope's and its client's) are intrusive lists in
/// the slots; so is the expiry order, in buckets of one second of expiry (a B-tree of
/// buckets, each a list sorted by expiry: records arrive nearly in expiry order, so the
/// sorted insert walks back a step or two, and the first bucket's oldest record is always
/// the next to expire). A B-tree set of (expiry, slot) instead would cost 32 bytes per
/// entry, the lists cost 8. Clients with evictable records are ordered by weight in a B-tree
/// set (one entry per client, not per record). The slab does not shrink: its peak is
/// bounded by `max_entries`.
pub(super) struct Inner {
    pub(super) epoch: Instant,
    pub(super) slots: Vec<Slot>,
    pub(super) free: SlotId,
    pub(super) index: HashTable<SlotId>,
    /// Expiry order: one bucket per second of expiry, each a list sorted by `expires`.
    pub(super) expiry: BTreeMap<u64, List>,
    /// Kept records (stored, not-replayable and held).
    pub(super) live: usize,
    pub(super) held: usize,
    /// Slots taken by flights in progress.
    pub(super) reserved: usize,
    pub(super) bytes: u64,
    pub(super) scopes: Groups<ScopeId>,
    pub(super) clients: Groups<ClientId>,
    /// Clients with evictable records by weight (ties by address, so that the order does
    /// not depend on slot reuse): the heaviest is the last.
    pub(super) heavy: BTreeSet<(u64, ClientId)>,
    /// A client's quota, the measure of its weight.
    pub(super) allowance: Allowance,
    /// Shared records evicted under the lock, told to the hook once it is released.
    pub(super) gone: Vec<(DedupKey, SharedRef)>,
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

    /// The client whose records go first when room is needed: the heaviest (see
    /// [`Allowance::weight`]).
    pub(super) fn heaviest(&self) -> Option<u32> {
        let (_, id) = self.heavy.last()?;
        self.clients.ids.get(id).copied()
    }

    /// Applies `op` (link as newest, or unlink) to both recency orders of an evictable
    /// record, its scope's and its client's, and keeps the client's weight in step.
    fn in_both_recency_orders(
        &mut self,
        id: SlotId,
        op: fn(&mut List, &mut [Slot], SlotId, Field),
        change: isize,
    ) {
        let s = &self.slots[id as usize];
        let (scope, client, bytes) = (s.scope as usize, s.client, u64::from(s.bytes));
        let Inner {
            slots,
            scopes,
            clients,
            heavy,
            allowance,
            ..
        } = self;
        op(&mut scopes.list[scope].recency, slots, id, per_scope);
        let g = &mut clients.list[client as usize];
        op(&mut g.recency, slots, id, per_client);
        if change == 0 {
            return;
        }
        if g.evictable > 0 {
            heavy.remove(&(allowance.weight(g.evictable, g.bytes), g.id));
        }
        if change > 0 {
            g.evictable += 1;
            g.bytes += bytes;
        } else {
            g.evictable -= 1;
            g.bytes -= bytes;
        }
        if g.evictable > 0 {
            heavy.insert((allowance.weight(g.evictable, g.bytes), g.id));
        }
    }

    /// Makes a new evictable record the most recently used of its scope and its client.
    pub(super) fn link_newest(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::push_newest, 1);
    }

    /// Takes an evictable record out of the recency orders (it is being removed).
    pub(super) fn unlink_recency(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::unlink, -1);
    }

    /// Marks an evictable record as the most recently used.
    pub(super) fn touch(&mut self, id: SlotId) {
        self.in_both_recency_orders(id, List::unlink, 0);
        self.in_both_recency_orders(id, List::push_newest, 0);
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
                self.free = self.slots[id as usize].scope_recency.older;
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
