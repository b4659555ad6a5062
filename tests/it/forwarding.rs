//! idem behind front proxies (issue 13): what the backend learns about the client.
//!
//! From a trusted peer (`[server] trusted_proxies`, default loopback) idem keeps
//! `X-Forwarded-Proto`, `-Host`, `-Port`, joins every `X-Forwarded-For` line into one and
//! appends the peer; from any other peer it replaces them with what it saw. `Forwarded`
//! (RFC 7239) likewise. With `[server] proxy_protocol = true` the PROXY header's source is
//! the peer. Real nginx and HAProxy sit in front; clients connect from 127.0.0.2 or
//! 127.0.0.3 so that each hop's address is told apart from the proxies' 127.0.0.1.
//!
//! Each case goes through both of idem's paths: a GET (pass-through, Pingora's proxy) and
//! a keyed POST (the leader's detached call), which build the upstream request separately.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use crate::support::*;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const CLIENT_V2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

const ONE_CALL: Counts = Counts {
    started: 1,
    completed: 1,
    aborted: 0,
};

/// The forwarding fields of one request as the backend received them: every line of each,
/// in order, so a second line or a missing one shows.
#[derive(Debug, PartialEq, Eq)]
struct Fwd {
    xff: Vec<String>,
    proto: Vec<String>,
    host: Vec<String>,
    port: Vec<String>,
}

impl Fwd {
    fn of(req: &RecordedRequest) -> Fwd {
        let lines = |name: &str| {
            req.header_values(name)
                .into_iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        };
        Fwd {
            xff: lines("x-forwarded-for"),
            proto: lines("x-forwarded-proto"),
            host: lines("x-forwarded-host"),
            port: lines("x-forwarded-port"),
        }
    }

    /// One line of each, as idem must send them.
    fn one(xff: &str, proto: &str, host: &str, port: &str) -> Fwd {
        Fwd {
            xff: vec![xff.to_owned()],
            proto: vec![proto.to_owned()],
            host: vec![host.to_owned()],
            port: vec![port.to_owned()],
        }
    }
}

/// Asserts every path's fields at once, so a failure shows which of idem's two paths
/// (pass-through, dedup) is wrong, or both.
#[track_caller]
fn assert_fwd(got: &[(String, Fwd)], want: Fwd) {
    let expected: Vec<(String, &Fwd)> = got.iter().map(|(p, _)| (p.clone(), &want)).collect();
    let got: Vec<(String, &Fwd)> = got.iter().map(|(p, f)| (p.clone(), f)).collect();
    assert_eq!(got, expected);
}

fn lines(req: &RecordedRequest, name: &str) -> Vec<String> {
    req.header_values(name)
        .into_iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// One request on a fresh connection from `source`.
async fn send_from(to: SocketAddr, source: IpAddr, request: &[u8]) -> RawResponse {
    let mut conn = RawConn::connect_from(to, source).await;
    conn.send(request).await;
    conn.read_final_response(false).await
}

/// The pass-through GET and the keyed POST every case sends, with `headers`.
fn both_paths(prefix: &str, headers: &[(&str, &str)]) -> [(String, Vec<u8>); 2] {
    let get = http_request("GET", &format!("{prefix}pass"), headers, b"");
    let mut keyed = headers.to_vec();
    keyed.push(("idempotency-key", "fwd-1"));
    let post = http_request("POST", &format!("{prefix}keyed"), &keyed, b"x=1");
    [
        (format!("{prefix}pass"), get),
        (format!("{prefix}keyed"), post),
    ]
}

/// Asserts that idem took the expected path for each of [`both_paths`]' responses.
#[track_caller]
fn assert_paths(get: &RawResponse, post: &RawResponse) {
    assert_eq!(get.status, 200, "{get:#?}");
    assert_eq!(
        get.header("cache-status"),
        Some("idem; fwd=bypass"),
        "{get:#?}"
    );
    assert_eq!(post.status, 200, "{post:#?}");
    assert_eq!(
        post.header("cache-status"),
        Some("idem; fwd=uri-miss; stored"),
        "{post:#?}"
    );
}

/// The only request the backend received on `path`.
async fn only_request(b: &Backend, path: &str) -> RecordedRequest {
    assert_eq!(b.settled(path).await, ONE_CALL, "{path}");
    let mut reqs = b.requests(path);
    assert_eq!(reqs.len(), 1, "{path}: {reqs:#?}");
    reqs.remove(0)
}

/// An nginx that terminates TLS would say so: these are the directives of nginx's own
/// reverse-proxy guide, with the scheme and port of an HTTPS front.
fn nginx_forwarding(upstream: &str) -> String {
    format!(
        "        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Port 443;
        }}"
    )
}

