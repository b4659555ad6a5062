//! The listening line and readiness: announced only once every listener is this process's
//! own, then the periodic sweep of expired records.
//!
//! Pingora reports its services started before their listeners are bound, and retries a
//! bind that fails ("is in use, will try again") for ever. So the line waits until each
//! listening socket is one of this process's file descriptors (`/proc/self/net/*`), which a
//! successful connect does not prove (the port may have been taken by another process
//! between idem's own check and Pingora's bind). A listener not this process's own within
//! [`GIVE_UP_AFTER`] stops idem with its address, exit status 1: idem never claims a
//! socket it does not hold. Linux-only check; elsewhere, a successful connect.

use super::Bound;
use crate::dedup::coordinator::Coordinator;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often expired records are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long Pingora may take to bind a listener before idem gives up. Generous: a port in
/// use at start-up is found at once by `concrete` (in `server`); this covers the race where
/// another process takes it between that check and Pingora's bind, and a loaded machine
/// must not turn a slow bind into an exit.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Sweeps expired records, marks readiness and prints the listening line once.
pub(crate) struct Housekeeping {
    /// The store to sweep.
    pub(crate) coordinator: Arc<Coordinator>,
    /// Readiness: set once every listener is this process's own.
    pub(crate) ready: Arc<AtomicBool>,
    /// The listening line waits for the signal handlers: before them, SIGTERM or SIGHUP
    /// would get the default action and kill the process.
    pub(crate) signals_installed: Arc<Notify>,
    /// Every listener idem has.
    pub(crate) listeners: Vec<Bound>,
    /// The line to print.
    pub(crate) announce: String,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.signals_installed.notified().await;
        for listener in &self.listeners {
            if !wait_own(listener).await {
                tracing::error!(%listener, "cannot listen: the address is not this process's within {} (in use by another process?)", humantime::format_duration(GIVE_UP_AFTER));
                eprintln!(
                    "idem: cannot listen on {listener}: the address is in use by another process"
                );
                std::process::exit(1);
            }
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

/// Returns whether this process listens on `listener` within [`GIVE_UP_AFTER`].
async fn wait_own(listener: &Bound) -> bool {
    let give_up = tokio::time::Instant::now() + GIVE_UP_AFTER;
    loop {
        let own = match listener {
            Bound::Tcp(addr) => match own_tcp_listener(addr.port()) {
                Some(own) => own,
                None => tokio::net::TcpStream::connect(addr).await.is_ok(),
            },
            Bound::Unix(path) => match own_unix_listener(path) {
                Some(own) => own,
                None => tokio::net::UnixStream::connect(path).await.is_ok(),
            },
        };
        if own {
            return true;
        }
        if tokio::time::Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Inodes of this process's sockets (`None` where `/proc` does not tell: not Linux).
fn own_socket_inodes() -> Option<HashSet<String>> {
    let mut inodes = HashSet::new();
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
    Some(inodes)
}

/// Whether one of this process's sockets listens on TCP `port`.
fn own_tcp_listener(port: u16) -> Option<bool> {
    let inodes = own_socket_inodes()?;
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

/// Whether one of this process's sockets listens on the Unix socket `path`.
fn own_unix_listener(path: &Path) -> Option<bool> {
    let inodes = own_socket_inodes()?;
    let text = std::fs::read_to_string("/proc/self/net/unix").ok()?;
    let path = path.to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path; listening: Flags 00010000 (accepting).
    Some(text.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.get(3) == Some(&"00010000")
            && f.get(6).is_some_and(|i| inodes.contains(*i))
            && f.get(7) == Some(&&*path)
    }))
}
