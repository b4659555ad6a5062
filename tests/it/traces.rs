//! OpenTelemetry traces, checked against a small OTLP/HTTP receiver this test runs: the
//! leader's server span continues the client's trace, its upstream call is a child span
//! whose `traceparent` reaches the app, and the waiter's and the replay's spans link to
//! the leader's.

use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::*;

/// Spans received, with their resource's `service.name`.
#[derive(Default, Clone)]
struct Received {
    spans: Vec<(String, Span)>,
    paths: Vec<String>,
}

/// An OTLP/HTTP receiver on a loopback port: decodes every POST as an
/// `ExportTraceServiceRequest` and answers 200. Stopped when dropped.
struct Receiver {
    addr: SocketAddr,
    received: Arc<watch::Sender<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(watch::Sender::new(Received::default()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(conn, sink.clone()));
            }
        });
        Receiver {
            addr,
            received,
            task,
        }
    }

    /// Waits until `done` accepts what was received.
    async fn wait(&self, done: impl Fn(&Received) -> bool) -> Received {
        let mut rx = self.received.subscribe();
        let got = tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|r| done(r))).await;
        match got {
            Ok(Ok(r)) => r.clone(),
            _ => panic!(
                "the receiver did not get the expected spans within {WAIT_TIMEOUT:?}; got {:#?}",
                self.received.borrow().spans
            ),
        }
    }
}

/// One connection: HTTP/1.1 requests with a `Content-Length`, kept alive.
async fn serve(mut conn: TcpStream, sink: Arc<watch::Sender<Received>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
        let request = ExportTraceServiceRequest::decode(body.as_slice())
            .unwrap_or_else(|e| panic!("not an OTLP traces request: {e}\n{head}"));
        sink.send_modify(|r| {
            r.paths.push(path.clone());
            for rs in request.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|res| &res.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        AnyValue::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        r.spans.push((service.clone(), span));
                    }
                }
            }
        });
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn spans_link_waiters_and_replays_to_the_leader_and_its_upstream_call() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    let receiver = Receiver::start().await;
    let b = Backend::start().await;
    let config = Config::new(b.addr())
        .set(
            "tracing.otlp_endpoint",
            format!("http://{}/v1/traces", receiver.addr),
        )
        .set("tracing.service_name", "idem-test")
        .route(Route::new("api", "/api/", "keyed"));
    let idem = Idem::builder()
        // Batches every 100 ms rather than every 5 s: the test waits for them.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start(&config.to_string())
        .await;
    let http = client();
    let post = |id: &'static str, traceparent: Option<String>| {
        let mut req = http
            .post(idem.url("/api/pay"))
            .header("idempotency-key", "traced-1")
            .header("x-request-id", id)
            .body("amount=3");
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        tokio::spawn(req.send())
    };

    let gate = b.gate("/api/pay");
    let leader = post("lead", Some(format!("00-{TRACE}-{CLIENT_SPAN}-01")));
    gate.wait_started(1).await;
    let waiter = post("wait", None);
    wait_metric(&idem, "idem_waiters", 1.0).await;
    gate.open();
    assert_eq!(leader.await.unwrap().unwrap().status(), 200);
    assert_eq!(waiter.await.unwrap().unwrap().status(), 200);
    let replay = post("again", None).await.unwrap().unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    let server = |r: &Received, id: &str| {
        r.spans
            .iter()
            .any(|(_, s)| attr(s, "idem.request_id").as_deref() == Some(id))
    };
    let got = receiver
        .wait(|r| {
            ["lead", "wait", "again"].iter().all(|id| server(r, id))
                && r.spans
                    .iter()
                    .any(|(_, s)| s.kind == SpanKind::Client as i32)
        })
        .await;
    assert!(
        got.paths.iter().all(|p| p == "/v1/traces"),
        "{:?}",
        got.paths
    );
    let find = |id: &str| {
        got.spans
            .iter()
            .find(|(_, s)| attr(s, "idem.request_id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no span for request {id}"))
    };
    let (service, lead) = find("lead");
    assert_eq!(service, "idem-test");
    assert_eq!(lead.kind, SpanKind::Server as i32);
    assert_eq!(lead.name, "POST api");
    // The leader continues the client's trace.
    assert_eq!(hex(&lead.trace_id), TRACE);
    assert_eq!(hex(&lead.parent_span_id), CLIENT_SPAN);
    assert_eq!(attr(lead, "idem.outcome").as_deref(), Some("leader"));
    assert_eq!(
        attr(lead, "http.response.status_code").as_deref(),
        Some("200")
    );

    // Its upstream call: a child span, whose id the app received as its parent.
    let calls: Vec<&Span> = got
        .spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(calls.len(), 1, "one upstream call");
    let call = calls[0];
    assert_eq!(call.trace_id, lead.trace_id);
    assert_eq!(call.parent_span_id, lead.span_id);
    assert_eq!(call.name, "upstream POST");
    assert_eq!(
        attr(call, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(call, "server.address"), Some(b.addr().to_string()));
    let at_app = &b.requests("/api/pay")[0];
    assert_eq!(
        at_app.header("traceparent"),
        Some(format!("00-{TRACE}-{}-01", hex(&call.span_id)).as_str())
    );

    // The waiter and the replay link to the leader's span.
    for (id, outcome) in [("wait", "collapsed"), ("again", "replayed")] {
        let (_, s) = find(id);
        assert_eq!(attr(s, "idem.outcome").as_deref(), Some(outcome), "{id}");
        assert_eq!(
            attr(s, "idem.leader_request_id").as_deref(),
            Some("lead"),
            "{id}"
        );
        assert_ne!(s.trace_id, lead.trace_id, "{id}: a trace of its own");
        assert_eq!(s.links.len(), 1, "{id}: {:?}", s.links);
        assert_eq!(s.links[0].trace_id, lead.trace_id, "{id}");
        assert_eq!(s.links[0].span_id, lead.span_id, "{id}");
    }
}

/// A collector that is not there costs spans, never requests: they are answered as usual,
/// and the failed export is logged (once per batch).
#[tokio::test]
async fn a_collector_that_is_down_costs_spans_not_requests() {
    let b = Backend::start().await;
    let nobody = free_addr();
    let config = Config::new(b.addr()).set(
        "tracing.otlp_endpoint",
        format!("http://{nobody}/v1/traces"),
    );
    let idem = Idem::builder()
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start(&config.to_string())
        .await;
    let http = client();
    let r = http.get(idem.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    idem.wait_stderr("BatchSpanProcessor.ExportError").await;
    // Still serving while exports fail.
    let r = http.get(idem.url("/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.total().started, 2);
}
