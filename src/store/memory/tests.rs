//! The store's unit tests and its invariant walker.
use super::slab::*;
use super::*;
use crate::key::ScopeId;
use crate::owner::ClientId;
use bytes::Bytes;
use http::HeaderValue;
use std::collections::HashMap;
use std::time::Duration;

fn key(n: u8) -> DedupKey {
    DedupKey([n; 32])
}

fn resp(body: &'static [u8], now: Instant) -> Record {
    Record::Response(Arc::new(StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from_static(body),
        trailers: Vec::new(),
        completed_at: now,
        origin: None,
    }))
}

fn fp() -> Fingerprint {
    Fingerprint([0; 32])
}

#[tokio::test(start_paused = true)]
async fn lru_record_is_evicted_for_a_new_flight_but_held_and_reserved_never_are() {
    let s = MemoryStore::new(Limits::bounds(2, 1 << 20));
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    s.reserve(now, Owner::default()).unwrap();
    assert!(s.settle(
        key(1),
        Owner::default(),
        Some((resp(b"a", now), fp(), far)),
        None,
        now
    ));
    s.reserve(now, Owner::default()).unwrap();
    let held = Held {
        status: 502,
        until: far,
    };
    assert!(s.settle(
        key(2),
        Owner::default(),
        Some((Record::Held(held), fp(), far)),
        None,
        now
    ));
    // Full: one stored, one held. A new flight evicts the stored record.
    s.reserve(now, Owner::default()).unwrap();
    assert!(s.get(&key(1), now).is_none());
    assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 1);
    // Now one held + one reserved: nothing evictable.
    assert_eq!(s.reserve(now, Owner::default()), Err(Refusal::StoreFull));
    assert!(matches!(
        s.get(&key(2), now).unwrap().record,
        Record::Held(_)
    ));
}

/// A caller's own scope, all from one address.
fn scope(n: u8) -> Owner {
    Owner {
        scope: ScopeId([n; 16]),
        client: ClientId::default(),
    }
}

/// `max_entries` with a quota of `quota` keys per scope (and per client: one number).
fn scoped(max_entries: usize, quota: usize) -> Limits {
    Limits {
        scope_keys: quota,
        client_keys: usize::MAX,
        ..Limits::bounds(max_entries, 1 << 20)
    }
}

#[tokio::test(start_paused = true)]
async fn a_scope_at_its_quota_evicts_only_its_own_records() {
    let s = MemoryStore::new(scoped(6, 2));
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    // The victim stores two records, then the store fills with the abuser's.
    for k in 1..=2 {
        s.reserve(now, scope(1)).unwrap();
        assert!(s.settle(
            key(k),
            scope(1),
            Some((resp(b"v", now), fp(), far)),
            None,
            now
        ));
    }
    for k in 10..40 {
        s.reserve(now, scope(2)).unwrap();
        assert!(s.settle(
            key(k),
            scope(2),
            Some((resp(b"a", now), fp(), far)),
            None,
            now
        ));
    }
    // Free room was never refused; once full, the abuser only ever replaced its own.
    assert_eq!(s.len(), (6, 0));
    assert_eq!(s.owner_keys(&scope(1)).0, 2);
    assert_eq!(s.owner_keys(&scope(2)).0, 4);
    assert!(s.get(&key(1), now).is_some() && s.get(&key(2), now).is_some());
    assert!(s.get(&key(39), now).is_some() && s.get(&key(35), now).is_none());
    assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 26);
    // A third scope under its quota still evicts the least recently used record overall.
    s.reserve(now, scope(3)).unwrap();
    assert_eq!(s.owner_keys(&scope(2)).0, 3);
}

