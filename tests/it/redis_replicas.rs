//! Several idem replicas sharing keys through real Redis (one node and a cluster):
//! DESIGN section 8. Each test starts its own `redis-server` processes on free loopback
//! ports, its own backend and its own idem replicas.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::*;

/// Replicas share the deployment secret: without it they would derive different keys.
const SECRET: &str = "replicas-share-this-secret-0123456789";

const ONE_CALL: Counts = Counts {
    started: 1,
    completed: 1,
    aborted: 0,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A replica's config on the Redis node at `url` (or the cluster `nodes`), polling every
/// 100 ms (tests that prove pub/sub wake-ups raise it to 10 s).
fn replica(backend: &Backend, store: &Store) -> Config {
    let c = Config::new(backend.addr())
        .set("store.kind", "redis")
        .set("dedup.secret", SECRET)
        .set("store.poll_interval", "100ms")
        .set("store.liveness_ttl", "1s");
    match store {
        Store::Url(u) => c.set("store.url", u.as_str()),
        Store::Nodes(n) => c.set("store.nodes", n.clone()),
    }
}

enum Store {
    Url(String),
    Nodes(Vec<String>),
}

async fn start_replicas(config: &Config, n: usize) -> Vec<Idem> {
    let text = config.to_string();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Idem::start(&text).await);
    }
    out
}

/// A POST on a fresh connection, read byte for byte.
async fn post(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if let Some(k) = key {
        h.push(("idempotency-key", k));
    }
    raw_request(addr, &http_request("POST", path, &h, body)).await
}

fn spawn_post(
    set: &mut JoinSet<RawResponse>,
    addr: SocketAddr,
    path: &str,
    key: &str,
    headers: &[(&'static str, &'static str)],
    body: &[u8],
) {
    let (path, key, body, headers) = (
        path.to_owned(),
        key.to_owned(),
        body.to_vec(),
        headers.to_vec(),
    );
    set.spawn(async move { post(addr, &path, Some(&key), &headers, &body).await });
}

async fn collect(mut set: JoinSet<RawResponse>) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

fn cache_status(r: &RawResponse) -> &str {
    r.header("cache-status")
        .unwrap_or_else(|| panic!("no cache-status: {r:#?}"))
}

fn assert_replay(r: &RawResponse) {
    assert!(
        cache_status(r).starts_with("idem; hit; ttl="),
        "not a replay: {r:#?}"
    );
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
}

/// `idem_store_operations_total{op, result}`.
fn store_ops(op: &str, result: &str) -> String {
    series_id(
        "idem_store_operations_total",
        [("op", op), ("result", result)],
    )
}

/// `idem_store_unavailable_total{policy}`.
fn store_unavailable(policy: &str) -> String {
    series_id("idem_store_unavailable_total", [("policy", policy)])
}

