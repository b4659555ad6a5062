//! The store's unit tests and its invariant walker.
use super::slab::*;
use super::*;
use bytes::Bytes;
use http::HeaderValue;
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
        trailers: Vec::new(),
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
