//! Metrics exactness, Prometheus tooling, the Grafana dashboard and alert rules.
//!
//! The Prometheus tests run Debian's `prometheus` package (`prometheus` and `promtool`). A
//! machine without it fails them with a message naming the package: they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::support::*;

// ---------------------------------------------------------------------------
// The text exposition format (parsed by `support::metrics`), read by name and labels
// ---------------------------------------------------------------------------

#[test]
fn exposition_parser_reads_labels_escapes_and_special_values() {
    let e = Exposition::parse(
        "# HELP a_total Help.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"u\\\\o\\nte\"} 3\n\
         b 4.5 1700000000000\nc_bucket{le=\"+Inf\"} +Inf\nd{} NaN\n",
    );
    assert_eq!(
        e.value("a_total", &[("y", "q\"u\\o\nte"), ("x", "1")]),
        Some(3.0)
    );
    assert_eq!(
        e.value("a_total", &[("x", "1")]),
        None,
        "label sets match exactly"
    );
    assert_eq!(e.value("b", &[]), Some(4.5));
    assert_eq!(e.value("c_bucket", &[("le", "+Inf")]), Some(f64::INFINITY));
    assert!(e.value("d", &[]).unwrap().is_nan());
    assert_eq!(e.types["a_total"], "counter");
}

// ---------------------------------------------------------------------------
// idem helpers
// ---------------------------------------------------------------------------

const OUTCOMES: [&str; 11] = [
    "leader",
    "collapsed",
    "replayed",
    "bypass",
    "conflict",
    "mismatch",
    "missing_key",
    "too_large",
    "outcome_unknown",
    "not_replayable",
    "error",
];
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "failed"];

/// A scrape, after checking its status and content type.
async fn scrape_exposition(idem: &Idem) -> Exposition {
    let resp = client()
        .get(idem.metrics_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200, "GET /metrics");
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
        "content type {ctype:?}"
    );
    Exposition::parse(&resp.text().await.expect("read /metrics"))
}

/// Differences between `expected` and a scrape: `series: got X, want Y`.
fn mismatches(expected: &BTreeMap<String, f64>, e: &Exposition) -> Vec<String> {
    let got = e.by_id();
    expected
        .iter()
        .filter_map(|(id, want)| match got.get(id) {
            Some(v) if v == want => None,
            Some(v) => Some(format!("{id}: got {v}, want {want}")),
            None => Some(format!("{id}: missing, want {want}")),
        })
        .collect()
}

