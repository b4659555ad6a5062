//! Errors idem answers itself, as RFC 9457 `application/problem+json`.
//!
//! One variant per failure mode, each with its status, `type`, title and whether it carries
//! `Retry-After`. `detail` is fixed text per variant: it never echoes keys, bodies or header
//! values, so nothing a client sent is reflected back.

use std::time::Duration;

/// Base of every problem `type` URI; README lists them all.
pub const TYPE_BASE: &str = "https://idem.dev/problems/";

/// A failure idem answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// 400: `require-key` route and no `Idempotency-Key`.
    MissingKey,
    /// 400: the `Idempotency-Key` header is repeated, empty, malformed or too long.
    KeyMalformed(&'static str),
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
    /// 500: an internal error idem could not attribute to the request.
    Internal,
}

impl Problem {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Problem::MissingKey | Problem::KeyMalformed(_) => 400,
            Problem::FingerprintMismatch => 422,
            Problem::InProgress { .. } | Problem::NotReplayable => 409,
            Problem::NotAcceptable => 406,
            Problem::OutcomeUnknown { status, .. } => *status,
            Problem::TooLarge => 413,
            Problem::BodyTimeout => 408,
            Problem::StoreFull | Problem::StoreUnavailable | Problem::TooManyWaiters => 503,
            Problem::ScopeQuota => 429,
            Problem::UpstreamUnreachable => 502,
            Problem::Internal => 500,
        }
    }

    /// The last segment of the `type` URI, also the `detail=` of `Cache-Status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::MissingKey => "missing-key",
            Problem::KeyMalformed(_) => "key-malformed",
            Problem::FingerprintMismatch => "fingerprint-mismatch",
            Problem::InProgress { .. } => "in-progress",
            Problem::OutcomeUnknown { .. } => "outcome-unknown",
            Problem::NotReplayable => "not-replayable",
            Problem::NotAcceptable => "not-acceptable",
            Problem::TooLarge => "too-large",
            Problem::BodyTimeout => "body-timeout",
            Problem::StoreFull => "store-full",
            Problem::StoreUnavailable => "store-unavailable",
            Problem::ScopeQuota => "scope-quota",
            Problem::TooManyWaiters => "too-many-waiters",
            Problem::UpstreamUnreachable => "upstream-unreachable",
            Problem::Internal => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::MissingKey => "Idempotency-Key required",
            Problem::KeyMalformed(_) => "Malformed Idempotency-Key",
            Problem::FingerprintMismatch => "Idempotency-Key reused with a different request",
            Problem::InProgress { .. } => "Request in progress",
            Problem::OutcomeUnknown { .. } => "Outcome unknown",
            Problem::NotReplayable => "Response not replayable",
            Problem::NotAcceptable => "Stored response not acceptable",
            Problem::TooLarge => "Request body too large",
            Problem::BodyTimeout => "Request body timeout",
            Problem::StoreFull => "Dedup store full",
            Problem::StoreUnavailable => "Dedup store unavailable",
            Problem::ScopeQuota => "Too many keys for this client",
            Problem::TooManyWaiters => "Too many waiting requests",
            Problem::UpstreamUnreachable => "Upstream unreachable",
            Problem::Internal => "Internal error",
        }
    }

    fn detail(&self) -> &'static str {
        match self {
            Problem::MissingKey => "This route requires an Idempotency-Key header.",
            Problem::KeyMalformed(why) => why,
            Problem::FingerprintMismatch => "This Idempotency-Key was used with a different method, path, query, headers or body. Use a new key for a new request.",
            Problem::InProgress { .. } => "An identical request is still being processed. Retry later to receive its response.",
            Problem::OutcomeUnknown { .. } => "The upstream call may have been executed but no usable response was received. It will not be repeated before the hold ends.",
            Problem::NotReplayable => "The response for this request was streamed to the first client only and cannot be replayed.",
            Problem::NotAcceptable => "The stored response uses a content coding this request does not accept.",
            Problem::TooLarge => "The request body is larger than this route deduplicates.",
            Problem::BodyTimeout => "The request body did not arrive in time.",
            Problem::StoreFull => "No room for a new key: every entry is in flight or held. Retry later.",
            Problem::StoreUnavailable => "The shared dedup store cannot be reached, and this deployment refuses to forward requests it cannot deduplicate. Retry later.",
            Problem::ScopeQuota => "This client has its full share of keys in flight, held or stored, and may not evict other clients' responses. Retry later.",
            Problem::TooManyWaiters => "Too many requests are waiting for identical calls. Retry later.",
            Problem::UpstreamUnreachable => "No upstream server could be reached; the request was not sent. It is safe to retry.",
            Problem::Internal => "idem failed to process the request.",
        }
    }

    /// `Retry-After` seconds, when the condition is expected to pass.
    pub fn retry_after(&self) -> Option<u64> {
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
    pub fn body(&self) -> String {
        serde_json::json!({
            "type": format!("{TYPE_BASE}{}", self.kind()),
            "title": self.title(),
            "status": self.status(),
            "detail": self.detail(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_problem_json_with_the_four_members() {
        let p = Problem::FingerprintMismatch;
        let v: serde_json::Value = serde_json::from_str(&p.body()).unwrap();
        assert_eq!(v["type"], "https://idem.dev/problems/fingerprint-mismatch");
        assert_eq!(v["status"], 422);
        assert!(v["title"].is_string() && v["detail"].is_string());
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
}
