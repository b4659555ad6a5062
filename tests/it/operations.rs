//! Reload, shadow mode, the admin listener and packaging.
//!
//! Every test starts its own backend and its own idem on ephemeral ports. Waits are
//! event-driven with a bound ([`WAIT_TIMEOUT`]): a reload is seen by its log line, a call at
//! the origin by the backend's gate, and a counter or gauge by bounded polling of the metrics
//! (or admin) endpoint, which is recorded just after the response.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_idem");

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One response, read to the end.
struct Answer {
    status: u16,
    body: String,
    cache_status: Option<String>,
    replayed: Option<String>,
    backend_call: Option<String>,
}

async fn read(resp: reqwest::Response) -> Answer {
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let cache_status = header("cache-status");
    let replayed = header("idempotent-replayed");
    let backend_call = header("x-backend-call");
    let status = resp.status().as_u16();
    Answer {
        status,
        body: resp.text().await.unwrap(),
        cache_status,
        replayed,
        backend_call,
    }
}

/// POSTs `body` to `url`, with `headers`.
async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = client().post(url).body(body.to_owned());
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    read(req.send().await.expect("response")).await
}

fn spawn_post(url: String, headers: &[(&str, &str)], body: &str) -> JoinHandle<Answer> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let body = body.to_owned();
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        post(&url, &h, &body).await
    })
}