/// HAProxy as a TLS front would be configured: `option forwardfor` adds its own
/// `X-Forwarded-For` line after any the client sent.
const HAPROXY_FORWARDING: &str = "    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Forwarded-Port 443";

/// A client that sits behind its own proxy already: it sends an `X-Forwarded-For`.
const CLIENT_HEADERS: &[(&str, &str)] =
    &[("host", "shop.example"), ("x-forwarded-for", "203.0.113.7")];

// ---------------------------------------------------------------------------
// The fixtures themselves, without idem: what each front proxy sends
// ---------------------------------------------------------------------------

#[tokio::test]
async fn nginx_fixture_sends_the_forwarding_headers() {
    let b = Backend::start().await;
    let nginx = Nginx::start(&nginx_forwarding(&format!("http://{}", b.addr()))).await;
    let resp = send_from(
        nginx.addr(),
        CLIENT,
        &http_request("GET", "/direct", CLIENT_HEADERS, b""),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:#?}\n{}", nginx.error_log());
    let req = only_request(&b, "/direct").await;
    assert_eq!(
        Fwd::of(&req),
        Fwd::one("203.0.113.7, 127.0.0.2", "https", "shop.example", "443")
    );
    // nginx's default `Host` is the upstream's address.
    assert_eq!(req.header("host"), Some(b.addr().to_string().as_str()));
}

#[tokio::test]
async fn haproxy_fixture_adds_a_second_forwarded_for_line() {
    let b = Backend::start().await;
    let haproxy = HaProxy::start(
        "http",
        HAPROXY_FORWARDING,
        &format!("    server app {}", b.addr()),
    )
    .await;
    let resp = send_from(
        haproxy.addr(),
        CLIENT,
        &http_request("GET", "/direct", CLIENT_HEADERS, b""),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:#?}\n{}", haproxy.logs());
    let req = only_request(&b, "/direct").await;
    assert_eq!(
        Fwd::of(&req),
        Fwd {
            xff: vec!["203.0.113.7".into(), "127.0.0.2".into()],
            proto: vec!["https".into()],
            host: vec!["shop.example".into()],
            port: vec!["443".into()],
        }
    );
}

/// What HAProxy's `send-proxy` and `send-proxy-v2` put before the client's bytes, read by a
/// plain listener: the exact bytes idem must parse.
#[tokio::test]
async fn haproxy_fixture_sends_proxy_protocol_v1_and_v2() {
    for (option, client) in [("send-proxy", CLIENT), ("send-proxy-v2", CLIENT_V2)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let haproxy = HaProxy::start(
            "tcp",
            "",
            &format!("    server app {} {option}", listener.local_addr().unwrap()),
        )
        .await;
        let mut conn = RawConn::connect_from(haproxy.addr(), client).await;
        let client_port = conn.stream().local_addr().unwrap().port();
        conn.send(b"hello").await;
        let (mut upstream, _) = tokio::time::timeout(WAIT_TIMEOUT, listener.accept())
            .await
            .expect("HAProxy connected to the server")
            .unwrap();
        let IpAddr::V4(src) = client else {
            unreachable!()
        };
        let expected = if option == "send-proxy" {
            format!(
                "PROXY TCP4 {client} 127.0.0.1 {client_port} {}\r\nhello",
                haproxy.addr().port()
            )
            .into_bytes()
        } else {
            let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
            v2.extend_from_slice(&src.octets());
            v2.extend_from_slice(&[127, 0, 0, 1]);
            v2.extend_from_slice(&client_port.to_be_bytes());
            v2.extend_from_slice(&haproxy.addr().port().to_be_bytes());
            v2.extend_from_slice(b"hello");
            v2
        };
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(WAIT_TIMEOUT, upstream.read_exact(&mut got))
            .await
            .expect("the PROXY header and the client's bytes")
            .unwrap();
        assert_eq!(
            got,
            expected,
            "{option}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

// ---------------------------------------------------------------------------
// Trusted front proxies
// ---------------------------------------------------------------------------

/// nginx as a TLS front: the backend learns the client's scheme, host and port, and the
/// whole address chain: the client's own proxy, the client, nginx.
#[tokio::test]
async fn behind_nginx_the_backend_sees_the_clients_scheme_and_address_chain() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let nginx = Nginx::start(&nginx_forwarding(&format!("http://{}", idem.addr()))).await;
    let mut seen = Vec::new();
    let mut got = Vec::new();
    for (path, request) in both_paths("/fwd/", CLIENT_HEADERS) {
        seen.push(send_from(nginx.addr(), CLIENT, &request).await);
        got.push((path.clone(), Fwd::of(&only_request(&b, &path).await)));
    }
    assert_fwd(
        &got,
        Fwd::one(
            "203.0.113.7, 127.0.0.2, 127.0.0.1",
            "https",
            "shop.example",
            "443",
        ),
    );
    assert_paths(&seen[0], &seen[1]);
}

/// HAProxy's `option forwardfor` adds a second `X-Forwarded-For` line when the client sent
/// one: idem joins the lines in order, then appends HAProxy's address.
#[tokio::test]
async fn behind_haproxy_every_forwarded_for_line_is_joined_in_order() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let haproxy = HaProxy::start(
        "http",
        HAPROXY_FORWARDING,
        &format!("    server idem {}", idem.addr()),
    )
    .await;
    let mut seen = Vec::new();
    let mut got = Vec::new();
    for (path, request) in both_paths("/fwd/", CLIENT_HEADERS) {
        seen.push(send_from(haproxy.addr(), CLIENT, &request).await);
        got.push((path.clone(), Fwd::of(&only_request(&b, &path).await)));
    }
    assert_fwd(
        &got,
        Fwd::one(
            "203.0.113.7, 127.0.0.2, 127.0.0.1",
            "https",
            "shop.example",
            "443",
        ),
    );
    assert_paths(&seen[0], &seen[1]);
}

/// A trusted peer's repeated `X-Forwarded-For` and `Forwarded` lines are each joined into
/// one, in order, and extended with the peer.
#[tokio::test]
async fn a_trusted_peers_forwarded_lines_are_joined_and_extended() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let headers = [
        ("host", "shop.example"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-for", "198.51.100.1, 192.0.2.5"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("x-forwarded-port", "8443"),
        ("forwarded", "for=203.0.113.7;proto=https"),
        ("forwarded", "for=198.51.100.1, for=\"[2001:db8::1]\""),
    ];
    let mut seen = Vec::new();
    let mut got = Vec::new();
    let mut forwarded = Vec::new();
    for (path, request) in both_paths("/fwd/", &headers) {
        seen.push(raw_request(idem.addr(), &request).await);
        let req = only_request(&b, &path).await;
        got.push((path.clone(), Fwd::of(&req)));
        forwarded.push((path, lines(&req, "forwarded")));
    }
    assert_fwd(
        &got,
        Fwd::one(
            "203.0.113.7, 198.51.100.1, 192.0.2.5, 127.0.0.1",
            "https",
            "shop.example",
            "8443",
        ),
    );
    let joined = "for=203.0.113.7;proto=https, for=198.51.100.1, for=\"[2001:db8::1]\", \
                  for=127.0.0.1";
    assert_eq!(
        forwarded,
        vec![
            ("/fwd/pass".to_owned(), vec![joined.to_owned()]),
            ("/fwd/keyed".to_owned(), vec![joined.to_owned()]),
        ]
    );
    assert_paths(&seen[0], &seen[1]);
}

/// `::1/128` is in the default trust: an IPv6 loopback peer's claims are kept, and it is
/// appended as `::1` to `X-Forwarded-For` and as `for="[::1]"` (RFC 7239 quotes IPv6) to
/// `Forwarded`.
#[tokio::test]
async fn an_ipv6_loopback_peer_is_trusted_by_default() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.listen", "[::1]:0")
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    assert!(idem.addr().is_ipv6(), "{}", idem.addr());
    let headers = [
        ("host", "shop.example"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("x-forwarded-port", "443"),
        ("forwarded", "for=203.0.113.7;proto=https"),
    ];
    let mut seen = Vec::new();
    let mut got = Vec::new();
    let mut forwarded = Vec::new();
    for (path, request) in both_paths("/fwd/", &headers) {
        seen.push(raw_request(idem.addr(), &request).await);
        let req = only_request(&b, &path).await;
        got.push((path.clone(), Fwd::of(&req)));
        forwarded.push((path, lines(&req, "forwarded")));
    }
    assert_fwd(
        &got,
        Fwd::one("203.0.113.7, ::1", "https", "shop.example", "443"),
    );
    let joined = "for=203.0.113.7;proto=https, for=\"[::1]\"";
    assert_eq!(
        forwarded,
        vec![
            ("/fwd/pass".to_owned(), vec![joined.to_owned()]),
            ("/fwd/keyed".to_owned(), vec![joined.to_owned()]),
        ]
    );
    assert_paths(&seen[0], &seen[1]);
}

// ---------------------------------------------------------------------------
// Untrusted peers
// ---------------------------------------------------------------------------

/// `trusted_proxies = []`: whatever a client claims is replaced with what idem saw.
#[tokio::test]
async fn an_untrusted_peers_forwarding_headers_are_replaced() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.trusted_proxies", toml::Value::Array(Vec::new()))
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    // The client names idem's address as the authority, so "Host/port as received" has one
    // meaning whether the port is read from `Host` or from the listener.
    let authority = idem.addr().to_string();
    let port = idem.addr().port().to_string();
    let headers = [
        ("host", authority.as_str()),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-for", "198.51.100.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "bank.example"),
        ("x-forwarded-port", "443"),
        ("forwarded", "for=203.0.113.7;proto=https;host=bank.example"),
    ];
    let mut seen = Vec::new();
    let mut got = Vec::new();
    let mut forwarded = Vec::new();
    for (path, request) in both_paths("/fwd/", &headers) {
        seen.push(raw_request(idem.addr(), &request).await);
        let req = only_request(&b, &path).await;
        got.push((path.clone(), Fwd::of(&req)));
        forwarded.push((path, lines(&req, "forwarded")));
    }
    assert_fwd(&got, Fwd::one("127.0.0.1", "http", &authority, &port));
    assert_eq!(
        forwarded,
        vec![
            ("/fwd/pass".to_owned(), vec!["for=127.0.0.1".to_owned()]),
            ("/fwd/keyed".to_owned(), vec!["for=127.0.0.1".to_owned()]),
        ]
    );
    assert_paths(&seen[0], &seen[1]);
}

/// A front proxy outside `trusted_proxies` is just another client: nginx's claims are
/// replaced, and the chain starts at nginx.
#[tokio::test]
async fn behind_an_untrusted_nginx_its_claims_are_replaced() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.trusted_proxies", vec!["192.0.2.0/24"])
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let nginx = Nginx::start(&nginx_forwarding(&format!("http://{}", idem.addr()))).await;
    // nginx sends `Host: <idem's address>` (its default, the upstream's name).
    let authority = idem.addr().to_string();
    let port = idem.addr().port().to_string();
    let mut seen = Vec::new();
    let mut got = Vec::new();
    for (path, request) in both_paths("/fwd/", CLIENT_HEADERS) {
        seen.push(send_from(nginx.addr(), CLIENT, &request).await);
        got.push((path.clone(), Fwd::of(&only_request(&b, &path).await)));
    }
    assert_fwd(&got, Fwd::one("127.0.0.1", "http", &authority, &port));
    assert_paths(&seen[0], &seen[1]);
}

