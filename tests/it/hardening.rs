//! Issue 14: what an adversarial client, a shared Redis and a browser on the host could do.
//! Each test replays one finding of the review against the real binary and shows it held,
//! with exact counts (backend executions, evictions, statuses, RSS).
//!
//! Client addresses: any 127.0.0.0/8 address is local on Linux, so the "attacker" and the
//! "victim" connect from different loopback addresses, with `trusted_proxies = []` (nobody's
//! `X-Forwarded-For` is believed: the address is the peer's, which a client cannot mint).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The client at 127.0.0.`n`.
fn from(n: u8) -> reqwest::Client {
    client_from(IpAddr::from([127, 0, 0, n]))
}

/// A config where the client address is the peer's own.
fn config(b: &Backend) -> Config {
    Config::new(b.addr()).set("server.trusted_proxies", Vec::<String>::new())
}

/// A response read by reqwest.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn call(&self) -> u64 {
        self.header("x-backend-call").parse().unwrap_or(0)
    }

    #[track_caller]
    fn problem(&self, status: u16, kind: &str) {
        assert_problem(
            &ReadResponse::new(self.status, &self.headers, &self.body),
            status,
            kind,
        );
    }

    #[track_caller]
    fn leader(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.header("cache-status"), "idem; fwd=uri-miss; stored");
        assert_eq!(self.call(), call, "{self:?}");
    }

    #[track_caller]
    fn replay(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?}");
        assert!(
            self.header("cache-status").starts_with("idem; hit; ttl="),
            "{self:?}"
        );
        assert_eq!(self.call(), call, "{self:?}");
    }
}

/// A POST from `http` with an optional key and `headers`.
async fn post(
    http: &reqwest::Client,
    idem: &Idem,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = http.post(idem.url(path)).body(body.to_vec());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

fn problems(kind: &str) -> String {
    series_id("idem_problems_total", [("type", kind)])
}

fn capacity_evictions() -> &'static str {
    "idem_store_evictions_total{reason=\"capacity\"}"
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS of the idem process")
}

/// A raw keyed POST from 127.0.0.`n` whose connection closes `after` it is written.
fn spawn_abandoned(
    set: &mut JoinSet<()>,
    addr: SocketAddr,
    n: u8,
    request: Vec<u8>,
    after: Duration,
) {
    set.spawn(async move {
        let mut conn = RawConn::connect_from(addr, IpAddr::from([127, 0, 0, n])).await;
        conn.send(&request).await;
        tokio::time::sleep(after).await;
        drop(conn);
    });
}

// ---------------------------------------------------------------------------
// Finding 1: invented scopes defeated the per-scope quota
// ---------------------------------------------------------------------------

/// `max_entries = 60`, `max_keys_per_scope = 10`: 80 stored responses from 8 scopes minted
/// by one address used to evict another client's stored response, whose retry then ran a
/// second time. Now the address is at its quota once the store is full and only ever
/// replaces its own records; a light client making room takes it from the heaviest one.
/// Minted credentials that the app refuses (401) cost nothing: they are not kept.
#[tokio::test]
async fn minted_scopes_cannot_evict_another_clients_stored_response() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("store.max_entries", 60)
        .set("store.max_keys_per_scope", 10);
    let idem = Idem::start(&config.to_string()).await;
    let (victim, attacker) = (from(3), from(2));
    let charge = |n: u32| format!("/charge/{n}");
    let victim_auth = [("authorization", "Bearer victim")];
    post(&victim, &idem, &charge(1), Some("c-1"), &victim_auth, b"{}")
        .await
        .leader(1);

    // Minted credentials the app refuses: answered, never kept.
    for n in 0..20 {
        let bearer = format!("Bearer minted-{n}");
        let refused = [("authorization", bearer.as_str()), ("x-status", "401")];
        let r = post(
            &attacker,
            &idem,
            "/refused",
            Some(&format!("r-{n}")),
            &refused,
            b"{}",
        )
        .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("cache-status"), "idem; fwd=uri-miss");
    }
    assert_eq!(metric(&idem, "idem_store_entries").await, 1.0);

    // 80 stored responses, 10 from each of 8 minted scopes.
    for s in 0..8 {
        let bearer = format!("Bearer minted-{s}");
        for k in 0..10 {
            let path = format!("/minted/{s}/{k}");
            let auth = [("authorization", bearer.as_str())];
            post(
                &attacker,
                &idem,
                &path,
                Some(&format!("m-{s}-{k}")),
                &auth,
                b"{}",
            )
            .await
            .leader(1);
        }
    }
    // The 59 free slots were the attacker's to take; every key after that replaced one of
    // its own.
    assert_eq!(metric(&idem, "idem_store_entries").await, 60.0);
    assert_eq!(metric(&idem, capacity_evictions()).await, 21.0);
    post(&victim, &idem, &charge(1), Some("c-1"), &victim_auth, b"{}")
        .await
        .replay(1);

    // The victim's new keys take room from the heaviest client: the attacker.
    for n in 2..=6 {
        post(
            &victim,
            &idem,
            &charge(n),
            Some(&format!("c-{n}")),
            &victim_auth,
            b"{}",
        )
        .await
        .leader(1);
    }
    assert_eq!(metric(&idem, capacity_evictions()).await, 26.0);
    for n in 1..=6 {
        post(
            &victim,
            &idem,
            &charge(n),
            Some(&format!("c-{n}")),
            &victim_auth,
            b"{}",
        )
        .await
        .replay(1);
        assert_eq!(b.settled(&charge(n)).await.started, 1, "charge {n}");
    }
    assert_eq!(b.settled("/refused").await.started, 20);
}

