//! The Pingora glue: the life of a request, top to bottom, in `request_filter`.
//!
//! 0. The head as idem treats it ([`crate::http::normalize`]: split cookies joined, an h2c
//!    upgrade offer dropped, the path in normal form), the peer and its trust, and the client
//!    address through trusted hops ([`crate::http::client_addr`]), all once. HTTP/1.1 pipelining is on:
//!    pipelined requests are answered one after the other, in order.
//! 1. Route (a path whose encoded slashes would change its route is refused) and admission
//!    from the head alone ([`crate::http::admission`]): pass-through requests return
//!    `Ok(false)` and take Pingora's streamed proxy path untouched.
//! 2. Read the whole body up to `max_body` within `body_read_timeout` and the client's share
//!    of the body budget ([`crate::http::body_budget`]), hashing it as it arrives
//!    ([`crate::http::body`]). A body that turns out too large is refused (key present) or
//!    forwarded by idem itself (never handed back to Pingora: it was consumed); broken
//!    framing is a 400.
//! 3. Derive scope, fingerprint and dedup key ([`crate::http::key_inputs`], [`crate::key`]).
//! 4. Join ([`crate::dedup::coordinator`]): the leader spawns the detached call
//!    ([`crate::dedup::leader`]), waiters wait, others are replayed or refused. Each ends in
//!    a [`Reply`].
//! 5. Write the reply ([`Idem::reply`], the one writer) and return `Ok(true)`.
//!
//! Metrics, the access log and the request's span are recorded once, in `logging`, from
//! what [`Ctx`] kept. Every request has an id from step 0 on
//! ([`crate::observe::request_id`]): sent upstream on every path (pass-through, a leader's
//! call, a body idem forwards itself) and returned on every answer; a waiter or a replay
//! also keeps the id (and span) of the request that led its call.
//!
//! Logs: a client that leaves is ordinary here. Its request's access line says so
//! (`status=499`, `client_left=true`) and Pingora's own error line for it is suppressed
//! (`suppress_error_log`); a pass-through that fails upstream gets one WARN naming the
//! backend; a retried attempt is a DEBUG line (`suppress_proxy_warn_log`). During a drain
//! (SIGTERM) every answer closes its HTTP/1 connection, so that keep-alive clients move to
//! another replica while the listeners still accept (`[server] shutdown_delay`).
//!
//! Each request takes the configuration snapshot in force when it starts ([`Ctx::config`])
//! and keeps it to its end, whatever a reload does meanwhile. Shadow routes take the
//! pass-through path; their key is hashed in `request_body_filter` as the body streams to the
//! backend, and the would-be leader's response settles the key in the response filters
//! ([`crate::dedup::shadow`]).

use crate::config::file::Mode;
use crate::config::live::{Live, Snapshot};
use crate::config::route::{RouteId, RoutePolicy};
use crate::config::settings::Settings;
use crate::dedup::coordinator::{Coordinator, JoinRequest, Joined};
use crate::dedup::leader::{self, LeaderReply, Plan};
use crate::dedup::shadow::request::{ShadowPolicy, ShadowRequest, Sinks};
use crate::dedup::shadow::table::ShadowTable;
use crate::http::admission::{admit, Admission, Bypass};
use crate::http::body::{self, BodyRead, Reading};
use crate::http::body_budget::{BodyBudget, BodyLimits, Over};
use crate::http::client_addr::{self, Peer};
use crate::http::forward;
use crate::http::framing;
use crate::http::key_inputs;
use crate::http::normalize;
use crate::http::pass_through::{self, Attempts};
use crate::http::problem::Problem;
use crate::http::reply::{self, Audience, Reply};
use crate::key::{DedupKey, KeyDeriver};
use crate::message::is_storable;
use crate::observe::access_log;
use crate::observe::metrics::{Answered, Lookup, Metrics};
use crate::observe::request_id::{Origin, RequestId, Source};
use crate::observe::trace::{RequestSpan, SpanEnd, Traces};
use crate::outcome::{Disposition, Refusal};
use crate::owner::{ClientId, Owner};
use crate::store::redis::{LeadRequest, RedisStore};
use crate::upstream::backends::Endpoint;
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The proxy: shared state for every request (cloned once, for the HTTP/1 and the h2c app).
#[derive(Clone)]
pub(crate) struct Idem {
    /// The configuration in force (swapped by a reload).
    pub(crate) config: Arc<Live>,
    /// Key derivation with the deployment secret.
    pub(crate) keys: KeyDeriver,
    /// Flights and the store.
    pub(crate) coordinator: Arc<Coordinator>,
    /// The upstream groups: `[upstream]` first, then `[upstreams.NAME]` in name order (a
    /// route's `upstream` indexes this).
    pub(crate) groups: Arc<[Arc<Upstream>]>,
    /// Metric families.
    pub(crate) metrics: Arc<Metrics>,
    /// Requests being processed, for the SIGTERM drain.
    pub(crate) active: Arc<AtomicUsize>,
    /// Keys seen on shadow routes.
    pub(crate) shadow: Arc<ShadowTable>,
    /// The Redis store shared by replicas (`store.kind = "redis"`); `None` with memory.
    pub(crate) redis: Option<Arc<RedisStore>>,
    /// Request bodies held in memory.
    pub(crate) body_budget: Arc<BodyBudget>,
    /// OpenTelemetry traces; `None` when off.
    pub(crate) traces: Option<Arc<Traces>>,
    /// Set by SIGTERM: answers close their connection.
    pub(crate) draining: Arc<AtomicBool>,
}

