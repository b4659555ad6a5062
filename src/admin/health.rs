//! The metrics listener: `/metrics`, `/healthz` (process up), `/readyz` (not draining,
//! listeners bound, at least one healthy backend, and, with the Redis store under
//! `on_store_error = "fail-closed"`, Redis usable). A 503 from `/readyz` names the first
//! unmet condition in one line; Redis' is the reason its last connection attempt failed.
//! The listener serves until the process exits, through a drain too (`crate::server`):
//! from SIGTERM on, `/readyz` answers `503 draining` while `/metrics` shows what is left.

use crate::dedup::coordinator::Coordinator;
use crate::observe::metrics::{Gauges, Metrics};
use crate::store::memory::StoreStats;
use crate::store::redis::RedisStore;
use crate::upstream::Upstream;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The metrics listener's app.
pub(crate) struct HealthApp {
    /// Metric families.
    pub(crate) metrics: Arc<Metrics>,
    /// For the in-flight gauges.
    pub(crate) coordinator: Arc<Coordinator>,
    /// For the store gauges.
    pub(crate) store: Arc<StoreStats>,
    /// Readiness: set once listeners are bound.
    pub(crate) ready: Arc<AtomicBool>,
    /// Readiness: at least one backend healthy, in any group (a group that is down on one
    /// replica is down on all of them: taking the replica out would not serve its routes,
    /// and would stop serving the others; `idem_backend_up` says which).
    pub(crate) groups: Arc<[Arc<Upstream>]>,
    /// Readiness: the Redis store is usable; set only under fail-closed, where a Redis that
    /// cannot be used answers every deduplicated request 503.
    pub(crate) redis_gate: Option<Arc<RedisStore>>,
    /// Set by SIGTERM: not ready any more.
    pub(crate) draining: Arc<AtomicBool>,
    /// Requests being processed.
    pub(crate) active: Arc<AtomicUsize>,
    /// How many backends the configuration names (the `idem_backend_up` series).
    pub(crate) backends: usize,
}

impl HealthApp {
    fn gauges(&self) -> Gauges {
        let counts = self.coordinator.counts();
        let s = &self.store;
        Gauges {
            inflight: counts.inflight,
            waiters: counts.waiters,
            held: s.held.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            evicted_capacity: s.evicted_capacity.load(Ordering::Relaxed),
            evicted_expired: s.evicted_expired.load(Ordering::Relaxed),
            active_requests: self.active.load(Ordering::Relaxed),
            draining: self.draining.load(Ordering::Relaxed),
            backends_up: {
                let mut up = vec![false; self.backends];
                for g in self.groups.iter() {
                    for e in g.endpoints().iter() {
                        if let Some(slot) = up.get_mut(e.backend) {
                            *slot |= e.is_up();
                        }
                    }
                }
                up
            },
        }
    }
}

#[async_trait::async_trait]
impl ServeHttp for HealthApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, ctype, body) = match path.as_str() {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                self.metrics.render(&self.gauges()),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.draining.load(Ordering::Relaxed) {
                    (503, "text/plain", b"draining\n".to_vec())
                } else if !self.ready.load(Ordering::Relaxed) {
                    (503, "text/plain", b"listeners not bound\n".to_vec())
                } else if !self.groups.iter().any(|g| g.any_healthy()) {
                    (503, "text/plain", b"no healthy backend\n".to_vec())
                } else if let Some(Err(why)) = self.redis_gate.as_ref().map(|s| s.health()) {
                    // One line, whatever the error text holds.
                    let why = why.replace(['\r', '\n'], " ");
                    let line = format!("redis store unavailable (fail-closed): {why}\n");
                    (503, "text/plain", line.into_bytes())
                } else {
                    (200, "text/plain", b"ready\n".to_vec())
                }
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts")
    }
}
