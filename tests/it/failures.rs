//! Failure classes and limits: what idem answers when the upstream fails (unreachable,
//! outcome unknown, application errors), and how its bounds behave (request body, response
//! body, store capacity, retention).
//!
//! Every scenario counts executions at the backend: the claim under test is always "how many
//! times did the app run this request", next to what the client saw.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::*;

/// Short timeouts so that held keys and expiries play out within a few seconds.
fn base(backends: &[SocketAddr], total: Duration, read: Duration) -> Config {
    Config::with_backends(backends)
        .set("upstream.read_timeout", humantime(read))
        .set("upstream.total_timeout", humantime(total))
        .set("server.grace_period", "5s")
}

fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A response, whichever client read it.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        let shown: String = text.chars().take(300).collect();
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &format_args!("{} bytes {shown:?}", self.body.len()))
            .finish()
    }
}

impl Answer {
    async fn from_reqwest(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("reading a {status} body: {e}"))
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn from_raw(r: RawResponse) -> Answer {
        let mut headers = HeaderMap::new();
        for (name, value) in &r.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_bytes(value).expect("header value"),
            );
        }
        Answer {
            status: r.status,
            headers,
            body: r.body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("Retry-After is not delta-seconds: {v:?}"))
        })
    }

    /// The backend's per-path call number: which execution produced this response.
    fn backend_call(&self) -> Option<u64> {
        self.header("x-backend-call").and_then(|v| v.parse().ok())
    }

    /// idem's own problem answer: status, media type, `type`, `status` member and the
    /// `Cache-Status` detail all agree on `kind`.
    #[track_caller]
    fn assert_problem(&self, status: u16, kind: &str) {
        let read = ReadResponse::new(self.status, &self.headers, &self.body);
        let json = assert_problem(&read, status, kind);
        assert_problem_members(&json, status);
    }

    /// A fresh execution whose response idem kept for replay.
    #[track_caller]
    fn assert_stored_leader(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?} body {:?}", self.text());
        assert_eq!(
            self.cache_status(),
            "idem; fwd=uri-miss; stored",
            "{self:?}"
        );
        assert_eq!(self.backend_call(), Some(call), "{self:?}");
        assert_eq!(self.header("idempotent-replayed"), None, "{self:?}");
    }

    /// A replay of the stored response of execution number `call`.
    #[track_caller]
    fn assert_replay_of(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?} body {:?}", self.text());
        assert!(
            self.cache_status().starts_with("idem; hit; ttl="),
            "expected a replay, got {self:?}"
        );
        assert_eq!(self.header("idempotent-replayed"), Some("true"), "{self:?}");
        assert_eq!(self.backend_call(), Some(call), "{self:?}");
    }
}

/// One request, repeatable and sendable from a spawned task.
#[derive(Clone)]
struct Call {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Call {
    fn new(idem: &Idem, path: &str) -> Call {
        Call {
            http: client(),
            url: idem.url(path),
            key: None,
            headers: Vec::new(),
            body: b"{\"amount\":42}".to_vec(),
        }
    }

    fn key(mut self, key: &str) -> Call {
        self.key = Some(key.to_owned());
        self
    }

    fn header(mut self, name: &str, value: impl ToString) -> Call {
        self.headers.push((name.to_owned(), value.to_string()));
        self
    }

    fn body(mut self, body: &[u8]) -> Call {
        self.body = body.to_vec();
        self
    }