/// With the same store, 60 requests from minted scopes to a path whose upstream answers 502
/// (held keys), or to a slow path with the clients hanging up at once (detached flights),
/// used to pin every slot: every new legitimate key got 503 store-full for the whole hold.
/// Now an address pins at most its quota (10): the rest are refused with 429
/// client-quota, and other clients' new keys run.
#[tokio::test]
async fn minted_scopes_cannot_pin_the_store_with_held_keys_or_detached_flights() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("store.max_entries", 60)
        .set("store.max_keys_per_scope", 10);
    let idem = Idem::start(&config.to_string()).await;

    // Held keys: the upstream answers 502 (a gateway gave up), 30 minted scopes.
    let attacker = from(2);
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..30 {
        let bearer = format!("Bearer minted-{n}");
        let h = [("authorization", bearer.as_str()), ("x-status", "502")];
        let r = post(
            &attacker,
            &idem,
            "/gateway",
            Some(&format!("g-{n}")),
            &h,
            b"{}",
        )
        .await;
        *statuses.entry(r.status).or_insert(0) += 1;
        if r.status == 429 {
            r.problem(429, "client-quota");
            assert_eq!(r.header("retry-after"), "1");
        }
    }
    assert_eq!(statuses, [(429, 20), (502, 10)].into_iter().collect());
    assert_eq!(b.settled("/gateway").await.started, 10);
    assert_eq!(metric(&idem, "idem_held_keys").await, 10.0);

    // Detached flights: another address, 30 minted scopes, clients gone at once.
    let mut set = JoinSet::new();
    for n in 0..30 {
        let bearer = format!("Bearer detached-{n}");
        let key = format!("d-{n}");
        let h = [
            ("host", "idem.test"),
            ("authorization", bearer.as_str()),
            ("idempotency-key", key.as_str()),
            ("x-delay-ms", "10000"),
        ];
        let req = http_request("POST", "/slow", &h, b"{}");
        spawn_abandoned(&mut set, idem.addr(), 4, req, Duration::ZERO);
    }
    while set.join_next().await.is_some() {}
    b.wait_counts("/slow", |c| c.started == 10).await;
    wait_metric(&idem, "idem_inflight_keys", 10.0).await;
    wait_metric(&idem, &problems("client-quota"), 40.0).await;

    // Another client's new key runs.
    post(&from(3), &idem, "/charge", Some("c-1"), &[], b"{}")
        .await
        .leader(1);
    assert_eq!(metric_or_zero(&idem, &problems("store-full")).await, 0.0);
    assert_eq!(b.counts("/slow").started, 10);
}

/// Keys nobody can evict are also capped store-wide (`max_pinned`, default half the
/// store): many addresses together pin at most that, and the stored responses in the
/// other half stay.
#[tokio::test]
async fn many_addresses_pin_at_most_max_pinned_and_stored_responses_stay() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("store.max_entries", 20)
        .set("store.max_keys_per_scope", 4);
    let idem = Idem::start(&config.to_string()).await;
    let victim = from(9);
    for n in 1..=5 {
        post(
            &victim,
            &idem,
            &format!("/v/{n}"),
            Some(&format!("v-{n}")),
            &[],
            b"{}",
        )
        .await
        .leader(1);
    }
    // Four addresses, four held keys each: 16 would fit the store, 10 may be pinned.
    let mut statuses = std::collections::BTreeMap::new();
    for a in 2..=5u8 {
        let http = from(a);
        let bearer = format!("Bearer a-{a}");
        for n in 0..4 {
            let h = [("x-status", "504"), ("authorization", bearer.as_str())];
            let r = post(
                &http,
                &idem,
                "/held",
                Some(&format!("h-{a}-{n}")),
                &h,
                b"{}",
            )
            .await;
            *statuses.entry(r.status).or_insert(0) += 1;
        }
    }
    assert_eq!(statuses, [(503, 6), (504, 10)].into_iter().collect());
    assert_eq!(metric(&idem, &problems("store-full")).await, 6.0);
    for n in 1..=5 {
        post(
            &victim,
            &idem,
            &format!("/v/{n}"),
            Some(&format!("v-{n}")),
            &[],
            b"{}",
        )
        .await
        .replay(1);
    }
    assert_eq!(b.settled("/held").await.started, 10);
}

// ---------------------------------------------------------------------------
// Finding 2: detached flights kept their request bodies
// ---------------------------------------------------------------------------

