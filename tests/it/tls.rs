//! TLS at the edge and towards the app (issue 15): a `[server.tls]` listener beside the
//! cleartext one (HTTP/1.1 and h2 by ALPN, `X-Forwarded-Proto: https`, certificates renewed
//! by SIGHUP), `https://` backends verified against `tls_ca` (nginx with TLS in front of the
//! test backend), and `idem check` on the files. Certificates are made with `openssl` at
//! test time ([`Pki`]).

use std::net::SocketAddr;

use crate::support::*;

/// A private CA `ca` with the server leaf `edge` (serial 1001) for 127.0.0.1 and localhost.
fn edge_pki() -> Pki {
    let pki = Pki::new();
    pki.ca("ca").leaf(Leaf::server("edge", "ca", 1001));
    pki
}

/// `config` with a TLS listener on a free port presenting `<leaf>.pem`.
fn with_tls(config: Config, pki: &Pki, leaf: &str) -> Config {
    config
        .set("server.tls.listen", "127.0.0.1:0")
        .set(
            "server.tls.cert",
            pki.path(&format!("{leaf}.pem")).display().to_string(),
        )
        .set(
            "server.tls.key",
            pki.path(&format!("{leaf}.key")).display().to_string(),
        )
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://{addr}{path}")
}

/// curl over TLS, HTTP/1.1 and then h2 (ALPN), both reach the backend, which sees
/// `X-Forwarded-Proto: https`; the cleartext listener still says `http`.
#[tokio::test]
async fn curl_over_tls_speaks_http1_and_h2_by_alpn() {
    let backend = Backend::start().await;
    let pki = edge_pki();
    let idem = Idem::start(&with_tls(Config::new(backend.addr()), &pki, "edge").to_string()).await;
    let ca = pki.path("ca.pem");

    let h1 = curl_tls(&https(idem.tls_addr(), "/a"), &ca, &["--http1.1"]).await;
    assert_eq!(
        (h1.status, h1.http_version.as_str()),
        (200, "1.1"),
        "{}",
        h1.headers
    );
    assert_eq!(h1.body, r#"{"path":"/a","call":1}"#);
    let h2 = curl_tls(&https(idem.tls_addr(), "/b"), &ca, &["--http2"]).await;
    assert_eq!(
        (h2.status, h2.http_version.as_str()),
        (200, "2"),
        "{}",
        h2.headers
    );
    assert_eq!(h2.body, r#"{"path":"/b","call":1}"#);
    // A keyed POST over h2 is deduplicated like any other.
    for call in 0..2 {
        let r = curl_tls(
            &https(idem.tls_addr(), "/c"),
            &ca,
            &["--http2", "-H", "idempotency-key: tls-1", "-d", "x=1"],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, r#"{"path":"/c","call":1}"#, "call {call}");
    }
    let plain = client().get(idem.url("/d")).send().await.unwrap();
    assert_eq!(plain.status(), 200);

    for (path, proto) in [
        ("/a", "https"),
        ("/b", "https"),
        ("/c", "https"),
        ("/d", "http"),
    ] {
        let seen = backend.requests(path);
        assert_eq!(seen.len(), 1, "{path}");
        assert_eq!(seen[0].header("x-forwarded-proto"), Some(proto), "{path}");
    }
    let line = idem.stdout_text();
    assert!(
        line.contains(&format!(" tls={} ", idem.tls_addr())),
        "the listening line names the TLS listener: {line}"
    );
    let ready = client()
        .get(idem.metrics_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

/// The handshake itself: TLS 1.3 with ALPN h2 preferred over http/1.1, the configured
/// certificate; a client that does not trust the CA fails its handshake and idem logs it
/// at debug only (no ERROR line per scanner).
#[tokio::test]
async fn alpn_prefers_h2_and_a_refused_handshake_is_quiet() {
    let backend = Backend::start().await;
    let pki = edge_pki();
    pki.ca("other");
    let idem = Idem::start(&with_tls(Config::new(backend.addr()), &pki, "edge").to_string()).await;
    let both = TlsClient::new(&pki.read("ca.pem"), &[b"h2", b"http/1.1"]);
    let c = both.connect(idem.tls_addr(), "localhost").await;
    assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(c.leaf, pki.der("edge"));
    let h1 = TlsClient::new(&pki.read("ca.pem"), &[b"http/1.1"]);
    assert_eq!(
        h1.connect(idem.tls_addr(), "localhost")
            .await
            .alpn
            .as_deref(),
        Some(&b"http/1.1"[..])
    );
    let stranger = TlsClient::new(&pki.read("other.pem"), &[]);
    let refused = stranger.try_connect(idem.tls_addr(), "localhost").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{:?}",
        refused.err()
    );
    // Still serving, and nothing above INFO about the refused handshake.
    let r = h1
        .request(
            idem.tls_addr(),
            &http_request(
                "GET",
                "/x",
                &[("host", "localhost"), ("connection", "close")],
                b"",
            ),
        )
        .await;
    assert_eq!(r.status, 200);
    let log = idem.stderr_text();
    assert!(
        !log.contains("ERROR") && !log.contains("handshake"),
        "a failed client handshake is not worth a line above debug:\n{log}"
    );
}

/// 20 concurrent keyed POSTs, each on its own TLS connection: one execution, 20 identical
/// answers.
#[tokio::test]
async fn concurrent_keyed_posts_over_tls_execute_once() {
    const N: usize = 20;
    let backend = Backend::start().await;
    let gate = backend.gate("/pay");
    let pki = edge_pki();
    let idem = Idem::start(&with_tls(Config::new(backend.addr()), &pki, "edge").to_string()).await;
    let tls = std::sync::Arc::new(TlsClient::new(&pki.read("ca.pem"), &[b"http/1.1"]));
    let addr = idem.tls_addr();
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let tls = tls.clone();
            tokio::spawn(async move {
                let req = http_request(
                    "POST",
                    "/pay",
                    &[
                        ("host", "localhost"),
                        ("idempotency-key", "tls-pay-1"),
                        ("connection", "close"),
                    ],
                    b"amount=5",
                );
                tls.request(addr, &req).await
            })
        })
        .collect();
    gate.wait_started(1).await;
    wait_metric(&idem, "idem_waiters", (N - 1) as f64).await;
    gate.open();
    let mut leaders = 0;
    for call in calls {
        let r = call.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), r#"{"path":"/pay","call":1}"#);
        if r.header("idempotent-replayed").is_none() {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1);
    assert_eq!(
        backend.settled("/pay").await,
        Counts {
            started: 1,
            completed: 1,
            aborted: 0
        }
    );
}

/// nginx terminating TLS (a certificate from `ca_name`'s CA) in front of the test backend.
async fn tls_backend(pki: &Pki, leaf: &str, app: SocketAddr, extra: &str) -> Nginx {
    Nginx::start_tls(&format!(
        "        ssl_certificate {};
        ssl_certificate_key {};
        {extra}
        location / {{ proxy_pass http://{app}; proxy_set_header Host $host; }}",
        pki.path(&format!("{leaf}.pem")).display(),
        pki.path(&format!("{leaf}.key")).display(),
    ))
    .await
}

fn keyed_post(path: &str, key: &str) -> Vec<u8> {
    http_request(
        "POST",
        path,
        &[("host", "localhost"), ("idempotency-key", key)],
        b"x=1",
    )
}

fn https_backend(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// An `https://` backend verified against `tls_ca`: leaders (idem's own connections) and
/// pass-through (Pingora's) both reach it; with `tls_server_name` naming another host, the
/// name check fails and nothing is sent.
#[tokio::test]
async fn an_https_backend_is_verified_against_tls_ca() {
    let app = Backend::start().await;
    let pki = edge_pki();
    pki.leaf(Leaf {
        name: "client",
        ca: "ca",
        serial: 7,
        days: 2,
        san: "DNS:idem",
        usage: "clientAuth",
    });
    // The backend asks for a client certificate from the same CA (mTLS).
    let nginx = tls_backend(
        &pki,
        "edge",
        app.addr(),
        &format!(
            "ssl_client_certificate {}; ssl_verify_client on;",
            pki.path("ca.pem").display()
        ),
    )
    .await;
    let config = Config::new(app.addr())
        .set("upstream.backends", vec![https_backend(nginx.addr())])
        .set("upstream.tls_ca", pki.path("ca.pem").display().to_string())
        .set(
            "upstream.tls_client_cert",
            pki.path("client.pem").display().to_string(),
        )
        .set(
            "upstream.tls_client_key",
            pki.path("client.key").display().to_string(),
        );
    let idem = Idem::start(&config.to_string()).await;
    for _ in 0..2 {
        let r = client()
            .post(idem.url("/orders"))
            .header("idempotency-key", "https-1")
            .body("x=1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), r#"{"path":"/orders","call":1}"#);
    }
    let r = client().get(idem.url("/list")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"path":"/list","call":1}"#);
    assert_eq!(app.counts("/orders").started, 1);

    // The same backend under a name its certificate does not carry.
    let wrong_name = Idem::start(
        &config
            .clone()
            .set("upstream.tls_server_name", "other.example")
            .to_string(),
    )
    .await;
    let r = raw_request(wrong_name.addr(), &keyed_post("/orders2", "https-2")).await;
    assert_problem(&r, 502, "upstream-unreachable");
    assert_eq!(app.counts("/orders2").started, 0);
}

/// A backend whose certificate another CA signed: a failure before anything was sent.
/// Leaders get 502 upstream-unreachable with the key freed (its retry is unreachable
/// again, not held), pass-through the same; the backend runs nothing, and the health check
/// says why in one WARN line.
#[tokio::test]
async fn a_backend_certificate_from_another_ca_is_unreachable_and_not_held() {
    let app = Backend::start().await;
    let pki = edge_pki();
    pki.ca("rogue").leaf(Leaf::server("impostor", "rogue", 66));
    let nginx = tls_backend(&pki, "impostor", app.addr(), "").await;
    let config = Config::new(app.addr())
        .set("upstream.backends", vec![https_backend(nginx.addr())])
        .set("upstream.tls_ca", pki.path("ca.pem").display().to_string())
        .set("upstream.health_check_interval", "200ms");
    let idem = Idem::start(&config.to_string()).await;
    for _ in 0..2 {
        let r = raw_request(idem.addr(), &keyed_post("/pay", "rogue-1")).await;
        assert_problem(&r, 502, "upstream-unreachable");
    }
    let get = http_request("GET", "/list", &[("host", "localhost")], b"");
    assert_problem(
        &raw_request(idem.addr(), &get).await,
        502,
        "upstream-unreachable",
    );
    assert_eq!(app.total().started, 0);
    assert_eq!(find_metric(&idem, "idem_held_keys").await, Some(0.0));
    idem.wait_stderr("backend is down").await;
    let log = idem.stderr_text();
    let down: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("backend is down"))
        .collect();
    assert_eq!(down.len(), 1, "{log}");
    assert!(
        down[0].contains("WARN") && down[0].contains("UnknownIssuer"),
        "{}",
        down[0]
    );
}

/// SIGHUP with replaced files: connections made after it see the new certificate (serial
/// 1002), a connection made before keeps working; then a broken key is refused with one
/// ERROR line and the running pair stays.
#[tokio::test]
async fn sighup_renews_the_certificate_and_refuses_a_broken_one() {
    let backend = Backend::start().await;
    let pki = edge_pki();
    pki.leaf(Leaf::server("renewed", "ca", 1002));
    // idem reads live.pem / live.key, which the test replaces.
    std::fs::copy(pki.path("edge.pem"), pki.path("live.pem")).unwrap();
    std::fs::copy(pki.path("edge.key"), pki.path("live.key")).unwrap();
    let idem = Idem::start(&with_tls(Config::new(backend.addr()), &pki, "live").to_string()).await;
    let tls = TlsClient::new(&pki.read("ca.pem"), &[b"http/1.1"]);
    let mut before = tls.connect(idem.tls_addr(), "localhost").await;
    assert_eq!(before.leaf, pki.der("edge"));

    std::fs::copy(pki.path("renewed.pem"), pki.path("live.pem")).unwrap();
    std::fs::copy(pki.path("renewed.key"), pki.path("live.key")).unwrap();
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("SIGHUP: configuration reloaded").await;
    let after = tls.connect(idem.tls_addr(), "localhost").await;
    assert_eq!(
        after.leaf,
        pki.der("renewed"),
        "a new connection sees serial 1002"
    );
    assert_ne!(after.leaf, before.leaf);
    before
        .conn
        .send(&http_request("GET", "/old", &[("host", "localhost")], b""))
        .await;
    assert_eq!(before.conn.read_response().await.status, 200);

    std::fs::write(
        pki.path("live.key"),
        "-----BEGIN PRIVATE KEY-----\nbroken\n",
    )
    .unwrap();
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("configuration reload refused").await;
    let log = idem.stderr_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains("ERROR") && refused[0].contains("server.tls.key"),
        "{}",
        refused[0]
    );
    let kept = tls.connect(idem.tls_addr(), "localhost").await;
    assert_eq!(kept.leaf, pki.der("renewed"), "the running pair stays");
}

/// Several certificates chosen by the name the client asks for (SNI); no match or no name:
/// the first.
#[tokio::test]
async fn certificates_are_chosen_by_sni() {
    let backend = Backend::start().await;
    let pki = edge_pki();
    pki.leaf(Leaf {
        name: "api",
        ca: "ca",
        serial: 2001,
        days: 2,
        san: "DNS:api.example,DNS:*.api.example",
        usage: "serverAuth",
    });
    let mut extra = toml::Table::new();
    extra.insert(
        "cert".into(),
        pki.path("api.pem").display().to_string().into(),
    );
    extra.insert(
        "key".into(),
        pki.path("api.key").display().to_string().into(),
    );
    let config = with_tls(Config::new(backend.addr()), &pki, "edge")
        .set("server.tls.certs", vec![toml::Value::Table(extra)]);
    let idem = Idem::start(&config.to_string()).await;
    let tls = TlsClient::new(&pki.read("ca.pem"), &[]);
    for (name, leaf) in [
        ("api.example", "api"),
        ("v2.api.example", "api"),
        ("localhost", "edge"),
        ("other.example", "edge"),
    ] {
        // Verification would fail for the fallback under a foreign name: only compare.
        let got = match tls.try_connect(idem.tls_addr(), name).await {
            Ok(c) => c.leaf,
            Err(e) => {
                assert!(e.contains("not valid for name"), "{name}: {e}");
                pki.der("edge")
            }
        };
        assert_eq!(got, pki.der(leaf), "{name}");
    }
}

/// `idem check` names what is wrong with the files, at their line; a certificate close to
/// its end and `tls_verify = false` are warnings.
#[tokio::test]
async fn idem_check_names_tls_file_problems() {
    let backend = Backend::start().await;
    let pki = edge_pki();
    pki.leaf(Leaf::server("other", "ca", 1003))
        .leaf(Leaf {
            days: -1,
            ..Leaf::server("expired", "ca", 1004)
        })
        .leaf(Leaf {
            days: 3,
            ..Leaf::server("soon", "ca", 1005)
        });
    let base = || with_tls(Config::new(backend.addr()), &pki, "edge");
    let (code, out, err) = Idem::check(&base().to_string()).await;
    assert_eq!(code, 0, "{out}{err}");

    let missing = base().set(
        "server.tls.cert",
        pki.path("nope.pem").display().to_string(),
    );
    let (code, _, err) = Idem::check(&missing.to_string()).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.tls.cert") && err.contains("nope.pem"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");

    let mismatched = base().set(
        "server.tls.key",
        pki.path("other.key").display().to_string(),
    );
    let (code, _, err) = Idem::check(&mismatched.to_string()).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.tls.key") && err.contains("does not go with"),
        "{err}"
    );

    let (code, _, err) =
        Idem::check(&with_tls(Config::new(backend.addr()), &pki, "expired").to_string()).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.tls.cert") && err.contains("expired on"),
        "{err}"
    );

    let (code, out, err) =
        Idem::check(&with_tls(Config::new(backend.addr()), &pki, "soon").to_string()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok"), "{out}");
    assert!(
        err.contains("WARN") && err.contains("server.tls.cert") && err.contains("expires on"),
        "{err}"
    );

    let insecure = Config::new(backend.addr())
        .set("upstream.backends", vec!["https://127.0.0.1:9".to_string()])
        .set("upstream.tls_verify", false);
    let (code, _, err) = Idem::check(&insecure.to_string()).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("WARN") && err.contains("upstream.tls_verify"),
        "{err}"
    );
    let idem = Idem::start(&insecure.to_string()).await;
    idem.wait_stderr("upstream.tls_verify").await;

    let no_https = Config::new(backend.addr())
        .set("upstream.tls_ca", pki.path("ca.pem").display().to_string());
    let (code, _, err) = Idem::check(&no_https.to_string()).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("upstream.tls_ca") && err.contains("https://"),
        "{err}"
    );
}