    async fn send(&self) -> Answer {
        let mut req = self.http.post(&self.url).body(self.body.clone());
        if let Some(k) = &self.key {
            req = req.header("idempotency-key", k);
        }
        for (n, v) in &self.headers {
            req = req.header(n, v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {}: {e}", self.url));
        Answer::from_reqwest(resp).await
    }

    fn spawn(&self) -> JoinHandle<Answer> {
        let call = self.clone();
        tokio::spawn(async move { call.send().await })
    }
}

const EVICTED_CAPACITY: &str = "idem_store_evictions_total{reason=\"capacity\"}";
const EVICTED_EXPIRED: &str = "idem_store_evictions_total{reason=\"expired\"}";

// ---------------------------------------------------------------------------------------
// A. Failure classes
// ---------------------------------------------------------------------------------------

/// A refused connection sends nothing: the next backend takes the call, and each key runs
/// exactly once there.
#[tokio::test]
async fn refused_backend_is_skipped_and_the_live_one_runs_each_key_once() {
    let live = Backend::start().await;
    // Without a health check both backends stay eligible, so round robin really offers the
    // refused one first for some of the keys below.
    let config = base(&[free_addr(), live.addr()], TOTAL, Duration::from_secs(1))
        .set("upstream.health_check", "none");
    let idem = Idem::start(&config.to_string()).await;
    for n in 1..=4 {
        let path = format!("/refused/{n}");
        let call = Call::new(&idem, &path).key(&format!("refused-{n}"));
        call.send().await.assert_stored_leader(1);
        call.send().await.assert_replay_of(1);
        assert_eq!(live.settled(&path).await.started, 1, "{path}");
    }
    assert_eq!(live.total().started, 4);
}

/// With no backend to take it, the request fails with 502 upstream-unreachable and the key
/// is freed at once: a retry fails the same way (not a held answer), and as soon as the
/// backend is up the same key executes.
#[tokio::test]
async fn unreachable_upstream_frees_the_key() {
    let addr = free_addr();
    let config = base(&[addr], TOTAL, Duration::from_secs(1)).set("upstream.health_check", "none");
    let idem = Idem::start(&config.to_string()).await;
    let call = Call::new(&idem, "/unreachable").key("unreachable-1");
    for _ in 0..2 {
        let a = call.send().await;
        a.assert_problem(502, "upstream-unreachable");
        assert_eq!(a.retry_after(), None, "{a:?}");
    }
    let backend = Backend::start_at(addr).await;
    call.send().await.assert_stored_leader(1);
    call.send().await.assert_replay_of(1);
    assert_eq!(backend.settled("/unreachable").await.started, 1);
}

/// The outcome-unknown lifecycle for one way of failing after the request was sent:
/// the leader and a waiter get `status` outcome-unknown with Retry-After; every retry
/// during the hold (call start + total timeout) gets the same answer without reaching the
/// backend; the first retry after the hold executes exactly once more.
async fn held_scenario(
    path: &str,
    steer: &[(&str, &str)],
    status: u16,
    total: Duration,
    read: Duration,
) {
    let b = Backend::start().await;
    let idem = Idem::start(&base(&[b.addr()], total, read).to_string()).await;
    let mut call = Call::new(&idem, path).key("held-1");
    for (n, v) in steer {
        call = call.header(n, v);
    }
    let max_retry_after = total.as_secs_f64().ceil() as u64;

    let gate = b.gate(path);
    let t0 = Instant::now();
    let leader = call.spawn();
    gate.wait_started(1).await;
    let waiter = call.spawn();
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    let leader = leader.await.expect("leader task");
    let waiter = waiter.await.expect("waiter task");
    let answered = Instant::now();
    for (who, a) in [("leader", &leader), ("waiter", &waiter)] {
        a.assert_problem(status, "outcome-unknown");
        let ra = a
            .retry_after()
            .unwrap_or_else(|| panic!("{who}: no Retry-After"));
        assert!(
            (1..=max_retry_after).contains(&ra),
            "{who}: Retry-After {ra}"
        );
    }
    assert_eq!(b.settled(path).await.started, 1);
    assert_eq!(metric(&idem, "idem_held_keys").await, 1.0);

    // Retry until the backend sees a second call; every retry before that is the held answer.
    let mut held_retries = 0;
    let executed = loop {
        let a = call.send().await;
        let now = Instant::now();
        if b.counts(path).started == 1 {
            a.assert_problem(status, "outcome-unknown");
            let ra = a.retry_after().expect("held retry: no Retry-After");
            assert!(
                (1..=max_retry_after).contains(&ra),
                "held retry: Retry-After {ra}"
            );
            held_retries += 1;
            assert!(
                now < answered + total + Duration::from_secs(3),
                "the hold did not end: still held {:?} after the leader's answer",
                now - answered
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        // The call started after t0, so its hold cannot have ended before t0 + total.
        assert!(
            now >= t0 + total,
            "a retry executed {:?} after the first call, inside the {total:?} hold",
            now - t0
        );
        break a;
    };
    assert!(held_retries >= 1, "no retry landed inside the hold");
    // The second execution failed the same way: held again, and nothing more runs.
    executed.assert_problem(status, "outcome-unknown");
    call.send().await.assert_problem(status, "outcome-unknown");
    assert_eq!(b.settled(path).await.started, 2);
}

const TOTAL: Duration = Duration::from_secs(2);
const LONG_READ: Duration = Duration::from_secs(10);

#[tokio::test]
async fn reset_after_the_request_was_sent_holds_the_key() {
    let steer = [("x-fault", "reset-before-headers")];
    held_scenario("/held/reset", &steer, 502, TOTAL, LONG_READ).await;
}

#[tokio::test]
async fn close_after_the_request_was_sent_holds_the_key() {
    let steer = [("x-fault", "close-before-headers")];
    held_scenario("/held/close", &steer, 502, TOTAL, LONG_READ).await;
}

#[tokio::test]
async fn malformed_response_head_holds_the_key() {
    let steer = [("x-fault", "malformed-status")];
    held_scenario("/held/malformed", &steer, 502, TOTAL, LONG_READ).await;
}

#[tokio::test]
async fn upstream_read_timeout_holds_the_key() {
    // The read timeout (1s) fires well inside the hold (3s) so that retries land in it.
    let steer = [("x-fault", "stall")];
    held_scenario(
        "/held/stall",
        &steer,
        504,
        Duration::from_secs(3),
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn response_cut_off_mid_body_holds_the_key() {
    let steer = [("x-fault", "reset-mid-body"), ("x-body-size", "4000")];
    held_scenario("/held/cut", &steer, 502, TOTAL, LONG_READ).await;
}

#[tokio::test]
async fn upstream_502_holds_the_key() {
    let steer = [("x-status", "502")];
    held_scenario("/held/502", &steer, 502, TOTAL, LONG_READ).await;
}

#[tokio::test]
async fn upstream_504_holds_the_key() {
    let steer = [("x-status", "504")];
    held_scenario("/held/504", &steer, 504, TOTAL, LONG_READ).await;
}

/// 500 and 503 are the app's answers: delivered as they are, not stored, and a retry runs.
#[tokio::test]
async fn app_500_and_503_are_delivered_not_stored_and_retried() {
    let b = Backend::start().await;
    let idem = Idem::start(&base(&[b.addr()], TOTAL, LONG_READ).to_string()).await;
    for status in [500u16, 503] {
        let path = format!("/app-error/{status}");
        let call = Call::new(&idem, &path)
            .key(&format!("app-error-{status}"))
            .header("x-status", status)
            .header("x-body", "the app said no");
        for n in 1..=2 {
            let a = call.send().await;
            assert_eq!(a.status, status, "{a:?}");
            assert_eq!(a.text(), "the app said no");
            assert_eq!(a.header("content-type"), Some("text/plain"));
            assert_eq!(a.cache_status(), "idem; fwd=uri-miss", "{a:?}");
            assert_eq!(a.header("idempotent-replayed"), None);
            assert_eq!(a.backend_call(), Some(n), "attempt {n} must execute");
        }
        assert_eq!(b.settled(&path).await.started, 2, "{path}");
    }
}

// ---------------------------------------------------------------------------------------
// B. Limits
// ---------------------------------------------------------------------------------------

const TOO_LARGE_FP: &str = "idem_requests_total{route=\"fp\",outcome=\"too_large\"}";

/// `max_body` = 1 KiB everywhere; `/fp/` deduplicates keyless requests by fingerprint.
fn body_limit_config(backend: SocketAddr) -> Config {
    base(&[backend], Duration::from_secs(5), Duration::from_secs(5))
        .set("dedup.max_body", "1KiB")
        .route(Route::new("fp", "/fp/", "fingerprint"))
}

#[tokio::test]
async fn body_over_max_body_by_content_length() {
    let b = Backend::start().await;
    let idem = Idem::start(&body_limit_config(b.addr()).to_string()).await;

    // Keyed: refused from the head alone (no body byte is ever sent), backend untouched.
    for path in ["/pay/big", "/fp/keyed-big"] {
        let mut conn = RawConn::connect(idem.addr()).await;
        conn.send(&http_request(
            "POST",
            path,
            &[("idempotency-key", "too-big-1"), ("content-length", "1025")],
            b"",
        ))
        .await;
        let a = tokio::time::timeout(WAIT_TIMEOUT, conn.read_response())
            .await
            .unwrap_or_else(|_| {
                panic!("{path}: no answer to the head of an oversized keyed request")
            });
        Answer::from_raw(a).assert_problem(413, "too-large");
        assert_eq!(b.counts(path).started, 0, "{path}");
    }

    // Keyless on a fingerprint route: passed through whole, and not deduplicated.
    let big = pattern(1025);
    let call = Call::new(&idem, "/fp/big").header("x-echo", "1").body(&big);
    for _ in 0..2 {
        let a = call.send().await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.cache_status(), "idem; fwd=bypass");
        assert!(
            a.body == big,
            "echoed body differs ({} bytes)",
            a.body.len()
        );
    }
    assert_eq!(b.settled("/fp/big").await.started, 2);
    assert!(b.requests("/fp/big").iter().all(|r| r.body == big));

    // Control: the same route deduplicates a keyless body that fits.
    let small = Call::new(&idem, "/fp/small").body(&pattern(1024));
    small.send().await.assert_stored_leader(1);
    small.send().await.assert_replay_of(1);
    assert_eq!(b.settled("/fp/small").await.started, 1);
    assert_eq!(b.total().started, 3);

    // Refused and passed-through oversized requests are all counted as too_large.
    wait_metric(&idem, TOO_LARGE_FP, 3.0).await;
    wait_metric(
        &idem,
        "idem_requests_total{route=\"default\",outcome=\"too_large\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn chunked_body_over_max_body() {
    let b = Backend::start().await;
    let idem = Idem::start(&body_limit_config(b.addr()).to_string()).await;

    // Keyed: 413 once the body read passes max_body; the backend is never called.
    let mut conn = RawConn::connect(idem.addr()).await;
    let mut req = http_request(
        "POST",
        "/fp/chunked-keyed",
        &[
            ("idempotency-key", "chunked-1"),
            ("transfer-encoding", "chunked"),
        ],
        b"",
    );
    // One 2 KiB chunk, no terminating chunk: idem must decide before the body ends.
    req.extend_from_slice(format!("{:x}\r\n", 2048).as_bytes());
    req.extend_from_slice(&pattern(2048));
    req.extend_from_slice(b"\r\n");
    conn.send(&req).await;
    let a = tokio::time::timeout(WAIT_TIMEOUT, conn.read_response())
        .await
        .expect("no answer to an oversized keyed chunked body");
    Answer::from_raw(a).assert_problem(413, "too-large");
    assert_eq!(b.counts("/fp/chunked-keyed").started, 0);

    // Keyless on a fingerprint route: forwarded whole (idem already consumed part of it).
    let full = pattern(3000);
    let pieces: Vec<&[u8]> = full.chunks(700).collect();
    for attempt in 1..=2u64 {
        let req = [
            http_request(
                "POST",
                "/fp/chunked",
                &[("transfer-encoding", "chunked"), ("x-echo", "1")],
                b"",
            ),
            chunked_body(&pieces),
        ]
        .concat();
        let a = Answer::from_raw(raw_request(idem.addr(), &req).await);
        assert_eq!(a.status, 200, "{a:?} body {:?}", a.text());
        assert_eq!(a.cache_status(), "idem; fwd=bypass");
        assert!(
            a.body == full,
            "echoed body differs ({} bytes)",
            a.body.len()
        );
        assert_eq!(b.settled("/fp/chunked").await.started, attempt);
    }
    let seen = b.requests("/fp/chunked");
    assert!(
        seen.iter().all(|r| r.body == full),
        "backend received bodies of {:?} bytes",
        seen.iter().map(|r| r.body.len()).collect::<Vec<_>>()
    );
    assert_eq!(b.total().started, 2);
    wait_metric(&idem, TOO_LARGE_FP, 3.0).await;
}

/// A response over `max_response_body`, declared by Content-Length or found while reading a
/// chunked body: the leader gets all of it, waiters and later requests 409 not-replayable,
/// and the backend ran once.
#[tokio::test]
async fn response_over_max_response_body_is_streamed_once_and_not_replayable() {
    let b = Backend::start().await;
    let config = base(&[b.addr()], Duration::from_secs(5), Duration::from_secs(5))
        .set("dedup.max_response_body", "1KiB");
    let idem = Idem::start(&config.to_string()).await;
    let size = 5000;
    let cases: [(&str, &[(&str, &str)]); 2] = [
        ("/big-response/length", &[]),
        (
            "/big-response/chunked",
            &[("x-fault", "chunked"), ("x-chunks", "5")],
        ),
    ];
    for (path, steer) in cases {
        let mut call = Call::new(&idem, path).key(path).header("x-body-size", size);
        for (n, v) in steer {
            call = call.header(n, v);
        }
        let gate = b.gate(path);
        let leader = call.spawn();
        gate.wait_started(1).await;
        let waiters = [call.spawn(), call.spawn()];
        wait_metric(&idem, "idem_waiters", 2.0).await;
        gate.open();

        let leader = leader.await.expect("leader task");
        assert_eq!(leader.status, 200, "{path}: {leader:?}");
        assert_eq!(leader.cache_status(), "idem; fwd=uri-miss", "{path}");
        assert!(
            leader.body == pattern(size),
            "{path}: leader got {} bytes, not the {size} the backend sent",
            leader.body.len()
        );
        for w in waiters {
            w.await
                .expect("waiter task")
                .assert_problem(409, "not-replayable");
        }
        let later = call.send().await;
        later.assert_problem(409, "not-replayable");
        assert_eq!(b.settled(path).await.started, 1, "{path}");
    }

    // Control: a response of exactly max_response_body is stored and replayed.
    let fits = Call::new(&idem, "/big-response/fits")
        .key("fits-1")
        .header("x-body-size", 1024);
    let a = fits.send().await;
    a.assert_stored_leader(1);
    assert!(a.body == pattern(1024));
    let replay = fits.send().await;
    replay.assert_replay_of(1);
    assert!(replay.body == pattern(1024));
    assert_eq!(b.settled("/big-response/fits").await.started, 1);
}

/// A streamed (not replayable) response that the upstream stops sending half-way: the
/// leader's client sees a truncated response, never a complete one, and the call is never
/// repeated for the key.
#[tokio::test]
async fn streamed_response_cut_off_is_truncated_for_the_leader_and_never_repeated() {
    let b = Backend::start().await;
    // The backend pauses 3s after its first 1000 bytes; idem's read timeout is 1s.
    let config = base(&[b.addr()], Duration::from_secs(5), Duration::from_secs(1))
        .set("dedup.max_response_body", "1KiB");
    let idem = Idem::start(&config.to_string()).await;
    let path = "/big-response/cut";
    let steer = [
        ("idempotency-key", "cut-1"),
        ("x-body-size", "5000"),
        ("x-chunks", "5"),
        ("x-fault", "slow-body"),
        ("x-chunk-ms", "3000"),
    ];
    // Same authority as the reqwest retry below, so both share the key's scope.
    let host = idem.addr().to_string();
    let mut raw_headers = vec![("host", host.as_str())];
    raw_headers.extend_from_slice(&steer);
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&http_request("POST", path, &raw_headers, b"{}"))
        .await;
    // Everything the leader's client receives until idem ends the connection.
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(WAIT_TIMEOUT, conn.stream().read(&mut chunk)).await {
            Err(_) => panic!(
                "the leader's connection stayed open: {} bytes so far",
                got.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
    let split = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&got)));
    let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
    let body = &got[split + 4..];
    assert!(
        head.starts_with("http/1.1 200") && head.contains("content-length: 5000"),
        "{head}"
    );
    assert!(
        body.len() < 5000 && pattern(5000).starts_with(body),
        "the leader got {} body bytes of 5000: it must see the cut",
        body.len()
    );
    let mut call = Call::new(&idem, path).body(b"{}");
    for (n, v) in steer {
        call = if n == "idempotency-key" {
            call.key(v)
        } else {
            call.header(n, v)
        };
    }
    call.send().await.assert_problem(409, "not-replayable");
    let c = b.settled(path).await;
    assert_eq!((c.started, c.completed), (1, 0), "{c:?}");
}

/// `max_entries` = 3: a fourth key evicts the least recently used record.
#[tokio::test]
async fn eviction_at_max_entries_is_least_recently_used() {
    let b = Backend::start().await;
    let config = base(&[b.addr()], TOTAL, LONG_READ).set("store.max_entries", 3);
    let idem = Idem::start(&config.to_string()).await;
    let calls: Vec<Call> = (1..=4)
        .map(|n| Call::new(&idem, &format!("/evict/{n}")).key(&format!("evict-{n}")))
        .collect();
    for c in &calls {
        c.send().await.assert_stored_leader(1);
    }
    assert_eq!(metric(&idem, EVICTED_CAPACITY).await, 1.0);
    // Key 1 was the least recently used when key 4 needed its slot; 2 and 3 survive.
    calls[1].send().await.assert_replay_of(1);
    calls[2].send().await.assert_replay_of(1);
    calls[3].send().await.assert_replay_of(1);
    calls[0].send().await.assert_stored_leader(2);
    assert_eq!(metric(&idem, EVICTED_CAPACITY).await, 2.0);
    assert_eq!(metric(&idem, EVICTED_EXPIRED).await, 0.0);
    for (n, want) in [(1, 2), (2, 1), (3, 1), (4, 1)] {
        assert_eq!(
            b.settled(&format!("/evict/{n}")).await.started,
            want,
            "/evict/{n}"
        );
    }
}

/// `max_bytes` = 2 KiB holds two 800-byte responses: a third evicts the least recently used.
#[tokio::test]
async fn eviction_at_max_bytes_is_least_recently_used() {
    let b = Backend::start().await;
    let config = base(&[b.addr()], TOTAL, LONG_READ)
        .set("store.max_bytes", "2KiB")
        .set("dedup.max_response_body", "1KiB");
    let idem = Idem::start(&config.to_string()).await;
    let calls: Vec<Call> = (1..=3)
        .map(|n| {
            Call::new(&idem, &format!("/bytes/{n}"))
                .key(&format!("bytes-{n}"))
                .header("x-body-size", 800)
        })
        .collect();
    calls[0].send().await.assert_stored_leader(1);
    calls[1].send().await.assert_stored_leader(1);
    calls[1].send().await.assert_replay_of(1);
    calls[0].send().await.assert_replay_of(1);
    // Both fit; the third does not, and key 2 is now the least recently used.
    calls[2].send().await.assert_stored_leader(1);
    assert_eq!(metric(&idem, EVICTED_CAPACITY).await, 1.0);
    calls[0].send().await.assert_replay_of(1);
    calls[2].send().await.assert_replay_of(1);
    calls[1].send().await.assert_stored_leader(2);
    assert_eq!(metric(&idem, EVICTED_CAPACITY).await, 2.0);
    for (n, want) in [(1, 1), (2, 2), (3, 1)] {
        assert_eq!(
            b.settled(&format!("/bytes/{n}")).await.started,
            want,
            "/bytes/{n}"
        );
    }
}

/// In-flight and held keys are never evicted: with `max_entries` = 2 and nothing
/// evictable, a new key gets 503 store-full (Retry-After) without reaching the backend.
#[tokio::test]
async fn store_full_when_only_in_flight_or_held_keys_remain() {
    let b = Backend::start().await;
    // Every slot may be in flight or held (the default keeps half the store for stored
    // responses).
    let config = base(&[b.addr()], Duration::from_secs(5), Duration::from_secs(5))
        .set("store.max_entries", 2)
        .set("store.max_pinned", 2);
    let idem = Idem::start(&config.to_string()).await;

    // Two keys in flight.
    let gate = b.gate("/full/slow");
    let first = Call::new(&idem, "/full/slow").key("full-1");
    let second = Call::new(&idem, "/full/slow").key("full-2");
    let running = [first.spawn(), second.spawn()];
    gate.wait_started(2).await;
    let third = Call::new(&idem, "/full/third").key("full-3");
    let full = third.send().await;
    full.assert_problem(503, "store-full");
    assert_eq!(full.retry_after(), Some(1), "{full:?}");
    assert_eq!(b.counts("/full/third").started, 0);
    gate.open();
    for r in running {
        let a = r.await.expect("leader task");
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.cache_status(), "idem; fwd=uri-miss; stored");
    }
    // Completed records are evictable: the third key now runs.
    third.send().await.assert_stored_leader(1);

    // One held key plus one in flight: full again.
    let held = Call::new(&idem, "/full/held")
        .key("full-4")
        .header("x-status", 502);
    held.send().await.assert_problem(502, "outcome-unknown");
    let gate = b.gate("/full/slow2");
    let running = Call::new(&idem, "/full/slow2").key("full-5").spawn();
    gate.wait_started(1).await;
    let sixth = Call::new(&idem, "/full/sixth").key("full-6");
    let full = sixth.send().await;
    full.assert_problem(503, "store-full");
    assert_eq!(full.retry_after(), Some(1), "{full:?}");
    // The held key is still held, not evicted to make room.
    held.send().await.assert_problem(502, "outcome-unknown");
    gate.open();
    assert_eq!(running.await.expect("leader task").status, 200);

    assert_eq!(b.counts("/full/sixth").started, 0);
    assert_eq!(b.settled("/full/held").await.started, 1);
    assert_eq!(b.settled("/full/slow").await.started, 2);
    assert_eq!(b.settled("/full/third").await.started, 1);
}

/// A keyed record is replayed until `ttl` after completion, then the key runs again.
#[tokio::test]
async fn keyed_record_expires_after_ttl() {
    let b = Backend::start().await;
    let ttl = Duration::from_secs(1);
    let config = base(&[b.addr()], TOTAL, LONG_READ)
        .route(Route::new("short", "/short/", "keyed").set("ttl", humantime(ttl)));
    let idem = Idem::start(&config.to_string()).await;
    let call = Call::new(&idem, "/short/ttl").key("ttl-1");
    call.send().await.assert_stored_leader(1);
    // idem completed the call before its answer arrived: the record expires by then + ttl.
    let expires_by = Instant::now() + ttl;
    let replay = call.send().await;
    replay.assert_replay_of(1);
    assert!(
        matches!(
            replay.cache_status(),
            "idem; hit; ttl=0" | "idem; hit; ttl=1"
        ),
        "{replay:?}"
    );
    tokio::time::sleep_until(expires_by).await;
    call.send().await.assert_stored_leader(2);
    call.send().await.assert_replay_of(2);
    assert_eq!(metric(&idem, EVICTED_EXPIRED).await, 1.0);
    assert_eq!(metric(&idem, EVICTED_CAPACITY).await, 0.0);
    assert_eq!(b.settled("/short/ttl").await.started, 2);
}

/// On a fingerprint route, keyless records expire after `fingerprint_ttl`; keyed records
/// on the same route keep `ttl`.
#[tokio::test]
async fn fingerprint_record_expires_after_fingerprint_ttl() {
    let b = Backend::start().await;
    let fp_ttl = Duration::from_secs(1);
    let config = base(&[b.addr()], TOTAL, LONG_READ)
        .route(Route::new("fp", "/fp/", "fingerprint").set("fingerprint_ttl", humantime(fp_ttl)));
    let idem = Idem::start(&config.to_string()).await;
    let keyless = Call::new(&idem, "/fp/anon");
    let keyed = Call::new(&idem, "/fp/keyed").key("fp-ttl-1");
    keyed.send().await.assert_stored_leader(1);
    keyless.send().await.assert_stored_leader(1);
    let expires_by = Instant::now() + fp_ttl;
    keyless.send().await.assert_replay_of(1);
    keyed.send().await.assert_replay_of(1);
    tokio::time::sleep_until(expires_by).await;
    keyless.send().await.assert_stored_leader(2);
    keyless.send().await.assert_replay_of(2);
    keyed.send().await.assert_replay_of(1);
    assert_eq!(metric(&idem, EVICTED_EXPIRED).await, 1.0);
    assert_eq!(b.settled("/fp/anon").await.started, 2);
    assert_eq!(b.settled("/fp/keyed").await.started, 1);
}
