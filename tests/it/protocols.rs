//! HTTP versions and connection semantics at idem's front door (issue 13): `Upgrade: h2c`
//! as `curl --http2` sends it, HTTP/1.0 framing and keep-alive, pipelining, h2 clients that
//! split `Cookie`, and WebSocket upgrades on a dedup route.

use std::time::Duration;

use crate::support::*;

const ONE_CALL: Counts = Counts {
    started: 1,
    completed: 1,
    aborted: 0,
};

fn calls(n: u64) -> Counts {
    Counts {
        started: n,
        completed: n,
        aborted: 0,
    }
}

fn api_config(b: &Backend) -> Config {
    Config::new(b.addr())
        .route(Route::new("api", "/api/", "keyed"))
        .route(Route::new("strict", "/strict/", "require-key"))
}

#[track_caller]
fn assert_cache_status(resp: &RawResponse, want: &str) {
    assert_eq!(resp.header("cache-status"), Some(want), "{resp:#?}");
}

#[track_caller]
fn assert_replayed(resp: &RawResponse) {
    let cache = resp.header("cache-status").unwrap_or_default();
    assert!(
        cache.starts_with("idem; hit; ttl="),
        "not a replay: {resp:#?}"
    );
    assert_eq!(
        resp.header("idempotent-replayed"),
        Some("true"),
        "{resp:#?}"
    );
}

// ---------------------------------------------------------------------------
// Upgrade: h2c (curl --http2 http://...)
// ---------------------------------------------------------------------------

/// `curl --http2 -sS -D HEADERS -o BODY ...`: every header block it received (a `101`
/// would be one of them) and the final response as a [`RawResponse`].
async fn curl_http2(url: &str, extra: &[&str]) -> (Vec<String>, RawResponse) {
    require_tool("curl", "--version", "curl");
    let dir = TempDir::new();
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let out = run_bounded(
        tokio::process::Command::new("curl")
            .args(["--http2", "-sS", "--noproxy", "*", "--max-time", "20"])
            .arg("-D")
            .arg(&headers)
            .arg("-o")
            .arg(&body)
            .args(extra)
            .arg(url),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = std::fs::read_to_string(&headers).expect("curl's header dump");
    let status_lines: Vec<String> = dump
        .lines()
        .filter(|l| l.starts_with("HTTP/"))
        .map(|l| l.trim_end().to_owned())
        .collect();
    let last_block = dump
        .trim_end()
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut lines = last_block.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts.next().unwrap_or_default().parse().unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
        .collect();
    let resp = RawResponse {
        version: if version == "HTTP/1.1" { 1 } else { 0 },
        status,
        reason: parts.next().unwrap_or_default().to_owned(),
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
        trailers: Vec::new(),
        interim: Vec::new(),
    };
    (status_lines, resp)
}

/// The fixture: curl really asks for an upgrade to h2c, which the test backend ignores.
#[tokio::test]
async fn curl_http2_asks_for_an_h2c_upgrade() {
    let b = Backend::start().await;
    let (status_lines, resp) = curl_http2(
        &format!("http://{}/direct", b.addr()),
        &["-X", "POST", "--data", "x=1"],
    )
    .await;
    assert_eq!(status_lines, vec!["HTTP/1.1 200 OK"]);
    assert_eq!(resp.status, 200);
    let req = &b.requests("/direct")[0];
    assert_eq!(req.header("upgrade"), Some("h2c"));
    assert!(req.header("http2-settings").is_some(), "{req:#?}");
    assert_eq!(req.header("connection"), Some("Upgrade, HTTP2-Settings"));
}

/// idem drops `Upgrade: h2c` and answers in HTTP/1.1, so the keyed POST is deduplicated:
/// the second identical call is a replay and the backend runs it once, never seeing the
/// upgrade.
#[tokio::test]
async fn curl_http2_keyed_post_is_deduplicated_over_http1() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let args = [
        "-X",
        "POST",
        "-H",
        "Idempotency-Key: h2c-1",
        "--data",
        "x=1",
    ];
    let (lines, first) = curl_http2(&idem.url("/api/h2c"), &args).await;
    assert_eq!(lines, vec!["HTTP/1.1 200 OK"], "no 101: {first:#?}");
    assert_cache_status(&first, "idem; fwd=uri-miss; stored");
    let (lines, second) = curl_http2(&idem.url("/api/h2c"), &args).await;
    assert_eq!(lines, vec!["HTTP/1.1 200 OK"], "no 101: {second:#?}");
    assert_replayed(&second);
    for resp in [&first, &second] {
        assert_eq!(resp.text(), r#"{"path":"/api/h2c","call":1}"#);
    }
    assert_eq!(b.settled("/api/h2c").await, ONE_CALL);
    let req = &b.requests("/api/h2c")[0];
    assert_eq!(req.header("upgrade"), None, "{req:#?}");
    assert_eq!(req.header("http2-settings"), None, "{req:#?}");
    assert_eq!(req.body, b"x=1");
}

/// An upgrade is no way around `require-key`.
#[tokio::test]
async fn curl_http2_without_a_key_on_a_require_key_route_is_refused() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let (lines, resp) =
        curl_http2(&idem.url("/strict/h2c"), &["-X", "POST", "--data", "x=1"]).await;
    assert_eq!(lines.len(), 1, "no 101: {lines:?}");
    let json = assert_problem(&resp, 400, "missing-key");
    assert_problem_members(&json, 400);
    assert_eq!(b.counts("/strict/h2c"), Counts::default());
}

