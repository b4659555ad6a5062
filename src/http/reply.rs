//! idem's own answers to the client, and the one writer of them.
//!
//! A deduplicated request ends in a [`Reply`]: a complete response (the leader's own, a
//! collapsed waiter's, a replay), a streamed response (not replayable, leader only), or a
//! problem. [`write`] is the only place that writes one, so the rules live here once:
//! * a stored response goes to a client other than its leader only if that client can read
//!   its content coding (else 406 `not-acceptable`);
//! * served from another request's call into the anonymous scope, it drops `Set-Cookie`;
//! * hop-by-hop headers were dropped when the response was stored; framing is recomputed
//!   (`Content-Length`), Pingora regenerates `Date` and `Connection`, and idem adds `Age`,
//!   `Cache-Status` (RFC 9211, member `idem`) and `Idempotent-Replayed: true`;
//! * the status and the metric outcome of the request follow from the reply written.

use crate::dedup::leader::Chunk;
use crate::http::framing;
use crate::http::problem::Problem;
use crate::message::StoredResponse;
use crate::observe::metrics::Answered;
use crate::outcome::{Disposition, Outcome};
use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// `Cache-Status` for a pass-through on an eligible route.
pub(crate) const CACHE_STATUS_BYPASS: &str = "idem; fwd=bypass";

/// How a deduplicated request is answered.
pub(crate) enum Reply {
    /// A complete response, reaching this client as `how` says.
    Response {
        /// The response.
        response: Arc<StoredResponse>,
        /// The leader's own, collapsed, or a replay.
        how: Disposition,
    },
    /// The leader's response, streamed because it cannot be stored.
    Stream {
        /// Response header, hop-by-hop fields removed.
        header: Box<ResponseHeader>,
        /// Body chunks.
        body: mpsc::Receiver<Chunk>,
    },
    /// A failure idem answers itself.
    Problem(Problem),
}

impl Reply {
    /// The answer a settled outcome gives; a response reaches this client as `how`.
    pub(crate) fn settled(outcome: Outcome, how: Disposition) -> Reply {
        match outcome {
            Outcome::Response { response, .. } => Reply::Response { response, how },
            Outcome::NotReplayable => Reply::Problem(Problem::NotReplayable),
            Outcome::Unknown(held) => Reply::Problem(Problem::outcome_unknown(held)),
            Outcome::Unreachable => Reply::Problem(Problem::UpstreamUnreachable),
            Outcome::Refused(r) => Reply::Problem(r.into()),
        }
    }
}

impl From<Problem> for Reply {
    fn from(p: Problem) -> Reply {
        Reply::Problem(p)
    }
}

/// Who the client is, for what may be shared with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// The request carried a scope header (a credential): it is its own scope.
    Identified,
    /// No scope header: the anonymous scope of its authority, shared by every anonymous
    /// client of that host.
    Anonymous,
}

/// What was written, for the access log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    /// The status sent.
    pub(crate) status: u16,
    /// The `outcome` label.
    pub(crate) answered: Answered,
}

impl Reply {
    /// The reply this client may receive: a stored response served to a client other than
    /// its leader, in a content coding that client did not accept, becomes 406.
    pub(crate) fn for_client(self, req: &pingora::http::RequestHeader) -> Reply {
        match self {
            Reply::Response { response, how }
                if !matches!(how, Disposition::Leader { .. })
                    && !readable_by(&response, req.headers.get(header::ACCEPT_ENCODING)) =>
            {
                Reply::Problem(Problem::NotAcceptable)
            }
            other => other,
        }
    }

    /// The status and outcome this reply writes.
    pub(crate) fn written(&self) -> Written {
        match self {
            Reply::Response { response, how } => Written {
                status: response.status,
                answered: match how {
                    Disposition::Leader { .. } => Answered::Leader,
                    Disposition::Collapsed => Answered::Collapsed,
                    Disposition::Replay { .. } => Answered::Replayed,
                },
            },
            Reply::Stream { header, .. } => Written {
                status: header.status.as_u16(),
                answered: Answered::Leader,
            },
            Reply::Problem(p) => {
                let info = p.info();
                Written {
                    status: info.status,
                    answered: info.answered,
                }
            }
        }
    }

    /// Writes the reply (see the module doc). An `Err` means the client connection broke
    /// (or a stream was cut off upstream) and must not be reused.
    pub(crate) async fn write(self, session: &mut Session, audience: Audience) -> Result<()> {
        match self {
            Reply::Response { response, how } => {
                write_stored(session, &response, how, audience).await
            }
            Reply::Stream { header, body } => write_stream(session, header, body).await,
            Reply::Problem(p) => write_problem(session, p).await,
        }
    }
}

/// Appends idem's member to any upstream `Cache-Status` (RFC 9211 lists the nearest cache
/// last... and idem is the cache nearest the client).
pub(crate) fn append_cache_status(h: &mut ResponseHeader, member: &str) -> Result<()> {
    let value = match h.headers.get("cache-status").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {member}"),
        _ if member == CACHE_STATUS_BYPASS => {
            // The pass-through hot path: no allocation for the value.
            h.insert_header(
                "cache-status",
                http::HeaderValue::from_static(CACHE_STATUS_BYPASS),
            )?;
            return Ok(());
        }
        _ => member.to_string(),
    };
    h.insert_header("cache-status", value)?;
    Ok(())
}

fn cache_status(how: Disposition) -> String {
    match how {
        Disposition::Leader { stored: true } => "idem; fwd=uri-miss; stored".to_string(),
        Disposition::Leader { stored: false } => "idem; fwd=uri-miss".to_string(),
        Disposition::Collapsed => "idem; fwd=uri-miss; collapsed".to_string(),
        Disposition::Replay { ttl } => format!("idem; hit; ttl={ttl}"),
    }
}

