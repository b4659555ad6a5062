//! Pass-through on Pingora's proxy path: which backend and which connection each attempt
//! takes, when a failed attempt is tried again, and what the client gets when none works.
//!
//! Attempts: a connect failure moves to the next backend (nothing was sent). A pooled
//! connection that fails before any response byte, for a request that may be sent again
//! (idempotent method, body not truncated from the retry buffer), is retried once on a new
//! connection to the same backend, before any other (`upstream::Resend`). Anything else is
//! final.
//!
//! What idem learns on the way: each attempt on a pooled connection knows how long that
//! connection sat idle (Pingora does not say, so idem notes when it returned a connection,
//! by descriptor, and looks it up when Pingora reuses it). A success says the backend kept
//! it that long; a failure says it did not, which shortens how long idem pools connections
//! to that backend (`upstream::reuse`).
//!
//! Every attempt is counted for its backend (`idem_backend_requests_total`): its response
//! class, or `failed` when it got no response header.
//!
//! Failures are answered by idem, as problem+json, never 500: 502 `upstream-unreachable`
//! (nothing was sent: no backend answered the connect, or none resolves), 504
//! `upstream-timeout`, 502 `upstream-failed` (the backend failed after receiving the
//! request; it may have run it), 400 `bad-request` (the client's framing). Counted as the
//! outcome `error`.

use crate::http::problem::Problem;
use crate::observe::metrics::Metrics;
use crate::upstream::backends::Endpoint;
use crate::upstream::{Resend, Upstream};
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, RetryType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One request's pass-through attempts.
#[derive(Default)]
pub(crate) struct Attempts {
    /// Backends a connect failed to.
    tried: Vec<u64>,
    /// The backend of the attempt in progress.
    current: Option<Arc<Endpoint>>,
    /// The next attempt goes to this backend on a new connection.
    again: Option<Arc<Endpoint>>,
    /// The connection of the attempt in progress: its descriptor, and how long it had been
    /// idle in Pingora's pool (`None`: new).
    conn: Option<(i32, Option<Duration>)>,
    /// Any attempt made: a later one re-sends the body from the start.
    started: bool,
    /// When the attempt in progress chose its backend; `None` once it is counted.
    attempt_started: Option<Instant>,
    /// The attempts go over HTTP/2 (`upstream::h2`): no reuse window, nothing learned.
    h2: bool,
}

impl Attempts {
    /// Whether an attempt was already made (the body is sent again from the start).
    pub(crate) fn is_retry(&self) -> bool {
        self.started
    }

    /// The peer for the next attempt.
    pub(crate) fn next_peer(
        &mut self,
        upstream: &Upstream,
        session: &Session,
    ) -> pingora::Result<HttpPeer> {
        let (e, resend) = match self.again.take() {
            Some(e) => (e, Resend::OnNewConnection),
            None => {
                let e = upstream.select(&self.tried).ok_or_else(|| {
                    Error::explain(ErrorType::ConnectNoRoute, "no backend left to try")
                })?;
                let resend = if may_resend(session) {
                    Resend::Allowed
                } else {
                    Resend::Forbidden
                };
                (e, resend)
            }
        };
        self.started = true;
        self.conn = None;
        self.attempt_started = Some(Instant::now());
        self.h2 = upstream.speaks_h2(session.req_header());
        let peer = upstream.pass_through_peer(&e, resend, self.h2);
        self.current = Some(e);
        Ok(peer)
    }

    /// The connection Pingora took for the attempt.
    pub(crate) fn connected(&mut self, reused: bool, fd: i32) {
        if self.h2 {
            return;
        }
        let idle = self
            .current
            .as_ref()
            .and_then(|e| e.released.lock().remove(&fd))
            .filter(|_| reused)
            .map(|at| at.elapsed());
        self.conn = Some((fd, idle));
    }

    /// The backend of the attempt in progress (or the last one).
    pub(crate) fn current(&self) -> Option<&Arc<Endpoint>> {
        self.current.as_ref()
    }