// ---------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------

/// HAProxy in TCP mode with `send-proxy` / `send-proxy-v2`: idem takes the client's address
/// from the PROXY header, for every request on the connection.
#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_haproxy_name_the_client() {
    for (option, client) in [("send-proxy", CLIENT), ("send-proxy-v2", CLIENT_V2)] {
        let b = Backend::start().await;
        let config = Config::new(b.addr())
            .set("server.proxy_protocol", true)
            .route(Route::new("fwd", "/fwd/", "keyed"));
        let idem = Idem::start(&config.to_string()).await;
        let haproxy = HaProxy::start(
            "tcp",
            "",
            &format!("    server idem {} {option}", idem.addr()),
        )
        .await;
        // One client connection, so one PROXY header, carries both requests.
        let host = [("host", "shop.example")];
        let [(get_path, get), (post_path, post)] = both_paths("/fwd/", &host);
        let mut conn = RawConn::connect_from(haproxy.addr(), client).await;
        conn.send(&get).await;
        let get_resp = conn.read_response().await;
        conn.send(&post).await;
        let post_resp = conn.read_response().await;
        assert_paths(&get_resp, &post_resp);
        for path in [get_path, post_path] {
            let req = only_request(&b, &path).await;
            let fwd = Fwd::of(&req);
            assert_eq!(fwd.xff, vec![client.to_string()], "{option} {path}");
            assert_eq!(fwd.proto, vec!["http"], "{option} {path}");
        }
    }
}

