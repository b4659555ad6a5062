//! The access log's fields with their exact values (pass-through, leader, waiter, replay),
//! request ids end to end, and a client that gives up: one INFO line, never an ERROR.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::support::*;

/// The access records (target `idem::access`) of a JSON log.
fn records(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "idem::access")
        .collect()
}

/// `record` without what varies run to run (timestamp, durations), after checking those.
fn stable(record: &Value, bound_ms: f64) -> Value {
    let mut r = record.clone();
    let o = r.as_object_mut().unwrap();
    assert!(
        o.remove("timestamp").is_some_and(|t| t.is_string()),
        "{record}"
    );
    for name in ["duration_ms", "upstream_ms"] {
        if let Some(ms) = o.remove(name) {
            let ms = ms
                .as_f64()
                .unwrap_or_else(|| panic!("{name} not a number: {record}"));
            assert!(
                ms > 0.0 && ms <= bound_ms,
                "{name} {ms} outside (0, {bound_ms}]: {record}"
            );
        }
    }
    r
}

/// A UUIDv7 as idem writes it: 36 lowercase characters, version 7, RFC 4122 variant.
fn assert_uuid_v7(id: &str) {
    let b = id.as_bytes();
    assert_eq!(b.len(), 36, "{id}");
    for (i, c) in id.char_indices() {
        match i {
            8 | 13 | 18 | 23 => assert_eq!(c, '-', "{id}"),
            _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}"),
        }
    }
    assert_eq!(b[14], b'7', "version: {id}");
    assert!(matches!(b[19], b'8' | b'9' | b'a' | b'b'), "variant: {id}");
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}: {resp:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn json_access_lines_of_a_pass_through_a_leader_a_waiter_and_a_replay() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.log_format", "json")
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let host = idem.addr().to_string();
    let backend = b.addr().to_string();
    let sent = Instant::now();

    // A pass-through GET with its own id; the query is not logged by default.
    let r = http
        .get(idem.url("/api/items?token=s3cret"))
        .header("x-request-id", "client-get-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-request-id"), "client-get-1");
    let get_body = r.bytes().await.unwrap().len();

    // A leader held at the backend, a waiter on it, then a replay.
    let gate = b.gate("/api/orders");
    let post = |id: Option<&'static str>| {
        let mut req = http
            .post(idem.url("/api/orders"))
            .header("idempotency-key", "order-7")
            .body("amount=12");
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        tokio::spawn(req.send())
    };
    let leader = post(None);
    gate.wait_started(1).await;
    let waiter = post(Some("waiter-1"));
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    let leader = leader.await.unwrap().unwrap();
    let waiter = waiter.await.unwrap().unwrap();
    let leader_id = header(&leader, "x-request-id");
    assert_uuid_v7(&leader_id);
    assert_eq!(header(&waiter, "x-request-id"), "waiter-1");
    let body = leader.bytes().await.unwrap().len();
    assert_eq!(waiter.bytes().await.unwrap().len(), body);
    let replay = http
        .post(idem.url("/api/orders"))
        .header("idempotency-key", "order-7")
        .header("x-request-id", "replay-1")
        .body("amount=12")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&replay, "idempotent-replayed"), "true");
    assert_eq!(header(&replay, "x-request-id"), "replay-1");
    assert_eq!(replay.bytes().await.unwrap().len(), body);
    idem.wait_stderr("\"outcome\":\"replayed\"").await;
    let bound_ms = sent.elapsed().as_secs_f64() * 1000.0;

    let stderr = idem.stderr_text();
    let all = records(&stderr);
    assert_eq!(all.len(), 4, "one line per request:\n{stderr}");
    let by = |outcome: &str| {
        let r = all
            .iter()
            .find(|r| r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {outcome} line:\n{stderr}"));
        stable(r, bound_ms)
    };
    let key = by("leader")["key"].as_str().unwrap().to_owned();
    assert!(
        key.len() == 12 && key.bytes().all(|c| c.is_ascii_hexdigit()),
        "{key}"
    );
    let common = |fields: Value| {
        let mut v = json!({
            "level": "INFO",
            "target": "idem::access",
            "message": "request",
            "client_addr": "127.0.0.1",
            "route": "api",
            "status": 200,
            "host": host,
        });
        v.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        v
    };
    assert_eq!(
        by("bypass"),
        common(json!({
            "method": "GET",
            "path": "/api/items",
            "outcome": "bypass",
            "request_id": "client-get-1",
            "upstream_addr": backend,
            "bytes_received": 0,
            "bytes_sent": get_body,
        }))
    );
    assert_eq!(
        by("leader"),
        common(json!({
            "method": "POST",
            "path": "/api/orders",
            "outcome": "leader",
            "request_id": leader_id,
            "key": key,
            "upstream_addr": backend,
            "bytes_received": 9,
            "bytes_sent": body,
            "waiters_served": 1,
        }))
    );
    assert_eq!(
        by("collapsed"),
        common(json!({
            "method": "POST",
            "path": "/api/orders",
            "outcome": "collapsed",
            "request_id": "waiter-1",
            "leader_request_id": leader_id,
            "key": key,
            "bytes_received": 9,
            "bytes_sent": body,
        }))
    );
    assert_eq!(
        by("replayed"),
        common(json!({
            "method": "POST",
            "path": "/api/orders",
            "outcome": "replayed",
            "request_id": "replay-1",
            "leader_request_id": leader_id,
            "key": key,
            "bytes_received": 9,
            "bytes_sent": body,
        }))
    );
    // Durations: present on every line, upstream latency where the request went upstream.
    for r in &all {
        assert!(r["duration_ms"].as_f64().is_some(), "{r}");
        let upstream = matches!(r["outcome"].as_str(), Some("bypass" | "leader"));
        assert_eq!(r.get("upstream_ms").is_some(), upstream, "{r}");
    }
    assert!(
        !stderr.contains("s3cret"),
        "the query string is logged:\n{stderr}"
    );
}

