//! idem: a deduplicating reverse proxy. The backend does the work once, however many times
//! and however impatiently the client sends the request.
//!
//! # Life of a request
//! A connection first passes `http::first_bytes` (the PROXY protocol header when
//! configured, `http::proxy_protocol`, then HTTP/1 or h2c; on a TLS listener the handshake,
//! `http::tls`, and ALPN instead). Then, per request, read top to
//! bottom in `http::proxy` (`request_filter`):
//! 0. The request id (`observe::request_id`: the client's `X-Request-Id` when usable, else
//!    a UUIDv7) and, with traces on, the request's span (`observe::trace`); the head as
//!    idem treats it (`http::normalize`: the path in normal form, `path`), the peer's trust
//!    and the client address through trusted hops (`http::client_addr`); the forwarding
//!    headers every forwarded request carries follow from them (`http::forward`).
//! 1. Route (`config::route`, on segment boundaries of the normal form) and admission from
//!    the head alone (`http::admission`): pass-through requests go to Pingora's streamed
//!    proxy path untouched.
//! 2. The body is read whole and hashed (`http::body`), within the client's share of the
//!    body budget (`http::body_budget`); scope and fingerprint come from the head
//!    (`http::key_inputs`) and give the dedup key ([`key`]); the key belongs to its scope
//!    and client (`owner`), which every limit that protects other callers counts.
//! 3. Join (`dedup::coordinator`): the first request leads and its call runs detached from
//!    its client (`dedup::leader`, over `upstream`, with the Redis step first in
//!    `store::redis`); identical ones wait for it; later ones replay what the store kept
//!    (`store::memory`); misuse and lack of room are refused.
//! 4. Every outcome becomes one `http::reply::Reply`, written by one writer (which keeps
//!    credentials and private answers with their client, and framing out of stored data).
//! 5. Once, at the end (`logging`): the metrics, the access line and the span end.
//!    Waiters and replays name the request that led their call (its id, its span).
//!
//! # Lifecycle of a key
//! absent -> in flight (one leader, waiters) -> stored | not-replayable | held (outcome
//! unknown) | freed -> expired (`outcome` names these states for every tier). The rule that
//! outranks convenience: idem never starts a second upstream call for a key while an earlier
//! call for it may still be executing or its result is retained.
//!
//! # Layers
//! Folders follow the direction of dependency; a module uses only those above it in this
//! list and its own folder:
//! `key`, `owner`, `path`, `outcome`, `message`, `config/`, `observe/` (vocabulary,
//! configuration, metrics)
//! <- `store/`, `upstream/` (state and the backend client)
//! <- `dedup/` (coalescing, plain Rust over the tiers)
//! <- `http/` (the client's Pingora session) <- `admin/` <- `server/` (process assembly).
//!
//! # Ownership
//! ```text
//! server::run
//! ├── Idem (http::proxy)      one per proxy app, cloned for HTTP/1 and h2c
//! │   ├── Live                the Settings in force, swapped by SIGHUP (config::live)
//! │   ├── KeyDeriver          keyed blake3 (key)
//! │   ├── Coordinator         flights: DashMap<DedupKey, Flight> (dedup::coordinator)
//! │   │   └── MemoryStore     bounded slab + expiry (store::memory)
//! │   ├── [Upstream]          one per group ([upstream], [upstreams.NAME]; a route picks
//! │   │                       one): backends (resolved, health checked; TLS peers for
//! │   │                       https://), idle pools, reuse records, HTTP/2 connections
//! │   │                       (upstream: backends, tls, h2, pool, reuse)
//! │   ├── ShadowTable         keys seen on shadow routes (dedup::shadow)
//! │   ├── RedisStore          claims, fenced results, waits across replicas, purges
//! │   │                       (store::redis; one node, Cluster or Sentinel, TLS)
//! │   ├── Metrics             Prometheus registry, process collector (observe::metrics)
//! │   └── Traces              OTLP span exporter and tracer, when on (observe::trace)
//! ├── HealthApp               /metrics /healthz /readyz (admin::health)
//! ├── AdminApp                /flights /held /store, purge on every replica (admin::keys),
//! │                           loopback only, behind admin::guard (Host, Origin, token);
//! │                           both served until the exit (server::until_exit)
//! └── Housekeeping, Signals   listening line, sweep, SIGTERM (drain, shutdown_delay),
//!                             SIGHUP, SIGINT (server)
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
pub(crate) mod owner;
pub(crate) mod path;
pub mod server;
pub(crate) mod store;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod testing;
pub(crate) mod upstream;