/// The PROXY header's source is the peer for the trust decision too: a source outside the
/// default (loopback) trust has its claims replaced, although the TCP peer is loopback.
#[tokio::test]
async fn a_proxy_protocol_source_outside_trusted_proxies_is_untrusted() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.proxy_protocol", true)
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let port = idem.addr().port();
    let headers = [
        ("host", "shop.example"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
    ];
    let mut seen = Vec::new();
    for (path, request) in both_paths("/fwd/", &headers) {
        let mut conn = RawConn::connect(idem.addr()).await;
        let proxy_line = format!("PROXY TCP4 198.51.100.9 127.0.0.1 40000 {port}\r\n");
        conn.send(&[proxy_line.as_bytes(), &request].concat()).await;
        seen.push(conn.read_response().await);
        let req = only_request(&b, &path).await;
        let fwd = Fwd::of(&req);
        assert_eq!(fwd.xff, vec!["198.51.100.9"], "{path}");
        assert_eq!(fwd.proto, vec!["http"], "{path}");
    }
    assert_paths(&seen[0], &seen[1]);
}

// ---------------------------------------------------------------------------
// nginx to idem over a Unix socket
// ---------------------------------------------------------------------------

/// `proxy_pass http://unix:/path/idem.sock:/`: three identical keyed POSTs through nginx
/// while the backend holds the first make one call; a fourth is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reaches_idem_over_a_unix_socket_and_dedup_holds() {
    let b = Backend::start().await;
    let sock_dir = TempDir::new();
    let sock = sock_dir.path().join("idem.sock");
    let config = Config::new(b.addr())
        .set("server.listen", vec![format!("unix:{}", sock.display())])
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    assert!(
        sock.exists(),
        "idem announced its listeners without {}",
        sock.display()
    );
    let nginx = Nginx::start(&format!(
        "        location / {{
            proxy_pass http://unix:{}:/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}",
        sock.display()
    ))
    .await;
    let gate = b.gate("/api/uds");
    let http = client();
    let mut calls = JoinSet::new();
    for _ in 0..3 {
        let req = http
            .post(nginx.url("/api/uds"))
            .header("idempotency-key", "uds-1")
            .body("x=1");
        calls.spawn(async move {
            let resp = req.send().await.expect("through nginx");
            let status = resp.status().as_u16();
            let cache = resp
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, cache, resp.text().await.unwrap())
        });
    }
    gate.wait_started(1).await;
    wait_metric(&idem, "idem_waiters", 2.0).await;
    assert_eq!(gate.arrived(), 1, "a second call reached the backend");
    gate.open();
    let mut caches = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (status, cache, body) = r.unwrap();
        assert_eq!(status, 200, "{cache:?} {body}\n{}", nginx.error_log());
        assert_eq!(body, r#"{"path":"/api/uds","call":1}"#);
        caches.push(cache.unwrap_or_default());
    }
    caches.sort();
    assert_eq!(
        caches,
        vec![
            "idem; fwd=uri-miss; collapsed",
            "idem; fwd=uri-miss; collapsed",
            "idem; fwd=uri-miss; stored",
        ]
    );
    let replay = http
        .post(nginx.url("/api/uds"))
        .header("idempotency-key", "uds-1")
        .body("x=1")
        .send()
        .await
        .unwrap();
    let cache = replay.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cache.starts_with("idem; hit; ttl="), "{cache}");
    assert_eq!(
        replay.text().await.unwrap(),
        r#"{"path":"/api/uds","call":1}"#
    );
    assert_eq!(b.settled("/api/uds").await, ONE_CALL);
    assert_eq!(b.total(), ONE_CALL);
}

