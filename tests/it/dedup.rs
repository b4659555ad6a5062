//! Coalescing, detachment, replay, scopes and key misuse (DESIGN sections 2, 4, 5).

use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// One response, whichever client produced it: status, lower-cased headers
/// (repeated names kept) and body.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    async fn from_reqwest(resp: reqwest::Response) -> Seen {
        let status = resp.status().as_u16();
        let headers = pairs(resp.headers());
        let body = resp.text().await.expect("read response body");
        Seen {
            status,
            headers,
            body,
        }
    }

    fn from_raw(resp: &RawResponse) -> Seen {
        Seen {
            status: resp.status,
            headers: resp
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            body: resp.text(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn cache_status(&self) -> &str {
        self.header("cache-status")
            .unwrap_or_else(|| panic!("no cache-status on {self:#?}"))
    }

    /// Asserts idem's problem answer of `status` and `kind`, with all its members.
    fn assert_problem(&self, status: u16, kind: &str) {
        let json = assert_problem(self, status, kind);
        assert_problem_members(&json, status);
    }

    /// `N` of `Cache-Status: idem; hit; ttl=N`, after checking the replay markers.
    fn assert_replay(&self) -> u64 {
        assert_eq!(
            self.header("idempotent-replayed"),
            Some("true"),
            "{self:#?}"
        );
        let ttl = self
            .cache_status()
            .strip_prefix("idem; hit; ttl=")
            .unwrap_or_else(|| panic!("not a replay: {self:#?}"))
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("ttl is not a number ({e}): {self:#?}"));
        let age: u64 = self
            .header("age")
            .unwrap_or_else(|| panic!("replay without Age: {self:#?}"))
            .parse()
            .expect("Age is a number");
        assert!(age < 5, "Age {age} for a response stored moments ago");
        ttl
    }

    /// The leader's own response: stored, not marked as replayed, no Age.
    fn assert_stored_leader(&self) {
        assert_eq!(
            self.cache_status(),
            "idem; fwd=uri-miss; stored",
            "{self:#?}"
        );
        assert_eq!(self.header("idempotent-replayed"), None, "{self:#?}");
        assert_eq!(self.header("age"), None, "{self:#?}");
    }

    /// A waiter's copy of the leader's response.
    fn assert_collapsed(&self) {
        assert_eq!(
            self.cache_status(),
            "idem; fwd=uri-miss; collapsed",
            "{self:#?}"
        );
        assert_eq!(
            self.header("idempotent-replayed"),
            Some("true"),
            "{self:#?}"
        );
        let age: u64 = self
            .header("age")
            .unwrap_or_else(|| panic!("collapsed response without Age: {self:#?}"))
            .parse()
            .expect("Age is a number");
        assert!(age < 5, "Age {age} for a response just received");
    }
}

impl Answered for Seen {
    fn status_code(&self) -> u16 {
        self.status
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
    }

    fn body_bytes(&self) -> &[u8] {
        self.body.as_bytes()
    }
}

fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A raw HTTP/1.1 request on a fresh connection, as a [`Seen`].
async fn raw(idem: &Idem, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Seen {
    Seen::from_raw(&raw_request(idem.addr(), &http_request(method, path, headers, body)).await)
}

/// A keyed `POST path` with the body `x=1`, as a [`Seen`].
async fn post_key(idem: &Idem, path: &str, key: &str) -> Seen {
    raw(idem, "POST", path, &[("idempotency-key", key)], b"x=1").await
}

/// Owned variant of [`raw`] for spawned tasks.
async fn raw_owned(
    addr: std::net::SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Seen {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    Seen::from_raw(&raw_request(addr, &http_request("POST", &path, &h, &body)).await)
}

/// `idem_requests_total{route, outcome}`.
async fn wait_requests(idem: &Idem, route: &str, outcome: &str, want: f64) {
    let series = series_id(
        "idem_requests_total",
        [("route", route), ("outcome", outcome)],
    );
    wait_metric(idem, &series, want).await;
}

const ONE_CALL: Counts = Counts {
    started: 1,
    completed: 1,
    aborted: 0,
};

// ---------------------------------------------------------------------------
// 1. Coalescing: 300 identical keyless POSTs, one upstream call
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_identical_posts_make_one_upstream_call() {
    const N: usize = 300;
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("orders", "/orders/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let gate = backend.gate("/orders/new");

    let http = client();
    let mut calls = JoinSet::new();
    for _ in 0..N {
        let req = http
            .post(idem.url("/orders/new?cart=7"))
            .header("content-type", "application/json")
            .body(r#"{"sku":42,"qty":1}"#);
        calls.spawn(async move { Seen::from_reqwest(req.send().await.expect("send")).await });
    }

    // The leader's call is the only one that can reach the gate; every other
    // request must be attached to it inside idem before the gate opens.
    gate.wait_started(1).await;
    wait_metric(&idem, "idem_waiters", (N - 1) as f64).await;
    wait_metric(&idem, "idem_inflight_keys", 1.0).await;
    assert_eq!(gate.arrived(), 1, "a second call reached the backend");
    gate.open();

    let mut seen = Vec::with_capacity(N);
    while let Some(r) = calls.join_next().await {
        seen.push(r.expect("request task"));
    }
    assert_eq!(backend.settled("/orders/new").await, ONE_CALL);
    assert_eq!(backend.total(), ONE_CALL);

    let leaders: Vec<_> = seen
        .iter()
        .filter(|s| s.header("cache-status") == Some("idem; fwd=uri-miss; stored"))
        .collect();
    let collapsed: Vec<_> = seen
        .iter()
        .filter(|s| s.header("cache-status") == Some("idem; fwd=uri-miss; collapsed"))
        .collect();
    assert_eq!(leaders.len(), 1, "leaders");
    assert_eq!(collapsed.len(), N - 1, "collapsed");
    leaders[0].assert_stored_leader();
    let expected_body = r#"{"path":"/orders/new","call":1}"#;
    for s in &seen {
        assert_eq!(s.status, 200, "{s:#?}");
        assert_eq!(s.body, expected_body);
        assert_eq!(s.header("x-backend-call"), Some("1"));
        assert_eq!(s.header("content-type"), Some("application/json"));
    }
    for s in &collapsed {
        s.assert_collapsed();
    }
    wait_metric(&idem, "idem_waiters", 0.0).await;
    wait_requests(&idem, "orders", "collapsed", 299.0).await;
    wait_requests(&idem, "orders", "leader", 1.0).await;
}

// ---------------------------------------------------------------------------
// 2. The incident: the client gives up, the call goes on, retries attach/replay
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeout_detaches_the_call_and_retries_get_its_response() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("signup", "/signup/", "fingerprint").set("fingerprint_ttl", "60s"));
    let idem = Idem::start(&config.to_string()).await;
    // Django's get_or_create without a unique constraint: two calls, two rows.
    let path = "/signup/rows";
    let gate = backend.gate(path);
    let body = r#"{"name":"ada"}"#;
    let post = |http: &reqwest::Client| {
        http.post(idem.url(path))
            .header("content-type", "application/json")
            .body(body)
    };

    // The impatient client: times out while the app is still working.
    let impatient = client_with_timeout(Duration::from_millis(300));
    let first = post(&impatient).send().await;
    assert!(
        first.as_ref().is_err_and(|e| e.is_timeout()),
        "the first client should have timed out: {first:?}"
    );
    gate.wait_started(1).await;
    // idem has noticed the leader's client leaving (the request was logged).
    wait_requests(&idem, "signup", "leader", 1.0).await;

    // The retry while the first call still runs attaches to it.
    let http = client();
    let retry = tokio::spawn(post(&http).send());
    wait_metric(&idem, "idem_waiters", 1.0).await;
    assert_eq!(gate.arrived(), 1);
    gate.open();
    let during = Seen::from_reqwest(retry.await.unwrap().expect("retry during the call")).await;
    assert_eq!(during.status, 201, "{during:#?}");
    during.assert_collapsed();
    let row: serde_json::Value = serde_json::from_str(&during.body).unwrap();
    assert_eq!(row["name"], "ada");
    assert_eq!(row["created"], true);

    // The retry after the call is a replay of the same response.
    let after = Seen::from_reqwest(post(&http).send().await.expect("retry after")).await;
    assert_eq!(after.status, 201);
    assert_eq!(after.body, during.body);
    let ttl = after.assert_replay();
    assert!(
        (55..=60).contains(&ttl),
        "ttl={ttl}, fingerprint_ttl is 60s"
    );

    assert_eq!(backend.settled(path).await, ONE_CALL);
    assert_eq!(backend.rows().len(), 1, "rows: {:?}", backend.rows());
    wait_metric(
        &idem,
        &series_id("idem_detached_completions_total", [("route", "signup")]),
        1.0,
    )
    .await;
}

// ---------------------------------------------------------------------------
// 3. Replay headers; keyed mode by default; keyless requests bypass it
// ---------------------------------------------------------------------------

#[tokio::test]
async fn replay_carries_markers_and_the_stored_response() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("fp", "/fp/", "fingerprint").set("fingerprint_ttl", "60s"));
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let send = || {
        http.post(idem.url("/fp/charge?x=1"))
            .header("content-type", "text/plain")
            .header("x-status", "201")
            .header("x-body", "charged 10 EUR")
            .header("x-content-type", "text/x-receipt")
            .body("amount=10")
    };

    let leader = Seen::from_reqwest(send().send().await.unwrap()).await;
    assert_eq!(leader.status, 201);
    assert_eq!(leader.body, "charged 10 EUR");
    assert_eq!(leader.header("content-type"), Some("text/x-receipt"));
    assert_eq!(leader.header("x-backend-call"), Some("1"));
    leader.assert_stored_leader();

    for _ in 0..2 {
        let replay = Seen::from_reqwest(send().send().await.unwrap()).await;
        assert_eq!(replay.status, 201);
        assert_eq!(replay.body, "charged 10 EUR");
        assert_eq!(replay.header("content-type"), Some("text/x-receipt"));
        assert_eq!(replay.header("x-backend-call"), Some("1"));
        assert_eq!(replay.header("content-length"), Some("14"));
        assert!(replay.header("date").is_some(), "{replay:#?}");
        let ttl = replay.assert_replay();
        assert!((55..=60).contains(&ttl), "ttl={ttl}");
    }
    // Another body is another request.
    let other = Seen::from_reqwest(send().body("amount=11").send().await.unwrap()).await;
    assert_eq!(other.header("x-backend-call"), Some("2"));
    other.assert_stored_leader();
    assert_eq!(
        backend.settled("/fp/charge").await,
        Counts {
            started: 2,
            completed: 2,
            aborted: 0
        }
    );
}

#[tokio::test]
async fn a_key_on_a_fingerprint_route_names_the_request() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(
        Route::new("fp", "/fp/", "fingerprint")
            .set("ttl", "1h")
            .set("fingerprint_ttl", "60s"),
    );
    let idem = Idem::start(&config.to_string()).await;
    async fn send(idem: &Idem, key: Option<&str>) -> Seen {
        let mut headers = vec![("content-type", "text/plain")];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        raw(idem, "POST", "/fp/job", &headers, b"run").await
    }
    // Keyed and keyless requests live in separate key domains, even when
    // they are otherwise identical.
    let keyless = send(&idem, None).await;
    keyless.assert_stored_leader();
    let keyed = send(&idem, Some("job-1")).await;
    keyed.assert_stored_leader();
    assert_eq!(keyed.header("x-backend-call"), Some("2"));
    // Another key for the same body is another request.
    let other_key = send(&idem, Some("job-2")).await;
    other_key.assert_stored_leader();
    assert_eq!(other_key.header("x-backend-call"), Some("3"));

    // Each is replayed with its own retention: `ttl` for keys,
    // `fingerprint_ttl` for fingerprints.
    let replay = send(&idem, Some("job-1")).await;
    assert_eq!(replay.header("x-backend-call"), Some("2"));
    let ttl = replay.assert_replay();
    assert!((3590..=3600).contains(&ttl), "keyed ttl={ttl}");
    let replay = send(&idem, None).await;
    assert_eq!(replay.header("x-backend-call"), Some("1"));
    let ttl = replay.assert_replay();
    assert!((50..=60).contains(&ttl), "fingerprint ttl={ttl}");
    assert_eq!(
        backend.settled("/fp/job").await,
        Counts {
            started: 3,
            completed: 3,
            aborted: 0
        }
    );
}

