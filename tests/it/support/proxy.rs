//! Runs the real `idem` binary, as the tests' system under test.
//!
//! Contract with the binary: `idem --config FILE` prints exactly one line
//! `listening proxy=ADDR[,ADDR...][ tls=ADDR,...] metrics=ADDR[ admin=ADDR]` to stdout once
//! its listeners are bound; `idem check --config FILE` validates a config.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::WAIT_TIMEOUT;

const BIN: &str = env!("CARGO_BIN_EXE_idem");
/// Startup includes a cold binary on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory removed on drop, for configs and any files a config
/// points at (unique per call: tests run in parallel in one process).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "idem-it-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let file = self.path.join(name);
        std::fs::write(&file, contents).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        file
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Bytes from one of the child's pipes, and whether the pipe has closed.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    closed: bool,
}

/// The child, reaped only under the lock. Signals are sent only while the
/// status is unknown, i.e. while the child is unreaped and its pid cannot
/// have been reused by another process.
struct ChildSlot {
    child: Child,
    status: Option<ExitStatus>,
}

struct Proc {
    pid: u32,
    slot: Mutex<ChildSlot>,
    exit: watch::Sender<Option<ExitStatus>>,
}

impl Proc {
    fn signal(&self, sig: libc::c_int) -> bool {
        let slot = self.slot.lock().unwrap();
        if slot.status.is_some() {
            return false;
        }
        // SAFETY: plain syscall; the pid is our unreaped child (see ChildSlot).
        unsafe { libc::kill(self.pid as libc::pid_t, sig) == 0 }
    }

    fn reap(&self) {
        let mut slot = self.slot.lock().unwrap();
        if slot.status.is_none() {
            if let Ok(status) = slot.child.wait() {
                slot.status = Some(status);
                self.exit.send_replace(Some(status));
            }
        }
    }

    fn kill_and_reap(&self) {
        let mut slot = self.slot.lock().unwrap();
        if slot.status.is_none() {
            let _ = slot.child.kill();
            if let Ok(status) = slot.child.wait() {
                slot.status = Some(status);
                self.exit.send_replace(Some(status));
            }
        }
    }
}

/// Kills and reaps on drop, including when `Idem::start` panics half-way.
struct ProcGuard(Arc<Proc>);

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.0.kill_and_reap();
    }
}

/// Waits for the child to exit without reaping it (WNOWAIT), then reaps under
/// the lock: an exit is noticed promptly, yet a concurrent `signal` can never
/// hit a recycled pid.
fn spawn_reaper(proc: Arc<Proc>) {
    std::thread::spawn(move || {
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    proc.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        proc.reap();
    });
}

fn drain(mut pipe: impl Read + Send + 'static, into: Arc<watch::Sender<Captured>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.send_modify(|c| c.bytes.extend_from_slice(&chunk[..n])),
            }
        }
        into.send_modify(|c| c.closed = true);
    });
}

/// Reads stdout line by line until the `listening` line, hands it over, then
/// keeps draining so the child never blocks on a full pipe.
fn drain_stdout(
    pipe: impl Read + Send + 'static,
    into: Arc<watch::Sender<Captured>>,
    ready: oneshot::Sender<String>,
) {
    std::thread::spawn(move || {
        let mut ready = Some(ready);
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            into.send_modify(|c| c.bytes.extend_from_slice(&line));
            let text = String::from_utf8_lossy(&line);
            if text.starts_with("listening ") {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(text.trim_end().to_owned());
                }
            }
        }
        // Dropping `ready` unsent tells the starter that stdout closed first.
        drop(ready);
        into.send_modify(|c| c.closed = true);
    });
}

#[derive(Default)]
pub struct IdemBuilder {
    envs: Vec<(OsString, OsString)>,
    args: Vec<OsString>,
}

