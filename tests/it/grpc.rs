//! gRPC through idem (issue 13): grpcio's client and server (tests/apps/grpc/), idem in
//! between. gRPC requests go to the backend over h2c with their trailers; unary calls with
//! `idempotency-key` metadata on a keyed route are deduplicated and replayed exactly
//! (status, initial and trailing metadata, message); a call that never reached the backend
//! is not held.
//!
//! The server counts executions in a file (one line per call), and every reply carries its
//! execution number (`echo:REQ#N`, trailer `x-trailer: tN`), so a replay is told apart from
//! a second execution by content as well as by count.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::support::*;

const SERVICE_PREFIX: &str = "/idem.test.Echo/";

/// The Python gRPC server and its execution log.
struct GrpcServer {
    app: App,
    log: PathBuf,
    _dir: TempDir,
}

impl GrpcServer {
    async fn start() -> GrpcServer {
        GrpcServer::start_on(0).await
    }

    async fn start_on(port: u16) -> GrpcServer {
        let dir = TempDir::new();
        let log = dir.path().join("executions.log");
        let app = App::start_python(
            "grpc-server",
            "grpc/server.py",
            &[
                "--port".into(),
                port.to_string(),
                "--log".into(),
                log.display().to_string(),
            ],
        )
        .await;
        GrpcServer {
            app,
            log,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.app.addr()
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Executions of `method` so far.
    fn starts(&self, method: &str) -> usize {
        let prefix = format!("{method} start ");
        self.lines()
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .count()
    }

    /// Waits (bounded) until the log has the line `line`.
    async fn wait_line(&self, line: &str) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        while !self.lines().iter().any(|l| l == line) {
            assert!(
                Instant::now() < deadline,
                "the gRPC server did not log {line:?} within {WAIT_TIMEOUT:?}; log: {:?}\n{}",
                self.lines(),
                self.app.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `calls` on one channel to `target` (see tests/apps/grpc/client.py).
async fn grpc_calls(target: SocketAddr, calls: Value) -> Vec<Value> {
    let out = run_python("grpc/client.py", &[target.to_string(), calls.to_string()]).await;
    let results: Vec<Value> = serde_json::from_str(&out).expect("client JSON");
    assert_eq!(results.len(), calls.as_array().unwrap().len());
    results
}

/// The value of metadata `name` in a result's `field`.
fn md<'a>(result: &'a Value, field: &str, name: &str) -> Option<&'a str> {
    result[field]
        .as_array()?
        .iter()
        .find(|p| p[0] == name)
        .and_then(|p| p[1].as_str())
}

/// Metadata without what idem itself adds to a response (markers differ between a
/// leader and its replay by design).
fn app_metadata(result: &Value, field: &str) -> Vec<Value> {
    result[field]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            !matches!(
                p[0].as_str(),
                // Each call's own request id (the leader's is in the access log).
                Some("cache-status" | "idempotent-replayed" | "age" | "date" | "x-request-id")
            )
        })
        .cloned()
        .collect()
}

fn trailers(n: u8) -> Value {
    json!([
        ["x-trailer", format!("t{n}")],
        ["x-trailer-bin", format!("hex:{n:02x}00ff")]
    ])
}

fn grpc_route() -> Route {
    Route::new("grpc", SERVICE_PREFIX, "keyed")
}

// ---------------------------------------------------------------------------
// The fixture without idem
// ---------------------------------------------------------------------------

#[tokio::test]
async fn grpc_fixture_works_directly() {
    let server = GrpcServer::start().await;
    let results = grpc_calls(
        server.addr(),
        json!([
            {"method": "Unary", "request": "hi", "metadata": [["idempotency-key", "k"]]},
            {"method": "ServerStream", "request": "s", "metadata": [["x-count", "2"]]},
        ]),
    )
    .await;
    assert_eq!(results[0]["code"], "OK");
    assert_eq!(results[0]["responses"], json!(["echo:hi#1"]));
    assert_eq!(results[0]["trailing_metadata"], trailers(1));
    assert_eq!(results[1]["responses"], json!(["0:s", "1:s"]));
    assert_eq!(results[1]["trailing_metadata"], trailers(1));
    assert_eq!(
        server.lines(),
        vec![
            "Unary start 1 k",
            "Unary done 1",
            "ServerStream start 1 -",
            "ServerStream done 1"
        ]
    );
}

// ---------------------------------------------------------------------------
// Through idem
// ---------------------------------------------------------------------------

/// Keyless calls pass through: unary, server-streaming and a failing unary, each with its
/// messages, status and trailing metadata intact.
#[tokio::test]
async fn unary_and_server_streaming_calls_pass_through_with_trailers() {
    let server = GrpcServer::start().await;
    let config = Config::new(server.addr()).route(grpc_route());
    let idem = Idem::start(&config.to_string()).await;
    let results = grpc_calls(
        idem.addr(),
        json!([
            {"method": "Unary", "request": "hi"},
            {"method": "ServerStream", "request": "s", "metadata": [["x-count", "3"]]},
            {"method": "Unary", "request": "no", "metadata": [["x-mode", "fail"]]},
        ]),
    )
    .await;
    let [unary, stream, failed] = &results[..] else {
        unreachable!()
    };
    assert_eq!(unary["code"], "OK", "{unary}");
    assert_eq!(unary["responses"], json!(["echo:hi#1"]));
    assert_eq!(md(unary, "initial_metadata", "x-initial"), Some("Unary"));
    assert_eq!(unary["trailing_metadata"], trailers(1));

    assert_eq!(stream["code"], "OK", "{stream}");
    assert_eq!(stream["responses"], json!(["0:s", "1:s", "2:s"]));
    assert_eq!(stream["trailing_metadata"], trailers(1));

    assert_eq!(failed["code"], "INVALID_ARGUMENT", "{failed}");
    assert_eq!(failed["details"], "bad request #2");
    assert_eq!(failed["trailing_metadata"], trailers(2));

    assert_eq!(server.starts("Unary"), 2);
    assert_eq!(server.starts("ServerStream"), 1);
}

/// The client's deadline crosses idem: the call ends DEADLINE_EXCEEDED and the server's
/// handler learns it was cancelled rather than running on.
#[tokio::test]
async fn deadline_exceeded_reaches_the_server() {
    let server = GrpcServer::start().await;
    let config = Config::new(server.addr()).route(grpc_route());
    let idem = Idem::start(&config.to_string()).await;
    let results = grpc_calls(
        idem.addr(),
        json!([{
            "method": "Unary",
            "request": "slow",
            "metadata": [["x-mode", "sleep"], ["x-sleep-ms", "8000"]],
            "timeout": 0.5,
        }]),
    )
    .await;
    assert_eq!(results[0]["code"], "DEADLINE_EXCEEDED", "{}", results[0]);
    server.wait_line("Unary cancelled 1").await;
    assert_eq!(server.starts("Unary"), 1);
}

/// A client that cancels a server stream: idem resets the upstream stream, so the server
/// stops (its stream would otherwise run for 20 s).
#[tokio::test]
async fn a_cancelled_stream_is_cancelled_at_the_server() {
    let server = GrpcServer::start().await;
    let config = Config::new(server.addr()).route(grpc_route());
    let idem = Idem::start(&config.to_string()).await;
    let results = grpc_calls(
        idem.addr(),
        json!([{
            "method": "ServerStream",
            "request": "c",
            "metadata": [["x-count", "1000"], ["x-interval-ms", "20"]],
            "cancel_after": 2,
        }]),
    )
    .await;
    assert_eq!(results[0]["code"], "CANCELLED", "{}", results[0]);
    assert_eq!(results[0]["responses"], json!(["0:c", "1:c"]));
    server.wait_line("ServerStream cancelled 1").await;
}

/// Unary calls with `idempotency-key` metadata on a keyed route: the second call with a key
/// is replayed exactly (message, status, details, initial and trailing metadata) and does
/// not reach the server, for a success and for an application error alike.
#[tokio::test]
async fn keyed_unary_calls_are_replayed_exactly() {
    let server = GrpcServer::start().await;
    let config = Config::new(server.addr()).route(grpc_route());
    let idem = Idem::start(&config.to_string()).await;
    let ok = json!({"method": "Unary", "request": "pay", "metadata": [["idempotency-key", "g-1"]]});
    let bad = json!({
        "method": "Unary",
        "request": "bad",
        "metadata": [["idempotency-key", "g-2"], ["x-mode", "fail"]],
    });
    let results = grpc_calls(idem.addr(), json!([ok, ok, bad, bad])).await;

    assert_eq!(results[0]["code"], "OK", "{}", results[0]);
    assert_eq!(results[0]["responses"], json!(["echo:pay#1"]));
    assert_eq!(results[0]["trailing_metadata"], trailers(1));
    assert_eq!(results[2]["code"], "INVALID_ARGUMENT", "{}", results[2]);
    assert_eq!(results[2]["details"], "bad request #2");
    assert_eq!(results[2]["trailing_metadata"], trailers(2));

    for (first, again) in [(&results[0], &results[1]), (&results[2], &results[3])] {
        assert_eq!(
            md(first, "initial_metadata", "cache-status"),
            Some("idem; fwd=uri-miss; stored"),
            "{first}"
        );
        let replay = md(again, "initial_metadata", "cache-status").unwrap_or_default();
        assert!(
            replay.starts_with("idem; hit; ttl="),
            "not a replay: {again}"
        );
        for field in ["code", "details", "responses", "trailing_metadata"] {
            assert_eq!(again[field], first[field], "{field}: {again}");
        }
        assert_eq!(
            app_metadata(again, "initial_metadata"),
            app_metadata(first, "initial_metadata")
        );
    }
    assert_eq!(
        server.lines(),
        vec![
            "Unary start 1 g-1",
            "Unary done 1",
            "Unary start 2 g-2",
            "Unary done 2"
        ]
    );
}

/// Named upstream groups: the gRPC route's calls go to `[upstreams.grpc]` over h2c while
/// the default `[upstream]` keeps serving the HTTP/1.1 routes.
#[tokio::test]
async fn a_route_picks_a_named_h2c_upstream_group() {
    let server = GrpcServer::start().await;
    let http = Backend::start().await;
    let config = Config::new(http.addr())
        .set("upstreams.grpc.backends", vec![server.addr().to_string()])
        .set("upstreams.grpc.protocol", "h2c")
        .route(grpc_route().set("upstream", "grpc"))
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::start(&config.to_string()).await;
    let results = grpc_calls(
        idem.addr(),
        json!([{"method": "Unary", "request": "hi", "metadata": [["idempotency-key", "n-1"]]}]),
    )
    .await;
    assert_eq!(results[0]["code"], "OK", "{}", results[0]);
    assert_eq!(results[0]["responses"], json!(["echo:hi#1"]));
    assert_eq!(results[0]["trailing_metadata"], trailers(1));
    let resp = client()
        .post(idem.url("/api/plain"))
        // Another key: one key names one request in its scope, whatever the route (the
        // same key with another request is a 422 fingerprint-mismatch, as on any route).
        .header("idempotency-key", "n-2")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"path":"/api/plain","call":1}"#
    );
    assert_eq!(server.starts("Unary"), 1);
    assert_eq!(
        http.settled("/api/plain").await,
        Counts {
            started: 1,
            completed: 1,
            aborted: 0
        }
    );
}

