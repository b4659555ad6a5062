//! In-flight coordination: one leader per key, any number of waiters, then a settled record.
//!
//! State of a key (DESIGN section 4):
//! ```text
//! absent --join--> in flight (LeaderPermit + Waiters) --settle--> stored | not-replayable | held | absent
//!                                                                  \--- expiry / eviction ---> absent
//! ```
//! * [`Coordinator::join`] decides, under the key's map shard lock, whether a request leads,
//!   waits, is replayed, is held, or is refused. Lookup of the store happens under that same
//!   lock, so two requests can never both become leader of one key.
//! * Only the [`LeaderPermit`] settles a flight. [`LeaderPermit::settle`] writes the record to
//!   the store *before* removing the flight, so a request arriving in between finds one or
//!   the other, never neither (that gap would start a second upstream call).
//! * A permit dropped without `settle` (the leader task panicked or was cancelled) settles as
//!   outcome unknown and holds the key for the rest of the upstream deadline: the call may have
//!   reached the app, and the rule that outranks convenience says never run it twice.
//! * Waiters are counted per key, per client (address) and in total; a [`Waiter`] that is
//!   dropped (its client left) just gives its place back. The per-client cap keeps one
//!   caller from taking the whole budget: past it, that caller gets 429 client-quota while
//!   others still wait.

use crate::config::file::OnConcurrent;
use crate::config::route::RouteId;
use crate::key::{DedupKey, Fingerprint};
use crate::message::StoredResponse;
use crate::observe::request_id::Origin;
use crate::outcome::{Held, Outcome, Refusal, Retention};
use crate::owner::{ClientId, Owner};
use crate::store::memory::{Found, MemoryStore, Record, SharedRef};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What [`Coordinator::join`] decided for a request.
#[derive(Debug)]
pub(crate) enum Joined {
    /// First request for the key: make the one upstream call and settle the permit.
    Leader(LeaderPermit),
    /// A call for the key is in flight: wait for its outcome.
    Waiter(Waiter),
    /// A stored response.
    Replay {
        /// The response to replay.
        response: Arc<StoredResponse>,
        /// When the record expires (for `Cache-Status: ttl=`).
        expires: Instant,
    },
    /// Outcome unknown: answer 502/504 until the hold ends.
    Held(Held),
    /// The key's response was streamed to its leader only.
    NotReplayable,
    /// Neither led, joined nor replayed: misuse, in progress (reject mode), no room, or
    /// waiter caps.
    Refused(Refusal),
}

/// What a request brings to [`Coordinator::join`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct JoinRequest<'a> {
    /// The dedup key.
    pub(crate) key: DedupKey,
    /// The request's fingerprint.
    pub(crate) fingerprint: Fingerprint,
    /// The request carried an `Idempotency-Key`: a different fingerprint is misuse.
    pub(crate) keyed: bool,
    /// What a request for a key in flight does.
    pub(crate) on_concurrent: OnConcurrent,
    /// Cap on waiters for this key.
    pub(crate) max_waiters_per_key: usize,
    /// Cap on waiters of this request's client, across keys (`[server]
    /// max_waiters_per_client`).
    pub(crate) max_waiters_per_client: usize,
    /// How long an unknown outcome is held, from the call's start (the upstream total deadline).
    pub(crate) hold_for: Duration,
    /// The request's route, for the admin view.
    pub(crate) route: RouteId,
    /// Who asks: its scope and client, for the store's quotas and the waiter caps.
    pub(crate) owner: Owner,
    /// The request, as its waiters will name it if it leads.
    pub(crate) origin: Option<&'a Origin>,
}

struct Flight {
    fingerprint: Fingerprint,
    started: Instant,
    route: RouteId,
    owner: Owner,
    /// `None` while running; the outcome once settled. `send_replace` is used because the
    /// value must be kept even when no waiter is subscribed yet.
    state: watch::Sender<Option<Outcome>>,
    waiters: AtomicUsize,
    /// The leading request, for its waiters' access lines and spans.
    origin: Option<Origin>,
}

/// Coordinates flights over the store.
pub(crate) struct Coordinator {
    flights: DashMap<DedupKey, Arc<Flight>>,
    store: MemoryStore,
    waiters_total: AtomicUsize,
    /// Waiters by client; a client without waiters has no entry.
    waiters_by_client: Mutex<HashMap<ClientId, usize>>,
    /// Changed by a configuration reload.
    max_waiters: AtomicUsize,
}

