//! Client aborts at every point, upstream faults, and hostile requests.
//!
//! The promise under test: the backend does the work once, and nobody loses an answer. Every
//! scenario counts executions at the backend (started / completed / aborted per path) and
//! ends by checking that idem's in-flight and waiter gauges are back to zero.
//!
//! Basic upstream failure classes (refused, reset/close before headers, read timeout, cut
//! mid-body, upstream 502/504, app 500/503) live in `failures.rs`; this file adds the
//! malformed status line, client aborts, framing and header attacks, slow clients and the
//! per-scope quota.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::*;

/// Short upstream deadlines so that holds play out within a test.
fn config(b: &Backend) -> Config {
    Config::new(b.addr())
        .set("upstream.read_timeout", "2s")
        .set("upstream.total_timeout", "2s")
        .set("server.grace_period", "5s")
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn requests(outcome: &str) -> String {
    series_id(
        "idem_requests_total",
        [("outcome", outcome), ("route", "default")],
    )
}

/// Nothing in flight and nobody waiting: the lifecycle left nothing behind.
async fn assert_quiet(idem: &Idem) {
    wait_metric(idem, "idem_inflight_keys", 0.0).await;
    wait_metric(idem, "idem_waiters", 0.0).await;
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
    fn assert_problem(&self, status: u16, kind: &str) {
        let read = ReadResponse::new(self.status, &self.headers, &self.body);
        let json = assert_problem(&read, status, kind);
        assert_eq!(json["status"], status, "{json}");
    }

    #[track_caller]
    fn assert_leader(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?} {:?}", self.text());
        assert_eq!(self.header("cache-status"), "idem; fwd=uri-miss; stored");
        assert_eq!(self.call(), call, "{self:?}");
    }

    #[track_caller]
    fn assert_replay(&self, call: u64) {
        assert_eq!(self.status, 200, "{self:?} {:?}", self.text());
        assert!(
            self.header("cache-status").starts_with("idem; hit; ttl="),
            "{self:?}"
        );
        assert_eq!(self.header("idempotent-replayed"), "true");
        assert_eq!(self.call(), call, "{self:?}");
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keyed POST; `extra` headers steer the backend or set the scope.
async fn post(idem: &Idem, path: &str, key: &str, extra: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut req = client()
        .post(idem.url(path))
        .header("idempotency-key", key)
        .body(body.to_vec());
    for (n, v) in extra {
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

fn spawn_post(
    idem: &Idem,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
) -> tokio::task::JoinHandle<Reply> {
    let url = idem.url(path);
    let key = key.to_owned();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    tokio::spawn(async move {
        let mut req = client()
            .post(&url)
            .header("idempotency-key", key)
            .body(&b"{}"[..]);
        for (n, v) in &extra {
            req = req.header(n, v);
        }
        let resp = req.send().await.expect("POST");
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.expect("body").to_vec(),
        }
    })
}

/// The `host` reqwest sends, so that raw and reqwest requests share a scope.
fn host(idem: &Idem) -> String {
    idem.addr().to_string()
}

/// Reads whatever a raw connection gets until the server closes it (or WAIT_TIMEOUT).
async fn read_to_close(conn: &mut RawConn) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(WAIT_TIMEOUT, conn.stream().read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {WAIT_TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status of the first response in `bytes`, if any arrived.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// ---------------------------------------------------------------------------
// 1. Client aborts at every point
// ---------------------------------------------------------------------------

/// A client that leaves half-way through its body (Content-Length or chunked) leaves
/// nothing behind: no flight, no reservation, no backend call; the same key then runs once.
#[tokio::test]
async fn abort_while_sending_the_body_leaves_nothing_behind() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);
    let aborts = "idem_client_aborts_total";

    let mut conn = RawConn::connect(idem.addr()).await;
    let head = http_request(
        "POST",
        "/abort/upload",
        &[
            ("host", &h),
            ("idempotency-key", "upload-1"),
            ("content-length", "20"),
        ],
        b"",
    );
    conn.send(&[head.as_slice(), b"0123456789"].concat()).await;
    drop(conn);
    wait_metric(&idem, aborts, 1.0).await;

    let mut conn = RawConn::connect(idem.addr()).await;
    let head = http_request(
        "POST",
        "/abort/upload",
        &[
            ("host", &h),
            ("idempotency-key", "upload-2"),
            ("transfer-encoding", "chunked"),
        ],
        b"",
    );
    conn.send(&[head.as_slice(), b"a\r\n0123456789\r\n"].concat())
        .await;
    drop(conn);
    wait_metric(&idem, aborts, 2.0).await;

    assert_quiet(&idem).await;
    assert_eq!(metric_or_zero(&idem, "idem_store_entries").await, 0.0);
    assert_eq!(b.total(), Counts::default());

    // The keys were never registered: each runs once now, and is then replayed.
    for key in ["upload-1", "upload-2"] {
        post(&idem, "/abort/upload", key, &[], b"01234567890123456789")
            .await
            .assert_leader(if key == "upload-1" { 1 } else { 2 });
        post(&idem, "/abort/upload", key, &[], b"01234567890123456789")
            .await
            .assert_replay(if key == "upload-1" { 1 } else { 2 });
    }
    assert_eq!(b.settled("/abort/upload").await.started, 2);
    assert_quiet(&idem).await;
}

/// The leader's client leaves while its call runs: the call is not cancelled upstream
/// (completed, not aborted), its response is stored, counted as a detached completion, and
/// the retry is a replay of that one execution.
#[tokio::test]
async fn leader_abort_while_waiting_detaches_the_call_and_keeps_its_response() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let path = "/abort/leader";
    let gate = b.gate(path);
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&http_request(
        "POST",
        path,
        &[("host", &host(&idem)), ("idempotency-key", "leader-1")],
        b"{}",
    ))
    .await;
    gate.wait_started(1).await;
    drop(conn);
    // idem noticed: the leader's request has ended (logged) while its call still runs.
    wait_metric(&idem, &requests("leader"), 1.0).await;
    assert_eq!(metric_or_zero(&idem, "idem_inflight_keys").await, 1.0);
    gate.open();
    wait_metric(
        &idem,
        "idem_detached_completions_total{route=\"default\"}",
        1.0,
    )
    .await;
    assert_eq!(
        b.settled(path).await,
        Counts {
            started: 1,
            completed: 1,
            aborted: 0
        }
    );
    post(&idem, path, "leader-1", &[], b"{}")
        .await
        .assert_replay(1);
    assert_eq!(b.counts(path).started, 1);
    assert_quiet(&idem).await;
}

/// A waiter that leaves just gives its place back: the leader and the other waiter get the
/// one execution's response, and the counts return to zero.
#[tokio::test]
async fn waiter_abort_leaves_the_flight_and_the_others_get_the_response() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let path = "/abort/waiter";
    let gate = b.gate(path);
    let leader = spawn_post(&idem, path, "waiter-1", &[]);
    gate.wait_started(1).await;
    let mut quitter = RawConn::connect(idem.addr()).await;
    quitter
        .send(&http_request(
            "POST",
            path,
            &[("host", &host(&idem)), ("idempotency-key", "waiter-1")],
            b"{}",
        ))
        .await;
    wait_metric(&idem, "idem_waiters", 1.0).await;
    let stayer = spawn_post(&idem, path, "waiter-1", &[]);
    wait_metric(&idem, "idem_waiters", 2.0).await;
    drop(quitter);
    wait_metric(&idem, "idem_waiters", 1.0).await;
    assert_eq!(metric_or_zero(&idem, "idem_inflight_keys").await, 1.0);
    gate.open();

    let leader = leader.await.expect("leader");
    leader.assert_leader(1);
    let stayer = stayer.await.expect("waiter");
    assert_eq!(stayer.status, 200);
    assert_eq!(
        stayer.header("cache-status"),
        "idem; fwd=uri-miss; collapsed"
    );
    assert_eq!((stayer.call(), stayer.body.clone()), (1, leader.body));
    assert_eq!(
        b.settled(path).await,
        Counts {
            started: 1,
            completed: 1,
            aborted: 0
        }
    );
    assert_quiet(&idem).await;
    post(&idem, path, "waiter-1", &[], b"{}")
        .await
        .assert_replay(1);
}

