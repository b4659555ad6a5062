//! Clients: reqwest for ordinary traffic, raw sockets where a test must see or
//! produce exact bytes (interim responses, framing, impatient disconnects).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bounds every raw read so a broken proxy fails the test instead of hanging it.
const RAW_TIMEOUT: Duration = Duration::from_secs(30);
/// How long idem gets to answer `Expect: 100-continue` before we call it a bug.
const CONTINUE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 64 * 1024;

/// HTTP/1.1 only, never a proxy from the environment (a CI `http_proxy` would
/// otherwise swallow loopback traffic), with a pool large enough that
/// concurrency tests are not serialised by the client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(1024)
        .timeout(RAW_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

/// Like [`client`], from the local address `source` (any 127.0.0.0/8 address is local on
/// Linux): another client address as idem counts them.
pub fn client_from(source: std::net::IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .local_address(source)
        .pool_max_idle_per_host(1024)
        .timeout(RAW_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

/// Like [`client`] but giving up on a request after `timeout`: an impatient client.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(timeout)
        .build()
        .expect("build reqwest client")
}

/// HTTP/2 over cleartext with prior knowledge (h2c), as a gRPC-ish client would.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(RAW_TIMEOUT)
        .build()
        .expect("build reqwest h2c client")
}

/// A response read off a raw socket.
#[derive(Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// Minor HTTP version: 1 for HTTP/1.1.
    pub version: u8,
    pub status: u16,
    pub reason: String,
    /// Lower-cased names, in wire order, repeated names kept.
    pub headers: Vec<(String, Vec<u8>)>,
    /// De-chunked body.
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Statuses of 1xx responses that preceded this one.
    pub interim: Vec<u16>,
}

/// Header values and bodies as text: a failing assertion that prints a response should
/// show `cache-status: idem; hit` rather than a column of byte values.
impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields = |list: &[(String, Vec<u8>)]| -> Vec<String> {
            list.iter()
                .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                .collect()
        };
        f.debug_struct("RawResponse")
            .field("version", &format_args!("HTTP/1.{}", self.version))
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("headers", &fields(&self.headers))
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("trailers", &fields(&self.trailers))
            .field("interim", &self.interim)
            .finish()
    }
}

impl RawResponse {
    /// First value of `name`, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name)
            .into_iter()
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn is_chunked(&self) -> bool {
        self.header_values("transfer-encoding").iter().any(|v| {
            String::from_utf8_lossy(v)
                .to_ascii_lowercase()
                .contains("chunked")
        })
    }
}

/// Why a raw response could not be read; tests about broken framing or
/// early closes match on these instead of panicking.
#[derive(Debug)]
pub enum RawError {
    /// EOF before a complete response; `partial` is what had arrived.
    Closed {
        partial: Vec<u8>,
    },
    Io(std::io::Error),
    Timeout,
    Malformed(String),
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Closed { partial } => write!(
                f,
                "connection closed before a complete response; received {:?}",
                String::from_utf8_lossy(partial)
            ),
            RawError::Io(e) => write!(f, "i/o error: {e}"),
            RawError::Timeout => write!(f, "no complete response within {RAW_TIMEOUT:?}"),
            RawError::Malformed(m) => write!(f, "malformed response: {m}"),
        }
    }
}

