//! The backends and the connections to them: for calls idem makes itself (leaders, bodies it
//! forwards), and the peers it hands Pingora's proxy path for pass-through. `https://`
//! backends get TLS peers ([`tls`]): the handshake is part of the connect, so its failure
//! is a connect failure (nothing sent).
//!
//! Failure classes follow DESIGN section 4 and decide whether a key may be freed:
//! * [`CallError::NotSent`]: no backend received a complete request (connect refused or timed
//!   out, or the connection failed while the request was still being written). The next
//!   backend is tried; when all fail the key is freed.
//! * [`CallError::Unknown`]: the complete request was written, then the connection reset,
//!   closed or timed out. The app may be running it: the key must be held.
//!
//! Connection reuse ([`reuse`]): a request that must not be lost (a leader's, a
//! non-idempotent pass-through) goes out on a pooled connection only when its backend has
//! shown it keeps connections that long; otherwise on a new one. A request that may be sent
//! again (idempotent method) uses any pooled connection, and if that one fails before any
//! response byte it is retried once on a new connection to the same backend, before any
//! other backend (`http::proxy`, `error_while_proxy`). A failed write on a reused
//! connection is a request that never arrived: retried on a new connection too. An EOF while
//! waiting for the response header is *not* retried: Pingora calls it `ReusedOnly`, but
//! the app may have run the request.

pub(crate) mod backends;
mod h2;
mod pool;
pub(crate) mod reuse;
mod tls;

use crate::config::file::Protocol;
use crate::config::settings::UpstreamSettings;
use crate::observe::metrics::Metrics;
use backends::{Backends, Endpoint};
use bytes::Bytes;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::protocols::http::v1::client::HttpSession as H1Session;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use reuse::{keep_alive_timeout, Learned, PROBATION};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Whether a pass-through request may be sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// An idempotent method: any pooled connection; retried on a new one if it fails
    /// before any response byte.
    Allowed,
    /// It must not be lost: a pooled connection only within its backend's reuse window.
    Forbidden,
    /// The retry after a pooled connection failed: a new connection.
    OnNewConnection,
}

/// Pingora's pool is keyed by peer, group key included: requests that must not be lost
/// pool apart from the others, so they never take a connection older than their window.
/// Each thread pools apart too (`group + 2 * thread shard`): a connection is reused on the
/// thread whose reactor its socket is registered with, where its idle watcher also runs
/// (patches/pingora-core/0001); taken by another thread, each of its events would be a
/// cross-thread wake-up.
const GROUP_ANY_AGE: u64 = 0;
const GROUP_WITHIN_WINDOW: u64 = 1;
/// Group keys from here up are used once each: a new connection.
const GROUP_NEW: u64 = 1 << 63;

/// The backends, health checked, and the connections to them.
pub(crate) struct Upstream {
    backends: Arc<Backends>,
    connector: Arc<TransportConnector>,
    settings: UpstreamSettings,
    new_groups: AtomicU64,
    /// Per-backend calls (`idem_backend_*`), for the calls idem makes itself.
    metrics: Arc<Metrics>,
    /// HTTP/2 connections for idem's own calls (multiplexed; see [`h2`]).
    h2: pingora::connectors::http::v2::Connector,
}

impl Upstream {
    /// Resolves the backends (blocking: before serving) and prepares the connector.
    /// `first_backend`: the metrics index of this group's first configured backend (the
    /// groups' backends are numbered one after the other, `[upstream]`'s first).
    pub(crate) fn new(
        settings: &UpstreamSettings,
        conf: &ServerConf,
        metrics: Arc<Metrics>,
        first_backend: usize,
    ) -> Upstream {
        Upstream {
            metrics,
            backends: Backends::resolve(settings, first_backend),
            connector: Arc::new(TransportConnector::new(Some(
                ConnectorOptions::from_server_conf(conf),
            ))),
            settings: settings.clone(),
            new_groups: AtomicU64::new(GROUP_NEW),
            h2: pingora::connectors::http::v2::Connector::new(Some(
                ConnectorOptions::from_server_conf(conf),
            )),
        }
    }

    /// Whether `req` goes to this group's backends over HTTP/2 (`protocol`: always with
    /// `h2c`, never with `http1`, for gRPC requests with `auto`).
    pub(crate) fn speaks_h2(&self, req: &RequestHeader) -> bool {
        match self.settings.protocol {
            Protocol::Http1 => false,
            Protocol::H2c => true,
            Protocol::Auto => h2::is_grpc(req),
        }
    }

    /// Resolves names again and checks health, forever (run as a background task).
    pub(crate) async fn maintain(&self) {
        self.backends.clone().maintain(self.connector.clone()).await
    }

    /// The next backend not in `tried` (endpoint ids).
    pub(crate) fn select(&self, tried: &[u64]) -> Option<Arc<Endpoint>> {
        self.backends.select(tried)
    }

    /// Number of backend endpoints now.
    pub(crate) fn endpoint_count(&self) -> usize {
        self.backends.len()
    }

