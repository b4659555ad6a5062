//! Starting idem where the world is not ready: a port another process holds, a backend name
//! that does not resolve yet, no backend at all for a pass-through.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_idem");

/// Runs idem with the config `file` until it exits by itself (10 s at most).
async fn run_to_exit(file: &std::path::Path) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("idem exited")
    .expect("spawn idem")
}

/// A port in use stops idem at once with one line naming the address, like nginx's
/// `bind() ... failed (98: Address already in use)`, and it never announces a listener.
#[tokio::test]
async fn a_port_in_use_stops_idem_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let b = Backend::start().await;
    let dir = TempDir::new();
    let config = Config::new(b.addr())
        .set("server.listen", addr.to_string())
        .to_string();
    let file = dir.write("proxy.toml", &config);
    let started = Instant::now();
    let out = run_to_exit(&file).await;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no listening line"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"),
        "stderr: {stderr}"
    );
    drop(taken);
}

/// A backend whose name does not resolve (`.invalid` never does, RFC 6761) does not stop
/// idem: it starts, says so once, and answers what it cannot forward with idem's own 502
/// (nothing was sent: a keyed request's key is not held).
#[tokio::test]
async fn a_backend_that_does_not_resolve_starts_idem_with_it_down() {
    let config = Config::new("127.0.0.1:9".parse().unwrap())
        .set("upstream.backends", vec!["app.invalid:8000"])
        .set("upstream.health_check", "none")
        .to_string();
    let (code, stdout, stderr) = Idem::check(&config).await;
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("ok"), "stdout: {stdout}");
    assert!(
        stderr.contains("WARN") && stderr.contains("app.invalid:8000 does not resolve (yet)"),
        "stderr: {stderr}"
    );

    let idem = Idem::start(&config).await;
    idem.wait_stderr("backend does not resolve").await;
    let http = client();
    let get = http.get(idem.url("/thing")).send().await.unwrap();
    assert_eq!(get.status(), 502);
    assert_eq!(get.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = serde_json::from_str(&get.text().await.unwrap()).unwrap();
    assert_eq!(
        body["type"],
        "https://idem.dev/problems/upstream-unreachable"
    );
    for _ in 0..2 {
        // The same key twice: each time 502 unreachable, never held as outcome unknown.
        let post = http
            .post(idem.url("/orders"))
            .header("idempotency-key", "k1")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 502);
        let body: serde_json::Value = serde_json::from_str(&post.text().await.unwrap()).unwrap();
        assert_eq!(
            body["type"],
            "https://idem.dev/problems/upstream-unreachable"
        );
    }
    let errors = series_id(
        "idem_requests_total",
        [("route", "default"), ("outcome", "error")],
    );
    assert_eq!(metric(&idem, &errors).await, 3.0);
    assert_eq!(metric(&idem, "idem_held_keys").await, 0.0);
}

/// A backend that refuses connections: a pass-through answered by idem as problem+json
/// (502 upstream-unreachable), not Pingora's empty-bodied 502 or 500.
#[tokio::test]
async fn a_refused_pass_through_is_answered_as_problem_json() {
    let closed = free_addr();
    let config = Config::new(closed)
        .set("upstream.health_check", "none")
        .to_string();
    let idem = Idem::start(&config).await;
    let r = client().get(idem.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        r.headers()["cache-status"],
        "idem; fwd=request; detail=upstream-unreachable"
    );
}

/// Two of idem's own listeners on one address (here the cleartext and the TLS listener; on
/// Linux also `0.0.0.0:443` beside the dual-stack `[::]:443`) stop the start naming the
/// second, as a port held by another process does; before, the TLS listener's thread failed
/// after the listening line had announced it, and idem ran on without it.
#[tokio::test]
async fn two_listeners_on_one_address_stop_idem_naming_it() {
    let pki = tls::Pki::new();
    pki.ca("ca").leaf(tls::Leaf::server("leaf", "ca", 1));
    let addr = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let b = Backend::start().await;
    let dir = TempDir::new();
    let config = Config::new(b.addr())
        .set("server.listen", addr.to_string())
        .set("server.tls.listen", addr.to_string())
        .set(
            "server.tls.cert",
            pki.path("leaf.pem").to_string_lossy().to_string(),
        )
        .set(
            "server.tls.key",
            pki.path("leaf.key").to_string_lossy().to_string(),
        )
        .to_string();
    let file = dir.write("proxy.toml", &config);
    let out = run_to_exit(&file).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no listening line"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"),
        "stderr: {stderr}"
    );
}
