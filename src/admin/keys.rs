//! The admin listener: what idem holds right now, and the purge of one stored key.
//!
//! Off unless `[admin] listen` is set, and loopback only (checked with the configuration):
//! purging a key lets its next request execute again, which is an operator's decision.
//! Every request first passes [`crate::admin::guard`]: a loopback `Host`, no `Origin`, and
//! the bearer token when one is configured.
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
//!
//! With the Redis store the purge reaches every replica ([`crate::store::redis::purge`]):
//! the key is found in this replica's store by HEX, or, when this replica keeps no copy, named
//! by all 64 digits; it is deleted in Redis (fenced: a claim or a held key there is 409, as
//! here) and announced, and every replica drops its copy. Redis unreachable: 503 and
//! nothing purged anywhere, since a local purge alone would be undone by the next request
//! (which finds the record in Redis). The answer's `redis` member says what Redis had.

use crate::admin::guard;
use crate::config::settings::Secret;
use crate::dedup::coordinator::Coordinator;
use crate::key::DedupKey;
use crate::observe::metrics::Metrics;
use crate::store::memory::Kept;
use crate::store::redis::purge::Purged;
use crate::store::redis::RedisStore;
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
    /// The Redis store (`store.kind = "redis"`): purges reach it and every replica.
    pub(crate) redis: Option<Arc<RedisStore>>,
    /// `[admin] token`, if set.
    pub(crate) token: Option<Secret<String>>,
}

/// What this replica keeps for a purge's HEX.
enum Local {
    /// Nothing.
    None,
    /// One stored key, of this kind.
    One(DedupKey, &'static str),
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

    async fn purge(&self, hex: &str) -> (u16, Value) {
        let local = match self.find_local(hex) {
            Ok(l) => l,
            Err(refused) => return refused,
        };
        let Some(redis) = &self.redis else {
            return match local {
                Local::One(key, kind) => self.purge_local(&key, kind, hex),
                Local::None => error(404, format!("no stored key starts with {hex}")),
            };
        };
        let key = match (local, full_key(hex)) {
            (Local::One(key, _), _) => key,
            (Local::None, Some(key)) => key,
            (Local::None, None) => {
                return error(
                    404,
                    format!("this replica keeps no key starting with {hex}; to purge it from Redis and every replica, give all 64 hex digits (redis-cli --scan --pattern '<key_prefix>{{{hex}*' shows them)"),
                )
            }
        };
        match redis.purge(&key).await {
            Err(e) => {
                tracing::warn!(key = %key.short(), error = %e, "admin: purge refused: the Redis store cannot be reached; nothing purged");
                error(
                    503,
                    format!("the shared store (Redis) cannot be reached, so {} was purged nowhere: a purge on this replica alone would be undone by its next request. Retry later", key.short()),
                )
            }
            Ok(Purged::Busy) => error(
                409,
                format!(
                    "{} is in flight or held on a replica: its call may still run, so it cannot be purged",
                    key.short()
                ),
            ),
            Ok(found) => {
                // The announcement reaches this replica too; dropping the copy now makes the
                // answer true as soon as it is sent.
                let here = self.coordinator.store().purge(&key);
                let (redis_kind, redis) = match found {
                    Purged::Deleted(kind) => (Some(kind), "deleted"),
                    _ => (None, "absent"),
                };
                match redis_kind.or(here.then_some("response")) {
                    Some(kind) => {
                        tracing::warn!(key = %key.short(), redis, "admin: key purged on every replica; its next request executes again");
                        (
                            200,
                            json!({ "purged": key.short(), "kind": kind, "redis": redis }),
                        )
                    }
                    None => error(404, format!("no stored key starts with {hex}")),
                }
            }
        }
    }

    /// The one stored key this replica keeps for `hex`; a refusal when `hex` is malformed,
    /// in flight, held or ambiguous here.
    fn find_local(&self, hex: &str) -> Result<Local, (u16, Value)> {
        if !(MIN_PURGE_DIGITS..=64).contains(&hex.len())
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(error(
                400,
                format!("name the key by {MIN_PURGE_DIGITS} to 64 hex digits of its hash"),
            ));
        }
        let flying: Vec<DedupKey> = self
            .coordinator
            .flights()
            .into_iter()
            .map(|f| f.key)
            .filter(|k| k.has_hex_prefix(hex))
            .collect();
        let kept = self.coordinator.store().find(hex, 2, Instant::now());
        match (flying.as_slice(), kept.as_slice()) {
            ([], []) => Ok(Local::None),
            ([key], []) => Err(error(
                409,
                format!(
                    "{} is in flight: its call may still run, so it cannot be purged",
                    key.short()
                ),
            )),
            ([], [(key, Kept::Held)]) => Err(error(
                409,
                format!(
                    "{} is held (outcome unknown): its call may still run, so it cannot be purged",
                    key.short()
                ),
            )),
            ([], [(key, Kept::Response)]) => Ok(Local::One(*key, "response")),
            ([], [(key, Kept::NotReplayable)]) => Ok(Local::One(*key, "not-replayable")),
            _ => Err(error(
                409,
                format!("several keys start with {hex}; give more digits"),
            )),
        }
    }

    /// The memory store's purge: this process is the only one that keeps the key.
    fn purge_local(&self, key: &DedupKey, kind: &str, hex: &str) -> (u16, Value) {
        if self.coordinator.store().purge(key) {
            tracing::warn!(key = %key.short(), "admin: stored key purged; its next request executes again");
            (200, json!({ "purged": key.short(), "kind": kind }))
        } else {
            // Expired or evicted between the lookup and the purge.
            error(404, format!("no stored key starts with {hex}"))
        }
    }
}

fn error(status: u16, message: String) -> (u16, Value) {
    (status, json!({ "error": message }))
}

/// The key named by all 64 hex digits.
fn full_key(hex: &str) -> Option<DedupKey> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(DedupKey(key))
}

#[async_trait::async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        let (status, body) = match guard::check(req, self.token.as_ref()) {
            Err(refused) => {
                let host = req
                    .headers
                    .get(http::header::HOST)
                    .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
                tracing::warn!(reason = refused.as_str(), host = ?host, %method, path, "admin: request refused");
                self.metrics.admin_refused(refused.as_str());
                let (status, message) = refused.answer();
                (status, json!({ "error": message }))
            }
            Ok(()) => self.serve(&method, &path).await,
        };
        let mut body = serde_json::to_vec(&body).expect("JSON values serialize");
        body.push(b'\n');
        let mut answer = http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len());
        if status == 401 {
            answer = answer.header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
        answer.body(body).expect("static response parts")
    }
}

impl AdminApp {
    async fn serve(&self, method: &Method, path: &str) -> (u16, Value) {
        match (method, path) {
            (&Method::GET, "/flights") => (200, self.flights()),
            (&Method::GET, "/held") => (200, self.held()),
            (&Method::GET, "/store") => (200, self.store()),
            (&Method::DELETE, p) if p.starts_with("/keys/") => {
                self.purge(&p["/keys/".len()..]).await
            }
            (_, "/flights" | "/held" | "/store") => (405, json!({ "error": "use GET" })),
            (_, p) if p.starts_with("/keys/") => (405, json!({ "error": "use DELETE" })),
            _ => (404, json!({ "error": "not found" })),
        }
    }
}
