//! The Pingora glue: the life of a request, top to bottom, in `request_filter`.
//!
//! 1. Route and admission from the head alone ([`crate::http::admission`]): pass-through requests
//!    return `Ok(false)` and take Pingora's streamed proxy path untouched.
//! 2. Read the whole body up to `max_body` within `body_read_timeout`, hashing it as it
//!    arrives. A body that turns out too large is refused (key present) or forwarded by idem
//!    itself (never handed back to Pingora: it was consumed).
//! 3. Derive scope, fingerprint and dedup key ([`crate::key`]).
//! 4. Join ([`crate::dedup::coordinator`]): the leader spawns the detached call ([`crate::dedup::leader`]),
//!    waiters wait, others are replayed or refused.
//! 5. Write the answer ([`crate::http::reply`]) and return `Ok(true)`.
//!
//! Metrics and the access log are recorded once, in `logging`, from the outcome kept in
//! [`Ctx`].
//!
//! Each request takes the configuration snapshot in force when it starts ([`Ctx::config`])
//! and keeps it to its end, whatever a reload does meanwhile. Shadow routes take the
//! pass-through path; their key is hashed in `request_body_filter` as the body streams to the
//! backend, and the would-be leader's response settles the key in the response filters
//! ([`crate::dedup::shadow::table`]).

use crate::config::file::Mode;
use crate::config::live::{Live, Snapshot};
use crate::config::settings::{RoutePolicy, Settings};
use crate::dedup::coordinator::{Coordinator, JoinRequest, Joined, Outcome, Retention};
use crate::dedup::leader::{self, LeaderReply, Plan};
use crate::dedup::shadow::request::{ShadowPolicy, ShadowRequest, Sinks};
use crate::dedup::shadow::table::ShadowTable;
use crate::http::admission::{admit, Admission};
use crate::http::problem::Problem;
use crate::http::reply::{self, Disposition};
use crate::key::{DedupKey, Fingerprint, FingerprintHasher, KeyDeriver, Scope};
use crate::observe::metrics::{self, Metrics, RouteId};
use crate::upstream::{self, Upstream};
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The proxy: shared state for every request (cloned once, for the HTTP/1 and the h2c app).
#[derive(Clone)]
pub struct Idem {
    /// The configuration in force (swapped by a reload).
    pub config: Arc<Live>,
    /// Key derivation with the deployment secret.
    pub keys: KeyDeriver,
    /// Flights and the store.
    pub coordinator: Arc<Coordinator>,
    /// Backends and the connection pool for detached calls.
    pub upstream: Arc<Upstream>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Requests being processed, for the SIGTERM drain.
    pub active: Arc<AtomicUsize>,
    /// Keys seen on shadow routes.
    pub shadow: Arc<ShadowTable>,
    /// The Redis store shared by replicas (`store.kind = "redis"`); `None` with memory.
    pub shared: Option<Arc<crate::store::redis::Shared>>,
}