/// One key in flight, for the admin view.
#[derive(Debug, Clone)]
pub(crate) struct FlightInfo {
    /// The key.
    pub(crate) key: DedupKey,
    /// The route of the request that leads it.
    pub(crate) route: RouteId,
    /// Time since the leader was registered.
    pub(crate) age: Duration,
    /// Requests waiting for it.
    pub(crate) waiters: usize,
}

/// Point-in-time counts for the metrics gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Keys with a leader running.
    pub(crate) inflight: usize,
    /// Requests waiting on a leader.
    pub(crate) waiters: usize,
}

impl Coordinator {
    /// A coordinator over `store`, with `max_waiters` waiters in total.
    pub(crate) fn new(store: MemoryStore, max_waiters: usize) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            flights: DashMap::new(),
            store,
            waiters_total: AtomicUsize::new(0),
            waiters_by_client: Mutex::new(HashMap::new()),
            max_waiters: AtomicUsize::new(max_waiters),
        })
    }

    /// Sets the cap on waiters across all keys (configuration reload); waiters already
    /// attached stay.
    pub(crate) fn set_max_waiters(&self, max_waiters: usize) {
        self.max_waiters.store(max_waiters, Ordering::Relaxed);
    }

    /// Counts a waiter of `client` in, within its share (`per_client`) and the total.
    fn admit_waiter(&self, client: ClientId, per_client: usize) -> Result<(), Refusal> {
        let mut by_client = self.waiters_by_client.lock();
        let mine = by_client.entry(client).or_insert(0);
        if *mine >= per_client {
            if *mine == 0 {
                by_client.remove(&client);
            }
            return Err(Refusal::ClientQuota);
        }
        if self.waiters_total.fetch_add(1, Ordering::Relaxed)
            >= self.max_waiters.load(Ordering::Relaxed)
        {
            self.waiters_total.fetch_sub(1, Ordering::Relaxed);
            if *mine == 0 {
                by_client.remove(&client);
            }
            return Err(Refusal::TooManyWaiters);
        }
        *mine += 1;
        Ok(())
    }

    fn release_waiter(&self, client: ClientId) {
        self.waiters_total.fetch_sub(1, Ordering::Relaxed);
        let mut by_client = self.waiters_by_client.lock();
        if let Some(n) = by_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&client);
            }
        }
    }

    /// Every key in flight, oldest first.
    pub(crate) fn flights(&self) -> Vec<FlightInfo> {
        let now = Instant::now();
        let mut all: Vec<FlightInfo> = self
            .flights
            .iter()
            .map(|e| FlightInfo {
                key: *e.key(),
                route: e.value().route,
                age: now.saturating_duration_since(e.value().started),
                waiters: e.value().waiters.load(Ordering::Relaxed),
            })
            .collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.age));
        all
    }

    /// Whether `key` has a call in flight.
    #[cfg(test)]
    pub(crate) fn is_in_flight(&self, key: &DedupKey) -> bool {
        self.flights.contains_key(key)
    }

    /// The store underneath.
    pub(crate) fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Current in-flight and waiter counts.
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            inflight: self.flights.len(),
            waiters: self.waiters_total.load(Ordering::Relaxed),
        }
    }

    /// Decides what a request for `req.key` does. Never blocks on I/O.
    pub(crate) fn join(self: &Arc<Self>, req: JoinRequest<'_>) -> Joined {
        let now = Instant::now();
        match self.flights.entry(req.key) {
            Entry::Occupied(e) => {
                let flight = e.get();
                if req.keyed && flight.fingerprint != req.fingerprint {
                    return Joined::Refused(Refusal::FingerprintMismatch);
                }
                if req.on_concurrent == OnConcurrent::Reject {
                    return Joined::Refused(Refusal::InProgress);
                }
                if flight.waiters.load(Ordering::Relaxed) >= req.max_waiters_per_key {
                    return Joined::Refused(Refusal::TooManyWaiters);
                }
                if let Err(refusal) =
                    self.admit_waiter(req.owner.client, req.max_waiters_per_client)
                {
                    return Joined::Refused(refusal);
                }
                flight.waiters.fetch_add(1, Ordering::Relaxed);
                Joined::Waiter(Waiter {
                    rx: flight.state.subscribe(),
                    flight: flight.clone(),
                    coordinator: self.clone(),
                    client: req.owner.client,
                })
            }
            Entry::Vacant(v) => {
                if let Some(Found {
                    record,
                    fingerprint,
                    expires,
                }) = self.store.get(&req.key, now)
                {
                    if req.keyed && fingerprint != req.fingerprint.tag() {
                        return Joined::Refused(Refusal::FingerprintMismatch);
                    }
                    return match record {
                        Record::Response(response) => Joined::Replay { response, expires },
                        Record::NotReplayable => Joined::NotReplayable,
                        Record::Held(h) => Joined::Held(h),
                    };
                }
                if let Err(refusal) = self.store.reserve(now, req.owner) {
                    return Joined::Refused(refusal);
                }
                let flight = Arc::new(Flight {
                    fingerprint: req.fingerprint,
                    started: now,
                    route: req.route,
                    owner: req.owner,
                    state: watch::Sender::new(None),
                    waiters: AtomicUsize::new(0),
                    origin: req.origin.cloned(),
                });
                v.insert(flight.clone());
                Joined::Leader(LeaderPermit {
                    key: req.key,
                    flight,
                    coordinator: self.clone(),
                    hold_for: req.hold_for,
                    settled: false,
                })
            }
        }
    }
}

