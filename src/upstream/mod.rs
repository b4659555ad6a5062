//! The upstream client for calls idem makes itself (leaders), on Pingora's own `Connector`.
//!
//! Failure classes follow DESIGN section 4 and decide whether a key may be freed:
//! * [`CallError::NotSent`]: no backend received a complete request (connect refused or timed
//!   out, or the connection failed while the request was still being written). The next
//!   backend is tried; when all fail the key is freed.
//! * [`CallError::Unknown`]: the complete request was written, then the connection reset,
//!   closed or timed out. The app may be running it: the key must be held.
//!
//! A failed write on a reused pooled connection is the one case Pingora marks retryable that
//! is also safe here (the app never saw a complete request), and it is covered by the first
//! rule. An EOF while waiting for the response header is *not* retried even on a reused
//! connection: Pingora calls it `ReusedOnly`, but the app may have run the request (see
//! notes on Pingora 0.9.1, correction 1).

use crate::config::settings::{HealthCheckSettings, UpstreamSettings};
use bytes::Bytes;
use http::header::{self, HeaderName};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::{health_check, selection::RoundRobin, Backend, LoadBalancer};
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::net::SocketAddr;
use std::sync::Arc;

/// Why a call produced no response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No backend received a complete request: the key may be freed.
    #[error("request not sent: {0}")]
    NotSent(String),
    /// The complete request was sent and no usable response came back.
    #[error("outcome unknown ({status}): {reason}")]
    Unknown {
        /// 504 for timeouts, 502 otherwise.
        status: u16,
        /// For the log.
        reason: String,
    },
}

/// Headers that describe one connection, never forwarded nor stored (RFC 9110 7.6.1), plus
/// the framing headers idem recomputes.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::EXPECT,
];

/// The backend pool: round robin over health-checked backends, one connection pool.
pub struct Upstream {
    lb: Arc<LoadBalancer<RoundRobin>>,
    connector: Connector,
    settings: UpstreamSettings,
}

/// Builds the load balancer with its health check; the caller runs it as a background service.
pub fn load_balancer(settings: &UpstreamSettings) -> std::io::Result<LoadBalancer<RoundRobin>> {
    let mut lb =
        LoadBalancer::<RoundRobin>::try_from_iter(settings.backends.iter().map(String::as_str))?;
    match &settings.health_check {
        HealthCheckSettings::None => {}
        HealthCheckSettings::Tcp => {
            let mut hc = health_check::TcpHealthCheck::new();
            hc.peer_template.options.connection_timeout = Some(settings.connect_timeout);
            lb.set_health_check(hc);
        }
        HealthCheckSettings::Http { path } => {
            let mut hc = health_check::HttpHealthCheck::new("localhost", false);
            hc.req = RequestHeader::build("GET", path.as_bytes(), None)
                .expect("validated health check path");
            hc.req
                .insert_header("host", "localhost")
                .expect("static header");
            hc.peer_template.options.connection_timeout = Some(settings.connect_timeout);
            lb.set_health_check(Box::new(hc));
        }
    }
    lb.health_check_frequency = Some(settings.health_check_interval);
    Ok(lb)
}

impl Upstream {
    /// Wraps the running load balancer and a connector for detached calls.
    pub fn new(
        lb: Arc<LoadBalancer<RoundRobin>>,
        connector: Connector,
        settings: UpstreamSettings,
    ) -> Upstream {
        Upstream {
            lb,
            connector,
            settings,
        }
    }