#[tokio::test]
async fn the_query_is_logged_only_when_configured() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.log_format", "json")
        .set("server.log_query", true);
    let idem = Idem::start(&config.to_string()).await;
    let r = client().get(idem.url("/q?a=1&b=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    idem.wait_stderr("\"outcome\":\"bypass\"").await;
    let all = records(&idem.stderr_text());
    assert_eq!(all[0]["path"], "/q?a=1&b=2");
}

/// An id idem makes is the one the backend sees, the client gets back and the log shows,
/// on a pass-through and on a leader's call; a usable client id is kept, anything else
/// replaced (never echoed).
#[tokio::test]
async fn request_ids_reach_the_backend_the_client_and_the_log() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).set("server.log_format", "json");
    let idem = Idem::start(&config.to_string()).await;
    let http = client();

    let mut seen = Vec::new();
    for (path, sent) in [
        ("/gen-get", None),
        ("/kept-get", Some("abc-123_XYZ.~")),
        ("/replaced-get", Some("two words")),
    ] {
        let mut req = http.get(idem.url(path));
        if let Some(id) = sent {
            req = req.header("x-request-id", id);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        seen.push((path, sent, header(&r, "x-request-id")));
    }
    let r = http
        .post(idem.url("/gen-post"))
        .header("idempotency-key", "id-post")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    seen.push(("/gen-post", None, header(&r, "x-request-id")));
    // idem's own answer (a malformed key: 400) carries the id too.
    let r = http
        .post(idem.url("/refused"))
        .header("idempotency-key", "")
        .header("x-request-id", "refused-1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-request-id"), "refused-1");

    idem.wait_stderr("\"request_id\":\"refused-1\"").await;
    let logged = records(&idem.stderr_text());
    let mut ids = BTreeSet::new();
    for (path, sent, returned) in &seen {
        match sent {
            Some(id) if !id.contains(' ') => assert_eq!(returned, id, "{path}"),
            _ => assert_uuid_v7(returned),
        }
        let at_backend = b.requests(path);
        assert_eq!(at_backend.len(), 1, "{path}");
        assert_eq!(
            at_backend[0].header_values("x-request-id"),
            vec![returned.as_bytes()],
            "{path}: one id upstream, the one returned"
        );
        let line = logged
            .iter()
            .find(|r| r["path"] == *path)
            .unwrap_or_else(|| panic!("no line for {path}"));
        assert_eq!(line["request_id"], returned.as_str(), "{path}");
        ids.insert(returned.clone());
    }
    assert_eq!(ids.len(), seen.len(), "every generated id differs");
    assert!(!idem.stderr_text().contains("two words"));
}

#[tokio::test]
async fn the_request_id_header_name_is_configurable() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).set("server.request_id_header", "X-Correlation-Id");
    let idem = Idem::start(&config.to_string()).await;
    let r = client()
        .get(idem.url("/corr"))
        .header("x-correlation-id", "corr-9")
        .header("x-request-id", "ignored")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-correlation-id"), "corr-9");
    let at_backend = &b.requests("/corr")[0];
    assert_eq!(at_backend.header("x-correlation-id"), Some("corr-9"));
    // The other header is just a header now: forwarded as it came.
    assert_eq!(at_backend.header("x-request-id"), Some("ignored"));
    idem.wait_stderr("request_id=corr-9").await;
}

