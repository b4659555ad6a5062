//! idem's own answers to the client, and the one writer of them.
//!
//! A deduplicated request ends in a [`Reply`]: a complete response (the leader's own, a
//! collapsed waiter's, a replay), a streamed response (not replayable, leader only), or a
//! problem. [`Reply::write`] is the only place that writes one, so the rules live here once:
//! * a stored response goes to a client other than its leader only if that client can read
//!   its content coding (else 406 `not-acceptable`);
//! * **credentials stay with the client they were minted for**: served from another
//!   request's call, a response drops its credential headers (`Set-Cookie`, `Set-Cookie2`,
//!   `Authentication-Info`, `Proxy-Authentication-Info` and the route's
//!   `credential_headers`) unless the scope identifies its caller ([`Audience`],
//!   `crate::http::key_inputs`); whoever shares such a scope holds the same credential;
//! * **private answers stay private**: a response the origin marked `Cache-Control:
//!   private` or `no-store` goes to no client but its leader's in a scope that does not
//!   identify its caller: the others get 409 `private-response`. The record stays, so the
//!   call is never run again (neither rule can cause a second execution);
//! * framing never comes from a stored response, wherever it was stored (this process, or
//!   Redis, which another writer may have touched): hop-by-hop and framing headers are
//!   dropped on the way out ([`crate::message::is_hop_by_hop`]), `Content-Length` is
//!   recomputed from the body, Pingora regenerates `Date` and `Connection`, and idem adds
//!   `Age`, `Cache-Status` (RFC 9211, member `idem`) and `Idempotent-Replayed: true`;
//! * the status and the metric outcome of the request follow from the reply written;
//! * every reply carries the request's own id (`X-Request-Id`), replacing the one a stored
//!   response may hold from its leader.

use crate::dedup::leader::Chunk;
use crate::http::framing;
use crate::http::problem::Problem;
use crate::message::{is_hop_by_hop, StoredResponse};
use crate::observe::metrics::Answered;
use crate::outcome::{Disposition, Outcome};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
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

/// Who the client is, for what of another request's response may be shared with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Audience<'a> {
    /// The scope holds a credential that identifies its caller: whoever shares it holds the
    /// same credential.
    pub(crate) identified: bool,
    /// Response headers that carry credentials (the route's, with the four always withheld).
    pub(crate) credentials: &'a [HeaderName],
}

