//! The leader's upstream call, detached from its client.
//!
//! [`spawn`] runs the call in its own task that owns the [`LeaderPermit`]: whatever the
//! leader's client does (times out, disconnects, resets), the call runs to completion within
//! the upstream total deadline, its outcome is settled for waiters and later retries, and a
//! connection fully read goes back to the pool. The leader's client gets its answer through
//! a oneshot channel; if that client is gone the send fails and the completion is counted
//! as detached.
//!
//! With the Redis store ([`crate::store::redis`]) the task first takes the shared step: it
//! claims the key across replicas, or answers from what another replica stored or is
//! running, before any upstream call; its outcome is then written over the claim (fenced)
//! before it is settled locally, so a local client never sees a response that another
//! replica could still miss because of a write still on its way.
//!
//! Responses that cannot be stored (over `max_response_body`, `text/event-stream`, gRPC or
//! declared trailers over HTTP/1) are streamed to the leader's client and read to the end regardless; the key settles as
//! not-replayable as soon as that is known, so waiters are answered at once.
//!
//! Every path through the call ends in one place, [`run`]'s settle-then-deliver: the rule
//! that outranks convenience (never a second call while the first may run) is enforced by
//! what is settled there, so it is written once.
//!
//! The call is traced as a child of the leader's request span when traces are on (its
//! `traceparent` goes upstream), and its stored response keeps the leader's [`Origin`] for
//! the replays that name it. When the leader's client has left by the time the outcome is
//! known, the plan's `on_detached` writes the access line that says how the call ended.

use crate::config::route::{RouteId, StatusSet};
use crate::dedup::coordinator::LeaderPermit;
use crate::key::DedupKey;
use crate::message::{is_storable, stored_response, stream_header, BodyBuf};
use crate::observe::metrics::Metrics;
use crate::observe::request_id::Origin;
use crate::observe::trace::Traces;
use crate::outcome::{Disposition, Held, Outcome, Retention};
use crate::store::redis::{Claimed, Lead, LeadRequest, RedisStore};
use crate::upstream::backends::Endpoint;
use crate::upstream::{CallError, Exchange, Upstream};
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};

/// Everything the detached call needs, owned.
pub(crate) struct Plan {
    /// The request as sent upstream.
    pub(crate) request: RequestHeader,
    /// The complete request body; taken by the call, which drops it once written upstream.
    pub(crate) body: Bytes,
    /// Statuses kept for replay.
    pub(crate) store_statuses: StatusSet,
    /// Largest body kept for replay.
    pub(crate) max_response_body: u64,
    /// Retention of the record.
    pub(crate) retention: Retention,
    /// The total deadline of the call.
    pub(crate) deadline: Instant,
    /// Route, for metrics.
    pub(crate) route: RouteId,
    /// The Redis store's step (with `store.kind = "redis"`), `None` with the memory store.
    pub(crate) shared: Option<SharedPlan>,
    /// The leading request, kept with its stored response.
    pub(crate) origin: Origin,
    /// Traces on: the tracer and the leader's request span, the parent of the call's.
    pub(crate) trace: Option<(Arc<Traces>, opentelemetry::trace::SpanContext)>,
    /// What to do when the outcome is known and the leader's client has left (the access
    /// line of a detached completion); `None` when nothing is to be done.
    pub(crate) on_detached: Option<OnDetached>,
}

/// Called with the reply nobody received and the call's report.
pub(crate) type OnDetached = Box<dyn FnOnce(&LeaderReply, &CallReport) + Send + Sync>;

/// What the shared step needs (Redis mode).
pub(crate) struct SharedPlan {
    /// The Redis store.
    pub(crate) store: Arc<RedisStore>,
    /// The key, its fingerprint and the deadlines.
    pub(crate) request: LeadRequest,
}

