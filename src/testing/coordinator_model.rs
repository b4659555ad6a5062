//! Model-based property test of the production coalescing module ([`crate::dedup::coordinator`] over
//! [`crate::store::memory::MemoryStore`]).
//!
//! Each case builds a current-thread tokio runtime with paused time, drives one real
//! [`Coordinator`] through a random sequence of arrivals (keyed and keyless, wait or reject),
//! client disconnects, leader completions of every kind, leader tasks that die, time
//! advances (waiter timeouts, retention and hold expiries, capacity evictions) and sweeps,
//! and after every step compares it with a small reference model of DESIGN section 4:
//!
//! * every `join` answer is the one the model predicts, so a `Leader` (an upstream
//!   execution) is only ever handed out for a key whose earlier call is settled and whose
//!   outcome is neither held nor retained: never a second execution while an earlier outcome
//!   is unknown or retained;
//! * every waiter still attached when its leader settles receives exactly that outcome (the
//!   same stored response, by pointer), and a waiter whose `wait_timeout` passes first
//!   receives `None` (answered 409 in-progress by the proxy);
//! * the quotas hold: a scope, a client (address) and the store never have more than their
//!   quota of keys in flight or held; a scope, then a client, at its quota makes room only
//!   from its own records, and otherwise the heaviest client gives up its least recently
//!   used one; a client never has more waiters than its share;
//! * in-flight and waiter counts, stored and reserved entries, held keys and both eviction
//!   counters equal the model's after every step, and all return to zero once every call is
//!   settled and every record has expired.
//!
//! Waiter and timeout boundaries never coincide: arrivals and advances happen on whole
//! seconds while `wait_timeout` ends on a half second, so tokio's millisecond timer rounding
//! cannot blur which of "settled" and "timed out" came first.

use crate::config::file::OnConcurrent;
use crate::config::route::RouteId;
use crate::dedup::coordinator::{Coordinator, JoinRequest, Joined, LeaderPermit};
use crate::key::{DedupKey, Fingerprint, ScopeId};
use crate::message::StoredResponse;
use crate::outcome::{Outcome, Refusal, Retention};
use crate::owner::{ClientId, Owner};
use crate::store::memory::{Limits, MemoryStore};
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Keys 0 to 3 carry an `Idempotency-Key` (fingerprint may differ: misuse); keys 4 to 6
/// are keyless fingerprint keys (the fingerprint is their identity, so they never mismatch).
/// Seven keys over four store slots: capacity evictions and store-full happen.
const KEYS: u8 = 7;
const KEYED: u8 = 4;
const MAX_ENTRIES: usize = 4;
/// Three scopes (key `k` belongs to scope `k % 3`) with a quota of two keys each; scopes 0
/// and 1 come from client 0, scope 2 from client 1, and a client's quota is three keys: a
/// scope or a client at its quota gives up only its own records, and never has more keys in
/// flight or held than its quota; otherwise the heaviest client gives up its oldest record.
const SCOPES: u8 = 3;
const SCOPE_QUOTA: usize = 2;
const CLIENT_QUOTA: usize = 3;
/// Three of the four slots at most in flight or held.
const MAX_PINNED: usize = 3;
const MAX_WAITERS_TOTAL: usize = 4;
const MAX_WAITERS_PER_CLIENT: usize = 3;
const MAX_WAITERS_PER_KEY: usize = 2;
const HOLD: Duration = Duration::from_secs(7);
const TTL: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_millis(4_500);

#[derive(Debug, Clone)]
enum Op {
    /// A request for `key` arrives (with fingerprint `fp` when keyed).
    Arrive { key: u8, fp: u8, reject: bool },
    /// The `n`-th running call (mod their number) completes with outcome `kind`.
    Complete { n: usize, kind: Kind },
    /// The `n`-th running call's task dies: its permit is dropped unsettled.
    DropPermit { n: usize },
    /// The `n`-th attached waiter's client disconnects.
    Disconnect { n: usize },
    /// Time passes.
    Advance { secs: u64 },
    /// The housekeeping sweep runs.
    Sweep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stored,
    Unstored,
    NotReplayable,
    Unknown502,
    Unknown504,
    Unreachable,
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(Kind::Stored),
        Just(Kind::Unstored),
        Just(Kind::NotReplayable),
        Just(Kind::Unknown502),
        Just(Kind::Unknown504),
        Just(Kind::Unreachable),
    ];
    prop_oneof![
        6 => (0..KEYS, 0u8..2, proptest::bool::weighted(0.15))
            .prop_map(|(key, fp, reject)| Op::Arrive { key, fp, reject }),
        3 => (0usize..8, kind).prop_map(|(n, kind)| Op::Complete { n, kind }),
        1 => (0usize..8).prop_map(|n| Op::DropPermit { n }),
        2 => (0usize..8).prop_map(|n| Op::Disconnect { n }),
        2 => (1u64..9).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Sweep),
    ]
}

