//! Benchmark helper for `bench/run.sh` (not part of idem). Loopback only.
//!
//! ```text
//! burst free-ports N                  print N free loopback ports
//! burst backend ADDR                  tiny static backend: 200 "ok\n" to anything (keep-alive)
//! burst coalesce IDEM_BIN N [M]       coalescing burst and memory per waiter (see below)
//! burst entries IDEM_BIN M            memory cost of a stored entry (see below)
//! ```
//!
//! `coalesce`: a gated backend runs in this process and holds every POST until released.
//! 1. A fresh idem (`fingerprint` route `/fp/`, `off` route `/off/`); its idle RSS.
//! 2. N connections each send the same keyless POST to `/fp/`; once idem's `/metrics` shows
//!    `idem_waiters N-1` (and one request reached the backend), RSS is sampled; the backend is
//!    released; every answer must be 200; backend executions are counted.
//! 3. Another fresh idem; M identical POSTs to the `off` route: all M reach the backend and
//!    are held there (parked pass-through); RSS sampled; released. M defaults to N, capped so
//!    that this process (M client + M backend sockets) and idem (M + M) fit `ulimit -n`.
//!
//! Memory per waiter = (RSS with N waiters - idle RSS) / N - (RSS with M parked - idle RSS) / M:
//! what a waiting request costs beyond a request parked on a pass-through route.
//!
//! `entries`: a fresh idem in front of an in-process backend answering
//! `200 "ok"` at once; M keyed POSTs with distinct keys over 32 keep-alive connections. RSS is
//! sampled after M/4 and after M stored entries: bytes per entry = slope. Minus the average
//! accounted weight (`idem_store_bytes / idem_store_entries`: serialized status, headers and
//! body), that is the per-entry overhead.
//!
//! Output: `key=value` lines, read by `bench/run.sh`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match arg(0).as_str() {
        "free-ports" => {
            let n: usize = arg(1).parse().unwrap_or(1);
            // Keep every listener open until all are chosen, so the ports differ.
            let ls: Vec<_> = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()?;
            for l in &ls {
                println!("{}", l.local_addr()?.port());
            }
            Ok(())
        }
        "backend" => rt.block_on(async {
            let l = listen(&arg(1))?;
            let gate = Gate::open();
            serve(l, gate).await;
            Ok(())
        }),
        "coalesce" => {
            let n: usize = arg(2).parse()?;
            let m: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(n);
            rt.block_on(coalesce(arg(1), n, m))
        }
        "entries" => {
            let m: usize = arg(2).parse()?;
            rt.block_on(entries(arg(1), m))
        }
        _ => {
            eprintln!("usage: burst free-ports N | backend ADDR | coalesce IDEM_BIN N [M] | entries IDEM_BIN M");
            std::process::exit(2)
        }
    }
}

/// Counts requests and, while closed, holds the answers to POSTs.
#[derive(Clone)]
struct Gate {
    open: watch::Receiver<bool>,
    opener: Arc<watch::Sender<bool>>,
    received: Arc<AtomicUsize>,
}

impl Gate {
    fn new(open: bool) -> Gate {
        let (tx, rx) = watch::channel(open);
        Gate {
            open: rx,
            opener: Arc::new(tx),
            received: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn open() -> Gate {
        Gate::new(true)
    }
    fn release(&self) {
        self.opener.send_replace(true);
    }
}

/// A loopback listener with a deep accept queue (tokio's default of 1024 overflows when
/// thousands of parked requests connect at once).
fn listen(addr: &str) -> Res<TcpListener> {
    let addr: SocketAddr = addr.parse()?;
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    Ok(s.listen(65535)?)
}

async fn serve(l: TcpListener, gate: Gate) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let _ = backend_conn(s, gate).await;
        });
    }
}

async fn backend_conn(mut s: TcpStream, mut gate: Gate) -> Res<()> {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some((head, len)) = read_head(&mut s, &mut buf).await? else {
            return Ok(());
        };
        read_body(&mut s, &mut buf, head, len).await?;
        let post = buf.starts_with(b"POST");
        buf.drain(..head + len);
        gate.received.fetch_add(1, Ordering::Relaxed);
        if post {
            gate.open.wait_for(|o| *o).await?;
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n",
        )
        .await?;
    }
}

