//! Pass-through streaming, the incident reproduction, shutdown and operations.
//!
//! Every test starts its own backend and its own idem on ephemeral ports. Waits are
//! event-driven with a bound ([`WAIT_TIMEOUT`]); the only sleeps are a client simulating
//! slowness and bounded polling of the metrics endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_idem");

// ---------------------------------------------------------------------------------------
// 1. Streaming on an `off` route
// ---------------------------------------------------------------------------------------

/// A multi-megabyte response on an `off` route reaches the client while the backend is still
/// writing it: no buffering in idem.
#[tokio::test]
async fn off_route_streams_large_response_before_backend_completes() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("stream", "/stream/", "off"))
        .to_string();
    let idem = Idem::start(&config).await;

    const SIZE: usize = 8_000_000;
    let mut resp = client()
        .get(idem.url("/stream/big"))
        .header("x-body-size", SIZE.to_string())
        .header("x-fault", "slow-body")
        .header("x-chunks", "8")
        .header("x-chunk-ms", "200")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first body chunk");
    // Seven pauses of 200 ms remain on the backend side: it cannot have finished unless
    // idem held the first bytes back until the end.
    let at_first = backend.counts("/stream/big");
    assert_eq!(
        (at_first.started, at_first.completed),
        (1, 0),
        "the first bytes must reach the client before the backend has written the last ones"
    );
    assert!(
        resp.headers().get("cache-status").is_none(),
        "an `off` route is not a dedup route and does not tag its responses: {:?}",
        resp.headers()
    );
    let mut body = first.to_vec();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), SIZE);
    assert!(
        body == pattern(SIZE),
        "streamed body differs from the backend's"
    );
    assert_eq!(backend.settled("/stream/big").await.completed, 1);
}

/// A chunked upload on an `off` route is streamed upstream: the origin receives the request
/// head and the first part of the body while the client is still holding back the rest.
#[tokio::test]
async fn off_route_streams_chunked_upload() {
    let probe = UploadProbe::start().await;
    let config = Config::new(probe.addr())
        .route(Route::new("upload", "/upload/", "off"))
        .to_string();
    let idem = Idem::start(&config).await;

    let first: &[u8] = b"first-part-";
    let second: &[u8] = b"second-part";
    let mut head = http_request(
        "POST",
        "/upload/file",
        &[("transfer-encoding", "chunked")],
        b"",
    );
    head.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
    head.extend_from_slice(first);
    head.extend_from_slice(b"\r\n");
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&head).await;

    // The client holds the second part back until the origin has seen the first: a proxy
    // that buffers the upload would never get here (the wait would time out).
    probe
        .wait("the head and the first part of the upload", |u| {
            u.head.is_some() && u.body == first
        })
        .await;
    let seen = probe.snapshot();
    assert!(!seen.complete);
    let head_seen = seen.head.unwrap();
    assert!(
        head_seen.starts_with("POST /upload/file HTTP/1.1\r\n"),
        "{head_seen:?}"
    );

    let mut rest = Vec::new();
    rest.extend_from_slice(format!("{:x}\r\n", second.len()).as_bytes());
    rest.extend_from_slice(second);
    rest.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&rest).await;
    let resp = conn.read_final_response(false).await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(resp.text(), "first-part-second-part");
    let done = probe.snapshot();
    assert!(done.complete);
    assert_eq!(done.body, b"first-part-second-part");
}

// ---------------------------------------------------------------------------------------
// 2. Expect: 100-continue
// ---------------------------------------------------------------------------------------

fn continue_head(path: &str, extra: &[(&str, &str)], body_len: usize) -> Vec<u8> {
    let len = body_len.to_string();
    let mut headers = vec![
        ("expect", "100-continue"),
        ("x-echo", "1"),
        ("content-length", len.as_str()),
    ];
    headers.extend_from_slice(extra);
    http_request("POST", path, &headers, b"")
}

/// A keyed POST (dedup-eligible) with `Expect: 100-continue`: idem says `100 Continue`
/// before the client sends a byte of the body, then the leader's response is the backend's.
#[tokio::test]
async fn expect_continue_on_keyed_post() {
    let backend = Backend::start().await;
    let idem = Idem::start(&config_for(backend.addr())).await;

    let body = b"amount=42&currency=EUR";
    let head = continue_head(
        "/orders",
        &[("idempotency-key", "\"continue-1\"")],
        body.len(),
    );
    let resp = send_expecting_continue(idem.addr(), &head, body).await;
    assert_eq!(resp.interim, vec![100]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, body);
    assert_eq!(resp.header("x-backend-call"), Some("1"));
    assert_eq!(
        resp.header("cache-status"),
        Some("idem; fwd=uri-miss; stored"),
        "the request must have taken the dedup (leader) path"
    );
    let reqs = backend.requests("/orders");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, body);
    assert_eq!(backend.settled("/orders").await.completed, 1);
}

