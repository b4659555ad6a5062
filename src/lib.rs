//! idem: a deduplicating reverse proxy. The backend does the work once, however many times
//! and however impatiently the client sends the request.
//!
//! Life of an eligible request (see `proxy.rs`, top to bottom):
//! route + admission from the head -> body read and hashed -> scope, fingerprint, dedup key
//! -> join: leader (detached upstream call), waiter (waits for it), replay (stored), or a
//! problem -> answer written by idem.
//!
//! Lifecycle of a key: absent -> in flight (one leader, waiters) -> stored | not-replayable |
//! held (outcome unknown) | freed -> expired. The rule that outranks convenience: idem never
//! starts a second upstream call for a key while an earlier call for it may still be
//! executing or its result is retained.
//!
//! ```text
//! Idem (proxy.rs)
//! ├── Live            the Settings in force, swapped by SIGHUP (reload.rs; settings.rs, config.rs)
//! ├── KeyDeriver      keyed blake3 (key.rs)
//! ├── Coordinator     flights: DashMap<DedupKey, Flight> (inflight.rs)
//! │   └── MemoryStore bounded LRU + expiry (store.rs)
//! ├── Upstream        load balancer + Pingora Connector (upstream.rs); flights run in flight.rs
//! ├── ShadowTable     keys seen on shadow routes, would-be duplicates (shadow.rs)
//! ├── Shared          the Redis store shared by replicas: claims, fenced results, waits (shared/)
//! └── Metrics         Prometheus registry, /metrics /healthz /readyz (metrics.rs)
//! AdminApp            /flights /held /store, purge (admin.rs), on its own listener
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod config;
pub(crate) mod dedup;
pub(crate) mod http;
pub mod key;
pub(crate) mod message;
pub(crate) mod observe;
pub(crate) mod outcome;
pub mod server;
pub(crate) mod store;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod testing;
pub(crate) mod upstream;