async fn admin_get(idem: &Idem, path: &str) -> Value {
    let resp = client().get(idem.admin_url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

async fn admin_delete(idem: &Idem, path: &str) -> (u16, Value) {
    let resp = client().delete(idem.admin_url(path)).send().await.unwrap();
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
    )
}

/// Polls `GET path` on the admin listener until `pred` holds.
async fn wait_admin(idem: &Idem, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let v = admin_get(idem, path).await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "admin {path} never matched within {WAIT_TIMEOUT:?}; last: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `ttl=N` of a replay's `Cache-Status`.
fn replay_ttl(a: &Answer) -> u64 {
    let cs = a
        .cache_status
        .as_deref()
        .expect("a replay has Cache-Status");
    cs.split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .unwrap_or_else(|| panic!("no ttl in {cs:?}"))
        .parse()
        .unwrap()
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

// ---------------------------------------------------------------------------------------
// 1. Reload (SIGHUP)
// ---------------------------------------------------------------------------------------

/// SIGHUP re-reads the file: a route's mode and ttl change for new requests, a new route gets
/// its metric series, while a call in flight completes (and a waiter that joined it after the
/// reload gets its answer) and a response stored before the reload is still replayed with
/// its original retention.
#[tokio::test]
async fn reload_changes_modes_and_ttls_for_new_requests_and_keeps_flights_and_stored_keys() {
    let backend = Backend::start().await;
    let before = Config::new(backend.addr()).route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&before.to_string()).await;
    let url = |p: &str| idem.url(p);

    // Stored before the reload, with the default 24h ttl.
    let stored = post(&url("/api/stored"), &[("idempotency-key", "s-1")], "a=1").await;
    assert_eq!(stored.status, 200);
    assert_eq!(
        stored.cache_status.as_deref(),
        Some("idem; fwd=uri-miss; stored")
    );
    // Keyless on a keyed route: passed through, every time.
    for _ in 0..2 {
        let a = post(&url("/api/free"), &[], "n=1").await;
        assert_eq!(a.cache_status.as_deref(), Some("idem; fwd=bypass"));
    }
    // A call in flight across the reload.
    let gate = backend.gate("/api/slow");
    let leader = spawn_post(url("/api/slow"), &[("idempotency-key", "f-1")], "b=1");
    gate.wait_started(1).await;

    let after = Config::new(backend.addr())
        .route(
            Route::new("api", "/api/", "fingerprint")
                .set("ttl", "1h")
                .set("fingerprint_ttl", "1h"),
        )
        .route(Route::new("orders", "/orders/", "require-key"));
    idem.write_config(&after.to_string());
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("SIGHUP: configuration reloaded from")
        .await;
    assert!(
        idem.stderr_text()
            .contains(&idem.config_path().display().to_string()),
        "the reload line names the file:\n{}",
        idem.stderr_text()
    );

    // A waiter that arrives after the reload joins the call started before it.
    let waiter = spawn_post(url("/api/slow"), &[("idempotency-key", "f-1")], "b=1");
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    let (leader, waiter) = (leader.await.unwrap(), waiter.await.unwrap());
    assert_eq!((leader.status, waiter.status), (200, 200));
    assert_eq!(leader.body, r#"{"path":"/api/slow","call":1}"#);
    assert_eq!(waiter.body, leader.body);
    assert_eq!(waiter.replayed.as_deref(), Some("true"));

    // The response stored before the reload is replayed, with its original 24h retention.
    let again = post(&url("/api/stored"), &[("idempotency-key", "s-1")], "a=1").await;
    assert_eq!(again.body, r#"{"path":"/api/stored","call":1}"#);
    assert!(replay_ttl(&again) > 3600, "{:?}", again.cache_status);

    // New requests get the new mode (keyless requests are deduplicated) and the new ttl.
    let first = post(&url("/api/free"), &[], "n=2").await;
    let second = post(&url("/api/free"), &[], "n=2").await;
    assert_eq!(
        first.cache_status.as_deref(),
        Some("idem; fwd=uri-miss; stored")
    );
    assert_eq!(second.body, r#"{"path":"/api/free","call":3}"#);
    assert!(replay_ttl(&second) <= 3600, "{:?}", second.cache_status);
    let keyed = post(&url("/api/new"), &[("idempotency-key", "n-1")], "c=1").await;
    assert_eq!(keyed.status, 200);
    let keyed = post(&url("/api/new"), &[("idempotency-key", "n-1")], "c=1").await;
    assert_eq!(keyed.replayed.as_deref(), Some("true"));
    assert!(replay_ttl(&keyed) <= 3600, "{:?}", keyed.cache_status);

    // The route added by the reload is in force and has its series.
    let orders = post(&url("/orders/1"), &[], "x=1").await;
    assert_eq!(orders.status, 400, "{}", orders.body);
    wait_metric(
        &idem,
        r#"idem_requests_total{outcome="missing_key",route="orders"}"#,
        1.0,
    )
    .await;
    let text = scrape(&idem).await;
    assert_eq!(
        sample(
            &text,
            r#"idem_requests_total{outcome="leader",route="orders"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"idem_requests_total{outcome="leader",route="api"}"#
        ),
        Some(4.0),
        "stored, slow, free and new led one call each"
    );

    assert_eq!(backend.settled("/api/slow").await.completed, 1);
    assert_eq!(backend.settled("/api/stored").await.completed, 1);
    assert_eq!(backend.settled("/api/free").await.completed, 3);
    assert_eq!(backend.settled("/api/new").await.completed, 1);
    assert_eq!(backend.counts("/orders/1").started, 0);
}

/// An invalid file is refused as a whole: the error names the file and line, and the running
/// configuration stays in force (here: the route stays `keyed`, although the refused file
/// also switched it to `fingerprint`).
#[tokio::test]
async fn invalid_reload_is_refused_with_file_and_line_and_the_old_config_kept() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr()).route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;

    let bad = Config::new(backend.addr())
        .route(Route::new("api", "/api/", "fingerprint").set("ttl", "24"))
        .to_string();
    let line = bad
        .lines()
        .position(|l| l == "ttl = \"24\"")
        .expect("the bad line is in the file")
        + 1;
    idem.write_config(&bad);
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("configuration reload refused").await;
    let where_ = format!("{}:{line}:", idem.config_path().display());
    let stderr = idem.stderr_text();
    assert!(
        stderr.contains(&where_) && stderr.contains("24h"),
        "expected {where_:?} and the duration hint in:\n{stderr}"
    );
    assert!(!stderr.contains("configuration reloaded from"), "{stderr}");

    // Still keyed: keyless requests pass through, each one executed.
    for call in 1..=2 {
        let a = post(&idem.url("/api/x"), &[], "same").await;
        assert_eq!(a.cache_status.as_deref(), Some("idem; fwd=bypass"));
        assert_eq!(a.body, format!(r#"{{"path":"/api/x","call":{call}}}"#));
    }
    assert_eq!(backend.settled("/api/x").await.completed, 2);
    assert_eq!(idem.exit_status(), None);
}

/// Settings fixed at start-up are compared on reload: a change is logged by name and the
/// running value kept, while the rest of the file is applied.
#[tokio::test]
async fn reload_keeps_restart_only_settings_and_names_them() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("store.max_entries", 1000)
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    assert!(
        !idem.stdout_text().contains("admin="),
        "the admin listener is off unless configured: {}",
        idem.stdout_text()
    );

    let changed = Config::new(backend.addr())
        .set("store.max_entries", 5)
        .set("upstream.read_timeout", "9s")
        .set("server.max_waiters", 7)
        .route(Route::new("api", "/api/", "fingerprint"));
    idem.write_config(&changed.to_string());
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("configuration reloaded from").await;
    idem.wait_stderr("upstream.read_timeout, store.max_entries changed in")
        .await;

    let text = scrape(&idem).await;
    assert_eq!(sample(&text, "idem_store_max_entries"), Some(1000.0));
    assert_eq!(sample(&text, "idem_max_waiters"), Some(7.0), "reloadable");
    // The new mode is in force.
    let first = post(&idem.url("/api/y"), &[], "same").await;
    let second = post(&idem.url("/api/y"), &[], "same").await;
    assert_eq!(first.status, 200);
    assert_eq!(second.replayed.as_deref(), Some("true"));
    assert_eq!(backend.settled("/api/y").await.completed, 1);
}

// ---------------------------------------------------------------------------------------
// 2. Shadow mode
// ---------------------------------------------------------------------------------------

/// A shadow route forwards every request untouched (every one executes, no idem header on
/// the response) and counts what it would have collapsed (same key in flight) and replayed
/// (same key completed with a stored status, within retention), for keyed and keyless
/// requests alike.
#[tokio::test]
async fn shadow_route_forwards_everything_and_counts_would_be_duplicates_exactly() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .route(Route::new("shadow", "/s/", "shadow"))
        .route(Route::new("off", "/o/", "off"))
        .to_string();
    let idem = Idem::start(&config).await;
    let url = idem.url("/s/orders");
    let bypass = r#"idem_requests_total{outcome="bypass",route="shadow"}"#;
    let collapsed = r#"idem_shadow_duplicates_total{kind="collapsed",route="shadow"}"#;
    let replayed = r#"idem_shadow_duplicates_total{kind="replayed",route="shadow"}"#;

    // While the first call of each key is held at the origin, identical requests arrive.
    let gate = backend.gate("/s/orders");
    let mut calls = vec![spawn_post(url.clone(), &[], "item=1")]; // leader (fingerprint)
    gate.wait_started(1).await;
    calls.push(spawn_post(url.clone(), &[], "item=1")); // collapsed
    calls.push(spawn_post(url.clone(), &[], "item=1")); // collapsed
    gate.wait_started(3).await;
    calls.push(spawn_post(
        url.clone(),
        &[("idempotency-key", "k-1")],
        "item=2",
    )); // leader (key)
    gate.wait_started(4).await;
    calls.push(spawn_post(
        url.clone(),
        &[("idempotency-key", "k-1")],
        "item=2",
    )); // collapsed
    calls.push(spawn_post(
        url.clone(),
        &[("idempotency-key", "k-1")],
        "item=9",
    )); // 422: neither
    calls.push(spawn_post(url.clone(), &[], "item=3")); // another leader
    gate.wait_started(7).await;
    gate.open();
    let mut seen_calls = Vec::new();
    for c in calls {
        let a = c.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.cache_status, None, "shadow adds no header");
        assert_eq!(a.replayed, None, "shadow adds no header");
        seen_calls.push(a.backend_call.expect("from the backend"));
    }
    seen_calls.sort_by_key(|c| c.parse::<u32>().unwrap());
    assert_eq!(seen_calls, ["1", "2", "3", "4", "5", "6", "7"]);
    // The leaders' responses settle their keys no later than their requests are counted.
    wait_metric(&idem, bypass, 7.0).await;

    // Later identical requests: within retention, with a stored status.
    for (headers, body) in [
        (&[][..], "item=1"),
        (&[("idempotency-key", "k-1")][..], "item=2"),
    ] {
        let a = post(&url, headers, body).await;
        assert_eq!((a.status, a.cache_status, a.replayed), (200, None, None));
    }
    // Not storable (500): the key would be free again, so a retry counts as neither.
    let error_url = idem.url("/s/error");
    let a = post(&error_url, &[("x-status", "500")], "e=1").await;
    assert_eq!(a.status, 500);
    wait_metric(&idem, bypass, 10.0).await;
    let a = post(&error_url, &[("x-status", "500")], "e=1").await;
    assert_eq!(a.status, 500);
    // Not eligible (GET): not hashed.
    let a = read(client().get(&url).send().await.unwrap()).await;
    assert_eq!((a.status, a.cache_status), (200, None));
    wait_metric(&idem, bypass, 12.0).await;

    let text = scrape(&idem).await;
    assert_eq!(sample(&text, collapsed), Some(3.0));
    assert_eq!(sample(&text, replayed), Some(2.0));
    assert_eq!(
        sample(
            &text,
            r#"idem_upstream_requests_total{class="2xx",route="shadow"}"#
        ),
        Some(0.0),
        "shadow requests take the pass-through path, not a leader call"
    );
    assert_eq!(backend.settled("/s/orders").await.completed, 10);
    assert_eq!(backend.settled("/s/error").await.completed, 2);

    // The backend sees a shadow request exactly as it sees one on an `off` route.
    let a = post(&idem.url("/o/orders"), &[], "item=1").await;
    assert_eq!((a.status, a.cache_status), (200, None));
    let names = |r: &RecordedRequest| {
        let mut n: Vec<String> = r.headers.iter().map(|(n, _)| n.clone()).collect();
        n.sort();
        n
    };
    let shadowed = &backend.requests("/s/orders")[0];
    let off = &backend.requests("/o/orders")[0];
    assert_eq!(names(shadowed), names(off));
    assert_eq!(shadowed.body, off.body);
}

// ---------------------------------------------------------------------------------------
// 3. Admin listener
// ---------------------------------------------------------------------------------------

/// The admin listener lists keys in flight (with their waiters) and held keys, summarises the
/// store, and purges one stored key, after which its next request executes again. Keys in
/// flight or held cannot be purged.
#[tokio::test]
async fn admin_lists_flights_and_held_keys_summarises_the_store_and_purges_one_key() {
    let backend = Backend::start().await;
    let config = Config::new(backend.addr())
        .set("admin.listen", "127.0.0.1:0")
        .route(Route::new("api", "/api/", "keyed"))
        .to_string();
    let idem = Idem::start(&config).await;
    assert_ne!(idem.admin_addr(), idem.metrics_addr());
    assert_eq!(admin_get(&idem, "/flights").await, serde_json::json!([]));

    // One call in flight with one waiter.
    let gate = backend.gate("/api/slow");
    let leader = spawn_post(idem.url("/api/slow"), &[("idempotency-key", "a-1")], "x=1");
    gate.wait_started(1).await;
    let waiter = spawn_post(idem.url("/api/slow"), &[("idempotency-key", "a-1")], "x=1");
    let flights = wait_admin(&idem, "/flights", |v| v[0]["waiters"] == 1).await;
    let list = flights.as_array().unwrap();
    assert_eq!(list.len(), 1, "{flights}");
    assert_eq!(list[0]["route"], "api");
    assert!(list[0]["age_ms"].as_u64().is_some(), "{flights}");
    let key = list[0]["key"].as_str().unwrap().to_owned();
    assert_eq!(key.len(), 12, "{flights}");
    let (status, body) = admin_delete(&idem, &format!("/keys/{key}")).await;
    assert_eq!(status, 409, "in flight: {body}");

    // A held key: the upstream answered 502, so the call may still run behind it.
    let bad = post(
        &idem.url("/api/bad"),
        &[("idempotency-key", "h-1"), ("x-status", "502")],
        "y=1",
    )
    .await;
    assert_eq!(bad.status, 502, "{}", bad.body);
    let held = admin_get(&idem, "/held").await;
    let held = held.as_array().unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["status"], 502);
    let remaining = held[0]["expires_in_ms"].as_u64().unwrap();
    assert!(
        remaining > 0 && remaining <= 15_000,
        "total_timeout is 15s: {remaining}"
    );
    let held_key = held[0]["key"].as_str().unwrap().to_owned();
    let (status, body) = admin_delete(&idem, &format!("/keys/{held_key}")).await;
    assert_eq!(status, 409, "held: {body}");

    gate.open();
    assert_eq!(leader.await.unwrap().status, 200);
    assert_eq!(waiter.await.unwrap().replayed.as_deref(), Some("true"));
    let store = admin_get(&idem, "/store").await;
    assert_eq!(store["kind"], "memory");
    assert_eq!(store["entries"], 2, "{store}");
    assert_eq!(store["held"], 1, "{store}");
    assert_eq!(store["reserved"], 0, "{store}");
    assert!(store["bytes"].as_u64().unwrap() > 0, "{store}");
    assert_eq!(store["max_entries"], 100_000);
    assert_eq!(store["evictions"]["capacity"], 0);
    assert_eq!(admin_get(&idem, "/flights").await, serde_json::json!([]));

    // Stored: replayed until purged, then executed again.
    let replay = post(&idem.url("/api/slow"), &[("idempotency-key", "a-1")], "x=1").await;
    assert_eq!(replay.replayed.as_deref(), Some("true"));
    let (status, body) = admin_delete(&idem, &format!("/keys/{key}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"], key.as_str());
    assert_eq!(body["kind"], "response");
    let (status, _) = admin_delete(&idem, &format!("/keys/{key}")).await;
    assert_eq!(status, 404, "already purged");
    let fresh = post(&idem.url("/api/slow"), &[("idempotency-key", "a-1")], "x=1").await;
    assert_eq!(fresh.body, r#"{"path":"/api/slow","call":2}"#);
    assert_eq!(fresh.replayed, None);
    assert_eq!(backend.settled("/api/slow").await.completed, 2);

    // Malformed names and other paths.
    assert_eq!(admin_delete(&idem, "/keys/abc").await.0, 400);
    assert_eq!(admin_delete(&idem, "/keys/zzzzzzzzzzzz").await.0, 400);
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(client().get(idem.admin_url("/nope")).send().await.unwrap()),
        404
    );
    assert_eq!(
        status(
            client()
                .post(idem.admin_url("/flights"))
                .send()
                .await
                .unwrap()
        ),
        405
    );
    // The admin app is not on the metrics listener.
    assert_eq!(
        status(
            client()
                .get(idem.metrics_url("/flights"))
                .send()
                .await
                .unwrap()
        ),
        404
    );
}

/// The admin listener only listens on loopback: anything else is refused by `idem check`.
#[tokio::test]
async fn admin_listener_on_a_public_address_is_refused() {
    let config = Config::new(free_addr())
        .set("admin.listen", "0.0.0.0:9465")
        .to_string();
    let (code, _, stderr) = Idem::check(&config).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("admin.listen") && stderr.contains("loopback"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Packaging
// ---------------------------------------------------------------------------------------

/// `idem --print-default-config` prints the shipped proxy.toml, and that passes `idem check`.
#[tokio::test]
async fn print_default_config_prints_the_shipped_file_which_passes_check() {
    let out = tokio::process::Command::new(BIN)
        .arg("--print-default-config")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let shipped = std::fs::read_to_string(repo_file("proxy.toml")).unwrap();
    assert_eq!(printed, shipped);
    let (code, stdout, stderr) = Idem::check(&printed).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// The systemd unit gives SIGTERM's drain more time than the shipped grace period, reloads
/// with SIGHUP after a check, and runs what the Containerfile builds.
#[test]
fn systemd_unit_covers_the_grace_period_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(repo_file("packaging/idem.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect()
    };
    let stop: u64 = value("TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let shipped: toml::Table = std::fs::read_to_string(repo_file("proxy.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let grace: u64 = shipped["server"]["grace_period"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop > grace,
        "TimeoutStopSec={stop} must exceed grace_period={grace}s"
    );
    let reload = value("ExecReload");
    assert!(reload.iter().any(|r| r.contains(" check ")), "{reload:?}");
    assert!(
        reload.iter().any(|r| r.contains("-HUP $MAINPID")),
        "{reload:?}"
    );
    let start = &value("ExecStart")[0];
    let containerfile = std::fs::read_to_string(repo_file("packaging/Containerfile")).unwrap();
    let binary = start.split_whitespace().next().unwrap();
    assert!(
        containerfile.contains(binary),
        "the container installs {binary} like the unit expects"
    );
}