/// The same on an `off` route (Pingora's streamed proxy path), with an origin that, like many
/// app servers, never sends `100 Continue` itself.
#[tokio::test]
async fn expect_continue_on_off_route() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("raw", "/raw/", "off"))
        .to_string();
    let idem = Idem::start(&config).await;

    let body = b"streamed upload behind an expectation";
    let head = continue_head("/raw/upload", &[], body.len());
    let resp = send_expecting_continue(idem.addr(), &head, body).await;
    assert_eq!(resp.interim, vec![100]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, body);
    let reqs = backend.requests("/raw/upload");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, body);
    assert_eq!(
        reqs[0].header("expect"),
        None,
        "the expectation was met on the client's hop; the origin must not be asked again"
    );
}

// ---------------------------------------------------------------------------------------
// 3. The incident
// ---------------------------------------------------------------------------------------

/// What the serial client ended with.
#[derive(Debug)]
struct SerialOutcome {
    attempts: usize,
    /// Status, `idempotent-replayed` header and body of the response that arrived in time.
    response: Option<(u16, Option<String>, String)>,
}

/// `requests.post(url, data=body, timeout=...)` in a retry loop: each attempt gives up after
/// `timeout` (and drops its connection), the next one is sent at once.
async fn serial_client(
    url: &str,
    body: &str,
    timeout: Duration,
    max_attempts: usize,
) -> SerialOutcome {
    let http = client();
    for attempt in 1..=max_attempts {
        let call = async {
            let resp = http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-delay-ms", "1500")
                .body(body.to_owned())
                .send()
                .await?;
            let status = resp.status().as_u16();
            let replayed = resp
                .headers()
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = resp.text().await?;
            Ok::<_, reqwest::Error>((status, replayed, text))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => {
                return SerialOutcome {
                    attempts: attempt,
                    response: Some(response),
                }
            }
            Ok(Err(e)) => panic!("attempt {attempt}: {e}"),
            Err(_) => continue,
        }
    }
    SerialOutcome {
        attempts: max_attempts,
        response: None,
    }
}

/// The incident idem exists for: a view that takes 1.5 s, a client that gives up after 0.5 s and
/// retries. Straight to the backend every retry creates its own row; through idem on a
/// `fingerprint` route the backend runs once and a retry receives that call's 201.
#[tokio::test]
async fn incident_retries_through_idem_create_one_row() {
    let direct = Backend::start().await;
    let proxied = Backend::start().await;
    let config = Config::new(proxied.addr())
        .route(Route::new("api", "/api/", "fingerprint"))
        .to_string();
    let idem = Idem::start(&config).await;

    let timeout = Duration::from_millis(500);
    let direct_url = format!("http://{}/api/rows", direct.addr());
    let idem_url = idem.url("/api/rows");
    let (control, through) = tokio::join!(
        serial_client(&direct_url, "name=alice", timeout, 4),
        serial_client(&idem_url, "name=alice", timeout, 8),
    );

    // The control must bite: without idem, one logical call leaves duplicates.
    assert!(
        control.response.is_none(),
        "no direct attempt can finish in time: {control:?}"
    );
    direct.settled("/api/rows").await;
    let rows = direct.rows();
    assert!(
        rows.len() >= 2,
        "the reproduction must create duplicates straight to the backend: {rows:?}"
    );

    // Through idem: one call upstream, one row, and the client eventually gets the 201.
    let (status, replayed, body) = through
        .response
        .clone()
        .unwrap_or_else(|| panic!("the client never got a response through idem: {through:?}"));
    assert!(through.attempts >= 2, "{through:?}");
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        replayed.as_deref(),
        Some("true"),
        "the answer comes from the first attempt's call"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["created"], true, "{body}");
    assert_eq!(json["id"], 1, "{body}");
    let counts = proxied.settled("/api/rows").await;
    assert_eq!(
        counts.started, 1,
        "one upstream call for one logical call: {counts:?}"
    );
    assert_eq!(
        proxied.rows(),
        vec![Row {
            id: 1,
            name: "alice".into()
        }]
    );
    eprintln!(
        "incident: direct {} attempts -> {} rows; through idem {} attempts -> 1 row",
        control.attempts,
        rows.len(),
        through.attempts
    );
}

