//! The shared store as operators run Redis: TLS with a private CA and client certificates,
//! a password from a file (and what a wrong one logs), Sentinel with a failover during
//! traffic, deployments told apart by their key prefix, `/readyz` under fail-closed, and
//! purges that reach every replica. Each test starts its own `redis-server` (and
//! `redis-sentinel`) processes on free loopback ports and stops them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::*;

const SECRET: &str = "replicas-share-this-secret-0123456789";

/// A replica's config on the Redis at `url`, polling every 100 ms.
fn replica(backend: &Backend, url: &str) -> Config {
    Config::new(backend.addr())
        .set("store.kind", "redis")
        .set("dedup.secret", SECRET)
        .set("store.url", url)
        .set("store.poll_interval", "100ms")
        .set("store.liveness_ttl", "1s")
}

async fn start_replicas(config: &Config, n: usize) -> Vec<Idem> {
    let text = config.to_string();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Idem::start(&text).await);
    }
    out
}

async fn post(addr: SocketAddr, path: &str, key: &str, body: &[u8]) -> RawResponse {
    let h = [("idempotency-key", key), ("content-type", "text/plain")];
    raw_request(addr, &http_request("POST", path, &h, body)).await
}

fn store_ops(op: &str, result: &str) -> String {
    series_id(
        "idem_store_operations_total",
        [("op", op), ("result", result)],
    )
}

/// `n` identical keyed requests spread over `replicas` while the backend holds the call:
/// returns the responses once every one is attached (to the local flight, or waiting on
/// another replica's claim) and the gate is open.
async fn concurrently(
    replicas: &[Idem],
    backend: &Backend,
    path: &str,
    key: &str,
    n: usize,
) -> Vec<RawResponse> {
    let gate = backend.gate(path);
    let mut set = JoinSet::new();
    let mut per_replica = vec![0usize; replicas.len()];
    for i in 0..n {
        let r = i % replicas.len();
        per_replica[r] += 1;
        let (addr, path, key) = (replicas[r].addr(), path.to_string(), key.to_string());
        set.spawn(async move { post(addr, &path, &key, b"body").await });
    }
    gate.wait_started(1).await;
    for (idem, n) in replicas.iter().zip(&per_replica) {
        wait_metric(idem, "idem_inflight_keys", 1.0).await;
        wait_metric(idem, "idem_waiters", (n - 1) as f64).await;
    }
    assert_eq!(gate.arrived(), 1, "a second call reached the backend");
    gate.open();
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

/// Every response is the same one call's.
fn one_call(seen: &[RawResponse], call: &str) {
    for r in seen {
        assert_eq!(r.status, 200, "{r:#?}");
        assert_eq!(r.header("x-backend-call"), Some(call), "{r:#?}");
    }
}

/// The `key=` of idem's access log lines for `path` (the dedup key's first 12 hex digits),
/// once there is one (the line is written after the response).
async fn logged_keys(idem: &Idem, path: &str) -> Vec<String> {
    idem.wait_stderr(&format!(" path={path} client_addr="))
        .await;
    idem.stderr_text()
        .lines()
        .filter(|l| l.contains("idem::access") && l.contains(&format!(" path={path} ")))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("key=")))
        .filter(|k| *k != "-")
        .map(str::to_string)
        .collect()
}

