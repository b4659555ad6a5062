//! idem's integration tests: one binary, so the crate links once.

mod support;

mod access_log;
mod app_servers;
mod dedup;
mod docs;
mod drain;
mod failures;
mod forwarding;
mod grpc;
mod hardening;
mod kubernetes;
mod observability;
mod operations;
mod passthrough_ops;
mod protocols;
mod redis_operations;
mod redis_replicas;
mod reliability;
mod startup;
mod tls;
mod traces;

/// The backend is the yardstick for every idem test, so it is tested on its
/// own first: if these fail, idem test failures mean nothing.
mod backend_selftest {
    use std::time::Duration;

    use crate::support::*;

    fn url(b: &Backend, path: &str) -> String {
        format!("http://{}{path}", b.addr())
    }

    #[tokio::test]
    async fn normal_request_is_counted_and_recorded() {
        let b = Backend::start().await;
        let http = client();
        for call in 1..=2 {
            let resp = http
                .get(url(&b, "/hello?q=1"))
                .header("x-test", "v")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-backend-call"], call.to_string().as_str());
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(
                resp.text().await.unwrap(),
                format!(r#"{{"path":"/hello","call":{call}}}"#)
            );
        }
        let done = Counts {
            started: 2,
            completed: 2,
            aborted: 0,
        };
        assert_eq!(b.settled("/hello").await, done);
        assert_eq!(b.total(), done);
        assert_eq!(b.counts("/other"), Counts::default());
        let reqs = b.requests("/hello");
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].method, "GET");
        assert_eq!(reqs[0].path_and_query, "/hello?q=1");
        assert_eq!(reqs[0].header("x-test"), Some("v"));
        // reqwest keeps the connection alive between the two calls.
        assert_eq!(b.connections(), 1);
    }

    #[tokio::test]
    async fn response_shaping_headers() {
        let b = Backend::start().await;
        let http = client();
        let resp = http
            .post(url(&b, "/shape"))
            .header("x-status", "418")
            .header("x-body", "short and stout")
            .header("x-content-type", "text/x-teapot")
            .header("x-set-cookie", "session=abc; Path=/")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.headers()["content-type"], "text/x-teapot");
        assert_eq!(resp.headers()["set-cookie"], "session=abc; Path=/");
        assert_eq!(resp.text().await.unwrap(), "short and stout");

        let resp = http
            .post(url(&b, "/shape"))
            .header("x-echo", "1")
            .body("echo me")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "echo me");

        let resp = http
            .get(url(&b, "/shape"))
            .header("x-body-size", "100000")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.bytes().await.unwrap().as_ref(),
            pattern(100_000).as_slice()
        );

        let head = raw_request(b.addr(), &http_request("HEAD", "/shape", &[], b"")).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(b.settled("/shape").await.completed, 4);
    }

    #[tokio::test]
    async fn unknown_fault_is_loud() {
        let b = Backend::start().await;
        let resp = raw_request(
            b.addr(),
            &http_request("GET", "/typo", &[("x-fault", "rest-before-headers")], b""),
        )
        .await;
        assert_eq!(resp.status, 400);
        assert!(resp.text().contains("unknown x-fault"), "{}", resp.text());
    }

    #[tokio::test]
    async fn keep_alive_and_connection_close() {
        let b = Backend::start().await;
        let mut conn = RawConn::connect(b.addr()).await;
        for _ in 0..2 {
            conn.send(&http_request("GET", "/ka", &[], b"")).await;
            let resp = conn.read_response().await;
            assert_eq!(resp.status, 200);
            assert_eq!(resp.header("connection"), None);
        }
        conn.send(&http_request("GET", "/ka", &[("connection", "close")], b""))
            .await;
        let resp = conn.read_response().await;
        assert_eq!(resp.header("connection"), Some("close"));
        conn.expect_closed().await;
        assert_eq!(b.connections(), 1);
        assert!(b.requests("/ka").iter().all(|r| r.connection == 1));
        assert_eq!(b.settled("/ka").await.completed, 3);
    }

    #[tokio::test]
    async fn client_disconnect_during_delay_counts_aborted() {
        let b = Backend::start().await;
        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&http_request(
            "GET",
            "/slow",
            &[("x-delay-ms", "30000")],
            b"",
        ))
        .await;
        b.wait_counts("/slow", |c| c.started == 1).await;
        drop(conn);
        let counts = b.settled("/slow").await;
        assert_eq!(
            counts,
            Counts {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
    }

    #[tokio::test]
    async fn impatient_client_counts_aborted() {
        let b = Backend::start().await;
        // The request bytes precede the FIN, so the backend always reads the
        // request before it sees the close: started, then aborted.
        send_and_abort(
            b.addr(),
            &http_request("POST", "/impatient", &[("x-delay-ms", "30000")], b"x=1"),
            Duration::ZERO,
        )
        .await;
        let counts = b.settled("/impatient").await;
        assert_eq!(
            (counts.started, counts.completed, counts.aborted),
            (1, 0, 1)
        );
        assert_eq!(b.requests("/impatient")[0].body, b"x=1");
    }

    #[tokio::test]
    async fn gate_holds_requests_until_opened() {
        let b = Backend::start().await;
        let gate = b.gate("/gated");
        let http = client();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let req = http.get(url(&b, "/gated"));
                tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() })
            })
            .collect();
        gate.wait_started(3).await;
        assert_eq!(gate.waiting(), 3);
        assert_eq!(
            b.counts("/gated"),
            Counts {
                started: 3,
                completed: 0,
                aborted: 0
            }
        );
        gate.open();
        let mut bodies = Vec::new();
        for call in calls {
            bodies.push(call.await.unwrap());
        }
        bodies.sort();
        let expected: Vec<String> = (1..=3)
            .map(|n| format!(r#"{{"path":"/gated","call":{n}}}"#))
            .collect();
        assert_eq!(bodies, expected);
        assert_eq!(b.settled("/gated").await.completed, 3);
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn gated_request_aborts_when_peer_leaves() {
        let b = Backend::start().await;
        let gate = b.gate("/held");
        let conn_req = http_request("GET", "/held", &[], b"");
        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&conn_req).await;
        gate.wait_started(1).await;
        drop(conn);
        let counts = b.settled("/held").await;
        assert_eq!(
            (counts.started, counts.completed, counts.aborted),
            (1, 0, 1)
        );
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn chunked_request_body_is_decoded() {
        let b = Backend::start().await;
        let body =
            [b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n".as_slice()].concat();
        let req = http_request(
            "POST",
            "/echo",
            &[("transfer-encoding", "chunked"), ("x-echo", "1")],
            &body,
        );
        let resp = raw_request(b.addr(), &req).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hello world");
        let recorded = &b.requests("/echo")[0];
        assert_eq!(recorded.body, b"hello world");
        assert_eq!(
            recorded.trailers,
            vec![("x-sum".to_owned(), b"11".to_vec())]
        );

        let req = http_request(
            "POST",
            "/echo",
            &[("transfer-encoding", "chunked"), ("x-echo", "1")],
            &chunked_body(&[b"a", b"", b"bc"]),
        );
        assert_eq!(raw_request(b.addr(), &req).await.text(), "abc");
    }

    #[tokio::test]
    async fn chunked_and_trailer_responses() {
        let b = Backend::start().await;
        let resp = raw_request(
            b.addr(),
            &http_request(
                "GET",
                "/te",
                &[("x-fault", "trailers"), ("x-body-size", "1000")],
                b"",
            ),
        )
        .await;
        assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
        assert_eq!(resp.header("content-length"), None);
        assert_eq!(resp.body, pattern(1000));
        assert_eq!(
            resp.trailers,
            vec![("x-trailer".to_owned(), b"done".to_vec())]
        );
        assert_eq!(b.settled("/te").await.completed, 1);
    }

    #[tokio::test]
    async fn slow_body_streams_before_completion() {
        let b = Backend::start().await;
        let mut resp = client()
            .get(url(&b, "/stream"))
            .header("x-fault", "slow-body")
            .header("x-body-size", "4000")
            .header("x-chunks", "4")
            .header("x-chunk-ms", "200")
            .send()
            .await
            .unwrap();
        let first = resp.chunk().await.unwrap().expect("a first chunk");
        // Three pauses remain, so the backend cannot have finished yet.
        assert_eq!(b.counts("/stream").completed, 0);
        let mut body = first.to_vec();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, pattern(4000));
        assert_eq!(b.settled("/stream").await.completed, 1);
    }

    #[tokio::test]
    async fn byte_level_faults() {
        let b = Backend::start().await;
        let fault = |f: &str| http_request("GET", "/fault", &[("x-fault", f)], b"");

        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&fault("reset-before-headers")).await;
        match conn.try_read_response(false).await {
            Err(RawError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            other => panic!("expected a reset, got {other:?}"),
        }

        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&fault("close-before-headers")).await;
        match conn.try_read_response(false).await {
            Err(RawError::Closed { partial }) => assert!(partial.is_empty()),
            other => panic!("expected a clean close, got {other:?}"),
        }

        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&fault("malformed-status")).await;
        assert!(matches!(
            conn.try_read_response(false).await,
            Err(RawError::Malformed(_))
        ));

        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&http_request(
            "GET",
            "/fault",
            &[("x-fault", "reset-mid-body"), ("x-body-size", "1000")],
            b"",
        ))
        .await;
        match conn.try_read_response(false).await {
            Err(RawError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            Err(RawError::Closed { .. }) => {}
            other => panic!("expected a broken body, got {other:?}"),
        }

        let counts = b.settled("/fault").await;
        assert_eq!(
            counts,
            Counts {
                started: 4,
                completed: 0,
                aborted: 0
            }
        );
    }

    #[tokio::test]
    async fn stall_counts_aborted_when_peer_closes() {
        let b = Backend::start().await;
        let mut conn = RawConn::connect(b.addr()).await;
        conn.send(&http_request("GET", "/stall", &[("x-fault", "stall")], b""))
            .await;
        b.wait_counts("/stall", |c| c.started == 1).await;
        drop(conn);
        let counts = b.settled("/stall").await;
        assert_eq!(
            (counts.started, counts.completed, counts.aborted),
            (1, 0, 1)
        );
    }

    #[tokio::test]
    async fn rows_race_inserts_duplicates() {
        let b = Backend::start().await;
        // The gate lines both calls up before their checks, so the overlap is
        // guaranteed rather than hoped for.
        let gate = b.gate("/rows");
        let http = client();
        let calls: Vec<_> = ["name=alice", r#"{"name":"alice"}"#]
            .into_iter()
            .map(|body| {
                let req = http
                    .post(url(&b, "/rows"))
                    .header("x-delay-ms", "300")
                    .body(body);
                tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
            })
            .collect();
        gate.wait_started(2).await;
        gate.open();
        for call in calls {
            assert_eq!(call.await.unwrap(), 201);
        }
        let rows = b.rows();
        assert_eq!(rows.len(), 2, "the control must bite: {rows:?}");
        assert!(rows.iter().all(|r| r.name == "alice"));
    }

    #[tokio::test]
    async fn rows_without_overlap_get_the_existing_row() {
        let b = Backend::start().await;
        let http = client();
        let first = http
            .post(url(&b, "/api/rows"))
            .body("name=bob%20smith&x=1")
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), 201);
        let second = http
            .post(url(&b, "/api/rows"))
            .body("name=bob+smith")
            .send()
            .await
            .unwrap();
        assert_eq!(second.status(), 200);
        let json = json_body(second).await;
        assert_eq!(json["created"], false);
        assert_eq!(json["id"], 1);
        assert_eq!(
            b.rows(),
            vec![Row {
                id: 1,
                name: "bob smith".into()
            }]
        );
    }

    #[tokio::test]
    async fn rows_work_completes_after_caller_leaves() {
        let b = Backend::start().await;
        send_and_abort(
            b.addr(),
            &http_request("POST", "/rows", &[("x-delay-ms", "200")], b"name=carol"),
            Duration::ZERO,
        )
        .await;
        let counts = b.settled("/rows").await;
        assert_eq!(
            (counts.started, counts.completed, counts.aborted),
            (1, 0, 1)
        );
        assert_eq!(b.rows().len(), 1);
    }

    #[tokio::test]
    async fn refused_ports() {
        let port = free_port();
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err());

        let b = Backend::start().await;
        let addr = b.addr();
        let mut idle = RawConn::connect(addr).await;
        b.stop().await;
        idle.expect_closed().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// reqwest's `json` needs a feature the crate does not enable.
    async fn json_body(resp: reqwest::Response) -> serde_json::Value {
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }
}

mod config_selftest {
    use crate::support::*;

    #[test]
    fn config_builder_renders_valid_toml() {
        let addr = "127.0.0.1:9".parse().unwrap();
        assert!(config_for(addr).contains("\"127.0.0.1:9\""));
        let text = Config::new(addr)
            .set("upstream.read_timeout", "1s")
            .set("server.threads", 4)
            .remove("store.kind")
            .route(Route::new("api", "/api", "keyed").set("ttl", "2s"))
            .route(Route::new("fp", "/fp", "fingerprint").set("max_body", "1KiB"))
            .to_string();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["upstream"]["read_timeout"].as_str(), Some("1s"));
        assert_eq!(parsed["upstream"]["connect_timeout"].as_str(), Some("1s"));
        assert_eq!(parsed["server"]["threads"].as_integer(), Some(4));
        assert!(parsed["store"].get("kind").is_none());
        let routes = parsed["route"].as_array().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[1]["mode"].as_str(), Some("fingerprint"));
        assert_eq!(routes[0]["ttl"].as_str(), Some("2s"));
    }
}
