//! The leader's upstream call, detached from its client.
//!
//! [`spawn`] runs the call in its own task that owns the [`LeaderPermit`]: whatever the
//! leader's client does (times out, disconnects, resets), the call runs to completion within
//! the upstream total deadline, its outcome is settled for waiters and later retries, and a
//! connection fully read goes back to the pool. The leader's client gets its answer through
//! a oneshot channel; if that client is gone the send fails and the completion is counted
//! as detached.
//!
//! With the Redis store ([`crate::store::redis`]) the task first takes the shared step: it claims
//! the key across replicas, or answers from what another replica stored or is running,
//! before any upstream call; its outcome is then written over the claim (fenced) before it
//! is settled locally, so a local client never sees a response that another replica could
//! still miss because of a write still on its way.
//!
//! Responses that cannot be stored (over `max_response_body`, `text/event-stream`, gRPC)
//! are streamed to the leader's client and read to the end regardless; the key settles as
//! not-replayable as soon as that is known, so waiters are answered at once.

use crate::config::settings::StatusSet;
use crate::dedup::coordinator::{LeaderPermit, Outcome, Retention};
use crate::observe::metrics::{Metrics, RouteId};
use crate::store::memory::StoredResponse;
use crate::store::redis::{Claimed, Lead, LeadRequest, Shared};
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
    /// The shared store's step (Redis mode), `None` with the memory store.
    pub shared: Option<SharedPlan>,
}

/// What the shared step needs (Redis mode).
pub struct SharedPlan {
    /// The shared store.
    pub store: Arc<Shared>,
    /// The key, its fingerprint and the deadlines.
    pub request: LeadRequest,
}

/// The local permit, plus the shared claim when this replica holds one: settling writes the
/// outcome over the claim first.
struct Leader {
    permit: LeaderPermit,
    claim: Option<(Arc<Shared>, Claimed)>,
}

impl Leader {
    fn key(&self) -> crate::key::DedupKey {
        self.permit.key()
    }

    fn hold(&self, status: u16) -> crate::store::memory::Held {
        self.permit.hold(status)
    }

    async fn settle(self, outcome: Outcome, retention: Retention) -> usize {
        if let Some((store, claim)) = &self.claim {
            store.settle(claim, &outcome, retention).await;
        }
        self.permit.settle(outcome, retention)
    }
}

/// What the leader's own client receives.
pub enum LeaderReply {
    /// The settled outcome (a complete response, or why there is none).
    Outcome(Outcome),
    /// An outcome from the shared store: a response another replica stored (`replay_ttl`
    /// set: answered as a replay), the outcome of another replica's call (answered as
    /// collapsed), or a problem.
    Shared {
        /// The outcome.
        outcome: Outcome,
        /// Seconds of retention left, for a replay.
        replay_ttl: Option<u64>,
    },
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
    // Boxed: the task then holds a pointer, not the whole state machine (Pingora's connector
    // futures make it several KiB), which tokio would otherwise copy on every stage change.
    tokio::spawn(Box::pin(run(permit, upstream, metrics, plan, tx)));
    rx
}

