//! A hand-written HTTP/1.1 origin server for the tests.
//!
//! It is hand-written (tokio + httparse, no framework) because the tests need
//! byte-level control: resets at precise points, malformed status lines,
//! paced bodies, and noticing the exact moment idem drops an upstream
//! connection. A framework would hide or "fix" all of those.
//!
//! Behaviour is chosen per request by `x-*` request headers, which idem
//! forwards end-to-end, so one backend serves every scenario of a test:
//!
//! | header | effect |
//! |---|---|
//! | `x-delay-ms: N` | wait N ms before answering; if the peer closes meanwhile, count `aborted` and stop |
//! | `x-status: NNN` | response status (default 200) |
//! | `x-body: text` | response body (default `{"path":"/x","call":N}`, N = per-path call number) |
//! | `x-body-size: N` | body of N bytes of [`pattern`] |
//! | `x-echo: 1` | body = request body |
//! | `x-content-type: t` | content type |
//! | `x-set-cookie: v` | adds `set-cookie: v` (repeat the header for several, in order) |
//! | `x-header: name: v` | adds the response header `name: v` (repeat for several, in order) |
//! | `x-connection-close: 1` | answer with `connection: close` and close |
//! | `x-chunks: N` | how many pieces `chunked`/`slow-body` split the body into (default 4) |
//! | `x-chunk-ms: N` | pause between pieces for `slow-body` (default 100) |
//! | `x-fault: a,b` | see below |
//!
//! Faults: `reset-before-headers`, `close-before-headers`, `reset-mid-body`,
//! `stall`, `malformed-status`, `close-after-response` (answer normally
//! without announcing it, then FIN: the stale keep-alive race) are terminal;
//! `slow-body`, `chunked`, `trailers` shape an otherwise normal response and
//! combine (`x-fault: slow-body,chunked`); `close-delimited` sends the body with
//! neither `Content-Length` nor chunking, ended by closing the connection (an
//! HTTP/1.0-style origin). An unknown fault is answered with
//! 400 so that a typo cannot silently turn into a passing test.
//!
//! Every response carries `x-backend-call: N` (the per-path call number) so a
//! test can tell a replayed response from a fresh execution.
//!
//! Paths whose last segment is `rows` model the incident (see [`Row`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::WAIT_TIMEOUT;

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
const DEFAULT_CHUNKS: usize = 4;
const DEFAULT_CHUNK_MS: u64 = 100;

/// What happened to the requests for one path.
///
/// `completed` is counted after the last response byte was handed to the
/// kernel, which can be a moment *after* the client has read it; assert on it
/// through [`Backend::wait_counts`] or [`Backend::settled`], not right after a
/// response arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Request head and body fully read (faulted requests included).
    pub started: u64,
    /// Full response written.
    pub completed: u64,
    /// The peer (idem) went away before the response was written.
    pub aborted: u64,
}

/// A request as the backend received it, after de-chunking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// Minor HTTP version: 1 for HTTP/1.1.
    pub version: u8,
    /// Lower-cased names, in arrival order, repeated names kept.
    pub headers: Vec<(String, Vec<u8>)>,
    pub trailers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Which accepted connection carried it (1-based), to assert reuse.
    pub connection: u64,
}

impl RecordedRequest {
    pub fn path(&self) -> &str {
        path_of(&self.path_and_query)
    }

    /// First value of `name`, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn wants_close(&self) -> bool {
        let tokens = self
            .header_values("connection")
            .into_iter()
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        tokens.iter().any(|t| t == "close")
            || (self.version == 0 && !tokens.iter().any(|t| t == "keep-alive"))
    }
}

/// A row of the `/rows` table.
///
/// `/rows` reproduces the incident: Django's `get_or_create` on a table without
/// a unique constraint. A POST with `name=X` (form) or `{"name":"X"}` (JSON)
/// looks the name up under the lock, RELEASES the lock, waits `x-delay-ms`,
/// then inserts if the lookup found nothing. Two overlapping calls therefore
/// both insert. The work also finishes when the caller has gone away, exactly
/// like a web worker that never notices the client hung up: the row exists
/// even though the request is counted `aborted`. Answers 201
/// `{"id":N,"name":"X","created":true}` for an insert, 200 with
/// `"created":false` when the row existed; GET lists all rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: u64,
    pub name: String,
}