/// Waits until `n` leaders on other replicas are parked on a claim: subscribed to its
/// channel and done with their first read, so that only a message (or a poll) wakes them.
async fn wait_remote_waits(replicas: &[Idem], n: usize) {
    wait_metric_sum(replicas, &store_ops("subscribe", "ok"), n as f64).await;
    // Each waiter reads the key once it is subscribed, then again at every poll: at least
    // one read each (a loaded machine may scrape after the second).
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let mut peeks = 0.0;
        for idem in replicas {
            peeks += metric_or_zero(idem, &store_ops("peek", "ok")).await;
        }
        if peeks >= n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{peeks} reads by {n} remote waiters after {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every one of `per_replica[i]` requests sent to `replicas[i]` is attached to
/// the replica's one flight for each of `keys` keys: the leader's call is then the only one.
async fn wait_attached(replicas: &[Idem], per_replica: &[usize], keys: usize) {
    for (idem, n) in replicas.iter().zip(per_replica) {
        wait_metric(idem, "idem_inflight_keys", keys as f64).await;
        wait_metric(idem, "idem_waiters", (n - keys) as f64).await;
    }
}

/// 200 identical keyed requests spread over `replicas`, for each of `keys`: one backend
/// execution per key, every client of a key the same body; afterwards a retry on any
/// replica, and on a replica started afterwards (nothing cached locally), is replayed.
async fn one_call_per_key_across(
    replicas: &[Idem],
    late: &Config,
    backend: &Backend,
    keys: &[&str],
) {
    const N: usize = 200;
    let path = "/orders/new";
    let gate = backend.gate(path);
    let body = br#"{"sku":42,"qty":1}"#;
    let headers = [("content-type", "application/json")];
    let mut set = JoinSet::new();
    let mut per_replica = vec![0usize; replicas.len()];
    for i in 0..N {
        // Every key reaches every replica.
        let r = (i / keys.len()) % replicas.len();
        per_replica[r] += 1;
        spawn_post(
            &mut set,
            replicas[r].addr(),
            path,
            keys[i % keys.len()],
            &headers,
            body,
        );
    }
    gate.wait_started(keys.len() as u64).await;
    wait_attached(replicas, &per_replica, keys.len()).await;
    wait_remote_waits(replicas, keys.len() * (replicas.len() - 1)).await;
    assert_eq!(gate.arrived(), keys.len() as u64, "a second call per key");
    let opened = Instant::now();
    gate.open();
    let seen = collect(set).await;
    assert_eq!(seen.len(), N);
    // The replicas poll every 10 s here: only pub/sub can have woken them this soon.
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "waiters on other replicas were not woken promptly: {:?}",
        opened.elapsed()
    );

    // Per key: one body, one call number, exactly one leader response.
    let mut bodies = std::collections::HashMap::new();
    let mut leaders = 0;
    for r in &seen {
        assert_eq!(r.status, 200, "{r:#?}");
        let call = r
            .header("x-backend-call")
            .expect("x-backend-call")
            .to_owned();
        let first = bodies.entry(call).or_insert_with(|| r.body.clone());
        assert!(*first == r.body, "two bodies for one call: {r:#?}");
        match cache_status(r) {
            "idem; fwd=uri-miss; stored" => leaders += 1,
            "idem; fwd=uri-miss; collapsed" => {
                assert_eq!(r.header("idempotent-replayed"), Some("true"))
            }
            other if other.starts_with("idem; hit; ttl=") => {}
            other => panic!("unexpected cache-status {other:?}: {r:#?}"),
        }
    }
    assert_eq!(bodies.len(), keys.len(), "one execution per key");
    assert_eq!(leaders, keys.len(), "one leader response per key");
    let total = backend.total();
    assert_eq!(total.started, keys.len() as u64, "{total:?}");

    // Retries after completion: replayed by every replica, and by a new one.
    let fresh = Idem::start(&late.to_string()).await;
    for idem in replicas.iter().chain(std::iter::once(&fresh)) {
        for key in keys {
            let r = post(idem.addr(), path, Some(key), &headers, body).await;
            assert_eq!(r.status, 200, "{r:#?}");
            assert_replay(&r);
            let call = r.header("x-backend-call").unwrap();
            assert_eq!(Some(&r.body), bodies.get(call), "replayed body");
        }
    }
    wait_metric(&fresh, &store_ops("claim", "hit"), keys.len() as f64).await;
    assert_eq!(backend.total().started, keys.len() as u64);
}

// ---------------------------------------------------------------------------
// 1. Two and three replicas on one Redis
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_make_one_call_and_replay_everywhere() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url())).set("store.poll_interval", "10s");
    let replicas = start_replicas(&config, 2).await;
    one_call_per_key_across(&replicas, &config, &backend, &["order-1"]).await;
    let entries = redis.idem_entries().await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(value_kind(&entries[0].1), 'S');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_make_one_call_and_replay_everywhere() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url())).set("store.poll_interval", "10s");
    let replicas = start_replicas(&config, 3).await;
    one_call_per_key_across(&replicas, &config, &backend, &["order-1"]).await;
    // Exactly one replica claimed the key; the others found the claim (or the record).
    let mut claimed = 0.0;
    for idem in &replicas {
        claimed += metric_or_zero(idem, &store_ops("claim", "claimed")).await;
    }
    assert_eq!(claimed, 1.0);
}

