//! One request on a shadow route, from its first body byte to its response's end.
//!
//! The request takes Pingora's pass-through path untouched. Meanwhile this state machine
//! hashes the body as it streams to the backend, classifies the key at the end of the body
//! against the [`ShadowTable`] (would-be collapsed or replayed, counted in
//! `idem_shadow_duplicates_total`), and, if this request would have been the leader, records
//! what its response would have left behind (DESIGN section 4) when the response ends.
//!
//! ```text
//! Hashing --end of body--> Leader --end of response / error--> Done
//!    \--over max_body / duplicate / refused----------------------/
//! ```

use crate::config::route::{RouteId, StatusSet};
use crate::dedup::shadow::table::{Ending, Seen, ShadowLeader, ShadowTable};
use crate::key::{DedupKey, FingerprintHasher, KeyDeriver, Scope};
use crate::observe::metrics::Metrics;
use crate::outcome::Retention;
use pingora::{Error, ErrorType};
use std::time::Duration;

/// What a shadow request needs from its route once the body is on its way.
#[derive(Clone, Copy)]
pub(crate) struct ShadowPolicy {
    /// Bodies over this would not be deduplicated by an enforcing route either.
    pub(crate) max_body: u64,
    /// `ttl` with a key, `fingerprint_ttl` without.
    pub(crate) retention: Retention,
    /// Statuses an enforcing route would store.
    pub(crate) store_statuses: StatusSet,
    /// Larger responses would not be replayable.
    pub(crate) max_response_body: u64,
    /// How long an unknown outcome would be held: the upstream total deadline.
    pub(crate) hold_for: Duration,
}

/// The state of one shadow request.
pub(crate) struct ShadowRequest(State);

enum State {
    /// The body streams through to the backend and is hashed on the way.
    Hashing {
        /// Boxed: blake3's state is large, and most requests are not on a shadow route.
        hasher: Box<FingerprintHasher>,
        scope: Scope,
        /// The decoded `Idempotency-Key`, if any.
        key: Option<Vec<u8>>,
        /// Body bytes hashed so far.
        read: u64,
        policy: ShadowPolicy,
    },
    /// The would-be leader: its response decides what the key would hold.
    Leader {
        leader: ShadowLeader,
        policy: ShadowPolicy,
        /// Status of the upstream response, once its header arrived.
        status: Option<u16>,
        /// The response's type can be stored (not an event stream, gRPC, trailers).
        storable: bool,
        /// Response body bytes so far.
        body: u64,
    },
    /// Counted, or not countable.
    Done,
}

/// Where a shadow request reports to.
pub(crate) struct Sinks<'a> {
    /// The table of keys seen on shadow routes.
    pub(crate) table: &'a ShadowTable,
    /// Key derivation.
    pub(crate) keys: &'a KeyDeriver,
    /// For `idem_shadow_duplicates_total`.
    pub(crate) metrics: &'a Metrics,
    /// The request's route.
    pub(crate) route: RouteId,
}

impl ShadowRequest {
    /// Starts hashing a request whose head gave `hasher` and `scope`.
    pub(crate) fn new(
        hasher: FingerprintHasher,
        scope: Scope,
        key: Option<Vec<u8>>,
        policy: ShadowPolicy,
    ) -> ShadowRequest {
        ShadowRequest(State::Hashing {
            hasher: Box::new(hasher),
            scope,
            key,
            read: 0,
            policy,
        })
    }

    /// A request body chunk on its way upstream. At the end of the body the key is derived
    /// and classified; its short hash is returned for the access log.
    pub(crate) fn body(
        &mut self,
        chunk: Option<&[u8]>,
        end: bool,
        sinks: &Sinks<'_>,
    ) -> Option<DedupKey> {
        let State::Hashing {
            hasher,
            read,
            policy,
            ..
        } = &mut self.0
        else {
            return None;
        };
        if let Some(chunk) = chunk {
            *read += chunk.len() as u64;
            hasher.update(chunk);
        }
        if *read > policy.max_body {
            self.0 = State::Done;
            return None;
        }
        if !end {
            return None;
        }
        let State::Hashing {
            hasher,
            scope,
            key,
            policy,
            ..
        } = std::mem::replace(&mut self.0, State::Done)
        else {
            unreachable!("checked above");
        };
        let fingerprint = hasher.finish();
        let dedup_key = match &key {
            Some(k) => sinks.keys.keyed(&scope, k),
            None => sinks.keys.by_fingerprint(&scope, &fingerprint),
        };
        self.0 = match sinks.table.arrive(dedup_key, fingerprint, key.is_some()) {
            Seen::Leader(leader) => State::Leader {
                leader,
                policy,
                status: None,
                storable: false,
                body: 0,
            },
            Seen::Duplicate(kind) => {
                sinks.metrics.shadow_duplicate(sinks.route, kind);
                State::Done
            }
            Seen::Refused => State::Done,
        };
        Some(dedup_key)
    }

    /// Pingora retries re-send the body from the start: hash it afresh.
    pub(crate) fn restart(&mut self, fresh: FingerprintHasher) {
        if let State::Hashing { hasher, read, .. } = &mut self.0 {
            **hasher = fresh;
            *read = 0;
        }
    }

    /// The final response header arrived.
    pub(crate) fn response_header(&mut self, code: u16, is_storable: bool) {
        if let State::Leader {
            status, storable, ..
        } = &mut self.0
        {
            *status = Some(code);
            *storable = is_storable;
        }
    }

    /// A response body chunk; the key settles at the end, before the last bytes reach the
    /// client, as a stored response would.
    pub(crate) fn response_body(&mut self, len: usize, end: bool, table: &ShadowTable) {
        if let State::Leader { body, .. } = &mut self.0 {
            *body += len as u64;
            if end {
                self.finish(table, None);
            }
        }
    }

    /// The would-be leader's response is complete (`error` is `None`) or ended early: record
    /// what an enforcing route would keep for its key.
    pub(crate) fn finish(&mut self, table: &ShadowTable, error: Option<&Error>) {
        let State::Leader {
            leader,
            policy,
            status,
            storable,
            body,
        } = std::mem::replace(&mut self.0, State::Done)
        else {
            return;
        };
        let now = tokio::time::Instant::now();
        let held = Ending::Refused {
            until: leader.started + policy.hold_for,
        };
        let not_sent = error.is_some_and(|e| {
            matches!(
                e.etype(),
                ErrorType::ConnectTimedout
                    | ErrorType::ConnectRefused
                    | ErrorType::ConnectNoRoute
                    | ErrorType::ConnectError
            )
        });
        let ending = match status {
            Some(502 | 504) => held,
            Some(_) if error.is_some() => held,
            Some(s) if !policy.store_statuses.contains(s) => Ending::Freed,
            Some(_) if !storable || body > policy.max_response_body => Ending::Refused {
                until: now + policy.retention.ttl,
            },
            Some(_) => Ending::Stored {
                until: now + policy.retention.ttl,
            },
            None if not_sent => Ending::Freed,
            None => held,
        };
        table.settle(leader, ending);
    }
}