/// One client connection, for keep-alive, pipelining and interim-response
/// tests where several exchanges share a socket; over TCP, or any stream (TLS).
pub struct RawConn<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("raw client: connect {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from `source` (any 127.0.0.0/8 address is local on Linux), so that a
    /// front proxy's view of the client differs from its own loopback address.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> RawConn {
        let socket = match source {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .expect("raw client: socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("raw client: bind {source}: {e}"));
        let stream = socket
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("raw client: connect {addr} from {source}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> RawConn<S> {
    /// A connection over an established stream (a TLS session, say).
    pub fn over(stream: S) -> RawConn<S> {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The stream underneath.
    pub fn inner(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Every byte until the server closes the connection (bounded), unparsed: for tests
    /// about the exact framing of a response.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + RAW_TIMEOUT;
        loop {
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(RawError::Closed { .. }) => return std::mem::take(&mut self.buf),
                Err(e) => panic!(
                    "raw client: reading to the end: {e}; received {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("raw client: write: {e}"));
    }

    /// The next response of any kind, 1xx included (they have no body).
    /// Set `head_request` when it answers a HEAD, whose response has no body.
    pub async fn try_read_response(&mut self, head_request: bool) -> Result<RawResponse, RawError> {
        let deadline = Instant::now() + RAW_TIMEOUT;
        let mut resp = loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 128];
                let mut parsed = httparse::Response::new(&mut headers);
                match parsed.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let resp = RawResponse {
                            version: parsed.version.unwrap_or(1),
                            status: parsed.code.unwrap_or(0),
                            reason: parsed.reason.unwrap_or_default().to_owned(),
                            headers: parsed
                                .headers
                                .iter()
                                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                                .collect(),
                            body: Vec::new(),
                            trailers: Vec::new(),
                            interim: Vec::new(),
                        };
                        self.buf.drain(..n);
                        break resp;
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(RawError::Malformed("response head too large".into()))
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err(RawError::Malformed(format!(
                            "{e}: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        )))
                    }
                }
            }
            self.fill(deadline).await?;
        };

        let bodyless = head_request
            || (100..200).contains(&resp.status)
            || resp.status == 204
            || resp.status == 304;
        if bodyless {
            return Ok(resp);
        }
        if resp.is_chunked() {
            self.read_chunked(&mut resp, deadline).await?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| RawError::Malformed(format!("content-length {len:?}")))?;
            while self.buf.len() < len {
                self.fill(deadline).await?;
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            // No framing: the body runs to EOF.
            loop {
                match self.fill(deadline).await {
                    Ok(()) => {}
                    Err(RawError::Closed { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    pub async fn read_response(&mut self) -> RawResponse {
        self.try_read_response(false)
            .await
            .unwrap_or_else(|e| panic!("raw client: {e}"))
    }

    /// The final response, collecting 1xx statuses into `interim`.
    pub async fn read_final_response(&mut self, head_request: bool) -> RawResponse {
        let mut interim = Vec::new();
        loop {
            let resp = self
                .try_read_response(head_request)
                .await
                .unwrap_or_else(|e| panic!("raw client: {e}"));
            if (100..200).contains(&resp.status) && resp.status != 101 {
                interim.push(resp.status);
                continue;
            }
            return RawResponse { interim, ..resp };
        }
    }

    /// Waits for the server to close the connection; panics if it sends more
    /// bytes or keeps it open past the timeout.
    pub async fn expect_closed(&mut self) {
        let deadline = Instant::now() + RAW_TIMEOUT;
        match self.fill(deadline).await {
            Err(RawError::Closed { .. }) | Err(RawError::Io(_)) => {}
            Ok(()) => panic!(
                "raw client: expected close, got bytes {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Err(e) => panic!("raw client: expected close: {e}"),
        }
    }

    async fn fill(&mut self, deadline: Instant) -> Result<(), RawError> {
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => Err(RawError::Timeout),
            Ok(Err(e)) => Err(RawError::Io(e)),
            Ok(Ok(0)) => Err(RawError::Closed {
                partial: self.buf.clone(),
            }),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn line(&mut self, deadline: Instant) -> Result<Vec<u8>, RawError> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..pos].to_vec();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(RawError::Malformed("chunk line too long".into()));
            }
            self.fill(deadline).await?;
        }
    }

    async fn read_chunked(
        &mut self,
        resp: &mut RawResponse,
        deadline: Instant,
    ) -> Result<(), RawError> {
        loop {
            let line = self.line(deadline).await?;
            let line = String::from_utf8_lossy(&line).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| RawError::Malformed(format!("chunk size line {line:?}")))?;
            if size == 0 {
                loop {
                    let line = self.line(deadline).await?;
                    if line.is_empty() {
                        return Ok(());
                    }
                    let text = String::from_utf8_lossy(&line);
                    let (name, value) = text
                        .split_once(':')
                        .ok_or_else(|| RawError::Malformed(format!("trailer {text:?}")))?;
                    resp.trailers.push((
                        name.trim().to_ascii_lowercase(),
                        value.trim().as_bytes().to_vec(),
                    ));
                }
            }
            while self.buf.len() < size + 2 {
                self.fill(deadline).await?;
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(RawError::Malformed("chunk not terminated by CRLF".into()));
            }
            resp.body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}

/// Sends `request` on a fresh connection and returns the final response
/// (interim 1xx collected in `interim`). HEAD is recognised from the bytes.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    conn.read_final_response(request.starts_with(b"HEAD "))
        .await
}

/// Sends `head` (which must carry `Expect: 100-continue`), insists on an
/// `HTTP/1.1 100 Continue` before sending a single body byte, then sends
/// `body` and returns the final response. A client that waits is the whole
/// point: a proxy that buffers the body before answering would deadlock it.
/// For a proxy that rightly refuses early (e.g. 413), drive [`RawConn`] by hand.
pub async fn send_expecting_continue(addr: SocketAddr, head: &[u8], body: &[u8]) -> RawResponse {
    let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
    assert!(
        lower.contains("expect: 100-continue") || lower.contains("expect:100-continue"),
        "send_expecting_continue: the head must carry `Expect: 100-continue`"
    );
    assert!(
        head.ends_with(b"\r\n\r\n"),
        "the head must end with CRLF CRLF"
    );
    let mut conn = RawConn::connect(addr).await;
    conn.send(head).await;
    let interim = match tokio::time::timeout(CONTINUE_TIMEOUT, conn.try_read_response(false)).await {
        Err(_) => panic!(
            "no `100 Continue` within {CONTINUE_TIMEOUT:?} of sending the head; the body was not sent"
        ),
        Ok(Err(e)) => panic!("waiting for `100 Continue`: {e}"),
        Ok(Ok(resp)) => resp,
    };
    assert!(
        interim.version == 1 && interim.status == 100,
        "expected `HTTP/1.1 100 Continue` before sending the body, got HTTP/1.{} {} {:?} body {:?}",
        interim.version,
        interim.status,
        interim.headers,
        interim.text()
    );
    conn.send(body).await;
    let resp = conn.read_final_response(false).await;
    let mut interim_statuses = vec![100];
    interim_statuses.extend(resp.interim.iter().copied());
    RawResponse {
        interim: interim_statuses,
        ..resp
    }
}

/// The impatient client: sends a whole request, waits `after` without
/// reading, then closes. Nothing is read, so the close may go out as RST
/// if a response had arrived; both are what real impatient clients do.
pub async fn send_and_abort(addr: SocketAddr, request: &[u8], after: Duration) {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("send_and_abort: connect {addr}: {e}"));
    stream
        .write_all(request)
        .await
        .unwrap_or_else(|e| panic!("send_and_abort: write: {e}"));
    tokio::time::sleep(after).await;
    drop(stream);
}

/// Builds an HTTP/1.1 request. Adds `host` and, for a body or a method that
/// carries one, `content-length`, unless the caller set them or chose
/// `transfer-encoding` (then `body` must already be chunk-encoded, see
/// [`chunked_body`]).
pub fn http_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str("host: idem.test\r\n");
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let wants_length = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if wants_length && !has("content-length") && !has("transfer-encoding") {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Chunk-encodes `pieces` (one chunk each, empty pieces skipped) with the
/// terminating zero chunk.
pub fn chunked_body(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}