/// A keyed call whose backend refuses the connection is answered UNAVAILABLE and its key
/// is not held: once the server is up, the retry with the same key executes.
#[tokio::test]
async fn a_call_that_never_reached_the_backend_is_not_held() {
    // The port stays bound (not listening: connections are refused) so no other process
    // takes it before the server starts on it; grpc binds with SO_REUSEPORT, as we do.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.set_reuseport(true).unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let config = Config::new(SocketAddr::from(([127, 0, 0, 1], port)))
        .set("upstream.health_check", "none")
        .route(grpc_route());
    let idem = Idem::start(&config.to_string()).await;
    let call =
        json!([{"method": "Unary", "request": "x", "metadata": [["idempotency-key", "d-1"]]}]);

    let down = grpc_calls(idem.addr(), call.clone()).await;
    assert_eq!(down[0]["code"], "UNAVAILABLE", "{}", down[0]);

    let server = GrpcServer::start_on(port).await;
    let up = grpc_calls(idem.addr(), call).await;
    assert_eq!(
        up[0]["code"], "OK",
        "the retry with the server up did not execute: {}",
        up[0]
    );
    assert_eq!(up[0]["responses"], json!(["echo:x#1"]));
    assert_eq!(server.lines(), vec!["Unary start 1 d-1", "Unary done 1"]);
    drop(reserved);
}