    /// The peer for `backend`, with the configured timeouts.
    pub fn peer(&self, backend: &Backend) -> HttpPeer {
        let mut peer = HttpPeer::new(backend.addr.clone(), false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
        peer.options.write_timeout = Some(self.settings.read_timeout);
        peer.options.idle_timeout = Some(self.settings.pool_idle_timeout);
        peer
    }

    /// The next backend not in `tried`: healthy ones first, then any (a health check may lag
    /// behind a backend that just came back).
    pub fn select(&self, tried: &[SocketAddr]) -> Option<Backend> {
        let untried = |b: &Backend| b.addr.as_inet().map(|a| !tried.contains(a)).unwrap_or(true);
        let n = self.settings.backends.len() * 2 + 1;
        self.lb
            .select_with(b"", n, |b, healthy| healthy && untried(b))
            .or_else(|| self.lb.select_with(b"", n, |b, _| untried(b)))
    }

    /// Number of configured backends.
    pub fn backend_count(&self) -> usize {
        self.settings.backends.len()
    }

    /// Whether any backend currently passes its health check.
    pub fn any_healthy(&self) -> bool {
        self.lb.select(b"", self.backend_count() * 2 + 1).is_some()
    }

    /// Sends `req` with `body` and reads the response header, trying each backend once when
    /// nothing was sent. The caller bounds the whole call with the total deadline.
    ///
    /// # Cancel safety
    /// Dropping the future closes the upstream connection; whatever was sent stays sent, so the
    /// caller must treat a cancelled call as outcome unknown.
    pub async fn send(&self, req: &RequestHeader, body: &Bytes) -> Result<Exchange, CallError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = String::from("no backend configured");
        // Each backend once, plus one extra attempt for a stale pooled connection.
        for _ in 0..self.backend_count() + 1 {
            let Some(backend) = self.select(&tried) else {
                break;
            };
            let peer = self.peer(&backend);
            let (mut session, reused) = match self.connector.get_http_session(&peer).await {
                Ok(s) => s,
                Err(e) => {
                    last = format!("{}: {e}", backend.addr);
                    if let Some(a) = backend.addr.as_inet() {
                        tried.push(*a);
                    }
                    continue;
                }
            };
            session.set_read_timeout(Some(self.settings.read_timeout));
            session.set_write_timeout(Some(self.settings.read_timeout));
            if let Err(e) = write_request(&mut session, req, body).await {
                last = format!("{}: {e}", backend.addr);
                session.shutdown().await;
                // A fresh connection that fails mid-write is a dead backend; a reused one may
                // just have been closed by the backend while idle: retry it once.
                if !reused {
                    if let Some(a) = backend.addr.as_inet() {
                        tried.push(*a);
                    }
                }
                continue;
            }
            // From here on the app may have the complete request.
            if let Err(e) = read_final_header(&mut session).await {
                session.shutdown().await;
                return Err(unknown(&backend, &e));
            }
            return Ok(Exchange {
                session,
                peer,
                backend,
            });
        }
        Err(CallError::NotSent(last))
    }

    /// Forwards a request whose body idem has partly consumed (`prefix`), streaming the rest
    /// of the body up and the response down. Not deduplicated and not detached: this is a
    /// pass-through that Pingora's proxy path can no longer perform. Returns the status.
    pub async fn forward_streaming(
        &self,
        session: &mut Session,
        prefix: Bytes,
    ) -> pingora::Result<u16> {
        let backend = self
            .select(&[])
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no backend"))?;
        let peer = self.peer(&backend);
        let (mut s, _reused) = self.connector.get_http_session(&peer).await?;
        let mut req = forwarded_request(
            session.req_header(),
            session.client_addr().and_then(|a| a.as_inet()),
        )?;
        req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        s.write_request_header(Box::new(req)).await?;
        s.write_request_body(prefix, false).await?;
        while let Some(chunk) = session.read_request_body().await? {
            s.write_request_body(chunk, false).await?;
        }
        s.finish_request_body().await?;
        read_final_header(&mut s).await?;
        let mut h = s.response_header().expect("header read").clone();
        let length = h.headers.get(header::CONTENT_LENGTH).cloned();
        for name in HOP_BY_HOP
            .iter()
            .chain(connection_nominated(&h.headers.clone()).iter())
        {
            h.remove_header(name);
        }
        match length {
            Some(len) => h.insert_header(header::CONTENT_LENGTH, len)?,
            None => h.insert_header(header::TRANSFER_ENCODING, "chunked")?,
        }
        crate::http::reply::append_cache_status(&mut h, crate::http::reply::CACHE_STATUS_BYPASS)?;
        let status = h.status.as_u16();
        session.write_response_header(Box::new(h), false).await?;
        while let Some(b) = s.read_response_body().await? {
            session.write_response_body(Some(b), false).await?;
        }
        session.write_response_body(None, true).await?;
        self.connector
            .release_http_session(s, &peer, peer.options.idle_timeout)
            .await;
        Ok(status)
    }

    /// Returns a fully read connection to the pool.
    pub async fn release(&self, ex: Exchange) {
        let Exchange { session, peer, .. } = ex;
        self.connector
            .release_http_session(session, &peer, peer.options.idle_timeout)
            .await;
    }
}

/// An upstream exchange whose response header has arrived.
pub struct Exchange {
    session: ClientSession,
    peer: HttpPeer,
    backend: Backend,
}

impl Exchange {
    /// The response header.
    pub fn header(&self) -> &ResponseHeader {
        self.session
            .response_header()
            .expect("read_final_header succeeded")
    }

    /// The next body chunk; `Ok(None)` at the end.
    pub async fn read_body(&mut self) -> Result<Option<Bytes>, CallError> {
        match self.session.read_response_body().await {
            Ok(b) => Ok(b),
            Err(e) => Err(unknown(&self.backend, &e)),
        }
    }

    /// Closes the connection without returning it to the pool.
    pub async fn abort(mut self) {
        self.session.shutdown().await;
    }
}