#[derive(Default)]
struct PathState {
    counts: Counts,
    /// Requests that reached any end (response, abort, fault), for `settled`.
    finished: u64,
    gate: Option<Arc<watch::Sender<GateState>>>,
}

#[derive(Default)]
struct State {
    paths: HashMap<String, PathState>,
    total: Counts,
    connections: u64,
    log: Vec<RecordedRequest>,
    rows: Vec<Row>,
}

impl State {
    fn path_mut(&mut self, path: &str) -> &mut PathState {
        self.paths.entry(path.to_owned()).or_default()
    }
}

/// Shared state lives inside a watch channel: every mutation wakes every
/// waiter, and `wait_for` checks before sleeping, so no wake-up is ever lost
/// and no test needs to poll.
type Shared = Arc<watch::Sender<State>>;

pub struct Backend {
    addr: SocketAddr,
    state: Shared,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    pub async fn start() -> Backend {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds a specific address, e.g. the port of a stopped backend, to model
    /// an origin that restarts.
    pub async fn start_at(addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("backend: cannot bind {addr}: {e}"));
        let addr = listener.local_addr().expect("backend: local_addr");
        let state: Shared = Arc::new(watch::Sender::new(State::default()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state.clone(), shutdown_rx));
        Backend {
            addr,
            state,
            shutdown,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counts(&self, path: &str) -> Counts {
        self.state
            .borrow()
            .paths
            .get(path)
            .map(|p| p.counts)
            .unwrap_or_default()
    }

    pub fn total(&self) -> Counts {
        self.state.borrow().total
    }

    /// Connections accepted so far; with keep-alive this stays below the
    /// number of requests.
    pub fn connections(&self) -> u64 {
        self.state.borrow().connections
    }

    /// Requests for `path` (query ignored), in arrival order.
    pub fn requests(&self, path: &str) -> Vec<RecordedRequest> {
        self.state
            .borrow()
            .log
            .iter()
            .filter(|r| r.path() == path)
            .cloned()
            .collect()
    }

    pub fn all_requests(&self) -> Vec<RecordedRequest> {
        self.state.borrow().log.clone()
    }

    /// All rows of the `/rows` table, duplicates included, in insert order.
    pub fn rows(&self) -> Vec<Row> {
        self.state.borrow().rows.clone()
    }

    /// Waits until `pred` holds for `path`'s counts; panics after
    /// [`WAIT_TIMEOUT`] with the last counts seen.
    pub async fn wait_counts(&self, path: &str, pred: impl Fn(&Counts) -> bool) -> Counts {
        let what = format!("counts of {path}");
        self.wait_state(&what, |s| {
            let c = s.paths.get(path).map(|p| p.counts).unwrap_or_default();
            pred(&c).then_some(c)
        })
        .await
    }

    pub async fn wait_total(&self, pred: impl Fn(&Counts) -> bool) -> Counts {
        self.wait_state("total counts", |s| pred(&s.total).then_some(s.total))
            .await
    }

    /// Waits until every request that started on `path` has reached its end
    /// (response written, abort noticed, or fault delivered), then returns the
    /// counts, which are then exact. A `stall` only ends when the peer closes.
    pub async fn settled(&self, path: &str) -> Counts {
        let what = format!("requests on {path} to settle");
        self.wait_state(&what, |s| {
            let p = s.paths.get(path)?;
            (p.finished == p.counts.started).then_some(p.counts)
        })
        .await
    }

    /// Parks requests to `path` after they are counted `started`, until
    /// [`Gate::open`]. Replaces any earlier gate on the path (requests parked
    /// on the old one stay under the old handle's control).
    pub fn gate(&self, path: &str) -> Gate {
        let gate = Arc::new(watch::Sender::new(GateState::default()));
        self.state
            .send_modify(|s| s.path_mut(path).gate = Some(gate.clone()));
        Gate {
            path: path.to_owned(),
            state: gate,
        }
    }

    /// Closes the listener and every open connection, and waits until they
    /// are gone, so a following connect is refused.
    pub async fn stop(&self) {
        self.shutdown.send_replace(true);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    async fn wait_state<T>(&self, what: &str, mut probe: impl FnMut(&State) -> Option<T>) -> T {
        let mut rx = self.state.subscribe();
        let mut found = None;
        let waited = tokio::time::timeout(
            WAIT_TIMEOUT,
            rx.wait_for(|s| {
                found = probe(s);
                found.is_some()
            }),
        )
        .await;
        let ok = matches!(waited, Ok(Ok(_)));
        drop(waited);
        match found {
            Some(v) if ok => v,
            _ => {
                let s = self.state.borrow();
                let paths: Vec<String> = s
                    .paths
                    .iter()
                    .map(|(p, st)| format!("{p}: {:?} finished={}", st.counts, st.finished))
                    .collect();
                panic!(
                    "backend: timed out after {WAIT_TIMEOUT:?} waiting for {what}; \
                     total {:?}; per path: {paths:#?}",
                    s.total
                )
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task: nothing outlives the test's backend.
        if let Some(task) = self.task.get_mut().unwrap().take() {
            task.abort();
        }
    }
}

#[derive(Debug, Default)]
struct GateState {
    open: bool,
    arrived: u64,
    waiting: u64,
}

/// Holds requests for one path so a test can observe idem while they are in
/// flight at the origin.
#[must_use = "an unused gate parks requests forever"]
pub struct Gate {
    path: String,
    state: Arc<watch::Sender<GateState>>,
}

impl Gate {
    /// Releases parked requests and lets later ones through.
    pub fn open(&self) {
        self.state.send_modify(|g| g.open = true);
    }

    /// Waits until `n` requests in total have reached the gate (parked now or
    /// earlier); panics after [`WAIT_TIMEOUT`].
    pub async fn wait_started(&self, n: u64) {
        let mut rx = self.state.subscribe();
        let waited = tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|g| g.arrived >= n)).await;
        let ok = matches!(waited, Ok(Ok(_)));
        drop(waited);
        if !ok {
            panic!(
                "backend: timed out after {WAIT_TIMEOUT:?} waiting for {n} requests at the gate \
                 on {}; state {:?}",
                self.path,
                *self.state.borrow()
            );
        }
    }

    /// Requests that ever reached the gate.
    pub fn arrived(&self) -> u64 {
        self.state.borrow().arrived
    }

    /// Requests parked right now (aborted ones leave).
    pub fn waiting(&self) -> u64 {
        self.state.borrow().waiting
    }
}

/// A port nobody listens on, for "backend refuses connections". The port is
/// released before returning, so another process could in theory take it;
/// on loopback with an ephemeral port this is good enough for tests.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// [`free_port`] as an address, for an upstream that refuses connections.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Deterministic, printable, non-periodic bytes, so a test can compare a
/// streamed body with what the backend sent and catch reordered or dropped
/// chunks.
pub fn pattern(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..len as u64)
        .map(|i| {
            // splitmix64 of the offset
            let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            ALPHABET[(x & 63) as usize]
        })
        .collect()
}

async fn accept_loop(listener: TcpListener, state: Shared, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let mut id = 0;
                state.send_modify(|s| {
                    s.connections += 1;
                    id = s.connections;
                });
                conns.spawn(serve_connection(state.clone(), stream, id));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// How a request leaves the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    KeepAlive,
    /// Graceful FIN.
    Close,
    /// RST: SO_LINGER 0, then close.
    Reset,
}

async fn serve_connection(state: Shared, mut stream: TcpStream, conn_id: u64) {
    let mut buf = Vec::with_capacity(8 * 1024);
    loop {
        let req = match read_request(&mut stream, &mut buf, conn_id).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(err) => {
                let body = format!("backend: bad request: {err}\n");
                let head = response_head(400, &[], Some(body.len()), true);
                let _ = stream.write_all(&[head, body.into_bytes()].concat()).await;
                return;
            }
        };
        let path = req.path().to_owned();
        let end = handle_request(&state, &mut stream, &mut buf, req).await;
        if end != End::KeepAlive {
            if end == End::Reset {
                let _ = stream.set_zero_linger();
            } else {
                let _ = stream.shutdown().await;
            }
            drop(stream);
            mark_finished(&state, &path);
            return;
        }
        mark_finished(&state, &path);
    }
}

fn mark_finished(state: &Shared, path: &str) {
    state.send_modify(|s| s.path_mut(path).finished += 1);
}

#[derive(Clone, Copy)]
enum Outcome {
    Completed,
    Aborted,
}

fn record(state: &Shared, path: &str, outcome: Outcome) {
    state.send_modify(|s| {
        let State { paths, total, .. } = s;
        let per_path = &mut paths.entry(path.to_owned()).or_default().counts;
        for c in [per_path, total] {
            match outcome {
                Outcome::Completed => c.completed += 1,
                Outcome::Aborted => c.aborted += 1,
            }
        }
    });
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    stream.read_buf(buf).await.map_err(|e| e.to_string())
}

/// `Ok(None)` is a clean end of the connection between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    conn_id: u64,
) -> Result<Option<RecordedRequest>, String> {
    let (mut req, consumed) = loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let req = RecordedRequest {
                        method: parsed.method.unwrap_or_default().to_owned(),
                        path_and_query: parsed.path.unwrap_or_default().to_owned(),
                        version: parsed.version.unwrap_or(1),
                        headers: parsed
                            .headers
                            .iter()
                            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                            .collect(),
                        trailers: Vec::new(),
                        body: Vec::new(),
                        connection: conn_id,
                    };
                    break (req, n);
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err("request head too large".into())
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("malformed request head: {e}")),
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed inside the request head".into()),
            Err(e) => return Err(e.to_string()),
            Ok(_) => {}
        }
    };
    buf.drain(..consumed);

    let chunked = req.header_values("transfer-encoding").iter().any(|v| {
        String::from_utf8_lossy(v)
            .to_ascii_lowercase()
            .contains("chunked")
    });
    if chunked {
        let (body, trailers) = read_chunked(stream, buf).await?;
        req.body = body;
        req.trailers = trailers;
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        while buf.len() < len {
            if read_more(stream, buf).await? == 0 {
                return Err("connection closed inside the request body".into());
            }
        }
        req.body = buf.drain(..len).collect();
    }
    Ok(Some(req))
}

