//! A real nginx in front of idem, as deployments run it: one `server` on a loopback port,
//! its body (locations, `proxy_pass`, `proxy_set_header`) written by the test.
//!
//! nginx cannot listen on port 0, and choosing a free port for it races with every other
//! process on the machine. Instead the test binds the port itself and hands the listening
//! socket to nginx through the `NGINX` environment variable, the mechanism of nginx's binary
//! upgrade: nginx adopts an inherited socket whose address matches a `listen` directive
//! instead of binding. No retry is needed, and a connection made early waits in the backlog.
//!
//! The master process stays on (`master_process off` with an inherited socket segfaults
//! nginx 1.22 at start-up); master and worker share a process group that the fixture kills
//! as a whole on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::tools::{inherit_fds, require_tool, Inherited, Supervised};
use super::{TempDir, WAIT_TIMEOUT};

const BIN: &str = "nginx";

/// A running nginx with a private prefix directory.
pub struct Nginx {
    // Declared first: the processes die before their directory goes.
    proc: Supervised,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx with one `server { listen ...; <server_body> }`.
    pub async fn start(server_body: &str) -> Nginx {
        Nginx::start_listening(server_body, "").await
    }

    /// The same with `listen ... ssl`: `server_body` names `ssl_certificate` and its key.
    pub async fn start_tls(server_body: &str) -> Nginx {
        Nginx::start_listening(server_body, " ssl").await
    }

    /// The same with `listen ...<listen_params>` (e.g. " ssl http2").
    pub async fn start_listening(server_body: &str, listen_params: &str) -> Nginx {
        require_tool(BIN, "-v", "nginx");
        let dir = TempDir::new();
        let listener = Inherited::new();
        let addr = listener.addr();
        let d = dir.path().display().to_string();
        // Workers of a root master run as `nobody`, which may not connect to a Unix socket
        // idem (root) created; the tests' files are the test user's anyway.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {addr}{listen_params};
{server_body}
    }}
}}
"
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let error_log = dir.path().join("error.log");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create nginx stderr file");
        let mut cmd = Command::new(BIN);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            // Errors before the config is read would otherwise go to /var/log/nginx.
            .arg("-e")
            .arg(&error_log)
            .env("NGINX", format!("{};", listener.fd()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        inherit_fds(&mut cmd, vec![listener.fd()]);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        // nginx holds its own copy now; ours must not keep the port alive if nginx dies.
        drop(listener);
        let proc = Supervised::new(
            "nginx",
            child,
            true,
            vec![conf_path.clone(), error_log, stderr_path],
        );
        let mut nginx = Nginx { proc, addr, dir };
        nginx.wait_ready().await;
        nginx
    }

    /// Ready once the master has written its pid file, which it does after adopting the
    /// socket and reading the whole config, and the port accepts.
    async fn wait_ready(&mut self) {
        let pid_file = self.dir.path().join("nginx.pid");
        let want = self.proc.pid().to_string();
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut backoff = Duration::from_millis(2);
        loop {
            if let Some(status) = self.proc.try_exit() {
                panic!(
                    "nginx exited ({status}) during start-up\n{}",
                    self.proc.logs()
                );
            }
            let written = std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == want);
            if written && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
                assert!(
                    log.contains("using inherited sockets"),
                    "nginx did not adopt the listening socket\n{}",
                    self.proc.logs()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx wrote no pid file within {WAIT_TIMEOUT:?}\n{}",
                self.proc.logs()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}
