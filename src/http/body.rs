//! The request body of a deduplicated request: `100 Continue`, reading it whole up to
//! `max_body` within `body_read_timeout` while hashing it, and forwarding a body that turned
//! out too large (it was consumed, so Pingora's proxy path can no longer send it).

use crate::http::admission::declared_length;
use crate::http::body_budget::{BodyLimits, Lease, Over};
use crate::http::client_addr::Peer;
use crate::http::forward::forwarded_request;
use crate::http::framing;
use crate::http::reply::{append_cache_status, CACHE_STATUS_BYPASS};
use crate::key::{Fingerprint, FingerprintHasher};
use crate::message::{stream_header, BodyBuf};
use crate::observe::metrics::Metrics;
use crate::upstream::{read_final_header, Upstream};
use bytes::Bytes;
use http::header;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::time::Duration;

/// Result of reading a request body that idem buffers.
pub(crate) enum BodyRead {
    /// The whole body (holding its lease) and its fingerprint.
    Complete(Bytes, Fingerprint),
    /// Over `max_body`: what was read so far (the rest is still unread).
    TooLarge(Bytes),
    /// Not complete within `body_read_timeout`.
    TimedOut,
    /// idem may not hold more body bytes for this client, or at all (the rest is unread).
    Refused(Over),
    /// The client broke the framing (a malformed chunked body): its answer is 400.
    Malformed(Box<pingora::Error>),
}

/// Answers `Expect: 100-continue` itself. Pingora forwards `Expect` and relays only an
/// origin's own `100 Continue`; many app servers never send one, so client and origin would
/// wait for each other. idem answers it (as nginx and Envoy do) and strips `Expect`
/// upstream.
pub(crate) async fn continue_if_expected(session: &mut Session) -> Result<()> {
    if is_expect_continue(session.req_header()) {
        session.downstream_session.write_continue_response().await?;
    }
    Ok(())
}

/// An HTTP/1.1+ request expecting `100 Continue` (RFC 9110 10.1.1: a server ignores the
/// expectation in an HTTP/1.0 request).
fn is_expect_continue(req: &RequestHeader) -> bool {
    req.version != http::Version::HTTP_10
        && req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads and discards the request body before idem refuses a request from its head, so
/// that the connection can carry the client's next request: Pingora closes a connection
/// answered before its request body was read. Nothing is read when the body is declared
/// larger than `max_body` or when the client waits for `100 Continue` (it may then never
/// send the body): that connection closes after the answer, as it does when the body turns
/// out too large, too slow (`deadline`) or broken.
pub(crate) async fn discard(session: &mut Session, max_body: u64, deadline: Duration) {
    if is_expect_continue(session.req_header())
        || declared_length(&session.req_header().headers).is_some_and(|n| n > max_body)
    {
        // Said here rather than left to Pingora's default (it closes a connection answered
        // before its body was read): the unread body must never be read as a request.
        session.set_keepalive(None);
        return;
    }
    let mut read = 0u64;
    let drained = tokio::time::timeout(deadline, async {
        while let Some(chunk) = session.read_request_body().await? {
            read += chunk.len() as u64;
            if read > max_body {
                break;
            }
        }
        Ok::<_, Box<pingora::Error>>(())
    })
    .await;
    if !matches!(drained, Ok(Ok(()))) || read > max_body {
        session.set_keepalive(None);
    }
}

/// How [`read`] reads a body.
pub(crate) struct Reading {
    /// Largest body idem buffers (`max_body`).
    pub(crate) max_body: u64,
    /// Total deadline (`body_read_timeout`).
    pub(crate) deadline: Duration,
    /// The bytes this body takes from the budget.
    pub(crate) lease: Lease,
    /// What it may take.
    pub(crate) limits: BodyLimits,
}

/// Reads the body up to `max_body` within the deadline, feeding `hasher` on the way; the
/// bytes held are counted in `how.lease`, taken before they are read: a declared length at
/// once (what the buffer will hold), a chunked body chunk by chunk. An `Err` means the client
/// left.
pub(crate) async fn read(
    session: &mut Session,
    mut hasher: FingerprintHasher,
    how: Reading,
) -> Result<BodyRead> {
    let Reading {
        max_body,
        deadline,
        mut lease,
        limits,
    } = how;
    let expected = declared_length(&session.req_header().headers).unwrap_or(0);
    if let Err(over) = lease.take(expected.min(max_body), limits) {
        return Ok(BodyRead::Refused(over));
    }
    let mut buf = BodyBuf::with_hint(expected.min(max_body) as usize);
    let deadline = tokio::time::Instant::now() + deadline;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) if is_malformed(&e) => return Ok(BodyRead::Malformed(e)),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(BodyRead::TimedOut),
        };
        let Some(chunk) = chunk else { break };
        let more = (buf.len() + chunk.len()) as u64;
        if more > lease.bytes() {
            if let Err(over) = lease.take(more - lease.bytes(), limits) {
                return Ok(BodyRead::Refused(over));
            }
        }
        // Kept without a copy when the body arrives in one chunk.
        if more > max_body {
            buf.push(chunk);
            return Ok(BodyRead::TooLarge(lease.attach(buf.freeze())));
        }
        hasher.update(&chunk);
        buf.push(chunk);
    }
    Ok(BodyRead::Complete(
        lease.attach(buf.freeze()),
        hasher.finish(),
    ))
}