/// A settled outcome reduced to what a waiter must see: the same response (by pointer), or
/// the same failure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Response { ptr: usize, stored: bool },
    NotReplayable,
    Unknown { status: u16, until: Instant },
    Unreachable,
}

fn seen(o: &Outcome) -> Seen {
    match o {
        Outcome::Response { response, stored } => Seen::Response {
            ptr: Arc::as_ptr(response) as usize,
            stored: *stored,
        },
        Outcome::NotReplayable => Seen::NotReplayable,
        Outcome::Unknown(h) => Seen::Unknown {
            status: h.status,
            until: h.until,
        },
        Outcome::Unreachable => Seen::Unreachable,
        // Only the shared store settles with a problem; this model never does.
        Outcome::Refused(_) => Seen::Unreachable,
    }
}

/// What the model expects `join` to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Leader,
    Waiter,
    Replay,
    Held,
    NotReplayable,
    Mismatch,
    InProgress,
    StoreFull,
    ScopeQuota,
    ClientQuota,
    TooManyWaiters,
}

fn actual(j: &Joined) -> Expect {
    match j {
        Joined::Leader(_) => Expect::Leader,
        Joined::Waiter(_) => Expect::Waiter,
        Joined::Replay { .. } => Expect::Replay,
        Joined::Held(_) => Expect::Held,
        Joined::NotReplayable => Expect::NotReplayable,
        Joined::Refused(Refusal::FingerprintMismatch) => Expect::Mismatch,
        Joined::Refused(Refusal::InProgress) => Expect::InProgress,
        Joined::Refused(Refusal::StoreFull) => Expect::StoreFull,
        Joined::Refused(Refusal::ScopeQuota) => Expect::ScopeQuota,
        Joined::Refused(Refusal::ClientQuota) => Expect::ClientQuota,
        Joined::Refused(Refusal::TooManyWaiters) => Expect::TooManyWaiters,
        Joined::Refused(Refusal::StoreUnavailable) => {
            panic!("only the Redis store refuses with store-unavailable")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordKind {
    Response,
    NotReplayable,
    Held,
}

#[derive(Debug, Clone, Copy)]
struct ModelRecord {
    kind: RecordKind,
    fp: u8,
    expires: Instant,
}

/// A waiter's task and where it reports what it received.
struct LiveWaiter {
    key: u8,
    /// `wait_timeout` ends here.
    deadline: Instant,
    result: Arc<Mutex<Option<Option<Seen>>>>,
    task: JoinHandle<()>,
}

/// A running upstream call: the permit the production code hands its flight task.
struct Running {
    key: u8,
    fp: u8,
    started: Instant,
    permit: LeaderPermit,
}

/// The reference model plus the live objects it shadows.
struct Harness {
    c: Arc<Coordinator>,
    /// Stored, not-replayable and held records, expired ones included until the store
    /// removes them (lazily, exactly as the store does).
    records: BTreeMap<u8, ModelRecord>,
    /// Evictable records, least recently used first.
    lru: VecDeque<u8>,
    running: Vec<Running>,
    waiters: Vec<LiveWaiter>,
    evicted_capacity: u64,
    evicted_expired: u64,
}

fn dedup_key(k: u8) -> DedupKey {
    DedupKey([k; 32])
}

fn scope_of(k: u8) -> u8 {
    k % SCOPES
}

fn client_of(k: u8) -> u8 {
    u8::from(scope_of(k) == 2)
}

fn client_id(client: u8) -> ClientId {
    ClientId([client + 1; 16])
}

fn owner(k: u8) -> Owner {
    Owner {
        scope: ScopeId([scope_of(k) + 1; 16]),
        client: client_id(client_of(k)),
    }
}

fn fingerprint(k: u8, fp: u8) -> Fingerprint {
    // Real fingerprints are digests; the byte that differs must fall in the half the
    // store keeps (`Fingerprint::tag`).
    let mut b = [k; 32];
    b[0] = fp;
    Fingerprint(b)
}

impl Harness {
    fn new() -> Harness {
        Harness {
            c: {
                let store = MemoryStore::new(Limits {
                    max_entries: MAX_ENTRIES,
                    max_bytes: 1 << 30,
                    max_pinned: MAX_PINNED,
                    scope_keys: SCOPE_QUOTA,
                    client_keys: CLIENT_QUOTA,
                    client_bytes: 1 << 30,
                });
                Coordinator::new(store, MAX_WAITERS_TOTAL)
            },
            records: BTreeMap::new(),
            lru: VecDeque::new(),
            running: Vec::new(),
            waiters: Vec::new(),
            evicted_capacity: 0,
            evicted_expired: 0,
        }
    }

    fn remove_record(&mut self, key: u8) {
        self.records.remove(&key);
        self.lru.retain(|k| *k != key);
    }

    /// The store's sweep: every record whose expiry is not after `now` goes.
    fn model_sweep(&mut self, now: Instant) {
        let expired: Vec<u8> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.remove_record(k);
            self.evicted_expired += 1;
        }
    }

    fn occupied(&self) -> usize {
        self.records.len() + self.running.len()
    }

    /// Records and running calls of the keys `of` selects (a scope's, a client's).
    fn keys_of(&self, of: impl Fn(u8) -> bool) -> usize {
        self.records.keys().filter(|k| of(**k)).count()
            + self.running.iter().filter(|r| of(r.key)).count()
    }

    /// Running calls and held records of the keys `of` selects: what they can never give
    /// up.
    fn pinned_of(&self, of: impl Fn(u8) -> bool) -> usize {
        self.records
            .iter()
            .filter(|(k, r)| of(**k) && r.kind == RecordKind::Held)
            .count()
            + self.running.iter().filter(|r| of(r.key)).count()
    }

    fn scope_keys(&self, scope: u8) -> usize {
        self.keys_of(|k| scope_of(k) == scope)
    }

    fn client_keys(&self, client: u8) -> usize {
        self.keys_of(|k| client_of(k) == client)
    }

    /// The least recently used evictable record among the keys `of` selects.
    fn oldest_of(&self, of: impl Fn(u8) -> bool) -> Option<u8> {
        self.lru.iter().copied().find(|k| of(*k))
    }

    /// Who makes room for a key of `key`'s scope and client (the store's rule 2), or the
    /// refusal.
    fn victim(&self, key: u8) -> Result<u8, Expect> {
        let (scope, client) = (scope_of(key), client_of(key));
        let pick = if self.scope_keys(scope) >= SCOPE_QUOTA {
            self.oldest_of(|k| scope_of(k) == scope)
                .ok_or(Expect::ScopeQuota)
        } else if self.client_keys(client) >= CLIENT_QUOTA {
            self.oldest_of(|k| client_of(k) == client)
                .ok_or(Expect::ClientQuota)
        } else {
            // The heaviest client: most evictable records, ties to the higher address.
            (0..2u8)
                .map(|c| (self.lru.iter().filter(|k| client_of(**k) == c).count(), c))
                .filter(|(n, _)| *n > 0)
                .max()
                .and_then(|(_, c)| self.oldest_of(|k| client_of(k) == c))
                .ok_or(Expect::StoreFull)
        };
        pick.map_err(|e| {
            if self.lru.is_empty() {
                Expect::StoreFull
            } else {
                e
            }
        })
    }

    fn evict(&mut self, victim: u8) {
        self.remove_record(victim);
        self.evicted_capacity += 1;
    }

    /// The store's `get`: a live record (refreshing recency), or nothing (removing an expired one).
    fn model_get(&mut self, key: u8, now: Instant) -> Option<ModelRecord> {
        let r = *self.records.get(&key)?;
        if r.expires > now {
            if r.kind != RecordKind::Held {
                self.lru.retain(|k| *k != key);
                self.lru.push_back(key);
            }
            return Some(r);
        }
        self.remove_record(key);
        self.evicted_expired += 1;
        None
    }

    fn predict_join(&mut self, key: u8, fp: u8, keyed: bool, reject: bool, now: Instant) -> Expect {
        if let Some(r) = self.running.iter().find(|r| r.key == key) {
            if keyed && r.fp != fp {
                return Expect::Mismatch;
            }
            if reject {
                return Expect::InProgress;
            }
            let on_key = self.waiters.iter().filter(|w| w.key == key).count();
            if on_key >= MAX_WAITERS_PER_KEY {
                return Expect::TooManyWaiters;
            }
            let of_client = self
                .waiters
                .iter()
                .filter(|w| client_of(w.key) == client_of(key))
                .count();
            if of_client >= MAX_WAITERS_PER_CLIENT {
                return Expect::ClientQuota;
            }
            if self.waiters.len() >= MAX_WAITERS_TOTAL {
                return Expect::TooManyWaiters;
            }
            return Expect::Waiter;
        }
        if let Some(r) = self.model_get(key, now) {
            if keyed && r.fp != fp {
                return Expect::Mismatch;
            }
            return match r.kind {
                RecordKind::Response => Expect::Replay,
                RecordKind::NotReplayable => Expect::NotReplayable,
                RecordKind::Held => Expect::Held,
            };
        }
        // The store's `reserve`: sweep, the quotas of keys in flight or held, then evict
        // for a slot.
        self.model_sweep(now);
        let (scope, client) = (scope_of(key), client_of(key));
        if self.pinned_of(|k| scope_of(k) == scope) >= SCOPE_QUOTA {
            return Expect::ScopeQuota;
        }
        if self.pinned_of(|k| client_of(k) == client) >= CLIENT_QUOTA {
            return Expect::ClientQuota;
        }
        if self.pinned_of(|_| true) >= MAX_PINNED {
            return Expect::StoreFull;
        }
        while self.occupied() >= MAX_ENTRIES {
            match self.victim(key) {
                Ok(victim) => self.evict(victim),
                Err(refusal) => return refusal,
            }
        }
        Expect::Leader
    }

    async fn settle_yield() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = Instant::now();
        match *op {
            Op::Arrive { key, fp, reject } => {
                let keyed = key < KEYED;
                let fp = if keyed { fp } else { 0 };
                let expect = self.predict_join(key, fp, keyed, reject, now);
                let joined = self.c.join(JoinRequest {
                    key: dedup_key(key),
                    fingerprint: fingerprint(key, fp),
                    keyed,
                    on_concurrent: if reject {
                        OnConcurrent::Reject
                    } else {
                        OnConcurrent::Wait
                    },
                    max_waiters_per_key: MAX_WAITERS_PER_KEY,
                    max_waiters_per_client: MAX_WAITERS_PER_CLIENT,
                    hold_for: HOLD,
                    route: RouteId(0),
                    owner: owner(key),
                    origin: None,
                });
                prop_assert_eq!(actual(&joined), expect, "join of key {} fp {}", key, fp);
                match joined {
                    Joined::Leader(permit) => {
                        // The headline rule, stated on its own: no call of this key is
                        // running and nothing for it is held or retained.
                        prop_assert!(!self.running.iter().any(|r| r.key == key));
                        prop_assert!(self.records.get(&key).is_none_or(|r| r.expires <= now));
                        self.running.push(Running {
                            key,
                            fp,
                            started: now,
                            permit,
                        });
                    }
                    Joined::Waiter(w) => {
                        let result = Arc::new(Mutex::new(None));
                        let slot = result.clone();
                        let task = tokio::spawn(async move {
                            let o = w.wait(WAIT).await;
                            *slot.lock().unwrap() = Some(o.as_ref().map(seen));
                        });
                        // Let it start waiting now: its timeout is armed on first poll.
                        Self::settle_yield().await;
                        prop_assert!(!task.is_finished(), "a waiter answered before its leader");
                        self.waiters.push(LiveWaiter {
                            key,
                            deadline: now + WAIT,
                            result,
                            task,
                        });
                    }
                    Joined::Held(h) => {
                        let r = self.records[&key];
                        prop_assert_eq!(h.until, r.expires);
                        prop_assert!(h.until > now);
                    }
                    Joined::Replay { expires, .. } => {
                        prop_assert_eq!(expires, self.records[&key].expires);
                    }
                    _ => {}
                }
            }
            Op::Complete { n, kind } => {
                if self.running.is_empty() {
                    return Ok(());
                }
                let run = self.running.remove(n % self.running.len());
                let outcome = match kind {
                    Kind::Stored | Kind::Unstored => Outcome::Response {
                        response: Arc::new(StoredResponse {
                            status: if kind == Kind::Stored { 200 } else { 500 },
                            headers: vec![],
                            body: Bytes::from_static(b"answer"),
                            trailers: Vec::new(),
                            completed_at: now,
                            origin: None,
                        }),
                        stored: kind == Kind::Stored,
                    },
                    Kind::NotReplayable => Outcome::NotReplayable,
                    Kind::Unknown502 => Outcome::Unknown(run.permit.hold(502)),
                    Kind::Unknown504 => Outcome::Unknown(run.permit.hold(504)),
                    Kind::Unreachable => Outcome::Unreachable,
                };
                let expected = seen(&outcome);
                let record = match kind {
                    Kind::Stored => Some((RecordKind::Response, now + TTL)),
                    Kind::NotReplayable => Some((RecordKind::NotReplayable, now + TTL)),
                    Kind::Unknown502 | Kind::Unknown504 => {
                        Some((RecordKind::Held, run.started + HOLD))
                    }
                    Kind::Unstored | Kind::Unreachable => None,
                };
                let attached = self.waiters.iter().filter(|w| w.key == run.key).count();
                let served = run.permit.settle(outcome, Retention { ttl: TTL }, None);
                prop_assert_eq!(served, attached, "waiters served");
                self.model_settle(run.key, run.fp, record, now);
                self.deliver(run.key, Some(expected)).await?;
            }
            Op::DropPermit { n } => {
                if self.running.is_empty() {
                    return Ok(());
                }
                let run = self.running.remove(n % self.running.len());
                let until = run.started + HOLD;
                drop(run.permit);
                self.model_settle(run.key, run.fp, Some((RecordKind::Held, until)), now);
                let expected = Seen::Unknown { status: 502, until };
                self.deliver(run.key, Some(expected)).await?;
            }
            Op::Disconnect { n } => {
                if self.waiters.is_empty() {
                    return Ok(());
                }
                let w = self.waiters.remove(n % self.waiters.len());
                w.task.abort();
                Self::settle_yield().await;
                prop_assert!(w.task.is_finished());
                prop_assert!(
                    w.result.lock().unwrap().is_none(),
                    "aborted waiter answered"
                );
            }
            Op::Advance { secs } => {
                tokio::time::advance(Duration::from_secs(secs)).await;
                Self::settle_yield().await;
                let now = Instant::now();
                let mut kept = Vec::new();
                for w in std::mem::take(&mut self.waiters) {
                    if w.deadline <= now {
                        prop_assert!(w.task.is_finished(), "waiter past its timeout still waits");
                        let got = w.result.lock().unwrap().clone();
                        prop_assert_eq!(got, Some(None), "timed-out waiter");
                    } else {
                        prop_assert!(!w.task.is_finished(), "waiter answered without an outcome");
                        kept.push(w);
                    }
                }
                self.waiters = kept;
            }
            Op::Sweep => {
                self.c.store().sweep(now);
                self.model_sweep(now);
            }
        }
        self.check_counts()
    }

    /// The store's `settle`: release the slot, sweep, replace the key's record, evict for
    /// room (never needed here: the released slot is the room), insert.
    fn model_settle(
        &mut self,
        key: u8,
        fp: u8,
        record: Option<(RecordKind, Instant)>,
        now: Instant,
    ) {
        let Some((kind, expires)) = record else {
            return;
        };
        self.model_sweep(now);
        self.remove_record(key);
        while self.occupied() >= MAX_ENTRIES {
            let victim = self.victim(key).expect("a settled slot is always free");
            self.evict(victim);
        }
        self.records.insert(key, ModelRecord { kind, fp, expires });
        if kind != RecordKind::Held {
            self.lru.push_back(key);
        }
    }

    /// Every waiter of `key` must now have received `expected`.
    async fn deliver(&mut self, key: u8, expected: Option<Seen>) -> Result<(), TestCaseError> {
        Self::settle_yield().await;
        let mut kept = Vec::new();
        for w in std::mem::take(&mut self.waiters) {
            if w.key != key {
                kept.push(w);
                continue;
            }
            prop_assert!(
                w.task.is_finished(),
                "a waiter did not receive its leader's outcome"
            );
            let got = w.result.lock().unwrap().clone();
            prop_assert_eq!(got, Some(expected.clone()), "waiter of key {}", key);
        }
        self.waiters = kept;
        Ok(())
    }

    fn check_counts(&self) -> Result<(), TestCaseError> {
        let counts = self.c.counts();
        prop_assert_eq!(counts.inflight, self.running.len(), "in-flight keys");
        prop_assert_eq!(counts.waiters, self.waiters.len(), "waiters");
        prop_assert_eq!(
            self.c.store().len(),
            (self.records.len(), self.running.len()),
            "store (records, reserved)"
        );
        let stats = self.c.store().stats();
        let held = self
            .records
            .values()
            .filter(|r| r.kind == RecordKind::Held)
            .count() as u64;
        prop_assert_eq!(stats.held.load(Ordering::Relaxed), held, "held keys");
        prop_assert_eq!(
            stats.entries.load(Ordering::Relaxed),
            self.records.len() as u64
        );
        prop_assert_eq!(
            stats.evicted_capacity.load(Ordering::Relaxed),
            self.evicted_capacity,
            "capacity evictions"
        );
        prop_assert_eq!(
            stats.evicted_expired.load(Ordering::Relaxed),
            self.evicted_expired,
            "expiries"
        );
        for k in 0..SCOPES {
            let (scope, client) = (scope_of(k), client_of(k));
            prop_assert_eq!(
                self.c.store().owner_keys(&owner(k)),
                (self.scope_keys(scope), self.client_keys(client)),
                "keys of scope {} and client {}",
                scope,
                client
            );
            prop_assert!(self.pinned_of(|x| scope_of(x) == scope) <= SCOPE_QUOTA);
            prop_assert!(self.pinned_of(|x| client_of(x) == client) <= CLIENT_QUOTA);
        }
        prop_assert!(self.pinned_of(|_| true) <= MAX_PINNED);
        Ok(())
    }

    /// Settles what is left, lets every hold and retention run out: nothing may remain.
    async fn drain(&mut self) -> Result<(), TestCaseError> {
        while !self.running.is_empty() {
            self.step(&Op::Complete {
                n: 0,
                kind: Kind::Unreachable,
            })
            .await?;
        }
        self.step(&Op::Advance {
            secs: HOLD.as_secs() + TTL.as_secs() + 1,
        })
        .await?;
        self.step(&Op::Sweep).await?;
        prop_assert!(self.waiters.is_empty());
        prop_assert_eq!(self.c.counts().inflight, 0);
        prop_assert_eq!(self.c.counts().waiters, 0);
        prop_assert_eq!(self.c.store().len(), (0, 0));
        let stats = self.c.store().stats();
        prop_assert_eq!(stats.bytes.load(Ordering::Relaxed), 0, "stored bytes");
        prop_assert_eq!(stats.held.load(Ordering::Relaxed), 0);
        Ok(())
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut h = Harness::new();
        for op in &ops {
            h.step(op).await?;
        }
        h.drain().await
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("IDEM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn coordinator_matches_the_lifecycle_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

/// The model itself must be able to fail: a coordinator that forgot a held key would hand
/// out a second leader, and the model says so.
#[test]
fn model_detects_a_second_execution_during_a_hold() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        let arrive = Op::Arrive {
            key: 0,
            fp: 0,
            reject: false,
        };
        h.step(&arrive).await.unwrap();
        h.step(&Op::Complete {
            n: 0,
            kind: Kind::Unknown502,
        })
        .await
        .unwrap();
        // Sabotage the model's view: it now believes the key is free while the real
        // coordinator holds it; the next arrival must be reported as a divergence.
        h.records.clear();
        h.lru.clear();
        assert!(h.step(&arrive).await.is_err());
    });
}