#[tokio::test]
async fn a_fingerprint_is_replayed_for_its_window_only() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("fp", "/fp/", "fingerprint").set("fingerprint_ttl", "1s"));
    let idem = Idem::start(&config.to_string()).await;
    let add_one = || raw(&idem, "POST", "/fp/cart/add", &[], b"item=1");

    let first = add_one().await;
    let completed = Instant::now();
    first.assert_stored_leader();
    let replay = add_one().await;
    replay.assert_replay();
    assert_eq!(replay.header("x-backend-call"), Some("1"));

    // Retry until the window has passed (bounded); the first non-replay must
    // be a new call, and it must not come early.
    let deadline = completed + WAIT_TIMEOUT;
    let fresh = loop {
        let sent = Instant::now();
        let resp = add_one().await;
        if resp.header("idempotent-replayed").is_none() {
            assert!(
                sent.duration_since(completed) >= Duration::from_millis(900),
                "the 1s window ended after {:?}",
                sent.duration_since(completed)
            );
            break resp;
        }
        assert_eq!(resp.header("x-backend-call"), Some("1"));
        assert!(
            Instant::now() < deadline,
            "still replayed after {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fresh.assert_stored_leader();
    assert_eq!(fresh.header("x-backend-call"), Some("2"));
    assert_eq!(
        backend.settled("/fp/cart/add").await,
        Counts {
            started: 2,
            completed: 2,
            aborted: 0
        }
    );
}

#[tokio::test]
async fn replay_recomputes_framing_and_drops_hop_by_hop_headers() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("fp", "/fp/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    // The origin answers chunked and closes its connection; neither is a
    // property of the response that a replay may repeat.
    let request = http_request(
        "POST",
        "/fp/framing",
        &[
            ("x-fault", "chunked"),
            ("x-connection-close", "1"),
            ("x-body", "0123456789abcdef"),
        ],
        b"q=1",
    );
    // One keep-alive client connection carries the leader and two replays.
    let mut conn = RawConn::connect(idem.addr()).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        conn.send(&request).await;
        seen.push(Seen::from_raw(&conn.read_response().await));
    }
    seen[0].assert_stored_leader();
    seen[1].assert_replay();
    seen[2].assert_replay();
    for s in &seen {
        assert_eq!(s.status, 200);
        assert_eq!(s.body, "0123456789abcdef");
        assert_eq!(s.header("content-length"), Some("16"), "{s:#?}");
        assert_eq!(s.header("transfer-encoding"), None, "{s:#?}");
        assert!(
            !s.all("connection")
                .iter()
                .any(|v| v.eq_ignore_ascii_case("close")),
            "the origin's `connection: close` leaked: {s:#?}"
        );
        assert_eq!(s.all("date").len(), 1, "{s:#?}");
    }
    assert_eq!(backend.settled("/fp/framing").await, ONE_CALL);
}