/// Scrapes until every series in `expected` has its value. Metrics are recorded when a
/// request's log line is written, which can be a moment after the client has its response:
/// this is an event wait with a deadline, never a pause.
async fn wait_for_values(idem: &Idem, expected: &BTreeMap<String, f64>) -> Exposition {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let mut backoff = Duration::from_millis(5);
    loop {
        let e = scrape_exposition(idem).await;
        let wrong = mismatches(expected, &e);
        if wrong.is_empty() {
            return e;
        }
        if Instant::now() >= deadline {
            panic!(
                "metrics did not reach the expected values within {WAIT_TIMEOUT:?}:\n  {}\n\
                 --- scrape ---\n{}",
                wrong.join("\n  "),
                e.idem_lines()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

fn one(name: &str, labels: &[(&str, &str)], value: f64) -> BTreeMap<String, f64> {
    BTreeMap::from([(series_id(name, labels.iter().copied()), value)])
}

/// The expected value of every series idem exports (but bytes), from the script's tally.
#[derive(Default)]
struct Tally {
    routes: Vec<&'static str>,
    requests: BTreeMap<(&'static str, &'static str), u64>,
    upstream: BTreeMap<(&'static str, &'static str), u64>,
    detached: BTreeMap<&'static str, u64>,
    lookups: BTreeMap<&'static str, u64>,
    held: u64,
    entries: u64,
}

impl Tally {
    fn req(&mut self, route: &'static str, outcome: &'static str) {
        assert!(OUTCOMES.contains(&outcome), "{outcome}");
        *self.requests.entry((route, outcome)).or_default() += 1;
    }

    fn upstream(&mut self, route: &'static str, class: &'static str) {
        *self.upstream.entry((route, class)).or_default() += 1;
    }

    fn lookup(&mut self, result: &'static str) {
        *self.lookups.entry(result).or_default() += 1;
    }

    /// A leader that got a `class` answer and whose record is kept.
    fn leader(&mut self, route: &'static str, class: &'static str) {
        self.req(route, "leader");
        self.upstream(route, class);
        self.lookup("miss");
        self.entries += 1;
    }

    fn expected(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        let mut put = |name: &str, labels: &[(&str, &str)], v: u64| {
            m.insert(series_id(name, labels.iter().copied()), v as f64);
        };
        for &route in &self.routes {
            for outcome in OUTCOMES {
                let n = self.requests.get(&(route, outcome)).copied().unwrap_or(0);
                let labels = [("route", route), ("outcome", outcome)];
                put("idem_requests_total", &labels, n);
                put("idem_request_duration_seconds_count", &labels, n);
            }
            let mut calls = 0;
            for class in CLASSES {
                let n = self.upstream.get(&(route, class)).copied().unwrap_or(0);
                calls += n;
                put(
                    "idem_upstream_requests_total",
                    &[("route", route), ("class", class)],
                    n,
                );
            }
            put(
                "idem_upstream_duration_seconds_count",
                &[("route", route)],
                calls,
            );
            put(
                "idem_detached_completions_total",
                &[("route", route)],
                self.detached.get(route).copied().unwrap_or(0),
            );
            for kind in ["collapsed", "replayed"] {
                put(
                    "idem_shadow_duplicates_total",
                    &[("route", route), ("kind", kind)],
                    0,
                );
            }
        }
        for result in ["hit", "miss", "inflight", "full", "error"] {
            put(
                "idem_store_operations_total",
                &[("op", "lookup"), ("result", result)],
                self.lookups.get(result).copied().unwrap_or(0),
            );
        }
        put("idem_inflight_keys", &[], 0);
        put("idem_waiters", &[], 0);
        put("idem_held_keys", &[], self.held);
        put("idem_store_entries", &[], self.entries);
        put("idem_store_evictions_total", &[("reason", "capacity")], 0);
        put("idem_store_evictions_total", &[("reason", "expired")], 0);
        put("idem_client_aborts_total", &[], 0);
        // The defaults of store.max_entries, store.max_bytes and server.max_waiters.
        put("idem_store_max_entries", &[], 100_000);
        put("idem_store_max_bytes", &[], 256 * 1024 * 1024);
        put("idem_max_waiters", &[], 100_000);
        m
    }
}

/// Sends a POST; `key` becomes the `Idempotency-Key`.
async fn post(
    http: &reqwest::Client,
    url: String,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http.post(&url).body(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// [`post`] on a task of its own, for concurrent requests.
fn spawn_post(
    http: &reqwest::Client,
    url: String,
    key: &'static str,
    body: &'static str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let http = http.clone();
    tokio::spawn(async move { post(&http, url, Some(key), body, &[]).await })
}

async fn status_of(resp: reqwest::Response) -> u16 {
    let status = resp.status().as_u16();
    resp.bytes().await.expect("read body");
    status
}

// ---------------------------------------------------------------------------
// 1. Exact values after a scripted mix
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_counter_and_gauge_has_its_exact_value_after_a_scripted_mix() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        // Holds outlive the test: `idem_held_keys` is not racing the sweeper.
        .set("upstream.total_timeout", "60s")
        .set("server.grace_period", "60s")
        .route(
            Route::new("api", "/api/", "keyed")
                .set("max_body", "1KiB")
                .set("max_response_body", "1KiB"),
        )
        .route(Route::new("strict", "/strict/", "require-key"))
        .route(Route::new("reject", "/reject/", "keyed").set("on_concurrent", "reject"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let mut t = Tally {
        routes: vec!["default", "api", "strict", "reject"],
        ..Tally::default()
    };

    // Start-up: every route x outcome series exists, all zero, and nothing else.
    let e = wait_for_values(&idem, &t.expected()).await;
    assert_eq!(e.family("idem_requests_total").len(), 4 * OUTCOMES.len());
    for name in ["idem_store_bytes", "idem_store_entries", "idem_held_keys"] {
        assert_eq!(e.value(name, &[]), Some(0.0), "{name} at start-up");
    }

    // Leader, then a replay, then the same key with another body (422).
    let r = post(&http, idem.url("/api/a"), Some("k1"), "one", &[]).await;
    assert_eq!(status_of(r).await, 200);
    t.leader("api", "2xx");
    let r = post(&http, idem.url("/api/a"), Some("k1"), "one", &[]).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(status_of(r).await, 200);
    t.req("api", "replayed");
    t.lookup("hit");
    let r = post(&http, idem.url("/api/a"), Some("k1"), "two", &[]).await;
    assert_eq!(status_of(r).await, 422);
    t.req("api", "mismatch");
    t.lookup("hit");

    // A waiter collapses onto a leader held at the backend; the gauges show both meanwhile.
    let gate = b.gate("/api/slow");
    let leader = spawn_post(&http, idem.url("/api/slow"), "k2", "s");
    gate.wait_started(1).await;
    let waiter = spawn_post(&http, idem.url("/api/slow"), "k2", "s");
    let mut during = one("idem_inflight_keys", &[], 1.0);
    during.extend(one("idem_waiters", &[], 1.0));
    wait_for_values(&idem, &during).await;
    gate.open();
    assert_eq!(status_of(leader.await.unwrap()).await, 200);
    let w = waiter.await.unwrap();
    assert_eq!(w.headers()["idempotent-replayed"], "true");
    assert_eq!(status_of(w).await, 200);
    t.leader("api", "2xx");
    t.req("api", "collapsed");
    t.lookup("inflight");

    // No key on a keyed route: passed through (not a leader, no upstream count).
    let r = post(&http, idem.url("/api/b"), None, "p", &[]).await;
    assert_eq!(status_of(r).await, 200);
    t.req("api", "bypass");

    // A keyed body over max_body: 413.
    let r = post(
        &http,
        idem.url("/api/big"),
        Some("k3"),
        vec![b'x'; 2048],
        &[],
    )
    .await;
    assert_eq!(status_of(r).await, 413);
    t.req("api", "too_large");

    // A response over max_response_body is streamed to its leader; a retry gets 409.
    let big = [("x-body-size", "4096")];
    let r = post(&http, idem.url("/api/stream"), Some("k4"), "n", &big).await;
    assert_eq!(r.bytes().await.unwrap().len(), 4096);
    t.leader("api", "2xx");
    let r = post(&http, idem.url("/api/stream"), Some("k4"), "n", &big).await;
    assert_eq!(status_of(r).await, 409);
    t.req("api", "not_replayable");
    t.lookup("hit");

    // A 502 from upstream: outcome unknown for the leader and, held, for its retry.
    let gw = [("x-status", "502")];
    let r = post(&http, idem.url("/api/gw"), Some("k5"), "g", &gw).await;
    assert_eq!(status_of(r).await, 502);
    t.req("api", "outcome_unknown");
    t.upstream("api", "5xx");
    t.lookup("miss");
    let r = post(&http, idem.url("/api/gw"), Some("k5"), "g", &gw).await;
    assert_eq!(status_of(r).await, 502);
    t.req("api", "outcome_unknown");
    t.lookup("hit");
    t.held += 1;
    t.entries += 1;

    // Missing key on a require-key route, malformed key on a keyed one: 400.
    let r = post(&http, idem.url("/strict/x"), None, "m", &[]).await;
    assert_eq!(status_of(r).await, 400);
    t.req("strict", "missing_key");
    let r = post(&http, idem.url("/api/m"), Some("a b"), "m", &[]).await;
    assert_eq!(status_of(r).await, 400);
    t.req("api", "missing_key");

    // on_concurrent = "reject": 409 while the leader runs.
    let gate = b.gate("/reject/x");
    let leader = spawn_post(&http, idem.url("/reject/x"), "k6", "r");
    gate.wait_started(1).await;
    let r = post(&http, idem.url("/reject/x"), Some("k6"), "r", &[]).await;
    assert_eq!(status_of(r).await, 409);
    gate.open();
    assert_eq!(status_of(leader.await.unwrap()).await, 200);
    t.leader("reject", "2xx");
    t.req("reject", "conflict");
    t.lookup("inflight");

    // The default route.
    let r = post(&http, idem.url("/other"), Some("k8"), "o", &[]).await;
    assert_eq!(status_of(r).await, 200);
    t.leader("default", "2xx");

    // Checkpoint, so that the next leader increment can only be the detached leader's.
    wait_for_values(&idem, &t.expected()).await;

    // A leader whose client leaves while the backend works: a detached completion.
    let gate = b.gate("/api/detach");
    let mut conn = tokio::net::TcpStream::connect(idem.addr()).await.unwrap();
    let request = http_request("POST", "/api/detach", &[("idempotency-key", "k7")], b"d");
    conn.write_all(&request).await.unwrap();
    gate.wait_started(1).await;
    drop(conn);
    t.leader("api", "2xx");
    let leaders = t.requests[&("api", "leader")] as f64;
    let left = [("route", "api"), ("outcome", "leader")];
    wait_for_values(&idem, &one("idem_requests_total", &left, leaders)).await;
    gate.open();
    b.wait_counts("/api/detach", |c| c.completed == 1).await;
    t.detached.insert("api", 1);

    let e = wait_for_values(&idem, &t.expected()).await;
    // Bytes depend on the stored headers: bounded below by the stored bodies.
    let bytes = e.value("idem_store_bytes", &[]).unwrap();
    assert!(bytes >= 4.0 * 20.0, "idem_store_bytes = {bytes}");
    // The backend did the work once per leader, plus the pass-through.
    assert_eq!(b.total().started, 8);
}

/// Every answer idem gives is counted by class, pass-through included, and every call to a
/// backend by the backend (its configured address) and class; the process collector is there.
#[tokio::test]
async fn responses_are_counted_by_class_and_calls_by_backend() {
    let b = Backend::start().await;
    let down = free_addr();
    let config = Config::with_backends(&[b.addr()])
        .set("upstream.health_check", "none")
        .route(Route::new("api", "/api/", "keyed"))
        .route(Route::new("strict", "/strict/", "require-key"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    for status in ["200", "404", "503"] {
        let r = http
            .get(idem.url("/api/x"))
            .header("x-status", status)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_str(), status);
        r.bytes().await.unwrap();
    }
    // idem's own answer (400 missing-key) and a leader's 201.
    assert_eq!(
        status_of(post(&http, idem.url("/strict/a"), None, "m", &[]).await).await,
        400
    );
    let created = [("x-status", "201")];
    let r = post(&http, idem.url("/api/c"), Some("k-201"), "c", &created).await;
    assert_eq!(status_of(r).await, 201);

    let backend = b.addr().to_string();
    let mut want = BTreeMap::new();
    for (class, n) in [("1xx", 0), ("2xx", 2), ("3xx", 0), ("4xx", 1), ("5xx", 1)] {
        want.extend(one(
            "idem_responses_total",
            &[("route", "api"), ("class", class)],
            n as f64,
        ));
    }
    want.extend(one(
        "idem_responses_total",
        &[("route", "strict"), ("class", "4xx")],
        1.0,
    ));
    for (class, n) in [
        ("1xx", 0),
        ("2xx", 2),
        ("3xx", 0),
        ("4xx", 1),
        ("5xx", 1),
        ("failed", 0),
    ] {
        want.extend(one(
            "idem_backend_requests_total",
            &[("backend", &backend), ("class", class)],
            n as f64,
        ));
    }
    want.extend(one(
        "idem_backend_duration_seconds_count",
        &[("backend", &backend)],
        4.0,
    ));
    want.extend(one("idem_backend_up", &[("backend", &backend)], 1.0));
    want.extend(one("idem_draining", &[], 0.0));
    let e = wait_for_values(&idem, &want).await;
    let rss = e.value("process_resident_memory_bytes", &[]).unwrap();
    assert!(rss > 1e6, "process_resident_memory_bytes = {rss}");
    assert!(e.value("process_start_time_seconds", &[]).unwrap() > 1.7e9);
    drop(idem);

    // A backend that refuses: its calls are `failed`, and it is down.
    let config = Config::with_backends(&[down])
        .set("upstream.health_check_interval", "100ms")
        .to_string();
    let idem = Idem::start(&config).await;
    let r = http.get(idem.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    r.bytes().await.unwrap();
    let down = down.to_string();
    let mut want = one(
        "idem_backend_requests_total",
        &[("backend", &down), ("class", "failed")],
        1.0,
    );
    want.extend(one("idem_backend_up", &[("backend", &down)], 0.0));
    want.extend(one(
        "idem_responses_total",
        &[("route", "default"), ("class", "5xx")],
        1.0,
    ));
    wait_for_values(&idem, &want).await;
}

#[tokio::test]
async fn store_evictions_count_capacity_and_expiry_apart() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("store.max_entries", 2)
        .route(Route::new("api", "/api/", "keyed").set("ttl", "1s"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    for key in ["e1", "e2", "e3"] {
        let r = post(&http, idem.url("/api/e"), Some(key), "x", &[]).await;
        assert_eq!(status_of(r).await, 200);
    }
    // The third key took the least recently used slot.
    let mut want = one("idem_store_evictions_total", &[("reason", "capacity")], 1.0);
    want.extend(one(
        "idem_store_evictions_total",
        &[("reason", "expired")],
        0.0,
    ));
    want.extend(one("idem_store_entries", &[], 2.0));
    want.extend(one("idem_store_max_entries", &[], 2.0));
    wait_for_values(&idem, &want).await;
    // Both survivors expire after their 1 s ttl (the sweeper runs every second).
    let mut want = one("idem_store_evictions_total", &[("reason", "capacity")], 1.0);
    want.extend(one(
        "idem_store_evictions_total",
        &[("reason", "expired")],
        2.0,
    ));
    want.extend(one("idem_store_entries", &[], 0.0));
    want.extend(one("idem_store_bytes", &[], 0.0));
    wait_for_values(&idem, &want).await;
}

#[tokio::test]
async fn health_and_readiness_endpoints() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("upstream.health_check_interval", "100ms")
        .to_string();
    let idem = Idem::start(&config).await;
    let http = client();
    let get = |path: &str| http.get(idem.metrics_url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    // Without a healthy backend idem is up but not ready.
    b.stop().await;
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let status = get("/readyz").await.unwrap().status();
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} with the only backend down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------

/// The access-log records (`target` `idem::access`) of a JSON log: its fields sit at the
/// top level of each line's object.
fn access_records(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "idem::access")
        .collect()
}

#[tokio::test]
async fn json_access_log_has_one_line_per_request_without_keys_or_bodies() {
    const RAW_KEY: &str = "raw-key-7f3a9c61";
    const RAW_BODY: &str = "raw-body-c0ffee42";
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.log_format", "json")
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();

    let gate = b.gate("/api/log");
    let sent = Instant::now();
    let leader = spawn_post(&http, idem.url("/api/log"), RAW_KEY, RAW_BODY);
    gate.wait_started(1).await;
    let waiter = spawn_post(&http, idem.url("/api/log"), RAW_KEY, RAW_BODY);
    wait_for_values(&idem, &one("idem_waiters", &[], 1.0)).await;
    gate.open();
    assert_eq!(status_of(leader.await.unwrap()).await, 200);
    assert_eq!(status_of(waiter.await.unwrap()).await, 200);
    let bound_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let r = post(&http, idem.url("/api/pass"), None, RAW_BODY, &[]).await;
    assert_eq!(status_of(r).await, 200);
    for outcome in ["leader", "collapsed", "bypass"] {
        idem.wait_stderr(&format!("\"outcome\":\"{outcome}\""))
            .await;
    }

    let stderr = idem.stderr_text();
    let records = access_records(&stderr);
    assert_eq!(records.len(), 3, "one line per request:\n{stderr}");
    let find = |outcome: &str| {
        records
            .iter()
            .find(|r| r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {outcome} line:\n{stderr}"))
    };
    let (lead, coll, pass) = (find("leader"), find("collapsed"), find("bypass"));
    for r in [lead, coll, pass] {
        assert_eq!(r["method"], "POST", "{r}");
        assert_eq!(r["route"], "api", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        // The client through trusted hops: a loopback peer that forwarded nothing.
        assert_eq!(r["client_addr"], "127.0.0.1", "{r}");
        // `error` appears only on requests that ended with one.
        assert!(r.get("error").is_none(), "{r}");
    }
    // The short key hash: the same for both requests of the key, 12 hex digits.
    let key = lead["key"].as_str().unwrap();
    assert!(
        key.len() == 12 && key.bytes().all(|c| c.is_ascii_hexdigit()),
        "{lead}"
    );
    assert_eq!(coll["key"], key);
    assert!(pass.get("key").is_none(), "{pass}");
    // The leader's upstream latency and the waiters it served.
    let upstream_ms = lead["upstream_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("{lead}"));
    assert!(
        upstream_ms > 0.0 && upstream_ms <= bound_ms,
        "upstream_ms {upstream_ms} outside (0, {bound_ms}]: {lead}"
    );
    assert_eq!(lead["waiters_served"], 1, "{lead}");
    assert!(coll.get("waiters_served").is_none(), "{coll}");
    assert!(pass["upstream_ms"].as_f64().is_some(), "{pass}");
    // Neither the raw key nor the body is ever logged.
    assert!(!stderr.contains(RAW_KEY), "raw key in the log:\n{stderr}");
    assert!(!stderr.contains(RAW_BODY), "raw body in the log:\n{stderr}");
}

#[tokio::test]
async fn text_access_log_line_carries_the_same_fields() {
    const RAW_KEY: &str = "raw-key-5e1d2b77";
    const RAW_BODY: &str = "raw-body-beefcafe";
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let r = post(&client(), idem.url("/api/t"), Some(RAW_KEY), RAW_BODY, &[]).await;
    assert_eq!(status_of(r).await, 200);
    idem.wait_stderr("outcome=leader").await;
    let stderr = idem.stderr_text();
    let line = stderr
        .lines()
        .find(|l| l.contains("idem::access") && l.contains("outcome=leader"))
        .unwrap_or_else(|| panic!("no access line:\n{stderr}"));
    for field in [
        "method=POST path=/api/t",
        "route=api",
        "status=200",
        "waiters_served=0",
    ] {
        assert!(line.contains(field), "{field:?} not in {line:?}");
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    assert_eq!(field("key").len(), 12, "{line}");
    let ms: f64 = field("upstream_ms")
        .parse()
        .expect("upstream_ms is a number");
    assert!(ms > 0.0, "{line}");
    assert!(!stderr.contains(RAW_KEY) && !stderr.contains(RAW_BODY));
}

// ---------------------------------------------------------------------------
// Prometheus and promtool (Debian package `prometheus`)
// ---------------------------------------------------------------------------

/// A binary of Debian's `prometheus` package; fails the test, naming the package, when it
/// is not installed.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found on PATH: this test needs the Debian package `prometheus` \
                 (it ships `prometheus` and `promtool`): apt-get install prometheus \
                 (.ci/run installs it when missing)"
            )
        })
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a command to completion: (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server on a loopback port, scraping one idem every second. Killed and
/// reaped on drop; its data lives in a temporary directory.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let bin = tool("prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: idem\n    static_configs:\n      - targets: ['{target}']\n"
        );
        // The port is picked free, then bound by Prometheus: retry if another process won it.
        for attempt in 1..=3 {
            let dir = TempDir::new();
            let config_file = dir.write("prometheus.yml", &config);
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let addr = free_addr();
            let child = Command::new(&bin)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut prom = Prometheus {
                child,
                addr,
                dir,
                http: client(),
            };
            match prom.wait_ready().await {
                Ok(()) => return prom,
                Err(log) if attempt < 3 && log.contains("address already in use") => continue,
                Err(log) => panic!("prometheus did not become ready:\n{log}"),
            }
        }
        unreachable!()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `/-/ready` until 200; `Err(log)` if the process exits or the deadline passes.
    async fn wait_ready(&mut self) -> Result<(), String> {
        // Start-up replays an empty TSDB; the machine is shared: generous, still bounded.
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://{}/-/ready", self.addr);
        let mut backoff = Duration::from_millis(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after 30s\n{}", self.log()));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// An instant query through the HTTP API: the `data` member.
    async fn query(&self, expr: &str) -> serde_json::Value {
        let url = format!("http://{}/api/v1/query?query={}", self.addr, encode(expr));
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {expr:?}: {e}"));
        let status = resp.status();
        let body: serde_json::Value =
            serde_json::from_str(&resp.text().await.unwrap()).expect("query answer is JSON");
        assert!(
            status == 200 && body["status"] == "success",
            "query {expr:?} failed ({status}): {body}"
        );
        body["data"].clone()
    }

    /// Queries until `done` accepts the answer (scrapes arrive every second).
    async fn query_until(
        &self,
        expr: &str,
        deadline: Instant,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let data = self.query(expr).await;
            if done(&data) {
                return data;
            }
            if Instant::now() >= deadline {
                panic!(
                    "query {expr:?} never gave the expected answer; last: {data}\n\
                     --- prometheus log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether a query answer holds at least one sample.
fn non_empty(data: &serde_json::Value) -> bool {
    match data["resultType"].as_str() {
        Some("vector" | "matrix") => data["result"].as_array().is_some_and(|r| !r.is_empty()),
        Some("scalar" | "string") => true,
        _ => false,
    }
}

/// The single value of a one-sample vector answer.
fn single_value(data: &serde_json::Value) -> Option<String> {
    let result = data["result"].as_array()?;
    match result.as_slice() {
        [one] => one["value"][1].as_str().map(str::to_owned),
        _ => None,
    }
}

/// The `idem_*` metric names an expression or file refers to.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("idem_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// An idem with a little traffic of several outcomes: (idem, backend, requests sent).
async fn idem_with_traffic() -> (Idem, Backend, u64) {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    for key in ["p1", "p2", "p3"] {
        for _ in 0..2 {
            let r = post(&http, idem.url("/api/p"), Some(key), "x", &[]).await;
            assert_eq!(status_of(r).await, 200);
        }
    }
    let r = post(&http, idem.url("/api/q"), None, "x", &[]).await;
    assert_eq!(status_of(r).await, 200);
    // 3 leaders, 3 replays, 1 bypass, all logged before Prometheus is asked.
    wait_for_values(
        &idem,
        &one(
            "idem_requests_total",
            &[("route", "api"), ("outcome", "replayed")],
            3.0,
        ),
    )
    .await;
    (idem, b, 7)
}

#[tokio::test]
async fn metrics_pass_promtool_check_metrics() {
    let promtool = tool("promtool");
    let (idem, _b, _) = idem_with_traffic().await;
    let text = scrape_exposition(&idem).await.text;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn promtool: {e}"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn prometheus_scrapes_idem_and_counts_its_requests() {
    tool("prometheus");
    let (idem, _b, sent) = idem_with_traffic().await;
    let prom = Prometheus::start(idem.metrics_addr()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = sent.to_string();
    let data = prom
        .query_until(
            r#"sum(idem_requests_total{job="idem",route="api"})"#,
            deadline,
            |d| single_value(d).as_deref() == Some(want.as_str()),
        )
        .await;
    assert_eq!(single_value(&data).as_deref(), Some(want.as_str()));
    let replayed = prom
        .query(r#"idem_requests_total{route="api",outcome="replayed"}"#)
        .await;
    assert_eq!(single_value(&replayed).as_deref(), Some("3"));
    let up = prom.query(r#"up{job="idem"}"#).await;
    assert_eq!(single_value(&up).as_deref(), Some("1"));
}

/// Every `targets[].expr` of a dashboard, with its panel title.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: {t}"));
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

#[tokio::test]
async fn dashboard_is_valid_and_every_expression_returns_data_from_idem() {
    tool("prometheus");
    let path = repo_file("dashboards/idem.json");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));

    // Shape: a Grafana dashboard with a datasource and a multi-value route variable.
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let route = var("route");
    assert_eq!(route["type"], "query");
    assert_eq!(
        route["definition"],
        "label_values(idem_requests_total, route)"
    );
    assert_eq!(
        route["query"]["query"],
        "label_values(idem_requests_total, route)"
    );
    assert_eq!(route["multi"], true);
    assert_eq!(route["includeAll"], true);
    assert_eq!(route["allValue"], ".*");
    // Every panel and target queries the selected data source.
    let mut stack = vec![&dash["panels"]];
    while let Some(panels) = stack.pop() {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            }
            stack.push(&p["panels"]);
        }
    }
    // The first row answers "how much duplicate work did idem save".
    let first = &dash["panels"][0];
    assert_eq!(first["type"], "row");
    assert!(
        first["title"].as_str().unwrap().contains("saved"),
        "{first}"
    );
    let saved = &dash["panels"][1];
    assert!(saved["title"].as_str().unwrap().contains("saved"));
    assert!(saved["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .contains(r#"outcome=~"collapsed|replayed""#));

    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 15, "{} expressions", exprs.len());
    let route_labelled = [
        "idem_requests_total",
        "idem_request_duration_seconds_bucket",
        "idem_upstream_requests_total",
        "idem_upstream_duration_seconds_bucket",
        "idem_detached_completions_total",
        "idem_shadow_duplicates_total",
        "idem_responses_total",
    ];
    for (title, expr) in &exprs {
        for name in route_labelled {
            for (at, _) in expr.match_indices(&format!("{name}{{")) {
                let selector = &expr[at..at + expr[at..].find('}').unwrap()];
                assert!(
                    selector.contains(r#"route=~"$route""#),
                    "{title}: {name} without the route filter: {expr}"
                );
            }
        }
        assert!(
            !expr.contains("rate(")
                || expr.contains("[$__rate_interval]")
                || expr.contains("[$__range]"),
            "{title}: rates use $__rate_interval or $__range: {expr}"
        );
    }

    // Every metric the dashboard names is one idem exports.
    let (idem, _b, sent) = idem_with_traffic().await;
    let exported = scrape_exposition(&idem).await.names();
    let mut referenced = BTreeSet::new();
    for (_, expr) in &exprs {
        referenced.extend(metric_names(expr));
    }
    referenced.extend(metric_names(route["definition"].as_str().unwrap()));
    let unknown: Vec<_> = referenced.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported by idem: {unknown:?}");

    // Every expression, variables substituted, returns data from a real Prometheus.
    let prom = Prometheus::start(idem.metrics_addr()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = sent.to_string();
    prom.query_until("sum(idem_requests_total)", deadline, |d| {
        single_value(d).as_deref() == Some(want.as_str())
    })
    .await;
    let routes = prom.query("count by (route) (idem_requests_total)").await;
    assert!(non_empty(&routes), "no route values for $route: {routes}");
    for (title, expr) in &exprs {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1m")
            .replace("$route", ".*");
        assert!(
            !expr.contains('$'),
            "{title}: unsubstituted variable in {expr}"
        );
        prom.query_until(&expr, deadline, non_empty).await;
    }
}

// ---------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("promtool");
    let rules = repo_file("dashboards/alerts.yml");
    let (ok, out) = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(ok, "promtool check rules {}:\n{out}", rules.display());
    assert!(out.contains("7 rules found"), "{out}");
    let tests = repo_file("dashboards/alerts_test.yml");
    let (ok, out) = run(Command::new(&promtool)
        .arg("test")
        .arg("rules")
        .arg(&tests)
        .current_dir(repo_file("dashboards")));
    assert!(ok, "promtool test rules {}:\n{out}", tests.display());
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "IdemUpstreamErrorRatioHigh",
        "IdemStoreErrors",
        "IdemStoreNearBound",
        "IdemCapacityEvictions",
        "IdemWaitersPilingUp",
        "IdemRoute5xxRatioHigh",
        "IdemBackendDown",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert}");
        let tested = std::fs::read_to_string(&tests).unwrap();
        assert!(
            tested.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}

#[tokio::test]
async fn alert_rules_use_only_metrics_idem_exports() {
    let b = Backend::start().await;
    let idem = Idem::start(&config_for(b.addr())).await;
    let exported = scrape_exposition(&idem).await.names();
    let text = std::fs::read_to_string(repo_file("dashboards/alerts.yml")).unwrap();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let referenced = metric_names(&code);
    assert!(referenced.len() >= 8, "{referenced:?}");
    let unknown: Vec<_> = referenced.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported by idem: {unknown:?}");
}

/// Named groups' backends have their own `idem_backend_*` series: a route's calls count on
/// its group's backend (pass-through and leader calls alike), never on `[upstream]`'s.
#[tokio::test]
async fn each_groups_backends_count_their_own_calls() {
    let main = Backend::start().await;
    let other = Backend::start().await;
    let config = Config::new(main.addr())
        .set("upstreams.other.backends", vec![other.addr().to_string()])
        .route(Route::new("other", "/other/", "keyed").set("upstream", "other"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let r = http.get(idem.url("/x")).send().await.unwrap();
    assert_eq!(status_of(r).await, 200);
    for path in ["/other/a", "/other/b"] {
        let r = http.get(idem.url(path)).send().await.unwrap();
        assert_eq!(status_of(r).await, 200);
    }
    let r = post(&http, idem.url("/other/pay"), Some("k-1"), "x", &[]).await;
    assert_eq!(status_of(r).await, 200);
    assert_eq!(main.counts("/x").completed, 1);
    for path in ["/other/a", "/other/b", "/other/pay"] {
        assert_eq!(other.counts(path).completed, 1, "{path}");
        assert_eq!(main.counts(path).started, 0, "{path}");
    }
    let (main, other) = (main.addr().to_string(), other.addr().to_string());
    let mut want = one(
        "idem_backend_requests_total",
        &[("backend", &main), ("class", "2xx")],
        1.0,
    );
    want.extend(one(
        "idem_backend_requests_total",
        &[("backend", &other), ("class", "2xx")],
        3.0,
    ));
    want.extend(one("idem_backend_up", &[("backend", &main)], 1.0));
    want.extend(one("idem_backend_up", &[("backend", &other)], 1.0));
    wait_for_values(&idem, &want).await;
}