/// What the leader's own client receives.
pub(crate) enum LeaderReply {
    /// The settled outcome; a response is answered as `how` says (the leader's own, or, from
    /// the Redis store, another replica's as collapsed or a stored one as a replay).
    Settled(Outcome, Disposition),
    /// A response streamed through, not replayable: write `header`, then every chunk.
    Stream {
        /// Response header, hop-by-hop fields removed.
        header: Box<ResponseHeader>,
        /// Body chunks.
        body: mpsc::Receiver<Chunk>,
    },
}

/// A piece of a streamed response body.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// The next bytes.
    Data(Bytes),
    /// The trailers after the last bytes (an HTTP/2 response: gRPC's status).
    Trailers(Box<http::HeaderMap>),
    /// The upstream body was cut off: the client connection must be aborted, so the client
    /// sees a truncated response, never a complete one.
    CutOff,
}

/// What the access log reports about the call, delivered with the leader's reply.
#[derive(Clone)]
pub(crate) struct CallReport {
    /// From the start of the call to its response header (or to its failure).
    pub(crate) upstream: Duration,
    /// Waiters attached when the outcome was settled: they receive it too.
    pub(crate) waiters_served: usize,
    /// The backend that answered (`None` when none did).
    pub(crate) endpoint: Option<Arc<Endpoint>>,
}

/// Starts the detached call; the returned receiver yields the leader client's answer.
pub(crate) fn spawn(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    plan: Plan,
) -> oneshot::Receiver<(LeaderReply, CallReport)> {
    let (tx, rx) = oneshot::channel();
    // Boxed: the task then holds a pointer, not the whole state machine (Pingora's connector
    // futures make it several KiB), which tokio would otherwise copy on every stage change.
    tokio::spawn(Box::pin(run(permit, upstream, metrics, plan, tx)));
    rx
}

/// The local permit, plus the shared claim when this replica holds one: settling writes the
/// outcome over the claim first.
struct Leader {
    permit: LeaderPermit,
    claim: Option<(Arc<RedisStore>, Claimed)>,
}

impl Leader {
    async fn settle(self, outcome: Outcome, retention: Retention) -> usize {
        let mut shared = None;
        if let Some((store, claim)) = &self.claim {
            shared = store.settle(claim, &outcome, retention).await;
        }
        self.permit.settle(outcome, retention, shared)
    }
}

/// How the call ended, before it is settled.
enum Called {
    /// A complete response or why there is none.
    Settled(Outcome),
    /// A response that cannot be stored: the rest of its body streams to the leader's client.
    Stream {
        header: Box<ResponseHeader>,
        /// The body read before that was known.
        read: Bytes,
        /// Boxed: the rare variant, much larger than the other.
        exchange: Box<Exchange>,
    },
}

