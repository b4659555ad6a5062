//! The leader's upstream call, detached from its client.
//!
//! [`spawn`] runs the call in its own task that owns the [`LeaderPermit`]: whatever the
//! leader's client does (times out, disconnects, resets), the call runs to completion within
//! the upstream total deadline, its outcome is settled for waiters and later retries, and a
//! connection fully read goes back to the pool. The leader's client gets its answer through
//! a oneshot channel; if that client is gone the send fails and the completion is counted
//! as detached.
//!
//! Responses that cannot be stored (over `max_response_body`, `text/event-stream`, gRPC)
//! are streamed to the leader's client and read to the end regardless; the key settles as
//! not-replayable as soon as that is known, so waiters are answered at once.

use crate::inflight::{LeaderPermit, Outcome, Retention};
use crate::metrics::{Metrics, RouteId};
use crate::settings::StatusSet;
use crate::store::StoredResponse;
use crate::upstream::{is_hop_by_hop, CallError, Exchange, Upstream};
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};

/// Everything the detached call needs, owned.
pub struct Plan {
    /// The request as sent upstream.
    pub request: RequestHeader,
    /// The complete request body.
    pub body: Bytes,
    /// Statuses kept for replay.
    pub store_statuses: StatusSet,
    /// Largest body kept for replay.
    pub max_response_body: u64,
    /// Retention of the record.
    pub retention: Retention,
    /// The total deadline of the call.
    pub deadline: Instant,
    /// Route, for metrics.
    pub route: RouteId,
}

/// What the leader's own client receives.
pub enum LeaderReply {
    /// The settled outcome (a complete response, or why there is none).
    Outcome(Outcome),
    /// A response streamed through: write `header`, then every chunk; an `Err` chunk means
    /// the upstream body was cut off and the client connection must be aborted.
    Stream {
        /// Response header, hop-by-hop fields removed.
        header: Box<ResponseHeader>,
        /// Body chunks.
        body: mpsc::Receiver<Result<Bytes, ()>>,
    },
}

/// What the access log reports about the call, delivered with the leader's reply.
#[derive(Debug, Clone, Copy)]
pub struct CallReport {
    /// From the start of the call to its response header (or to its failure).
    pub upstream: Duration,
    /// Waiters attached when the outcome was settled: they receive it too.
    pub waiters_served: usize,
}

/// Starts the detached call; the returned receiver yields the leader client's answer.
pub fn spawn(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    plan: Plan,
) -> oneshot::Receiver<(LeaderReply, CallReport)> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(run(permit, upstream, metrics, plan, tx));
    rx
}

async fn run(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    plan: Plan,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
) {
    let started = std::time::Instant::now();
    let key = permit.key().short();
    let sent = timeout_at(plan.deadline, upstream.send(&plan.request, &plan.body)).await;
    let failure = match sent {
        Ok(Ok(exchange)) => {
            return finish(permit, upstream, metrics, plan, reply, exchange, started).await;
        }
        Ok(Err(CallError::NotSent(reason))) => {
            tracing::warn!(key, %reason, "upstream unreachable: request not sent, key freed");
            Outcome::Unreachable
        }
        Ok(Err(CallError::Unknown { status, reason })) => {
            tracing::warn!(key, status, %reason, "upstream outcome unknown: key held");
            Outcome::Unknown(permit.hold(status))
        }
        Err(_elapsed) => {
            tracing::warn!(
                key,
                "upstream deadline passed before the response header: key held"
            );
            Outcome::Unknown(permit.hold(504))
        }
    };
    let took = started.elapsed();
    metrics.upstream_failed(plan.route, took);
    let served = permit.settle(failure.clone(), plan.retention);
    let report = CallReport {
        upstream: took,
        waiters_served: served,
    };
    deliver(
        &metrics,
        plan.route,
        reply,
        LeaderReply::Outcome(failure),
        report,
    );
}

