//! HTTP/2 towards the backends: gRPC (`content-type: application/grpc*`) in a group with
//! `protocol = "auto"`, everything in one with `protocol = "h2c"`. Cleartext backends are
//! spoken to with prior knowledge (h2c), `https://` ones by ALPN (`h2` only: a backend that
//! does not agree is a failed call, not a silent downgrade).
//!
//! Connections are multiplexed (Pingora's h2 connector): one connection per backend carries
//! many calls at once and stays pooled up to `pool_idle_timeout`. The reuse rule of
//! [`super::reuse`] exists for HTTP/1, where a backend closes an idle connection without a
//! word and a request written into that close is lost with no way to know whether it ran.
//! HTTP/2 says it instead, and idem follows what it says:
//! * `GOAWAY`: streams above its last stream id were not processed, and so are "not sent":
//!   tried again on a new connection (the next backend when this one has no other), the key
//!   never held for them; streams at or below it complete normally.
//! * `RST_STREAM` with `REFUSED_STREAM` (RFC 9113 8.7): not processed, "not sent" likewise.
//! * Any other reset, or the connection failing once a stream's request was written: the
//!   app may have it: outcome unknown, the key held (as for HTTP/1).
//! * A write that fails before the request is complete: not sent.
//!
//! So no reuse window applies to HTTP/2 connections, and nothing is learned from them.

use super::backends::Endpoint;
use super::{read_final_header, unknown, write_request, CallError, Exchange, Upstream};
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::RetryType;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether `req` is a gRPC call (`application/grpc`, `application/grpc+proto`, ...).
pub(crate) fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc")
        })
}

/// `peer` for HTTP/2: ALPN `h2` only (prior knowledge on cleartext), pooled up to `idle`.
pub(crate) fn peer(mut peer: HttpPeer, idle: Duration) -> HttpPeer {
    peer.options.alpn = ALPN::H2;
    peer.options.idle_timeout = Some(idle);
    peer
}

/// The request as sent over HTTP/2: the URI carries scheme and authority (from `Host`), and
/// a gRPC call says `te: trailers` (which HTTP/1 rules drop as hop-by-hop).
fn h2_request(req: &RequestHeader, tls: bool) -> pingora::Result<RequestHeader> {
    let mut out = req.clone();
    let authority = out
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    let path = out
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let uri = http::Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "h2 request URI", e)
        })?;
    out.set_uri(uri);
    out.remove_header(&http::header::HOST);
    if is_grpc(req) {
        out.insert_header(http::header::TE, "trailers")?;
    }
    Ok(out)
}

impl Upstream {
    /// [`Upstream::send`] over HTTP/2 (see the module doc for what counts as sent). The
    /// body is kept to the response header: a refused stream is sent again.
    pub(super) async fn send_h2(
        &self,
        req: &RequestHeader,
        body: Bytes,
    ) -> Result<Exchange, CallError> {
        let mut tried: Vec<u64> = Vec::new();
        let mut last = String::from("no backend resolves");
        // A stream refused on a pooled connection: once more on a new one, same backend.
        let mut again: Option<Arc<Endpoint>> = None;
        loop {
            let fresh = again.is_some();
            let Some(e) = again.take().or_else(|| self.select(&tried)) else {
                break;
            };
            let started = Instant::now();
            let peer = peer(e.peer.clone(), self.settings.pool_idle_timeout);
            let pooled = if fresh {
                None
            } else {
                self.h2.reused_http_session(&peer).await.ok().flatten()
            };
            let reused = pooled.is_some();
            let session = match pooled {
                Some(s) => ClientSession::H2(s),
                None => match self.h2.new_http_session::<_, ()>(&peer).await {
                    Ok(s) => s,
                    Err(err) => {
                        self.metrics.backend_failed(e.backend, started.elapsed());
                        last = format!("{}: {}", e.label, err);
                        tried.push(e.id);
                        continue;
                    }
                },
            };
            let mut s = session;
            if !matches!(s, ClientSession::H2(_)) {
                // ALPN chose HTTP/1.1 (or nothing) on an https:// backend.
                s.shutdown().await;
                self.metrics.backend_failed(e.backend, started.elapsed());
                last = format!("{}: the backend did not agree to HTTP/2 (ALPN h2)", e.label);
                tried.push(e.id);
                continue;
            }
            s.set_read_timeout(Some(self.settings.read_timeout));
            s.set_write_timeout(Some(self.settings.read_timeout));
            let request = match h2_request(req, e.peer.is_tls()) {
                Ok(r) => r,
                Err(err) => return Err(CallError::NotSent(format!("{}: {err}", e.label))),
            };
            if let Err(err) = write_request(&mut s, &request, &body).await {
                last = format!("{}: {}", e.label, err);
                s.shutdown().await;
                if reused {
                    again = Some(e);
                } else {
                    self.metrics.backend_failed(e.backend, started.elapsed());
                    tried.push(e.id);
                }
                continue;
            }
            if let Err(err) = read_final_header(&mut s).await {
                s.shutdown().await;
                self.metrics.backend_failed(e.backend, started.elapsed());
                // GOAWAY above this stream, or REFUSED_STREAM: the backend did not process it.
                if matches!(err.retry, RetryType::Decided(true)) {
                    last = format!("{}: {}", e.label, err);
                    if reused {
                        again = Some(e);
                    } else {
                        tried.push(e.id);
                    }
                    continue;
                }
                return Err(unknown(&e, &err));
            }
            let status = s.response_header().map_or(0, |h| h.status.as_u16());
            self.metrics
                .backend_answered(e.backend, status, started.elapsed());
            return Ok(Exchange {
                session: s,
                endpoint: e,
                h2_peer: Some(Box::new(peer)),
            });
        }
        Err(CallError::NotSent(last))
    }
}