#[tokio::test]
async fn fingerprint_covers_method_path_raw_query_headers_and_body() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("fp", "/fp/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let addr = idem.addr();
    // Each request is sent twice: its first is a leader (a new fingerprint),
    // its second a replay of that leader's response.
    let distinct: Vec<Vec<u8>> = vec![
        http_request("POST", "/fp/q?a=1&b=2", &[], b"x"),
        // Raw query: not decoded, not reordered.
        http_request("POST", "/fp/q?b=2&a=1", &[], b"x"),
        http_request("POST", "/fp/q?a=%31&b=2", &[], b"x"),
        http_request("PUT", "/fp/q?a=1&b=2", &[], b"x"),
        http_request("POST", "/fp/Q?a=1&b=2", &[], b"x"),
        http_request("POST", "/fp/q?a=1&b=2", &[], b"y"),
        // Content-Type absent, empty and set are three requests.
        http_request("POST", "/fp/q?a=1&b=2", &[("content-type", "")], b"x"),
        http_request(
            "POST",
            "/fp/q?a=1&b=2",
            &[("content-type", "text/plain")],
            b"x",
        ),
        // No byte may move between fields: path/query and query/body.
        http_request("POST", "/fp/q?a=1&b=2x", &[], b""),
        // An empty body, whatever its framing.
        http_request("POST", "/fp/empty", &[], b""),
    ];
    for (i, request) in distinct.iter().enumerate() {
        let leader = Seen::from_raw(&raw_request(addr, request).await);
        leader.assert_stored_leader();
        let replay = Seen::from_raw(&raw_request(addr, request).await);
        replay.assert_replay();
        assert_eq!(replay.body, leader.body, "request #{i}");
    }
    // The same empty body without any framing and as an empty chunked body,
    // and the same query spelled absent or empty: replays, not new calls.
    let same_as_before: Vec<Vec<u8>> = vec![
        b"POST /fp/empty HTTP/1.1\r\nhost: idem.test\r\n\r\n".to_vec(),
        http_request(
            "POST",
            "/fp/empty",
            &[("transfer-encoding", "chunked")],
            &chunked_body(&[]),
        ),
        http_request("POST", "/fp/empty?", &[], b""),
    ];
    for request in &same_as_before {
        let resp = Seen::from_raw(&raw_request(addr, request).await);
        resp.assert_replay();
        assert_eq!(
            resp.header("x-backend-call"),
            Some("1"),
            "{:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(backend.settled("/fp/empty").await, ONE_CALL);
    assert_eq!(backend.settled("/fp/q").await.started, 8);
    assert_eq!(backend.settled("/fp/Q").await, ONE_CALL);
}

#[tokio::test]
async fn keyed_is_the_default_mode_and_keyless_requests_bypass_it() {
    let backend = Backend::start().await;
    // No [dedup] mode and no route: every path gets the built-in default.
    let config = Config::new(backend.addr()).remove("dedup.mode");
    let idem = Idem::start(&config.to_string()).await;
    let http = client();
    let keyed = || {
        http.post(idem.url("/payments"))
            .header("idempotency-key", "pay-0001")
            .header("content-type", "application/json")
            .header("x-status", "202")
            .body(r#"{"amount":10}"#)
    };

    let leader = Seen::from_reqwest(keyed().send().await.unwrap()).await;
    assert_eq!(leader.status, 202);
    leader.assert_stored_leader();
    let replay = Seen::from_reqwest(keyed().send().await.unwrap()).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.body, leader.body);
    assert_eq!(replay.header("x-backend-call"), Some("1"));
    let ttl = replay.assert_replay();
    // The default retention of keyed entries is 24 hours.
    assert!((86_390..=86_400).contains(&ttl), "ttl={ttl}");
    assert_eq!(backend.settled("/payments").await, ONE_CALL);

    // Without a key, a keyed route passes every call through.
    for call in 1..=3 {
        let resp = Seen::from_reqwest(
            http.post(idem.url("/transfers"))
                .header("content-type", "application/json")
                .body(r#"{"amount":10}"#)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.cache_status(), "idem; fwd=bypass");
        assert_eq!(resp.header("idempotent-replayed"), None);
        assert_eq!(
            resp.header("x-backend-call"),
            Some(call.to_string().as_str())
        );
    }
    assert_eq!(
        backend.settled("/transfers").await,
        Counts {
            started: 3,
            completed: 3,
            aborted: 0
        }
    );
}

// ---------------------------------------------------------------------------
// 4. Scopes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_scopes_never_share_a_wait_or_a_replay() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("api", "/api/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let path = "/api/vote";
    let gate = backend.gate(path);
    let body = b"choice=b".to_vec();
    let scopes: Vec<Vec<(String, String)>> = [
        vec![],
        vec![("authorization", "Bearer alice")],
        vec![("authorization", "Bearer bob")],
        vec![("cookie", "sid=1")],
        vec![("cookie", "sid=2")],
        vec![("host", "other.test")],
        vec![("host", "other.test"), ("authorization", "Bearer alice")],
    ]
    .iter()
    .map(|h| {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    })
    .collect();

    // All scopes at once: each one must reach the backend on its own.
    let mut calls = JoinSet::new();
    for (i, headers) in scopes.iter().enumerate() {
        let fut = raw_owned(idem.addr(), path.to_owned(), headers.clone(), body.clone());
        calls.spawn(async move { (i, fut.await) });
    }
    gate.wait_started(scopes.len() as u64).await;
    assert_eq!(find_metric(&idem, "idem_waiters").await, Some(0.0));
    gate.open();
    let mut first = vec![None; scopes.len()];
    while let Some(r) = calls.join_next().await {
        let (i, seen) = r.unwrap();
        assert_eq!(seen.status, 200, "{seen:#?}");
        seen.assert_stored_leader();
        first[i] = Some(seen);
    }
    let n = scopes.len() as u64;
    assert_eq!(
        backend.settled(path).await,
        Counts {
            started: n,
            completed: n,
            aborted: 0
        }
    );
    let calls_seen: std::collections::BTreeSet<_> = first
        .iter()
        .map(|s| {
            s.as_ref()
                .unwrap()
                .header("x-backend-call")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        calls_seen.len(),
        scopes.len(),
        "every scope had its own call"
    );

    // Each scope is replayed its own response, never another scope's.
    for (i, headers) in scopes.iter().enumerate() {
        let again = raw_owned(idem.addr(), path.to_owned(), headers.clone(), body.clone()).await;
        again.assert_replay();
        let mine = first[i].as_ref().unwrap();
        assert_eq!(
            again.header("x-backend-call"),
            mine.header("x-backend-call"),
            "scope {headers:?} got another scope's response"
        );
        assert_eq!(again.body, mine.body);
    }
    assert_eq!(backend.settled(path).await.started, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_reaches_its_user_only() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("api", "/api/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let cookie = "session=s3cr3t; Path=/; HttpOnly";

    for (path, auth) in [("/api/anon", None), ("/api/alice", Some("Bearer alice"))] {
        let gate = backend.gate(path);
        let mut headers = vec![("x-set-cookie".to_owned(), cookie.to_owned())];
        if let Some(a) = auth {
            headers.push(("authorization".to_owned(), a.to_owned()));
        }
        let leader = tokio::spawn(raw_owned(
            idem.addr(),
            path.into(),
            headers.clone(),
            b"go".to_vec(),
        ));
        gate.wait_started(1).await;
        let waiter = tokio::spawn(raw_owned(
            idem.addr(),
            path.into(),
            headers.clone(),
            b"go".to_vec(),
        ));
        wait_metric(&idem, "idem_waiters", 1.0).await;
        gate.open();
        let leader = leader.await.unwrap();
        let waiter = waiter.await.unwrap();
        let replay = raw_owned(idem.addr(), path.into(), headers.clone(), b"go".to_vec()).await;

        // The response's own client always gets its cookie.
        leader.assert_stored_leader();
        assert_eq!(leader.all("set-cookie"), vec![cookie], "{path}");
        waiter.assert_collapsed();
        replay.assert_replay();
        for other in [&waiter, &replay] {
            assert_eq!(other.body, leader.body, "{path}");
            assert_eq!(other.header("x-backend-call"), Some("1"));
            if auth.is_some() {
                // Same user: the cookie is theirs.
                assert_eq!(other.all("set-cookie"), vec![cookie], "{path}: {other:#?}");
            } else {
                // Anonymous: someone else's session must never be handed out.
                assert!(other.all("set-cookie").is_empty(), "{path}: {other:#?}");
            }
        }
        assert_eq!(backend.settled(path).await, ONE_CALL, "{path}");
    }
}

// ---------------------------------------------------------------------------
// 5. Misuse and malformed keys
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_another_body_is_refused_in_flight_and_after() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("pay", "/pay/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let path = "/pay/charge";
    let gate = backend.gate(path);
    let key = "charge-2f9c";
    let headers = |k: &str| {
        vec![
            ("idempotency-key".to_owned(), k.to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
        ]
    };
    let first = tokio::spawn(raw_owned(
        idem.addr(),
        path.into(),
        headers(key),
        br#"{"amount":10}"#.to_vec(),
    ));
    gate.wait_started(1).await;

    let misuse = || {
        raw_owned(
            idem.addr(),
            path.into(),
            headers(key),
            br#"{"amount":99}"#.to_vec(),
        )
    };
    let during = misuse().await;
    during.assert_problem(422, "fingerprint-mismatch");
    assert!(
        !during.body.contains(key),
        "detail echoes the key: {}",
        during.body
    );
    assert!(
        !during.body.contains("99"),
        "detail echoes the body: {}",
        during.body
    );
    assert_eq!(find_metric(&idem, "idem_waiters").await, Some(0.0));
    // The same key with the same request, meanwhile, waits for the first.
    let retry = tokio::spawn(raw_owned(
        idem.addr(),
        path.into(),
        headers(key),
        br#"{"amount":10}"#.to_vec(),
    ));
    wait_metric(&idem, "idem_waiters", 1.0).await;

    gate.open();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    first.assert_stored_leader();
    let retry = retry.await.unwrap();
    retry.assert_collapsed();
    assert_eq!(retry.body, first.body);

    misuse().await.assert_problem(422, "fingerprint-mismatch");
    // The same key from another user is another key: no misuse, its own call.
    let mut bob = headers(key);
    bob.push(("authorization".to_owned(), "Bearer bob".to_owned()));
    let bobs = raw_owned(idem.addr(), path.into(), bob, br#"{"amount":99}"#.to_vec()).await;
    assert_eq!(bobs.status, 200, "{bobs:#?}");
    bobs.assert_stored_leader();
    assert_eq!(bobs.header("x-backend-call"), Some("2"));
    // The original request is still replayed.
    let replay = raw_owned(
        idem.addr(),
        path.into(),
        headers(key),
        br#"{"amount":10}"#.to_vec(),
    )
    .await;
    replay.assert_replay();
    assert_eq!(replay.body, first.body);

    // Alice's one call and Bob's; the mismatched requests never reached the app.
    assert_eq!(
        backend.settled(path).await,
        Counts {
            started: 2,
            completed: 2,
            aborted: 0
        }
    );
    let seen: Vec<_> = backend
        .requests(path)
        .iter()
        .map(|r| (r.body_text(), r.header("authorization").map(str::to_owned)))
        .collect();
    assert_eq!(
        seen,
        vec![
            (r#"{"amount":10}"#.to_owned(), None),
            (r#"{"amount":99}"#.to_owned(), Some("Bearer bob".to_owned())),
        ]
    );
    wait_requests(&idem, "pay", "mismatch", 2.0).await;
}

#[tokio::test]
async fn missing_and_malformed_keys_are_refused() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("strict", "/strict/", "require-key"))
        .route(Route::new("keys", "/keys/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;

    let missing = raw(&idem, "POST", "/strict/order", &[], b"x=1").await;
    missing.assert_problem(400, "missing-key");
    // A key makes the same request acceptable.
    let ok = post_key(&idem, "/strict/order", "k1").await;
    assert_eq!(ok.status, 200);
    ok.assert_stored_leader();
    assert_eq!(backend.settled("/strict/order").await, ONE_CALL);

    let long_256 = "k".repeat(256);
    let quoted_256 = format!("\"{}\"", "q".repeat(256));
    let malformed: Vec<Vec<(&str, &str)>> = vec![
        vec![("idempotency-key", "a b")],
        vec![("idempotency-key", "\"unterminated")],
        vec![("idempotency-key", "a,b")],
        vec![("idempotency-key", "")],
        vec![("idempotency-key", "\"\"")],
        vec![("idempotency-key", "k1"), ("idempotency-key", "k1")],
        vec![("idempotency-key", long_256.as_str())],
        vec![("idempotency-key", quoted_256.as_str())],
    ];
    for headers in &malformed {
        for path in ["/keys/bad", "/strict/bad"] {
            let resp = raw(&idem, "POST", path, headers, b"x=1").await;
            assert_eq!(resp.status, 400, "{path} {headers:?}: {resp:#?}");
            resp.assert_problem(400, "key-malformed");
        }
    }
    assert_eq!(backend.counts("/keys/bad"), Counts::default());
    assert_eq!(backend.counts("/strict/bad"), Counts::default());

    // 255 bytes is the longest key, and it works.
    let long_255 = "k".repeat(255);
    let first = post_key(&idem, "/keys/long", &long_255).await;
    first.assert_stored_leader();
    let again = post_key(&idem, "/keys/long", &long_255).await;
    again.assert_replay();
    // A 255-byte key one byte different is another key.
    let other = format!("{}j", "k".repeat(254));
    let third = post_key(&idem, "/keys/long", &other).await;
    third.assert_stored_leader();
    assert_eq!(third.header("x-backend-call"), Some("2"));
    assert_eq!(
        backend.settled("/keys/long").await,
        Counts {
            started: 2,
            completed: 2,
            aborted: 0
        }
    );

    // An RFC 8941 string and the bare token with the same value are one key.
    let quoted = post_key(&idem, "/keys/same", "\"abc\"").await;
    quoted.assert_stored_leader();
    let bare = post_key(&idem, "/keys/same", "abc").await;
    bare.assert_replay();
    assert_eq!(bare.body, quoted.body);
    assert_eq!(backend.settled("/keys/same").await, ONE_CALL);

    // A string may hold what a token may not: spaces, escaped quotes.
    for (i, key) in [r#""a b""#, r#""say \"hi\"""#].into_iter().enumerate() {
        let path = format!("/keys/string{i}");
        let first = post_key(&idem, &path, key).await;
        assert_eq!(first.status, 200, "{key}: {first:#?}");
        first.assert_stored_leader();
        post_key(&idem, &path, key).await.assert_replay();
        assert_eq!(backend.settled(&path).await, ONE_CALL, "{key}");
    }
}

/// Gateways in the field (Kong, open-banking APIs) send `X-Idempotency-Key`: with
/// `key_header` set, that header is the key, and the problems name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_key_header_carries_the_key_and_names_itself_in_problems() {
    const N: usize = 50;
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("dedup.key_header", "X-Idempotency-Key")
        .route(Route::new("strict", "/strict/", "require-key"));
    let idem = Idem::start(&config.to_string()).await;

    // Concurrent requests with the configured header: one execution.
    let gate = backend.gate("/pay");
    let mut calls = JoinSet::new();
    for _ in 0..N {
        let headers = vec![("x-idempotency-key".to_string(), "pay-7".to_string())];
        calls.spawn(raw_owned(
            idem.addr(),
            "/pay".into(),
            headers,
            b"amount=5".to_vec(),
        ));
    }
    gate.wait_started(1).await;
    wait_metric(&idem, "idem_waiters", (N - 1) as f64).await;
    assert_eq!(gate.arrived(), 1, "a second call reached the backend");
    gate.open();
    let mut seen = Vec::new();
    while let Some(r) = calls.join_next().await {
        seen.push(r.expect("request task"));
    }
    assert!(seen
        .iter()
        .all(|s| s.status == 200 && s.header("x-backend-call") == Some("1")));
    assert_eq!(
        seen.iter()
            .filter(|s| s.cache_status() == "idem; fwd=uri-miss; stored")
            .count(),
        1
    );
    assert_eq!(backend.settled("/pay").await, ONE_CALL);
    // Forwarded as it came, like `Idempotency-Key` by default.
    let forwarded = backend.requests("/pay");
    assert_eq!(forwarded[0].header("x-idempotency-key"), Some("pay-7"));
    let again = raw(
        &idem,
        "POST",
        "/pay",
        &[("x-idempotency-key", "\"pay-7\"")],
        b"amount=5",
    )
    .await;
    again.assert_replay();

    // Malformed: 400 naming the configured header.
    for (headers, detail) in [
        (
            vec![("x-idempotency-key", "a b")],
            "The X-Idempotency-Key must be a quoted string or a token of visible ASCII without quotes, commas or spaces.",
        ),
        (
            vec![("x-idempotency-key", "k"), ("x-idempotency-key", "k")],
            "The X-Idempotency-Key header must appear once.",
        ),
    ] {
        let r = raw(&idem, "POST", "/bad", &headers, b"x=1").await;
        r.assert_problem(400, "key-malformed");
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["title"], "Malformed X-Idempotency-Key", "{json}");
        assert_eq!(json["detail"], detail, "{json}");
    }
    let r = raw(
        &idem,
        "POST",
        "/strict/x",
        &[("idempotency-key", "k")],
        b"x=1",
    )
    .await;
    r.assert_problem(400, "missing-key");
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        json["detail"],
        "This route requires an X-Idempotency-Key header."
    );
    assert_eq!(backend.counts("/bad"), Counts::default());
    assert_eq!(backend.counts("/strict/x"), Counts::default());

    // `Idempotency-Key` is an ordinary header here: keyless, so passed through each time.
    for _ in 0..2 {
        let r = raw(&idem, "POST", "/plain", &[("idempotency-key", "k")], b"x=1").await;
        assert_eq!(r.cache_status(), "idem; fwd=bypass", "{r:#?}");
    }
    assert_eq!(backend.counts("/plain").started, 2);
}

#[tokio::test]
async fn configured_scope_and_fingerprint_headers_decide_what_is_shared() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(
        Route::new("tenants", "/t/", "fingerprint")
            .set("scope_headers", vec!["X-Tenant"])
            .set("fingerprint_headers", vec!["Content-Type", "X-Api-Version"]),
    );
    let idem = Idem::start(&config.to_string()).await;
    let path = "/t/report";
    let send =
        |headers: &'static [(&'static str, &'static str)]| raw(&idem, "POST", path, headers, b"q");
    // (headers, expected call whose response is served)
    let cases: [(&[(&str, &str)], &str); 9] = [
        (&[("x-tenant", "a"), ("x-api-version", "1")], "1"),
        (&[("x-tenant", "b"), ("x-api-version", "1")], "2"),
        (&[("x-tenant", "a"), ("x-api-version", "2")], "3"),
        (&[("x-tenant", "a")], "4"),
        (&[("x-tenant", "a"), ("x-api-version", "")], "5"),
        (&[("x-api-version", "1")], "6"),
        // Header names are case-insensitive, in the config and on the wire.
        (&[("X-TENANT", "a"), ("X-Api-VERSION", "1")], "1"),
        // Authorization is no longer part of the scope on this route.
        (
            &[
                ("x-tenant", "b"),
                ("x-api-version", "1"),
                ("authorization", "Bearer z"),
            ],
            "2",
        ),
        (&[("x-tenant", "a"), ("x-api-version", "")], "5"),
    ];
    let mut calls = 0;
    for (headers, call) in cases {
        let resp = send(headers).await;
        assert_eq!(resp.header("x-backend-call"), Some(call), "{headers:?}");
        if call.parse::<u64>().unwrap() > calls {
            calls += 1;
            resp.assert_stored_leader();
        } else {
            resp.assert_replay();
        }
    }
    assert_eq!(
        backend.settled(path).await,
        Counts {
            started: 6,
            completed: 6,
            aborted: 0
        }
    );
}

// ---------------------------------------------------------------------------
// 6. h2c
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_are_coalesced_too() {
    const N: usize = 20;
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("grpcish", "/rpc/", "fingerprint"));
    let idem = Idem::start(&config.to_string()).await;
    let path = "/rpc/Create";
    let gate = backend.gate(path);
    let http = h2c_client();
    let mut calls = JoinSet::new();
    for _ in 0..N {
        let req = http
            .post(idem.url(path))
            .header("content-type", "application/json")
            .body(r#"{"item":"widget"}"#);
        calls.spawn(async move {
            let resp = req.send().await.expect("h2c send");
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            Seen::from_reqwest(resp).await
        });
    }
    gate.wait_started(1).await;
    wait_metric(&idem, "idem_waiters", (N - 1) as f64).await;
    gate.open();
    let mut seen = Vec::new();
    while let Some(r) = calls.join_next().await {
        seen.push(r.unwrap());
    }
    assert_eq!(backend.settled(path).await, ONE_CALL);
    let stored = seen
        .iter()
        .filter(|s| s.header("cache-status") == Some("idem; fwd=uri-miss; stored"))
        .count();
    assert_eq!(stored, 1);
    for s in &seen {
        assert_eq!(s.status, 200);
        assert_eq!(s.body, r#"{"path":"/rpc/Create","call":1}"#);
        if s.header("cache-status") != Some("idem; fwd=uri-miss; stored") {
            s.assert_collapsed();
        }
    }

    let replay = http
        .post(idem.url(path))
        .header("content-type", "application/json")
        .body(r#"{"item":"widget"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.version(), reqwest::Version::HTTP_2);
    let replay = Seen::from_reqwest(replay).await;
    replay.assert_replay();
    assert_eq!(replay.body, r#"{"path":"/rpc/Create","call":1}"#);
    assert_eq!(backend.settled(path).await, ONE_CALL);
}

/// Stored responses and idem's own answers are built without Pingora's header-case map
/// (src/respond.rs): on the wire, standard names must still be titled as upstream
/// responses are, and idem's own names stay lowercase.
#[tokio::test]
async fn replayed_head_on_the_wire_titles_standard_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start().await;
    let idem = Idem::start(&config_for(b.addr())).await;
    let request = http_request(
        "POST",
        "/wire",
        &[("idempotency-key", "wire-1"), ("connection", "close")],
        b"x",
    );
    let mut heads = Vec::new();
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(idem.addr()).await.unwrap();
        conn.write_all(&request).await.unwrap();
        let mut bytes = Vec::new();
        conn.read_to_end(&mut bytes).await.unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let head = text.split("\r\n\r\n").next().unwrap().to_string();
        heads.push(head);
    }
    assert_eq!(b.counts("/wire").started, 1);
    let replay = &heads[1];
    for line in [
        "\r\nContent-Length: ",
        "\r\nAge: ",
        "\r\nidempotent-replayed: true",
        "\r\ncache-status: idem; hit; ttl=",
    ] {
        assert!(
            replay.contains(line),
            "{line:?} not in the replay:\n{replay}"
        );
    }
    assert!(
        heads[0].contains("\r\nContent-Length: ")
            && heads[0].contains("\r\ncache-status: idem; fwd=uri-miss; stored"),
        "leader:\n{}",
        heads[0]
    );
}