// ---------------------------------------------------------------------------------------
// 4. Signals
// ---------------------------------------------------------------------------------------

/// SIGTERM while a leader's call and a pass-through call are running: listeners stop, both
/// calls complete and reach their clients, and idem exits once they are done, long before
/// the 20 s grace period.
#[tokio::test]
async fn sigterm_drains_flights_and_exits_early() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("server.grace_period", "20s")
        .to_string();
    let idem = Idem::start(&config).await;
    let http = client();

    let leader = http
        .post(idem.url("/pay"))
        .header("idempotency-key", "sigterm-1")
        .header("x-delay-ms", "2000")
        .body("amount=1");
    let leader = tokio::spawn(async move {
        let resp = leader.send().await.expect("leader response");
        (
            resp.status().as_u16(),
            resp.text().await.expect("leader body"),
        )
    });
    let passing = http.get(idem.url("/report")).header("x-delay-ms", "2000");
    let passing = tokio::spawn(async move {
        let resp = passing.send().await.expect("pass-through response");
        (
            resp.status().as_u16(),
            resp.text().await.expect("pass-through body"),
        )
    });
    backend.wait_counts("/pay", |c| c.started == 1).await;
    backend.wait_counts("/report", |c| c.started == 1).await;

    let signalled = Instant::now();
    assert!(idem.signal(libc::SIGTERM), "idem died before the SIGTERM");

    // Stop accepting: new connections are refused while the flights drain.
    let refused_at = loop {
        if TcpStream::connect(idem.addr()).await.is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "idem kept accepting connections for 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let still_running = idem.exit_status().is_none();

    let (status, body) = leader.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"path":"/pay","call":1}"#);
    let (status, body) = passing.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"path":"/report","call":1}"#);

    let exit = idem.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    eprintln!("SIGTERM with two calls in flight: listener closed after {refused_at:?}, exit after {took:?}");
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "idem still running 10 s after SIGTERM (grace period 20 s)\n{}",
            idem.stderr_text()
        )
    });
    assert!(
        exit.success(),
        "exit status {exit:?}\n{}",
        idem.stderr_text()
    );
    assert!(
        still_running,
        "idem exited before its flights completed\n{}",
        idem.stderr_text()
    );
    let counts = backend.settled("/pay").await;
    assert_eq!((counts.started, counts.completed), (1, 1));
}

/// SIGTERM with nothing in flight exits promptly and cleanly.
#[tokio::test]
async fn sigterm_when_idle_exits_promptly() {
    let backend = Backend::start().await;
    let idem = Idem::start(&config_for(backend.addr())).await;
    let resp = client().get(idem.url("/ping")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    let signalled = Instant::now();
    assert!(idem.signal(libc::SIGTERM));
    let exit = idem.wait_exit(Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    eprintln!("idle SIGTERM: exit after {took:?}");
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "idle idem still running 5 s after SIGTERM (grace period 30 s)\n{}",
            idem.stderr_text()
        )
    });
    assert!(
        exit.success(),
        "exit status {exit:?}\n{}",
        idem.stderr_text()
    );
}

/// SIGHUP does not kill idem (its default action would): it keeps serving.
#[tokio::test]
async fn sighup_does_not_kill_idem() {
    let backend = Backend::start().await;
    let idem = Idem::start(&config_for(backend.addr())).await;
    let http = client();
    let resp = http.get(idem.url("/before")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    assert!(idem.signal(libc::SIGHUP));
    // idem logs the signal once it has handled it; a process killed by it never would.
    idem.wait_stderr("SIGHUP").await;
    assert_eq!(idem.exit_status(), None, "{}", idem.stderr_text());

    let resp = http
        .post(idem.url("/after"))
        .header("idempotency-key", "after-hup")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"path":"/after","call":1}"#);
    assert_eq!(idem.exit_status(), None, "{}", idem.stderr_text());
}

// ---------------------------------------------------------------------------------------
// 5. idem check / --version
// ---------------------------------------------------------------------------------------

struct CheckRun {
    code: i32,
    stdout: String,
    stderr: String,
    file: PathBuf,
    _dir: TempDir,
}

async fn run_check(text: &str) -> CheckRun {
    let dir = TempDir::new();
    let file = dir.write("proxy.toml", text);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("`idem check` finished within 30 s")
    .expect("spawn idem check");
    CheckRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        file,
        _dir: dir,
    }
}