// ---------------------------------------------------------------------------
// 2. The incident with the retry on another replica
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeout_then_retry_on_another_replica_runs_once() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url()))
        .set("store.poll_interval", "10s")
        .route(Route::new("signup", "/signup/", "fingerprint").set("fingerprint_ttl", "60s"));
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let path = "/signup/rows";
    let gate = backend.gate(path);
    let body = r#"{"name":"ada"}"#;
    let post_to = |idem: &Idem, http: &reqwest::Client| {
        // Behind a load balancer every replica sees the same authority (part of the scope).
        http.post(idem.url(path))
            .header("host", "api.test")
            .header("content-type", "application/json")
            .body(body)
    };

    // The impatient client gives up on replica A while the app is still working.
    let impatient = client_with_timeout(Duration::from_millis(300));
    let first = post_to(a, &impatient).send().await;
    assert!(
        first.as_ref().is_err_and(|e| e.is_timeout()),
        "the first client should have timed out: {first:?}"
    );
    gate.wait_started(1).await;
    wait_metric(
        a,
        &series_id(
            "idem_requests_total",
            [("route", "signup"), ("outcome", "leader")],
        ),
        1.0,
    )
    .await;

    // Its retry lands on replica B, which finds A's claim and waits for it.
    let http = client();
    let retry = tokio::spawn(post_to(b, &http).send());
    wait_remote_waits(std::slice::from_ref(b), 1).await;
    assert_eq!(gate.arrived(), 1);
    let opened = Instant::now();
    gate.open();
    let during = retry.await.unwrap().expect("retry on B");
    // B polls every 10 s: the settle message woke it.
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "{:?}",
        opened.elapsed()
    );
    assert_eq!(during.status(), 201);
    assert_eq!(
        during.headers()["cache-status"],
        "idem; fwd=uri-miss; collapsed"
    );
    let during_body = during.text().await.unwrap();
    let row: serde_json::Value = serde_json::from_str(&during_body).unwrap();
    assert_eq!(row["created"], true);

    // Later retries on either replica are replays of that response.
    for idem in [a, b] {
        let r = post_to(idem, &http).send().await.expect("retry after");
        assert_eq!(r.status(), 201);
        assert!(r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .starts_with("idem; hit; ttl="));
        assert_eq!(r.text().await.unwrap(), during_body);
    }
    assert_eq!(backend.settled(path).await, ONE_CALL);
    assert_eq!(backend.rows().len(), 1, "rows: {:?}", backend.rows());
    wait_metric(
        a,
        &series_id("idem_detached_completions_total", [("route", "signup")]),
        1.0,
    )
    .await;
}