/// The client resets its connection while idem is still writing a large stored response:
/// the write fails, the stored response survives whole, and the retry replays it.
#[tokio::test]
async fn abort_while_the_response_is_written_keeps_the_stored_response() {
    const SIZE: usize = 6_000_000;
    let b = Backend::start().await;
    let config = config(&b).set("dedup.max_response_body", "8MiB");
    let idem = Idem::start(&config.to_string()).await;
    let path = "/abort/write";
    let size = SIZE.to_string();
    let steer = [("x-body-size", size.as_str())];

    // A tiny receive window, so that the 6 MB cannot all sit in socket buffers.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(idem.addr()).await.expect("connect");
    let host = host(&idem);
    let req = http_request(
        "POST",
        path,
        &[("host", &host), ("idempotency-key", "write-1"), steer[0]],
        b"{}",
    );
    stream.write_all(&req).await.expect("write");
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(WAIT_TIMEOUT, stream.read(&mut first))
        .await
        .expect("first response bytes")
        .expect("read");
    assert!(
        n > 0 && first.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &first[..n]
    );
    // Leave with most of the body unread (the kernel answers further data with RST).
    drop(stream);
    // The leader's request ends with a write error, after the response was stored.
    wait_metric(&idem, &requests("leader"), 1.0).await;
    let log = idem.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains(path) && l.contains("outcome=leader"))
        .unwrap_or_else(|| panic!("no access line for {path}:\n{}", log_tail(&idem)));
    assert!(line.contains(" error="), "the write did not fail: {line}");

    let replay = post(&idem, path, "write-1", &steer, b"{}").await;
    replay.assert_replay(1);
    assert!(
        replay.body == pattern(SIZE),
        "replayed {} bytes",
        replay.body.len()
    );
    assert_eq!(b.settled(path).await.started, 1);
    assert_quiet(&idem).await;
}