/// 1-based line of the first line of `text` that starts (after indentation) with `prefix`.
fn line_starting(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
        + 1
}

#[tokio::test]
async fn check_accepts_a_valid_file() {
    let text = Config::new("127.0.0.1:9".parse().unwrap())
        .route(Route::new("api", "/api/", "fingerprint").set("ttl", "2h"))
        .to_string();
    let run = run_check(&text).await;
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("ok"), "stdout: {}", run.stdout);
}

#[tokio::test]
async fn check_rejects_bad_files_naming_file_line_and_problem() {
    let base = || Config::new("127.0.0.1:9".parse().unwrap());
    let cases: Vec<(&str, String, &str, Vec<&str>)> = vec![
        (
            "unknown key",
            base().set("server.listen_addr", "127.0.0.1:1").to_string(),
            "listen_addr",
            vec!["listen_addr"],
        ),
        (
            "bad duration",
            base().set("dedup.ttl", "24").to_string(),
            "ttl",
            vec!["\"24\"", "not a duration"],
        ),
        (
            "GET as a dedup method",
            base()
                .route(Route::new("api", "/api/", "keyed").set("methods", vec!["GET"]))
                .to_string(),
            "methods",
            vec!["route[0].methods", "GET"],
        ),
        (
            "grace period below total timeout",
            base().set("server.grace_period", "10s").to_string(),
            "grace_period",
            vec!["grace_period", "total_timeout"],
        ),
    ];
    for (what, text, key, needles) in cases {
        let line = line_starting(&text, &format!("{key} ="));
        let run = run_check(&text).await;
        assert!(
            run.code > 0,
            "{what}: expected a non-zero exit, got {} (stdout {:?}, stderr {:?})",
            run.code,
            run.stdout,
            run.stderr
        );
        let location = format!("{}:{line}", run.file.display());
        assert!(
            run.stderr.contains(&location),
            "{what}: stderr must name {location}; got {:?}\n--- file ---\n{text}",
            run.stderr
        );
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{what}: stderr must mention {needle:?}; got {:?}",
                run.stderr
            );
        }
    }
}

#[tokio::test]
async fn version_flag_prints_the_version() {
    let out = tokio::process::Command::new(BIN)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("idem {}", env!("CARGO_PKG_VERSION"))
    );
}

// ---------------------------------------------------------------------------------------
// 6. Forwarding headers
// ---------------------------------------------------------------------------------------