// ---------------------------------------------------------------------------
// 3. Redis killed mid-flight and restarted
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_fail_open_keeps_local_dedup_fail_closed_answers_503() {
    let mut redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let base = replica(&backend, &Store::Url(redis.url())).set("store.timeout", "500ms");
    let open = Idem::start(
        &base
            .clone()
            .set("store.on_store_error", "fail-open")
            .to_string(),
    )
    .await;
    let closed = Idem::start(&base.set("store.on_store_error", "fail-closed").to_string()).await;
    let headers = [("content-type", "text/plain")];

    // A call in flight on the fail-open replica: its claim is in Redis.
    let gate = backend.gate("/slow/one");
    let mut first = JoinSet::new();
    spawn_post(&mut first, open.addr(), "/slow/one", "k1", &headers, b"1");
    gate.wait_started(1).await;
    let entries = redis.idem_entries().await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(value_kind(&entries[0].1), 'C', "a claim");

    // Redis dies mid-flight: the response already on its way is still delivered.
    redis.kill();
    gate.open();
    let r = collect(first).await.remove(0);
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(cache_status(&r), "idem; fwd=uri-miss; stored");
    wait_metric(&open, &store_ops("settle", "error"), 1.0).await;

    // Fail-closed: 503 store-unavailable, nothing forwarded.
    let r = post(closed.addr(), "/closed", Some("k2"), &headers, b"2").await;
    assert_problem(&r, 503, "store-unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(backend.counts("/closed").started, 0);
    wait_metric(&closed, &store_unavailable("fail-closed"), 1.0).await;

    // Fail-open: served, still deduplicated on the replica, and counted.
    let gate = backend.gate("/slow/two");
    let mut set = JoinSet::new();
    for _ in 0..10 {
        spawn_post(&mut set, open.addr(), "/slow/two", "k3", &headers, b"3");
    }
    gate.wait_started(1).await;
    wait_attached(std::slice::from_ref(&open), &[10], 1).await;
    gate.open();
    let seen = collect(set).await;
    assert!(seen
        .iter()
        .all(|r| r.status == 200 && r.body == seen[0].body));
    assert_eq!(backend.settled("/slow/two").await, ONE_CALL);
    wait_metric(&open, &store_unavailable("fail-open"), 1.0).await;

    // Redis comes back (empty: no persistence); both replicas reconnect by themselves.
    redis.restart().await;
    for idem in [&open, &closed] {
        wait_metric(idem, "idem_store_connected", 1.0).await;
    }
    let gate = backend.gate("/slow/three");
    let mut third = JoinSet::new();
    spawn_post(&mut third, open.addr(), "/slow/three", "k4", &headers, b"4");
    gate.wait_started(1).await;
    let entries = redis.idem_entries().await;
    assert_eq!(
        entries.len(),
        1,
        "a new claim in the restarted Redis: {entries:?}"
    );
    assert_eq!(value_kind(&entries[0].1), 'C');
    gate.open();
    assert_eq!(collect(third).await[0].status, 200);
    let r = post(closed.addr(), "/closed", Some("k5"), &headers, b"5").await;
    assert_eq!(r.status, 200, "fail-closed serves again: {r:#?}");
    let kinds: Vec<char> = redis
        .idem_entries()
        .await
        .iter()
        .map(|(_, v)| value_kind(v))
        .collect();
    assert_eq!(kinds, ['S', 'S'], "both results are in Redis");
    assert_eq!(
        find_metric(&open, &store_unavailable("fail-open"),).await,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------
// 4. The leader's replica dies mid-flight
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_leader_replica_leaves_the_key_held_then_exactly_one_execution() {
    const TOTAL: Duration = Duration::from_secs(3);
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url()))
        .set("upstream.read_timeout", "3s")
        .set("upstream.total_timeout", "3s");
    let replicas = start_replicas(&config, 3).await;
    let (a, others) = (&replicas[0], &replicas[1..]);
    let path = "/pay";
    let headers = [("content-type", "text/plain")];
    let body = b"amount=10";
    let gate = backend.gate(path);

    let mut leader = JoinSet::new();
    spawn_post(&mut leader, a.addr(), path, "pay-1", &headers, body);
    gate.wait_started(1).await;
    let claimed_at = Instant::now();
    let mut waiting = JoinSet::new();
    for idem in others {
        for _ in 0..2 {
            spawn_post(&mut waiting, idem.addr(), path, "pay-1", &headers, body);
        }
    }
    wait_attached(others, &[2, 2], 1).await;

    // The leader's replica is killed: its claim stays, its liveness key expires.
    assert!(a.signal(libc::SIGKILL));
    for r in collect(waiting).await {
        assert_problem(&r, 502, "outcome-unknown");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3).contains(&retry), "retry-after {retry}");
    }
    // During the hold: answered at once, never executed.
    for idem in others {
        let r = post(idem.addr(), path, Some("pay-1"), &headers, body).await;
        assert_problem(&r, 502, "outcome-unknown");
    }
    assert_eq!(gate.arrived(), 1, "no execution during the hold");

    // After start plus the total deadline: exactly one new execution across the replicas.
    tokio::time::sleep_until(claimed_at + TOTAL + Duration::from_millis(300)).await;
    let mut after = JoinSet::new();
    for idem in others {
        for _ in 0..3 {
            spawn_post(&mut after, idem.addr(), path, "pay-1", &headers, body);
        }
    }
    gate.wait_started(2).await;
    wait_attached(others, &[3, 3], 1).await;
    assert_eq!(gate.arrived(), 2, "exactly one execution after the hold");
    gate.open();
    let seen = collect(after).await;
    for r in &seen {
        assert_eq!(r.status, 200, "{r:#?}");
        assert_eq!(r.header("x-backend-call"), Some("2"));
    }
    assert_eq!(backend.counts(path).started, 2);
}

// ---------------------------------------------------------------------------
// 5. Redis Cluster
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_masters_one_call_per_key_across_replicas() {
    let cluster = RedisCluster::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Nodes(cluster.urls())).set("store.poll_interval", "10s");
    let replicas = start_replicas(&config, 2).await;
    let keys = [
        "order-a", "order-b", "order-c", "order-d", "order-e", "order-f", "order-g", "order-h",
    ];
    one_call_per_key_across(&replicas, &config, &backend, &keys).await;
    // Each master holds the records of its slots: the keys span at least two of them.
    let mut holding = 0;
    let mut total = 0;
    for node in &cluster.nodes {
        let entries = node.idem_entries().await;
        assert!(entries.iter().all(|(_, v)| value_kind(v) == 'S'));
        total += entries.len();
        holding += usize::from(!entries.is_empty());
    }
    assert_eq!(total, keys.len());
    assert!(holding >= 2, "keys on {holding} master(s) only");
}