/// A client that times out is ordinary for idem: its request's access line says so at INFO
/// (`status=499 client_left=true`), the detached call's completion gets a line of its own
/// with the same request id, and nothing is logged at WARN or ERROR.
#[tokio::test]
async fn a_client_timeout_is_one_info_line_and_never_an_error() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let impatient = client_with_timeout(Duration::from_millis(300));

    // A leader whose client gives up while the backend works.
    let gate = b.gate("/api/slow");
    let err = impatient
        .post(idem.url("/api/slow"))
        .header("idempotency-key", "slow-1")
        .header("x-request-id", "impatient-leader")
        .body("x")
        .send()
        .await
        .expect_err("the client times out");
    assert!(err.is_timeout(), "{err}");
    idem.wait_stderr("request_id=impatient-leader").await;
    // A pass-through whose client gives up while the backend answers slowly.
    let err = impatient
        .get(idem.url("/api/slow-get"))
        .header("x-request-id", "impatient-get")
        .header("x-delay-ms", "1500")
        .send()
        .await
        .expect_err("the client times out");
    assert!(err.is_timeout(), "{err}");
    b.wait_counts("/api/slow-get", |c| c.started == 1).await;
    idem.wait_stderr("request_id=impatient-get").await;
    gate.open();
    idem.wait_stderr("detached call completed").await;

    let stderr = idem.stderr_text();
    let lines: Vec<&str> = stderr.lines().collect();
    let leader: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("request_id=impatient-leader"))
        .collect();
    assert_eq!(
        leader.len(),
        2,
        "the request's line and the completion's:\n{stderr}"
    );
    for field in [
        "INFO idem::access: request method=POST path=/api/slow ",
        " status=499 outcome=leader ",
        " client_left=true",
    ] {
        assert!(leader[0].contains(field), "{field:?} not in {}", leader[0]);
    }
    assert!(!leader[0].contains("error="), "{}", leader[0]);
    for field in [
        "INFO idem::access: detached call completed ",
        " status=200 outcome=leader ",
        " detached=true",
        &format!(" upstream_addr={} ", b.addr()),
    ] {
        assert!(leader[1].contains(field), "{field:?} not in {}", leader[1]);
    }
    let get: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("request_id=impatient-get"))
        .collect();
    assert_eq!(get.len(), 1, "{stderr}");
    assert!(get[0].contains(" status=499 outcome=bypass "), "{}", get[0]);
    for level in [" ERROR ", " WARN "] {
        assert!(
            !stderr.contains(level),
            "a client timeout logged at{level}:\n{stderr}"
        );
    }
}

/// A pass-through that fails upstream is one WARN line naming the request and the backend
/// (and its access line); an attempt retried on another backend that answers is no line at
/// all at INFO. Pingora's own ERROR and WARN lines for them are not written.
#[tokio::test]
async fn an_upstream_failure_is_one_warn_and_a_retry_is_silent() {
    let b = Backend::start().await;
    let refused = free_addr();
    let config = Config::with_backends(&[refused, b.addr()])
        .set("upstream.health_check", "none")
        .to_string();
    let idem = Idem::start(&config).await;
    let http = client();
    // Round robin: the refusing backend is tried first at least once, then the other.
    for id in ["rr-1", "rr-2"] {
        let r = http
            .get(idem.url("/rr"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        r.bytes().await.unwrap();
        idem.wait_stderr(&format!("request_id={id}")).await;
    }
    let metrics = scrape(&idem).await;
    let failed = format!("idem_backend_requests_total{{backend=\"{refused}\",class=\"failed\"}}");
    let answered = format!(
        "idem_backend_requests_total{{backend=\"{}\",class=\"2xx\"}}",
        b.addr()
    );
    assert!(
        sample(&metrics, &failed).is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, &answered), Some(2.0), "{metrics}");
    let stderr = idem.stderr_text();
    assert!(
        !stderr.contains(" WARN ") && !stderr.contains(" ERROR "),
        "{stderr}"
    );

    // Only the refusing backend: the request fails, said once.
    let config = Config::with_backends(&[refused])
        .set("upstream.health_check", "none")
        .to_string();
    let idem = Idem::start(&config).await;
    let r = http
        .get(idem.url("/down"))
        .header("x-request-id", "down-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-request-id"), "down-1");
    idem.wait_stderr("request_id=down-1 bytes_received").await;
    let stderr = idem.stderr_text();
    let warns: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warns.len(), 1, "{stderr}");
    assert!(
        warns[0].contains("pass-through failed: upstream-unreachable")
            && warns[0].contains("request_id=\"down-1\"")
            && warns[0].contains(&format!("backend=\"{refused}\"")),
        "{}",
        warns[0]
    );
    assert!(!stderr.contains(" ERROR "), "{stderr}");
}