// ---------------------------------------------------------------------------
// 2. Upstream faults failures.rs does not cover
// ---------------------------------------------------------------------------

/// A malformed status line after the request was sent: the app may have run it. Leader and
/// waiter get 502 outcome-unknown, nothing is stored, retries during the hold never reach
/// the backend, and after the hold exactly one new execution runs (and is then replayed).
#[tokio::test]
async fn malformed_status_line_holds_the_key_then_runs_exactly_once() {
    let b = Backend::start().await;
    let total = Duration::from_secs(2);
    let idem = Idem::start(&config(&b).to_string()).await;
    let path = "/fault/malformed";
    let fault = [("x-fault", "malformed-status")];
    let gate = b.gate(path);
    // The key is held from the call's start (after t0) until start + total.
    let t0 = Instant::now();
    let leader = spawn_post(&idem, path, "malformed-1", &fault);
    gate.wait_started(1).await;
    let waiter = spawn_post(&idem, path, "malformed-1", &fault);
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    let replies = [leader.await.expect("leader"), waiter.await.expect("waiter")];
    let answered = Instant::now();
    for r in replies {
        r.assert_problem(502, "outcome-unknown");
        let ra: u64 = r.header("retry-after").parse().expect("Retry-After");
        assert!((1..=2).contains(&ra), "Retry-After {ra}");
    }
    assert_eq!(metric_or_zero(&idem, "idem_held_keys").await, 1.0);
    assert_eq!(metric_or_zero(&idem, "idem_store_entries").await, 1.0);

    // During the hold: the same answer, and the backend is not called, with or without the
    // fault header (it is not part of the fingerprint, so these are the same request).
    for steer in [&fault[..], &[]] {
        post(&idem, path, "malformed-1", steer, b"{}")
            .await
            .assert_problem(502, "outcome-unknown");
    }
    assert!(
        Instant::now() < t0 + total,
        "the hold checks ran too late to mean anything"
    );
    assert_eq!(b.settled(path).await.started, 1);

    // After the hold: exactly one execution, stored and replayed.
    tokio::time::sleep_until(answered + total + Duration::from_millis(100)).await;
    post(&idem, path, "malformed-1", &[], b"{}")
        .await
        .assert_leader(2);
    post(&idem, path, "malformed-1", &fault, b"{}")
        .await
        .assert_replay(2);
    assert_eq!(b.settled(path).await.started, 2);
    assert_eq!(metric_or_zero(&idem, "idem_held_keys").await, 0.0);
    assert_quiet(&idem).await;
}

// ---------------------------------------------------------------------------
// 3. Hostile requests
// ---------------------------------------------------------------------------

/// `Content-Length` and `Transfer-Encoding: chunked` together: the body is read as chunked
/// (TE wins, RFC 9112 6.3), forwarded with an exact length, and the connection is closed
/// after the answer (RFC 9112 6.1), so bytes after the chunked body can never become a
/// request of their own, deduplicated or passed through.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);
    let smuggled = http_request("POST", "/smuggled", &[("host", &h)], b"");
    let mut executed = 0u64;
    for key in [Some("smuggle-1"), None] {
        let mut headers = vec![
            ("host", h.as_str()),
            ("content-length", "4"),
            ("transfer-encoding", "chunked"),
        ];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        let mut req = http_request("POST", "/smuggle", &headers, b"");
        req.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        let mut conn = RawConn::connect(idem.addr()).await;
        conn.send(&req).await;
        // Whatever the client sends next, in the same segment or after the answer, never
        // becomes a request: the connection ends with the first response.
        conn.send(&smuggled).await;
        let first = conn.read_response().await;
        // When the follow-up bytes arrive in the same read as the ambiguous request, Pingora
        // may refuse the whole connection with its own 400 before idem sees it: equally safe
        // (nothing runs). Otherwise idem answers the chunked request and closes.
        assert!(
            first.status == 200 || first.status == 400,
            "{} {:?}",
            first.status,
            first.text()
        );
        assert_eq!(first.header("connection"), Some("close"));
        let _ = conn.stream().write_all(&smuggled).await;
        let rest = read_to_close(&mut conn).await;
        assert!(
            rest.is_empty(),
            "a second response on the connection: {:?}",
            String::from_utf8_lossy(&rest)
        );
        let seen = b.requests("/smuggle");
        if first.status == 400 {
            // Pingora's 400 can also come after it forwarded the request (pass-through), when
            // it finds the extra bytes while pumping the body: the request may have run once,
            // never twice, and the smuggled one never.
            let now = seen.len() as u64;
            assert!(
                now == executed || now == executed + 1,
                "{now} after {executed}"
            );
            executed = now;
            continue;
        }
        executed += 1;
        assert_eq!(seen.len() as u64, executed);
        let last = seen.last().expect("request");
        assert_eq!(last.body, b"hello");
        assert_eq!(
            last.header_values("transfer-encoding").len(),
            usize::from(key.is_none())
        );
    }
    assert_eq!(b.counts("/smuggled").started, 0);
    assert_quiet(&idem).await;
}