async fn run(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    mut plan: Plan,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
) {
    let mut leader = Leader {
        permit,
        claim: None,
    };
    if let Some(shared) = plan.shared.take() {
        match shared.store.lead(shared.request).await {
            Lead::Call(claim) => leader.claim = claim.map(|c| (shared.store, c)),
            Lead::Answer(a) => {
                let served = leader.permit.settle(a.outcome.clone(), a.retention, None);
                let report = CallReport {
                    upstream: Duration::ZERO,
                    waiters_served: served,
                    endpoint: None,
                };
                let r = LeaderReply::Settled(a.outcome, a.how);
                deliver(&metrics, &mut plan, reply, r, report);
                return;
            }
        }
    }
    let key = leader.permit.key();
    let started = std::time::Instant::now();
    let span = plan.trace.as_ref().map(|(traces, parent)| {
        let span = traces.call(parent, plan.request.method.as_str());
        // The app's spans hang below the call's, whatever the client sent.
        let _ = plan
            .request
            .insert_header("traceparent", span.traceparent());
        span
    });
    let hold = |status| leader.permit.hold(status);
    let body = std::mem::take(&mut plan.body);
    // Boxed so that `run` stays small (see `spawn`).
    let (called, took, endpoint) =
        Box::pin(call(&upstream, &metrics, &plan, body, key, hold, started)).await;
    if let Some(span) = span {
        let status = match &called {
            Called::Settled(Outcome::Response { response, .. }) => Some(response.status),
            Called::Stream { header, .. } => Some(header.status.as_u16()),
            Called::Settled(Outcome::Unknown(h)) if endpoint.is_some() => Some(h.status),
            Called::Settled(_) => None,
        };
        span.end(endpoint.as_ref().map(|e| e.label.clone()), status);
    }
    let report = |waiters_served| CallReport {
        upstream: took,
        waiters_served,
        endpoint: endpoint.clone(),
    };
    match called {
        Called::Settled(outcome) => {
            let how = Disposition::Leader {
                stored: matches!(outcome, Outcome::Response { stored: true, .. }),
            };
            let served = leader.settle(outcome.clone(), plan.retention).await;
            let r = LeaderReply::Settled(outcome, how);
            deliver(&metrics, &mut plan, reply, r, report(served));
        }
        Called::Stream {
            header,
            read,
            exchange,
        } => {
            let status = header.status.as_u16();
            tracing::info!(
                key = %key.short(),
                status,
                "response not replayable: streaming it to the leader only"
            );
            // Waiters and later requests are answered now; the leader's client gets the
            // stream; the body is read to the end whether or not anyone still listens.
            let served = leader.settle(Outcome::NotReplayable, plan.retention).await;
            let (tx, rx) = mpsc::channel(16);
            let r = LeaderReply::Stream { header, body: rx };
            deliver(&metrics, &mut plan, reply, r, report(served));
            if !read.is_empty() {
                let _ = tx.send(Chunk::Data(read)).await;
            }
            pump(&upstream, *exchange, &plan, key, tx).await;
        }
    }
}

/// Makes the call and reads what it returns, up to the point where its outcome is known.
/// Returns it with the time to the response header (or to the failure) and the backend
/// that answered.
async fn call(
    upstream: &Upstream,
    metrics: &Metrics,
    plan: &Plan,
    body: Bytes,
    key: DedupKey,
    hold: impl Fn(u16) -> Held,
    started: std::time::Instant,
) -> (Called, Duration, Option<Arc<Endpoint>>) {
    let key = key.short();
    let request_id = plan.origin.request_id.as_str();
    let sent = timeout_at(plan.deadline, upstream.send(&plan.request, body)).await;
    let mut ex = match sent {
        Ok(Ok(exchange)) => exchange,
        Ok(Err(CallError::NotSent(reason))) => {
            tracing::warn!(key, request_id, %reason, "upstream unreachable: request not sent, key freed");
            metrics.upstream_failed(plan.route, started.elapsed());
            return (
                Called::Settled(Outcome::Unreachable),
                started.elapsed(),
                None,
            );
        }
        Ok(Err(CallError::Unknown { status, reason })) => {
            tracing::warn!(key, request_id, status, %reason, "upstream outcome unknown: key held");
            metrics.upstream_failed(plan.route, started.elapsed());
            return (
                Called::Settled(Outcome::Unknown(hold(status))),
                started.elapsed(),
                None,
            );
        }
        Err(_elapsed) => {
            tracing::warn!(
                key,
                request_id,
                "upstream deadline passed before the response header: key held"
            );
            metrics.upstream_failed(plan.route, started.elapsed());
            return (
                Called::Settled(Outcome::Unknown(hold(504))),
                started.elapsed(),
                None,
            );
        }
    };
    let endpoint = Some(ex.endpoint().clone());
    let took = started.elapsed();
    let status = ex.header().status.as_u16();
    metrics.upstream_answered(plan.route, status, took);
    // A gateway behind idem gave up while the app may still run the request.
    if status == 502 || status == 504 {
        tracing::warn!(
            key,
            status,
            "upstream answered {status}: outcome unknown, key held"
        );
        ex.abort().await;
        return (
            Called::Settled(Outcome::Unknown(hold(status))),
            took,
            endpoint,
        );
    }
    let declared = ex
        .header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = BodyBuf::with_hint(0);
    if is_storable(ex.header(), ex.is_h2()) && declared.is_none_or(|n| n <= plan.max_response_body)
    {
        loop {
            let held = match timeout_at(plan.deadline, ex.read_body()).await {
                Ok(Ok(Some(chunk))) => {
                    let over = (body.len() + chunk.len()) as u64 > plan.max_response_body;
                    body.push(chunk);
                    if over {
                        break;
                    }
                    continue;
                }
                Ok(Ok(None)) => {
                    // gRPC's status comes after the body: a call whose trailers are cut off
                    // has no outcome to replay.
                    // Boxed and HTTP/2 only: the rare path must not size the common one.
                    let trailers = if !ex.is_h2() {
                        Ok(Ok(None))
                    } else {
                        Box::pin(timeout_at(plan.deadline, ex.read_trailers())).await
                    };
                    let trailers = match trailers {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::warn!(key, error = %e, "upstream trailers cut off: key held");
                            ex.abort().await;
                            return (Called::Settled(Outcome::Unknown(hold(502))), took, endpoint);
                        }
                        Err(_elapsed) => {
                            tracing::warn!(
                                key,
                                "upstream deadline passed while reading the trailers: key held"
                            );
                            ex.abort().await;
                            return (Called::Settled(Outcome::Unknown(hold(504))), took, endpoint);
                        }
                    };
                    let mut response =
                        stored_response(ex.header(), body.freeze(), trailers.as_ref());
                    response.origin = Some(plan.origin.clone());
                    let response = Arc::new(response);
                    let stored = plan.store_statuses.contains(status);
                    upstream.release(ex).await;
                    let o = Outcome::Response { response, stored };
                    return (Called::Settled(o), took, endpoint);
                }
                Ok(Err(e)) => {
                    tracing::warn!(key, error = %e, "upstream response cut off: key held");
                    hold(502)
                }
                Err(_elapsed) => {
                    tracing::warn!(
                        key,
                        "upstream deadline passed while reading the body: key held"
                    );
                    hold(504)
                }
            };
            ex.abort().await;
            return (Called::Settled(Outcome::Unknown(held)), took, endpoint);
        }
    }
    let header = Box::new(stream_header(ex.header()));
    let read = body.freeze();
    (
        Called::Stream {
            header,
            read,
            exchange: Box::new(ex),
        },
        took,
        endpoint,
    )
}