/// An `https://` group speaking h2 by ALPN (nginx with TLS and `grpc_pass` in front of the
/// server, verified against `tls_ca`): keyed calls are deduplicated and replayed exactly
/// there too.
#[tokio::test]
async fn an_https_group_speaks_h2_by_alpn_and_replays_exactly() {
    let server = GrpcServer::start().await;
    let pki = Pki::new();
    pki.ca("ca").leaf(Leaf::server("edge", "ca", 3001));
    let nginx = Nginx::start_listening(
        &format!(
            "        ssl_certificate {};
        ssl_certificate_key {};
        location / {{ grpc_pass grpc://{}; }}",
            pki.path("edge.pem").display(),
            pki.path("edge.key").display(),
            server.addr()
        ),
        " ssl http2",
    )
    .await;
    let http = Backend::start().await;
    let config = Config::new(http.addr())
        .set(
            "upstreams.grpc.backends",
            vec![format!("https://{}", nginx.addr())],
        )
        .set(
            "upstreams.grpc.tls_ca",
            pki.path("ca.pem").display().to_string(),
        )
        .route(grpc_route().set("upstream", "grpc"));
    let idem = Idem::start(&config.to_string()).await;
    let call =
        json!({"method": "Unary", "request": "tls", "metadata": [["idempotency-key", "h2-tls-1"]]});
    let results = grpc_calls(idem.addr(), json!([call, call])).await;
    assert_eq!(results[0]["code"], "OK", "{}", results[0]);
    assert_eq!(results[0]["responses"], json!(["echo:tls#1"]));
    assert_eq!(results[0]["trailing_metadata"], trailers(1));
    for field in ["code", "responses", "trailing_metadata"] {
        assert_eq!(results[1][field], results[0][field], "{field}");
    }
    assert!(md(&results[1], "initial_metadata", "cache-status")
        .unwrap_or_default()
        .starts_with("idem; hit"));
    assert_eq!(
        server.lines(),
        vec!["Unary start 1 h2-tls-1", "Unary done 1"]
    );
    assert_eq!(http.total().started, 0);
}

/// A keyed call whose response is over `max_response_body` is streamed to its client with
/// its trailers (the status is in them) and not kept: the retry with the same key is refused
/// (HTTP 409 not-replayable, which gRPC reports as UNKNOWN), never executed again.
#[tokio::test]
async fn a_response_too_large_to_keep_streams_with_its_trailers_and_is_not_run_again() {
    let server = GrpcServer::start().await;
    let config = Config::new(server.addr()).route(grpc_route().set("max_response_body", "8"));
    let idem = Idem::start(&config.to_string()).await;
    let call =
        json!({"method": "Unary", "request": "big", "metadata": [["idempotency-key", "s-1"]]});
    let results = grpc_calls(idem.addr(), json!([call, call])).await;
    assert_eq!(results[0]["code"], "OK", "{}", results[0]);
    assert_eq!(results[0]["responses"], json!(["echo:big#1"]));
    assert_eq!(results[0]["trailing_metadata"], trailers(1));
    assert_eq!(results[1]["code"], "UNKNOWN", "{}", results[1]);
    assert_eq!(server.lines(), vec!["Unary start 1 s-1", "Unary done 1"]);
}
