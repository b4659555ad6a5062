//! A real HAProxy in front of idem: one frontend on a loopback port whose directives, and
//! the backend section, are written by the test.
//!
//! The listening sockets are bound by the test and inherited (`bind fd@N`), so HAProxy
//! never races another process for a port. Readiness: a second inherited listener carries
//! a `monitor-uri` frontend, answered only once HAProxy is running (a connect alone proves
//! nothing: the kernel accepts into the backlog of an inherited socket before HAProxy
//! starts). HAProxy logs to stderr, kept in a file for failure messages.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use super::tools::{inherit_fds, require_tool, Inherited, Supervised};
use super::{http_request, RawConn, TempDir, WAIT_TIMEOUT};

const BIN: &str = "haproxy";
const READY_URI: &str = "/__haproxy_ready";

/// A running HAProxy (single process, `-db`: foreground, no daemon).
pub struct HaProxy {
    proc: Supervised,
    addr: SocketAddr,
    _dir: TempDir,
}

impl HaProxy {
    /// `mode`: `http` or `tcp`; `frontend`: directives after the frontend's `bind`;
    /// `backend`: the body of the frontend's default backend (its `server` lines).
    pub async fn start(mode: &str, frontend: &str, backend: &str) -> HaProxy {
        require_tool(BIN, "-v", "haproxy");
        let dir = TempDir::new();
        let front = Inherited::new();
        let ready = Inherited::new();
        let addr = front.addr();
        let log_format = if mode == "http" {
            "option httplog"
        } else {
            "option tcplog"
        };
        let conf = format!(
            "global
    nbthread 1
    log stderr format raw local0 info

defaults
    log global
    mode {mode}
    {log_format}
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend ready
    mode http
    bind fd@{ready_fd}
    monitor-uri {READY_URI}

frontend front
    bind fd@{front_fd}
{frontend}
    default_backend back

backend back
{backend}
",
            ready_fd = ready.fd(),
            front_fd = front.fd(),
        );
        let conf_path = dir.write("haproxy.cfg", &conf);
        let log_path = dir.path().join("haproxy.log");
        let log = std::fs::File::create(&log_path).expect("create haproxy log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("-db")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log);
        inherit_fds(&mut cmd, vec![front.fd(), ready.fd()]);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let ready_addr = ready.addr();
        drop(front);
        drop(ready);
        let mut proc = Supervised::new("haproxy", child, true, vec![conf_path, log_path]);
        wait_ready(&mut proc, ready_addr).await;
        HaProxy {
            proc,
            addr,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

async fn wait_ready(proc: &mut Supervised, ready_addr: SocketAddr) {
    let probe = async {
        let mut conn = RawConn::connect(ready_addr).await;
        conn.send(&http_request(
            "GET",
            READY_URI,
            &[("connection", "close")],
            b"",
        ))
        .await;
        conn.try_read_response(false).await
    };
    match tokio::time::timeout(WAIT_TIMEOUT, probe).await {
        Ok(Ok(resp)) if resp.status == 200 => {}
        other => panic!(
            "HAProxy did not answer its monitor URI within {WAIT_TIMEOUT:?} ({:?}; exit {:?})\n{}",
            other.map(|r| r.map(|r| r.status)),
            proc.try_exit(),
            proc.logs()
        ),
    }
}
