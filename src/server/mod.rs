//! Process assembly: builds the Pingora server from [`Settings`], runs it, and handles
//! signals.
//!
//! Services: the proxy (h1 + h2c) on each `[server] listen` address, the metrics app on
//! `[metrics] listen`, the admin app on `[admin] listen` when set, the backend health check,
//! and a housekeeping task that sweeps expired records and announces the bound addresses.
//!
//! Shutdown: SIGTERM (and SIGQUIT, since idem does not hand sockets to a successor) stop the
//! listeners; Pingora then waits up to `grace_period`. idem exits as soon as no request is
//! being processed and no flight is running, instead of sleeping the whole period. SIGINT
//! exits at once. SIGHUP reloads the configuration file ([`crate::config::live`]): one log line
//! says it was reloaded, or why it was refused (file:line) and that the running configuration
//! stays; another names the changed settings that need a restart.

use crate::admin::keys::AdminApp;
use crate::config::file::StoreKind;
use crate::config::live::Live;
use crate::config::settings::Settings;
use crate::dedup::coordinator::Coordinator;
use crate::dedup::shadow::table::ShadowTable;
use crate::http::first_bytes::FirstBytesDeadline;
use crate::http::proxy::Idem;
use crate::key::KeyDeriver;
use crate::observe::metrics::{Metrics, MetricsApp};
use crate::store::memory::MemoryStore;
use crate::store::redis::metrics::StoreMetrics;
use crate::store::redis::{Shared, SharedSettings};
use crate::upstream::{self, Upstream};
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{
    ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often expired records are swept and the drain condition is checked.
const TICK: Duration = Duration::from_millis(50);

/// Errors that stop idem from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A backend address could not be resolved.
    #[error("upstream backends: {0}")]
    Backends(std::io::Error),
}

/// Runs idem with `settings`, read from `config_path` (re-read on SIGHUP), until it is told
/// to stop. Returns only on a start-up error.
pub fn run(settings: Settings, config_path: PathBuf) -> Result<(), StartError> {
    let listen: Vec<SocketAddr> = settings
        .listen
        .iter()
        .map(|a| concrete(a))
        .collect::<Result<_, _>>()?;
    let metrics_listen = concrete(&settings.metrics_listen)?;
    let admin_listen = settings.admin_listen.as_deref().map(concrete).transpose()?;

    let mut conf = ServerConf {
        threads: settings.threads,
        work_stealing: settings.work_stealing,
        grace_period_seconds: Some(settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    // Keep-alive pool sized for many concurrent leaders.
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(1024);
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let lb = upstream::load_balancer(&settings.upstream).map_err(StartError::Backends)?;
    let health = background_service("health check", lb);
    let connector = Connector::new(Some(ConnectorOptions::from_server_conf(
        &server.configuration,
    )));
    let upstream = Arc::new(Upstream::new(
        health.task(),
        connector,
        settings.upstream.clone(),
    ));

    let store = MemoryStore::new(settings.store.max_entries, settings.store.max_bytes);
    store.set_scope_quota(settings.store.max_keys_per_scope);
    let store_stats = store.stats();
    let coordinator = Coordinator::new(store, settings.max_waiters);
    let metrics = Metrics::new(Vec::new());
    metrics.set_bounds(
        settings.store.max_entries,
        settings.store.max_bytes,
        settings.max_waiters,
    );
    let shared = start_shared_store(&settings, &metrics);
    let active = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let signals_installed = Arc::new(Notify::new());

    let keys = KeyDeriver::new(settings.secret.as_deref());
    let shadow = Arc::new(ShadowTable::new(settings.store.max_entries));
    let live = Arc::new(Live::new(
        settings,
        config_path,
        metrics.clone(),
        coordinator.clone(),
    ));
    let idem = Idem {
        keys,
        config: live.clone(),
        coordinator: coordinator.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
        active: active.clone(),
        shadow,
        shared,
    };
    // Two Pingora apps over the same state: `first_bytes.rs` tells HTTP/1 from h2c and hands
    // each connection to the app for it.
    let http1 = pingora::proxy::http_proxy(&server.configuration, idem.clone());
    let mut h2c = pingora::proxy::http_proxy(&server.configuration, idem);
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    h2c.server_options = Some(options);
    let mut proxy = Service::new(
        "proxy".to_string(),
        FirstBytesDeadline::new(http1, h2c, live.clone()),
    );
    for a in &listen {
        // No L4 read buffer on client connections: Pingora's HTTP/1 layer reads the head into
        // its own buffer, and the default 64 KiB buffer (zeroed by tokio) made every open
        // connection, idle or waiting on a flight, cost that much memory (BENCHMARKS.md).
        proxy.add_listener(
            ListenerConfig::tcp(a.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }

    let admin_service = admin_listen.map(|addr| {
        let mut service = Service::new(
            "admin".to_string(),
            HttpServer::new_app(AdminApp {
                coordinator: coordinator.clone(),
                metrics: metrics.clone(),
            }),
        );
        service.add_tcp(&addr.to_string());
        service
    });

    let mut metrics_service = Service::new(
        "metrics".to_string(),
        HttpServer::new_app(MetricsApp {
            metrics,
            coordinator: coordinator.clone(),
            store: store_stats,
            ready: ready.clone(),
            upstream,
        }),
    );
    metrics_service.add_tcp(&metrics_listen.to_string());

    let housekeeping = background_service(
        "housekeeping",
        Housekeeping {
            coordinator: coordinator.clone(),
            ready,
            signals_installed: signals_installed.clone(),
            listeners: listen
                .iter()
                .copied()
                .chain([metrics_listen])
                .chain(admin_listen)
                .collect(),
            announce: format!(
                "listening proxy={} metrics={metrics_listen}{}",
                listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                admin_listen
                    .map(|a| format!(" admin={a}"))
                    .unwrap_or_default()
            ),
        },
    );

    server.add_service(proxy);
    server.add_service(metrics_service);
    if let Some(admin) = admin_service {
        server.add_service(admin);
    }
    server.add_service(health);
    server.add_service(housekeeping);

    spawn_drain_watcher(&server, active, coordinator);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            installed: signals_installed,
            live,
        }),
    });
    std::process::exit(0)
}

