//! When a request may go out on a pooled connection: learned per backend from what the
//! backend does to the connections idem keeps idle.
//!
//! The failure this prevents: a backend that answers `HTTP/1.1` with a length and no
//! `Connection: close`, then closes the socket a few milliseconds later (uWSGI's
//! `--http-socket` does so after every response; Django's `request_finished` work delays
//! the close), or that closes idle connections after its own keep-alive timeout (gunicorn
//! 2 s, uvicorn and Node 5 s). A request written in that gap is lost: for a leader the
//! outcome is unknown and its key is held, so idem must not create that doubt itself.
//!
//! idem watches every connection it keeps idle (`upstream::pool`) and records:
//! * how long a connection has been seen to stay open after its response (`survived`);
//! * the shortest idle time after which the backend closed one without announcing it
//!   (`closed`, remembered for [`FORGET_CLOSE_AFTER`]);
//! * the backend's `Keep-Alive: timeout=N` hint.
//!
//! The rule: a connection idle for `t` may carry a request that must not be lost only when
//! the backend is not one that closes after responses (no silent close seen within
//! [`PROBATION`] of a response), has shown it keeps connections (one survived at least
//! [`PROBATION`]), and `t` is within the window: half the longest survival seen, half the
//! shortest silent close seen, the hint less a second, and `pool_idle_timeout`, whichever
//! is least. Before that is known, such requests use a new connection: the cost is a
//! connect per request (a fraction of a millisecond on a local network) until the first
//! connection has sat idle for [`PROBATION`], which under any traffic is within a second.
//!
//! Requests that may be sent again (idempotent methods, or bytes that provably did not
//! leave) do not need the window: they are retried on a new connection if a pooled one
//! fails before any response byte.
//!
//! HTTP/1 only. An HTTP/2 backend says which streams it did not process (`GOAWAY`'s last
//! stream id, `REFUSED_STREAM`), so HTTP/2 connections are reused freely and those streams
//! are "not sent"; any other failure after the request was written is outcome unknown
//! (`super::h2`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A connection must be seen open this long after its response before its backend is
/// trusted to keep connections; a backend that closes one sooner, unannounced, closes
/// after every response and gets no reuse for requests that must not be lost.
pub(crate) const PROBATION: Duration = Duration::from_millis(250);

/// A silent close is held against its backend this long; then the backend is probed again
/// (it may have been redeployed, or the close was a worker recycled after N requests).
pub(crate) const FORGET_CLOSE_AFTER: Duration = Duration::from_secs(600);

/// What a backend has shown about the connections it keeps. Read on every leader call,
/// written on connection events: atomics, so readers never wait (a stale read only makes
/// the window a moment out of date, in either direction within the rule's halving margin).
#[derive(Debug)]
pub(crate) struct Reuse {
    /// When this record started: timestamps below are nanoseconds since it.
    epoch: Instant,
    /// Longest idle time a connection was seen open after, in nanoseconds.
    survived: AtomicU64,
    /// Shortest idle time after which a connection was closed unannounced, in nanoseconds;
    /// `u64::MAX` when none was seen.
    closed_after: AtomicU64,
    /// When `closed_after` was last lowered, in nanoseconds since `epoch`.
    closed_at: AtomicU64,
    /// The backend's `Keep-Alive: timeout=`, in nanoseconds; `u64::MAX` when none.
    hint: AtomicU64,
}

/// What changed with an event, for one log line when a backend's rule changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Learned {
    /// Nothing worth a log line.
    Nothing,
    /// The backend closed a connection unannounced within [`PROBATION`] of its response:
    /// it closes after every response.
    ClosesAfterResponses,
    /// The backend closed an idle connection unannounced after this long.
    ClosesIdleAfter(Duration),
    /// A connection stayed open [`PROBATION`]: the backend keeps connections.
    KeepsConnections,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
}

impl Reuse {
    /// Nothing known yet: no reuse for requests that must not be lost.
    pub(crate) fn new(now: Instant) -> Reuse {
        Reuse {
            epoch: now,
            survived: AtomicU64::new(0),
            closed_after: AtomicU64::new(u64::MAX),
            closed_at: AtomicU64::new(0),
            hint: AtomicU64::new(u64::MAX),
        }
    }

    /// A connection was seen open after `idle`.
    pub(crate) fn survived(&self, idle: Duration) -> Learned {
        let before = self.survived.fetch_max(nanos(idle), Ordering::Relaxed);
        if before < nanos(PROBATION) && idle >= PROBATION {
            Learned::KeepsConnections
        } else {
            Learned::Nothing
        }
    }

    /// The backend closed a connection, unannounced, after it sat idle for `idle`.
    pub(crate) fn closed(&self, idle: Duration, now: Instant) -> Learned {
        let n = nanos(idle);
        let since = nanos(now.saturating_duration_since(self.epoch));
        let before = self.closed_after.load(Ordering::Relaxed);
        let stale = since.saturating_sub(self.closed_at.load(Ordering::Relaxed))
            > nanos(FORGET_CLOSE_AFTER);
        if n >= before && !stale {
            return Learned::Nothing;
        }
        self.closed_after.store(n, Ordering::Relaxed);
        self.closed_at.store(since, Ordering::Relaxed);
        if idle < PROBATION {
            Learned::ClosesAfterResponses
        } else {
            Learned::ClosesIdleAfter(idle)
        }
    }

    /// The backend announced `Keep-Alive: timeout=`.
    pub(crate) fn hint(&self, timeout: Duration) {
        self.hint.fetch_min(nanos(timeout), Ordering::Relaxed);
    }

