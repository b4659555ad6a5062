//! Errors idem answers itself, as RFC 9457 `application/problem+json`.
//!
//! One variant per failure mode; [`Problem::info`] gives each its status, `type`, title and
//! fixed `detail` on one line, so adding a failure mode touches one place. `detail` never
//! echoes keys, bodies or header values, so nothing a client sent is reflected back.

use crate::key::KeyHeaderError;
use crate::observe::metrics::Answered;
use crate::outcome::{Held, Refusal, IN_PROGRESS_RETRY_AFTER};
use std::time::Duration;

/// Base of every problem `type` URI; README lists them all.
pub(crate) const TYPE_BASE: &str = "https://idem.dev/problems/";

/// A failure idem answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    /// 400: `require-key` route and no `Idempotency-Key`.
    MissingKey,
    /// 400: the `Idempotency-Key` header is repeated, empty, malformed or too long.
    KeyMalformed(KeyHeaderError),
    /// 422: the key was used before with a different request.
    FingerprintMismatch,
    /// 409: a call for this key is still running (reject mode, or the wait timed out).
    InProgress {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// 502/504: the call may have run but idem has no usable answer; the key is held.
    OutcomeUnknown {
        /// 502 or 504.
        status: u16,
        /// Time left in the hold.
        retry_after: Duration,
    },
    /// 409: the key's response was streamed to its first client only and cannot be replayed.
    NotReplayable,
    /// 406: the stored body has a content coding this client did not accept.
    NotAcceptable,
    /// 413: a body over `max_body` on a request that asked for protection.
    TooLarge,
    /// 408: the request body did not arrive within `body_read_timeout`.
    BodyTimeout,
    /// 503: no room for a new key (everything is in flight or held).
    StoreFull,
    /// 503: the shared store (Redis) is unreachable and `on_store_error = "fail-closed"`.
    StoreUnavailable,
    /// 429: the caller's scope holds its quota of keys (`store.max_keys_per_scope`).
    ScopeQuota,
    /// 503: waiter caps reached.
    TooManyWaiters,
    /// 502: no backend could be reached; nothing was sent, a retry may run.
    UpstreamUnreachable,
    /// 504: a passed-through request got no answer in time (not deduplicated: nothing held).
    UpstreamTimeout,
    /// 502: the backend failed a passed-through request after receiving it (reset, invalid
    /// or cut-off response); it may have run it.
    UpstreamFailed,
    /// 400: the request could not be read (malformed framing).
    BadRequest,
}

/// Everything a problem says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Info {
    /// HTTP status.
    pub(crate) status: u16,
    /// The last segment of the `type` URI, also the `detail=` of `Cache-Status`.
    pub(crate) kind: &'static str,
    /// The `title` member.
    pub(crate) title: &'static str,
    /// The `detail` member: fixed text, never what the client sent.
    pub(crate) detail: &'static str,
    /// The `outcome` label of `idem_requests_total`.
    pub(crate) answered: Answered,
}

impl Problem {
    /// The answer for a held key: its status, and `Retry-After` until the hold ends.
    pub(crate) fn outcome_unknown(held: Held) -> Problem {
        Problem::OutcomeUnknown {
            status: held.status,
            retry_after: held
                .until
                .saturating_duration_since(tokio::time::Instant::now()),
        }
    }

