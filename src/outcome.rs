//! DESIGN section 4's vocabulary, shared by every tier: how one upstream call ended
//! ([`Outcome`]), how long a settled key is kept ([`Retention`]), the answer a held key gives
//! ([`Held`]), why idem refused to start or join a call ([`Refusal`]), and how a response
//! reached its client ([`Disposition`]).
//!
//! The coordinator, the leader task and the Redis store all speak these words; the HTTP
//! layer turns them into answers (`http::reply`, `http::problem`).

use crate::message::StoredResponse;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// `Retry-After` of a 409 in-progress: the call may end any moment, so a short wait.
pub(crate) const IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How one upstream call ended, as seen by everyone attached to it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A complete response; `stored` says whether later requests will be replayed it.
    Response {
        /// The response.
        response: Arc<StoredResponse>,
        /// Kept for replay (status in `store_statuses`).
        stored: bool,
    },
    /// Streamed to the leader's client only (too large or not storable).
    NotReplayable,
    /// The call may have run but idem has no usable answer; the key is held.
    Unknown(Held),
    /// No backend received the request; the key is free again.
    Unreachable,
    /// idem refused instead of calling (the shared store found misuse, was unavailable under
    /// fail-closed, or another replica's call outlasted the wait); nothing is kept and the
    /// key is free again.
    Refused(Refusal),
}

/// The answer a held key gives until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// 502 (reset, cut off, upstream 502) or 504 (timeout, upstream 504).
    pub(crate) status: u16,
    /// When the key is freed: the call's start plus the upstream total deadline.
    pub(crate) until: Instant,
}

/// How long a settled outcome is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// Retention of stored and not-replayable records, from completion.
    pub(crate) ttl: Duration,
}

/// Why a request neither leads, waits nor is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Same `Idempotency-Key`, different request (422).
    FingerprintMismatch,
    /// A call for the key is running and this request may not wait for it: the route says
    /// `on_concurrent = "reject"`, or the wait timed out (409).
    InProgress,
    /// No room for a new key: everything is in flight or held (503).
    StoreFull,
    /// The caller's scope holds its quota of keys (429).
    ScopeQuota,
    /// The caller's client (address) holds its share: keys in flight or held, or waiters
    /// (429).
    ClientQuota,
    /// Waiter caps reached (503).
    TooManyWaiters,
    /// The shared store is unreachable under `on_store_error = "fail-closed"` (503).
    StoreUnavailable,
}

/// How a response reached this client: decides `Cache-Status` and the replay headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// The leader's own response; `stored` says whether it was kept for replay.
    Leader {
        /// Kept for replay.
        stored: bool,
    },
    /// A waiter attached to the leader's call (or to another replica's).
    Collapsed,
    /// A stored response, with the seconds of retention left.
    Replay {
        /// Seconds until the record expires.
        ttl: u64,
    },
}