async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..pos].to_vec();
            buf.drain(..pos + 2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD {
            return Err("line too long in chunked body".into());
        }
        if read_more(stream, buf).await? == 0 {
            return Err("connection closed inside a chunked body".into());
        }
    }
}

type Fields = Vec<(String, Vec<u8>)>;

async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(Vec<u8>, Fields), String> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream, buf).await?;
        let line = String::from_utf8_lossy(&line);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let line = read_line(stream, buf).await?;
                if line.is_empty() {
                    return Ok((body, trailers));
                }
                let text = String::from_utf8_lossy(&line);
                let (name, value) = text
                    .split_once(':')
                    .ok_or_else(|| format!("bad trailer {text:?}"))?;
                trailers.push((
                    name.trim().to_ascii_lowercase(),
                    value.trim().as_bytes().to_vec(),
                ));
            }
        }
        while buf.len() < size + 2 {
            if read_more(stream, buf).await? == 0 {
                return Err("connection closed inside a chunk".into());
            }
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err("chunk not terminated by CRLF".into());
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

struct PeerGone;

/// Runs `fut` while reading from the peer, because the only way to notice
/// that idem dropped the upstream connection is to see EOF or an error on a
/// read. Bytes that arrive meanwhile (a pipelined request) stay in `buf`.
async fn watch_peer<F: Future>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    fut: F,
) -> Result<F::Output, PeerGone> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Ok(out),
            read = stream.read_buf(buf) => match read {
                Ok(0) | Err(_) => return Err(PeerGone),
                Ok(_) => {}
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ResetBeforeHeaders,
    CloseBeforeHeaders,
    ResetMidBody,
    Stall,
    MalformedStatus,
    CloseAfterResponse,
}