impl IdemBuilder {
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Extra arguments after `--config FILE`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub async fn start(self, config: &str) -> Idem {
        let dir = TempDir::new();
        let config_path = dir.write("idem.toml", config);
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Idem::supervise(child, dir, config_path, config).await
    }
}

/// A failing test shows what idem logged (its access lines say whether a request arrived and
/// how it ended): printed when an `Idem` is dropped while the test thread panics.
impl Drop for Idem {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- idem {} stderr (the test failed) ---\n{}",
                self.proxy
                    .first()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                self.stderr_text()
            );
        }
    }
}

/// A running `idem`. Dropping it SIGKILLs and reaps the process.
pub struct Idem {
    // Declared first so the process dies before its config directory goes.
    guard: ProcGuard,
    dir: TempDir,
    config_path: PathBuf,
    proxy: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    unix: Vec<PathBuf>,
    metrics: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    stdout: Arc<watch::Sender<Captured>>,
    stderr: Arc<watch::Sender<Captured>>,
}

impl Idem {
    pub async fn start(config: &str) -> Idem {
        Idem::builder().start(config).await
    }

    pub fn builder() -> IdemBuilder {
        IdemBuilder::default()
    }

    /// Runs `idem check --config FILE`: (exit code, stdout, stderr). The code
    /// is -1 when the process died by a signal.
    pub async fn check(config: &str) -> (i32, String, String) {
        let dir = TempDir::new();
        let path = dir.write("idem.toml", config);
        let run = tokio::process::Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(START_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| panic!("`idem check` did not finish within {START_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("spawn {BIN} check: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn supervise(mut child: Child, dir: TempDir, config_path: PathBuf, config: &str) -> Idem {
        let stdout = Arc::new(watch::Sender::new(Captured::default()));
        let stderr = Arc::new(watch::Sender::new(Captured::default()));
        let (ready_tx, ready_rx) = oneshot::channel();
        drain_stdout(
            child.stdout.take().expect("piped stdout"),
            stdout.clone(),
            ready_tx,
        );
        drain(child.stderr.take().expect("piped stderr"), stderr.clone());
        let proc = Arc::new(Proc {
            pid: child.id(),
            slot: Mutex::new(ChildSlot {
                child,
                status: None,
            }),
            exit: watch::Sender::new(None),
        });
        spawn_reaper(proc.clone());
        let guard = ProcGuard(proc);

        let mut idem = Idem {
            guard,
            dir,
            config_path,
            proxy: Vec::new(),
            tls: Vec::new(),
            unix: Vec::new(),
            metrics: None,
            admin: None,
            stdout,
            stderr,
        };
        let line = match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => {
                let status = idem.wait_exit(WAIT_TIMEOUT).await;
                idem.wait_stderr_closed().await;
                panic!(
                    "idem exited ({status:?}) before printing its `listening` line\n\
                     --- config ---\n{config}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    idem.stdout_text(),
                    idem.stderr_text()
                );
            }
            Err(_) => panic!(
                "idem printed no `listening` line within {START_TIMEOUT:?}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                idem.stdout_text(),
                idem.stderr_text()
            ),
        };
        let listening = parse_listening(&line)
            .unwrap_or_else(|e| panic!("cannot parse idem's line {line:?}: {e}"));
        idem.proxy = listening.proxy;
        idem.tls = listening.tls;
        idem.unix = listening.unix;
        idem.metrics = listening.metrics;
        idem.admin = listening.admin;
        // No readiness polling: idem prints the line only once every listener accepts
        // (`listeners_accept_as_soon_as_the_listening_line_is_out`), and every test relies on it.
        idem
    }

    /// The first proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.proxy[0]
    }

    /// The first TLS listener (`[server.tls] listen`).
    pub fn tls_addr(&self) -> SocketAddr {
        *self
            .tls
            .first()
            .expect("idem's `listening` line had no tls= address (is [server.tls] set?)")
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.proxy
    }

    /// The Unix-socket proxy listeners (`listen = ["unix:/abs/path"]`), as announced.
    pub fn unix_paths(&self) -> &[PathBuf] {
        &self.unix
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .expect("idem's `listening` line had no metrics= address")
    }

    pub fn metrics_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics_addr())
    }

    /// The admin listener (`[admin] listen`, off unless configured).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("idem's `listening` line had no admin= address (is [admin] listen set?)")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr())
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.pid
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Scratch directory that lives as long as this process.
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Replaces the config file in place, e.g. before a reload signal.
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config_path.display()));
    }

    /// Sends `sig`; returns false if the process has already exited.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        self.guard.0.signal(sig)
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.guard.0.exit.borrow()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut rx = self.guard.0.exit.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        drop(waited);
        self.exit_status()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.borrow().bytes).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.borrow().bytes).into_owned()
    }

    /// Waits until stderr contains `needle` (a log line appears after the
    /// event that causes it, so asserting right away would race).
    pub async fn wait_stderr(&self, needle: &str) {
        let needle_bytes = needle.as_bytes();
        let mut rx = self.stderr.subscribe();
        // Only the new bytes (plus an overlap) are searched on each wake-up:
        // debug logs run to megabytes.
        let mut scanned: usize = 0;
        let waited = tokio::time::timeout(
            WAIT_TIMEOUT,
            rx.wait_for(|c| {
                let from = scanned.saturating_sub(needle_bytes.len());
                scanned = c.bytes.len();
                c.closed
                    || needle_bytes.is_empty()
                    || c.bytes[from..]
                        .windows(needle_bytes.len())
                        .any(|w| w == needle_bytes)
            }),
        )
        .await;
        drop(waited);
        if !self.stderr_text().contains(needle) {
            panic!(
                "idem's stderr did not show {needle:?} within {WAIT_TIMEOUT:?}\n--- stderr ---\n{}",
                self.stderr_text()
            );
        }
    }

    async fn wait_stderr_closed(&self) {
        let mut rx = self.stderr.subscribe();
        let _ = tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|c| c.closed))
            .await
            .map(|_| ());
    }
}