// ---------------------------------------------------------------------------
// idem's own decisions where the spec is silent (docs/semantics.md, "Behind a front proxy")
// ---------------------------------------------------------------------------

/// The access log's `client` is the address derived through trusted hops: the first
/// untrusted `X-Forwarded-For` entry from the right, the peer when an entry is not an
/// address, and the peer itself when the peer is not trusted, whatever it claims.
#[tokio::test]
async fn the_access_log_names_the_client_derived_through_trusted_hops() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.trusted_proxies", vec!["127.0.0.1/32", "10.0.0.0/8"])
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let cases = [
        // (source, path, X-Forwarded-For sent, client logged, X-Forwarded-For forwarded)
        (
            Ipv4Addr::LOCALHOST.into(),
            "/fwd/hops",
            "198.51.100.1, 203.0.113.7, 10.0.0.5",
            "203.0.113.7",
            "198.51.100.1, 203.0.113.7, 10.0.0.5, 127.0.0.1",
        ),
        (
            Ipv4Addr::LOCALHOST.into(),
            "/fwd/garbage",
            "203.0.113.7, unknown",
            "127.0.0.1",
            "203.0.113.7, unknown, 127.0.0.1",
        ),
        (
            CLIENT,
            "/fwd/untrusted",
            "203.0.113.7",
            "127.0.0.2",
            "127.0.0.2",
        ),
    ];
    for (source, path, xff, logged, forwarded) in cases {
        let request = http_request("GET", path, &[("x-forwarded-for", xff)], b"");
        let resp = send_from(idem.addr(), source, &request).await;
        assert_eq!(resp.status, 200, "{path}: {resp:#?}");
        idem.wait_stderr(&format!(
            "method=GET path={path} client_addr={logged} route=fwd"
        ))
        .await;
        let req = only_request(&b, path).await;
        assert_eq!(lines(&req, "x-forwarded-for"), vec![forwarded], "{path}");
    }
    // The dedup path logs the same client.
    let post = http_request(
        "POST",
        "/fwd/keyed",
        &[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.5"),
            ("idempotency-key", "log-1"),
        ],
        b"x=1",
    );
    let resp = raw_request(idem.addr(), &post).await;
    assert_eq!(resp.status, 200, "{resp:#?}");
    idem.wait_stderr(
        "method=POST path=/fwd/keyed client_addr=203.0.113.7 route=fwd status=200 outcome=leader",
    )
    .await;
}