/// Per-request state.
pub struct Ctx {
    /// The configuration this request runs with, from start to end.
    pub config: Arc<Snapshot>,
    started: Instant,
    route: RouteId,
    outcome: metrics::Outcome,
    /// Pass-through on an eligible route: tag the response `fwd=bypass`.
    mark_bypass: bool,
    /// Backends already tried by the pass-through path.
    tried: Vec<SocketAddr>,
    /// Short key hash for the access log.
    key: Option<DedupKey>,
    status: u16,
    /// Pass-through: when the first upstream peer was chosen.
    upstream_started: Option<Instant>,
    /// Access log: upstream latency to the response header (leaders and pass-through).
    upstream: Option<Duration>,
    /// Access log: waiters that received this leader's outcome.
    waiters_served: Option<usize>,
    /// Shadow route: the key being derived, then the would-be leader's state.
    shadow: Option<ShadowRequest>,
    _active: ActiveGuard,
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Result of reading a request body that idem buffers.
enum BodyRead {
    Complete(Bytes, Fingerprint),
    TooLarge(Bytes),
    TimedOut,
}

impl Idem {
    /// Steps 2 to 5 for a request admitted to dedup.
    async fn dedup(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        settings: &Settings,
        route: &RoutePolicy,
        idem_key: Option<Vec<u8>>,
    ) -> Result<bool> {
        // Until an answer is chosen, a request that ends here (its client left during the
        // upload) is an error, not a bypass: it was admitted to dedup.
        ctx.outcome = metrics::Outcome::Error;
        if is_expect_continue(session.req_header()) {
            session.downstream_session.write_continue_response().await?;
        }
        let body = match self.read_body(session, settings, route).await? {
            BodyRead::Complete(body, fp) => (body, fp),
            BodyRead::TimedOut => return self.problem(session, ctx, Problem::BodyTimeout).await,
            BodyRead::TooLarge(prefix) => {
                if idem_key.is_some() || route.mode == Mode::RequireKey {
                    return self.problem(session, ctx, Problem::TooLarge).await;
                }
                ctx.outcome = metrics::Outcome::TooLarge;
                // Boxed: a rare path with a large future (a whole upstream exchange) that would
                // otherwise size every deduplicated request's future, waiters' included.
                return Box::pin(self.forward_consumed(session, ctx, prefix)).await;
            }
        };
        let (body, fingerprint) = body;
        let scope = self.scope(session.req_header(), route);
        let key = match &idem_key {
            Some(k) => self.keys.keyed(&scope, k),
            None => self.keys.by_fingerprint(&scope, &fingerprint),
        };
        ctx.key = Some(key);
        let joined = self.coordinator.join(JoinRequest {
            key,
            fingerprint,
            keyed: idem_key.is_some(),
            reject_concurrent: route.on_concurrent == crate::config::file::OnConcurrent::Reject,
            max_waiters_per_key: route.max_waiters_per_key,
            hold_for: settings.upstream.total_timeout,
            route: ctx.route,
            scope: scope.id(),
        });
        self.metrics.store_op(
            "lookup",
            match &joined {
                Joined::Leader(_) => "miss",
                Joined::StoreFull => "full",
                // Refused for lack of room, like store-full (its own series would break the
                // "every series from start-up" set); the outcome tells them apart.
                Joined::ScopeQuota => "full",
                Joined::Waiter(_) | Joined::InProgress | Joined::TooManyWaiters => "inflight",
                _ => "hit",
            },
        );
        let retention = Retention {
            ttl: if idem_key.is_some() {
                route.ttl
            } else {
                route.fingerprint_ttl
            },
        };
        match joined {
            Joined::Leader(permit) => {
                ctx.outcome = metrics::Outcome::Leader;
                let request = upstream::upstream_request(
                    session.req_header(),
                    session.client_addr().and_then(|a| a.as_inet()),
                    body.len(),
                )?;
                let plan = Plan {
                    request,
                    body,
                    store_statuses: route.store_statuses,
                    max_response_body: route.max_response_body,
                    retention,
                    deadline: tokio::time::Instant::now() + settings.upstream.total_timeout,
                    route: ctx.route,
                    shared: self.shared.as_ref().map(|store| leader::SharedPlan {
                        store: store.clone(),
                        request: crate::store::redis::LeadRequest {
                            key,
                            fingerprint,
                            keyed: idem_key.is_some(),
                            hold_for: settings.upstream.total_timeout,
                            wait_timeout: route.wait_timeout,
                        },
                    }),
                };
                let reply =
                    leader::spawn(permit, self.upstream.clone(), self.metrics.clone(), plan);
                let reply = tokio::select! {
                    r = reply => r,
                    e = client_gone(session) => return Err(e),
                };
                let reply = reply.map(|(reply, report)| {
                    ctx.upstream = Some(report.upstream);
                    ctx.waiters_served = Some(report.waiters_served);
                    reply
                });
                match reply {
                    Ok(LeaderReply::Outcome(o)) => {
                        self.answer(session, ctx, o, true, scope.anonymous).await
                    }
                    Ok(LeaderReply::Shared {
                        outcome,
                        replay_ttl,
                    }) => {
                        self.answer_shared(session, ctx, outcome, replay_ttl, scope.anonymous)
                            .await
                    }
                    Ok(stream @ LeaderReply::Stream { .. }) => {
                        ctx.status = 200;
                        reply::write_stream(session, stream).await?;
                        Ok(true)
                    }
                    // The task died without a word: its permit held the key.
                    Err(_) => {
                        let p = Problem::OutcomeUnknown {
                            status: 502,
                            retry_after: settings.upstream.total_timeout,
                        };
                        self.problem(session, ctx, p).await
                    }
                }
            }
            Joined::Waiter(waiter) => {
                ctx.outcome = metrics::Outcome::Collapsed;
                let outcome = tokio::select! {
                    o = waiter.wait(route.wait_timeout) => o,
                    e = client_gone(session) => return Err(e),
                };
                match outcome {
                    Some(o) => self.answer(session, ctx, o, false, scope.anonymous).await,
                    None => {
                        let p = Problem::InProgress {
                            retry_after: Duration::from_secs(1),
                        };
                        self.problem(session, ctx, p).await
                    }
                }
            }
            Joined::Replay { response, .. }
                if !reply::readable_by(
                    &response,
                    session.req_header().headers.get(header::ACCEPT_ENCODING),
                ) =>
            {
                self.problem(session, ctx, Problem::NotAcceptable).await
            }
            Joined::Replay { response, expires } => {
                ctx.outcome = metrics::Outcome::Replayed;
                ctx.status = response.status;
                let ttl = expires
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs();
                reply::write_stored(
                    session,
                    &response,
                    Disposition::Replay { ttl },
                    scope.anonymous,
                )
                .await?;
                Ok(true)
            }
            Joined::Held(h) => {
                let p = Problem::OutcomeUnknown {
                    status: h.status,
                    retry_after: h
                        .until
                        .saturating_duration_since(tokio::time::Instant::now()),
                };
                self.problem(session, ctx, p).await
            }
            Joined::NotReplayable => self.problem(session, ctx, Problem::NotReplayable).await,
            Joined::Mismatch => {
                self.problem(session, ctx, Problem::FingerprintMismatch)
                    .await
            }
            Joined::InProgress => {
                let p = Problem::InProgress {
                    retry_after: Duration::from_secs(1),
                };
                self.problem(session, ctx, p).await
            }
            Joined::StoreFull => self.problem(session, ctx, Problem::StoreFull).await,
            Joined::ScopeQuota => self.problem(session, ctx, Problem::ScopeQuota).await,
            Joined::TooManyWaiters => self.problem(session, ctx, Problem::TooManyWaiters).await,
        }
    }

