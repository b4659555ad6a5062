//! The backends in use: each configured address, resolved to endpoints, health checked,
//! chosen round robin.
//!
//! A configured name may resolve to several addresses; each is an [`Endpoint`] of its own,
//! with its own health, connection pool and reuse record. Names are resolved again every
//! `resolve_interval` (endpoints that persist keep their state); a name that does not
//! resolve (yet) has no endpoints and is logged once per change, not a reason to refuse to
//! start. IP literals and Unix sockets are never resolved.
//!
//! Health: every `health_check_interval` each endpoint gets a TCP connect or an HTTP `GET`
//! (2xx is up), within the interval (at least the connect timeout). A change of state is
//! one log line naming the endpoint and the cause (WARN down, INFO up). An endpoint not
//! checked yet counts as up for choosing, and not for readiness.

use super::pool::Pool;
use super::reuse::Reuse;
use crate::config::address::{Address, Backend};
use crate::config::settings::{HealthCheckSettings, UpstreamSettings};
use arc_swap::ArcSwap;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession as H1Session;
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One address idem connects to.
pub(crate) struct Endpoint {
    /// Unique for the process (a re-resolved address keeps its endpoint and id).
    pub(crate) id: u64,
    /// The index of the configured backend it was resolved from: its metrics series.
    pub(crate) backend: usize,
    /// How logs name it: the configured address, and the resolved one when they differ.
    pub(crate) label: String,
    /// The peer template: address and timeouts (no pool settings).
    pub(crate) peer: HttpPeer,
    health: AtomicU8,
    /// What this backend has shown about keeping connections.
    pub(crate) reuse: Arc<Reuse>,
    /// Idle connections for idem's own calls.
    pub(crate) pool: Pool,
    /// Why the last health check failed, to log a change of cause while down too.
    down_because: parking_lot::Mutex<Option<String>>,
    /// When the pass-through path last returned each connection (by descriptor) to
    /// Pingora's pool, to know how long one it reuses sat idle (`http::pass_through`).
    pub(crate) released: parking_lot::Mutex<std::collections::HashMap<i32, Instant>>,
}

const UNCHECKED: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Endpoint {
    /// Up, or not checked yet.
    pub(crate) fn is_eligible(&self) -> bool {
        self.health.load(Ordering::Relaxed) != DOWN
    }

    /// Passed its last health check.
    pub(crate) fn is_up(&self) -> bool {
        self.health.load(Ordering::Relaxed) == UP
    }
}

/// One configured backend and what it resolves to.
struct Target {
    backend: Backend,
    endpoints: Vec<Arc<Endpoint>>,
    /// Why the last resolution failed, to log only changes.
    unresolved: Option<String>,
}

/// Every backend of the upstream.
pub(crate) struct Backends {
    settings: UpstreamSettings,
    targets: parking_lot::Mutex<Vec<Target>>,
    /// All endpoints, in configuration order, for choosing without a lock.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
    ids: AtomicU64,
    /// The metrics index of the first configured backend (see [`Endpoint::backend`]).
    first_backend: usize,
}

impl Backends {
    /// Resolves every configured backend once (blocking: call before serving); names that
    /// do not resolve start with no endpoint and a WARN line.
    pub(crate) fn resolve(settings: &UpstreamSettings, first_backend: usize) -> Arc<Backends> {
        let backends = Arc::new(Backends {
            settings: settings.clone(),
            targets: parking_lot::Mutex::new(
                settings
                    .backends
                    .iter()
                    .map(|b| Target {
                        backend: b.clone(),
                        endpoints: Vec::new(),
                        unresolved: None,
                    })
                    .collect(),
            ),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            first_backend,
        });
        let found: Vec<_> = settings
            .backends
            .iter()
            .map(|b| lookup_blocking(&b.address))
            .collect();
        backends.apply(found);
        backends
    }

    /// The next eligible endpoint not in `tried` (ids), round robin; when none is eligible,
    /// any untried one (a health check may lag behind a backend that just came back).
    pub(crate) fn select(&self, tried: &[u64]) -> Option<Arc<Endpoint>> {
        let all = self.endpoints.load();
        if all.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = |eligible_only: bool| {
            (0..all.len())
                .map(|i| &all[(start + i) % all.len()])
                .find(|e| !tried.contains(&e.id) && (!eligible_only || e.is_eligible()))
                .cloned()
        };
        pick(true).or_else(|| pick(false))
    }

    /// Whether any endpoint passed its last health check.
    pub(crate) fn any_up(&self) -> bool {
        self.endpoints.load().iter().any(|e| e.is_up())
    }

