//! Shadow mode: what a route would deduplicate, measured on traffic idem does not touch.
//!
//! A `shadow` route forwards every request exactly as an `off` route does (Pingora's streamed
//! proxy path, no header added). While an eligible request's body streams through, idem
//! computes the key an enforcing route would (from the `Idempotency-Key`, else from the
//! fingerprint) and, at the end of the body, looks it up in a [`ShadowTable`]:
//! * the key is in flight: the request would have been **collapsed** onto that call;
//! * the key completed with a response the route would store, within its retention
//!   (`ttl` with a key, `fingerprint_ttl` without): it would have been **replayed**;
//! * otherwise it would have been a leader, and its own response decides what the key holds.
//!
//! Keys that would be held (upstream 502/504, a response cut off or no answer after the
//! request was sent) or not replayable (a response too large or not storable), and keyed
//! requests whose fingerprint differs from the key's first request (422), would get an error
//! from idem: they count as neither. With `on_concurrent = "reject"` a collapsed request would
//! get 409 rather than the leader's response; it is still counted as collapsed (the backend
//! would not have run it).
//!
//! The table is separate from the store, so a shadow route never changes what an enforcing
//! route sees, and bounded: least recently used entries go first past `max_entries`, and an
//! entry past its retention counts as absent.

use crate::key::{DedupKey, Fingerprint};
use crate::observe::metrics::ShadowKind;
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// Keys a shadow route has seen, and what an enforcing route would hold for them.
pub(crate) struct ShadowTable {
    entries: Mutex<LruCache<DedupKey, Entry>>,
    next_leader: AtomicU64,
}

struct Entry {
    state: State,
    /// Of the key's first request, to recognise a reused `Idempotency-Key` (422).
    fingerprint: Fingerprint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The would-be leader's call runs; `leader` identifies it.
    InFlight { leader: u64 },
    /// A response that would be replayed until `until`.
    Stored { until: Instant },
    /// Held or not replayable: later requests would get an error until `until`.
    Refused { until: Instant },
}

/// How a request on a shadow route was classified at the end of its body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// It would have been the leader: settle the key with its response.
    Leader(ShadowLeader),
    /// It would not have reached the backend.
    Duplicate(ShadowKind),
    /// It would have been answered by an error (held, not replayable, key reused).
    Refused,
}

/// The would-be leader of a key: settles it once its response is known.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ShadowLeader {
    key: DedupKey,
    id: u64,
    /// When the call started: a held key would be held from here.
    pub(crate) started: Instant,
}

/// What the would-be leader's response would have left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A stored response, replayed until `until`.
    Stored {
        /// End of retention.
        until: Instant,
    },
    /// Held or not replayable until `until`.
    Refused {
        /// End of the hold or of retention.
        until: Instant,
    },
    /// Not stored (say, a 500) or never sent: the key would be free again.
    Freed,
}

impl ShadowTable {
    /// A table of at most `max_entries` keys.
    pub(crate) fn new(max_entries: usize) -> ShadowTable {
        ShadowTable {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
            )),
            next_leader: AtomicU64::new(1),
        }
    }

    /// Classifies a request whose body has been read to the end.
    pub(crate) fn arrive(&self, key: DedupKey, fingerprint: Fingerprint, keyed: bool) -> Seen {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if let Some(e) = entries.get(&key) {
            let live = match e.state {
                State::InFlight { .. } => true,
                State::Stored { until } | State::Refused { until } => until > now,
            };
            if live {
                if keyed && e.fingerprint != fingerprint {
                    return Seen::Refused;
                }
                return match e.state {
                    State::InFlight { .. } => Seen::Duplicate(ShadowKind::Collapsed),
                    State::Stored { .. } => Seen::Duplicate(ShadowKind::Replayed),
                    State::Refused { .. } => Seen::Refused,
                };
            }
        }
        let id = self.next_leader.fetch_add(1, Ordering::Relaxed);
        entries.put(
            key,
            Entry {
                state: State::InFlight { leader: id },
                fingerprint,
            },
        );
        Seen::Leader(ShadowLeader {
            key,
            id,
            started: now,
        })
    }

    /// Records what `leader`'s response would have left. A no-op when the entry has been
    /// evicted or replaced since.
    pub(crate) fn settle(&self, leader: ShadowLeader, ending: Ending) {
        let mut entries = self.entries.lock();
        let Some(e) = entries.peek_mut(&leader.key) else {
            return;
        };
        if e.state != (State::InFlight { leader: leader.id }) {
            return;
        }
        match ending {
            Ending::Stored { until } => e.state = State::Stored { until },
            Ending::Refused { until } => e.state = State::Refused { until },
            Ending::Freed => {
                entries.pop(&leader.key);
            }
        }
    }

    /// Number of keys tracked (expired ones included until they are reused or evicted).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u8) -> DedupKey {
        DedupKey([n; 32])
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn leader(s: Seen) -> ShadowLeader {
        match s {
            Seen::Leader(l) => l,
            other => panic!("expected a leader, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_collapse_and_later_ones_replay_within_retention() {
        let t = ShadowTable::new(10);
        let first = leader(t.arrive(key(1), fp(1), false));
        assert_eq!(
            t.arrive(key(1), fp(1), false),
            Seen::Duplicate(ShadowKind::Collapsed)
        );
        let until = Instant::now() + Duration::from_secs(60);
        t.settle(first, Ending::Stored { until });
        assert_eq!(
            t.arrive(key(1), fp(1), false),
            Seen::Duplicate(ShadowKind::Replayed)
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        let _again = leader(t.arrive(key(1), fp(1), false));
    }

    #[tokio::test(start_paused = true)]
    async fn unstored_responses_free_the_key_and_refusals_count_as_neither() {
        let t = ShadowTable::new(10);
        let first = leader(t.arrive(key(1), fp(1), true));
        t.settle(first, Ending::Freed);
        let second = leader(t.arrive(key(1), fp(1), true));
        // Same key, other request: 422 in an enforcing route.
        assert_eq!(t.arrive(key(1), fp(2), true), Seen::Refused);
        let until = Instant::now() + Duration::from_secs(5);
        t.settle(second, Ending::Refused { until });
        assert_eq!(t.arrive(key(1), fp(1), true), Seen::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_leader_does_not_settle_a_newer_flight() {
        let t = ShadowTable::new(1);
        let old = leader(t.arrive(key(1), fp(1), false));
        // Capacity 1: key 2 evicts key 1, and key 1's next request leads again.
        let _other = leader(t.arrive(key(2), fp(2), false));
        let new = leader(t.arrive(key(1), fp(1), false));
        let until = Instant::now() + Duration::from_secs(60);
        t.settle(old, Ending::Stored { until });
        assert_eq!(
            t.arrive(key(1), fp(1), false),
            Seen::Duplicate(ShadowKind::Collapsed)
        );
        t.settle(new, Ending::Stored { until });
        assert_eq!(
            t.arrive(key(1), fp(1), false),
            Seen::Duplicate(ShadowKind::Replayed)
        );
        assert_eq!(t.len(), 1);
    }
}