/// Ambiguous or invalid framing and malformed heads are refused by Pingora before idem sees
/// them: 400 and the connection closed; the backend sees nothing, and the next client is
/// served normally.
#[tokio::test]
async fn ambiguous_framing_and_malformed_heads_get_400_and_a_closed_connection() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "two different Content-Length values",
            format!(
                "POST /bad HTTP/1.1\r\nhost: {h}\r\nidempotency-key: f-1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"
            )
            .into_bytes(),
        ),
        (
            "a Content-Length that is not a number",
            format!("POST /bad HTTP/1.1\r\nhost: {h}\r\ncontent-length: 5x\r\n\r\nhello").into_bytes(),
        ),
        (
            "chunked is not the final transfer coding",
            format!(
                "POST /bad HTTP/1.1\r\nhost: {h}\r\nidempotency-key: f-2\r\ntransfer-encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "Transfer-Encoding in an HTTP/1.0 request",
            format!(
                "POST /bad HTTP/1.0\r\nhost: {h}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "whitespace between a field name and its colon",
            format!(
                "POST /bad HTTP/1.1\r\nhost: {h}\r\ncontent-length : 5\r\n\r\nhello"
            )
            .into_bytes(),
        ),
        (
            "a NUL byte in a header value",
            format!("POST /bad HTTP/1.1\r\nhost: {h}\r\nidempotency-key: a\0b\r\ncontent-length: 0\r\n\r\n")
                .into_bytes(),
        ),
        (
            "two Host headers",
            format!("POST /bad HTTP/1.1\r\nhost: {h}\r\nhost: other.test\r\ncontent-length: 0\r\n\r\n")
                .into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let mut conn = RawConn::connect(idem.addr()).await;
        conn.send(&bytes).await;
        let got = read_to_close(&mut conn).await;
        assert_eq!(
            status_of(&got),
            Some(400),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(b.total(), Counts::default());
    post(&idem, "/after", "after-1", &[], b"{}")
        .await
        .assert_leader(1);
    assert_quiet(&idem).await;
}

/// Oversized heads: over 256 header fields, or over Pingora's 1 MiB header limit. Pingora
/// answers 400 or, when the client is still sending, the connection is simply closed
/// (the 400 may be lost to the reset). Never a backend call, and other clients are served.
#[tokio::test]
async fn oversized_heads_are_refused_and_other_clients_are_unaffected() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);

    let mut many = format!("POST /big HTTP/1.1\r\nhost: {h}\r\nidempotency-key: big-1\r\n");
    for i in 0..300 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-length: 0\r\n\r\n");
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(many.as_bytes()).await;
    let got = read_to_close(&mut conn).await;
    assert_eq!(
        status_of(&got),
        Some(400),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    let mut huge = format!("POST /big HTTP/1.1\r\nhost: {h}\r\nx-huge: ").into_bytes();
    huge.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    huge.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(idem.addr()).await.unwrap();
    // The server may close while we still write: a write error is one of the answers.
    let _ = stream.write_all(&huge).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT_TIMEOUT, stream.read_to_end(&mut got)).await;
    let read = read.expect("the connection stayed open after a 2 MiB head");
    assert!(
        read.is_err() || got.is_empty() || status_of(&got) == Some(400),
        "unexpected answer to a 2 MiB head: {:?}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );

    assert_eq!(b.total(), Counts::default());
    post(&idem, "/after", "after-1", &[], b"{}")
        .await
        .assert_leader(1);
    assert_quiet(&idem).await;
}

/// Clients that never finish their request head (including ones that send fewer bytes than
/// the h2c preface idem peeks for) occupy only their own connections: the backend sees
/// nothing and other clients are served at once. (How long such a connection is kept is
/// Pingora's: 60 s per read; see docs/semantics.md, "Hostile and broken requests".)
#[tokio::test]
async fn unfinished_heads_do_not_hold_up_other_clients() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);
    let partial = format!("POST /slow HTTP/1.1\r\nhost: {h}\r\nidempotency-key: slow-1\r\n");
    let mut stalled = Vec::new();
    for i in 0..40 {
        let mut conn = RawConn::connect(idem.addr()).await;
        let bytes: &[u8] = if i % 2 == 0 {
            partial.as_bytes()
        } else {
            b"POST /slow HT"
        };
        conn.send(bytes).await;
        stalled.push(conn);
    }
    let started = Instant::now();
    for n in 1..=5u64 {
        post(&idem, "/fast", &format!("fast-{n}"), &[], b"{}")
            .await
            .assert_leader(n);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "other clients waited {:?}",
        started.elapsed()
    );
    assert_eq!(b.counts("/slow").started, 0);
    assert_eq!(metric_or_zero(&idem, "idem_inflight_keys").await, 0.0);
    drop(stalled);
    assert_eq!(b.settled("/fast").await.started, 5);
}