/// `X-Forwarded-For` / `X-Forwarded-Proto` are set (appended to an existing list) and
/// hop-by-hop fields are dropped, on the pass-through path and on the leader's path.
#[tokio::test]
async fn forwarding_headers_on_pass_through_and_leader_paths() {
    let backend = Backend::start().await;
    let idem = Idem::start(&config_for(backend.addr())).await;

    let hop: [(&str, &str); 4] = [
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "1"),
        ("te", "trailers"),
        ("keep-alive", "timeout=5"),
    ];
    // (path, Idempotency-Key, incoming X-Forwarded-For, expected X-Forwarded-For)
    let cases = [
        ("/fwd/pass", None, None, "127.0.0.1"),
        ("/fwd/pass-xff", None, Some("1.2.3.4"), "1.2.3.4, 127.0.0.1"),
        ("/fwd/lead", Some("fwd-1"), None, "127.0.0.1"),
        (
            "/fwd/lead-xff",
            Some("fwd-2"),
            Some("1.2.3.4"),
            "1.2.3.4, 127.0.0.1",
        ),
    ];
    for (path, key, xff, expected) in cases {
        let mut headers: Vec<(&str, &str)> = hop.to_vec();
        headers.push(("x-end-to-end", "kept"));
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        if let Some(x) = xff {
            headers.push(("x-forwarded-for", x));
        }
        let resp = raw_request(idem.addr(), &http_request("POST", path, &headers, b"a=1")).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        let via = if key.is_some() {
            "idem; fwd=uri-miss; stored"
        } else {
            "idem; fwd=bypass"
        };
        assert_eq!(
            resp.header("cache-status"),
            Some(via),
            "{path}: wrong path taken"
        );

        let reqs = backend.requests(path);
        assert_eq!(reqs.len(), 1, "{path}");
        let seen = &reqs[0];
        assert_eq!(seen.header("x-end-to-end"), Some("kept"), "{path}");
        assert_eq!(seen.body, b"a=1", "{path}");
        let xff_values = seen.header_values("x-forwarded-for");
        assert_eq!(
            xff_values,
            vec![expected.as_bytes()],
            "{path}: x-forwarded-for {:?}",
            xff_values
                .iter()
                .map(|v| String::from_utf8_lossy(v))
                .collect::<Vec<_>>()
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{path}");
        for name in ["x-hop-secret", "te", "keep-alive"] {
            assert_eq!(
                seen.header(name),
                None,
                "{path}: hop-by-hop `{name}` was forwarded: {:?}",
                seen.headers
            );
        }
        if let Some(connection) = seen.header("connection") {
            assert!(
                !connection.to_ascii_lowercase().contains("x-hop-secret"),
                "{path}: client's Connection forwarded: {connection:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 7. Round robin
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn round_robin_spreads_pass_through_requests_evenly() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let config = Config::with_backends(&[a.addr(), b.addr()]).to_string();
    let idem = Idem::start(&config).await;
    let http = client();
    for i in 0..10 {
        let resp = http.get(idem.url("/rr")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        resp.bytes().await.unwrap();
    }
    let (ca, cb) = (a.settled("/rr").await, b.settled("/rr").await);
    assert_eq!(
        (ca.started, cb.started),
        (5, 5),
        "10 keyless requests over two backends"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Body read deadline, keep-alive idle timeout
// ---------------------------------------------------------------------------------------

/// A keyed request whose body stalls gets 408 `body-timeout` after `body_read_timeout`, and
/// the backend never hears of it.
#[tokio::test]
async fn stalled_body_on_keyed_route_gets_408_after_body_read_timeout() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("server.body_read_timeout", "1s")
        .to_string();
    let idem = Idem::start(&config).await;

    let mut request = http_request(
        "POST",
        "/slow-upload",
        &[("idempotency-key", "slow-1"), ("content-length", "100")],
        b"",
    );
    request.extend_from_slice(b"0123456789");
    let mut conn = RawConn::connect(idem.addr()).await;
    let sent = Instant::now();
    conn.send(&request).await;
    let resp = tokio::time::timeout(Duration::from_secs(5), conn.read_response())
        .await
        .expect("no answer within 5 s to a body that stalled past the 1 s deadline");
    let took = sent.elapsed();
    eprintln!("stalled body answered after {took:?}");
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/body-timeout")),
        "{problem}"
    );
    assert_eq!(problem["status"], 408);
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}, before the 1 s deadline"
    );
    // The 90 unread body bytes would otherwise be parsed as the next request.
    tokio::time::timeout(Duration::from_secs(5), conn.expect_closed())
        .await
        .expect("idem kept the connection of an unfinished body open");
    assert_eq!(backend.total(), Counts::default(), "the backend was called");
}

/// An idle keep-alive connection is closed by idem after `keepalive_timeout`.
#[tokio::test]
async fn idle_keepalive_connection_is_closed_after_timeout() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("server.keepalive_timeout", "1s")
        .to_string();
    let idem = Idem::start(&config).await;

    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&http_request("GET", "/ka", &[], b"")).await;
    let resp = conn.read_response().await;
    assert_eq!(resp.status, 200);
    assert_ne!(resp.header("connection"), Some("close"));
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn.expect_closed())
        .await
        .expect("idle keep-alive connection still open 5 s after a 1 s keepalive_timeout");
    let idle = idle_since.elapsed();
    eprintln!("idle keep-alive connection closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(500),
        "closed after {idle:?}: not an idle timeout but no keep-alive at all"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Metrics listener
// ---------------------------------------------------------------------------------------

async fn get_text(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn metrics_listener_serves_health_readiness_and_metrics() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("api", "/api/", "fingerprint"))
        .to_string();
    let idem = Idem::start(&config).await;

    assert_eq!(get_text(&idem.metrics_url("/healthz")).await.0, 200);
    let (status, body) = get_text(&idem.metrics_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_text(&idem.metrics_url("/nope")).await.0, 404);
    assert_eq!(get_text(&idem.metrics_url("/")).await.0, 404);

    // Every route x outcome series exists from start-up.
    let (status, text) = get_text(&idem.metrics_url("/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        r#"idem_requests_total{outcome="leader",route="default"} 0"#,
        r#"idem_requests_total{outcome="collapsed",route="api"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    let resp = client()
        .post(idem.url("/orders"))
        .header("idempotency-key", "metrics-1")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    // The counter is recorded when the request is logged, just after the response: poll.
    let want = r#"idem_requests_total{outcome="leader",route="default"} 1"#;
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let (_, text) = get_text(&idem.metrics_url("/metrics")).await;
        if text.lines().any(|l| l == want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {want:?} after {WAIT_TIMEOUT:?} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// An origin that shows an upload as it streams in
// ---------------------------------------------------------------------------------------

/// What [`UploadProbe`] has seen of the (single) chunked upload.
#[derive(Debug, Clone, Default)]
struct Upload {
    /// The request head, as soon as it is complete.
    head: Option<String>,
    /// De-chunked body bytes received so far.
    body: Vec<u8>,
    /// The terminating chunk arrived (and the echo was sent).
    complete: bool,
}

/// A minimal origin: records the head the moment it arrives and the de-chunked body as it
/// streams in, and echoes the body once the last chunk is in. The support backend only
/// counts a request once its body is complete, which cannot show streaming.
struct UploadProbe {
    addr: SocketAddr,
    state: Arc<watch::Sender<Upload>>,
    task: JoinHandle<()>,
}

impl UploadProbe {
    async fn start() -> UploadProbe {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(watch::Sender::new(Upload::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                // Health checks connect and leave; each connection gets its own task.
                if let Ok((stream, _)) = listener.accept().await {
                    conns.spawn(serve_upload(stream, shared.clone()));
                }
            }
        });
        UploadProbe { addr, state, task }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn snapshot(&self) -> Upload {
        self.state.borrow().clone()
    }

    async fn wait(&self, what: &str, pred: impl Fn(&Upload) -> bool) {
        let mut rx = self.state.subscribe();
        let ok = matches!(
            tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|u| pred(u))).await,
            Ok(Ok(_))
        );
        assert!(
            ok,
            "upload probe: no {what} within {WAIT_TIMEOUT:?}; seen {:?}",
            self.snapshot()
        );
    }
}

impl Drop for UploadProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn serve_upload(mut stream: TcpStream, state: Arc<watch::Sender<Upload>>) {
    let mut buf = Vec::new();
    let head_len = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    buf.drain(..head_len);
    let chunked = head
        .to_ascii_lowercase()
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    state.send_modify(|u| u.head = Some(head.clone()));
    if !chunked {
        let msg = format!("upload probe: expected a chunked upload, got head {head:?}");
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
            msg.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
        return;
    }
    loop {
        // Take every complete chunk in the buffer.
        while let Some(line_end) = find(&buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            else {
                return;
            };
            if size == 0 {
                // Zero chunk, optional trailers, empty line.
                if find(&buf, b"\r\n\r\n").is_none() {
                    break;
                }
                let body = state.borrow().body.clone();
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                reply.extend_from_slice(&body);
                state.send_modify(|u| u.complete = true);
                let _ = stream.write_all(&reply).await;
                let _ = stream.shutdown().await;
                return;
            }
            let start = line_end + 2;
            if buf.len() < start + size + 2 {
                break;
            }
            let data = buf[start..start + size].to_vec();
            buf.drain(..start + size + 2);
            state.send_modify(|u| u.body.extend_from_slice(&data));
        }
        if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
    }
}

/// SIGINT exits at once, also right after start: through Pingora's fast shutdown a listener
/// on a single-thread runtime could spin on a failing `accept()` and never exit (2 in 40
/// starts). Several starts, each signalled as soon as it is listening.
#[tokio::test]
async fn sigint_exits_at_once_even_right_after_start() {
    let backend = Backend::start().await;
    for round in 0..12 {
        let idem = Idem::start(&config_for(backend.addr())).await;
        assert!(idem.signal(libc::SIGINT));
        let exit = idem
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: idem still running 5 s after SIGINT\n{}",
                    idem.stderr_text()
                )
            });
        assert!(exit.success(), "round {round}: {exit:?}");
    }
}

/// The listening line is printed once every listener accepts connections: Pingora reports
/// its services started before binding them, and a client that connected on reading the
/// line was refused in about one start in seven.
#[tokio::test]
async fn listeners_accept_as_soon_as_the_listening_line_is_out() {
    let backend = Backend::start().await;
    for round in 0..12 {
        let config = Config::new(backend.addr()).set("admin.listen", "127.0.0.1:0");
        let idem = Idem::start(&config.to_string()).await;
        for addr in [idem.addr(), idem.metrics_addr(), idem.admin_addr()] {
            TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {addr} refused: {e}"));
        }
    }
}