    /// Writes a settled outcome to the leader (`leader`) or a waiter.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        outcome: Outcome,
        leader: bool,
        anonymous: bool,
    ) -> Result<bool> {
        match outcome {
            Outcome::Response { response, .. }
                if !leader
                    && !reply::readable_by(
                        &response,
                        session.req_header().headers.get(header::ACCEPT_ENCODING),
                    ) =>
            {
                self.problem(session, ctx, Problem::NotAcceptable).await
            }
            Outcome::Response { response, stored } => {
                ctx.status = response.status;
                let how = if leader {
                    Disposition::Leader { stored }
                } else {
                    Disposition::Collapsed
                };
                reply::write_stored(session, &response, how, anonymous).await?;
                Ok(true)
            }
            Outcome::Unknown(h) => {
                let p = Problem::OutcomeUnknown {
                    status: h.status,
                    retry_after: h
                        .until
                        .saturating_duration_since(tokio::time::Instant::now()),
                };
                self.problem(session, ctx, p).await
            }
            Outcome::NotReplayable => self.problem(session, ctx, Problem::NotReplayable).await,
            Outcome::Unreachable => {
                self.problem(session, ctx, Problem::UpstreamUnreachable)
                    .await
            }
            Outcome::Refused(p) => self.problem(session, ctx, p).await,
        }
    }

    /// Writes to a leader's client what the shared store answered: a replay of another
    /// replica's stored response, another replica's outcome (as a collapsed waiter would
    /// get it), or a problem.
    async fn answer_shared(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        outcome: Outcome,
        replay_ttl: Option<u64>,
        anonymous: bool,
    ) -> Result<bool> {
        match (outcome, replay_ttl) {
            (Outcome::Response { response, .. }, Some(ttl))
                if reply::readable_by(
                    &response,
                    session.req_header().headers.get(header::ACCEPT_ENCODING),
                ) =>
            {
                ctx.outcome = metrics::Outcome::Replayed;
                ctx.status = response.status;
                reply::write_stored(session, &response, Disposition::Replay { ttl }, anonymous)
                    .await?;
                Ok(true)
            }
            (outcome, _) => {
                if matches!(outcome, Outcome::Response { .. }) {
                    ctx.outcome = metrics::Outcome::Collapsed;
                }
                self.answer(session, ctx, outcome, false, anonymous).await
            }
        }
    }

