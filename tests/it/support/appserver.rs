//! Real app servers (gunicorn, uWSGI, uvicorn, Node's `http`) running the test apps of
//! `tests/apps/`, for the tests of `app_servers.rs` (issue 11): idem must work in front of
//! the servers people run, with their keep-alive habits, not only in front of the harness's
//! own backend.
//!
//! A TCP server gets its listening socket from the test, as an inherited file descriptor:
//! the socket exists, and queues connections in its backlog, before the server has even
//! started, so there is no free-port race and nothing to wait for. A Unix-socket server binds
//! its own path; [`AppServerBuilder::start`] then waits for a connect to succeed.
//!
//! Each server runs in its own process group, SIGKILLed as a whole on drop: uWSGI's and
//! gunicorn's forked workers and uvicorn's spawned ones die with their master.
//!
//! The Python servers come from `.venv/` at the repository root (`scripts/test-deps` installs
//! the pinned versions of `tests/requirements.txt`), Node from the PATH. A machine without
//! them fails these tests with a message saying what to run; they are never skipped.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::TempDir;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A cold Python server with two workers on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The idle keep-alive timeout every keep-alive server is given: short, so that a test can
/// space requests across it in seconds rather than minutes (uWSGI takes whole seconds).
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long every test app keeps working after it has sent a response, as Django does
/// (`request_finished` handlers, closing database connections). During that time a server
/// that closes the connection after each response has not closed it yet.
pub const POST_RESPONSE_WORK: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppServerKind {
    /// gunicorn, sync workers: one request per connection, announced with `Connection: close`.
    GunicornSync,
    /// gunicorn, gthread workers: keep-alive, closed after `--keep-alive` idle seconds (checked
    /// once a second, so 1 to 2 s).
    GunicornGthread,
    /// uWSGI `--http-socket`: answers HTTP/1.1 with Content-Length and no `Connection: close`,
    /// then closes the connection once the app is done (the incident of issue 11).
    UwsgiHttpSocket,
    /// uWSGI `--http11-socket`: keep-alive, closed after `--socket-timeout` idle seconds.
    UwsgiHttp11Socket,
    /// uvicorn (h11): keep-alive, closed after `--timeout-keep-alive` idle seconds.
    Uvicorn,
    /// Node's `http` module: keep-alive, closed after `server.keepAliveTimeout` (the
    /// `Keep-Alive: timeout=1` it announces) plus a second of its own (Node 20 measured: 2 s).
    NodeHttp,
}

impl AppServerKind {
    pub const ALL: [AppServerKind; 6] = [
        AppServerKind::GunicornSync,
        AppServerKind::GunicornGthread,
        AppServerKind::UwsgiHttpSocket,
        AppServerKind::UwsgiHttp11Socket,
        AppServerKind::Uvicorn,
        AppServerKind::NodeHttp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AppServerKind::GunicornSync => "gunicorn (sync)",
            AppServerKind::GunicornGthread => "gunicorn (gthread)",
            AppServerKind::UwsgiHttpSocket => "uWSGI --http-socket",
            AppServerKind::UwsgiHttp11Socket => "uWSGI --http11-socket",
            AppServerKind::Uvicorn => "uvicorn",
            AppServerKind::NodeHttp => "Node http",
        }
    }

    /// Whether the server keeps a connection open after a response (until [`KEEP_ALIVE`]).
    pub fn keeps_alive(self) -> bool {
        !matches!(
            self,
            AppServerKind::GunicornSync | AppServerKind::UwsgiHttpSocket
        )
    }

    /// The program and its arguments; `listen` is `fd://N` or `unix:/path`.
    fn command(self, listen: &str, fd: Option<i32>) -> (PathBuf, Vec<String>) {
        let apps = Path::new(ROOT).join("tests/apps");
        let apps = apps.to_str().expect("UTF-8 repository path").to_owned();
        let keep_alive = KEEP_ALIVE.as_secs().to_string();
        let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        match self {
            AppServerKind::GunicornSync | AppServerKind::GunicornGthread => {
                let mut args = s(&[
                    "--bind",
                    listen,
                    "--workers",
                    "2",
                    // gunicorn 27 otherwise opens one control socket per user in ~/.gunicorn,
                    // which parallel tests would fight over.
                    "--no-control-socket",
                    "--log-level",
                    "warning",
                    "--chdir",
                    &apps,
                ]);
                if self == AppServerKind::GunicornGthread {
                    args.extend(s(&[
                        "--worker-class",
                        "gthread",
                        "--threads",
                        "4",
                        "--keep-alive",
                        &keep_alive,
                    ]));
                } else {
                    args.extend(s(&["--worker-class", "sync"]));
                }
                args.push("wsgi_app:app".into());
                (venv_bin("gunicorn"), args)
            }
            AppServerKind::UwsgiHttpSocket | AppServerKind::UwsgiHttp11Socket => {
                let socket = if self == AppServerKind::UwsgiHttpSocket {
                    "--http-socket"
                } else {
                    "--http11-socket"
                };
                let file = format!("{apps}/wsgi_app.py");
                let args = s(&[
                    // Unknown options are errors, not silently ignored.
                    "--strict",
                    "--master",
                    "--processes",
                    "2",
                    socket,
                    listen,
                    "--wsgi-file",
                    &file,
                    "--callable",
                    "app",
                    "--need-app",
                    "--disable-logging",
                    // For --http11-socket, how long a worker waits for the next request on an
                    // idle connection before closing it (core/reader.c), in seconds.
                    "--socket-timeout",
                    &keep_alive,
                ]);
                (venv_bin("uwsgi"), args)
            }
            AppServerKind::Uvicorn => {
                let fd = fd
                    .expect("uvicorn is started on an inherited socket")
                    .to_string();
                let args = s(&[
                    "--fd",
                    &fd,
                    "--workers",
                    "2",
                    "--timeout-keep-alive",
                    &keep_alive,
                    "--http",
                    "h11",
                    "--loop",
                    "asyncio",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    "--app-dir",
                    &apps,
                    "asgi_app:app",
                ]);
                (venv_bin("uvicorn"), args)
            }
            AppServerKind::NodeHttp => (PathBuf::from("node"), vec![format!("{apps}/node_app.js")]),
        }
    }
}