/// 120 keyed 1 MiB requests to an 8 s endpoint, every client gone after 0.3 s, used to add
/// 150 MiB of RSS with no client connected. A leader's body is now dropped once it has been
/// written upstream: while all 120 calls still run, idem holds no body. (The endpoint takes
/// 25 s here: a debug build on a loaded machine takes seconds to move 120 MiB, and the bound
/// must be seen while every call still runs.)
#[tokio::test]
async fn detached_flights_do_not_keep_their_request_bodies() {
    const N: u64 = 120;
    const MIB: usize = 1 << 20;
    let b = Backend::start().await;
    // The budget is not what this test is about: room for every body at once.
    let config = config(&b)
        .set("upstream.read_timeout", "40s")
        .set("upstream.total_timeout", "40s")
        .set("server.grace_period", "40s")
        .set("server.max_body_buffer", "512MiB")
        .set("server.max_body_buffer_per_client", "512MiB");
    // mimalloc gives freed pages back to the OS only on its next pass over the heap, which
    // an idle process may not make for a while: with no delay, RSS is what idem holds.
    let idem = Idem::builder()
        .env("MIMALLOC_PURGE_DELAY", "0")
        .start(&config.to_string())
        .await;
    let body = vec![b'x'; MIB];
    // One body through first: the allocator's own start-up is not what is measured.
    post(&from(2), &idem, "/warm", Some("warm"), &[], &body)
        .await
        .leader(1);
    let before = rss_kib(idem.pid());

    let mut set = JoinSet::new();
    for n in 0..N {
        let key = format!("k-{n}");
        let h = [
            ("host", "idem.test"),
            ("idempotency-key", key.as_str()),
            ("x-delay-ms", "25000"),
        ];
        let req = http_request("POST", "/slow", &h, &body);
        spawn_abandoned(&mut set, idem.addr(), 2, req, Duration::from_millis(300));
    }
    while set.join_next().await.is_some() {}
    // Every body has reached the backend, and every call is still running.
    b.wait_counts("/slow", |c| c.started == N).await;
    wait_metric(&idem, "idem_inflight_keys", N as f64).await;
    wait_metric(&idem, "idem_body_buffer_bytes", 0.0).await;
    // Freed memory goes back to the OS shortly (the allocator's purge delay): the bound
    // must hold while the calls still run.
    let bound_kib = 40 * 1024;
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let grown = loop {
        let grown = rss_kib(idem.pid()).saturating_sub(before);
        let running = b.counts("/slow").completed == 0;
        if grown <= bound_kib || !running || Instant::now() >= deadline {
            assert!(
                running,
                "the calls ended before RSS came within the bound ({grown} KiB)"
            );
            break grown;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("RSS with {N} detached 1 MiB calls running: +{grown} KiB (bound {bound_kib} KiB)");
    assert!(
        grown <= bound_kib,
        "RSS grew by {grown} KiB with {N} detached calls (bodies of {N} MiB)"
    );
    assert_eq!(metric(&idem, "idem_client_aborts_total").await, 0.0);
}

/// What idem holds of request bodies is bounded: per client address
/// (`max_body_buffer_per_client`, 429 client-quota past it) and in total
/// (`max_body_buffer`, 503 body-buffer-full), before the bytes are read; the connection is
/// closed after the refusal (the body is left unread).
#[tokio::test]
async fn request_bodies_held_are_bounded_per_client_and_in_total() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("server.max_body_buffer", "3MiB")
        .set("server.max_body_buffer_per_client", "2MiB");
    let idem = Idem::start(&config.to_string()).await;
    let length = (1 << 20).to_string();
    let head = |key: &str| {
        let h = [
            ("host", "idem.test"),
            ("idempotency-key", key),
            ("content-length", length.as_str()),
        ];
        http_request("POST", "/upload", &h, b"")
    };
    let connect = |n: u8| RawConn::connect_from(idem.addr(), IpAddr::from([127, 0, 0, n]));
    // Two uploads from one address, each still sending: 2 MiB held for it.
    let mut held = Vec::new();
    for key in ["u-1", "u-2"] {
        let mut c = connect(2).await;
        c.send(&[head(key).as_slice(), b"partial"].concat()).await;
        held.push(c);
        // Each lease is taken in turn.
        wait_metric(&idem, "idem_body_buffer_bytes", (held.len() << 20) as f64).await;
    }
    let mut third = connect(2).await;
    third.send(&head("u-3")).await;
    let refused = third.read_response().await;
    assert_problem(&refused, 429, "client-quota");
    assert_eq!(refused.header("connection"), Some("close"));
    // Another address still has room, up to the total.
    let mut other = connect(3).await;
    other
        .send(&[head("o-1").as_slice(), b"partial"].concat())
        .await;
    wait_metric(&idem, "idem_body_buffer_bytes", (3 << 20) as f64).await;
    let mut fourth = connect(4).await;
    fourth.send(&head("f-1")).await;
    assert_problem(&fourth.read_response().await, 503, "body-buffer-full");
    // Clients that leave give their bytes back.
    drop(held);
    drop(other);
    wait_metric(&idem, "idem_body_buffer_bytes", 0.0).await;
    assert_eq!(b.total(), Counts::default());
    assert_eq!(metric(&idem, &problems("client-quota")).await, 1.0);
    assert_eq!(metric(&idem, &problems("body-buffer-full")).await, 1.0);
}

// ---------------------------------------------------------------------------
// Finding 8: a malformed chunked body on a dedup route answered 500
// ---------------------------------------------------------------------------

/// A malformed chunked body on a dedup route is the client's mistake: 400 bad-request
/// problem+json (as on pass-through), logged at INFO at most, counted as a bad request and
/// not as a client abort; nothing reaches the backend.
#[tokio::test]
async fn malformed_chunked_body_on_a_dedup_route_is_a_400() {
    let b = Backend::start().await;
    let config = config(&b).route(Route::new("fp", "/fp/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    for (path, key) in [("/charge", Some("k-1")), ("/fp/add", None)] {
        let mut h = vec![("host", "idem.test"), ("transfer-encoding", "chunked")];
        if let Some(k) = key {
            h.push(("idempotency-key", k));
        }
        let head = http_request("POST", path, &h, b"");
        let mut conn = RawConn::connect(idem.addr()).await;
        conn.send(&[head.as_slice(), b"zz\r\nnot a chunk\r\n0\r\n\r\n"].concat())
            .await;
        let r = conn.read_response().await;
        assert_problem(&r, 400, "bad-request");
        assert_eq!(r.header("connection"), Some("close"), "{path}");
    }
    assert_eq!(metric(&idem, &problems("bad-request")).await, 2.0);
    assert_eq!(metric(&idem, "idem_client_aborts_total").await, 0.0);
    idem.wait_stderr("INFO idem::http::proxy: request body framing malformed: 400")
        .await;
    let log = idem.stderr_text();
    assert!(!log.contains(" ERROR "), "{log}");
    assert_eq!(b.total(), Counts::default());
}

// ---------------------------------------------------------------------------
// Finding 9: one caller could take the whole waiter budget
// ---------------------------------------------------------------------------

/// One address attaching waiters gets 429 client-quota past its share
/// (`max_waiters_per_client`), and other callers still wait for the same call; the backend
/// runs once.
#[tokio::test]
async fn one_caller_cannot_take_the_whole_waiter_budget() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("server.max_waiters", 10)
        .set("server.max_waiters_per_client", 4);
    let idem = Idem::start(&config.to_string()).await;
    let gate = b.gate("/slow");
    let spawn = |n: u8| {
        let url = idem.url("/slow");
        tokio::spawn(async move {
            let r = from(n)
                .post(url)
                .header("idempotency-key", "shared")
                .body("{}")
                .send()
                .await
                .expect("POST");
            let status = r.status().as_u16();
            let cache = r.headers()["cache-status"].to_str().unwrap().to_owned();
            (status, cache)
        })
    };
    let leader = spawn(9);
    gate.wait_started(1).await;
    let hog: Vec<_> = (0..7).map(|_| spawn(2)).collect();
    wait_metric(&idem, &problems("client-quota"), 3.0).await;
    wait_metric(&idem, "idem_waiters", 4.0).await;
    let others: Vec<_> = (3..=6).map(spawn).collect();
    wait_metric(&idem, "idem_waiters", 8.0).await;
    gate.open();
    assert_eq!(leader.await.unwrap().0, 200);
    let mut by_status = std::collections::BTreeMap::new();
    for h in hog {
        *by_status.entry(h.await.unwrap().0).or_insert(0) += 1;
    }
    assert_eq!(by_status, [(200, 4), (429, 3)].into_iter().collect());
    for o in others {
        assert_eq!(
            o.await.unwrap(),
            (200, "idem; fwd=uri-miss; collapsed".to_string())
        );
    }
    assert_eq!(b.settled("/slow").await.started, 1);
}

// ---------------------------------------------------------------------------
// Findings 3 and 4: a shared Redis
// ---------------------------------------------------------------------------

/// Replicas share the deployment secret (records are authenticated with it).
const SECRET: &str = "replicas-share-this-secret-0123456789";

fn replica(b: &Backend, redis: &RedisServer) -> Config {
    config(b)
        .set("store.kind", "redis")
        .set("store.url", redis.url())
        .set("dedup.secret", SECRET)
        .set("store.poll_interval", "100ms")
        .set("store.liveness_ttl", "1s")
}

/// Behind a load balancer every replica sees the same authority (part of the scope).
const HOST: (&str, &str) = ("host", "api.example");

fn store_op(op: &str, result: &str) -> String {
    series_id(
        "idem_store_operations_total",
        [("op", op), ("result", result)],
    )
}

/// Finding 3: one client filled Redis (`maxmemory 24mb` with `noeviction`) with 190
/// stored responses of 128 KiB; a legitimate key then ran on both replicas under
/// fail-open. A replica's Redis writes now stay within its own store's bounds, shared
/// between clients by the same rules: the records its store evicts are deleted in Redis
/// too. The flood replaces its own records there, Redis keeps room, and the victim's key
/// runs once across replicas.
#[tokio::test]
async fn one_client_cannot_fill_redis() {
    let redis = RedisServer::start_with(&["--maxmemory", "24mb"]).await;
    let b = Backend::start().await;
    let config = replica(&b, &redis).set("store.max_bytes", "4MiB");
    let a = Idem::start(&config.to_string()).await;
    let other = Idem::start(&config.to_string()).await;
    let attacker = from(2);
    for n in 0..190 {
        let h = [("x-body-size", "131072"), HOST];
        let r = post(
            &attacker,
            &a,
            &format!("/fill/{n}"),
            Some(&format!("f-{n}")),
            &h,
            b"{}",
        )
        .await;
        r.leader(1);
    }
    let evicted = metric(&a, capacity_evictions()).await;
    let kept = metric(&a, "idem_store_entries").await;
    assert_eq!(kept + evicted, 190.0);
    assert!(kept <= 32.0, "{kept} records of 128 KiB in a 4 MiB store");
    // Every record evicted here is deleted in Redis (in the background).
    wait_metric(&a, &store_op("forget", "deleted"), evicted).await;
    let stored = redis
        .idem_entries()
        .await
        .into_iter()
        .filter(|(_, v)| value_kind(v) == 'S')
        .count();
    assert_eq!(stored as f64, kept);
    let used = redis.used_memory().await;
    println!(
        "redis used_memory after the flood: {} KiB; {kept} records kept, {evicted} deleted",
        used / 1024
    );
    assert!(used < 12 << 20, "Redis holds {used} bytes");

    // The victim's key: one execution, the other replica replays it.
    let victim = from(3);
    post(&victim, &a, "/charge", Some("c-1"), &[HOST], b"{}")
        .await
        .leader(1);
    post(&victim, &other, "/charge", Some("c-1"), &[HOST], b"{}")
        .await
        .replay(1);
    assert_eq!(b.settled("/charge").await.started, 1);
    for idem in [&a, &other] {
        assert_eq!(metric(idem, &store_op("claim", "full")).await, 0.0);
        assert_eq!(
            metric(idem, "idem_store_unavailable_total{policy=\"fail-open\"}").await,
            0.0
        );
    }
}

/// A Redis that refuses writes (full) never causes a second execution silently. A refused
/// result write keeps the claim for the record's retention: the other replica answers
/// outcome unknown (the call ran; its answer is on the first replica only), which replays
/// it. A refused claim applies `on_store_error`: fail-open serves with each replica's local
/// dedup only (a retry on the other replica runs again, counted on each as
/// `idem_store_unavailable_total{policy="fail-open"}` and `claim`/`full`), fail-closed
/// answers 503 store-unavailable.
#[tokio::test]
async fn a_full_redis_never_runs_a_key_twice_silently() {
    let redis = RedisServer::start().await;
    let b = Backend::start().await;
    // A short hold, so that the test can see past it.
    let hold = Duration::from_secs(2);
    let open = replica(&b, &redis)
        .set("upstream.read_timeout", "2s")
        .set("upstream.total_timeout", "2s")
        .set("server.grace_period", "5s");
    let a = Idem::start(&open.to_string()).await;
    let other = Idem::start(&open.to_string()).await;
    let closed = Idem::start(
        &open
            .clone()
            .set("store.on_store_error", "fail-closed")
            .to_string(),
    )
    .await;
    let http = from(3);

    // The result write is refused: Redis fills while the call runs.
    let gate = b.gate("/charge");
    let started = Instant::now();
    let first = {
        let (http, url) = (http.clone(), a.url("/charge"));
        tokio::spawn(async move {
            http.post(url)
                .header(HOST.0, HOST.1)
                .header("idempotency-key", "c-1")
                .body("{}")
                .send()
                .await
                .expect("POST")
                .status()
        })
    };
    gate.wait_started(1).await;
    redis
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .await
        .unwrap();
    gate.open();
    assert_eq!(first.await.unwrap(), 200);
    wait_metric(&a, &store_op("settle", "full"), 1.0).await;
    let elsewhere = post(&http, &other, "/charge", Some("c-1"), &[HOST], b"{}").await;
    elsewhere.problem(502, "outcome-unknown");
    // Past the call's hold the claim is still there (kept for the record's retention): the
    // key does not run again anywhere. (A deliberate wait: the hold is what is tested.)
    tokio::time::sleep_until(started + hold + Duration::from_millis(500)).await;
    let later = post(&http, &other, "/charge", Some("c-1"), &[HOST], b"{}").await;
    later.problem(502, "outcome-unknown");
    post(&http, &a, "/charge", Some("c-1"), &[HOST], b"{}")
        .await
        .replay(1);
    assert_eq!(b.settled("/charge").await.started, 1);

    // The claim is refused.
    post(&http, &a, "/pay", Some("p-1"), &[HOST], b"{}")
        .await
        .leader(1);
    post(&http, &other, "/pay", Some("p-1"), &[HOST], b"{}")
        .await
        .leader(2);
    post(&http, &a, "/pay", Some("p-1"), &[HOST], b"{}")
        .await
        .replay(1);
    closed_refuses(&closed, &http).await;
    for idem in [&a, &other] {
        assert_eq!(metric(idem, &store_op("claim", "full")).await, 1.0);
        assert_eq!(
            metric(idem, "idem_store_unavailable_total{policy=\"fail-open\"}").await,
            1.0
        );
    }
    assert_eq!(b.settled("/pay").await.started, 2);
    assert_eq!(b.counts("/closed").started, 0);
}

async fn closed_refuses(closed: &Idem, http: &reqwest::Client) {
    let r = post(http, closed, "/closed", Some("x-1"), &[HOST], b"{}").await;
    r.problem(503, "store-unavailable");
    assert_eq!(metric(closed, &store_op("claim", "full")).await, 1.0);
    assert_eq!(
        metric(
            closed,
            "idem_store_unavailable_total{policy=\"fail-closed\"}"
        )
        .await,
        1.0
    );
}

/// The MAC a record carries: what the test writes as an insider holding the secret.
fn mac(name: &str, value: &[u8]) -> [u8; 32] {
    let key = blake3::derive_key("idem 2026-11 redis record mac", SECRET.as_bytes());
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(value);
    *h.finalize().as_bytes()
}

/// A stored-response record with the 50-byte prefix of `like` (version, kind, fingerprint,
/// token), `headers` and `body`, authenticated for `name` when `sign`.
fn record(name: &str, like: &[u8], headers: &[(&str, &str)], body: &[u8], sign: bool) -> Vec<u8> {
    let mut v = like[..50].to_vec();
    v[1] = b'S';
    v.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
    v.extend_from_slice(&200u16.to_le_bytes());
    v.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (n, val) in headers {
        v.extend_from_slice(&(n.len() as u16).to_le_bytes());
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(&(val.len() as u32).to_le_bytes());
        v.extend_from_slice(val.as_bytes());
    }
    v.extend_from_slice(&(body.len() as u64).to_le_bytes());
    v.extend_from_slice(body);
    let tag = if sign { mac(name, &v) } else { [0u8; 32] };
    v.extend_from_slice(&tag);
    v
}

/// Finding 4: whoever could write Redis could replace a record and another replica replayed
/// it; a forged record carrying `Transfer-Encoding: chunked`, `Connection` and
/// `Content-Length` made idem send both framing headers and a body holding a second
/// response. Records now carry a MAC: a forged one is a store error (fail-closed: 503; never
/// replayed). And framing never comes from a record, even an authentic one: an insider's
/// record with framing headers is replayed with its body's own length, and the next request
/// on the connection gets its own answer.
#[tokio::test]
async fn forged_redis_records_are_never_replayed_and_framing_never_comes_from_one() {
    let redis = RedisServer::start().await;
    let b = Backend::start().await;
    let open = replica(&b, &redis);
    let a = Idem::start(&open.to_string()).await;
    let closed = Idem::start(
        &open
            .clone()
            .set("store.on_store_error", "fail-closed")
            .to_string(),
    )
    .await;
    let reader = Idem::start(&open.to_string()).await;
    let http = from(3);
    post(&http, &a, "/charge", Some("c-1"), &[HOST], b"{}")
        .await
        .leader(1);
    let (name, legit) = redis.idem_entries().await.pop().expect("the record");
    assert_eq!(value_kind(&legit), 'S');
    let smuggled = b"hello0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled";
    let framing = [
        ("content-type", "text/plain"),
        ("transfer-encoding", "chunked"),
        ("connection", "close"),
        ("content-length", "5"),
        ("x-forged", "1"),
    ];

    // Without the secret: a store error, never a replay.
    redis
        .set_raw(
            &name,
            &record(&name, &legit, &framing, smuggled, false),
            60_000,
        )
        .await;
    post(&http, &closed, "/charge", Some("c-1"), &[HOST], b"{}")
        .await
        .problem(503, "store-unavailable");
    closed.wait_stderr("fails its authentication").await;
    assert_eq!(metric(&closed, &store_op("claim", "error")).await, 1.0);
    assert_eq!(b.counts("/charge").started, 1);

    // With it (an insider): replayed, but framed by idem alone.
    redis
        .set_raw(
            &name,
            &record(&name, &legit, &framing, smuggled, true),
            60_000,
        )
        .await;
    let mut conn = RawConn::connect_from(reader.addr(), IpAddr::from([127, 0, 0, 3])).await;
    let h = [
        ("host", HOST.1.to_string()),
        ("idempotency-key", "c-1".to_string()),
    ];
    let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
    conn.send(&http_request("POST", "/charge", &h, b"{}")).await;
    let replayed = conn.read_response().await;
    assert_eq!(replayed.status, 200, "{replayed:?}");
    assert_eq!(
        replayed.body, smuggled,
        "the body is data, whatever it holds"
    );
    assert_eq!(
        replayed.header_values("content-length"),
        [smuggled.len().to_string().as_bytes()]
    );
    assert!(
        replayed.header_values("transfer-encoding").is_empty(),
        "{replayed:?}"
    );
    assert_ne!(replayed.header("connection"), Some("close"), "{replayed:?}");
    assert_eq!(replayed.header("x-forged"), Some("1"));
    // The connection carries on: the next request gets its own answer.
    let h = [
        ("host", HOST.1.to_string()),
        ("idempotency-key", "c-2".to_string()),
    ];
    let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
    conn.send(&http_request("POST", "/next", &h, b"{}")).await;
    let next = conn.read_response().await;
    assert_eq!(
        (next.status, next.header("x-backend-call")),
        (200, Some("1")),
        "{next:?}"
    );
    assert_eq!(b.settled("/charge").await.started, 1);
}

// ---------------------------------------------------------------------------
// Finding 5: credentials and private answers reached other clients
// ---------------------------------------------------------------------------

/// On a fingerprint route, clients sharing a constant cookie (`consent=yes`), sending an
/// empty `Authorization:` or none used to receive the first one's `Set-Cookie`; so did
/// `Set-Cookie2`, `Authentication-Info`, `X-Auth-Token`, and `Cache-Control: private,
/// no-store` responses. Credentials now reach only the leader's client unless the scope
/// holds a credential that identifies the caller, private responses are not shared outside
/// such a scope (409 private-response), and neither rule runs anything twice.
#[tokio::test]
async fn credentials_and_private_answers_stay_with_their_client() {
    let b = Backend::start().await;
    let config = config(&b)
        .route(Route::new("fp", "/fp/", "fingerprint"))
        .route(
            Route::new("session", "/session/", "fingerprint")
                .set("scope_cookies", vec!["sessionid"]),
        );
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let minted = [
        ("x-set-cookie", "session=first-clients"),
        ("x-header", "set-cookie2: legacy=1"),
        ("x-header", "authentication-info: nextnonce=abc"),
        ("x-header", "x-auth-token: t0k3n"),
        ("x-header", "x-shared: kept"),
    ];
    let credentials = [
        "set-cookie",
        "set-cookie2",
        "authentication-info",
        "x-auth-token",
    ];
    for (i, scope) in [
        vec![("cookie", "consent=yes")],
        vec![("authorization", "")],
        vec![],
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/fp/login/{i}");
        let headers: Vec<(&str, &str)> = minted.iter().copied().chain(scope).collect();
        let first = post(&http, &idem, &path, None, &headers, b"{}").await;
        first.leader(1);
        for c in credentials {
            assert!(!first.header(c).is_empty(), "the leader gets its own {c}");
        }
        let second = post(&http, &idem, &path, None, &headers, b"{}").await;
        second.replay(1);
        for c in credentials {
            assert_eq!(
                second.header(c),
                "",
                "{c} reached another client: {second:?}"
            );
        }
        assert_eq!(second.header("x-shared"), "kept");
    }
    // An empty Authorization is no Authorization: the same (anonymous) scope.
    post(&http, &idem, "/fp/login/1", None, &minted, b"{}")
        .await
        .replay(1);

    // Private answers go to their leader only.
    for cc in ["private", "no-store"] {
        let path = format!("/fp/account/{cc}");
        let h = [("x-header", &*format!("cache-control: {cc}"))];
        post(&http, &idem, &path, None, &h, b"{}").await.leader(1);
        let r = post(&http, &idem, &path, None, &h, b"{}").await;
        r.problem(409, "private-response");
        assert_eq!(b.settled(&path).await.started, 1);
    }

    // API keys identify their caller: each user its own call, and a user's retry gets
    // its own credentials back.
    let (k1, k2) = ([("x-api-key", "user-1")], [("x-api-key", "user-2")]);
    let with = |k: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        k.iter().copied().chain(minted.iter().copied()).collect()
    };
    post(&http, &idem, "/fp/export", None, &with(&k1), b"{}")
        .await
        .leader(1);
    post(&http, &idem, "/fp/export", None, &with(&k2), b"{}")
        .await
        .leader(2);
    let again = post(&http, &idem, "/fp/export", None, &with(&k1), b"{}").await;
    again.replay(1);
    assert_eq!(again.header("set-cookie"), "session=first-clients");
    // A named session cookie identifies its caller; other cookies do not split its scope.
    let s1 = [
        ("cookie", "sessionid=abc; _ga=1"),
        ("x-set-cookie", "csrf=1"),
    ];
    let s2 = [
        ("cookie", "_ga=2; sessionid=abc"),
        ("x-set-cookie", "csrf=1"),
    ];
    post(&http, &idem, "/session/x", None, &s1, b"{}")
        .await
        .leader(1);
    let r = post(&http, &idem, "/session/x", None, &s2, b"{}").await;
    r.replay(1);
    assert_eq!(r.header("set-cookie"), "csrf=1");
    assert_eq!(b.settled("/fp/export").await.started, 2);
    assert_eq!(b.settled("/session/x").await.started, 1);
}