/// Per-request state.
pub(crate) struct Ctx {
    /// The configuration this request runs with, from start to end.
    pub(crate) config: Arc<Snapshot>,
    started: Instant,
    route: RouteId,
    /// The `outcome` label: set by admission for pass-through, by [`Idem::reply`] otherwise.
    answered: Answered,
    /// Pass-through on an eligible route: tag the response `fwd=bypass`.
    mark_bypass: bool,
    /// Pass-through: the attempts on backends and connections.
    attempts: Attempts,
    /// The route's upstream group (index into [`Idem::groups`]).
    group: usize,
    /// Short key hash for the access log.
    key: Option<DedupKey>,
    /// The status idem wrote itself, or the upstream's on pass-through; the access log's
    /// fallback when no response header went out.
    status: u16,
    /// Pass-through: when the first upstream peer was chosen.
    upstream_started: Option<Instant>,
    /// Access log: upstream latency to the response header (leaders and pass-through).
    upstream: Option<Duration>,
    /// Access log: waiters that received this leader's outcome.
    waiters_served: Option<usize>,
    /// Shadow route: the key being derived, then the would-be leader's state.
    shadow: Option<ShadowRequest>,
    /// The hop the request came from and whether it is trusted, for the forwarding headers.
    peer: Peer,
    /// The client address through trusted hops ([`client_addr`]): the access log's
    /// `client_addr`, and what per-client limits count.
    pub(crate) client: Option<IpAddr>,
    /// The request's id; `None` only before step 0.
    request_id: Option<RequestId>,
    /// idem made the id: it is added to the request forwarded upstream.
    request_id_generated: bool,
    /// Waiters and replays: the id of the request that led their call.
    leader_request_id: Option<RequestId>,
    /// The backend the request (or its leader's call) went to.
    upstream_endpoint: Option<Arc<Endpoint>>,
    /// The client went away before its answer was complete.
    client_left: bool,
    /// The request's server span, when traces are on; boxed: an SDK span is ~290 bytes,
    /// which every request's context (and the futures that move it) would carry.
    span: Option<Box<RequestSpan>>,
    _active: ActiveGuard,
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
        ctx.answered = Answered::Error;
        let client = ClientId::of(ctx.client);
        let reading = Reading {
            max_body: route.max_body,
            deadline: settings.body_read_timeout,
            lease: self.body_budget.lease(client),
            limits: BodyLimits {
                total: settings.max_body_buffer,
                per_client: settings.max_body_buffer_per_client,
            },
        };
        body::continue_if_expected(session).await?;
        let hasher = key_inputs::fingerprint(&self.keys, session.req_header(), route);
        let read = body::read(session, hasher, reading).await;
        let (body, fingerprint) = match read {
            Ok(BodyRead::Complete(body, fp)) => (body, fp),
            Ok(BodyRead::Refused(over)) => {
                // The rest of the body is left unread: this connection cannot carry another
                // request.
                session.set_keepalive(None);
                let p = match over {
                    Over::Client => Problem::ClientQuota,
                    Over::Total => Problem::BodyBufferFull,
                };
                return self.reply(session, ctx, p.into(), Audience::NOBODY).await;
            }
            Ok(BodyRead::Malformed(e)) => {
                // The client's mistake, not idem's nor a departure: a plain 400, and nothing
                // after it on this connection can be trusted to be a request.
                tracing::info!(error = %e, "request body framing malformed: 400");
                session.set_keepalive(None);
                let p = Problem::BadRequest.into();
                return self.reply(session, ctx, p, Audience::NOBODY).await;
            }
            Ok(BodyRead::TimedOut) => {
                return self
                    .reply(session, ctx, Problem::BodyTimeout.into(), Audience::NOBODY)
                    .await
            }
            Ok(BodyRead::TooLarge(prefix)) => {
                if idem_key.is_some() || route.mode == Mode::RequireKey {
                    let p = Problem::TooLarge.into();
                    return self.reply(session, ctx, p, Audience::NOBODY).await;
                }
                ctx.answered = Answered::TooLarge;
                // Boxed: a rare path with a large future (a whole upstream exchange) that would
                // otherwise size every deduplicated request's future, waiters' included.
                let tag = self.upstream_tag(ctx, settings);
                let forwarded = Box::pin(body::forward_consumed(
                    session,
                    &self.groups[ctx.group],
                    &self.metrics,
                    prefix,
                    ctx.peer,
                    &tag,
                    response_tag(ctx),
                ));
                ctx.status = forwarded.await?;
                return Ok(true);
            }
            Err(e) => {
                self.metrics.client_abort();
                ctx.client_left = true;
                return Err(e);
            }
        };
        let caller = key_inputs::caller(&self.keys, session.req_header(), route);
        let scope = caller.scope;
        let audience = Audience {
            identified: caller.identified,
            credentials: &route.credential_headers,
        };
        let key = match &idem_key {
            Some(k) => self.keys.keyed(&scope, k),
            None => self.keys.by_fingerprint(&scope, &fingerprint),
        };
        ctx.key = Some(key);
        let hold_for = settings.upstream.total_timeout;
        let origin = Origin {
            request_id: ctx.request_id.clone().unwrap_or_else(RequestId::generate),
            span: ctx.span.as_deref().map(RequestSpan::span_ref),
        };
        let joined = self.coordinator.join(JoinRequest {
            key,
            fingerprint,
            keyed: idem_key.is_some(),
            on_concurrent: route.on_concurrent,
            max_waiters_per_key: route.max_waiters_per_key,
            max_waiters_per_client: settings.max_waiters_per_client,
            hold_for,
            route: ctx.route,
            owner: Owner {
                scope: scope.id(),
                client,
            },
            origin: Some(&origin),
        });
        self.metrics.lookup(lookup_result(&joined));
        // Only a leader sends the body; everyone else lets go of it before waiting.
        let mut body = Some(body).filter(|_| matches!(joined, Joined::Leader(_)));
        let reply = match joined {
            Joined::Leader(permit) => {
                let body = body.take().unwrap_or_default();
                // Its client may leave before the answer: the request still led the call.
                ctx.answered = Answered::Leader;
                let mut request =
                    forward::upstream_request(session.req_header(), ctx.peer, body.len())?;
                if ctx.request_id_generated {
                    request.insert_header(
                        settings.request_id_header.clone(),
                        origin.request_id.header_value().clone(),
                    )?;
                }
                let trace = self
                    .traces
                    .clone()
                    .zip(ctx.span.as_deref().map(RequestSpan::context));
                let on_detached = self.on_detached(ctx, key);
                let plan = Plan {
                    request,
                    body,
                    store_statuses: route.store_statuses,
                    max_response_body: route.max_response_body,
                    retention: route.retention(idem_key.as_deref()),
                    deadline: tokio::time::Instant::now() + hold_for,
                    route: ctx.route,
                    shared: self.redis.as_ref().map(|store| leader::SharedPlan {
                        store: store.clone(),
                        request: LeadRequest {
                            key,
                            fingerprint,
                            keyed: idem_key.is_some(),
                            hold_for,
                            wait_timeout: route.wait_timeout,
                        },
                    }),
                    origin,
                    trace,
                    on_detached,
                };
                let reply = leader::spawn(
                    permit,
                    self.groups[ctx.group].clone(),
                    self.metrics.clone(),
                    plan,
                );
                let reply = tokio::select! {
                    r = reply => r,
                    e = client_gone(session) => {
                        ctx.client_left = true;
                        return Err(e);
                    }
                };
                match reply {
                    Ok((reply, report)) => {
                        ctx.upstream = Some(report.upstream);
                        ctx.waiters_served = Some(report.waiters_served);
                        ctx.upstream_endpoint = report.endpoint;
                        match reply {
                            LeaderReply::Settled(outcome, how) => Reply::settled(outcome, how),
                            LeaderReply::Stream { header, body } => Reply::Stream { header, body },
                        }
                    }
                    // The task died without a word: its permit held the key.
                    Err(_) => Reply::Problem(Problem::OutcomeUnknown {
                        status: 502,
                        retry_after: hold_for,
                    }),
                }
            }
            Joined::Waiter(waiter) => {
                ctx.answered = Answered::Collapsed;
                if let Some(o) = waiter.origin() {
                    ctx.follow(o);
                }
                let outcome = tokio::select! {
                    o = waiter.wait(route.wait_timeout) => o,
                    e = client_gone(session) => {
                        ctx.client_left = true;
                        return Err(e);
                    }
                };
                match outcome {
                    Some(o) => Reply::settled(o, Disposition::Collapsed),
                    None => Reply::Problem(Refusal::InProgress.into()),
                }
            }
            Joined::Replay { response, expires } => {
                if let Some(o) = &response.origin {
                    ctx.follow(o);
                }
                let ttl = expires
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs();
                Reply::Response {
                    response,
                    how: Disposition::Replay { ttl },
                }
            }
            Joined::Held(held) => Reply::Problem(Problem::outcome_unknown(held)),
            Joined::NotReplayable => Reply::Problem(Problem::NotReplayable),
            Joined::Refused(refusal) => Reply::Problem(refusal.into()),
        };
        self.reply(session, ctx, reply, audience).await
    }

    /// The one writer of idem's own answers: what the client may read, what it may not be
    /// shared, the status and the outcome all follow from `reply` ([`crate::http::reply`]).
    async fn reply(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reply: Reply,
        audience: Audience<'_>,
    ) -> Result<bool> {
        let reply = reply.for_client(session.req_header(), audience);
        if let Reply::Problem(p) = &reply {
            self.metrics.problem(p.kind());
        }
        let written = reply.written();
        ctx.status = written.status;
        ctx.answered = written.answered;
        let tag = response_tag(ctx);
        reply.write(session, audience, tag).await?;
        Ok(true)
    }

    /// What a request idem forwards itself carries besides the client's headers: the
    /// request id idem made, and the request span as the app's parent.
    fn upstream_tag(&self, ctx: &Ctx, settings: &Settings) -> Vec<(HeaderName, HeaderValue)> {
        let mut tag = Vec::new();
        if let (true, Some(id)) = (ctx.request_id_generated, &ctx.request_id) {
            tag.push((
                settings.request_id_header.clone(),
                id.header_value().clone(),
            ));
        }
        if let Some(span) = &ctx.span {
            tag.push((HeaderName::from_static("traceparent"), span.traceparent()));
        }
        tag
    }

    /// The access line of a leader's call that completes after its client left; `None`
    /// when access lines are off.
    fn on_detached(&self, ctx: &Ctx, key: DedupKey) -> Option<leader::OnDetached> {
        if !access_log::enabled() {
            return None;
        }
        let route = self.metrics.route_name(ctx.route);
        let request_id = ctx.request_id.clone()?;
        let started = ctx.started;
        Some(Box::new(
            move |reply: &LeaderReply, report: &leader::CallReport| {
                let status = match reply {
                    LeaderReply::Settled(outcome, how) => {
                        Reply::settled(outcome.clone(), *how).written().status
                    }
                    LeaderReply::Stream { header, .. } => header.status.as_u16(),
                };
                access_log::detached(&access_log::Detached {
                    route: &route,
                    request_id: &request_id,
                    key: &key,
                    status,
                    upstream_addr: report.endpoint.as_ref().map(|e| &e.peer._address),
                    took: started.elapsed(),
                    upstream: report.upstream,
                    waiters_served: report.waiters_served,
                });
            },
        ))
    }
}