/// On a `proxy_protocol` listener, a connection that does not start with a PROXY header
/// (a client that bypassed the proxy) is closed unanswered and reaches no backend; the
/// reason is logged at debug.
#[tokio::test]
async fn a_connection_without_a_proxy_header_is_closed_unanswered() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.proxy_protocol", true)
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::builder()
        .env("IDEM_LOG", "info,idem::http::first_bytes=debug")
        .start(&config.to_string())
        .await;
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&http_request("GET", "/fwd/direct", &[], b""))
        .await;
    conn.expect_closed().await;
    idem.wait_stderr("closing a client connection without a valid PROXY protocol header")
        .await;
    // A header that breaks off after its prefix is no header either.
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n")
        .await;
    conn.expect_closed().await;
    assert_eq!(b.total(), Counts::default());
}

/// A v2 `LOCAL` header (a proxy's own health check) keeps the connection's own peer; and
/// the h2c preface after a PROXY header is still recognised: idem answers it with its
/// HTTP/2 SETTINGS frame.
#[tokio::test]
async fn after_a_proxy_header_local_peers_and_h2c_are_served() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.proxy_protocol", true)
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;

    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let request = http_request("GET", "/fwd/local", &[], b"");
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&[&local[..], &request].concat()).await;
    let resp = conn.read_response().await;
    assert_eq!(resp.status, 200, "{resp:#?}");
    let req = only_request(&b, "/fwd/local").await;
    assert_eq!(lines(&req, "x-forwarded-for"), vec!["127.0.0.1"]);

    let port = idem.addr().port();
    let proxy_line = format!("PROXY TCP4 198.51.100.9 127.0.0.1 40000 {port}\r\n");
    let mut h2 = proxy_line.into_bytes();
    h2.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut conn = RawConn::connect(idem.addr()).await;
    conn.send(&h2).await;
    let mut frame_head = [0u8; 9];
    tokio::time::timeout(WAIT_TIMEOUT, conn.stream().read_exact(&mut frame_head))
        .await
        .expect("idem's first HTTP/2 frame")
        .unwrap();
    assert_eq!(frame_head[3], 4, "a SETTINGS frame: {frame_head:?}");
    assert_eq!(&frame_head[5..], &[0, 0, 0, 0], "on stream 0");
}