/// Streams the rest of a not-replayable response to the leader's client, reading it to the
/// end whether or not the client still listens (the call completes regardless).
async fn pump(
    upstream: &Upstream,
    mut ex: Exchange,
    plan: &Plan,
    key: DedupKey,
    tx: mpsc::Sender<Chunk>,
) {
    loop {
        match timeout_at(plan.deadline, ex.read_body()).await {
            Ok(Ok(Some(chunk))) => {
                let _ = tx.send(Chunk::Data(chunk)).await;
            }
            Ok(Ok(None)) => {
                let trailers = if !ex.is_h2() {
                    Ok(Ok(None))
                } else {
                    Box::pin(timeout_at(plan.deadline, ex.read_trailers())).await
                };
                match trailers {
                    Ok(Ok(trailers)) => {
                        if let Some(t) = trailers {
                            let _ = tx.send(Chunk::Trailers(Box::new(t))).await;
                        }
                        upstream.release(ex).await;
                    }
                    Ok(Err(_)) | Err(_) => {
                        tracing::warn!(key = %key.short(), "streamed upstream response cut off before its trailers");
                        let _ = tx.send(Chunk::CutOff).await;
                        ex.abort().await;
                    }
                }
                return;
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(key = %key.short(), "streamed upstream response cut off");
                let _ = tx.send(Chunk::CutOff).await;
                ex.abort().await;
                return;
            }
        }
    }
}

fn deliver(
    metrics: &Metrics,
    plan: &mut Plan,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
    r: LeaderReply,
    report: CallReport,
) {
    if let Err((r, report)) = reply.send((r, report)) {
        // The leader's client left before the answer: the reason idem exists.
        metrics.detached_completion(plan.route);
        if let Some(f) = plan.on_detached.take() {
            f(&r, &report);
        }
    }
}