#[derive(Default)]
struct Spec {
    delay: Option<Duration>,
    status: u16,
    body: Option<Vec<u8>>,
    body_size: Option<usize>,
    echo: bool,
    content_type: Option<Vec<u8>>,
    set_cookie: Vec<Vec<u8>>,
    extra_headers: Vec<(String, Vec<u8>)>,
    close: bool,
    chunks: usize,
    chunk_pause: Duration,
    fault: Option<Fault>,
    chunked: bool,
    trailers: bool,
    slow: bool,
    close_delimited: bool,
}

impl Spec {
    fn parse(req: &RecordedRequest) -> Result<Spec, String> {
        let num = |name: &str| -> Result<Option<u64>, String> {
            req.header(name)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("{name}: not a number: {v:?}"))
                })
                .transpose()
        };
        let raw = |name: &str| find_header(&req.headers, name).map(<[u8]>::to_vec);
        let mut spec = Spec {
            delay: num("x-delay-ms")?.map(Duration::from_millis),
            status: num("x-status")?
                .map(|s| u16::try_from(s).unwrap_or(0))
                .unwrap_or(200),
            body: raw("x-body"),
            body_size: num("x-body-size")?.map(|n| n as usize),
            echo: req.header("x-echo").is_some_and(|v| v.trim() == "1"),
            content_type: raw("x-content-type"),
            set_cookie: req
                .header_values("x-set-cookie")
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
            extra_headers: req
                .header_values("x-header")
                .into_iter()
                .map(|v| {
                    let text = String::from_utf8_lossy(v);
                    let (name, value) = text.split_once(':').unwrap_or((&text, ""));
                    (
                        name.trim().to_ascii_lowercase(),
                        value.trim().as_bytes().to_vec(),
                    )
                })
                .collect(),
            close: req.wants_close()
                || req
                    .header("x-connection-close")
                    .is_some_and(|v| v.trim() == "1"),
            chunks: num("x-chunks")?.map_or(DEFAULT_CHUNKS, |n| n.max(1) as usize),
            chunk_pause: Duration::from_millis(num("x-chunk-ms")?.unwrap_or(DEFAULT_CHUNK_MS)),
            ..Spec::default()
        };
        if !(100..=999).contains(&spec.status) {
            return Err(format!("x-status out of range: {}", spec.status));
        }
        for value in req.header_values("x-fault") {
            for name in String::from_utf8_lossy(value).split(',') {
                let name = name.trim().to_ascii_lowercase();
                let terminal = match name.as_str() {
                    "" => continue,
                    "slow-body" => {
                        spec.slow = true;
                        continue;
                    }
                    "chunked" => {
                        spec.chunked = true;
                        continue;
                    }
                    "trailers" => {
                        spec.chunked = true;
                        spec.trailers = true;
                        continue;
                    }
                    "close-delimited" => {
                        spec.close_delimited = true;
                        spec.close = true;
                        continue;
                    }
                    "reset-before-headers" => Fault::ResetBeforeHeaders,
                    "close-before-headers" => Fault::CloseBeforeHeaders,
                    "reset-mid-body" => Fault::ResetMidBody,
                    "stall" => Fault::Stall,
                    "malformed-status" => Fault::MalformedStatus,
                    "close-after-response" => Fault::CloseAfterResponse,
                    other => return Err(format!("unknown x-fault {other:?}")),
                };
                if spec.fault.replace(terminal).is_some() {
                    return Err("more than one terminal x-fault".into());
                }
            }
        }
        Ok(spec)
    }
}