impl Ctx {
    /// This request was answered from another's call (waiter, replay): name that one.
    fn follow(&mut self, origin: &Origin) {
        self.leader_request_id = Some(origin.request_id.clone());
        if let (Some(span), Some(leader)) = (&mut self.span, &origin.span) {
            span.link(leader);
        }
    }
}

/// The request id a response carries back, under the configured name.
fn response_tag(ctx: &Ctx) -> Option<(&HeaderName, &HeaderValue)> {
    ctx.request_id
        .as_ref()
        .map(|id| (&ctx.config.settings.request_id_header, id.header_value()))
}

/// The lookup a join amounts to, for `idem_store_operations_total{op="lookup"}`.
fn lookup_result(joined: &Joined) -> Lookup {
    match joined {
        Joined::Leader(_) => Lookup::Miss,
        // Refused for lack of room, like store-full (its own series would break the "every
        // series from start-up" set); the outcome tells them apart.
        Joined::Refused(Refusal::StoreFull | Refusal::ScopeQuota) => Lookup::Full,
        // A client over its share: of keys (no room for it) or of waiters (on a flight).
        Joined::Refused(Refusal::ClientQuota) => Lookup::Full,
        Joined::Waiter(_) | Joined::Refused(Refusal::InProgress | Refusal::TooManyWaiters) => {
            Lookup::Inflight
        }
        Joined::Replay { .. }
        | Joined::Held(_)
        | Joined::NotReplayable
        | Joined::Refused(Refusal::FingerprintMismatch | Refusal::StoreUnavailable) => Lookup::Hit,
    }
}

