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
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::{health_check, selection::RoundRobin, Backend, LoadBalancer};
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::net::SocketAddr;
use std::sync::Arc;

/// Why a call produced no response.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallError {
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

/// The backend pool: round robin over health-checked backends, one connection pool.
pub(crate) struct Upstream {
    lb: Arc<LoadBalancer<RoundRobin>>,
    connector: Connector,
    settings: UpstreamSettings,
}

/// Builds the load balancer with its health check; the caller runs it as a background service.
pub(crate) fn load_balancer(
    settings: &UpstreamSettings,
) -> std::io::Result<LoadBalancer<RoundRobin>> {
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
    pub(crate) fn new(
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
    pub(crate) fn peer(&self, backend: &Backend) -> HttpPeer {
        let mut peer = HttpPeer::new(backend.addr.clone(), false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
        peer.options.write_timeout = Some(self.settings.read_timeout);
        peer.options.idle_timeout = Some(self.settings.pool_idle_timeout);
        peer
    }

    /// The next backend not in `tried`: healthy ones first, then any (a health check may lag
    /// behind a backend that just came back).
    pub(crate) fn select(&self, tried: &[SocketAddr]) -> Option<Backend> {
        let untried = |b: &Backend| b.addr.as_inet().map(|a| !tried.contains(a)).unwrap_or(true);
        let n = self.settings.backends.len() * 2 + 1;
        self.lb
            .select_with(b"", n, |b, healthy| healthy && untried(b))
            .or_else(|| self.lb.select_with(b"", n, |b, _| untried(b)))
    }

    /// Number of configured backends.
    pub(crate) fn backend_count(&self) -> usize {
        self.settings.backends.len()
    }

    /// Whether any backend currently passes its health check.
    pub(crate) fn any_healthy(&self) -> bool {
        self.lb.select(b"", self.backend_count() * 2 + 1).is_some()
    }

    /// Sends `req` with `body` and reads the response header, trying each backend once when
    /// nothing was sent. The caller bounds the whole call with the total deadline.
    ///
    /// # Cancel safety
    /// Dropping the future closes the upstream connection; whatever was sent stays sent, so the
    /// caller must treat a cancelled call as outcome unknown.
    pub(crate) async fn send(
        &self,
        req: &RequestHeader,
        body: &Bytes,
    ) -> Result<Exchange, CallError> {
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

    /// A connection to any backend, for a pass-through idem performs itself (see
    /// `http::body::forward_consumed`): no retry, not deduplicated.
    pub(crate) async fn connect_any(&self) -> pingora::Result<(ClientSession, HttpPeer)> {
        let backend = self
            .select(&[])
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no backend"))?;
        let peer = self.peer(&backend);
        let (session, _reused) = self.connector.get_http_session(&peer).await?;
        Ok((session, peer))
    }

    /// Returns a connection from [`Upstream::connect_any`], fully read, to the pool.
    pub(crate) async fn release_session(&self, session: ClientSession, peer: &HttpPeer) {
        self.connector
            .release_http_session(session, peer, peer.options.idle_timeout)
            .await;
    }

    /// Returns a fully read connection to the pool.
    pub(crate) async fn release(&self, ex: Exchange) {
        let Exchange { session, peer, .. } = ex;
        self.connector
            .release_http_session(session, &peer, peer.options.idle_timeout)
            .await;
    }
}

/// An upstream exchange whose response header has arrived.
pub(crate) struct Exchange {
    session: ClientSession,
    peer: HttpPeer,
    backend: Backend,
}

impl Exchange {
    /// The response header.
    pub(crate) fn header(&self) -> &ResponseHeader {
        self.session
            .response_header()
            .expect("read_final_header succeeded")
    }

    /// The next body chunk; `Ok(None)` at the end.
    pub(crate) async fn read_body(&mut self) -> Result<Option<Bytes>, CallError> {
        match self.session.read_response_body().await {
            Ok(b) => Ok(b),
            Err(e) => Err(unknown(&self.backend, &e)),
        }
    }

    /// Closes the connection without returning it to the pool.
    pub(crate) async fn abort(mut self) {
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

/// Reads the response header, skipping 1xx (HTTP/1 only).
pub(crate) async fn read_final_header(s: &mut ClientSession) -> pingora::Result<()> {
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