#[tokio::test(start_paused = true)]
async fn in_flight_and_held_keys_of_one_scope_never_pass_its_quota() {
    let s = MemoryStore::new(scoped(100, 2));
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
        None,
        now,
    );
    s.reserve(now, scope(1)).unwrap();
    assert_eq!(s.reserve(now, scope(1)), Err(Refusal::ScopeQuota));
    // Other scopes are not affected.
    s.reserve(now, scope(2)).unwrap();
    // The hold ends: the scope may start a new key again.
    let later = held.until;
    s.reserve(later, scope(1)).unwrap();
    assert_eq!(s.owner_keys(&scope(1)).0, 2);
    // Every slot released: no per-scope bookkeeping is left behind.
    for sc in [1, 1, 2] {
        s.settle(key(9), scope(sc), None, None, later);
    }
    assert_eq!(s.owner_keys(&scope(1)).0, 0);
    assert_eq!(s.inner.lock().scopes.ids.len(), 0);
    assert_eq!(s.inner.lock().clients.ids.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn full_store_with_nothing_evictable_is_store_full_not_quota() {
    let s = MemoryStore::new(scoped(2, 1));
    let now = Instant::now();
    s.reserve(now, scope(1)).unwrap();
    s.reserve(now, scope(2)).unwrap();
    assert_eq!(s.reserve(now, scope(3)), Err(Refusal::StoreFull));
    s.settle(
        key(2),
        scope(2),
        Some((resp(b"b", now), fp(), now + Duration::from_secs(60))),
        None,
        now,
    );
    s.settle(
        key(1),
        scope(1),
        Some((resp(b"a", now), fp(), now + Duration::from_secs(60))),
        None,
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
    let s = MemoryStore::new(Limits::bounds(10, 1 << 20));
    let now = Instant::now();
    s.reserve(now, Owner::default()).unwrap();
    s.settle(
        key(1),
        Owner::default(),
        Some((resp(b"a", now), fp(), now + Duration::from_secs(5))),
        None,
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
    let s = MemoryStore::new(Limits::bounds(100, r.weight() * 2));
    for n in 1..=2 {
        s.reserve(now, Owner::default()).unwrap();
        s.settle(
            key(n),
            Owner::default(),
            Some((resp(b"0123456789", now), fp(), far)),
            None,
            now,
        );
    }
    // Touch 1 so that 2 is the least recently used.
    assert!(s.get(&key(1), now).is_some());
    s.reserve(now, Owner::default()).unwrap();
    s.settle(
        key(3),
        Owner::default(),
        Some((resp(b"0123456789", now), fp(), far)),
        None,
        now,
    );
    assert!(s.get(&key(1), now).is_some());
    assert!(s.get(&key(2), now).is_none());
    assert!(s.get(&key(3), now).is_some());
    assert_eq!(s.stats().bytes.load(Ordering::Relaxed), r.weight() * 2);
}

fn from(client: u8, scope: u8) -> Owner {
    Owner {
        scope: ScopeId([scope; 16]),
        client: ClientId([client; 16]),
    }
}

fn client_limits(max_entries: usize, client_keys: usize) -> Limits {
    Limits {
        scope_keys: 1000,
        client_keys,
        ..Limits::bounds(max_entries, 1 << 20)
    }
}

/// Finding 1 of issue 14: minted scopes (one per request) from one address used to defeat
/// the per-scope quota. The client's quota holds whatever scopes it mints.
#[tokio::test(start_paused = true)]
async fn a_client_minting_scopes_replaces_only_its_own_records() {
    let s = MemoryStore::new(client_limits(10, 3));
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    let victim = from(1, 1);
    s.reserve(now, victim).unwrap();
    assert!(s.settle(
        key(1),
        victim,
        Some((resp(b"v", now), fp(), far)),
        None,
        now
    ));
    for k in 10..60 {
        let minted = from(2, k);
        s.reserve(now, minted).unwrap();
        assert!(s.settle(
            key(k),
            minted,
            Some((resp(b"a", now), fp(), far)),
            None,
            now
        ));
    }
    // 9 free slots were the minter's; every later key replaced one of its own.
    assert_eq!(s.len(), (10, 0));
    assert_eq!(s.stats().evicted_capacity.load(Ordering::Relaxed), 50 - 9);
    assert!(s.get(&key(1), now).is_some());
    assert!(s.get(&key(59), now).is_some() && s.get(&key(49), now).is_none());
    // A light client making room takes it from the heaviest one, not from the victim.
    let third = from(3, 1);
    s.reserve(now, third).unwrap();
    assert!(s.get(&key(1), now).is_some());
    assert_eq!(s.owner_keys(&from(2, 0)).1, 8);
    check_invariants(&s);
}

/// Room is taken from the heaviest client first, measured against a client's allowance:
/// by count, or by bytes when those weigh more.
#[tokio::test(start_paused = true)]
async fn room_comes_from_the_heaviest_client_first() {
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    let big = Record::Response(Arc::new(StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from(vec![b'x'; 1000]),
        trailers: Vec::new(),
        completed_at: now,
        origin: None,
    }));
    let s = MemoryStore::new(Limits {
        scope_keys: 1000,
        client_keys: 100,
        client_bytes: 2000,
        ..Limits::bounds(6, 1 << 20)
    });
    // Client 1: three small records; client 2: two large ones (each half its allowance).
    for (k, owner, record) in [
        (1, from(1, 1), resp(b"s", now)),
        (2, from(1, 1), resp(b"s", now)),
        (3, from(1, 1), resp(b"s", now)),
        (4, from(2, 1), big.clone()),
        (5, from(2, 1), big.clone()),
    ] {
        s.reserve(now, owner).unwrap();
        assert!(s.settle(key(k), owner, Some((record, fp(), far)), None, now));
    }
    // Full once a sixth key is in flight; the seventh evicts from client 2 (its bytes use
    // its whole allowance), oldest first.
    s.reserve(now, from(3, 1)).unwrap();
    s.reserve(now, from(3, 1)).unwrap();
    assert!(s.get(&key(4), now).is_none());
    assert!(s.get(&key(5), now).is_some());
    // Now client 1 (3 of 100 keys, 3 % of its bytes) weighs less than client 2 (1000 of
    // 2000 bytes): client 2 goes again.
    s.reserve(now, from(3, 1)).unwrap();
    assert!(s.get(&key(5), now).is_none());
    assert!((1..=3).all(|k| s.get(&key(k), now).is_some()));
    check_invariants(&s);
}

/// Keys nobody can evict are capped per client and store-wide, so that stored responses
/// always keep part of the store.
#[tokio::test(start_paused = true)]
async fn in_flight_and_held_keys_are_capped_per_client_and_store_wide() {
    let s = MemoryStore::new(Limits {
        max_pinned: 4,
        ..client_limits(10, 2)
    });
    let now = Instant::now();
    let held = Held {
        status: 502,
        until: now + Duration::from_secs(30),
    };
    let a = from(1, 1);
    s.reserve(now, a).unwrap();
    s.settle(
        key(1),
        a,
        Some((Record::Held(held), fp(), held.until)),
        None,
        now,
    );
    s.reserve(now, from(1, 2)).unwrap();
    // Any scope of client 1: at its quota of pinned keys.
    assert_eq!(s.reserve(now, from(1, 3)), Err(Refusal::ClientQuota));
    s.reserve(now, from(2, 1)).unwrap();
    s.reserve(now, from(3, 1)).unwrap();
    // Four pinned: the store-wide cap, whoever asks.
    assert_eq!(s.reserve(now, from(4, 1)), Err(Refusal::StoreFull));
    s.reserve(held.until, from(4, 1)).unwrap();
    check_invariants(&s);
}

/// A record also written to the shared store is deleted there when it is evicted here, or
/// when it cannot be kept at all; an expiry or a purge is not told (Redis expires it
/// itself; a purge deletes it there first).
#[tokio::test(start_paused = true)]
async fn evicted_shared_records_are_told_with_their_reference() {
    let s = MemoryStore::new(Limits::bounds(2, 1 << 20));
    let told: Arc<parking_lot::Mutex<Vec<(DedupKey, SharedRef)>>> = Arc::default();
    let sink = told.clone();
    s.set_on_evict(Box::new(move |gone| sink.lock().extend(gone)));
    let now = Instant::now();
    let far = now + Duration::from_secs(60);
    let o = Owner::default();
    s.reserve(now, o).unwrap();
    let r1 = Some(SharedRef([1; 16]));
    assert!(s.settle(key(1), o, Some((resp(b"a", now), fp(), far)), r1, now));
    s.reserve(now, o).unwrap();
    let r2 = Some(SharedRef([2; 16]));
    assert!(s.settle(key(2), o, Some((Record::NotReplayable, fp(), far)), r2, now));
    assert!(matches!(
        s.get(&key(1), now).unwrap().record,
        Record::Response(_)
    ));
    assert!(told.lock().is_empty());
    // Room for a third: key 2 is the least recently used.
    s.reserve(now, o).unwrap();
    assert_eq!(*told.lock(), [(key(2), SharedRef([2; 16]))]);
    s.reserve(now, o).unwrap();
    assert_eq!(told.lock().len(), 2);
    // Nothing evictable left: the third record cannot be kept, and is told too.
    s.settle(key(3), o, None, None, now);
    assert!(!s.settle(
        key(4),
        o,
        Some((resp(&[b'x'; 2 << 20], now), fp(), far)),
        Some(SharedRef([4; 16])),
        now
    ));
    assert_eq!(told.lock()[2], (key(4), SharedRef([4; 16])));
    // Purges and expiries are not told.
    s.reserve(now, o).unwrap();
    let r5 = Some(SharedRef([5; 16]));
    assert!(s.settle(key(5), o, Some((resp(b"e", now), fp(), far)), r5, now));
    s.reserve(now, o).unwrap();
    assert!(s.settle(key(6), o, Some((resp(b"f", now), fp(), now)), r5, now));
    assert!(s.purge(&key(5)));
    s.sweep(now);
    assert_eq!(told.lock().len(), 3);
    check_invariants(&s);
}

/// What an entry costs is mostly its slot (BENCHMARKS.md, "stored entries": 200 bytes
/// beyond the response is the budget); a field added here spends it for every entry.
#[test]
fn a_slot_is_120_bytes() {
    assert_eq!(std::mem::size_of::<Slot>(), 120);
    // The packed response: its bytes plus the Arc's two counters, one allocation; a record
    // without an origin (the leading request's id) spends a byte on saying so.
    let r = StoredResponse {
        status: 200,
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        )],
        body: Bytes::from_static(b"ok\n"),
        trailers: Vec::new(),
        completed_at: Instant::now(),
        origin: None,
    };
    assert_eq!(Packed::pack(&r, None).len(), 1 + 6 + 1 + 7 + 12 + 10 + 3);
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
    let by_client: usize = inner
        .clients
        .ids
        .values()
        .map(|&i| {
            let g = &inner.clients.list[i as usize];
            let n = walk(g.recency, |s| s.client_recency);
            assert_eq!(n, g.evictable);
            n
        })
        .sum();
    assert_eq!(by_client, inner.live - inner.held);
    // Every client with evictable records is in the weight order, at its weight, once.
    let heavy: Vec<(u64, ClientId)> = inner
        .clients
        .ids
        .values()
        .map(|&i| &inner.clients.list[i as usize])
        .filter(|g| g.evictable > 0)
        .map(|g| (inner.allowance.weight(g.evictable, g.bytes), g.id))
        .collect();
    assert_eq!(heavy.len(), inner.heavy.len());
    assert!(heavy.iter().all(|e| inner.heavy.contains(e)));
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
        .scopes
        .ids
        .values()
        .map(|&i| walk(inner.scopes.list[i as usize].recency, |s| s.scope_recency))
        .sum();
    assert_eq!(scoped, inner.live - inner.held);
}

#[tokio::test(start_paused = true)]
async fn mixed_retentions_expire_exactly_and_the_slab_stays_consistent() {
    let s = MemoryStore::new(scoped(64, 24));
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
                if s.settle(key(k), scope, Some((record, fp(), now + ttl)), None, now) {
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
    assert_eq!(s.inner.lock().scopes.ids.len(), 0);
    assert_eq!(s.inner.lock().clients.ids.len(), 0);
    assert!(s.stats().evicted_expired.load(Ordering::Relaxed) > 100);
}