/// Whether a client sending `accept_encoding` can read a body with `resp`'s content coding.
/// idem asks upstream for `identity`, so this only bites when a backend ignores that.
/// No `Accept-Encoding` at all means any coding is acceptable (RFC 9110 12.5.3).
pub(crate) fn readable_by(
    resp: &StoredResponse,
    accept_encoding: Option<&http::HeaderValue>,
) -> bool {
    let coding = resp
        .headers
        .iter()
        .find(|(n, _)| n == header::CONTENT_ENCODING)
        .and_then(|(_, v)| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let Some(coding) = coding.filter(|c| !c.is_empty() && c != "identity") else {
        return true;
    };
    let Some(accept) = accept_encoding.and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.split(',').any(|item| {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        !refused && (name == coding || name == "*")
    })
}

async fn write_stored(
    session: &mut Session,
    resp: &StoredResponse,
    how: Disposition,
    audience: Audience,
) -> Result<()> {
    // No case map: every name here is an `http::HeaderName` or a lowercase literal, which
    // Pingora writes the same way with or without one (standard names titled, others as
    // they are), and keeping the second map in step was a fifth of a replay's own cost.
    let mut h = ResponseHeader::build_no_case(resp.status, Some(resp.headers.len() + 4))?;
    let replayed = !matches!(how, Disposition::Leader { .. });
    for (name, value) in &resp.headers {
        if replayed && audience == Audience::Anonymous && name == header::SET_COOKIE {
            continue;
        }
        h.append_header(name.clone(), value.clone())?;
    }
    if replayed {
        h.insert_header(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        )?;
        let age = Instant::now()
            .saturating_duration_since(resp.completed_at)
            .as_secs();
        h.insert_header(header::AGE, http::HeaderValue::from(age))?;
    }
    append_cache_status(&mut h, &cache_status(how))?;
    h.set_content_length(resp.body.len())?;
    let head_only = session.req_header().method == http::Method::HEAD;
    // Trailers reach HTTP/2 clients (gRPC's status is one); HTTP/1 has no place for them
    // here (the body is sent with a length).
    let trailers = !head_only && !resp.trailers.is_empty() && session.is_http2();
    session
        .write_response_header(
            Box::new(h),
            head_only || (resp.body.is_empty() && !trailers),
        )
        .await?;
    if !head_only && !resp.body.is_empty() {
        session
            .write_response_body(Some(resp.body.clone()), !trailers)
            .await?;
    }
    if trailers {
        let mut map = http::HeaderMap::with_capacity(resp.trailers.len());
        for (n, v) in &resp.trailers {
            map.append(n.clone(), v.clone());
        }
        // Boxed: rare, and its future must not size every replay's.
        Box::pin(session.downstream_session.write_response_trailers(map)).await?;
    }
    Ok(())
}

/// Streams a response the leader's call could not store. An upstream cut-off aborts the
/// client connection (an `Err`), so the client sees a truncated response, never a complete one.
async fn write_stream(
    session: &mut Session,
    mut header: Box<ResponseHeader>,
    mut body: mpsc::Receiver<Chunk>,
) -> Result<()> {
    append_cache_status(&mut header, "idem; fwd=uri-miss")?;
    framing::apply(session, &mut header);
    session.write_response_header(header, false).await?;
    while let Some(chunk) = body.recv().await {
        match chunk {
            Chunk::Data(bytes) => session.write_response_body(Some(bytes), false).await?,
            // The last thing sent (HTTP/2 only): it ends the stream.
            Chunk::Trailers(map) => {
                Box::pin(session.downstream_session.write_response_trailers(*map)).await?;
                return Ok(());
            }
            Chunk::CutOff => {
                return Err(Error::explain(
                    ErrorType::ReadError,
                    "upstream response cut off while streaming",
                ))
            }
        }
    }
    session.write_response_body(None, true).await?;
    Ok(())
}

/// Writes a problem+json answer. Keep-alive is kept unless the request body may be unread.
async fn write_problem(session: &mut Session, p: Problem) -> Result<()> {
    let body = Bytes::from(p.body());
    let mut h = ResponseHeader::build_no_case(p.status(), Some(5))?;
    h.insert_header(header::CONTENT_TYPE, "application/problem+json")?;
    if let Some(secs) = p.retry_after() {
        h.insert_header(header::RETRY_AFTER, secs.to_string())?;
    }
    append_cache_status(&mut h, &format!("idem; fwd=request; detail={}", p.kind()))?;
    h.set_content_length(body.len())?;
    if matches!(p, Problem::TooLarge | Problem::BodyTimeout) {
        // The rest of the body is not worth draining to keep this connection.
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_coding(coding: Option<&'static str>) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: coding
                .map(|c| vec![(header::CONTENT_ENCODING, HeaderValue::from_static(c))])
                .unwrap_or_default(),
            body: Bytes::new(),
            trailers: Vec::new(),
            completed_at: Instant::now(),
        }
    }

    #[test]
    fn encoded_bodies_go_only_to_clients_that_accept_them() {
        let gz = with_coding(Some("gzip"));
        let accept = |v: &'static str| Some(HeaderValue::from_static(v));
        assert!(readable_by(&with_coding(None), accept("br").as_ref()));
        assert!(readable_by(
            &with_coding(Some("identity")),
            accept("br").as_ref()
        ));
        assert!(readable_by(&gz, None));
        assert!(readable_by(&gz, accept("br, GZIP;q=0.5").as_ref()));
        assert!(readable_by(&gz, accept("*").as_ref()));
        assert!(!readable_by(&gz, accept("br").as_ref()));
        assert!(!readable_by(&gz, accept("gzip;q=0").as_ref()));
        assert!(!readable_by(&gz, accept("identity").as_ref()));
    }
}