    /// Whether any backend passed its last health check.
    pub(crate) fn any_healthy(&self) -> bool {
        self.backends.any_up()
    }

    /// Every backend endpoint now.
    pub(crate) fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.backends.endpoints()
    }

    /// The peer Pingora's proxy path connects to for a pass-through request to `e` (see
    /// [`Resend`] and the module doc).
    pub(crate) fn pass_through_peer(&self, e: &Endpoint, resend: Resend, h2: bool) -> HttpPeer {
        let now = Instant::now();
        let cap = self.settings.pool_idle_timeout;
        let mut peer = e.peer.clone();
        if h2 {
            // One multiplexed connection per backend, kept idle up to the cap: what a
            // stream may be refused for is said by the protocol (see [`h2`]).
            return h2::peer(peer, cap);
        }
        let pooled = match resend {
            // A backend known to close after responses: pooling would only make retries.
            Resend::Allowed => Some((GROUP_ANY_AGE, e.reuse.keep_for(cap, now)))
                .filter(|(_, keep)| *keep >= PROBATION.min(cap)),
            Resend::Forbidden => Some((GROUP_WITHIN_WINDOW, e.reuse.window(cap, now)))
                .filter(|(_, window)| !window.is_zero()),
            Resend::OnNewConnection => None,
        };
        // A group used once is never looked up again: its connection is closed as soon as
        // it is released.
        let (group, idle) = match pooled {
            Some((group, idle)) => (group + 2 * pool::shard() as u64, idle),
            None => (self.new_group(), Duration::ZERO),
        };
        peer.group_key = group;
        peer.options.idle_timeout = Some(idle);
        peer
    }

    fn new_group(&self) -> u64 {
        self.new_groups.fetch_add(1, Ordering::Relaxed)
    }

    /// A connection to `e` for a request that must not be lost: a pooled one within the
    /// backend's reuse window, else a new one.
    async fn connect(&self, e: &Endpoint, fresh: bool) -> pingora::Result<Conn> {
        if !fresh {
            let window = e
                .reuse
                .window(self.settings.pool_idle_timeout, Instant::now());
            if let Some((stream, idle)) = e.pool.take(window).await {
                let session = ClientSession::H1(H1Session::new_with_options(stream, &e.peer));
                return Ok(Conn {
                    session,
                    idle: Some(idle),
                });
            }
        }
        // Boxed: with TLS compiled in, Pingora's connect future carries a whole handshake,
        // and inline it would size every call's future (tokio copies it on each state
        // change; +10 k instructions per leader call, measured).
        let stream = Box::pin(self.connector.new_stream(&e.peer)).await?;
        let session = ClientSession::H1(H1Session::new_with_options(stream, &e.peer));
        Ok(Conn {
            session,
            idle: None,
        })
    }

    /// Sends `req` with `body` and reads the response header, trying each backend once when
    /// nothing was sent. The caller bounds the whole call with the total deadline. The body is
    /// dropped as soon as it has been written: the answer may take minutes.
    ///
    /// # Cancel safety
    /// Dropping the future closes the upstream connection; whatever was sent stays sent, so the
    /// caller must treat a cancelled call as outcome unknown.
    pub(crate) async fn send(
        &self,
        req: &RequestHeader,
        body: Bytes,
    ) -> Result<Exchange, CallError> {
        if self.speaks_h2(req) {
            // Boxed: Pingora's h2 connector futures are large, and inline they would size
            // every HTTP/1 call's future too (copied by tokio on every state change).
            return Box::pin(self.send_h2(req, body)).await;
        }
        let mut tried: Vec<u64> = Vec::new();
        let mut last = String::from("no backend resolves");
        // A pooled connection that failed during the write: the same backend again, new.
        let mut again: Option<Arc<Endpoint>> = None;
        loop {
            let fresh = again.is_some();
            let Some(e) = again.take().or_else(|| self.select(&tried)) else {
                break;
            };
            let started = Instant::now();
            let mut conn = match self.connect(&e, fresh).await {
                Ok(c) => c,
                Err(err) => {
                    self.metrics.backend_failed(e.backend, started.elapsed());
                    last = format!("{}: {}", e.label, err);
                    tried.push(e.id);
                    continue;
                }
            };
            conn.session
                .set_read_timeout(Some(self.settings.read_timeout));
            conn.session
                .set_write_timeout(Some(self.settings.read_timeout));
            if let Err(err) = write_request(&mut conn.session, req, &body).await {
                last = format!("{}: {}", e.label, err);
                conn.session.shutdown().await;
                match conn.idle {
                    // The backend had closed it: nothing reached the app.
                    Some(idle) => {
                        self.learned(&e, e.reuse.closed(idle, Instant::now()));
                        again = Some(e);
                    }
                    None => {
                        self.metrics.backend_failed(e.backend, started.elapsed());
                        tried.push(e.id);
                    }
                }
                continue;
            }
            // From here on the app may have the complete request.
            drop(body);
            if let Err(err) = read_final_header(&mut conn.session).await {
                self.metrics.backend_failed(e.backend, started.elapsed());
                conn.session.shutdown().await;
                if let Some(idle) = conn.idle {
                    tracing::warn!(
                        backend = %e.label,
                        idle_ms = idle.as_millis() as u64,
                        "a pooled connection within the backend's reuse window failed after the request was sent"
                    );
                    self.learned(&e, e.reuse.closed(idle, Instant::now()));
                }
                return Err(unknown(&e, &err));
            }
            let status = conn
                .session
                .response_header()
                .map_or(0, |h| h.status.as_u16());
            self.metrics
                .backend_answered(e.backend, status, started.elapsed());
            return Ok(Exchange {
                session: conn.session,
                endpoint: e,
                h2_peer: None,
            });
        }
        Err(CallError::NotSent(last))
    }

    /// A connection to any backend for a pass-through idem performs itself (a body it
    /// already consumed, `http::body::forward_consumed`): it must not be lost.
    pub(crate) async fn connect_any(&self) -> pingora::Result<(ClientSession, Arc<Endpoint>)> {
        let e = self
            .select(&[])
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no backend resolves"))?;
        let conn = self.connect(&e, false).await?;
        Ok((conn.session, e))
    }

    /// Returns a connection whose response was read to the end to `e`'s pool, if the backend
    /// keeps it and is worth keeping it for.
    pub(crate) async fn release_session(&self, session: ClientSession, e: &Arc<Endpoint>) {
        let ClientSession::H1(mut h1) = session else {
            return;
        };
        h1.respect_keepalive();
        if let Some(t) = h1
            .resp_header()
            .and_then(|h| h.headers.get("keep-alive"))
            .and_then(|v| keep_alive_timeout(v.as_bytes()))
        {
            e.reuse.hint(t);
        }
        let keep_for = e
            .reuse
            .keep_for(self.settings.pool_idle_timeout, Instant::now());
        let Some(stream) = h1.reuse().await else {
            return;
        };
        // A backend known to close after responses: nothing to keep, nothing to learn.
        if keep_for < PROBATION.min(self.settings.pool_idle_timeout) {
            return;
        }
        let label = e.label.clone();
        e.pool.put(stream, keep_for, e.reuse.clone(), move |l| {
            log_learned(&label, l)
        });
    }

    /// Returns a fully read exchange's connection to its pool.
    pub(crate) async fn release(&self, ex: Exchange) {
        let Exchange {
            session,
            endpoint,
            h2_peer,
        } = ex;
        match (session, h2_peer) {
            (ClientSession::H2(s), Some(peer)) => {
                self.h2
                    .release_http_session(s, &*peer, Some(self.settings.pool_idle_timeout))
            }
            (session, _) => self.release_session(session, &endpoint).await,
        }
    }

    fn learned(&self, e: &Endpoint, l: Learned) {
        log_learned(&e.label, l);
    }
}