// ---------------------------------------------------------------------------
// 6. Byte-exact replay across replicas
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_body_and_repeated_set_cookie_replay_byte_exact_across_replicas() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url()));
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let path = "/blob";
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let headers = [
        ("authorization", "Bearer alice"),
        ("content-type", "application/octet-stream"),
        ("x-echo", "1"),
        ("x-content-type", "application/octet-stream"),
        ("x-set-cookie", "a=1; Path=/"),
        ("x-set-cookie", "b=2; HttpOnly"),
        ("x-set-cookie", "a=3; Path=/x"),
    ];
    let gate = backend.gate(path);
    let mut first = JoinSet::new();
    spawn_post(&mut first, a.addr(), path, "blob-1", &headers, &body);
    gate.wait_started(1).await;
    let mut second = JoinSet::new();
    spawn_post(&mut second, b.addr(), path, "blob-1", &headers, &body);
    wait_metric(b, &store_ops("claim", "inflight"), 1.0).await;
    gate.open();
    let leader = collect(first).await.remove(0);
    let collapsed = collect(second).await.remove(0);
    assert_eq!(cache_status(&collapsed), "idem; fwd=uri-miss; collapsed");
    let fresh = Idem::start(&config.to_string()).await;
    let mut seen = vec![leader, collapsed];
    for idem in [a, b, &fresh] {
        let r = post(idem.addr(), path, Some("blob-1"), &headers, &body).await;
        assert_replay(&r);
        seen.push(r);
    }
    for r in &seen {
        assert_eq!(r.status, 200, "{r:#?}");
        assert!(r.body == body, "body differs byte-wise");
        assert_eq!(
            r.header_values("set-cookie"),
            [&b"a=1; Path=/"[..], b"b=2; HttpOnly", b"a=3; Path=/x"],
            "{r:#?}"
        );
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.header("x-backend-call"), Some("1"));
    }
    assert_eq!(backend.settled(path).await, ONE_CALL);

    // The same key with another body, on a replica that never saw it: misuse, found in Redis.
    let other = Idem::start(&config.to_string()).await;
    let r = post(
        other.addr(),
        path,
        Some("blob-1"),
        &headers,
        b"another body",
    )
    .await;
    assert_problem(&r, 422, "fingerprint-mismatch");
    wait_metric(&other, &store_ops("claim", "mismatch"), 1.0).await;
    assert_eq!(backend.counts(path).started, 1);
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_refuses_a_redis_store_without_a_shared_secret() {
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url("redis://127.0.0.1:6379".into()));
    let (code, _, err) = Idem::check(&config.to_string()).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = Idem::check(&config.clone().remove("dedup.secret").to_string()).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("dedup.secret") && err.contains("replicas"),
        "{err}"
    );
    let (code, _, err) = Idem::check(&config.remove("store.url").to_string()).await;
    assert_eq!(code, 1);
    assert!(err.contains("store.url"), "{err}");
}