/// idem tells HTTP/1 from h2c by the first bytes itself (src/first_bytes.rs): a connection
/// that sends nothing, or stops inside a would-be HTTP/2 preface, is closed without an
/// answer once `keepalive_timeout` has passed (Pingora alone waited for 24 bytes forever);
/// a complete HTTP/1.0 request shorter than 24 bytes is answered at once (Pingora alone
/// never answered it); a slow but complete request is served.
#[tokio::test]
async fn first_bytes_decide_the_protocol_within_keepalive_timeout() {
    let b = Backend::start().await;
    let config = config(&b).set("server.keepalive_timeout", "1s");
    let idem = Idem::start(&config.to_string()).await;
    let mut silent = RawConn::connect(idem.addr()).await;
    let mut preface = RawConn::connect(idem.addr()).await;
    preface.send(b"PRI * HTTP/2.0\r\n").await;
    let mut late = RawConn::connect(idem.addr()).await;
    late.send(b"GET /late ").await;
    let opened = Instant::now();

    let short = b"GET /short HTTP/1.0\r\n\r\n";
    assert!(short.len() < 24);
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(short).await;
    let got = read_to_close(&mut conn).await;
    assert_eq!(
        status_of_any(&got),
        Some(200),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        opened.elapsed() < Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = host(&idem);
    late.send(format!("HTTP/1.1\r\nhost: {h}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(late.read_response().await.status, 200);
    for conn in [&mut silent, &mut preface] {
        let got = read_to_close(conn).await;
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_eq!(b.counts("/short").started, 1);
    assert_eq!(b.counts("/late").started, 1);
}

/// The status of a response in `bytes`, HTTP/1.0 or 1.1.
fn status_of_any(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// A body that never completes gets 408 body-timeout after `body_read_timeout` and the
/// connection is closed; nothing is registered, and the same key later runs once.
#[tokio::test]
async fn unfinished_body_gets_408_and_leaves_nothing_behind() {
    let b = Backend::start().await;
    let config = config(&b).set("server.body_read_timeout", "1s");
    let idem = Idem::start(&config.to_string()).await;
    let h = host(&idem);
    for (key, framing, first) in [
        ("slowbody-1", ("content-length", "20"), &b"0123456789"[..]),
        (
            "slowbody-2",
            ("transfer-encoding", "chunked"),
            &b"a\r\n0123456789\r\n"[..],
        ),
    ] {
        let mut conn = RawConn::connect(idem.addr()).await;
        let head = http_request(
            "POST",
            "/slowbody",
            &[("host", &h), ("idempotency-key", key), framing],
            b"",
        );
        conn.send(&[head.as_slice(), first].concat()).await;
        let sent = Instant::now();
        let got = read_to_close(&mut conn).await;
        let waited = sent.elapsed();
        assert_eq!(
            status_of(&got),
            Some(408),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains(&format!("{PROBLEM_BASE}body-timeout")),
            "{text}"
        );
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "answered after {waited:?}"
        );
    }
    assert_eq!(b.total(), Counts::default());
    assert_quiet(&idem).await;
    assert_eq!(metric_or_zero(&idem, "idem_store_entries").await, 0.0);
    post(
        &idem,
        "/slowbody",
        "slowbody-1",
        &[],
        b"01234567890123456789",
    )
    .await
    .assert_leader(1);
}

/// Hostile `Idempotency-Key` values: bytes outside visible ASCII, control characters in a
/// quoted string, a parameter, a list, a repeated header, 256 and 60 000 bytes. Each is a
/// 400 key-malformed before the body is read; the backend sees nothing.
#[tokio::test]
async fn hostile_key_values_are_refused_before_the_body() {
    let b = Backend::start().await;
    let idem = Idem::start(&config(&b).to_string()).await;
    let h = host(&idem);
    let long = "k".repeat(256);
    let huge = "k".repeat(60_000);
    let cases: Vec<Vec<u8>> = vec![
        b"idempotency-key: caf\xc3\xa9\r\n".to_vec(),
        b"idempotency-key: \xff\xfe\r\n".to_vec(),
        b"idempotency-key: \"a\tb\"\r\n".to_vec(),
        b"idempotency-key: \"abc\";x=1\r\n".to_vec(),
        b"idempotency-key: a, b\r\n".to_vec(),
        b"idempotency-key: a\r\nidempotency-key: a\r\n".to_vec(),
        format!("idempotency-key: {long}\r\n").into_bytes(),
        format!("idempotency-key: \"{huge}\"\r\n").into_bytes(),
    ];
    for field in cases {
        let mut conn = RawConn::connect(idem.addr()).await;
        let mut req =
            format!("POST /keys HTTP/1.1\r\nhost: {h}\r\ncontent-length: 2\r\n").into_bytes();
        req.extend_from_slice(&field);
        req.extend_from_slice(b"\r\n{}");
        conn.send(&req).await;
        let r = conn.read_response().await;
        let shown = String::from_utf8_lossy(&field[..field.len().min(60)]).into_owned();
        assert_eq!(r.status, 400, "{shown}: {:?}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], format!("{PROBLEM_BASE}key-malformed"), "{shown}");
        assert!(
            !r.text().contains("kkkk") && !r.text().contains("caf"),
            "the key is echoed: {}",
            r.text()
        );
    }
    assert_eq!(b.total(), Counts::default());
    wait_metric(&idem, &requests("missing_key"), 8.0).await;
    assert_quiet(&idem).await;
}

/// One client (scope) sending many distinct keys through a full store evicts only its own
/// records: every other client's stored responses survive and are replayed, memory stays
/// within `max_entries`, and nothing is refused while the client's own records can make room.
#[tokio::test]
async fn many_keys_from_one_client_cannot_evict_other_clients() {
    let b = Backend::start().await;
    let config = config(&b)
        .set("store.max_entries", 20)
        .set("store.max_keys_per_scope", 5);
    let idem = Idem::start(&config.to_string()).await;
    let victim = [("authorization", "Bearer victim")];
    let abuser = [("authorization", "Bearer abuser")];
    for n in 1..=4 {
        post(
            &idem,
            &format!("/victim/{n}"),
            &format!("v-{n}"),
            &victim,
            b"{}",
        )
        .await
        .assert_leader(1);
    }
    for n in 1..=60 {
        post(
            &idem,
            &format!("/abuser/{n}"),
            &format!("a-{n}"),
            &abuser,
            b"{}",
        )
        .await
        .assert_leader(1);
    }
    assert_eq!(metric_or_zero(&idem, "idem_store_entries").await, 20.0);
    // 16 free slots were the abuser's to take; every key after that replaced its own.
    assert_eq!(
        metric_or_zero(&idem, "idem_store_evictions_total{reason=\"capacity\"}").await,
        44.0
    );
    for n in 1..=4 {
        post(
            &idem,
            &format!("/victim/{n}"),
            &format!("v-{n}"),
            &victim,
            b"{}",
        )
        .await
        .assert_replay(1);
        assert_eq!(b.counts(&format!("/victim/{n}")).started, 1);
    }
    // The abuser's newest records are kept, its oldest were its own to lose.
    post(&idem, "/abuser/60", "a-60", &abuser, b"{}")
        .await
        .assert_replay(1);
    post(&idem, "/abuser/1", "a-1", &abuser, b"{}")
        .await
        .assert_leader(2);
    assert_eq!(b.total().started, 4 + 60 + 1);
    assert_quiet(&idem).await;
}

/// Keys a client cannot give up (in flight or held) are capped by its quota: past it, 429
/// scope-quota with Retry-After and no backend call; other clients are served meanwhile,
/// and the client may start new keys as soon as its calls finish.
#[tokio::test]
async fn in_flight_keys_of_one_client_are_capped_at_its_quota() {
    let b = Backend::start().await;
    let config = config(&b).set("store.max_keys_per_scope", 3);
    let idem = Idem::start(&config.to_string()).await;
    let abuser = [("authorization", "Bearer abuser")];
    let gate = b.gate("/quota/slow");
    let running: Vec<_> = (1..=3)
        .map(|n| spawn_post(&idem, "/quota/slow", &format!("q-{n}"), &abuser))
        .collect();
    gate.wait_started(3).await;
    let refused = post(&idem, "/quota/more", "q-4", &abuser, b"{}").await;
    refused.assert_problem(429, "scope-quota");
    assert_eq!(refused.header("retry-after"), "1");
    assert_eq!(b.counts("/quota/more").started, 0);
    // Another client (another address: from the same one, the client's own quota of keys
    // in flight applies whatever the scope) is not affected.
    let other = client_from("127.0.0.2".parse().unwrap())
        .post(idem.url("/quota/other"))
        .header("idempotency-key", "o-1")
        .header("authorization", "Bearer other")
        .body("{}")
        .send()
        .await
        .expect("POST");
    assert_eq!(other.status(), 200);
    assert_eq!(
        other.headers()["cache-status"],
        "idem; fwd=uri-miss; stored"
    );
    // Retries of the abuser's own running keys still attach to them.
    let waiter = spawn_post(&idem, "/quota/slow", "q-1", &abuser);
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    for r in running {
        assert_eq!(r.await.expect("leader").status, 200);
    }
    assert_eq!(waiter.await.expect("waiter").status, 200);
    post(&idem, "/quota/more", "q-4", &abuser, b"{}")
        .await
        .assert_leader(1);
    assert_eq!(b.settled("/quota/slow").await.started, 3);
    assert_eq!(
        metric_or_zero(&idem, &requests("error")).await,
        1.0,
        "the 429 is counted as an error outcome"
    );
    assert_quiet(&idem).await;
}

// ---------------------------------------------------------------------------
// 5. Soak (ignored: run by scripts/soak.sh, never by CI)
// ---------------------------------------------------------------------------

/// xorshift64*: a seeded, dependency-free generator for the soak's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a key's executions do at the backend, fixed when the key is made (every retry of a
/// key carries the same steering headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Ok,
    ResetBeforeHeaders,
    Stall,
    ResetMidBody,
    MalformedStatus,
    App500,
    Gateway502,
}

impl Fate {
    fn pick(rng: &mut Rng) -> Fate {
        match rng.below(100) {
            0..=83 => Fate::Ok,
            84..=87 => Fate::ResetBeforeHeaders,
            88..=90 => Fate::Stall,
            91..=93 => Fate::ResetMidBody,
            94..=95 => Fate::MalformedStatus,
            96..=98 => Fate::App500,
            _ => Fate::Gateway502,
        }
    }

    fn headers(self, delay_ms: u64) -> Vec<(String, String)> {
        let mut h = vec![("x-delay-ms".to_string(), delay_ms.to_string())];
        let fault = |f: &str| ("x-fault".to_string(), f.to_string());
        match self {
            Fate::Ok => {}
            Fate::ResetBeforeHeaders => h.push(fault("reset-before-headers")),
            Fate::Stall => h.push(fault("stall")),
            Fate::ResetMidBody => {
                h.push(fault("reset-mid-body"));
                h.push(("x-body-size".into(), "3000".into()));
            }
            Fate::MalformedStatus => h.push(fault("malformed-status")),
            Fate::App500 => h.push(("x-status".into(), "500".into())),
            Fate::Gateway502 => h.push(("x-status".into(), "502".into())),
        }
        h
    }
}

#[derive(Clone)]
struct SoakKey {
    id: String,
    fate: Fate,
    delay_ms: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Mixed traffic with injected faults for `IDEM_SOAK_SECS` (default 180) seconds on
/// loopback: keyed requests with retries of recent keys, impatient clients that leave as
/// leaders or waiters, uploads abandoned half-way, keyless requests on a fingerprint route,
/// and a fault mix (resets, stalls past the read timeout, cut bodies, malformed status
/// lines, 500, 502). Checks and prints: backend executions equal idem's upstream calls, no
/// key whose first execution was stored ever ran twice, RSS samples (plateau), and in-flight
/// and waiters back to zero at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run scripts/soak.sh"]
async fn soak_mixed_traffic_with_faults() {
    let secs: u64 = std::env::var("IDEM_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let workers: u64 = std::env::var("IDEM_SOAK_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("upstream.read_timeout", "1s")
        .set("upstream.total_timeout", "2s")
        .set("server.grace_period", "5s")
        .set("server.body_read_timeout", "2s")
        .set("server.log_format", "json")
        .set("store.max_entries", 5_000)
        .set("dedup.ttl", "1h")
        .route(Route::new("fp", "/soak/fp/", "fingerprint").set("fingerprint_ttl", "5s"));
    let idem = Idem::builder()
        .env("IDEM_LOG", "warn")
        .start(&config.to_string())
        .await;
    let pid = idem.pid();
    let addr = idem.addr();
    let url = idem.url("");
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Keys made so far; retries pick among the most recent ones.
    let keys = std::sync::Arc::new(std::sync::Mutex::new(Vec::<SoakKey>::new()));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));

    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let keys = keys.clone();
        let sent = sent.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let http = client_with_timeout(Duration::from_secs(6));
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let roll = rng.below(100);
                let key = {
                    let mut all = keys.lock().unwrap();
                    if all.is_empty() || rng.below(100) < 45 {
                        let k = SoakKey {
                            id: format!("w{w}-{n}"),
                            fate: Fate::pick(&mut rng),
                            delay_ms: rng.below(300),
                        };
                        all.push(k.clone());
                        k
                    } else {
                        let recent = all.len().min(64) as u64;
                        all[all.len() - 1 - rng.below(recent) as usize].clone()
                    }
                };
                let path = format!("/soak/k/{}", key.id);
                let mut headers = key.fate.headers(key.delay_ms);
                headers.push(("idempotency-key".into(), key.id.clone()));
                headers.push(("host".into(), addr.to_string()));
                match roll {
                    // Impatient client: leaves as leader or waiter.
                    0..=14 => {
                        let h: Vec<(&str, &str)> = headers
                            .iter()
                            .map(|(a, b)| (a.as_str(), b.as_str()))
                            .collect();
                        let req = http_request("POST", &path, &h, b"{\"soak\":1}");
                        send_and_abort(addr, &req, Duration::from_millis(rng.below(250))).await;
                    }
                    // Upload abandoned half-way.
                    15..=18 => {
                        let mut conn = RawConn::connect(addr).await;
                        let h = [
                            ("host", addr.to_string()),
                            ("idempotency-key", format!("{}-upload", key.id)),
                            ("content-length", "100".to_string()),
                        ];
                        let h: Vec<(&str, &str)> =
                            h.iter().map(|(a, b)| (*a, b.as_str())).collect();
                        let head = http_request("POST", "/soak/upload", &h, b"");
                        conn.send(&[head.as_slice(), b"partial"].concat()).await;
                    }
                    // Keyless on the fingerprint route: identical bodies coalesce.
                    19..=28 => {
                        let body = format!("{{\"item\":{}}}", rng.below(50));
                        let _ = http
                            .post(format!("{url}/soak/fp/add"))
                            .header("x-delay-ms", rng.below(100).to_string())
                            .body(body)
                            .send()
                            .await
                            .map(|r| r.bytes());
                    }
                    _ => {
                        let mut req = http.post(format!("{url}{path}")).body("{\"soak\":1}");
                        for (k, v) in &headers {
                            if k != "host" {
                                req = req.header(k, v);
                            }
                        }
                        if let Ok(resp) = req.send().await {
                            let _ = resp.bytes().await;
                        }
                    }
                }
            }
        });
    }

    let mut rss = Vec::new();
    let started = Instant::now();
    let step = Duration::from_secs((secs / 12).max(5));
    while Instant::now() < deadline {
        rss.push((started.elapsed().as_secs(), rss_kib(pid)));
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(step.min(remaining)).await;
    }
    while tasks.join_next().await.is_some() {}
    rss.push((started.elapsed().as_secs(), rss_kib(pid)));

    // Quiesce: every flight ends within the total deadline.
    assert_quiet(&idem).await;
    let text = scrape(&idem).await;
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let upstream_calls = sum("idem_upstream_requests_total{");
    let executions = b.total().started as f64;
    let mut per_key: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for r in b.all_requests() {
        if let Some(k) = r.header("idempotency-key") {
            *per_key.entry(k.to_string()).or_default() += 1;
        }
    }
    let all = keys.lock().unwrap().clone();
    let ok_keys: Vec<&SoakKey> = all.iter().filter(|k| k.fate == Fate::Ok).collect();
    let duplicated: Vec<&&SoakKey> = ok_keys
        .iter()
        .filter(|k| per_key.get(&k.id).copied().unwrap_or(0) > 1)
        .collect();
    let outcomes: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("idem_requests_total{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect();

    println!(
        "soak: {secs} s, {workers} clients, {} requests sent",
        sent.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "soak: keys made {} ({} ok, {} with faults)",
        all.len(),
        ok_keys.len(),
        all.len() - ok_keys.len()
    );
    println!(
        "soak: backend executions {executions}, idem upstream calls (leaders) {upstream_calls}"
    );
    println!(
        "soak: ok keys executed more than once: {}",
        duplicated.len()
    );
    println!(
        "soak: detached completions {}",
        sum("idem_detached_completions_total{")
    );
    println!(
        "soak: client aborts during upload {}",
        sum("idem_client_aborts_total")
    );
    println!(
        "soak: store entries {} held {} capacity evictions {} expiries {}",
        sum("idem_store_entries"),
        sum("idem_held_keys"),
        sum("idem_store_evictions_total{reason=\"capacity\""),
        sum("idem_store_evictions_total{reason=\"expired\"")
    );
    println!(
        "soak: in flight {} waiters {} at the end",
        sum("idem_inflight_keys"),
        sum("idem_waiters")
    );
    for o in &outcomes {
        println!("soak:   {o}");
    }
    println!("soak: RSS (s, KiB): {rss:?}");

    assert_eq!(
        executions, upstream_calls,
        "backend executions vs idem's upstream calls"
    );
    assert!(
        duplicated.is_empty(),
        "ok keys executed twice: {:?}",
        duplicated.iter().take(5).map(|k| &k.id).collect::<Vec<_>>()
    );
    assert_eq!(sum("idem_inflight_keys"), 0.0);
    assert_eq!(sum("idem_waiters"), 0.0);
    // Plateau: the last third of the run grows by less than 20% over its first sample.
    let tail: Vec<u64> = rss
        .iter()
        .skip(rss.len() * 2 / 3)
        .map(|(_, k)| *k)
        .collect();
    if let (Some(first), Some(max)) = (tail.first(), tail.iter().max()) {
        assert!(
            *max as f64 <= *first as f64 * 1.2,
            "RSS still growing in the last third: {rss:?}"
        );
    }
}