/// `trusted_proxies` is applied by a reload, for the requests that start after it.
#[tokio::test]
async fn a_reload_changes_which_peers_are_trusted() {
    let b = Backend::start().await;
    let untrusting = Config::new(b.addr())
        .set("server.trusted_proxies", toml::Value::Array(Vec::new()))
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&untrusting.to_string()).await;
    let addr = idem.addr();
    let send = |path: &'static str| async move {
        let request = http_request("GET", path, &[("x-forwarded-for", "203.0.113.7")], b"");
        raw_request(addr, &request).await
    };
    assert_eq!(send("/fwd/before").await.status, 200);
    idem.write_config(
        &Config::new(b.addr())
            .route(Route::new("fwd", "/fwd/", "keyed"))
            .to_string(),
    );
    assert!(idem.signal(libc::SIGHUP));
    idem.wait_stderr("SIGHUP: configuration reloaded from")
        .await;
    assert!(
        !idem.stderr_text().contains("take effect only at start-up"),
        "trusted_proxies needs no restart:\n{}",
        idem.stderr_text()
    );
    assert_eq!(send("/fwd/after").await.status, 200);
    for (path, xff) in [
        ("/fwd/before", "127.0.0.1"),
        ("/fwd/after", "203.0.113.7, 127.0.0.1"),
    ] {
        let req = only_request(&b, path).await;
        assert_eq!(lines(&req, "x-forwarded-for"), vec![xff], "{path}");
    }
}

/// The PROXY header counts against the first-bytes deadline (`keepalive_timeout`): a proxy
/// connection that stops inside its header, or sends a header and then nothing, is closed
/// unanswered once the deadline has passed, not before.
#[tokio::test]
async fn a_proxy_header_must_arrive_within_the_first_bytes_deadline() {
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.proxy_protocol", true)
        .set("server.keepalive_timeout", "1s")
        .route(Route::new("fwd", "/fwd/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let mut partial = RawConn::connect(idem.addr()).await;
    partial.send(b"PROXY TCP4 198.51.100.9 ").await;
    let mut silent_after = RawConn::connect(idem.addr()).await;
    silent_after
        .send(b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 80\r\n")
        .await;
    let opened = std::time::Instant::now();
    for conn in [&mut partial, &mut silent_after] {
        conn.expect_closed().await;
    }
    let waited = opened.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900)
            && waited < std::time::Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_eq!(b.total(), Counts::default());
}