// ---------------------------------------------------------------------------
// Finding 6: routes matched the raw path
// ---------------------------------------------------------------------------

/// `/public/../account/export` (and `%2e%2e`, `//..`) was handled by the `/public/` route
/// while the backend served `/account/export`: a second user got the first one's export.
/// idem now routes on the path's normal form and forwards it, so the `/account/` route's
/// policy (its scope) applies; an encoded slash that would change the route is refused;
/// `/api` no longer matches `/apiary`.
#[tokio::test]
async fn routes_match_the_normal_form_of_the_path_on_segment_boundaries() {
    let b = Backend::start().await;
    let config = config(&b)
        .route(
            Route::new("public", "/public/", "fingerprint")
                .set("scope_headers", Vec::<String>::new()),
        )
        .route(Route::new("account", "/account/", "fingerprint"))
        .route(Route::new("api", "/api", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    // Sent byte for byte: HTTP clients resolve dot segments themselves, attackers do not.
    let addr = idem.addr();
    let raw = |path: &'static str, who: &'static str| async move {
        let h = [("authorization", who)];
        raw_request(addr, &http_request("POST", path, &h, path.as_bytes())).await
    };
    let mut call = 0;
    for path in [
        "/public/../account/export",
        "/public/%2e%2e/account/export",
        "/public/%2E%2e/account/export",
        "/public//../account/export",
        "/account/./export",
    ] {
        for who in ["Bearer alice", "Bearer bob"] {
            call += 1;
            let r = raw(path, who).await;
            assert_eq!(r.status, 200, "{path}: {r:?}");
            assert_eq!(
                r.header("x-backend-call"),
                Some(&*call.to_string()),
                "{path}: {r:?}"
            );
            assert_eq!(r.header("cache-status"), Some("idem; fwd=uri-miss; stored"));
        }
    }
    // The backend saw the normal form only.
    let seen: std::collections::BTreeSet<String> = b
        .all_requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(seen, ["/account/export".to_string()].into_iter().collect());
    // Counted once the answer is written: waited for, not read at once.
    wait_metric(&idem, &requests("account", "leader"), 10.0).await;
    assert_eq!(metric(&idem, &requests("public", "leader")).await, 0.0);

    // An encoded slash that changes the route: refused. One that does not: served.
    assert_problem(
        &raw("/public/..%2faccount/export", "Bearer bob").await,
        400,
        "bad-path",
    );
    let r = raw("/public/a%2Fb", "Bearer bob").await;
    assert_eq!(r.header("x-backend-call"), Some("1"), "{r:?}");
    assert_eq!(b.requests("/public/a%2Fb").len(), 1);

    // Prefixes match on segment boundaries.
    post(&http, &idem, "/api/x", None, &[], b"{}")
        .await
        .leader(1);
    let r = post(&http, &idem, "/apiary", None, &[], b"{}").await;
    assert_eq!(
        r.header("cache-status"),
        "idem; fwd=bypass",
        "the default route: keyed"
    );
    wait_metric(&idem, &requests("default", "bypass"), 1.0).await;
}

fn requests(route: &str, outcome: &str) -> String {
    series_id(
        "idem_requests_total",
        [("outcome", outcome), ("route", route)],
    )
}

// ---------------------------------------------------------------------------
// Finding 7: the admin listener accepted any Host
// ---------------------------------------------------------------------------

/// A DNS-rebinding page in a browser on the host read `/flights`, purged a key, and the
/// charge ran twice. The admin listener now answers only requests whose `Host` names
/// loopback and that carry no `Origin`, and, when configured, the bearer token.
#[tokio::test]
async fn the_admin_listener_refuses_browsers_and_other_host_names() {
    let b = Backend::start().await;
    let token = "an-admin-token-of-some-length";
    let config = config(&b).set("admin.listen", "127.0.0.1:0");
    let idem = Idem::start(&config.to_string()).await;
    let guarded = Idem::start(&config.clone().set("admin.token", token).to_string()).await;
    let http = client();
    post(&http, &idem, "/charge", Some("c-1"), &[], b"{}")
        .await
        .leader(1);
    idem.wait_stderr("method=POST path=/charge").await;
    let key = idem
        .stderr_text()
        .lines()
        .find(|l| l.contains("method=POST path=/charge"))
        .and_then(|l| l.split("key=").nth(1))
        .map(|k| k[..12].to_string())
        .expect("the key in the access log");
    let admin = |idem: &Idem, method: reqwest::Method, path: &str, headers: &[(&str, &str)]| {
        let mut req = http.request(method, idem.admin_url(path));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.send()
    };
    let purge = format!("/keys/{key}");
    let rebound = format!("attacker.example:{}", idem.admin_addr().port());
    for (method, path) in [
        (reqwest::Method::GET, "/flights"),
        (reqwest::Method::DELETE, &purge[..]),
    ] {
        let r = admin(&idem, method.clone(), path, &[("host", &rebound)])
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        let page = [("origin", "http://attacker.example")];
        let r = admin(&idem, method, path, &page).await.unwrap();
        assert_eq!(r.status(), 403);
    }
    // Nothing was purged: the retry is a replay.
    post(&http, &idem, "/charge", Some("c-1"), &[], b"{}")
        .await
        .replay(1);
    assert_eq!(b.settled("/charge").await.started, 1);
    let refusals = |reason: &str| series_id("idem_admin_refusals_total", [("reason", reason)]);
    assert_eq!(metric(&idem, &refusals("host")).await, 2.0);
    assert_eq!(metric(&idem, &refusals("origin")).await, 2.0);
    // Loopback names with and without a port are served.
    let port = idem.admin_addr().port();
    for host in [
        format!("localhost:{port}"),
        "127.0.0.1".to_string(),
        format!("[::1]:{port}"),
    ] {
        let r = admin(&idem, reqwest::Method::GET, "/store", &[("host", &host)])
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }

    // With a token: missing or wrong, 401; right, served.
    let r = admin(&guarded, reqwest::Method::GET, "/store", &[])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let wrong = [("authorization", "Bearer not-the-token-at-all")];
    let r = admin(&guarded, reqwest::Method::GET, "/store", &wrong)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let right = format!("Bearer {token}");
    let r = admin(
        &guarded,
        reqwest::Method::GET,
        "/store",
        &[("authorization", &right)],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(metric(&guarded, &refusals("token")).await, 2.0);
}