    async fn problem(&self, session: &mut Session, ctx: &mut Ctx, p: Problem) -> Result<bool> {
        ctx.status = p.status();
        ctx.outcome = match p {
            Problem::MissingKey | Problem::KeyMalformed(_) => metrics::Outcome::MissingKey,
            Problem::FingerprintMismatch => metrics::Outcome::Mismatch,
            Problem::InProgress { .. } => metrics::Outcome::Conflict,
            Problem::OutcomeUnknown { .. } => metrics::Outcome::OutcomeUnknown,
            Problem::NotReplayable => metrics::Outcome::NotReplayable,
            Problem::TooLarge => metrics::Outcome::TooLarge,
            Problem::BodyTimeout
            | Problem::NotAcceptable
            | Problem::StoreFull
            | Problem::StoreUnavailable
            | Problem::ScopeQuota
            | Problem::TooManyWaiters
            | Problem::UpstreamUnreachable
            | Problem::Internal => metrics::Outcome::Error,
        };
        reply::write_problem(session, p).await?;
        Ok(true)
    }

    /// The scope of a request: its authority and the route's scope headers.
    fn scope(&self, req: &RequestHeader, route: &RoutePolicy) -> Scope {
        let authority = req
            .headers
            .get(header::HOST)
            .map(|v| v.as_bytes())
            .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
            .unwrap_or_default();
        self.keys.scope(
            authority,
            route.scope_headers.iter().map(|h| {
                req.headers
                    .get_all(h.as_str())
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect()
            }),
        )
    }

    /// A fingerprint of the request head, ready for the body.
    fn fingerprint_hasher(&self, req: &RequestHeader, route: &RoutePolicy) -> FingerprintHasher {
        self.keys.fingerprint(
            req.method.as_str().as_bytes(),
            req.uri.path().as_bytes(),
            req.uri.query().unwrap_or("").as_bytes(),
            route.fingerprint_headers.iter().map(|h| {
                (
                    h.as_str(),
                    req.headers
                        .get_all(h.as_str())
                        .iter()
                        .map(|v| v.as_bytes())
                        .collect(),
                )
            }),
        )
    }

    /// Reads the body up to `max_body` within the body deadline, hashing it on the way.
    async fn read_body(
        &self,
        session: &mut Session,
        settings: &Settings,
        route: &RoutePolicy,
    ) -> Result<BodyRead> {
        let req = session.req_header();
        let mut hasher = self.fingerprint_hasher(req, route);
        let expected = crate::http::admission::declared_length(&req.headers).unwrap_or(0);
        let mut buf = leader::BodyBuf::with_hint(expected.min(route.max_body) as usize);
        let deadline = tokio::time::Instant::now() + settings.body_read_timeout;
        loop {
            let chunk = match tokio::time::timeout_at(deadline, session.read_request_body()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.metrics.client_abort();
                    return Err(e);
                }
                Err(_) => return Ok(BodyRead::TimedOut),
            };
            let Some(chunk) = chunk else { break };
            // Kept without a copy when the body arrives in one chunk.
            if (buf.len() + chunk.len()) as u64 > route.max_body {
                buf.push(chunk);
                return Ok(BodyRead::TooLarge(buf.freeze()));
            }
            hasher.update(&chunk);
            buf.push(chunk);
        }
        Ok(BodyRead::Complete(buf.freeze(), hasher.finish()))
    }

    /// Forwards a request whose body idem already started reading (a keyless chunked body
    /// over `max_body` on a fingerprint route): it is not deduplicated, and Pingora cannot
    /// take it back, so idem streams it through itself.
    async fn forward_consumed(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        prefix: Bytes,
    ) -> Result<bool> {
        let status = self.upstream.forward_streaming(session, prefix).await?;
        ctx.status = status;
        Ok(true)
    }
}