/// The right and the duty to settle one key's flight.
///
/// # Drop
/// Dropping an unsettled permit settles the key as outcome unknown (held 502 until the call's
/// start plus the upstream deadline): the call may have reached the app.
pub(crate) struct LeaderPermit {
    key: DedupKey,
    flight: Arc<Flight>,
    coordinator: Arc<Coordinator>,
    hold_for: Duration,
    settled: bool,
}

impl std::fmt::Debug for LeaderPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaderPermit({:?})", self.key)
    }
}

impl LeaderPermit {
    /// The key this permit leads.
    pub(crate) fn key(&self) -> DedupKey {
        self.key
    }

    /// The hold an unknown outcome gets: until start plus the upstream deadline.
    pub(crate) fn hold(&self, status: u16) -> Held {
        Held {
            status,
            until: self.flight.started + self.hold_for,
        }
    }

    /// Records the outcome, frees or keeps the key, and wakes every waiter. Returns how many
    /// waiters were attached at that moment: they receive this outcome (the access log's
    /// "waiters served"). `shared`: the outcome was also written to the shared store by this
    /// process (the store deletes it there if it evicts it here).
    pub(crate) fn settle(
        mut self,
        outcome: Outcome,
        retention: Retention,
        shared: Option<SharedRef>,
    ) -> usize {
        self.settle_inner(outcome, retention, shared)
    }

    fn settle_inner(
        &mut self,
        outcome: Outcome,
        retention: Retention,
        shared: Option<SharedRef>,
    ) -> usize {
        self.settled = true;
        let now = Instant::now();
        let record = match &outcome {
            Outcome::Response {
                response,
                stored: true,
            } => Some((Record::Response(response.clone()), now + retention.ttl)),
            Outcome::NotReplayable => Some((Record::NotReplayable, now + retention.ttl)),
            Outcome::Unknown(h) => Some((Record::Held(*h), h.until)),
            Outcome::Response { stored: false, .. }
            | Outcome::Unreachable
            | Outcome::Refused(_) => None,
        };
        let c = &self.coordinator;
        // Store first, then remove the flight: see the module doc.
        c.store.settle(
            self.key,
            self.flight.owner,
            record.map(|(r, exp)| (r, self.flight.fingerprint, exp)),
            shared,
            now,
        );
        c.flights
            .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.flight));
        // Off the map, the flight gains no waiter; those attached now get the outcome.
        let served = self.flight.waiters.load(Ordering::Relaxed);
        self.flight.state.send_replace(Some(outcome));
        served
    }
}

impl Drop for LeaderPermit {
    fn drop(&mut self) {
        if !self.settled {
            tracing::error!(key = %self.key.short(), "leader dropped without an outcome; key held as outcome unknown");
            let held = self.hold(502);
            self.settle_inner(
                Outcome::Unknown(held),
                Retention {
                    ttl: Duration::ZERO,
                },
                None,
            );
        }
    }
}