/// One log line when a backend's reuse rule changes.
pub(crate) fn log_learned(backend: &str, l: Learned) {
    match l {
        Learned::Nothing => {}
        Learned::ClosesAfterResponses => tracing::info!(
            backend,
            "backend closes connections right after its responses without saying so: requests that must not be lost get a new connection each"
        ),
        Learned::ClosesIdleAfter(d) => tracing::info!(
            backend,
            "backend closes idle connections after {} without saying so: idle connections to it are kept at most half that",
            humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
        ),
        Learned::KeepsConnections => {
            tracing::debug!(backend, "backend keeps connections: pooled ones may carry any request")
        }
    }
}

/// A connection for one call, and how long it was idle if it came from the pool.
struct Conn {
    session: ClientSession,
    idle: Option<Duration>,
}

/// An upstream exchange whose response header has arrived.
pub(crate) struct Exchange {
    session: ClientSession,
    endpoint: Arc<Endpoint>,
    /// The peer of an HTTP/2 exchange, whose connection returns to the h2 pool by it.
    h2_peer: Option<Box<HttpPeer>>,
}

impl Exchange {
    /// The backend that answered.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

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
            Err(e) => Err(unknown(&self.endpoint, &e)),
        }
    }

    /// The trailers after the body (HTTP/2 only; `None` over HTTP/1 or when there are none).
    pub(crate) async fn read_trailers(&mut self) -> Result<Option<http::HeaderMap>, CallError> {
        match &mut self.session {
            ClientSession::H2(s) => s
                .read_trailers()
                .await
                .map_err(|e| unknown(&self.endpoint, &e)),
            _ => Ok(None),
        }
    }

    /// Whether the exchange is HTTP/2 (its trailers can be read and kept).
    pub(crate) fn is_h2(&self) -> bool {
        matches!(self.session, ClientSession::H2(_))
    }

    /// Closes the connection (an HTTP/2 stream: resets it) without returning it to the pool.
    pub(crate) async fn abort(mut self) {
        self.session.shutdown().await;
    }
}

pub(super) async fn write_request(
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

pub(super) fn unknown(e: &Endpoint, err: &Error) -> CallError {
    let status = match err.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
        _ => 502,
    };
    CallError::Unknown {
        status,
        reason: format!("{}: {err}", e.label),
    }
}