async fn handle_request(
    state: &Shared,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    req: RecordedRequest,
) -> End {
    let path = req.path().to_owned();
    let method = req.method.clone();
    let body = req.body.clone();
    let spec = Spec::parse(&req);

    let mut call = 0;
    let mut gate = None;
    state.send_modify(|s| {
        let p = s.path_mut(&path);
        p.counts.started += 1;
        call = p.counts.started;
        gate = p.gate.clone();
        s.total.started += 1;
        s.log.push(req);
    });

    let spec = match spec {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!("backend: {method} {path}: {err}");
            let body = format!("backend: {err}\n").into_bytes();
            let head = response_head(400, &[], Some(body.len()), false);
            return finish_simple(state, stream, &path, [head, body].concat(), End::KeepAlive)
                .await;
        }
    };

    if let Some(gate) = gate {
        gate.send_modify(|g| {
            g.arrived += 1;
            g.waiting += 1;
        });
        let mut rx = gate.subscribe();
        let released = watch_peer(stream, buf, async move {
            let _ = rx.wait_for(|g| g.open).await.map(|_| ());
        })
        .await;
        gate.send_modify(|g| g.waiting -= 1);
        if released.is_err() {
            record(state, &path, Outcome::Aborted);
            return End::Close;
        }
    }

    if path.rsplit('/').next() == Some("rows") {
        return rows(state, stream, buf, &path, &method, &body, &spec).await;
    }

    if let Some(delay) = spec.delay {
        if watch_peer(stream, buf, tokio::time::sleep(delay))
            .await
            .is_err()
        {
            record(state, &path, Outcome::Aborted);
            return End::Close;
        }
    }

    match spec.fault {
        Some(Fault::ResetBeforeHeaders) => return End::Reset,
        Some(Fault::CloseBeforeHeaders) => return End::Close,
        Some(Fault::MalformedStatus) => {
            let _ = stream.write_all(b"HTTP/1.1 abc nonsense\r\n\r\n").await;
            return End::Close;
        }
        Some(Fault::Stall) => {
            let _ = watch_peer(stream, buf, std::future::pending::<()>()).await;
            record(state, &path, Outcome::Aborted);
            return End::Close;
        }
        _ => {}
    }

    let (body, default_type): (Vec<u8>, &[u8]) = if spec.echo {
        (body, b"application/octet-stream")
    } else if let Some(b) = spec.body.clone() {
        (b, b"text/plain")
    } else if let Some(n) = spec.body_size {
        (pattern(n), b"application/octet-stream")
    } else {
        let json = format!(
            "{{\"path\":{},\"call\":{call}}}",
            serde_json::to_string(&path).unwrap()
        );
        (json.into_bytes(), b"application/json")
    };
    let bodyless = method.eq_ignore_ascii_case("HEAD")
        || spec.status < 200
        || spec.status == 204
        || spec.status == 304;
    let mut fields: Fields = vec![
        (
            "content-type".into(),
            spec.content_type.clone().unwrap_or(default_type.to_vec()),
        ),
        ("x-backend-call".into(), call.to_string().into_bytes()),
    ];
    for cookie in &spec.set_cookie {
        fields.push(("set-cookie".into(), cookie.clone()));
    }
    fields.extend(spec.extra_headers.iter().cloned());

    if spec.fault == Some(Fault::ResetMidBody) {
        let head = response_head(spec.status, &fields, Some(body.len()), false);
        let half = &body[..body.len() / 2];
        let _ = stream.write_all(&[head.as_slice(), half].concat()).await;
        let _ = stream.flush().await;
        return End::Reset;
    }

    let close = spec.close;
    let end = if close || spec.fault == Some(Fault::CloseAfterResponse) {
        End::Close
    } else {
        End::KeepAlive
    };

    // The wire image as a list of writes, paced only for slow-body.
    let mut writes: Vec<Vec<u8>> = Vec::new();
    if bodyless {
        let len = (spec.status >= 200 && spec.status != 204).then_some(body.len());
        writes.push(response_head(spec.status, &fields, len, close));
    } else if spec.close_delimited {
        writes.push(response_head(spec.status, &fields, None, true));
        writes.extend(split(&body, spec.chunks).into_iter().map(<[u8]>::to_vec));
    } else if spec.chunked {
        if spec.trailers {
            fields.push(("trailer".into(), b"x-trailer".to_vec()));
        }
        fields.push(("transfer-encoding".into(), b"chunked".to_vec()));
        writes.push(response_head(spec.status, &fields, None, close));
        for piece in split(&body, spec.chunks) {
            writes.push([format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat());
        }
        let trailer: &[u8] = if spec.trailers {
            b"0\r\nx-trailer: done\r\n\r\n"
        } else {
            b"0\r\n\r\n"
        };
        writes.push(trailer.to_vec());
    } else {
        writes.push(response_head(spec.status, &fields, Some(body.len()), close));
        writes.extend(split(&body, spec.chunks).into_iter().map(<[u8]>::to_vec));
    }

    let written = if spec.slow {
        write_paced(stream, buf, writes, spec.chunk_pause).await
    } else {
        stream.write_all(&writes.concat()).await.is_ok()
    };
    if written && stream.flush().await.is_ok() {
        record(state, &path, Outcome::Completed);
        end
    } else {
        record(state, &path, Outcome::Aborted);
        End::Close
    }
}