/// A request attached to a flight in progress.
pub(crate) struct Waiter {
    rx: watch::Receiver<Option<Outcome>>,
    flight: Arc<Flight>,
    coordinator: Arc<Coordinator>,
    client: ClientId,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl Waiter {
    /// The request that leads the call this waiter waits for.
    pub(crate) fn origin(&self) -> Option<&Origin> {
        self.flight.origin.as_ref()
    }

    /// Waits up to `timeout` for the leader's outcome; `None` on timeout.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future (or the waiter) gives the waiter's place back and
    /// leaves the flight untouched.
    pub(crate) async fn wait(mut self, timeout: Duration) -> Option<Outcome> {
        let r = tokio::time::timeout(timeout, self.rx.wait_for(|s| s.is_some())).await;
        match r {
            Ok(Ok(state)) => state.clone(),
            // The sender lives in the flight, which this waiter holds: it cannot be dropped.
            Ok(Err(_)) => None,
            Err(_elapsed) => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.flight.waiters.fetch_sub(1, Ordering::Relaxed);
        self.coordinator.release_waiter(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::Limits;
    use bytes::Bytes;

    const HOLD: Duration = Duration::from_secs(30);
    const TTL: Retention = Retention {
        ttl: Duration::from_secs(60),
    };

    fn coordinator(max_entries: usize) -> Arc<Coordinator> {
        Coordinator::new(MemoryStore::new(Limits::bounds(max_entries, 1 << 20)), 1000)
    }

    fn req(k: u8, fp: u8, keyed: bool) -> JoinRequest<'static> {
        JoinRequest {
            key: DedupKey([k; 32]),
            fingerprint: Fingerprint([fp; 32]),
            keyed,
            on_concurrent: OnConcurrent::Wait,
            max_waiters_per_key: 100,
            max_waiters_per_client: 1000,
            hold_for: HOLD,
            route: RouteId(0),
            owner: Owner::default(),
            origin: None,
        }
    }

    fn response(status: u16, body: &'static str) -> Arc<StoredResponse> {
        Arc::new(StoredResponse {
            status,
            headers: vec![],
            body: Bytes::from_static(body.as_bytes()),
            trailers: Vec::new(),
            completed_at: Instant::now(),
            origin: None,
        })
    }

    fn leader(j: Joined) -> LeaderPermit {
        match j {
            Joined::Leader(p) => p,
            other => panic!("expected leader, got {other:?}"),
        }
    }

    fn waiter(j: Joined) -> Waiter {
        match j {
            Joined::Waiter(w) => w,
            other => panic!("expected waiter, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_leaders_response_and_later_requests_replay_it() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, true)));
        let w1 = waiter(c.join(req(1, 1, true)));
        let w2 = waiter(c.join(req(1, 1, true)));
        assert_eq!(
            c.counts(),
            Counts {
                inflight: 1,
                waiters: 2
            }
        );
        let t1 = tokio::spawn(w1.wait(Duration::from_secs(10)));
        let t2 = tokio::spawn(w2.wait(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let served = p.settle(
            Outcome::Response {
                response: response(201, "made"),
                stored: true,
            },
            TTL,
            None,
        );
        assert_eq!(served, 2, "both waiters receive the outcome");
        for t in [t1, t2] {
            match t.await.unwrap() {
                Some(Outcome::Response {
                    response,
                    stored: true,
                }) => {
                    assert_eq!(response.body, "made")
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            c.counts(),
            Counts {
                inflight: 0,
                waiters: 0
            }
        );
        assert!(matches!(c.join(req(1, 1, true)), Joined::Replay { .. }));
        // The retention ends 60s after completion.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let _again = leader(c.join(req(1, 1, true)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_name_the_request_that_leads_their_call() {
        use crate::observe::request_id::RequestId;
        let c = coordinator(10);
        let origin = Origin {
            request_id: RequestId::generate(),
            span: None,
        };
        let mut r = req(1, 1, true);
        r.origin = Some(&origin);
        let _p = leader(c.join(r));
        let other = Origin {
            request_id: RequestId::generate(),
            span: None,
        };
        r.origin = Some(&other);
        let w = waiter(c.join(r));
        assert_eq!(
            w.origin(),
            Some(&origin),
            "the leader's, not the waiter's own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn same_key_other_fingerprint_is_a_mismatch_in_flight_and_after() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, true)));
        assert!(matches!(
            c.join(req(1, 2, true)),
            Joined::Refused(Refusal::FingerprintMismatch)
        ));
        p.settle(
            Outcome::Response {
                response: response(200, "x"),
                stored: true,
            },
            TTL,
            None,
        );
        assert!(matches!(
            c.join(req(1, 2, true)),
            Joined::Refused(Refusal::FingerprintMismatch)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn unstored_response_frees_the_key() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, false)));
        let w = waiter(c.join(req(1, 1, false)));
        p.settle(
            Outcome::Response {
                response: response(500, "boom"),
                stored: false,
            },
            TTL,
            None,
        );
        assert!(matches!(
            w.wait(Duration::from_secs(1)).await,
            Some(Outcome::Response { stored: false, .. })
        ));
        let _retry = leader(c.join(req(1, 1, false)));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_outcome_holds_until_start_plus_deadline() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, true)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let held = p.hold(504);
        p.settle(Outcome::Unknown(held), TTL, None);
        assert!(matches!(c.join(req(1, 1, true)), Joined::Held(h) if h.status == 504));
        tokio::time::sleep(Duration::from_secs(19)).await;
        assert!(matches!(c.join(req(1, 1, true)), Joined::Held(_)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _after = leader(c.join(req(1, 1, true)));
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_permit_holds_the_key() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, true)));
        let w = waiter(c.join(req(1, 1, true)));
        // A leader task that died (panic, cancellation) drops its permit unsettled.
        drop(p);
        assert!(matches!(
            w.wait(Duration::from_secs(1)).await,
            Some(Outcome::Unknown(h)) if h.status == 502
        ));
        assert!(matches!(c.join(req(1, 1, true)), Joined::Held(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_times_out_and_leaves_without_touching_the_flight() {
        let c = coordinator(10);
        let p = leader(c.join(req(1, 1, true)));
        let w = waiter(c.join(req(1, 1, true)));
        assert!(w.wait(Duration::from_secs(5)).await.is_none());
        assert_eq!(
            c.counts(),
            Counts {
                inflight: 1,
                waiters: 0
            }
        );
        p.settle(Outcome::Unreachable, TTL, None);
        assert_eq!(
            c.counts(),
            Counts {
                inflight: 0,
                waiters: 0
            }
        );
        let _free = leader(c.join(req(1, 1, true)));
    }

    #[tokio::test(start_paused = true)]
    async fn flights_are_listed_with_route_age_and_waiters() {
        let c = coordinator(10);
        let mut r = req(1, 1, true);
        r.route = RouteId(3);
        let _p = leader(c.join(r));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _w = waiter(c.join(r));
        let _q = leader(c.join(req(2, 2, true)));
        let flights = c.flights();
        assert_eq!(flights.len(), 2);
        assert_eq!(flights[0].key, DedupKey([1; 32]), "oldest first");
        assert_eq!(flights[0].route, RouteId(3));
        assert_eq!(flights[0].age, Duration::from_secs(2));
        assert_eq!(flights[0].waiters, 1);
        assert_eq!(flights[1].waiters, 0);
        assert!(c.is_in_flight(&DedupKey([2; 32])));
        c.set_max_waiters(1);
        assert!(matches!(
            c.join(req(2, 2, true)),
            Joined::Refused(Refusal::TooManyWaiters)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn caps_and_reject_mode() {
        let c = coordinator(1);
        let _p = leader(c.join(req(1, 1, false)));
        let mut r = req(1, 1, false);
        r.on_concurrent = OnConcurrent::Reject;
        assert!(matches!(c.join(r), Joined::Refused(Refusal::InProgress)));
        let mut r = req(1, 1, false);
        r.max_waiters_per_key = 1;
        let _w = waiter(c.join(r));
        assert!(matches!(
            c.join(r),
            Joined::Refused(Refusal::TooManyWaiters)
        ));
        // One entry allowed and it is in flight: a new key cannot get a slot.
        assert!(matches!(
            c.join(req(2, 2, false)),
            Joined::Refused(Refusal::StoreFull)
        ));
    }
}