async fn write_request(
    s: &mut ClientSession,
    req: &RequestHeader,
    body: &Bytes,
) -> pingora::Result<()> {
    s.write_request_header(Box::new(req.clone())).await?;
    if !body.is_empty() {
        s.write_request_body(body.clone(), true).await?;
    }
    s.finish_request_body().await
}

async fn read_final_header(s: &mut ClientSession) -> pingora::Result<()> {
    loop {
        s.read_response_header().await?;
        let informational = s
            .response_header()
            .map(|h| h.status.is_informational())
            .unwrap_or(false);
        // The h2 client panics when asked for a second header; it never returns 1xx anyway.
        if !informational || !matches!(s, ClientSession::H1(_)) {
            return Ok(());
        }
    }
}

fn unknown(backend: &Backend, e: &Error) -> CallError {
    let status = match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
        _ => 502,
    };
    CallError::Unknown {
        status,
        reason: format!("{}: {e}", backend.addr),
    }
}

/// Builds the request idem sends upstream for a buffered body: end-to-end headers, exact
/// `Content-Length`, forwarding headers, and `Accept-Encoding: identity` so that a stored
/// body can be replayed to any client (see README, "Content negotiation").
pub fn upstream_request(
    req: &RequestHeader,
    client: Option<&SocketAddr>,
    body_len: usize,
) -> pingora::Result<RequestHeader> {
    let mut out = forwarded_request(req, client)?;
    out.remove_header(&header::ACCEPT_ENCODING);
    out.insert_header(header::CONTENT_LENGTH, http::HeaderValue::from(body_len))?;
    out.insert_header(
        header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    )?;
    Ok(out)
}

/// The request head as forwarded: end-to-end headers, `Host`, forwarding headers; framing
/// is left to the caller.
fn forwarded_request(
    req: &RequestHeader,
    client: Option<&SocketAddr>,
) -> pingora::Result<RequestHeader> {
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = RequestHeader::build(
        req.method.clone(),
        path.as_bytes(),
        Some(req.headers.len() + 3),
    )?;
    let nominated = connection_nominated(&req.headers);
    for (name, value) in req.headers.iter() {
        if is_hop_by_hop(name) || nominated.contains(name) {
            continue;
        }
        out.append_header(name.clone(), value.clone())?;
    }
    if out.headers.get(header::HOST).is_none() {
        if let Some(auth) = req.uri.authority() {
            out.insert_header(header::HOST, auth.as_str())?;
        }
    }
    add_forwarded(&mut out, client)?;
    Ok(out)
}

/// Appends the client to `X-Forwarded-For` and sets `X-Forwarded-Proto`.
pub fn add_forwarded(req: &mut RequestHeader, client: Option<&SocketAddr>) -> pingora::Result<()> {
    use std::io::Write;
    if let Some(addr) = client {
        // Formatted on the stack: one allocation, for the header value itself.
        let mut buf = [0u8; 64];
        let mut w = &mut buf[..];
        let prev = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let value = match prev {
            Some(prev) => http::HeaderValue::try_from(format!("{prev}, {}", addr.ip())),
            None => {
                // An IPv6 address is at most 45 characters.
                let _ = write!(w, "{}", addr.ip());
                let n = 64 - w.len();
                http::HeaderValue::from_bytes(&buf[..n])
            }
        };
        let value =
            value.map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
        req.insert_header("x-forwarded-for", value)?;
    }
    req.insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
    Ok(())
}

/// Whether `name` must not cross the proxy.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Header names listed in `Connection`, which are hop-by-hop for this message only.
pub fn connection_nominated(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;

    fn forwarded(prev: Option<&str>, client: Option<&str>) -> (Option<String>, String) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(p) = prev {
            req.insert_header("x-forwarded-for", p).unwrap();
        }
        let client: Option<SocketAddr> = client.map(|c| c.parse().unwrap());
        add_forwarded(&mut req, client.as_ref()).unwrap();
        let get = |n: &str| req.headers.get(n).map(|v| v.to_str().unwrap().to_string());
        (get("x-forwarded-for"), get("x-forwarded-proto").unwrap())
    }

    #[test]
    fn client_address_is_appended_and_proto_set() {
        let v4 = "203.0.113.9:5000";
        let v6 = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:443";
        assert_eq!(forwarded(None, Some(v4)).0.unwrap(), "203.0.113.9");
        assert_eq!(
            forwarded(None, Some(v6)).0.unwrap(),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(
            forwarded(Some("10.0.0.1"), Some(v4)).0.unwrap(),
            "10.0.0.1, 203.0.113.9"
        );
        assert_eq!(forwarded(Some("10.0.0.1"), None).0.unwrap(), "10.0.0.1");
        assert_eq!(forwarded(None, None), (None, "http".to_string()));
    }
}