    /// Status, type, title, detail and metric label.
    pub(crate) fn info(&self) -> Info {
        use Answered as A;
        let (status, kind, title, detail, answered) = match self {
            Problem::MissingKey => (400, "missing-key", "Idempotency-Key required", "This route requires an Idempotency-Key header.", A::MissingKey),
            Problem::KeyMalformed(e) => (400, "key-malformed", "Malformed Idempotency-Key", key_error_detail(*e), A::MissingKey),
            Problem::FingerprintMismatch => (422, "fingerprint-mismatch", "Idempotency-Key reused with a different request", "This Idempotency-Key was used with a different method, path, query, headers or body. Use a new key for a new request.", A::Mismatch),
            Problem::InProgress { .. } => (409, "in-progress", "Request in progress", "An identical request is still being processed. Retry later to receive its response.", A::Conflict),
            Problem::OutcomeUnknown { status, .. } => (*status, "outcome-unknown", "Outcome unknown", "The upstream call may have been executed but no usable response was received. It will not be repeated before the hold ends.", A::OutcomeUnknown),
            Problem::NotReplayable => (409, "not-replayable", "Response not replayable", "The response for this request was streamed to the first client only and cannot be replayed.", A::NotReplayable),
            Problem::NotAcceptable => (406, "not-acceptable", "Stored response not acceptable", "The stored response uses a content coding this request does not accept.", A::Error),
            Problem::TooLarge => (413, "too-large", "Request body too large", "The request body is larger than this route deduplicates.", A::TooLarge),
            Problem::BodyTimeout => (408, "body-timeout", "Request body timeout", "The request body did not arrive in time.", A::Error),
            Problem::StoreFull => (503, "store-full", "Dedup store full", "No room for a new key: every entry is in flight or held. Retry later.", A::Error),
            Problem::StoreUnavailable => (503, "store-unavailable", "Dedup store unavailable", "The shared dedup store cannot be reached, and this deployment refuses to forward requests it cannot deduplicate. Retry later.", A::Error),
            Problem::ScopeQuota => (429, "scope-quota", "Too many keys for this client", "This client has its full share of keys in flight, held or stored, and may not evict other clients' responses. Retry later.", A::Error),
            Problem::TooManyWaiters => (503, "too-many-waiters", "Too many waiting requests", "Too many requests are waiting for identical calls. Retry later.", A::Error),
            Problem::UpstreamUnreachable => (502, "upstream-unreachable", "Upstream unreachable", "No upstream server could be reached; the request was not sent. It is safe to retry.", A::Error),
            Problem::UpstreamTimeout => (504, "upstream-timeout", "Upstream timeout", "The upstream server did not answer in time. It may have processed the request.", A::Error),
            Problem::UpstreamFailed => (502, "upstream-failed", "Upstream failed", "The upstream server failed while handling the request. It may have processed the request.", A::Error),
            Problem::BadRequest => (400, "bad-request", "Bad request", "The request could not be read: its framing is malformed.", A::Error),
        };
        Info {
            status,
            kind,
            title,
            detail,
            answered,
        }
    }

    /// HTTP status.
    pub(crate) fn status(&self) -> u16 {
        self.info().status
    }

    /// The last segment of the `type` URI.
    pub(crate) fn kind(&self) -> &'static str {
        self.info().kind
    }

    /// `Retry-After` seconds, when the condition is expected to pass.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        let secs = |d: &Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        match self {
            Problem::InProgress { retry_after } => Some(secs(retry_after).max(1)),
            Problem::OutcomeUnknown { retry_after, .. } => Some(secs(retry_after).max(1)),
            Problem::StoreFull
            | Problem::StoreUnavailable
            | Problem::TooManyWaiters
            | Problem::ScopeQuota => Some(1),
            _ => None,
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> String {
        let info = self.info();
        serde_json::json!({
            "type": format!("{TYPE_BASE}{}", info.kind),
            "title": info.title,
            "status": info.status,
            "detail": info.detail,
        })
        .to_string()
    }
}

impl From<Refusal> for Problem {
    fn from(r: Refusal) -> Problem {
        match r {
            Refusal::FingerprintMismatch => Problem::FingerprintMismatch,
            Refusal::InProgress => Problem::InProgress {
                retry_after: IN_PROGRESS_RETRY_AFTER,
            },
            Refusal::StoreFull => Problem::StoreFull,
            Refusal::ScopeQuota => Problem::ScopeQuota,
            Refusal::TooManyWaiters => Problem::TooManyWaiters,
            Refusal::StoreUnavailable => Problem::StoreUnavailable,
        }
    }
}

fn key_error_detail(e: KeyHeaderError) -> &'static str {
    match e {
        KeyHeaderError::Repeated => "The Idempotency-Key header must appear once.",
        KeyHeaderError::Empty => "The Idempotency-Key header must not be empty.",
        KeyHeaderError::Malformed => "The Idempotency-Key must be a quoted string or a token of visible ASCII without quotes, commas or spaces.",
        KeyHeaderError::TooLong => "The Idempotency-Key must be at most 255 bytes.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_problem_json_with_the_four_members() {
        let v: serde_json::Value =
            serde_json::from_str(&Problem::FingerprintMismatch.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "https://idem.dev/problems/fingerprint-mismatch",
                "title": "Idempotency-Key reused with a different request",
                "status": 422,
                "detail": "This Idempotency-Key was used with a different method, path, query, headers or body. Use a new key for a new request.",
            })
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        let p = Problem::OutcomeUnknown {
            status: 504,
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(p.retry_after(), Some(2));
        assert_eq!(p.status(), 504);
    }

    #[test]
    fn refusals_map_to_their_problems() {
        assert_eq!(
            Problem::from(Refusal::InProgress),
            Problem::InProgress {
                retry_after: IN_PROGRESS_RETRY_AFTER
            }
        );
        assert_eq!(Problem::from(Refusal::ScopeQuota).status(), 429);
        assert_eq!(
            Problem::from(Refusal::StoreUnavailable).kind(),
            "store-unavailable"
        );
    }
}