/// Reads until a complete head is in `buf`; returns (head length, Content-Length).
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Res<Option<(usize, usize)>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse())
                .transpose()?
                .unwrap_or(0);
            return Ok(Some((end + 4, len)));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, head: usize, len: usize) -> Res<()> {
    while buf.len() < head + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("eof in body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// One request on a connection; returns the status.
async fn exchange(s: &mut TcpStream, req: &[u8]) -> Res<u16> {
    s.write_all(req).await?;
    let mut buf = Vec::with_capacity(512);
    let (head, len) = read_head(s, &mut buf).await?.ok_or("eof before response")?;
    read_body(s, &mut buf, head, len).await?;
    let status = std::str::from_utf8(&buf[9..12])?.parse()?;
    Ok(status)
}

fn post(path: &str, key: Option<&str>, body: &str) -> Vec<u8> {
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A running idem, killed on drop.
struct Idem {
    child: Child,
    proxy: SocketAddr,
    metrics: SocketAddr,
    _dir: std::path::PathBuf,
}

impl Drop for Idem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Idem {
    fn start(bin: &str, backend: SocketAddr, extra: &str) -> Res<Idem> {
        let dir = std::env::temp_dir().join(format!("idem-burst-{}-{}", std::process::id(), {
            static N: AtomicU64 = AtomicU64::new(0);
            N.fetch_add(1, Ordering::Relaxed)
        }));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ngrace_period = \"60s\"\n\
                 [upstream]\nbackends = [\"{backend}\"]\ntotal_timeout = \"60s\"\nread_timeout = \"60s\"\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n{extra}"
            ),
        )?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("IDEM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |name: &str| -> Res<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .ok_or_else(|| format!("no {name} in {line:?}"))?;
            Ok(v.split(',').next().unwrap_or(v).parse()?)
        };
        Ok(Idem {
            proxy: field("proxy=")?,
            metrics: field("metrics=")?,
            child,
            _dir: dir,
        })
    }

    /// (VmRSS, VmHWM) in bytes.
    fn rss(&self) -> Res<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                * 1024
        };
        Ok((kb("VmRSS:"), kb("VmHWM:")))
    }

    async fn metric(&self, name: &str) -> Res<f64> {
        let mut s = TcpStream::connect(self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        let prefix = format!("{name} ");
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .ok_or_else(|| format!("metric {name} not found"))?;
        Ok(v.trim().parse()?)
    }
}

/// Opens `n` connections (at most 256 connecting at once) and sends `req` on each; returns
/// the tasks, each yielding the status.
async fn fire(
    addr: SocketAddr,
    n: usize,
    req: Arc<Vec<u8>>,
) -> Vec<tokio::task::JoinHandle<Res<u16>>> {
    let connecting = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = connecting.clone().acquire_owned().await.expect("open");
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            s.write_all(&req).await?;
            drop(permit);
            let mut buf = Vec::with_capacity(512);
            let (head, len) = read_head(&mut s, &mut buf).await?.ok_or("eof")?;
            read_body(&mut s, &mut buf, head, len).await?;
            Ok(std::str::from_utf8(&buf[9..12])?.parse()?)
        }));
    }
    tasks
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f().await {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Res<u16>>>) -> (usize, usize) {
    let (mut ok, mut other) = (0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok(200)) => ok += 1,
            _ => other += 1,
        }
    }
    (ok, other)
}