impl Audience<'static> {
    /// A reply that shares nothing of a response (idem's own problems).
    pub(crate) const NOBODY: Audience<'static> = Audience {
        identified: false,
        credentials: &[],
    };
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
    /// The reply this client may receive, served a response from another request's call: a
    /// private response into a scope that does not identify its caller becomes 409
    /// `private-response`; one in a content coding this client did not accept, 406.
    pub(crate) fn for_client(
        self,
        req: &pingora::http::RequestHeader,
        audience: Audience<'_>,
    ) -> Reply {
        match self {
            Reply::Response { response, how } if !matches!(how, Disposition::Leader { .. }) => {
                if !audience.identified && is_private(&response) {
                    Reply::Problem(Problem::PrivateResponse)
                } else if !readable_by(&response, req.headers.get(header::ACCEPT_ENCODING)) {
                    Reply::Problem(Problem::NotAcceptable)
                } else {
                    Reply::Response { response, how }
                }
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

    /// Writes the reply (see the module doc), with `tag` (the request id header) among its
    /// headers. An `Err` means the client connection broke (or a stream was cut off
    /// upstream) and must not be reused.
    pub(crate) async fn write(
        self,
        session: &mut Session,
        audience: Audience<'_>,
        tag: Option<(&http::HeaderName, &http::HeaderValue)>,
    ) -> Result<()> {
        match self {
            Reply::Response { response, how } => {
                write_stored(session, &response, how, audience, tag).await
            }
            Reply::Stream { header, body } => write_stream(session, header, body, tag).await,
            Reply::Problem(p) => write_problem(session, p, tag).await,
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

/// `Cache-Control: private` (with or without field names) or `no-store`: a response the
/// origin meant for its one client.
pub(crate) fn is_private(resp: &StoredResponse) -> bool {
    resp.headers
        .iter()
        .filter(|(n, _)| n == header::CACHE_CONTROL)
        .filter_map(|(_, v)| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| d.eq_ignore_ascii_case("private") || d.eq_ignore_ascii_case("no-store"))
}

/// The headers of a stored response as written to this client: never hop-by-hop or
/// framing ones, and credentials only to the leader's client or within a scope that
/// identifies its caller.
pub(crate) fn headers_for<'r>(
    resp: &'r StoredResponse,
    how: Disposition,
    audience: Audience<'r>,
) -> impl Iterator<Item = &'r (HeaderName, HeaderValue)> {
    let shared = !matches!(how, Disposition::Leader { .. }) && !audience.identified;
    let withheld = move |name: &HeaderName| shared && audience.credentials.contains(name);
    resp.headers
        .iter()
        .filter(move |(name, _)| !is_hop_by_hop(name) && !withheld(name))
}

/// Sets the request id header, replacing what a stored response carried (the leader's).
fn set_tag(
    h: &mut ResponseHeader,
    tag: Option<(&http::HeaderName, &http::HeaderValue)>,
) -> Result<()> {
    if let Some((name, value)) = tag {
        h.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

async fn write_stored(
    session: &mut Session,
    resp: &StoredResponse,
    how: Disposition,
    audience: Audience<'_>,
    tag: Option<(&http::HeaderName, &http::HeaderValue)>,
) -> Result<()> {
    // No case map: every name here is an `http::HeaderName` or a lowercase literal, which
    // Pingora writes the same way with or without one (standard names titled, others as
    // they are), and keeping the second map in step was a fifth of a replay's own cost.
    // Room for the five headers added below: growing the map is most of an insert's cost.
    let mut h = ResponseHeader::build_no_case(resp.status, Some(resp.headers.len() + 5))?;
    let replayed = !matches!(how, Disposition::Leader { .. });
    for (name, value) in headers_for(resp, how, audience) {
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
    set_tag(&mut h, tag)?;
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
    tag: Option<(&http::HeaderName, &http::HeaderValue)>,
) -> Result<()> {
    append_cache_status(&mut header, "idem; fwd=uri-miss")?;
    set_tag(&mut header, tag)?;
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
async fn write_problem(
    session: &mut Session,
    p: Problem,
    tag: Option<(&http::HeaderName, &http::HeaderValue)>,
) -> Result<()> {
    let body = Bytes::from(p.body());
    let mut h = ResponseHeader::build_no_case(p.status(), Some(5))?;
    h.insert_header(header::CONTENT_TYPE, "application/problem+json")?;
    if let Some(secs) = p.retry_after() {
        h.insert_header(header::RETRY_AFTER, secs.to_string())?;
    }
    append_cache_status(&mut h, &format!("idem; fwd=request; detail={}", p.kind()))?;
    set_tag(&mut h, tag)?;
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
    use proptest::prelude::*;

    const CREDENTIALS: [HeaderName; 5] = [
        header::SET_COOKIE,
        HeaderName::from_static("set-cookie2"),
        HeaderName::from_static("authentication-info"),
        HeaderName::from_static("proxy-authentication-info"),
        HeaderName::from_static("x-auth-token"),
    ];

    fn name_pool() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            (0usize..5).prop_map(|i| CREDENTIALS[i].clone()),
            Just(header::CONTENT_TYPE),
            Just(header::CACHE_CONTROL),
            Just(header::TRANSFER_ENCODING),
            Just(header::CONTENT_LENGTH),
            Just(header::CONNECTION),
            Just(HeaderName::from_static("keep-alive")),
            "x-[a-z]{1,8}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
        ]
    }

    fn disposition() -> impl Strategy<Value = Disposition> {
        prop_oneof![
            any::<bool>().prop_map(|stored| Disposition::Leader { stored }),
            Just(Disposition::Collapsed),
            (0u64..100).prop_map(|ttl| Disposition::Replay { ttl }),
        ]
    }

    proptest! {
        /// Whatever the response holds (from this process or from Redis): a credential
        /// header never reaches a client other than the leader's in a scope that does not
        /// identify its caller, framing and hop-by-hop headers never reach anyone, and
        /// everything else is kept in order.
        #[test]
        fn credentials_reach_only_the_leader_of_a_scope_without_a_credential(
            names in proptest::collection::vec(name_pool(), 0..12),
            how in disposition(),
            identified in any::<bool>(),
        ) {
            let resp = StoredResponse {
                status: 200,
                headers: names
                    .iter()
                    .map(|n| (n.clone(), HeaderValue::from_static("v")))
                    .collect(),
                body: Bytes::new(),
                trailers: Vec::new(),
                completed_at: Instant::now(),
                origin: None,
            };
            let audience = Audience { identified, credentials: &CREDENTIALS };
            let out: Vec<HeaderName> =
                headers_for(&resp, how, audience).map(|(n, _)| n.clone()).collect();
            let leader = matches!(how, Disposition::Leader { .. });
            let expected: Vec<HeaderName> = names
                .iter()
                .filter(|n| !is_hop_by_hop(n))
                .filter(|n| leader || identified || !CREDENTIALS.contains(n))
                .cloned()
                .collect();
            prop_assert_eq!(&out, &expected);
            if !leader && !identified {
                prop_assert!(out.iter().all(|n| !CREDENTIALS.contains(n)));
            }
            prop_assert!(out.iter().all(|n| !is_hop_by_hop(n)));
        }
    }

    #[test]
    fn private_and_no_store_responses_are_private() {
        let with = |cc: &'static str| StoredResponse {
            status: 200,
            headers: vec![(header::CACHE_CONTROL, HeaderValue::from_static(cc))],
            body: Bytes::new(),
            trailers: Vec::new(),
            completed_at: Instant::now(),
            origin: None,
        };
        for private in [
            "private",
            "no-store",
            "max-age=0, Private",
            "private=\"set-cookie\"",
            "public, NO-STORE",
        ] {
            assert!(is_private(&with(private)), "{private}");
        }
        for shared in ["public", "max-age=60", "no-cache", "privately"] {
            assert!(!is_private(&with(shared)), "{shared}");
        }
    }

    fn with_coding(coding: Option<&'static str>) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: coding
                .map(|c| vec![(header::CONTENT_ENCODING, HeaderValue::from_static(c))])
                .unwrap_or_default(),
            body: Bytes::new(),
            trailers: Vec::new(),
            completed_at: Instant::now(),
            origin: None,
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