/// Polls until `series` is at least `min`.
async fn wait_at_least(idem: &Idem, series: &str, min: f64) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let got = metric_or_zero(idem, series).await;
        if got >= min {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series}: {got} < {min}\n{}",
            log_tail(idem)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /readyz`: status and body.
async fn readyz(idem: &Idem) -> (u16, String) {
    let r = client()
        .get(idem.metrics_url("/readyz"))
        .send()
        .await
        .expect("GET /readyz");
    (r.status().as_u16(), r.text().await.expect("readyz body"))
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn wait_readyz(idem: &Idem, status: u16) -> String {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let (got, body) = readyz(idem).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz: {got} {body:?}, expected {status}\n{}",
            log_tail(idem)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_redis_with_a_private_ca_one_execution_across_two_replicas() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls).await;
    assert!(redis.url().starts_with("rediss://"));
    let backend = Backend::start().await;
    let path = |n: &str| tls.path(n).display().to_string();
    let config = replica(&backend, &redis.url())
        .set("store.key_prefix", "shop:")
        .set("store.tls_ca", path("ca.pem"))
        .set("store.tls_client_cert", path("client.pem"))
        .set("store.tls_client_key", path("client.key"));
    let replicas = start_replicas(&config, 2).await;
    for idem in &replicas {
        assert_eq!(metric(idem, "idem_store_connected").await, 1.0);
    }

    let seen = concurrently(&replicas, &backend, "/orders", "order-1", 40).await;
    assert_eq!(seen.len(), 40);
    one_call(&seen, "1");
    assert_eq!(backend.counts("/orders").started, 1);
    // A retry on either replica is a replay.
    for idem in &replicas {
        let r = post(idem.addr(), "/orders", "order-1", b"body").await;
        assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
    }
    assert_eq!(backend.counts("/orders").started, 1);

    // What an operator sees with redis-cli over TLS: the record and both replicas'
    // liveness keys, all under the prefix, and nothing else.
    let short = logged_keys(&replicas[0], "/orders").await;
    let short = short.first().expect("an access log line with the key");
    let mut names: Vec<String> = redis
        .cli(Some(&tls), &["--scan"])
        .await
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    let record = &names[2];
    assert!(
        record.starts_with(&format!("shop:{{{short}")) && record.ends_with('}'),
        "{names:?}"
    );
    assert_eq!(record.len(), "shop:{}".len() + 64, "{record}");
    for alive in &names[..2] {
        let owner = alive.strip_prefix("shop:alive:").expect("a liveness key");
        assert!(owner.len() == 32 && owner.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    let entries = redis.entries("shop:{*}").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(value_kind(&entries[0].1), 'S');

    // Without the private CA, the server's certificate is refused: the operator's to fix,
    // so one ERROR line for the whole series of attempts.
    let untrusting = Idem::start(&replica(&backend, &redis.url()).to_string()).await;
    wait_at_least(&untrusting, &store_ops("connect", "error"), 3.0).await;
    let log = untrusting.stderr_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR idem::"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("cannot connect: TLS certificate refused"),
        "{}",
        errors[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_redis_cluster_one_execution_per_key_across_two_replicas() {
    let tls = TlsFiles::generate();
    let cluster = RedisCluster::start_tls(&tls).await;
    let backend = Backend::start().await;
    let path = |n: &str| tls.path(n).display().to_string();
    let config = replica(&backend, "unused")
        .remove("store.url")
        .set("store.nodes", cluster.urls())
        .set("store.tls_ca", path("ca.pem"))
        .set("store.tls_client_cert", path("client.pem"))
        .set("store.tls_client_key", path("client.key"));
    let replicas = start_replicas(&config, 2).await;
    let keys = ["c-1", "c-2", "c-3", "c-4", "c-5", "c-6"];
    for (i, key) in keys.iter().enumerate() {
        let path = format!("/c/{i}");
        let seen = concurrently(&replicas, &backend, &path, key, 10).await;
        one_call(&seen, "1");
        assert_eq!(backend.counts(&path).started, 1);
    }
    let mut holding = 0;
    let mut total = 0;
    for node in &cluster.nodes {
        assert!(node.url().starts_with("rediss://"));
        let entries = node.idem_entries().await;
        assert!(entries.iter().all(|(_, v)| value_kind(v) == 'S'));
        total += entries.len();
        holding += usize::from(!entries.is_empty());
    }
    assert_eq!(total, keys.len());
    assert!(holding >= 2, "keys on {holding} master(s) only");
}

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_a_file_logs_in_and_a_wrong_one_is_one_error_line() {
    let redis = RedisServer::start_with_user("idem", "correct-horse").await;
    let backend = Backend::start().await;
    let dir = TempDir::new();
    let good = dir.write("good", "correct-horse\n");
    let wrong = dir.write("wrong", "battery-staple\n");
    let base = replica(&backend, &redis.url()).set("store.username", "idem");

    // From the file.
    let a = Idem::start(
        &base
            .clone()
            .set("store.password_file", good.display().to_string())
            .to_string(),
    )
    .await;
    assert_eq!(metric(&a, "idem_store_connected").await, 1.0);
    let r = post(a.addr(), "/pay", "p1", b"1").await;
    assert_eq!(r.header("x-backend-call"), Some("1"), "{r:#?}");
    assert_eq!(redis.idem_entries().await.len(), 1);
    // From IDEM_REDIS_PASSWORD: the same Redis, so A's record is replayed.
    let b = Idem::builder()
        .env("IDEM_REDIS_PASSWORD", "correct-horse")
        .start(&base.to_string())
        .await;
    let r = post(b.addr(), "/pay", "p1", b"1").await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
    assert_eq!(backend.counts("/pay").started, 1);

    // A wrong password: ERROR with the cause, once for the whole series of attempts.
    let c = Idem::start(
        &base
            .set("store.password_file", wrong.display().to_string())
            .to_string(),
    )
    .await;
    wait_at_least(&c, &store_ops("connect", "error"), 4.0).await;
    let log = c.stderr_text();
    // idem's own ERROR lines (Pingora logs some of its own).
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR idem::"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("redis store: cannot connect: authentication or permission refused")
            && errors[0].contains("WRONGPASS"),
        "{}",
        errors[0]
    );
    assert!(
        !log.contains("battery-staple"),
        "the password was logged: {log}"
    );
    assert_eq!(metric(&c, "idem_store_connected").await, 0.0);
    // Served under fail-open, counted; the key is not in Redis.
    let r = post(c.addr(), "/pay", "p2", b"2").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(
        metric(
            &c,
            &series_id("idem_store_unavailable_total", [("policy", "fail-open")])
        )
        .await,
        1.0
    );
    assert_eq!(redis.idem_entries().await.len(), 1);
}

// ---------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_during_traffic_then_one_execution_per_new_key() {
    let primary = RedisServer::start().await;
    let port = primary.port().to_string();
    let standby = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]).await;
    let sentinel = RedisSentinel::start(&primary, "idem-main").await;
    sentinel.wait_replicas(1).await;
    let backend = Backend::start().await;
    let config = replica(&backend, "unused")
        .remove("store.url")
        .set("store.sentinels", vec![sentinel.url()])
        .set("store.master_name", "idem-main");
    let replicas = start_replicas(&config, 2).await;
    for idem in &replicas {
        assert_eq!(metric(idem, "idem_store_connected").await, 1.0);
    }
    // Before: the primary holds the records.
    let seen = concurrently(&replicas, &backend, "/before", "b1", 20).await;
    one_call(&seen, "1");
    assert_eq!(primary.idem_entries().await.len(), 1);

    // Traffic on both replicas while Sentinel promotes the standby.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = JoinSet::new();
    for (i, idem) in replicas.iter().enumerate() {
        let (addr, stop) = (idem.addr(), stop.clone());
        traffic.spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("during-{i}-{n}");
                statuses.push(post(addr, "/during", &key, b"d").await.status);
                n += 1;
            }
            statuses
        });
    }
    let failover = Instant::now();
    sentinel.failover().await;
    for idem in &replicas {
        wait_metric(idem, "idem_store_primary_switches_total", 1.0).await;
        wait_metric(idem, "idem_store_connected", 1.0).await;
    }
    let switched = failover.elapsed();
    assert_eq!(sentinel.primary_port().await, standby.port());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = Vec::new();
    while let Some(s) = traffic.join_next().await {
        during.extend(s.expect("traffic task"));
    }
    assert!(!during.is_empty());
    assert!(
        during.iter().all(|s| *s == 200),
        "fail-open serves through the failover: {during:?}"
    );
    let mut lost = 0.0;
    let mut local_only = 0.0;
    for idem in &replicas {
        assert!(idem
            .stderr_text()
            .contains("redis store: the primary changed"));
        lost += metric(idem, &store_ops("settle", "fenced")).await;
        local_only += metric(
            idem,
            &series_id("idem_store_unavailable_total", [("policy", "fail-open")]),
        )
        .await;
    }
    // Measured, not asserted (they depend on timing): how long both replicas took to follow
    // the failover, how many requests ran meanwhile, how many results found their claim
    // gone (written to the old primary), and how many were served with local dedup only.
    eprintln!(
        "failover followed by both replicas in {switched:?}; {} requests during it, {lost} settles fenced, {local_only} served fail-open",
        during.len()
    );

    // After: one execution per new key across both replicas, recorded on the new primary.
    for (i, key) in ["after-1", "after-2", "after-3"].into_iter().enumerate() {
        let path = format!("/after/{i}");
        let seen = concurrently(&replicas, &backend, &path, key, 20).await;
        one_call(&seen, "1");
        assert_eq!(backend.counts(&path).started, 1);
    }
    let kinds: Vec<char> = standby
        .entries("idem:{*}")
        .await
        .iter()
        .map(|(_, v)| value_kind(v))
        .filter(|k| *k == 'S')
        .collect();
    // b1 (replicated), the requests during the failover that reached a primary, and 3.
    assert!(kinds.len() >= 4, "{kinds:?}");
}

// ---------------------------------------------------------------------------
// Key prefixes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_with_different_prefixes_on_one_redis_never_share_keys() {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    // The same secret: without the prefixes, both would derive and share the same keys.
    let a = start_replicas(
        &replica(&backend, &redis.url()).set("store.key_prefix", "a:"),
        2,
    )
    .await;
    let b = Idem::start(
        &replica(&backend, &redis.url())
            .set("store.key_prefix", "b:")
            .to_string(),
    )
    .await;

    // Within deployment A: one execution for concurrent requests on both replicas.
    let seen = concurrently(&a, &backend, "/order", "k", 20).await;
    one_call(&seen, "1");
    // The same request to deployment B: its own execution, then its own replay.
    let r = post(b.addr(), "/order", "k", b"body").await;
    assert_eq!(r.header("x-backend-call"), Some("2"), "{r:#?}");
    let r = post(b.addr(), "/order", "k", b"body").await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
    assert_eq!(r.header("x-backend-call"), Some("2"));
    let r = post(a[1].addr(), "/order", "k", b"body").await;
    assert_eq!(r.header("x-backend-call"), Some("1"), "{r:#?}");
    assert_eq!(backend.counts("/order").started, 2);

    let ra = redis.entries("a:{*}").await;
    let rb = redis.entries("b:{*}").await;
    assert_eq!((ra.len(), rb.len()), (1, 1), "{ra:?} {rb:?}");
    assert_eq!(ra[0].0.strip_prefix("a:"), rb[0].0.strip_prefix("b:"));
    assert_eq!(redis.entries("a:alive:*").await.len(), 2);
    assert_eq!(redis.entries("b:alive:*").await.len(), 1);
    assert_eq!(redis.entries("idem:*").await.len(), 0);
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_redis_is_down_under_fail_closed_only() {
    let mut redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let base = replica(&backend, &redis.url()).set("store.timeout", "300ms");
    let closed = Idem::start(
        &base
            .clone()
            .set("store.on_store_error", "fail-closed")
            .to_string(),
    )
    .await;
    let open = Idem::start(&base.to_string()).await;
    assert_eq!(wait_readyz(&closed, 200).await, "ready\n");
    assert_eq!(wait_readyz(&open, 200).await, "ready\n");

    redis.kill();
    let body = wait_readyz(&closed, 503).await;
    assert_eq!(body.lines().count(), 1, "{body:?}");
    assert!(
        body.starts_with("redis store unavailable (fail-closed): "),
        "{body:?}"
    );
    let r = post(closed.addr(), "/x", "k1", b"1").await;
    assert_problem(&r, 503, "store-unavailable");
    // Fail-open serves without Redis: still ready.
    let r = post(open.addr(), "/x", "k2", b"2").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(readyz(&open).await, (200, "ready\n".to_string()));

    redis.restart().await;
    assert_eq!(wait_readyz(&closed, 200).await, "ready\n");
    let r = post(closed.addr(), "/x", "k3", b"3").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(backend.counts("/x").started, 2);
}

// ---------------------------------------------------------------------------
// Purge across replicas
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_replica_reaches_the_other() {
    let mut redis = RedisServer::start().await;
    let backend = Backend::start().await;
    // At 300 ms a loaded machine timed B's claim out, and B ran the key itself (fail-open).
    let config = replica(&backend, &redis.url())
        .set("store.timeout", "1s")
        .set("admin.listen", "127.0.0.1:0");
    let replicas = start_replicas(&config, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let http = client();
    let purge =
        |idem: &Idem, hex: &str| http.delete(idem.admin_url(&format!("/keys/{hex}"))).send();

    // Executed on A, replayed by B, which now keeps its own copy.
    let r = post(a.addr(), "/p", "k", b"1").await;
    assert_eq!(r.header("x-backend-call"), Some("1"));
    let r = post(b.addr(), "/p", "k", b"1").await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
    wait_metric(b, "idem_store_entries", 1.0).await;

    // Purged on A: deleted in Redis, and B drops its copy when the announcement arrives.
    let short = &logged_keys(a, "/p").await[0];
    let resp = purge(a, short).await.expect("DELETE");
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"purged": short, "kind": "response", "redis": "deleted"})
    );
    assert_eq!(redis.idem_entries().await.len(), 0);
    wait_metric(b, "idem_store_entries", 0.0).await;
    wait_metric(a, "idem_store_entries", 0.0).await;

    // B replays no more: the next request executes once, and A replays that one.
    let r = post(b.addr(), "/p", "k", b"1").await;
    assert_eq!(r.header("x-backend-call"), Some("2"), "{r:#?}");
    assert_eq!(r.header("idempotent-replayed"), None);
    let r = post(a.addr(), "/p", "k", b"1").await;
    assert_eq!(r.header("x-backend-call"), Some("2"), "{r:#?}");
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(backend.counts("/p").started, 2);
    assert_eq!(metric(a, &store_ops("purge", "deleted")).await, 1.0);

    // A key in flight on A cannot be purged from B (which keeps no copy: all 64 digits).
    let gate = backend.gate("/slow");
    let mut first = JoinSet::new();
    first.spawn(post(a.addr(), "/slow", "s", b"2"));
    gate.wait_started(1).await;
    let claim = redis
        .idem_entries()
        .await
        .into_iter()
        .find(|(_, v)| value_kind(v) == 'C')
        .expect("a claim in Redis");
    let hex = claim.0.trim_start_matches("idem:{").trim_end_matches('}');
    assert_eq!(hex.len(), 64);
    let resp = purge(b, hex).await.expect("DELETE");
    assert_eq!(resp.status(), 409);
    let resp = purge(b, &hex[..12]).await.expect("DELETE");
    assert_eq!(
        resp.status(),
        404,
        "B keeps no copy and was given 12 digits"
    );
    gate.open();
    assert_eq!(first.join_next().await.unwrap().unwrap().status, 200);
    assert_eq!(metric(b, &store_ops("purge", "busy")).await, 1.0);

    // Redis down: nothing purged anywhere (503), A still replays its copy.
    redis.kill();
    let resp = purge(a, short).await.expect("DELETE");
    assert_eq!(resp.status(), 503);
    let r = post(a.addr(), "/p", "k", b"1").await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:#?}");
    assert_eq!(backend.counts("/p").started, 2);
}

// ---------------------------------------------------------------------------
// idem check
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_warns_about_an_inline_password_and_names_a_missing_ca() {
    let backend = Backend::start().await;
    let inline = replica(&backend, "redis://:hunter2@127.0.0.1:6379");
    let (code, out, err) = Idem::check(&inline.to_string()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with(": ok\n"), "{out}");
    let warns: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warns.len(), 1, "{err}");
    assert!(
        warns[0].contains("store.url: holds a password inline"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let missing =
        replica(&backend, "rediss://127.0.0.1:6379").set("store.tls_ca", "no-such-ca.pem");
    let (code, _, err) = Idem::check(&missing.to_string()).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("store.tls_ca: cannot read \"no-such-ca.pem\"") && err.contains(".toml:"),
        "{err}"
    );
}