// ---------------------------------------------------------------------------
// HTTP/1.0
// ---------------------------------------------------------------------------

/// Splits a raw response at the end of its head: (lower-cased header lines, status, body).
fn split_raw(bytes: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, bytes[end + 4..].to_vec())
}

/// An HTTP/1.0 client cannot read chunked coding: a response of unknown length is sent
/// as is and ended by closing the connection, whether the origin sent it chunked or
/// close-delimited, on the pass-through path and to a keyed leader whose response is
/// streamed (an event stream is never stored).
#[tokio::test]
async fn http10_response_of_unknown_length_is_close_delimited() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        ("GET", "/api/chunked", &[("x-fault", "chunked")]),
        ("GET", "/api/eof", &[("x-fault", "close-delimited")]),
        (
            "POST",
            "/api/events",
            &[
                ("x-fault", "chunked"),
                ("x-content-type", "text/event-stream"),
                ("idempotency-key", "sse-1"),
            ],
        ),
    ];
    let mut got = Vec::new();
    for (method, path, extra) in cases {
        let mut head =
            format!("{method} {path} HTTP/1.0\r\nhost: idem.test\r\nx-body-size: 3000\r\n");
        for (n, v) in extra {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if method == "POST" {
            head.push_str("content-length: 3\r\n\r\nx=1");
        } else {
            head.push_str("\r\n");
        }
        let mut conn = RawConn::connect(idem.addr()).await;
        conn.send(head.as_bytes()).await;
        let bytes = conn.read_to_end().await;
        let (status, headers, body) = split_raw(&bytes);
        let framing: Vec<String> = headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding" || n == "content-length")
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        // Whether the bytes after the head are exactly the origin's body (read to EOF).
        let exact = body == pattern(3000);
        got.push((path, status, framing, exact));
        assert_eq!(b.settled(path).await, ONE_CALL, "{path}");
    }
    let want: Vec<_> = cases
        .iter()
        .map(|(_, path, _)| (*path, 200, Vec::<String>::new(), true))
        .collect();
    assert_eq!(
        got, want,
        "(path, status, framing headers, body exactly the origin's bytes then EOF)"
    );
}