async fn coalesce(bin: String, n: usize, m: usize) -> Res<()> {
    let fd_limit = fd_limit();
    let m = m.min(fd_limit.saturating_sub(200) / 2);
    let n = n.min(fd_limit.saturating_sub(200));
    let extra = format!(
        "[[route]]\nname = \"fp\"\npath_prefix = \"/fp/\"\nmode = \"fingerprint\"\nmax_waiters_per_key = {n}\n\
         [[route]]\nname = \"off\"\npath_prefix = \"/off/\"\nmode = \"off\"\n"
    );
    let body = r#"{"order":42,"item":"same for everyone"}"#;

    // Waiters.
    let listener = listen("127.0.0.1:0")?;
    let backend = listener.local_addr()?;
    let gate = Gate::new(false);
    let server = tokio::spawn(serve(listener, gate.clone()));
    let idem = Idem::start(&bin, backend, &extra)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle, _) = idem.rss()?;
    let started = Instant::now();
    let tasks = fire(idem.proxy, n, Arc::new(post("/fp/orders", None, body))).await;
    until("idem_waiters N-1", async || {
        idem.metric("idem_waiters")
            .await
            .is_ok_and(|w| w as usize + 1 >= n)
    })
    .await?;
    let parked_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (with_waiters, _) = idem.rss()?;
    let waiters = idem.metric("idem_waiters").await? as usize;
    gate.release();
    let (ok, other) = collect(tasks).await;
    let (_, hwm) = idem.rss()?;
    let executions = gate.received.load(Ordering::Relaxed);
    drop(idem);
    server.abort();
    println!("n={n}");
    println!("waiters={waiters}");
    println!("parked_in_ms={}", parked_in.as_millis());
    println!("backend_executions={executions}");
    println!("answers_200={ok}");
    println!("answers_other={other}");
    println!("rss_idle={idle}");
    println!("rss_waiters={with_waiters}");
    println!("rss_peak_waiters={hwm}");

    // Parked pass-through.
    let listener = listen("127.0.0.1:0")?;
    let backend = listener.local_addr()?;
    let gate = Gate::new(false);
    let server = tokio::spawn(serve(listener, gate.clone()));
    let idem = Idem::start(&bin, backend, &extra)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle_pt, _) = idem.rss()?;
    let tasks = fire(idem.proxy, m, Arc::new(post("/off/orders", None, body))).await;
    until("M requests at the backend", async || {
        gate.received.load(Ordering::Relaxed) >= m
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (with_parked, _) = idem.rss()?;
    gate.release();
    let (ok_pt, other_pt) = collect(tasks).await;
    drop(idem);
    server.abort();
    println!("m={m}");
    println!("rss_idle_passthrough={idle_pt}");
    println!("rss_parked_passthrough={with_parked}");
    println!("passthrough_answers_200={ok_pt}");
    println!("passthrough_answers_other={other_pt}");
    let per_waiter = (with_waiters as f64 - idle as f64) / n as f64;
    let per_parked = (with_parked as f64 - idle_pt as f64) / m as f64;
    println!("bytes_per_waiting_request={per_waiter:.0}");
    println!("bytes_per_parked_passthrough={per_parked:.0}");
    println!("bytes_per_waiter={:.0}", per_waiter - per_parked);
    Ok(())
}

async fn entries(bin: String, m: usize) -> Res<()> {
    let listener = listen("127.0.0.1:0")?;
    let backend = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, Gate::open()));
    let extra = format!(
        "[store]\nmax_entries = {}\nmax_bytes = \"4GiB\"\nmax_keys_per_scope = {}\n",
        m * 2,
        m * 2
    );
    let idem = Idem::start(&bin, backend, &extra)?;
    let next = Arc::new(AtomicUsize::new(0));
    let body = r#"{"order":42}"#;
    // Store keys [from, to) over 32 connections.
    let store = async |to: usize| -> Res<()> {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let next = next.clone();
            let addr = idem.proxy;
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        return Res::Ok(());
                    }
                    let key = format!("entry-{i:012}");
                    let status = exchange(&mut s, &post("/orders", Some(&key), body)).await?;
                    if status != 200 {
                        return Err(format!("status {status}").into());
                    }
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        next.store(to, Ordering::Relaxed);
        Ok(())
    };
    let quarter = m / 4;
    store(quarter).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss1, _) = idem.rss()?;
    let e1 = idem.metric("idem_store_entries").await?;
    store(m).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss2, _) = idem.rss()?;
    let e2 = idem.metric("idem_store_entries").await?;
    let bytes = idem.metric("idem_store_bytes").await?;
    let weight = bytes / e2;
    let per_entry = (rss2 as f64 - rss1 as f64) / (e2 - e1);
    drop(idem);
    server.abort();
    println!("entries={e2}");
    println!("accounted_bytes_per_entry={weight:.0}");
    println!("rss_bytes_per_entry={per_entry:.0}");
    println!("overhead_bytes_per_entry={:.0}", per_entry - weight);
    Ok(())
}

fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}