/// Head plus first piece at once, then one piece per pause: a proxy that
/// streams shows the first bytes long before the last.
async fn write_paced(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    writes: Vec<Vec<u8>>,
    pause: Duration,
) -> bool {
    let mut writes = writes.into_iter();
    let first: Vec<u8> = writes.by_ref().take(2).flatten().collect();
    if stream.write_all(&first).await.is_err() {
        return false;
    }
    for piece in writes {
        if stream.flush().await.is_err()
            || watch_peer(stream, buf, tokio::time::sleep(pause))
                .await
                .is_err()
            || stream.write_all(&piece).await.is_err()
        {
            return false;
        }
    }
    true
}

fn split(body: &[u8], pieces: usize) -> Vec<&[u8]> {
    if body.is_empty() {
        return Vec::new();
    }
    let size = body.len().div_ceil(pieces.max(1));
    body.chunks(size).collect()
}

async fn finish_simple(
    state: &Shared,
    stream: &mut TcpStream,
    path: &str,
    bytes: Vec<u8>,
    end: End,
) -> End {
    if stream.write_all(&bytes).await.is_ok() && stream.flush().await.is_ok() {
        record(state, path, Outcome::Completed);
        end
    } else {
        record(state, path, Outcome::Aborted);
        End::Close
    }
}

