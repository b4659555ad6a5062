//! Errors idem answers itself, as RFC 9457 `application/problem+json`.
//!
//! One variant per failure mode; [`Problem::info`] gives each its status, `type`, title and
//! fixed `detail` on one line, so adding a failure mode touches one place. `detail` never
//! echoes keys, bodies or header values, so nothing a client sent is reflected back; the
//! 400s about the key name the route's key header (`[dedup] key_header`), which is
//! configuration, not input.

use crate::key::KeyHeaderError;
use crate::observe::metrics::Answered;
use crate::outcome::{Held, Refusal, IN_PROGRESS_RETRY_AFTER};
use http::HeaderName;
use std::borrow::Cow;
use std::time::Duration;

/// Base of every problem `type` URI; docs/semantics.md, "Problem types", lists them all.
pub(crate) const TYPE_BASE: &str = "https://idem.dev/problems/";

/// Every problem type, for the `type` label of `idem_problems_total` (series exist from
/// start-up).
pub(crate) const KINDS: [&str; 21] = [
    "missing-key",
    "key-malformed",
    "fingerprint-mismatch",
    "in-progress",
    "outcome-unknown",
    "not-replayable",
    "not-acceptable",
    "too-large",
    "body-timeout",
    "store-full",
    "store-unavailable",
    "scope-quota",
    "client-quota",
    "too-many-waiters",
    "body-buffer-full",
    "upstream-unreachable",
    "upstream-timeout",
    "upstream-failed",
    "bad-request",
    "private-response",
    "bad-path",
];

/// A failure idem answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// 400: `require-key` route and no key header (named: the route's `key_header`).
    MissingKey(HeaderName),
    /// 400: the key header (named) is repeated, empty, malformed or too long.
    KeyMalformed(KeyHeaderError, HeaderName),
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
    /// 429: the caller's address holds its share of what idem can hold for others (keys in
    /// flight or held, waiters, buffered request bodies).
    ClientQuota,
    /// 503: waiter caps reached.
    TooManyWaiters,
    /// 503: idem holds `[server] max_body_buffer` bytes of request bodies already.
    BodyBufferFull,
    /// 502: no backend could be reached; nothing was sent, a retry may run.
    UpstreamUnreachable,
    /// 504: a passed-through request got no answer in time (not deduplicated: nothing held).
    UpstreamTimeout,
    /// 502: the backend failed a passed-through request after receiving it (reset, invalid
    /// or cut-off response); it may have run it.
    UpstreamFailed,
    /// 400: the request could not be read (malformed framing).
    BadRequest,
    /// 400: the path's encoded slashes would change its route (`crate::path`).
    BadPath,
    /// 409: the response was marked `private` or `no-store` by the origin and went to its
    /// first client only; this request's scope holds no credential that identifies the
    /// caller.
    PrivateResponse,
}