/// The addresses of idem's `listening` line.
struct Listening {
    proxy: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    unix: Vec<PathBuf>,
    metrics: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// `listening proxy=127.0.0.1:1,127.0.0.1:2 metrics=127.0.0.1:3 admin=127.0.0.1:4`; a
/// Unix-socket listener appears in the proxy list as `unix:/abs/path`.
fn parse_listening(line: &str) -> Result<Listening, String> {
    let mut proxy = Vec::new();
    let mut tls = Vec::new();
    let mut unix = Vec::new();
    let mut metrics = None;
    let mut admin = None;
    for token in line.split_whitespace().skip(1) {
        if let Some(list) = token.strip_prefix("proxy=") {
            for addr in list.split(',').filter(|a| !a.is_empty()) {
                if let Some(path) = addr.strip_prefix("unix:") {
                    unix.push(PathBuf::from(path));
                    continue;
                }
                proxy.push(
                    addr.parse()
                        .map_err(|e| format!("proxy address {addr:?}: {e}"))?,
                );
            }
        } else if let Some(list) = token.strip_prefix("tls=") {
            for addr in list.split(',') {
                tls.push(
                    addr.parse()
                        .map_err(|e| format!("tls address {addr:?}: {e}"))?,
                );
            }
        } else if let Some(addr) = token.strip_prefix("metrics=") {
            metrics = Some(
                addr.parse()
                    .map_err(|e| format!("metrics address {addr:?}: {e}"))?,
            );
        } else if let Some(addr) = token.strip_prefix("admin=") {
            admin = Some(
                addr.parse()
                    .map_err(|e| format!("admin address {addr:?}: {e}"))?,
            );
        }
    }
    if proxy.is_empty() && unix.is_empty() {
        return Err("no proxy= addresses".into());
    }
    Ok(Listening {
        proxy,
        tls,
        unix,
        metrics,
        admin,
    })
}
