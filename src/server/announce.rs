//! The listening line and readiness: announced only once every listener is this process's
//! own, then the periodic sweep of expired records.
//!
//! Pingora reports its services started before their listeners are bound, so a client that
//! connects as soon as it reads the line could be refused (it was, in about one start in
//! seven), or reach another process that took a port resolved from port 0 in between.
//! Linux-only check through `/proc`; elsewhere, a successful connect.

use crate::dedup::coordinator::Coordinator;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often expired records are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sweeps expired records, marks readiness and prints the listening line once.
pub(crate) struct Housekeeping {
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) ready: Arc<AtomicBool>,
    /// The listening line waits for the signal handlers: before them, SIGTERM or SIGHUP
    /// would get the default action and kill the process.
    pub(crate) signals_installed: Arc<Notify>,
    /// Every address idem listens on. Pingora reports its services started before their
    /// listeners are bound, so the listening line (and readiness) also waits until each
    /// accepts a connection: a client that connects as soon as it reads the line must not
    /// be refused (it was, in about one start in seven).
    pub(crate) listeners: Vec<SocketAddr>,
    pub(crate) announce: String,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.signals_installed.notified().await;
        for addr in &self.listeners {
            wait_accepting(*addr).await;
        }
        self.ready.store(true, Ordering::Relaxed);
        tracing::info!("{}", self.announce);
        println!("{}", self.announce);
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.coordinator.store().sweep(tokio::time::Instant::now()),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Returns once this process listens on `addr`, or after 10 s with a warning. A connection
/// that succeeds is not proof: a port resolved from port 0 can be taken by another process
/// before Pingora binds it (Pingora then logs "is in use, will try again" and retries), and
/// the connection would reach that process. So on Linux the check is that a listening socket
/// on the port is one of this process's own file descriptors; elsewhere, that it accepts.
async fn wait_accepting(addr: SocketAddr) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = match own_listener(addr.port()) {
            Some(mine) => mine,
            None => tokio::net::TcpStream::connect(addr).await.is_ok(),
        };
        if ready {
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            tracing::warn!(%addr, "listener not accepting connections 10 s after start");
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether one of this process's sockets listens on TCP `port` (`None` where `/proc` does not
/// tell: not Linux).
fn own_listener(port: u16) -> Option<bool> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy();
            if let Some(n) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(n.to_string());
            }
        }
    }
    let mut found = false;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        found |= text.lines().skip(1).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            listening && on_port && f.get(9).is_some_and(|i| inodes.contains(*i))
        });
    }
    Some(found)
}
