//! The access log: one line per request, text or JSON (`[server] log_format`), written as a
//! `tracing` event on target `idem::access` to stderr. Both formats carry the same fields
//! under the same names (one event; the subscriber lays it out): in JSON they sit at the top
//! level of the object, in text they follow the message as `name=value`. A field without a
//! value for this request is left out in both.
//!
//! | field | value |
//! | --- | --- |
//! | `method`, `path` | the request line; `path` has the query only with `[server] log_query = true` (it may carry tokens) |
//! | `client_addr` | the client address through trusted hops (`crate::http::client_addr`) |
//! | `route`, `outcome` | the metric labels |
//! | `status` | what the client got; 499 when it left before any answer (nginx's code) |
//! | `host` | `Host`, or the h2 `:authority` |
//! | `request_id` | the request's id (`crate::observe::request_id`) |
//! | `leader_request_id` | waiters and replays: the id of the request that led their call |
//! | `key` | a 12-hex prefix of the dedup key (never the raw `Idempotency-Key` nor the body) |
//! | `upstream_addr` | the backend address the request (or its leader's call) went to |
//! | `bytes_received`, `bytes_sent` | body bytes from and to the client |
//! | `duration_ms`, `upstream_ms` | total, and to the upstream response header (microsecond precision) |
//! | `waiters_served` | leaders: how many waiters received this call's outcome |
//! | `client_left` | `true` when the client went away before its answer was complete |
//! | `error` | why a request ended early, if it did |
//!
//! A text value that is not plain visible ASCII (a `Host` with a space, say) is written
//! quoted and escaped, so no header can forge a field. When `idem::access` is filtered out
//! (`IDEM_LOG=warn`) nothing is built.
//!
//! A leader whose client left has its line written then (`status=499`, `client_left=true`);
//! when its detached call completes, a second line on the same target says so, with the
//! same `request_id`, the status the call ended with and its duration (`detached=true`).

use crate::key::DedupKey;
use crate::observe::metrics::Answered;
use crate::observe::request_id::RequestId;
use pingora::proxy::Session;
use pingora::Error;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// The status logged for a request whose client left before any answer.
pub(crate) const CLIENT_LEFT: u16 = 499;

/// What one request contributes to its access line.
pub(crate) struct Entry<'a> {
    /// The request's route (its metric label).
    pub(crate) route: &'a str,
    /// The client address through trusted hops (`crate::http::client_addr`).
    pub(crate) client: Option<IpAddr>,
    /// Log the query string with the path.
    pub(crate) log_query: bool,
    /// Status when no response header was written (idem's own answers record theirs).
    pub(crate) fallback_status: u16,
    /// How idem answered.
    pub(crate) answered: Answered,
    /// The request's id.
    pub(crate) request_id: Option<&'a RequestId>,
    /// Waiters and replays: the leader's request id.
    pub(crate) leader_request_id: Option<&'a RequestId>,
    /// Short dedup key hash, when one was derived.
    pub(crate) key: Option<&'a DedupKey>,
    /// The backend the request (or its leader's call) went to.
    pub(crate) upstream_addr: Option<&'a pingora::protocols::l4::socket::SocketAddr>,
    /// From request head to the end of the answer.
    pub(crate) took: Duration,
    /// Upstream latency to the response header (leaders and pass-through).
    pub(crate) upstream: Option<Duration>,
    /// Waiters that received this leader's outcome.
    pub(crate) waiters_served: Option<usize>,
    /// The client went away before its answer was complete.
    pub(crate) client_left: bool,
}

/// The status the access line shows for `session`'s request.
pub(crate) fn status(session: &Session, fallback: u16, client_left: bool) -> u16 {
    match session.response_written() {
        Some(h) => h.status.as_u16(),
        None if client_left => CLIENT_LEFT,
        None => fallback,
    }
}