/// Whether a body read failed on the client's framing (a malformed chunk, a bad trailer,
/// an h2 protocol error) rather than on the connection (closed, reset, timed out).
pub(crate) fn is_malformed(e: &pingora::Error) -> bool {
    use pingora::ErrorType::*;
    !matches!(
        e.etype(),
        ConnectionClosed | ReadError | WriteError | ReadTimedout | WriteTimedout
    )
}

/// Forwards a request whose body idem has partly consumed (`prefix`: a keyless chunked body
/// over `max_body` on a fingerprint route), streaming the rest of the body up and the
/// response down. Not deduplicated and not detached: a pass-through that Pingora's proxy
/// path can no longer perform. `tag` goes upstream with the request (a generated request
/// id, the `traceparent`), `response_tag` back with the response. The call is counted for
/// its backend once a connection is made (a connect failure here is not). Returns the status.
pub(crate) async fn forward_consumed(
    session: &mut Session,
    upstream: &Upstream,
    metrics: &Metrics,
    prefix: Bytes,
    from: Peer,
    tag: &[(http::HeaderName, http::HeaderValue)],
    response_tag: Option<(&http::HeaderName, &http::HeaderValue)>,
) -> Result<u16> {
    let started = std::time::Instant::now();
    let (mut s, peer) = upstream.connect_any().await?;
    let mut req = forwarded_request(session.req_header(), from)?;
    req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    for (name, value) in tag {
        req.insert_header(name.clone(), value.clone())?;
    }
    s.write_request_header(Box::new(req)).await?;
    s.write_request_body(prefix, false).await?;
    while let Some(chunk) = session.read_request_body().await? {
        s.write_request_body(chunk, false).await?;
    }
    s.finish_request_body().await?;
    if let Err(e) = read_final_header(&mut s).await {
        metrics.backend_failed(peer.backend, started.elapsed());
        return Err(e);
    }
    let mut h = stream_header(s.response_header().expect("header read"));
    metrics.backend_answered(peer.backend, h.status.as_u16(), started.elapsed());
    append_cache_status(&mut h, CACHE_STATUS_BYPASS)?;
    if let Some((name, value)) = response_tag {
        h.insert_header(name.clone(), value.clone())?;
    }
    // An HTTP/1.0 request never gets here (without chunked coding its body length is
    // declared), but every writer of a response of unknown length applies the rule.
    framing::apply(session, &mut h);
    let status = h.status.as_u16();
    session.write_response_header(Box::new(h), false).await?;
    while let Some(b) = s.read_response_body().await? {
        session.write_response_body(Some(b), false).await?;
    }
    session.write_response_body(None, true).await?;
    upstream.release_session(s, &peer).await;
    Ok(status)
}