    /// Counts the attempt in progress as failed, once.
    fn count_failed(&mut self, metrics: &Metrics) {
        if let (Some(current), Some(at)) = (&self.current, self.attempt_started.take()) {
            metrics.backend_failed(current.backend, at.elapsed());
        }
    }

    /// A connect failed: the next backend, if any is left.
    pub(crate) fn connect_failed(&mut self, upstream: &Upstream, metrics: &Metrics, e: &mut Error) {
        self.count_failed(metrics);
        if let Some(current) = &self.current {
            self.tried.push(current.id);
        }
        if self.tried.len() < upstream.endpoint_count() {
            e.set_retry(true);
        }
    }

    /// An attempt failed after its connection was made: retried on a new connection to the
    /// same backend when that is safe (see the module doc).
    pub(crate) fn failed(
        &mut self,
        session: &Session,
        metrics: &Metrics,
        e: &mut Error,
        reused: bool,
    ) {
        // After a response header the attempt was counted answered: a body cut off later
        // is the request's error, not another call.
        self.count_failed(metrics);
        if self.h2 {
            // Pingora marks a stream the backend did not process (REFUSED_STREAM, or above
            // a GOAWAY's last stream) as retryable; anything else may have run.
            if !matches!(e.retry, RetryType::Decided(true)) {
                e.set_retry(false);
            }
            return;
        }
        if let (Some(current), Some((_, Some(idle)))) = (&self.current, self.conn) {
            crate::upstream::log_learned(
                &current.label,
                current.reuse.closed(idle, Instant::now()),
            );
        }
        // Pingora marks a failure before the response header on a reused connection
        // `ReusedOnly`: the request may have reached the app, so only a request that may be
        // sent again is retried.
        let before_response = matches!(e.retry, RetryType::ReusedOnly);
        if reused && before_response && may_resend(session) {
            self.again = self.current.clone();
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
    }

    /// The response header (`status`) arrived on the attempt's connection.
    pub(crate) fn answered(&mut self, metrics: &Metrics, status: u16) {
        // An interim 100 is not the answer; a 101 (an upgrade) is.
        if status >= 200 || status == 101 {
            if let (Some(current), Some(at)) = (&self.current, self.attempt_started.take()) {
                metrics.backend_answered(current.backend, status, at.elapsed());
            }
        }
        if let (Some(current), Some((_, Some(idle)))) = (&self.current, self.conn) {
            crate::upstream::log_learned(&current.label, current.reuse.survived(idle));
        }
    }

    /// The request is over; Pingora has returned its connection to the pool (or closed it).
    pub(crate) fn finished(&self) {
        if let (Some(current), Some((fd, _))) = (&self.current, self.conn) {
            current.released.lock().insert(fd, Instant::now());
        }
    }

    /// Whether the attempts go over HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.h2
    }

    /// Whether the attempt in progress is being retried on a new connection (Pingora's own
    /// retry warning would only say what is expected).
    pub(crate) fn retrying_on_new_connection(&self) -> bool {
        self.again.is_some()
    }
}

/// Whether the request may be sent again: an idempotent method whose body, if any, is
/// still whole in Pingora's retry buffer.
fn may_resend(session: &Session) -> bool {
    session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated()
}

/// The problem a failed pass-through is answered with; `None` when the client is gone.
pub(crate) fn problem(e: &Error) -> Option<Problem> {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) if *code >= 500 => Some(Problem::UpstreamFailed),
        HTTPStatus(_) => Some(Problem::BadRequest),
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | BindError
        | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => {
            Some(Problem::UpstreamUnreachable)
        }
        ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => {
            Some(Problem::UpstreamTimeout)
        }
        _ => match e.esource() {
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => None,
                _ => Some(Problem::BadRequest),
            },
            _ => Some(Problem::UpstreamFailed),
        },
    }
}