/// Reads the response once its header has arrived, and settles.
async fn finish(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    plan: Plan,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
    mut ex: Exchange,
    started: std::time::Instant,
) {
    let key = permit.key().short();
    let status = ex.header().status.as_u16();
    let took = started.elapsed();
    metrics.upstream_answered(plan.route, status, took);
    let report = |waiters_served| CallReport {
        upstream: took,
        waiters_served,
    };
    // A gateway behind idem gave up while the app may still run the request.
    if status == 502 || status == 504 {
        tracing::warn!(
            key,
            status,
            "upstream answered {status}: outcome unknown, key held"
        );
        ex.abort().await;
        let o = Outcome::Unknown(permit.hold(status));
        let served = permit.settle(o.clone(), plan.retention);
        let r = report(served);
        deliver(&metrics, plan.route, reply, LeaderReply::Outcome(o), r);
        return;
    }
    let declared = ex
        .header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = BytesMut::new();
    let storable = is_storable(ex.header()) && declared.is_none_or(|n| n <= plan.max_response_body);
    if storable {
        loop {
            match timeout_at(plan.deadline, ex.read_body()).await {
                Ok(Ok(Some(chunk))) => {
                    if (body.len() + chunk.len()) as u64 > plan.max_response_body {
                        body.extend_from_slice(&chunk);
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Ok(None)) => {
                    let response = Arc::new(stored_response(ex.header(), body.freeze()));
                    let stored = plan.store_statuses.contains(status);
                    upstream.release(ex).await;
                    let o = Outcome::Response { response, stored };
                    let served = permit.settle(o.clone(), plan.retention);
                    let r = report(served);
                    deliver(&metrics, plan.route, reply, LeaderReply::Outcome(o), r);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(key, error = %e, "upstream response cut off: key held");
                    ex.abort().await;
                    let o = Outcome::Unknown(permit.hold(502));
                    let served = permit.settle(o.clone(), plan.retention);
                    let r = report(served);
                    deliver(&metrics, plan.route, reply, LeaderReply::Outcome(o), r);
                    return;
                }
                Err(_elapsed) => {
                    tracing::warn!(
                        key,
                        "upstream deadline passed while reading the body: key held"
                    );
                    ex.abort().await;
                    let o = Outcome::Unknown(permit.hold(504));
                    let served = permit.settle(o.clone(), plan.retention);
                    let r = report(served);
                    deliver(&metrics, plan.route, reply, LeaderReply::Outcome(o), r);
                    return;
                }
            }
        }
    }
    // Not replayable: waiters and later requests are answered now; the leader's client gets
    // the stream; the body is read to the end whether or not anyone still listens.
    tracing::info!(
        key,
        status,
        "response not replayable: streaming it to the leader only"
    );
    let served = permit.settle(Outcome::NotReplayable, plan.retention);
    let (tx, rx) = mpsc::channel(16);
    let header = Box::new(stream_header(ex.header()));
    deliver(
        &metrics,
        plan.route,
        reply,
        LeaderReply::Stream { header, body: rx },
        report(served),
    );
    if !body.is_empty() {
        let _ = tx.send(Ok(body.freeze())).await;
    }
    loop {
        match timeout_at(plan.deadline, ex.read_body()).await {
            Ok(Ok(Some(chunk))) => {
                // A client that left must not stop the read: the call completes regardless.
                let _ = tx.send(Ok(chunk)).await;
            }
            Ok(Ok(None)) => {
                upstream.release(ex).await;
                return;
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(key, "streamed upstream response cut off");
                let _ = tx.send(Err(())).await;
                ex.abort().await;
                return;
            }
        }
    }
}

fn deliver(
    metrics: &Metrics,
    route: RouteId,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
    r: LeaderReply,
    report: CallReport,
) {
    if reply.send((r, report)).is_err() {
        // The leader's client left before the answer: the reason idem exists.
        metrics.detached_completion(route);
    }
}

/// Event streams, gRPC and responses with trailers are not replayable as a stored body.
pub fn is_storable(h: &ResponseHeader) -> bool {
    let ct = h
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    !(ct.starts_with("text/event-stream")
        || ct.starts_with("application/grpc")
        || h.headers.contains_key(header::TRAILER))
}

fn stored_response(h: &ResponseHeader, body: Bytes) -> StoredResponse {
    let nominated = crate::upstream::connection_nominated(&h.headers);
    StoredResponse {
        status: h.status.as_u16(),
        headers: h
            .headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n) && !nominated.contains(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        body,
        completed_at: Instant::now(),
    }
}

/// The header for a streamed response: the upstream's, minus hop-by-hop fields, keeping its
/// `Content-Length` when it declared one so the client can detect a cut-off.
fn stream_header(h: &ResponseHeader) -> ResponseHeader {
    let mut out = h.clone();
    let length = h.headers.get(header::CONTENT_LENGTH).cloned();
    let nominated = crate::upstream::connection_nominated(&h.headers);
    for name in crate::upstream::HOP_BY_HOP.iter().chain(nominated.iter()) {
        out.remove_header(name);
    }
    match length {
        Some(len) => {
            let _ = out.insert_header(header::CONTENT_LENGTH, len);
        }
        None => {
            let _ = out.insert_header(header::TRANSFER_ENCODING, "chunked");
        }
    }
    out
}