async fn run(
    permit: LeaderPermit,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    mut plan: Plan,
    reply: oneshot::Sender<(LeaderReply, CallReport)>,
) {
    let mut permit = Leader {
        permit,
        claim: None,
    };
    if let Some(shared) = plan.shared.take() {
        match shared.store.lead(shared.request).await {
            Lead::Call(claim) => permit.claim = claim.map(|c| (shared.store, c)),
            Lead::Answer(a) => {
                let served = permit.permit.settle(a.outcome.clone(), a.retention);
                let report = CallReport {
                    upstream: Duration::ZERO,
                    waiters_served: served,
                };
                let r = LeaderReply::Shared {
                    outcome: a.outcome,
                    replay_ttl: a.replay_ttl,
                };
                deliver(&metrics, plan.route, reply, r, report);
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let key = permit.key().short();
    // Boxed so that `run` stays small (see `spawn`).
    let sent = timeout_at(
        plan.deadline,
        Box::pin(upstream.send(&plan.request, &plan.body)),
    )
    .await;
    let failure = match sent {
        Ok(Ok(exchange)) => {
            let finish = finish(permit, upstream, metrics, plan, reply, exchange, started);
            return Box::pin(finish).await;
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
    let served = permit.settle(failure.clone(), plan.retention).await;
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
    permit: Leader,
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
        let served = permit.settle(o.clone(), plan.retention).await;
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
    let mut body = BodyBuf::with_hint(0);
    let storable = is_storable(ex.header()) && declared.is_none_or(|n| n <= plan.max_response_body);
    if storable {
        loop {
            match timeout_at(plan.deadline, ex.read_body()).await {
                Ok(Ok(Some(chunk))) => {
                    if (body.len() + chunk.len()) as u64 > plan.max_response_body {
                        body.push(chunk);
                        break;
                    }
                    body.push(chunk);
                }
                Ok(Ok(None)) => {
                    let response = Arc::new(stored_response(ex.header(), body.freeze()));
                    let stored = plan.store_statuses.contains(status);
                    upstream.release(ex).await;
                    let o = Outcome::Response { response, stored };
                    let served = permit.settle(o.clone(), plan.retention).await;
                    let r = report(served);
                    deliver(&metrics, plan.route, reply, LeaderReply::Outcome(o), r);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(key, error = %e, "upstream response cut off: key held");
                    ex.abort().await;
                    let o = Outcome::Unknown(permit.hold(502));
                    let served = permit.settle(o.clone(), plan.retention).await;
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
                    let served = permit.settle(o.clone(), plan.retention).await;
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
    let served = permit.settle(Outcome::NotReplayable, plan.retention).await;
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

/// A body read in chunks. A body that arrives in one chunk is kept as that chunk (no copy);
/// only a second chunk makes it join them. Pingora hands out chunks it copied to exact size,
/// so keeping one pins nothing larger than the body.
pub(crate) struct BodyBuf {
    first: Option<Bytes>,
    joined: BytesMut,
    hint: usize,
}

impl BodyBuf {
    /// An empty body; `hint` is the expected total length (the buffer for a body that comes
    /// in several chunks is reserved with it).
    pub(crate) fn with_hint(hint: usize) -> BodyBuf {
        BodyBuf {
            first: None,
            joined: BytesMut::new(),
            hint,
        }
    }

    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.len()
    }

    /// Whether nothing was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a chunk.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.joined.is_empty() {
            self.first = Some(chunk);
            return;
        }
        if let Some(first) = self.first.take() {
            self.joined
                .reserve(self.hint.max(first.len() + chunk.len()));
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(&chunk);
    }

    /// The whole body.
    pub(crate) fn freeze(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.joined.freeze(),
        }
    }
}

fn stored_response(h: &ResponseHeader, body: Bytes) -> StoredResponse {
    let nominated = crate::upstream::connection_nominated(&h.headers);
    let kept = || {
        h.headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n) && !nominated.contains(n))
    };
    // Header values parsed by Pingora are slices of its (at least 4 KiB) header read buffer:
    // kept as they are, every stored entry would pin that whole buffer. Copy them into one
    // buffer of their exact size instead.
    let mut values = BytesMut::with_capacity(kept().map(|(_, v)| v.len()).sum());
    for (_, v) in kept() {
        values.extend_from_slice(v.as_bytes());
    }
    let mut values = values.freeze();
    // Exactly sized: the list lives as long as the record.
    let mut headers = Vec::with_capacity(kept().count());
    headers.extend(kept().map(|(n, v)| {
        let own = values.split_to(v.len());
        let value = match http::HeaderValue::from_maybe_shared(own) {
            Ok(mut own) => {
                own.set_sensitive(v.is_sensitive());
                own
            }
            Err(_) => v.clone(),
        };
        (n.clone(), value)
    }));
    StoredResponse {
        status: h.status.as_u16(),
        headers,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_in_one_chunk_is_kept_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 100]);
        let mut b = BodyBuf::with_hint(100);
        assert!(b.is_empty());
        b.push(chunk.clone());
        assert_eq!(b.len(), 100);
        let body = b.freeze();
        assert_eq!(body, chunk);
        assert_eq!(body.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn a_body_in_several_chunks_is_joined_in_order() {
        let mut b = BodyBuf::with_hint(0);
        for c in [&b"ab"[..], b"", b"cde", b"f"] {
            b.push(Bytes::copy_from_slice(c));
        }
        assert_eq!(b.len(), 6);
        assert_eq!(b.freeze(), Bytes::from_static(b"abcdef"));
        assert!(BodyBuf::with_hint(10).freeze().is_empty());
    }

    #[test]
    fn stored_headers_are_end_to_end_in_order_and_own_their_bytes() {
        let mut h = ResponseHeader::build(201, None).unwrap();
        h.append_header("content-type", "text/plain").unwrap();
        h.append_header("connection", "keep-alive, x-hop").unwrap();
        h.append_header("x-hop", "dropped").unwrap();
        h.append_header("set-cookie", "a=1").unwrap();
        h.append_header("set-cookie", "b=2").unwrap();
        h.append_header("content-length", "2").unwrap();
        let mut secret = http::HeaderValue::from_static("token");
        secret.set_sensitive(true);
        h.append_header("x-secret", secret).unwrap();
        let r = stored_response(&h, Bytes::from_static(b"ok"));
        let got: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-type", &b"text/plain"[..]),
                ("set-cookie", b"a=1"),
                ("set-cookie", b"b=2"),
                ("x-secret", b"token"),
            ]
        );
        assert!(r.headers[3].1.is_sensitive() && !r.headers[0].1.is_sensitive());
        assert_eq!(r.headers.capacity(), r.headers.len());
        // Copied out of the header's buffers, not sharing them.
        let original = h.headers.get("content-type").unwrap().as_bytes().as_ptr();
        assert_ne!(r.headers[0].1.as_bytes().as_ptr(), original);
        assert_eq!((r.status, &r.body[..]), (201, &b"ok"[..]));
    }
}