/// Resolves when the client goes away (H1 FIN/RST, H2 RST_STREAM): its wait ends, nothing else.
async fn client_gone(session: &mut Session) -> Box<Error> {
    match session.downstream_session.read_body_or_idle(true).await {
        Err(e) => e.into_down(),
        Ok(_) => Error::explain(ErrorType::ConnectionClosed, "client left").into_down(),
    }
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

#[async_trait]
impl ProxyHttp for Idem {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.active.fetch_add(1, Ordering::AcqRel);
        Ctx {
            config: self.config.load(),
            started: Instant::now(),
            route: RouteId(0),
            outcome: metrics::Outcome::Bypass,
            mark_bypass: false,
            tried: Vec::new(),
            key: None,
            status: 0,
            upstream_started: None,
            upstream: None,
            waiters_served: None,
            shadow: None,
            _active: ActiveGuard(self.active.clone()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Pingora has no idle timeout on keep-alive header reads; during shutdown it turns
        // keep-alive off, which must not be undone here. Nor may a connection Pingora has
        // already condemned be revived: `Connection: close`, HTTP/1.0 without keep-alive,
        // and above all `Content-Length` together with `Transfer-Encoding`, after which the
        // connection MUST close (RFC 9112 6.1: what follows the body may be a smuggled
        // request in the eyes of a proxy in front of idem).
        let config = ctx.config.clone();
        let settings = &config.settings;
        if !session.is_process_shutting_down() && session.get_keepalive().is_some() {
            session.set_keepalive(Some(settings.keepalive_timeout.as_secs().max(1)));
        }
        let matched = config.route(session.req_header().uri.path());
        let route = matched.policy;
        ctx.route = matched.id;
        let req = session.req_header();
        match admit(route, &req.method, &req.headers) {
            Admission::PassThrough { mark, too_large } => {
                ctx.mark_bypass = mark;
                ctx.outcome = if too_large {
                    metrics::Outcome::TooLarge
                } else {
                    metrics::Outcome::Bypass
                };
                // Pingora forwards `Expect` and relays only an origin's own `100 Continue`;
                // many app servers never send one, so client and origin would wait for each
                // other. idem answers it itself (as nginx and Envoy do) and strips `Expect`
                // upstream (`upstream_request_filter`).
                if is_expect_continue(session.req_header()) {
                    session.downstream_session.write_continue_response().await?;
                }
                Ok(false)
            }
            Admission::Refuse(p) => self.problem(session, ctx, p).await,
            Admission::Dedup { key } => self.dedup(session, ctx, settings, route, key).await,
            // Forwarded like a pass-through (unmarked); the key is hashed as the body streams.
            Admission::Shadow { key } => {
                let req = session.req_header();
                let policy = ShadowPolicy {
                    max_body: route.max_body,
                    retention: if key.is_some() {
                        route.ttl
                    } else {
                        route.fingerprint_ttl
                    },
                    store_statuses: route.store_statuses,
                    max_response_body: route.max_response_body,
                    hold_for: settings.upstream.total_timeout,
                };
                ctx.shadow = Some(ShadowRequest::new(
                    self.fingerprint_hasher(req, route),
                    self.scope(req, route),
                    key,
                    policy,
                ));
                if is_expect_continue(session.req_header()) {
                    session.downstream_session.write_continue_response().await?;
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(shadow) = &mut ctx.shadow {
            let sinks = Sinks {
                table: &self.shadow,
                keys: &self.keys,
                metrics: &self.metrics,
                route: ctx.route,
            };
            if let Some(key) = shadow.body(body.as_deref(), end_of_stream, &sinks) {
                ctx.key = Some(key);
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // A retry re-sends the body from the start (Pingora's retry buffer): hash it afresh.
        let retry = !ctx.tried.is_empty();
        if let (true, Some(shadow)) = (retry, &mut ctx.shadow) {
            let req = session.req_header();
            shadow.restart(self.fingerprint_hasher(req, ctx.config.route(req.uri.path()).policy));
        }
        let backend = self
            .upstream
            .select(&ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no backend left to try"))?;
        if let Some(a) = backend.addr.as_inet() {
            ctx.tried.push(*a);
        }
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(Box::new(self.upstream.peer(&backend)))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend: another one may take it.
        if ctx.tried.len() < self.upstream.backend_count() {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // idem answered any `100-continue` itself (see `request_filter`).
        upstream_request.remove_header(&header::EXPECT);
        upstream::add_forwarded(
            upstream_request,
            session.client_addr().and_then(|a| a.as_inet()),
        )
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.status = resp.status.as_u16();
        ctx.upstream = ctx.upstream_started.map(|t| t.elapsed());
        if ctx.mark_bypass {
            reply::append_cache_status(resp, reply::CACHE_STATUS_BYPASS)?;
        }
        if let Some(shadow) = &mut ctx.shadow {
            if !resp.status.is_informational() {
                shadow.response_header(resp.status.as_u16(), leader::is_storable(resp));
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(shadow) = &mut ctx.shadow {
            let len = body.as_ref().map_or(0, |b| b.len());
            shadow.response_body(len, end_of_stream, &self.shadow);
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(shadow) = &mut ctx.shadow {
            shadow.finish(&self.shadow, e);
        }
        let took = ctx.started.elapsed();
        self.metrics.request(ctx.route, ctx.outcome, took);
        crate::observe::access_log::write(
            session,
            e,
            &crate::observe::access_log::Entry {
                format: ctx.config.settings.log_format,
                metrics: &self.metrics,
                route: ctx.route,
                fallback_status: ctx.status,
                outcome: ctx.outcome,
                key: ctx.key.as_ref(),
                took,
                upstream: ctx.upstream,
                waiters_served: ctx.waiters_served,
            },
        );
    }
}