/// Everything a problem says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Info {
    /// HTTP status.
    pub(crate) status: u16,
    /// The last segment of the `type` URI, also the `detail=` of `Cache-Status`.
    pub(crate) kind: &'static str,
    /// The `title` member.
    pub(crate) title: Cow<'static, str>,
    /// The `detail` member: fixed text (with the configured key header's name), never what
    /// the client sent.
    pub(crate) detail: Cow<'static, str>,
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
            Problem::MissingKey(h) | Problem::KeyMalformed(_, h) => return key_problem(self, h),
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
            Problem::ClientQuota => (429, "client-quota", "Too much held for this client", "This client address has its full share of requests in progress, held keys, waiting requests or request bodies being read. Retry later.", A::Error),
            Problem::TooManyWaiters => (503, "too-many-waiters", "Too many waiting requests", "Too many requests are waiting for identical calls. Retry later.", A::Error),
            Problem::BodyBufferFull => (503, "body-buffer-full", "Too many request bodies in memory", "The proxy holds as many request bodies as it may. Retry later.", A::Error),
            Problem::UpstreamUnreachable => (502, "upstream-unreachable", "Upstream unreachable", "No upstream server could be reached; the request was not sent. It is safe to retry.", A::Error),
            Problem::UpstreamTimeout => (504, "upstream-timeout", "Upstream timeout", "The upstream server did not answer in time. It may have processed the request.", A::Error),
            Problem::UpstreamFailed => (502, "upstream-failed", "Upstream failed", "The upstream server failed while handling the request. It may have processed the request.", A::Error),
            Problem::BadRequest => (400, "bad-request", "Bad request", "The request could not be read: its framing is malformed.", A::Error),
            Problem::BadPath => (400, "bad-path", "Ambiguous path", "The path holds an encoded slash that would make it name another resource once decoded. Send the path without it.", A::Error),
            Problem::PrivateResponse => (409, "private-response", "Response is private", "The response to this request was marked private by the server and went to its first client only. It is not run again.", A::NotReplayable),
        };
        Info {
            status,
            kind,
            title: title.into(),
            detail: detail.into(),
            answered,
        }
    }

    /// HTTP status.
    pub(crate) fn status(&self) -> u16 {
        self.info().status
    }

    /// Whether the backend side failed (rather than the client or idem's own rules).
    pub(crate) fn is_upstream(&self) -> bool {
        matches!(
            self,
            Problem::UpstreamUnreachable | Problem::UpstreamTimeout | Problem::UpstreamFailed
        )
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
            | Problem::BodyBufferFull
            | Problem::ScopeQuota
            | Problem::ClientQuota => Some(1),
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
            Refusal::ClientQuota => Problem::ClientQuota,
            Refusal::TooManyWaiters => Problem::TooManyWaiters,
            Refusal::StoreUnavailable => Problem::StoreUnavailable,
        }
    }
}

/// The 400s about the key header, which name it.
fn key_problem(p: &Problem, h: &HeaderName) -> Info {
    let h = display_name(h);
    let (kind, title, detail) = match p {
        Problem::KeyMalformed(e, _) => (
            "key-malformed",
            format!("Malformed {h}"),
            key_error_detail(*e, &h),
        ),
        _ => (
            "missing-key",
            format!("{h} required"),
            format!("This route requires an {h} header."),
        ),
    };
    Info {
        status: 400,
        kind,
        title: title.into(),
        detail: detail.into(),
        answered: Answered::MissingKey,
    }
}

fn key_error_detail(e: KeyHeaderError, h: &str) -> String {
    match e {
        KeyHeaderError::Repeated => format!("The {h} header must appear once."),
        KeyHeaderError::Empty => format!("The {h} header must not be empty."),
        KeyHeaderError::Malformed => format!("The {h} must be a quoted string or a token of visible ASCII without quotes, commas or spaces."),
        KeyHeaderError::TooLong => format!("The {h} must be at most 255 bytes."),
    }
}

/// A header name as documents write it: each dash-separated word capitalised
/// (`x-idempotency-key` -> `X-Idempotency-Key`); header names are case-insensitive, and
/// idem keeps them lowercase.
fn display_name(h: &HeaderName) -> String {
    let mut out = String::with_capacity(h.as_str().len());
    let mut start = true;
    for c in h.as_str().chars() {
        out.push(if start { c.to_ascii_uppercase() } else { c });
        start = c == '-';
    }
    out
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
    fn key_problems_name_the_default_header_as_before() {
        let h = HeaderName::from_static("idempotency-key");
        let info = Problem::MissingKey(h.clone()).info();
        assert_eq!(info.title, "Idempotency-Key required");
        assert_eq!(
            info.detail,
            "This route requires an Idempotency-Key header."
        );
        let info = Problem::KeyMalformed(KeyHeaderError::Repeated, h).info();
        assert_eq!(info.title, "Malformed Idempotency-Key");
        assert_eq!(info.detail, "The Idempotency-Key header must appear once.");
        let x = HeaderName::from_static("x-idempotency-key");
        let info = Problem::KeyMalformed(KeyHeaderError::TooLong, x).info();
        assert_eq!(
            info.detail,
            "The X-Idempotency-Key must be at most 255 bytes."
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