/// Starts the Redis store when `store.kind = "redis"`, waiting briefly for its first
/// connection so that the first requests are shared; if Redis is not there yet, idem starts
/// anyway and `on_store_error` applies until it connects.
fn start_shared_store(settings: &Settings, metrics: &Metrics) -> Option<Arc<Shared>> {
    if settings.store.kind != StoreKind::Redis {
        return None;
    }
    let (registry, operations) = metrics.store_families();
    let store_metrics = Arc::new(StoreMetrics::register(registry, operations));
    let shared = Shared::start(SharedSettings::from_store(&settings.store), store_metrics);
    if shared.wait_up(settings.store.timeout * 2) {
        tracing::info!(owner = %shared.owner().hex(), "redis store: ready");
    } else {
        tracing::warn!(
            on_store_error = ?settings.store.on_store_error,
            "redis store: not reachable at start-up; serving under on_store_error until it connects"
        );
    }
    Some(shared)
}

/// Resolves `addr`; port 0 is replaced by a free port found by binding it, so that the
/// announced address is the one Pingora listens on.
fn concrete(addr: &str) -> Result<SocketAddr, StartError> {
    let err = |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    };
    let a = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("no address")))?;
    if a.port() != 0 {
        return Ok(a);
    }
    let l = TcpListener::bind(a).map_err(err)?;
    l.local_addr().map_err(err)
}

/// Sweeps expired records, marks readiness and prints the listening line once.
struct Housekeeping {
    coordinator: Arc<Coordinator>,
    ready: Arc<AtomicBool>,
    /// The listening line waits for the signal handlers: before them, SIGTERM or SIGHUP
    /// would get the default action and kill the process.
    signals_installed: Arc<Notify>,
    /// Every address idem listens on. Pingora reports its services started before their
    /// listeners are bound, so the listening line (and readiness) also waits until each
    /// accepts a connection: a client that connects as soon as it reads the line must not
    /// be refused (it was, in about one start in seven).
    listeners: Vec<SocketAddr>,
    announce: String,
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
        let mut tick = tokio::time::interval(Duration::from_secs(1));
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

/// Exits the process once a graceful shutdown has nothing left to drain.
fn spawn_drain_watcher(server: &Server, active: Arc<AtomicUsize>, coordinator: Arc<Coordinator>) {
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => loop {
                let requests = active.load(Ordering::Acquire);
                let flights = coordinator.counts().inflight;
                if requests == 0 && flights == 0 {
                    tracing::info!("graceful shutdown: nothing left in flight, exiting");
                    std::process::exit(0);
                }
                std::thread::sleep(TICK);
            },
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    });
}

/// idem's signal policy (see the module doc).
struct Signals {
    installed: Arc<Notify>,
    live: Arc<Live>,
}

impl Signals {
    fn reload(&self) {
        let file = self.live.path().display();
        match self.live.reload() {
            Ok(restart_needed) => {
                tracing::info!("SIGHUP: configuration reloaded from {file}");
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        "SIGHUP: {} changed in {file}; these settings take effect only at start-up, so the running values are kept until a restart",
                        restart_needed.join(", ")
                    );
                }
            }
            Err(e) => tracing::error!(
                "SIGHUP: configuration reload refused, the running configuration is kept: {e}"
            ),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("install SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
        self.installed.notify_one();
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = quit.recv() => {
                    tracing::info!("SIGQUIT: draining (idem does not hand its sockets over)");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => {
                    // Exit here rather than through Pingora's fast shutdown: with single-thread
                    // runtimes (`work_stealing = false`), a listener whose runtime is being torn
                    // down can spin on `accept()` failing at once ("Tokio context is being
                    // shutdown"; nothing else wakes its loop on a fast shutdown), and the process
                    // never exits. Seen in 2 of 40 starts signalled as soon as they listened.
                    tracing::info!("SIGINT: exiting at once");
                    std::process::exit(0);
                }
                _ = hup.recv() => self.reload(),
            }
        }
    }
}