fn venv_bin(name: &str) -> PathBuf {
    let path = Path::new(ROOT).join(".venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: the app-server tests run the pinned servers of tests/requirements.txt \
         from .venv/. Run scripts/test-deps (it creates .venv/; .ci/run does this) and run the \
         tests again.",
        path.display()
    );
    path
}

fn require_node() {
    let found = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`node` is not installed: the app-server tests run Node's http module. Install Node.js \
         (Debian package `nodejs`; scripts/test-deps does this) and run the tests again."
    );
}

/// One request as the app saw it: a line of its execution log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// The `Idempotency-Key` header, if any.
    pub key: Option<String>,
    /// The `Host` header.
    pub host: String,
    /// The status the app answered with.
    pub status: u16,
    /// The worker process that ran it.
    pub pid: u32,
}

impl Execution {
    fn parse(line: &str) -> Execution {
        let fields: Vec<&str> = line.split(' ').collect();
        let [method, target, key, host, status, pid] = fields[..] else {
            panic!("app execution log: malformed line {line:?}");
        };
        let opt = |v: &str| (v != "-").then(|| v.to_owned());
        Execution {
            method: method.to_owned(),
            target: target.to_owned(),
            key: opt(key),
            host: opt(host).unwrap_or_default(),
            status: status
                .parse()
                .unwrap_or_else(|_| panic!("app execution log: status in {line:?}")),
            pid: pid
                .parse()
                .unwrap_or_else(|_| panic!("app execution log: pid in {line:?}")),
        }
    }

    /// The host without its port, as Django's `ALLOWED_HOSTS` compares it.
    pub fn host_name(&self) -> &str {
        self.host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(name, _)| name)
    }
}

enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

pub struct AppServerBuilder {
    kind: AppServerKind,
    envs: Vec<(OsString, OsString)>,
    unix: bool,
}

impl AppServerBuilder {
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Django's `ALLOWED_HOSTS`: the app answers 400 to every request whose Host is not one
    /// of `hosts` (port ignored).
    pub fn allowed_hosts(self, hosts: &str) -> Self {
        self.env("ALLOWED_HOSTS", hosts)
    }

    /// Listen on a Unix socket in the server's scratch directory instead of loopback TCP.
    pub fn unix_socket(mut self) -> Self {
        self.unix = true;
        self
    }