// ---------------------------------------------------------------------------
// Every kind of outcome crosses replicas; the result write is fenced
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_freed_and_not_replayable_outcomes_cross_replicas() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url())).set("dedup.max_response_body", "1KiB");
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);

    // An upstream 504: outcome unknown, held in Redis; the other replica answers it too.
    let held = [("x-status", "504")];
    let r = post(a.addr(), "/held", Some("h"), &held, b"x").await;
    assert_problem(&r, 504, "outcome-unknown");
    let r = post(b.addr(), "/held", Some("h"), &held, b"x").await;
    assert_problem(&r, 504, "outcome-unknown");
    assert_eq!(backend.counts("/held").started, 1);

    // A 500 while B waits for it: B's client gets the 500, and the key is free again.
    let gate = backend.gate("/freed");
    let freed = [("x-status", "500")];
    let mut first = JoinSet::new();
    spawn_post(&mut first, a.addr(), "/freed", "f", &freed, b"y");
    gate.wait_started(1).await;
    let mut second = JoinSet::new();
    spawn_post(&mut second, b.addr(), "/freed", "f", &freed, b"y");
    wait_remote_waits(std::slice::from_ref(b), 1).await;
    gate.open();
    assert_eq!(collect(first).await[0].status, 500);
    let r = collect(second).await.remove(0);
    assert_eq!(r.status, 500, "{r:#?}");
    assert_eq!(cache_status(&r), "idem; fwd=uri-miss; collapsed");
    assert_eq!(r.header("x-backend-call"), Some("1"));
    let r = post(b.addr(), "/freed", Some("f"), &freed, b"y").await;
    assert_eq!(r.header("x-backend-call"), Some("2"), "a retry runs again");

    // Too large to store: streamed to its client, not replayable anywhere.
    let big = [("x-body-size", "4096")];
    let r = post(a.addr(), "/big", Some("n"), &big, b"z").await;
    assert_eq!((r.status, r.body.len()), (200, 4096));
    let r = post(b.addr(), "/big", Some("n"), &big, b"z").await;
    assert_problem(&r, 409, "not-replayable");
    assert_eq!(backend.counts("/big").started, 1);

    let mut kinds: Vec<char> = redis
        .idem_entries()
        .await
        .iter()
        .map(|(_, v)| value_kind(v))
        .collect();
    kinds.sort();
    // The second /freed call's 500 is kept (as freed) for remote waiters too.
    assert_eq!(kinds, ['F', 'H', 'N']);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_claim_cannot_overwrite_the_new_owner() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let config = replica(&backend, &Store::Url(redis.url()));
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let headers = [("content-type", "text/plain")];
    let gate = backend.gate("/pay");

    let mut first = JoinSet::new();
    spawn_post(&mut first, a.addr(), "/pay", "p", &headers, b"1");
    gate.wait_started(1).await;
    // What a Redis restart without persistence does: A's claim is gone...
    redis.command(&["FLUSHALL"]).await.expect("FLUSHALL");
    // ...so a retry on B claims the key and runs it again (the documented cost).
    let mut second = JoinSet::new();
    spawn_post(&mut second, b.addr(), "/pay", "p", &headers, b"1");
    gate.wait_started(2).await;
    gate.open();
    let from_a = collect(first).await.remove(0);
    let from_b = collect(second).await.remove(0);
    assert_eq!(from_a.header("x-backend-call"), Some("1"));
    assert_eq!(from_b.header("x-backend-call"), Some("2"));
    // A's result write found B's claim: refused. B's result is the one kept.
    wait_metric(a, &store_ops("settle", "fenced"), 1.0).await;
    wait_metric(b, &store_ops("settle", "ok"), 1.0).await;
    let fresh = Idem::start(&config.to_string()).await;
    let r = post(fresh.addr(), "/pay", Some("p"), &headers, b"1").await;
    assert_replay(&r);
    assert_eq!(r.header("x-backend-call"), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_write_that_times_out_is_delivered_and_retried_for_the_waiters() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    // The store timeout is far above what a loaded test machine adds to a Redis round trip
    // (at 300 ms, B's own claim timed out under load and it went upstream itself), and the
    // pause far above the timeout; the liveness TTL outlasts the pause (heartbeats are
    // writes), so B never takes A for dead.
    let config = replica(&backend, &Store::Url(redis.url()))
        .set("store.timeout", "1s")
        .set("store.liveness_ttl", "8s");
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let headers = [("content-type", "text/plain")];
    let gate = backend.gate("/slow");
    let mut first = JoinSet::new();
    spawn_post(&mut first, a.addr(), "/slow", "s", &headers, b"1");
    gate.wait_started(1).await;
    let mut second = JoinSet::new();
    spawn_post(&mut second, b.addr(), "/slow", "s", &headers, b"1");
    wait_remote_waits(std::slice::from_ref(b), 1).await;

    // Redis stops taking writes for a while: A's result write times out.
    let paused = Instant::now();
    redis
        .command(&["CLIENT", "PAUSE", "2500", "WRITE"])
        .await
        .expect("CLIENT PAUSE");
    gate.open();
    let r = collect(first).await.remove(0);
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(cache_status(&r), "idem; fwd=uri-miss; stored");
    assert!(
        paused.elapsed() < Duration::from_millis(2500),
        "the response waited for Redis: {:?}",
        paused.elapsed()
    );
    // Retried once Redis takes writes again: B's waiter gets A's response.
    let r = collect(second).await.remove(0);
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(cache_status(&r), "idem; fwd=uri-miss; collapsed");
    assert_eq!(r.header("x-backend-call"), Some("1"));
    wait_metric(a, &store_ops("settle", "ok"), 1.0).await;
    assert!(find_metric(a, &store_ops("settle", "error")).await >= Some(1.0));
    assert_eq!(backend.settled("/slow").await, ONE_CALL);
}