/// Resolves when the client goes away (H1 FIN/RST, H2 RST_STREAM): its wait ends, nothing else.
///
/// With pipelining on, bytes arriving here on an HTTP/1.1 connection are the next request,
/// not the client leaving: Pingora keeps them for that request and this stays pending (it
/// reads no further, so a client that leaves after pipelining is noticed only when its
/// answer is written, which then fails; the call it led or waited on is unaffected).
async fn client_gone(session: &mut Session) -> Box<Error> {
    match session.downstream_session.read_body_or_idle(true).await {
        Err(e) => e.into_down(),
        Ok(_) => Error::explain(ErrorType::ConnectionClosed, "client left").into_down(),
    }
}

#[async_trait]
impl ProxyHttp for Idem {
    type CTX = Ctx;

    /// No downstream modules: Pingora's default adds a compression module that is disabled
    /// and still costs three boxed futures per request (idem never compresses: stored
    /// bodies are identity, see docs/semantics.md, "Keys", content negotiation).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        self.active.fetch_add(1, Ordering::AcqRel);
        Ctx {
            config: self.config.load(),
            started: Instant::now(),
            route: RouteId(0),
            answered: Answered::Bypass,
            mark_bypass: false,
            attempts: Attempts::default(),
            group: 0,
            key: None,
            status: 0,
            upstream_started: None,
            upstream: None,
            waiters_served: None,
            shadow: None,
            peer: Peer::default(),
            client: None,
            request_id: None,
            request_id_generated: false,
            leader_request_id: None,
            upstream_endpoint: None,
            client_left: false,
            span: None,
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
        if self.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else if !session.is_process_shutting_down() && session.get_keepalive().is_some() {
            session.set_keepalive(Some(settings.keepalive_timeout.as_secs().max(1)));
        }
        // Requests pipelined on an HTTP/1.1 connection are read one after the other, each
        // once the previous one is answered (RFC 9112 9.3.2); without this, Pingora closes
        // the connection after the first and drops the rest. Carried to the connection's
        // next requests by Pingora; set on every request because it costs a store.
        session.set_pipelining_enabled(true);
        let req = session.req_header();
        let (id, source) = RequestId::of(&req.headers, &settings.request_id_header);
        ctx.request_id_generated = source == Source::Generated;
        ctx.request_id = Some(id);
        if let Some(traces) = &self.traces {
            let span = traces.request(req.method.as_str(), req.uri.path(), &req.headers);
            ctx.span = Some(Box::new(span));
        }
        normalize::request_head(session.req_header_mut()).map_err(|e| e.into_down())?;
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        ctx.peer = Peer::of(peer, &settings.trusted_proxies, tls);
        ctx.client = client_addr::client_addr(
            ctx.peer,
            session
                .req_header()
                .headers
                .get_all(forward::X_FORWARDED_FOR)
                .iter()
                .map(|v| v.as_bytes()),
            &settings.trusted_proxies,
        );
        let ambiguous = normalize::path(session.req_header_mut())?;
        let matched = config.route(session.req_header().uri.path());
        let route = matched.policy;
        ctx.route = matched.id;
        ctx.group = route.upstream;
        let req = session.req_header();
        let admission = match ambiguous {
            // The same route either way: nothing to decide.
            Some(other) if config.route(&other).id != matched.id => {
                tracing::info!(path = %req.uri.path(), "path refused: its encoded slashes would change its route");
                Admission::Refuse(Problem::BadPath)
            }
            _ => admit(route, &req.method, &req.headers),
        };
        match admission {
            Admission::PassThrough(bypass) => {
                ctx.mark_bypass = bypass != Bypass::Unmarked;
                if bypass == Bypass::TooLarge {
                    ctx.answered = Answered::TooLarge;
                }
                body::continue_if_expected(session).await?;
                Ok(false)
            }
            Admission::Refuse(p) => {
                // Read what small body there is, so that the connection lives on for the
                // client's next (maybe already pipelined) request; Pingora closes a
                // connection answered before its body was read.
                body::discard(session, route.max_body, settings.body_read_timeout).await;
                self.reply(session, ctx, p.into(), Audience::NOBODY).await
            }
            Admission::Dedup { key } => self.dedup(session, ctx, settings, route, key).await,
            // Forwarded like a pass-through (unmarked); the key is hashed as the body streams.
            Admission::Shadow { key } => {
                let req = session.req_header();
                let policy = ShadowPolicy {
                    max_body: route.max_body,
                    retention: route.retention(key.as_deref()),
                    store_statuses: route.store_statuses,
                    max_response_body: route.max_response_body,
                    hold_for: settings.upstream.total_timeout,
                };
                ctx.shadow = Some(ShadowRequest::new(
                    key_inputs::fingerprint(&self.keys, req, route),
                    key_inputs::caller(&self.keys, req, route).scope,
                    key,
                    policy,
                ));
                body::continue_if_expected(session).await?;
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
        if let (true, Some(shadow)) = (ctx.attempts.is_retry(), &mut ctx.shadow) {
            let req = session.req_header();
            let route = ctx.config.route(req.uri.path()).policy;
            shadow.restart(key_inputs::fingerprint(&self.keys, req, route));
        }
        let peer = ctx.attempts.next_peer(&self.groups[ctx.group], session)?;
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.attempts.connected(reused, fd);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.attempts
            .connect_failed(&self.groups[ctx.group], &self.metrics, &mut e);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        ctx.attempts
            .failed(session, &self.metrics, &mut e, client_reused);
        e
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        // A retry is expected (a pooled connection the backend had closed, a backend that
        // refused): counted per backend and logged at debug by idem instead.
        if context == ProxyWarnLogContext::UpstreamRetry {
            let next = if ctx.attempts.retrying_on_new_connection() {
                "on a new connection"
            } else {
                "on the next backend"
            };
            tracing::debug!(
                request_id = ctx.request_id.as_ref().map(RequestId::as_str),
                backend = ctx.attempts.current().map(|b| b.label.as_str()),
                error = %error,
                "pass-through attempt failed; trying again {next}"
            );
        }
        true
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // idem writes its own line for every final error (`fail_to_proxy`) and the access
        // line says how the request ended.
        true
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let Some(problem) = pass_through::problem(e) else {
            ctx.client_left = true;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if problem.is_upstream() {
            tracing::warn!(
                request_id = ctx.request_id.as_ref().map(RequestId::as_str),
                backend = ctx.attempts.current().map(|b| b.label.as_str()),
                error = %e,
                "pass-through failed: {}",
                problem.kind()
            );
        }
        let status = problem.status();
        if session.response_written().is_none() {
            ctx.answered = Answered::Error;
            ctx.status = status;
            self.metrics.problem(problem.kind());
            // The connection may hold the rest of a body nobody read.
            session.set_keepalive(None);
            if let Err(err) = Reply::Problem(problem)
                .write(session, Audience::NOBODY, response_tag(ctx))
                .await
            {
                tracing::debug!(error = %err, "could not write the error answer: the client is gone");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // idem answered any `100-continue` itself (`body::continue_if_expected`).
        upstream_request.remove_header(&header::EXPECT);
        forward::set_forwarding_headers(upstream_request, ctx.peer)?;
        if let (true, Some(id)) = (ctx.request_id_generated, &ctx.request_id) {
            upstream_request.insert_header(
                ctx.config.settings.request_id_header.clone(),
                id.header_value().clone(),
            )?;
        }
        if let Some(span) = &ctx.span {
            upstream_request.insert_header("traceparent", span.traceparent())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        framing::apply(session, resp);
        ctx.status = resp.status.as_u16();
        ctx.upstream = ctx.upstream_started.map(|t| t.elapsed());
        ctx.attempts.answered(&self.metrics, ctx.status);
        ctx.upstream_endpoint = ctx.attempts.current().cloned();
        if let Some((name, id)) = response_tag(ctx) {
            // Replaces what the app sent under that name (apps that echo it send the same).
            resp.insert_header(name.clone(), id.clone())?;
        }
        if ctx.mark_bypass {
            reply::append_cache_status(resp, reply::CACHE_STATUS_BYPASS)?;
        }
        if let Some(shadow) = &mut ctx.shadow {
            if !resp.status.is_informational() {
                let h2 = ctx.attempts.is_h2();
                shadow.response_header(resp.status.as_u16(), is_storable(resp, h2));
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
        if e.is_none() {
            ctx.attempts.finished();
        }
        if let Some(shadow) = &mut ctx.shadow {
            shadow.finish(&self.shadow, e);
        }
        let took = ctx.started.elapsed();
        // The client left unless something told the client how the request ended.
        ctx.client_left |= e.is_some_and(|e| pass_through::problem(e).is_none());
        let answered = session.response_written().map(|h| h.status.as_u16());
        self.metrics
            .request(ctx.route, ctx.answered, answered, took);
        if !access_log::enabled() && ctx.span.is_none() {
            return;
        }
        let route = self.metrics.route_name(ctx.route);
        access_log::write(
            session,
            e,
            &access_log::Entry {
                route: &route,
                client: ctx.client,
                log_query: ctx.config.settings.log_query,
                fallback_status: ctx.status,
                answered: ctx.answered,
                request_id: ctx.request_id.as_ref(),
                leader_request_id: ctx.leader_request_id.as_ref(),
                key: ctx.key.as_ref(),
                upstream_addr: ctx.upstream_endpoint.as_ref().map(|e| &e.peer._address),
                took,
                upstream: ctx.upstream,
                waiters_served: ctx.waiters_served,
                client_left: ctx.client_left,
            },
        );
        if let Some(span) = ctx.span.take() {
            let key = ctx.key.as_ref().map(DedupKey::short);
            span.end(&SpanEnd {
                method: session.req_header().method.as_str(),
                route: &route,
                outcome: ctx.answered.as_str(),
                status: answered,
                request_id: ctx.request_id.as_ref().map_or("-", RequestId::as_str),
                leader_request_id: ctx.leader_request_id.as_ref().map(RequestId::as_str),
                key: key.as_deref(),
                client: ctx.client,
                client_left: ctx.client_left,
            });
        }
    }
}