/// `Connection: keep-alive` from an HTTP/1.0 client is honoured when the length is known:
/// pass-through, leader and replay on one connection; the first request without it ends
/// the connection.
#[tokio::test]
async fn http10_keep_alive_is_honoured_when_the_length_is_known() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let get = |keep: bool| {
        let ka = if keep {
            "connection: keep-alive\r\n"
        } else {
            ""
        };
        format!("GET /api/ka HTTP/1.0\r\nhost: idem.test\r\n{ka}\r\n").into_bytes()
    };
    let post = b"POST /api/ka-post HTTP/1.0\r\nhost: idem.test\r\nconnection: keep-alive\r\n\
idempotency-key: ka-1\r\ncontent-length: 3\r\n\r\nx=1"
        .to_vec();
    let mut conn = RawConn::connect(idem.addr()).await;
    let mut seen = Vec::new();
    for request in [get(true), post.clone(), post] {
        conn.send(&request).await;
        let resp = conn.read_response().await;
        assert_eq!(resp.status, 200, "{resp:#?}");
        assert!(resp.header("content-length").is_some(), "{resp:#?}");
        assert_eq!(resp.header("transfer-encoding"), None, "{resp:#?}");
        assert!(
            resp.header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("keep-alive")),
            "an HTTP/1.0 client needs `Connection: keep-alive` to reuse the connection: \
             {resp:#?}"
        );
        seen.push(resp);
    }
    assert_cache_status(&seen[0], "idem; fwd=bypass");
    assert_cache_status(&seen[1], "idem; fwd=uri-miss; stored");
    assert_replayed(&seen[2]);
    assert_eq!(seen[2].text(), seen[1].text());

    conn.send(&get(false)).await;
    let last = conn.read_response().await;
    assert_eq!(last.status, 200);
    conn.expect_closed().await;
    assert_eq!(b.settled("/api/ka").await, calls(2));
    assert_eq!(b.settled("/api/ka-post").await, ONE_CALL);
    // Every request idem forwarded went to the backend over one pooled connection at most
    // per idem connection: not asserted, only that none was lost.
    assert_eq!(b.total(), calls(3));
}

// ---------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------

/// The next response on `conn`, failing with which one was missing.
async fn next_response(conn: &mut RawConn, which: &str) -> RawResponse {
    conn.try_read_response(false)
        .await
        .unwrap_or_else(|e| panic!("{which}: {e}"))
}