/// Writes the line, unless `idem::access` is filtered out (then nothing is built).
pub(crate) fn write(session: &Session, e: Option<&Error>, entry: &Entry<'_>) {
    if !enabled() {
        return;
    }
    let req = session.req_header();
    let path = if entry.log_query {
        req.uri.path_and_query().map_or("/", |p| p.as_str())
    } else {
        req.uri.path()
    };
    let host = req
        .headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()));
    // A client leaving is not an error of the request; other early ends say why.
    let error = e.filter(|_| !entry.client_left).map(|e| e.to_string());
    let key = entry.key.map(|k| k.short());
    tracing::info!(
        target: "idem::access",
        method = %req.method,
        path = %Text(path.as_bytes()),
        client_addr = entry.client.as_ref().map(tracing::field::display),
        route = %entry.route,
        status = status(session, entry.fallback_status, entry.client_left),
        outcome = %entry.answered.as_str(),
        host = host.map(Text).as_ref().map(tracing::field::display),
        request_id = entry.request_id.map(tracing::field::display),
        leader_request_id = entry.leader_request_id.map(tracing::field::display),
        key = key.as_deref().map(tracing::field::display),
        upstream_addr = entry.upstream_addr.map(Addr).as_ref().map(tracing::field::display),
        bytes_received = session.body_bytes_read() as u64,
        bytes_sent = session.body_bytes_sent() as u64,
        duration_ms = millis(entry.took),
        upstream_ms = entry.upstream.map(millis),
        waiters_served = entry.waiters_served.map(|n| n as u64),
        client_left = entry.client_left.then_some(true),
        // Debug: quoted and escaped, whatever the error says.
        error = error.as_deref(),
        "request"
    );
}

/// Whether access lines are written at all.
pub(crate) fn enabled() -> bool {
    tracing::enabled!(target: "idem::access", tracing::Level::INFO)
}

/// What a detached call's completion line says.
pub(crate) struct Detached<'a> {
    /// The route's metric label.
    pub(crate) route: &'a str,
    /// The leader's request id.
    pub(crate) request_id: &'a RequestId,
    /// The dedup key.
    pub(crate) key: &'a DedupKey,
    /// The status the call's outcome answers with.
    pub(crate) status: u16,
    /// The backend the call went to.
    pub(crate) upstream_addr: Option<&'a pingora::protocols::l4::socket::SocketAddr>,
    /// From the leader's request head to the outcome.
    pub(crate) took: Duration,
    /// To the upstream response header.
    pub(crate) upstream: Duration,
    /// Waiters that received the outcome.
    pub(crate) waiters_served: usize,
}

/// The line a leader's call writes when it completes after its client left.
pub(crate) fn detached(d: &Detached<'_>) {
    if !enabled() {
        return;
    }
    tracing::info!(
        target: "idem::access",
        route = %d.route,
        status = d.status,
        outcome = %Answered::Leader.as_str(),
        request_id = %d.request_id,
        key = %d.key.short(),
        upstream_addr = d.upstream_addr.map(Addr).as_ref().map(tracing::field::display),
        duration_ms = millis(d.took),
        upstream_ms = millis(d.upstream),
        waiters_served = d.waiters_served as u64,
        detached = true,
        "detached call completed"
    );
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A value from the request, as is when it is plain visible ASCII, else quoted and escaped.
struct Text<'a>(&'a [u8]);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"') => {
                f.write_str(s)
            }
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{:?}", String::from_utf8_lossy(self.0)),
        }
    }
}

/// A backend address as the configuration writes it (`unix:/path` for a socket).
struct Addr<'a>(&'a pingora::protocols::l4::socket::SocketAddr);

impl fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => a.fmt(f),
            unix => write!(f, "unix:{unix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_cannot_forge_fields() {
        let show = |b: &[u8]| Text(b).to_string();
        assert_eq!(show(b"api.example.com:8080"), "api.example.com:8080");
        assert_eq!(show(b"/a/b?c=d"), "/a/b?c=d");
        assert_eq!(show(b"x status=200"), r#""x status=200""#);
        assert_eq!(show(b"a\"b"), r#""a\"b""#);
        assert_eq!(show(b"tab\there"), r#""tab\there""#);
        assert_eq!(show(b""), r#""""#);
        assert_eq!(show(b"caf\xc3\xa9"), r#""café""#);
        assert_eq!(show(b"\xff"), "\"\u{fffd}\"");
    }

    #[test]
    fn backend_addresses_read_like_the_configuration() {
        let inet: pingora::protocols::l4::socket::SocketAddr = "127.0.0.1:8000"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into();
        assert_eq!(Addr(&inet).to_string(), "127.0.0.1:8000");
        let unix: pingora::protocols::l4::socket::SocketAddr =
            std::os::unix::net::SocketAddr::from_pathname("/run/app.sock")
                .unwrap()
                .into();
        assert_eq!(Addr(&unix).to_string(), "unix:/run/app.sock");
    }
}
