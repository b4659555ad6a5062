//! SIGTERM with a flight running: `/readyz` answers 503 from the signal on, the proxy keeps
//! accepting for `shutdown_delay` (answers close their connections), then refuses, while
//! `/metrics` serves until the exit and shows the drain.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

async fn get(url: String) -> (u16, String) {
    let r = client()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_drain_keeps_metrics_and_readyz_answering_and_accepts_for_the_shutdown_delay() {
    const DELAY: Duration = Duration::from_secs(3);
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set("server.shutdown_delay", "3s")
        .set("upstream.health_check", "none");
    let idem = Idem::start(&config.to_string()).await;
    assert_eq!(
        get(idem.metrics_url("/readyz")).await,
        (200, "ready\n".into())
    );

    // A leader's call held at the backend.
    let gate = b.gate("/pay");
    let http = client();
    let leader = http
        .post(idem.url("/pay"))
        .header("idempotency-key", "drain-1")
        .body("amount=1")
        .send();
    let leader = tokio::spawn(leader);
    gate.wait_started(1).await;

    let signalled = Instant::now();
    assert!(idem.signal(libc::SIGTERM));
    // Not ready from the signal on (the flag is set before anything else happens).
    let deadline = signalled + WAIT_TIMEOUT;
    loop {
        let (status, body) = get(idem.metrics_url("/readyz")).await;
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still accepting within the delay; the answer closes its connection.
    let r = http.get(idem.url("/late")).send().await.unwrap();
    assert!(
        signalled.elapsed() < DELAY,
        "the machine was too slow to test within the delay ({:?})",
        signalled.elapsed()
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    r.bytes().await.unwrap();

    // The listeners close once the delay has passed, not before.
    let refused_at = loop {
        if TcpStream::connect(idem.addr()).await.is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < DELAY + WAIT_TIMEOUT,
            "still accepting {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused_at >= DELAY,
        "listeners closed after {refused_at:?}, before the delay"
    );

    // The flight still runs: metrics and readiness still answer, and say so.
    let metrics = scrape(&idem).await;
    for (series, want) in [
        ("idem_draining", 1.0),
        ("idem_inflight_keys", 1.0),
        ("idem_active_requests", 1.0),
    ] {
        assert_eq!(sample(&metrics, series), Some(want), "{series}\n{metrics}");
    }
    assert_eq!(get(idem.metrics_url("/readyz")).await.0, 503);
    assert_eq!(get(idem.metrics_url("/healthz")).await.0, 200);
    assert!(idem.exit_status().is_none(), "exited with a flight running");

    gate.open();
    let r = leader.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let exit = idem
        .wait_exit(WAIT_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("still running after its flight\n{}", idem.stderr_text()));
    assert!(exit.success(), "{exit:?}\n{}", idem.stderr_text());
    let stderr = idem.stderr_text();
    assert!(
        stderr.contains("SIGTERM: draining; /readyz answers 503 and the listeners close in 3s"),
        "{stderr}"
    );
}

/// A second SIGTERM during the delay closes the listeners at once.
#[tokio::test]
async fn a_second_sigterm_cuts_the_shutdown_delay_short() {
    let b = Backend::start().await;
    let config = Config::new(b.addr()).set("server.shutdown_delay", "300s");
    let idem = Idem::start(&config.to_string()).await;
    assert!(idem.signal(libc::SIGTERM));
    idem.wait_stderr("SIGTERM: draining").await;
    assert!(idem.signal(libc::SIGTERM));
    let exit = idem
        .wait_exit(WAIT_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("still running\n{}", idem.stderr_text()));
    assert!(exit.success(), "{exit:?}");
    assert!(idem
        .stderr_text()
        .contains("SIGTERM again: the listeners close now"));
}
