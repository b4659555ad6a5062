//! The admin listener: what idem holds right now, and the purge of one stored key.
//!
//! Off unless `[admin] listen` is set, and loopback only (checked with the configuration):
//! purging a key lets its next request execute again, which is an operator's decision.
//! Keys appear as the first hex digits of their hash ([`DedupKey::short`], as in the access
//! log), never as the client's `Idempotency-Key` or body.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /flights` | JSON list of keys in flight: `key`, `route`, `age_ms`, `waiters` (oldest first) |
//! | `GET /held` | JSON list of held keys: `key`, `status`, `expires_in_ms` |
//! | `GET /store` | JSON object: `kind`, `entries`, `held`, `reserved`, `bytes`, bounds, `evictions` |
//! | `DELETE /keys/HEX` | purge the one stored key whose hash starts with HEX (12 to 64 digits) |
//!
//! Purge answers 200 with the key, 404 when no kept key matches, 409 when the key is in
//! flight or held (its call may still run: the rule that outranks convenience) or when HEX
//! matches several keys, 400 for a malformed HEX.

use crate::dedup::coordinator::Coordinator;
use crate::key::DedupKey;
use crate::observe::metrics::Metrics;
use crate::store::memory::Kept;
use http::Method;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::time::Instant;

/// Fewest hex digits a purge accepts: the short form the access log and `/flights` show.
pub(crate) const MIN_PURGE_DIGITS: usize = 12;

/// The admin listener's app.
pub(crate) struct AdminApp {
    /// Flights and the store.
    pub(crate) coordinator: Arc<Coordinator>,
    /// Route names by id.
    pub(crate) metrics: Arc<Metrics>,
}

impl AdminApp {
    fn flights(&self) -> Value {
        let flights: Vec<Value> = self
            .coordinator
            .flights()
            .into_iter()
            .map(|f| {
                json!({
                    "key": f.key.short(),
                    "route": &*self.metrics.route_name(f.route),
                    "age_ms": f.age.as_millis() as u64,
                    "waiters": f.waiters,
                })
            })
            .collect();
        Value::Array(flights)
    }

    fn held(&self) -> Value {
        let now = Instant::now();
        let held: Vec<Value> = self
            .coordinator
            .store()
            .held(now)
            .into_iter()
            .map(|(key, h)| {
                json!({
                    "key": key.short(),
                    "status": h.status,
                    "expires_in_ms": h.until.saturating_duration_since(now).as_millis() as u64,
                })
            })
            .collect();
        Value::Array(held)
    }

    fn store(&self) -> Value {
        let s = self.coordinator.store().summary();
        json!({
            "kind": "memory",
            "entries": s.entries,
            "held": s.held,
            "reserved": s.reserved,
            "bytes": s.bytes,
            "max_entries": s.max_entries,
            "max_bytes": s.max_bytes,
            "evictions": {"capacity": s.evicted_capacity, "expired": s.evicted_expired},
        })
    }

    fn purge(&self, hex: &str) -> (u16, Value) {
        let error = |status, message: String| (status, json!({ "error": message }));
        if !(MIN_PURGE_DIGITS..=64).contains(&hex.len())
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return error(
                400,
                format!("name the key by {MIN_PURGE_DIGITS} to 64 hex digits of its hash"),
            );
        }
        let flying: Vec<DedupKey> = self
            .coordinator
            .flights()
            .into_iter()
            .map(|f| f.key)
            .filter(|k| k.has_hex_prefix(hex))
            .collect();
        let store = self.coordinator.store();
        let kept = store.find(hex, 2, Instant::now());
        match (flying.as_slice(), kept.as_slice()) {
            ([], []) => error(404, format!("no stored key starts with {hex}")),
            ([key], []) => error(
                409,
                format!(
                    "{} is in flight: its call may still run, so it cannot be purged",
                    key.short()
                ),
            ),
            ([], [(key, Kept::Held)]) => error(
                409,
                format!(
                    "{} is held (outcome unknown): its call may still run, so it cannot be purged",
                    key.short()
                ),
            ),
            ([], [(key, kind)]) => {
                if store.purge(key) {
                    tracing::warn!(key = %key.short(), "admin: stored key purged; its next request executes again");
                    let kind = match kind {
                        Kept::Response => "response",
                        Kept::NotReplayable => "not-replayable",
                        Kept::Held => unreachable!("matched above"),
                    };
                    (200, json!({ "purged": key.short(), "kind": kind }))
                } else {
                    // Expired or evicted between the lookup and the purge.
                    error(404, format!("no stored key starts with {hex}"))
                }
            }
            _ => error(
                409,
                format!("several keys start with {hex}; give more digits"),
            ),
        }
    }
}

#[async_trait::async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        let (status, body) = match (&method, path.as_str()) {
            (&Method::GET, "/flights") => (200, self.flights()),
            (&Method::GET, "/held") => (200, self.held()),
            (&Method::GET, "/store") => (200, self.store()),
            (&Method::DELETE, p) if p.starts_with("/keys/") => self.purge(&p["/keys/".len()..]),
            (_, "/flights" | "/held" | "/store") => (405, json!({ "error": "use GET" })),
            (_, p) if p.starts_with("/keys/") => (405, json!({ "error": "use DELETE" })),
            _ => (404, json!({ "error": "not found" })),
        };
        let mut body = serde_json::to_vec(&body).expect("JSON values serialize");
        body.push(b'\n');
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts")
    }
}