    pub async fn start(self) -> AppServer {
        let kind = self.kind;
        if kind == AppServerKind::NodeHttp {
            require_node();
        }
        let dir = TempDir::new();
        let exec_log = dir.path().join("executions.log");
        File::create(&exec_log).unwrap_or_else(|e| panic!("create {}: {e}", exec_log.display()));
        let output_path = dir.path().join("output.log");
        let output = File::create(&output_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", output_path.display()));

        let (listener, listen, arg) = if self.unix {
            assert!(
                matches!(
                    kind,
                    AppServerKind::GunicornSync | AppServerKind::GunicornGthread
                ),
                "the Unix-socket tests run gunicorn only, not {}",
                kind.name()
            );
            let path = dir.path().join("app.sock");
            let arg = format!("unix:{}", path.display());
            (None, Listen::Unix(path), arg)
        } else {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let addr = listener.local_addr().expect("local_addr");
            let arg = format!("fd://{}", listener.as_raw_fd());
            (Some(listener), Listen::Tcp(addr), arg)
        };
        let fd = listener.as_ref().map(|l| l.as_raw_fd());
        let (program, args) = kind.command(&arg, fd);

        let mut cmd = Command::new(&program);
        // Settings a developer's environment could slip into the servers (uWSGI reads any
        // UWSGI_* variable as an option, gunicorn GUNICORN_CMD_ARGS, both WEB_CONCURRENCY).
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("UWSGI_")
                || text == "GUNICORN_CMD_ARGS"
                || text == "WEB_CONCURRENCY"
                || text == "ALLOWED_HOSTS"
            {
                cmd.env_remove(&name);
            }
        }
        cmd.args(&args)
            .current_dir(ROOT)
            .env("APP_EXEC_LOG", &exec_log)
            .env(
                "APP_POST_RESPONSE_MS",
                POST_RESPONSE_WORK.as_millis().to_string(),
            )
            .env("APP_KEEP_ALIVE_MS", KEEP_ALIVE.as_millis().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("dup output file"))
            .stderr(output)
            // Own process group: Drop kills the workers with the master.
            .process_group(0);
        if let Some(fd) = fd {
            cmd.env("APP_LISTEN_FD", fd.to_string());
            // SAFETY: fcntl is async-signal-safe, and only the child's copy of the descriptor
            // changes: the listener stays close-on-exec in this (multi-threaded) process, so
            // no other test's child inherits it.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} for {}: {e}", program.display(), kind.name()));
        // The server holds the socket now; without this copy, a server that dies refuses
        // connections instead of leaving them queued forever.
        drop(listener);

        let server = AppServer {
            kind,
            child: Mutex::new(Some(child)),
            listen,
            exec_log,
            output: output_path,
            dir,
        };
        if let Listen::Unix(path) = &server.listen {
            let path = path.clone();
            server.wait_unix_accepting(&path).await;
        }
        server
    }
}

/// A running app server. Dropping it SIGKILLs its process group and reaps the master.
pub struct AppServer {
    kind: AppServerKind,
    child: Mutex<Option<Child>>,
    listen: Listen,
    exec_log: PathBuf,
    output: PathBuf,
    /// Holds the logs and the Unix socket; removed after Drop has killed the processes.
    dir: TempDir,
}

impl AppServer {
    /// `kind` on an inherited loopback TCP socket.
    pub async fn start(kind: AppServerKind) -> AppServer {
        AppServer::builder(kind).start().await
    }

    pub fn builder(kind: AppServerKind) -> AppServerBuilder {
        AppServerBuilder {
            kind,
            envs: Vec::new(),
            unix: false,
        }
    }

    pub fn kind(&self) -> AppServerKind {
        self.kind
    }

    pub fn addr(&self) -> SocketAddr {
        match &self.listen {
            Listen::Tcp(addr) => *addr,
            Listen::Unix(path) => panic!("{} listens on {}", self.kind.name(), path.display()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn unix_path(&self) -> &Path {
        match &self.listen {
            Listen::Unix(path) => path,
            Listen::Tcp(addr) => panic!("{} listens on {addr}", self.kind.name()),
        }
    }

    /// Every request the app has handled so far, in the order they started (each is logged
    /// before its work, so one still running is included).
    pub fn executions(&self) -> Vec<Execution> {
        let text = std::fs::read_to_string(&self.exec_log)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.exec_log.display()));
        text.lines().map(Execution::parse).collect()
    }

    /// The executions of `method` on exactly `target` (path and query).
    pub fn executions_of(&self, method: &str, target: &str) -> Vec<Execution> {
        self.executions()
            .into_iter()
            .filter(|e| e.method == method && e.target == target)
            .collect()
    }

    /// Waits until `pred` holds for the executions so far; panics after `timeout` with them.
    pub async fn wait_executions(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Execution]) -> bool,
    ) -> Vec<Execution> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.executions();
            if pred(&seen) {
                return seen;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: waited {timeout:?} for {what}; executions: {seen:#?}\n--- server output ---\n{}",
                self.kind.name(),
                self.output_text()
            );
            // The log is a file: there is nothing to be woken by, so it is re-read.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the server printed (stdout and stderr).
    pub fn output_text(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Panics with the server's output if its master has exited.
    pub fn assert_running(&self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited ({status}) while the test needed it\n--- server output ---\n{}",
                self.kind.name(),
                self.output_text()
            );
        }
    }

    /// How the master ended, if it has. It is left unreaped (WNOWAIT), so its pid, the
    /// group's id, stays reserved until Drop has signalled the group.
    fn exit_status(&self) -> Option<String> {
        let child = self.child.lock().unwrap();
        let pid = child.as_ref()?.id();
        // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        let status = unsafe { info.si_status() };
        Some(match info.si_code {
            libc::CLD_EXITED => format!("exit code {status}"),
            _ => format!("signal {status}"),
        })
    }

    async fn wait_unix_accepting(&self, path: &Path) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut backoff = Duration::from_millis(2);
        loop {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} did not accept on {} within {START_TIMEOUT:?}\n--- server output ---\n{}",
                self.kind.name(),
                path.display(),
                self.output_text()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.get_mut().unwrap().take() else {
            return;
        };
        // The group id is the master's pid, which cannot be reused while the master is
        // unreaped: the signal reaches this server's processes and no others.
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} output (the test failed) ---\n{}",
                self.kind.name(),
                self.output_text()
            );
        }
    }
}