    /// Number of endpoints now.
    pub(crate) fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    /// Every endpoint now.
    pub(crate) fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Resolves names again and checks health, forever (the caller runs it as a background
    /// task and drops it at shutdown).
    pub(crate) async fn maintain(self: Arc<Self>, connector: Arc<TransportConnector>) {
        let s = &self.settings;
        let mut resolve = tokio::time::interval(s.resolve_interval);
        let mut check = tokio::time::interval(s.health_check_interval);
        resolve.tick().await; // resolved at start already
        loop {
            tokio::select! {
                _ = resolve.tick() => {
                    let addresses: Vec<Address> = self.targets.lock().iter().map(|t| t.backend.address.clone()).collect();
                    let mut found = Vec::with_capacity(addresses.len());
                    for a in &addresses {
                        found.push(lookup(a).await);
                    }
                    self.apply(found);
                }
                _ = check.tick() => self.check_all(&connector).await,
            }
        }
    }

    /// Puts a resolution in force: endpoints that persist keep their state.
    fn apply(&self, found: Vec<Result<Vec<pingora::protocols::l4::socket::SocketAddr>, String>>) {
        let mut targets = self.targets.lock();
        for (backend, (t, found)) in targets.iter_mut().zip(found).enumerate() {
            match found {
                Ok(addrs) => {
                    if let Some(why) = t.unresolved.take() {
                        tracing::info!(backend = %t.backend, "backend resolves again (it did not: {why})");
                    }
                    let endpoints: Vec<Arc<Endpoint>> = addrs
                        .into_iter()
                        .map(|addr| {
                            t.endpoints
                                .iter()
                                .find(|e| e.peer._address == addr)
                                .cloned()
                                .unwrap_or_else(|| {
                                    self.endpoint(self.first_backend + backend, &t.backend, addr)
                                })
                        })
                        .collect();
                    let before: Vec<u64> = t.endpoints.iter().map(|e| e.id).collect();
                    let after: Vec<u64> = endpoints.iter().map(|e| e.id).collect();
                    if before != after && !matches!(t.backend.address, Address::Unix(_)) {
                        let list: Vec<String> = endpoints
                            .iter()
                            .map(|e| e.peer._address.to_string())
                            .collect();
                        if !before.is_empty() || t.backend.address.to_string() != list.join(", ") {
                            tracing::info!(backend = %t.backend, "backend resolves to {}", list.join(", "));
                        }
                    }
                    t.endpoints = endpoints;
                }
                Err(why) => {
                    if t.unresolved.as_deref() != Some(why.as_str()) {
                        tracing::warn!(
                            backend = %t.backend,
                            "backend does not resolve: {why}; it gets no requests until it does (resolved again every {})",
                            humantime::format_duration(self.settings.resolve_interval)
                        );
                    }
                    // A name that stops resolving keeps its last addresses: a DNS outage is
                    // not the backend's, and health checks still say whether they answer.
                    t.unresolved = Some(why);
                }
            }
        }
        let all: Vec<Arc<Endpoint>> = targets
            .iter()
            .flat_map(|t| t.endpoints.iter().cloned())
            .collect();
        self.endpoints.store(Arc::new(all));
    }

    fn endpoint(
        &self,
        backend: usize,
        configured: &Backend,
        addr: pingora::protocols::l4::socket::SocketAddr,
    ) -> Arc<Endpoint> {
        let s = &self.settings;
        let label = match &configured.address {
            Address::Tcp { host, .. } if host.parse::<std::net::IpAddr>().is_err() => {
                format!("{configured} ({addr})")
            }
            _ => configured.to_string(),
        };
        let mut peer = match &addr {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => {
                let tls = s.tls.as_ref().filter(|_| configured.tls);
                match tls {
                    Some(tls) => super::tls::peer(*a, configured, tls),
                    None => HttpPeer::new(*a, false, String::new()),
                }
            }
            pingora::protocols::l4::socket::SocketAddr::Unix(_) => {
                let path = match &configured.address {
                    Address::Unix(p) => p.to_string_lossy().to_string(),
                    _ => String::new(),
                };
                HttpPeer::new_uds(&path, false, String::new()).expect("a valid socket path")
            }
        };
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.read_timeout = Some(s.read_timeout);
        peer.options.write_timeout = Some(s.read_timeout);
        Arc::new(Endpoint {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            backend,
            label,
            peer,
            health: AtomicU8::new(match s.health_check {
                HealthCheckSettings::None => UP,
                _ => UNCHECKED,
            }),
            reuse: Arc::new(Reuse::new(Instant::now())),
            pool: Pool::new(),
            released: parking_lot::Mutex::new(std::collections::HashMap::new()),
            down_because: parking_lot::Mutex::new(None),
        })
    }

    async fn check_all(&self, connector: &TransportConnector) {
        if self.settings.health_check == HealthCheckSettings::None {
            return;
        }
        let all = self.endpoints.load_full();
        let checks = all.iter().map(|e| async move {
            match check(&self.settings, connector, &e.peer).await {
                Ok(()) => {
                    if e.health.swap(UP, Ordering::Relaxed) == DOWN {
                        tracing::info!(backend = %e.label, "backend is up again");
                    }
                    *e.down_because.lock() = None;
                }
                Err(why) => {
                    e.health.store(DOWN, Ordering::Relaxed);
                    // One line per change: going down, or down for another reason.
                    let mut because = e.down_because.lock();
                    if because.as_deref() != Some(why.as_str()) {
                        tracing::warn!(backend = %e.label, "backend is down: {why}");
                        *because = Some(why);
                    }
                }
            }
        });
        futures::future::join_all(checks).await;
    }
}

/// A Pingora error in a few words: its kind and its innermost cause (for a TLS handshake,
/// what the handshake said: the connector puts the socket's local address, which changes
/// on every attempt, innermost).
fn describe(e: &pingora::Error) -> String {
    if let Some(why) = super::tls::handshake_error(e) {
        return format!("{} ({why})", e.etype().as_str());
    }
    let root = e.root_cause().to_string();
    if root.is_empty() || root == e.etype().as_str() {
        e.etype().as_str().to_string()
    } else {
        format!("{} ({root})", e.etype().as_str())
    }
}

/// One health check; `Err` says why the endpoint is down, in words for the log.
async fn check(
    s: &UpstreamSettings,
    connector: &TransportConnector,
    peer: &HttpPeer,
) -> Result<(), String> {
    let within = s.health_check_interval.max(s.connect_timeout);
    let attempt = async {
        let stream = connector
            .new_stream(peer)
            .await
            .map_err(|e| format!("connect: {}", describe(&e)))?;
        let HealthCheckSettings::Http { path, host } = &s.health_check else {
            return Ok(());
        };
        // What a client connecting to the backend would send; a socket file has no name
        // to send, and `localhost` is what app servers accept by default.
        let host = host.clone().unwrap_or_else(|| match &peer._address {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => a.to_string(),
            pingora::protocols::l4::socket::SocketAddr::Unix(_) => "localhost".to_string(),
        });
        let mut h1 = H1Session::new_with_options(stream, peer);
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)
            .map_err(|e| format!("health check request: {e}"))?;
        req.insert_header(http::header::HOST, host.as_str())
            .map_err(|e| format!("health check Host {host:?}: {e}"))?;
        req.insert_header(http::header::CONNECTION, "close")
            .map_err(|e| format!("health check request: {e}"))?;
        h1.write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("GET {path}: {}", describe(&e)))?;
        h1.read_response()
            .await
            .map_err(|e| format!("GET {path}: {}", describe(&e)))?;
        let status = h1.get_status().map_or(0, |s| s.as_u16());
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {path} with Host {host} answered {status}"))
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(within)
        )),
    }
}