async fn rows(
    state: &Shared,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    path: &str,
    method: &str,
    body: &[u8],
    spec: &Spec,
) -> End {
    let end = if spec.close {
        End::Close
    } else {
        End::KeepAlive
    };
    let json = |status: u16, value: serde_json::Value| {
        let body = value.to_string().into_bytes();
        let fields = vec![("content-type".to_owned(), b"application/json".to_vec())];
        [
            response_head(status, &fields, Some(body.len()), spec.close),
            body,
        ]
        .concat()
    };

    if method.eq_ignore_ascii_case("GET") {
        let rows: Vec<serde_json::Value> = state
            .borrow()
            .rows
            .iter()
            .map(|r| serde_json::json!({"id": r.id, "name": r.name}))
            .collect();
        return finish_simple(state, stream, path, json(200, rows.into()), end).await;
    }
    let Some(name) = parse_name(body) else {
        let bytes = json(400, serde_json::json!({"error": "body needs a name"}));
        return finish_simple(state, stream, path, bytes, end).await;
    };

    // The check, under the lock...
    let existing = state
        .borrow()
        .rows
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.id);
    // ...the lock released, the slow part of the view...
    let mut peer_gone = false;
    if let Some(delay) = spec.delay {
        let deadline = Instant::now() + delay;
        if watch_peer(stream, buf, tokio::time::sleep_until(deadline))
            .await
            .is_err()
        {
            peer_gone = true;
            tokio::time::sleep_until(deadline).await;
        }
    }
    // ...and the insert, trusting a stale check.
    let (status, id, created) = match existing {
        Some(id) => (200, id, false),
        None => {
            let mut id = 0;
            state.send_modify(|s| {
                id = s.rows.len() as u64 + 1;
                s.rows.push(Row {
                    id,
                    name: name.clone(),
                });
            });
            (201, id, true)
        }
    };
    if peer_gone {
        record(state, path, Outcome::Aborted);
        return End::Close;
    }
    let bytes = json(
        status,
        serde_json::json!({"id": id, "name": name, "created": created}),
    );
    finish_simple(state, stream, path, bytes, end).await
}

fn parse_name(body: &[u8]) -> Option<String> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        return map.get("name")?.as_str().map(str::to_owned);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.trim()
        .split('&')
        .find_map(|pair| pair.strip_prefix("name="))
        .map(form_decode)
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn response_head(
    status: u16,
    fields: &[(String, Vec<u8>)],
    len: Option<usize>,
    close: bool,
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Whatever");
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    for (name, value) in fields {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(len) = len {
        head.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn path_of(path_and_query: &str) -> &str {
    path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p)
}

fn find_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}