/// Three requests in one write: two identical keyed POSTs and a GET. Each is answered in
/// order, as if sent alone: the second POST is a replay of the first.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_dedup() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let post = http_request(
        "POST",
        "/api/pipe",
        &[("idempotency-key", "pipe-1")],
        b"x=1",
    );
    let get = http_request("GET", "/api/pipe-get", &[], b"");
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&[post.clone(), post, get.clone()].concat()).await;
    let first = next_response(&mut conn, "response 1 of 3 (keyed POST)").await;
    let second = next_response(&mut conn, "response 2 of 3 (same keyed POST)").await;
    let third = next_response(&mut conn, "response 3 of 3 (GET)").await;
    assert_eq!(
        (first.status, second.status, third.status),
        (200, 200, 200),
        "{first:#?}\n{second:#?}\n{third:#?}"
    );
    assert_cache_status(&first, "idem; fwd=uri-miss; stored");
    assert_replayed(&second);
    assert_cache_status(&third, "idem; fwd=bypass");
    assert_eq!(first.text(), r#"{"path":"/api/pipe","call":1}"#);
    assert_eq!(second.text(), first.text());
    assert_eq!(third.text(), r#"{"path":"/api/pipe-get","call":1}"#);
    // The connection is still usable.
    conn.send(&get).await;
    let fourth = next_response(&mut conn, "a request after the pipelined ones").await;
    assert_eq!(fourth.text(), r#"{"path":"/api/pipe-get","call":2}"#);
    assert_eq!(b.settled("/api/pipe").await, ONE_CALL);
    assert_eq!(b.settled("/api/pipe-get").await, calls(2));
}

/// A request pipelined behind one that waits on another client's flight waits its turn:
/// the waiter gets the leader's response, then the pipelined GET its own. `later`: the GET
/// is written once the waiter is attached, while idem watches that connection for the
/// client leaving; otherwise both go in one write.
async fn pipelined_behind_a_waiter(later: bool) {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let gate = b.gate("/api/slow");
    let post = http_request(
        "POST",
        "/api/slow",
        &[("idempotency-key", "slow-1")],
        b"x=1",
    );
    let get = http_request("GET", "/api/after", &[], b"");

    let mut leader = RawConn::connect(idem.addr()).await;
    leader.send(&post).await;
    gate.wait_started(1).await;

    let mut piped = RawConn::connect(idem.addr()).await;
    if later {
        piped.send(&post).await;
        wait_metric(&idem, "idem_waiters", 1.0).await;
        piped.send(&get).await;
    } else {
        piped.send(&[post, get].concat()).await;
        wait_metric(&idem, "idem_waiters", 1.0).await;
    }
    assert_eq!(gate.arrived(), 1);
    gate.open();

    let led = next_response(&mut leader, "the leader's response").await;
    assert_cache_status(&led, "idem; fwd=uri-miss; stored");
    let collapsed = next_response(&mut piped, "pipelined response 1 of 2 (the waiter)").await;
    assert_eq!(collapsed.status, 200, "{collapsed:#?}");
    assert_cache_status(&collapsed, "idem; fwd=uri-miss; collapsed");
    assert_eq!(collapsed.text(), led.text());
    let after = next_response(&mut piped, "pipelined response 2 of 2 (GET)").await;
    assert_eq!(after.status, 200, "{after:#?}");
    assert_cache_status(&after, "idem; fwd=bypass");
    assert_eq!(after.text(), r#"{"path":"/api/after","call":1}"#);
    assert_eq!(b.settled("/api/slow").await, ONE_CALL);
    assert_eq!(b.settled("/api/after").await, ONE_CALL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_behind_a_waiter_waits_its_turn() {
    pipelined_behind_a_waiter(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_while_a_waiter_waits_waits_its_turn() {
    pipelined_behind_a_waiter(true).await;
}

// ---------------------------------------------------------------------------
// h2: Cookie split into several fields (RFC 9113 8.2.3)
// ---------------------------------------------------------------------------

/// An h2 client may send `Cookie` as several fields; idem joins them with "; " before
/// the scope, the fingerprint and forwarding. The HTTP/1.1 retry with one `Cookie` line is
/// the same caller and gets the replay; the backend sees one `cookie` line.
#[tokio::test]
async fn h2_split_cookies_are_one_cookie_for_scope_and_backend() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    // hyper's h2 encoder sends each value of a repeated header as its own field.
    let h2 = h2c_client();
    let resp = h2
        .post(idem.url("/api/cookie"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("idempotency-key", "cookie-1")
        .body("x=1")
        .send()
        .await
        .expect("h2c request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-status"], "idem; fwd=uri-miss; stored");
    let h2_body = resp.text().await.unwrap();

    // Same authority as the h2 request's `:authority`, so the same scope but for Cookie.
    let authority = idem.addr().to_string();
    let retry = raw_request(
        idem.addr(),
        &http_request(
            "POST",
            "/api/cookie",
            &[
                ("host", &authority),
                ("cookie", "a=1; b=2"),
                ("idempotency-key", "cookie-1"),
            ],
            b"x=1",
        ),
    )
    .await;
    assert_eq!(retry.status, 200, "{retry:#?}");
    let executions = b.settled("/api/cookie").await;
    let cookie_lines: Vec<Vec<String>> = b
        .requests("/api/cookie")
        .iter()
        .map(|r| {
            r.header_values("cookie")
                .into_iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .collect();
    let cache = retry.header("cache-status").unwrap_or_default();
    assert_eq!(
        (
            executions,
            cache.starts_with("idem; hit; ttl="),
            cookie_lines
        ),
        (ONE_CALL, true, vec![vec!["a=1; b=2".to_owned()]]),
        "(backend executions, whether the HTTP/1.1 retry was a replay, the cookie lines of \
         each backend request); the retry's Cache-Status: {cache:?}"
    );
    assert_replayed(&retry);
    assert_eq!(retry.text(), h2_body);

    // The pass-through path forwards one line too.
    let resp = h2
        .get(idem.url("/api/cookie-get"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .expect("h2c request");
    assert_eq!(resp.status(), 200);
    assert_eq!(b.settled("/api/cookie-get").await, ONE_CALL);
    let req = &b.requests("/api/cookie-get")[0];
    assert_eq!(req.header_values("cookie"), vec![b"a=1; b=2".as_slice()]);
}

// ---------------------------------------------------------------------------
// WebSocket on a dedup route
// ---------------------------------------------------------------------------

/// A WebSocket upgrade on a fingerprint route passes through: messages of every kind are
/// echoed exactly, and the connection closes cleanly.
#[tokio::test]
async fn websocket_echo_passes_through_a_dedup_route() {
    let echo = App::start_python("ws-echo", "ws/echo_server.py", &[]).await;
    let config = Config::new(echo.addr()).route(Route::new("ws", "/ws/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let big = String::from_utf8(pattern(50_000)).unwrap();
    let messages = serde_json::json!([
        {"text": "hello"},
        {"binary_hex": "0001fffe00"},
        {"text": "h\u{e9}llo \u{2713}"},
        {"text": big},
        {"binary_hex": ""},
    ]);
    let out = run_python(
        "ws/echo_client.py",
        &[
            format!("ws://{}/ws/echo", idem.addr()),
            messages.to_string(),
        ],
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&out).expect("client JSON");
    assert_eq!(got["sent"], messages, "the client sent what it was given");
    assert_eq!(got["received"], messages, "echoed exactly\n{}", echo.logs());
    assert_eq!(got["close_code"], 1000);
}

/// The fixture: the echo server and client agree without idem.
#[tokio::test]
async fn websocket_fixture_echoes_directly() {
    let echo = App::start_python("ws-echo", "ws/echo_server.py", &[]).await;
    let messages = serde_json::json!([{"text": "hi"}, {"binary_hex": "00ff"}]);
    let out = run_python(
        "ws/echo_client.py",
        &[
            format!("ws://{}/ws/echo", echo.addr()),
            messages.to_string(),
        ],
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&out).expect("client JSON");
    assert_eq!(got["received"], messages);
    assert_eq!(got["close_code"], 1000);
}

/// A request idem refuses from its head (400 missing-key) keeps the connection: its small
/// body is read first, so the request pipelined behind it is answered too.
#[tokio::test]
async fn a_refusal_keeps_a_pipelined_connection() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let refused = http_request("POST", "/strict/nokey", &[], b"x=1");
    let get = http_request("GET", "/api/after-refusal", &[], b"");
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&[refused, get.clone()].concat()).await;
    let first = next_response(&mut conn, "response 1 of 2 (refused POST)").await;
    let json = assert_problem(&first, 400, "missing-key");
    assert_problem_members(&json, 400);
    assert_ne!(first.header("connection"), Some("close"), "{first:#?}");
    let second = next_response(&mut conn, "response 2 of 2 (GET)").await;
    assert_eq!(second.status, 200, "{second:#?}");
    assert_eq!(second.text(), r#"{"path":"/api/after-refusal","call":1}"#);
    conn.send(&get).await;
    let third = next_response(&mut conn, "a request after the pipelined ones").await;
    assert_eq!(third.text(), r#"{"path":"/api/after-refusal","call":2}"#);
    assert_eq!(b.counts("/strict/nokey"), Counts::default());
}

/// A refusal whose body is not worth reading (declared over `max_body`) closes the
/// connection after the answer, saying so: what follows is never read as a request.
#[tokio::test]
async fn a_refusal_with_a_large_body_closes_the_connection() {
    let b = Backend::start().await;
    let config = api_config(&b).set("dedup.max_body", "10B");
    let idem = Idem::start(&config.to_string()).await;
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(b"POST /strict/big HTTP/1.1\r\nhost: idem.test\r\ncontent-length: 11\r\n\r\n")
        .await;
    let resp = next_response(&mut conn, "the refusal").await;
    assert_eq!(resp.status, 400, "{resp:#?}");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:#?}");
    conn.expect_closed().await;
    assert_eq!(b.total(), Counts::default());
}

/// A refusal of a request that waits for `100 Continue` comes at once, without the `100`
/// (the client then never sends its body), and closes the connection: idem does not wait
/// for a body that will not come.
#[tokio::test]
async fn a_refusal_of_a_request_expecting_continue_is_immediate_and_closes() {
    let b = Backend::start().await;
    let idem = Idem::start(&api_config(&b).to_string()).await;
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(
        b"POST /strict/wait HTTP/1.1\r\nhost: idem.test\r\nexpect: 100-continue\r\n\
content-length: 3\r\n\r\n",
    )
    .await;
    let resp = tokio::time::timeout(WAIT_TIMEOUT, conn.read_final_response(false))
        .await
        .expect("the refusal, without waiting for the body");
    assert_eq!(resp.interim, Vec::<u16>::new(), "{resp:#?}");
    assert_problem(&resp, 400, "missing-key");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:#?}");
    conn.expect_closed().await;
    assert_eq!(b.total(), Counts::default());
}