/// Resolves a configured address without blocking a runtime thread.
async fn lookup(a: &Address) -> Result<Vec<pingora::protocols::l4::socket::SocketAddr>, String> {
    match a {
        Address::Tcp { host, port } => {
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return Ok(vec![SocketAddr::new(ip, *port).into()]);
            }
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => dedup_sorted(addrs.collect()),
                Err(e) => Err(e.to_string()),
            }
        }
        Address::Unix(path) => unix(path),
    }
}

/// [`lookup`] before the runtime runs.
fn lookup_blocking(a: &Address) -> Result<Vec<pingora::protocols::l4::socket::SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    match a {
        Address::Tcp { host, port } => match (host.as_str(), *port).to_socket_addrs() {
            Ok(addrs) => dedup_sorted(addrs.collect()),
            Err(e) => Err(e.to_string()),
        },
        Address::Unix(path) => unix(path),
    }
}

fn dedup_sorted(
    mut addrs: Vec<SocketAddr>,
) -> Result<Vec<pingora::protocols::l4::socket::SocketAddr>, String> {
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err("no address".to_string());
    }
    Ok(addrs.into_iter().map(Into::into).collect())
}

fn unix(path: &std::path::Path) -> Result<Vec<pingora::protocols::l4::socket::SocketAddr>, String> {
    let addr = std::os::unix::net::SocketAddr::from_pathname(path).map_err(|e| e.to_string())?;
    Ok(vec![addr.into()])
}