    /// How long a connection may have sat idle and still carry a request that must not be
    /// lost; zero while the backend is not trusted (see the module doc).
    pub(crate) fn window(&self, cap: Duration, now: Instant) -> Duration {
        let survived = Duration::from_nanos(self.survived.load(Ordering::Relaxed));
        let mut window = cap.min(survived / 2);
        if survived < PROBATION {
            return Duration::ZERO;
        }
        let closed = self.closed_after.load(Ordering::Relaxed);
        if closed != u64::MAX {
            let since = nanos(now.saturating_duration_since(self.epoch));
            let fresh = since.saturating_sub(self.closed_at.load(Ordering::Relaxed))
                <= nanos(FORGET_CLOSE_AFTER);
            if fresh {
                let closed = Duration::from_nanos(closed);
                if closed < PROBATION {
                    return Duration::ZERO;
                }
                window = window.min(closed / 2);
            }
        }
        window.min(self.hint_margin())
    }

    /// How long an idle connection is worth keeping for requests that may be retried: the
    /// backend's own limits, as far as known, less a margin; never above `cap`.
    pub(crate) fn keep_for(&self, cap: Duration, now: Instant) -> Duration {
        let mut keep = cap.min(self.hint_margin());
        let closed = self.closed_after.load(Ordering::Relaxed);
        let since = nanos(now.saturating_duration_since(self.epoch));
        let fresh = since.saturating_sub(self.closed_at.load(Ordering::Relaxed))
            <= nanos(FORGET_CLOSE_AFTER);
        if closed != u64::MAX && fresh {
            keep = keep.min(Duration::from_nanos(closed) / 2);
        }
        keep
    }

    /// The hint less a second (half of it for hints under two seconds): its clock starts
    /// on the backend when the response leaves, a little before idem's.
    fn hint_margin(&self) -> Duration {
        let hint = self.hint.load(Ordering::Relaxed);
        if hint == u64::MAX {
            return Duration::MAX;
        }
        let hint = Duration::from_nanos(hint);
        hint - (hint / 2).min(Duration::from_secs(1))
    }
}

/// The `timeout=` of a `Keep-Alive` response header, in whole seconds.
pub(crate) fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?;
    text.split(',').find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_is_reused_before_a_connection_survived_probation() {
        let t0 = Instant::now();
        let r = Reuse::new(t0);
        assert_eq!(r.window(CAP, t0), Duration::ZERO);
        assert_eq!(r.survived(PROBATION - MS), Learned::Nothing);
        assert_eq!(r.window(CAP, t0), Duration::ZERO);
        assert_eq!(r.survived(PROBATION), Learned::KeepsConnections);
        assert_eq!(r.window(CAP, t0), PROBATION / 2);
        r.survived(Duration::from_secs(4));
        assert_eq!(r.window(CAP, t0), Duration::from_secs(2));
        assert_eq!(r.window(Duration::from_secs(1), t0), Duration::from_secs(1));
    }

    #[test]
    fn a_backend_that_closes_after_responses_is_never_trusted_until_forgotten() {
        let t0 = Instant::now();
        let r = Reuse::new(t0);
        // uWSGI's http-socket: closed 2 ms after the response, even if an older one survived.
        r.survived(Duration::from_secs(1));
        assert_eq!(r.closed(2 * MS, t0), Learned::ClosesAfterResponses);
        assert_eq!(r.window(CAP, t0), Duration::ZERO);
        r.survived(Duration::from_secs(5));
        assert_eq!(r.window(CAP, t0 + FORGET_CLOSE_AFTER), Duration::ZERO);
        // Probed again once the close is forgotten.
        let later = t0 + FORGET_CLOSE_AFTER + MS;
        assert_eq!(r.window(CAP, later), Duration::from_millis(2500));
        // A new close after that counts again, even if longer than the forgotten one.
        assert_eq!(r.closed(3 * MS, later), Learned::ClosesAfterResponses);
        assert_eq!(r.window(CAP, later), Duration::ZERO);
    }

    #[test]
    fn an_idle_timeout_shortens_the_window_to_half_of_it() {
        let t0 = Instant::now();
        let r = Reuse::new(t0);
        r.survived(Duration::from_millis(900));
        assert_eq!(
            r.closed(Duration::from_secs(1), t0),
            Learned::ClosesIdleAfter(Duration::from_secs(1))
        );
        assert_eq!(r.window(CAP, t0), Duration::from_millis(450));
        r.survived(Duration::from_secs(20));
        assert_eq!(r.window(CAP, t0), Duration::from_millis(500));
        assert_eq!(r.keep_for(CAP, t0), Duration::from_millis(500));
        // A longer close says nothing new.
        assert_eq!(r.closed(Duration::from_secs(2), t0), Learned::Nothing);
    }

    #[test]
    fn the_keep_alive_hint_keeps_a_margin() {
        let t0 = Instant::now();
        let r = Reuse::new(t0);
        r.survived(Duration::from_secs(60));
        r.hint(Duration::from_secs(5));
        assert_eq!(r.window(CAP, t0), Duration::from_secs(4));
        assert_eq!(r.keep_for(CAP, t0), Duration::from_secs(4));
        r.hint(Duration::from_secs(1));
        assert_eq!(r.window(CAP, t0), Duration::from_millis(500));
    }

    #[test]
    fn keep_alive_header_timeouts_are_read_leniently() {
        assert_eq!(
            keep_alive_timeout(b"timeout=5"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            keep_alive_timeout(b"max=100, Timeout = 2"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(keep_alive_timeout(b"max=100"), None);
        assert_eq!(keep_alive_timeout(b"timeout=soon"), None);
    }
}
