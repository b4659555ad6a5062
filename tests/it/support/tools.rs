//! What the front-proxy and protocol tests need from outside the crate: Debian programs
//! (nginx, HAProxy, curl), the test virtualenv's Python, and a supervisor for the processes
//! they start.
//!
//! A missing tool fails the test with the package to install: these tests are never skipped.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::sync::oneshot;

/// A cold Python interpreter importing grpcio on a loaded 2-core machine.
pub const APP_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails the test unless `bin` runs, naming the Debian package that provides it.
pub fn require_tool(bin: &str, version_arg: &str, debian_package: &str) {
    let found = Command::new(bin)
        .arg(version_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{bin}` is not installed: this test runs the real program. Install the Debian \
         package `{debian_package}` (apt-get install {debian_package}; .ci/run does this) \
         and run the tests again."
    );
}

/// The repository this test binary was built from.
pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/apps/<rel>`, the scripts the tests run.
pub fn app_path(rel: &str) -> PathBuf {
    let path = repo_dir().join("tests/apps").join(rel);
    assert!(path.is_file(), "missing test app {}", path.display());
    path
}

/// `<repo>/.venv/bin/python`, the interpreter with `tests/requirements.txt` installed.
pub fn python() -> PathBuf {
    let python = repo_dir().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: the gRPC and WebSocket tests run Python apps from \
         tests/requirements.txt. Run scripts/test-deps (python3 -m venv .venv && \
         .venv/bin/pip install -r tests/requirements.txt) and run the tests again.",
        python.display()
    );
    python
}

/// A loopback listener on a port the kernel picked, to hand to a child process (nginx,
/// HAProxy) as an inherited descriptor: the child never binds, so no other process can take
/// the port between our choosing it and the child listening, and a connection made before
/// the child is ready waits in the backlog instead of being refused.
pub struct Inherited {
    listener: TcpListener,
}

impl Inherited {
    pub fn new() -> Inherited {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Inherited { listener }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local_addr")
    }

    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Default for Inherited {
    fn default() -> Self {
        Inherited::new()
    }
}

/// Lets the child keep `fds` across exec (std opens everything close-on-exec) and puts it
/// in its own process group, so that one signal reaches it and any workers it forks.
pub fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    cmd.process_group(0);
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and touches
    // only the child's descriptor table.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A child process the test started, with the files it logs to. Dropping it kills it (its
/// whole process group when it leads one) and reaps it; when the test is failing, its logs
/// are printed first.
pub struct Supervised {
    name: String,
    child: Option<Child>,
    group: bool,
    logs: Vec<PathBuf>,
}

impl Supervised {
    /// `group`: the child was started with `process_group(0)` and may fork workers.
    pub fn new(name: &str, child: Child, group: bool, logs: Vec<PathBuf>) -> Supervised {
        Supervised {
            name: name.to_owned(),
            child: Some(child),
            group,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status if the child has already exited (it is then reaped).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything the child logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for path in &self.logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            out.push_str(&format!(
                "--- {} {} ---\n{text}\n",
                self.name,
                path.display()
            ));
        }
        out
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.group {
                stop_group(&child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long a process group leader gets to stop its workers on SIGTERM.
const GROUP_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops a process group led by `child` (nginx's master and its worker): SIGTERM first, so
/// the master reaps its workers itself (a worker orphaned by SIGKILL lingers as a zombie
/// until init collects it), then SIGKILL for anything left. The leader is never reaped
/// here: while it is unreaped its pid, which is the group id, cannot be reused.
fn stop_group(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscalls on our own unreaped child and its group.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + GROUP_STOP_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
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
        // With WNOHANG, a zero pid in `info` means "still running".
        let exited = rc != 0 || unsafe { info.si_pid() } != 0;
        if exited || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} (the test failed) ---\n{}", self.name, self.logs());
        }
        self.kill();
    }
}

/// A long-running app (a Python server) that prints `listening PORT` on stdout once it
/// accepts connections. Killed and reaped on drop.
pub struct App {
    proc: Supervised,
    port: u16,
    _dir: Option<super::TempDir>,
}

impl App {
    /// Runs `python script args...`; stderr goes to a file in `dir` for failure messages.
    pub async fn start_python(name: &str, script: &str, args: &[String]) -> App {
        let dir = super::TempDir::new();
        let stderr_path = dir.path().join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("create app stderr file");
        let mut child = Command::new(python())
            .arg("-u")
            .arg(app_path(script))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {script}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut proc = Supervised::new(name, child, false, vec![stderr_path]);
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("listening ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(port.trim().to_owned());
                    }
                }
            }
        });
        let port = match tokio::time::timeout(APP_START_TIMEOUT, rx).await {
            Ok(Ok(port)) => port
                .parse()
                .unwrap_or_else(|e| panic!("{name}: bad port {port:?}: {e}")),
            Ok(Err(_)) => panic!(
                "{name} exited ({:?}) before `listening PORT`\n{}",
                proc.try_exit(),
                proc.logs()
            ),
            Err(_) => panic!(
                "{name} printed no `listening PORT` within {APP_START_TIMEOUT:?}\n{}",
                proc.logs()
            ),
        };
        App {
            proc,
            port,
            _dir: Some(dir),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// Runs a command to completion within `timeout` (killed if it overruns) and returns its
/// output; the caller asserts on it.
pub async fn run_bounded(cmd: &mut tokio::process::Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let what = format!("{cmd:?}");
    tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"))
}

/// Runs `python tests/apps/<script> args...` to completion and returns its stdout, failing
/// the test with its stderr when it exits non-zero.
pub async fn run_python(script: &str, args: &[String]) -> String {
    let out = run_bounded(
        tokio::process::Command::new(python())
            .arg(app_path(script))
            .args(args),
        APP_START_TIMEOUT,
    )
    .await;
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