/// Without `tls_ca`, a backend is verified against the system's roots; the tests stand in
/// for them with `SSL_CERT_FILE` (which the system-roots loader honours): the private CA
/// is then trusted, and a certificate from another CA still is not.
#[tokio::test]
async fn without_tls_ca_the_system_roots_decide() {
    let app = Backend::start().await;
    let pki = edge_pki();
    pki.ca("rogue").leaf(Leaf::server("impostor", "rogue", 67));
    let good = tls_backend(&pki, "edge", app.addr(), "").await;
    let bad = tls_backend(&pki, "impostor", app.addr(), "").await;
    let config = Config::new(app.addr())
        .set("upstream.backends", vec![https_backend(good.addr())])
        .set("upstream.health_check", "none")
        .set("upstreams.rogue.backends", vec![https_backend(bad.addr())])
        .route(Route::new("rogue", "/rogue/", "keyed").set("upstream", "rogue"));
    let idem = Idem::builder()
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .start(&config.to_string())
        .await;
    let r = raw_request(idem.addr(), &keyed_post("/ok", "roots-1")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = raw_request(idem.addr(), &keyed_post("/rogue/x", "roots-2")).await;
    assert_problem(&r, 502, "upstream-unreachable");
    assert_eq!(app.counts("/ok").started, 1);
    assert_eq!(app.counts("/rogue/x").started, 0);
}
