//! Process assembly: builds the Pingora server from [`Settings`], runs it, and handles
//! signals.
//!
//! Services: the proxy (h1 + h2c) on each `[server] listen` address, the TLS proxy (h2 and
//! HTTP/1.1 by ALPN, `crate::http::tls`) on each `[server.tls] listen` address, the metrics app on
//! `[metrics] listen`, the admin app on `[admin] listen` when set, the backend health check,
//! and a housekeeping task that sweeps expired records and announces the bound addresses.
//!
//! Shutdown: SIGTERM (and SIGQUIT, since idem does not hand sockets to a successor) mark the
//! process draining (`/readyz` 503, `idem_draining` 1, answers close their connections),
//! keep the proxy listeners open for `[server] shutdown_delay`, then stop them; Pingora then
//! waits up to `grace_period`. idem exits as soon as no request is being processed and no
//! flight is running, instead of sleeping the whole period, after sending the spans still
//! queued. The metrics and admin listeners serve until the exit (`until_exit`). SIGINT
//! exits at once. SIGHUP reloads the configuration file ([`crate::config::live`]): one log line
//! says it was reloaded, or why it was refused (file:line) and that the running configuration
//! stays; another names the changed settings that need a restart.

mod announce;
mod signals;
mod until_exit;

use crate::admin::health::HealthApp;
use crate::admin::keys::AdminApp;
use crate::config::address::Address;
use crate::config::file::{OnStoreError, StoreKind};
use crate::config::live::{Live, Snapshot};
use crate::config::settings::Settings;
use crate::dedup::coordinator::Coordinator;
use crate::dedup::shadow::table::ShadowTable;
use crate::http::body_budget::BodyBudget;
use crate::http::first_bytes::FirstBytesDeadline;
use crate::http::proxy::Idem;
use crate::key::KeyDeriver;
use crate::observe::metrics::Metrics;
use crate::observe::trace::Traces;
use crate::store::memory::{Limits, MemoryStore};
use crate::store::redis::metrics::StoreMetrics;
use crate::store::redis::{RedisSettings, RedisStore};
use crate::upstream::Upstream;
use announce::Housekeeping;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use signals::{spawn_drain_watcher, Signals};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use tokio::sync::Notify;
use until_exit::UntilExit;

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
    /// The OTLP exporter could not be built.
    #[error("{0}")]
    Tracing(String),
}

/// Installs the process log (`IDEM_LOG`, `[server] log_format`) and the bridge that brings
/// Pingora's lines into it at the levels idem gives them.
pub fn init_logging(format: crate::config::file::LogFormat) {
    crate::observe::logging::init(format);
}

/// Runs idem with `settings`, read from `config_path` (re-read on SIGHUP), until it is told
/// to stop. Returns only on a start-up error.
pub fn run(settings: Settings, config_path: PathBuf) -> Result<(), StartError> {
    // Every probe stays bound until all listeners are: two of idem's own addresses that
    // overlap (`[::]:443`, dual-stack, beside `0.0.0.0:443`) stop the start here, naming the
    // second, instead of Pingora failing to bind it after the listening line.
    let mut probes = Vec::new();
    let mut concrete = |addr: &Address| {
        let (l, bound) = bind(addr)?;
        probes.extend(l);
        Ok::<_, StartError>(bound)
    };
    let listen: Vec<Bound> = settings
        .listen
        .iter()
        .map(&mut concrete)
        .collect::<Result<_, _>>()?;
    let tls_listen: Vec<Bound> = settings
        .tls
        .iter()
        .flat_map(|t| t.listen.iter())
        .map(&mut concrete)
        .collect::<Result<_, _>>()?;
    let (metrics_listen, metrics_socket) = held(&settings.metrics_listen)?;
    let admin = settings.admin_listen.as_ref().map(held).transpose()?;
    // Closed: Pingora binds these again right after.
    drop(probes);
    let admin_listen = admin.as_ref().map(|(b, _)| b.clone());
    // Before any runtime: the exporter's blocking HTTP client must not start inside one.
    let traces = settings
        .tracing
        .as_ref()
        .map(Traces::start)
        .transpose()
        .map_err(StartError::Tracing)?;

    let mut conf = ServerConf {
        threads: settings.threads,
        work_stealing: settings.work_stealing,
        grace_period_seconds: Some(settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    // Keep-alive pool sized for many concurrent leaders.
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(1024);
    // Pingora builds the TLS client configuration of every connector when the connector is
    // made, reading the system's roots each time (about 35 M instructions, several ms, for
    // each of the half-dozen connectors idem has). Only backends verified against the
    // system roots need them; otherwise the shared configuration trusts nothing, and every
    // https:// peer brings its own `tls_ca` (`upstream::tls`).
    if !uses_system_roots(&settings) {
        conf.ca_file = Some("/dev/null".to_string());
    }
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let metrics = Metrics::new();
    // Every group's backends, `[upstream]`'s first: an endpoint's metrics series is its
    // configured backend's index in this list.
    let mut backend_names: Vec<String> = Vec::new();
    let mut group = |g: &crate::config::settings::UpstreamSettings| {
        let first = backend_names.len();
        backend_names.extend(g.backends.iter().map(|b| b.to_string()));
        Arc::new(Upstream::new(
            g,
            &server.configuration,
            metrics.clone(),
            first,
        ))
    };
    // `[upstream]` first: a route's group index counts from it.
    let groups: Arc<[Arc<Upstream>]> = std::iter::once(group(&settings.upstream))
        .chain(settings.groups.iter().map(|(_, g)| group(g)))
        .collect();
    metrics.register_backends(&backend_names);
    let unix_socket_mode = settings.unix_socket_mode;
    let health = background_service(
        "backends",
        Maintain {
            groups: groups.clone(),
        },
    );

    let store = MemoryStore::new(Limits {
        max_entries: settings.store.max_entries,
        max_bytes: settings.store.max_bytes,
        max_pinned: settings.store.max_pinned,
        scope_keys: settings.store.max_keys_per_scope,
        client_keys: settings.store.max_keys_per_client,
        client_bytes: settings.store.max_bytes_per_client,
    });
    let store_stats = store.stats();
    let coordinator = Coordinator::new(store, settings.max_waiters);
    metrics.register_problems(&crate::http::problem::KINDS);
    metrics.set_bounds(
        settings.store.max_entries,
        settings.store.max_bytes,
        settings.max_waiters,
    );
    let redis = start_redis_store(&settings, &metrics, &coordinator);
    let settings_fail_closed = settings.store.on_store_error == OnStoreError::FailClosed;
    let active = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let signals_installed = Arc::new(Notify::new());

    let keys = KeyDeriver::new(settings.secret.as_deref());
    let admin_token = settings.admin_token.clone();
    let proxy_protocol = settings.proxy_protocol;
    let shadow = Arc::new(ShadowTable::new(settings.store.max_entries));
    let names: Vec<String> = settings.all_routes().map(|r| r.name.clone()).collect();
    let route_ids = metrics.register_routes(&names);
    let live = Arc::new(Live::new(Snapshot::new(settings, route_ids), config_path));
    let idem = Idem {
        keys,
        config: live.clone(),
        coordinator: coordinator.clone(),
        groups: groups.clone(),
        metrics: metrics.clone(),
        active: active.clone(),
        shadow,
        redis: redis.clone(),
        body_budget: Arc::new(BodyBudget::with_gauge(metrics.body_buffer.clone())),
        traces: traces.clone(),
        draining: draining.clone(),
    };
    // Two Pingora apps over the same state: `first_bytes.rs` tells HTTP/1 from h2c and hands
    // each connection to the app for it.
    let http1 = pingora::proxy::http_proxy(&server.configuration, idem.clone());
    let tls_proxy = (!tls_listen.is_empty()).then(|| {
        let http1 = pingora::proxy::http_proxy(&server.configuration, idem.clone());
        let h2c = pingora::proxy::http_proxy(&server.configuration, idem.clone());
        let mut service = Service::new(
            "proxy-tls".to_string(),
            FirstBytesDeadline::new(http1, h2c, live.clone(), proxy_protocol)
                .with_tls(crate::http::tls::acceptor(live.clone())),
        );
        for a in &tls_listen {
            let buffer = L4BufferSettings::default().read(0);
            if let Bound::Tcp(addr) = a {
                service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffer));
            }
        }
        service
    });
    let mut h2c = pingora::proxy::http_proxy(&server.configuration, idem);
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    h2c.server_options = Some(options);
    let mut proxy = Service::new(
        "proxy".to_string(),
        FirstBytesDeadline::new(http1, h2c, live.clone(), proxy_protocol),
    );
    for a in &listen {
        // No L4 read buffer on client connections: Pingora's HTTP/1 layer reads the head into
        // its own buffer, and the default 64 KiB buffer (zeroed by tokio) made every open
        // connection, idle or waiting on a flight, cost that much memory (BENCHMARKS.md).
        let buffer = L4BufferSettings::default().read(0);
        proxy.add_listener(match a {
            Bound::Tcp(addr) => ListenerConfig::tcp(addr.to_string()).l4_buffer(buffer),
            Bound::Unix(path) => ListenerConfig::uds(path.to_string_lossy())
                .permissions(std::fs::Permissions::from_mode(unix_socket_mode))
                .l4_buffer(buffer),
        });
    }

    let admin_service = admin.map(|(_, socket)| {
        background_service(
            "admin",
            UntilExit::new(
                "admin",
                socket,
                HttpServer::new_app(AdminApp {
                    coordinator: coordinator.clone(),
                    metrics: metrics.clone(),
                    redis: redis.clone(),
                    token: admin_token.clone(),
                }),
            ),
        )
    });

    let metrics_service = background_service(
        "metrics",
        UntilExit::new(
            "metrics",
            metrics_socket,
            HttpServer::new_app(HealthApp {
                metrics: metrics.clone(),
                coordinator: coordinator.clone(),
                store: store_stats,
                ready: ready.clone(),
                groups: groups.clone(),
                // Under fail-closed a Redis that cannot be used means 503 for every
                // deduplicated request: this replica is not ready. Under fail-open it serves.
                redis_gate: redis.clone().filter(|_| settings_fail_closed),
                draining: draining.clone(),
                active: active.clone(),
                backends: backend_names.len(),
            }),
        ),
    );

    let housekeeping = background_service(
        "housekeeping",
        Housekeeping {
            coordinator: coordinator.clone(),
            ready,
            signals_installed: signals_installed.clone(),
            listeners: listen
                .iter()
                .cloned()
                .chain(tls_listen.iter().cloned())
                .chain([metrics_listen.clone()])
                .chain(admin_listen.clone())
                .collect(),
            announce: format!(
                "listening proxy={}{} metrics={metrics_listen}{}",
                listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                if tls_listen.is_empty() {
                    String::new()
                } else {
                    format!(
                        " tls={}",
                        tls_listen
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                },
                admin_listen
                    .as_ref()
                    .map(|a| format!(" admin={a}"))
                    .unwrap_or_default()
            ),
        },
    );

    server.add_service(proxy);
    if let Some(tls) = tls_proxy {
        server.add_service(tls);
    }
    server.add_service(metrics_service);
    if let Some(admin) = admin_service {
        server.add_service(admin);
    }
    server.add_service(health);
    server.add_service(housekeeping);

    spawn_drain_watcher(&server, active, coordinator.clone(), traces);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            installed: signals_installed,
            live,
            metrics,
            coordinator: coordinator.clone(),
            draining,
        }),
    });
    std::process::exit(0)
}

/// Whether some `https://` backend is verified against the system's roots (no `tls_ca`).
fn uses_system_roots(settings: &Settings) -> bool {
    std::iter::once(&settings.upstream)
        .chain(settings.groups.iter().map(|(_, g)| g))
        .any(|g| g.backends.iter().any(|b| b.tls) && g.tls.as_ref().is_some_and(|t| t.ca.is_none()))
}

/// Starts the Redis store when `store.kind = "redis"`, waiting briefly for its first
/// connection so that the first requests are shared; if Redis is not there yet, idem starts
/// anyway and `on_store_error` applies until it connects. Purges announced by other replicas
/// drop this replica's copy of the key.
fn start_redis_store(
    settings: &Settings,
    metrics: &Metrics,
    coordinator: &Arc<Coordinator>,
) -> Option<Arc<RedisStore>> {
    if settings.store.kind != StoreKind::Redis {
        return None;
    }
    let (registry, operations) = metrics.store_families();
    let store_metrics = Arc::new(StoreMetrics::register(registry, operations));
    let local = coordinator.clone();
    let on_purge = move |key: &crate::key::DedupKey| {
        if local.store().purge(key) {
            tracing::info!(key = %key.short(), "redis store: a purge announced by a replica dropped this replica's copy");
        }
    };
    // `idem check` refuses a Redis store without a secret.
    let secret = settings.secret.as_deref().unwrap_or_default();
    let store = RedisStore::start(
        RedisSettings::from_store(&settings.store, secret),
        store_metrics,
        on_purge,
    );
    if let Some(p) = &settings.store.password {
        tracing::info!(from = ?p.from, user = settings.store.username.as_deref().unwrap_or("(the URL's, else default)"), "redis store: authenticating with the configured password");
    }
    // What this replica's store evicts (or cannot keep) of what it wrote to Redis goes
    // there too: its Redis writes stay within its own bounds.
    let weak = Arc::downgrade(&store);
    coordinator.store().set_on_evict(Box::new(move |gone| {
        if let Some(store) = weak.upgrade() {
            store.forget(gone);
        }
    }));
    if store.wait_up(settings.store.timeout * 2) {
        tracing::info!(owner = %store.owner().hex(), prefix = %settings.store.key_prefix, "redis store: ready");
    } else {
        tracing::warn!(
            on_store_error = ?settings.store.on_store_error,
            target = ?store.target(),
            reason = %store.health().err().unwrap_or_default(),
            "redis store: not reachable at start-up; serving under on_store_error until it connects"
        );
    }
    Some(store)
}

/// What `idem check` finds beyond the file itself: names that do not resolve.
#[derive(Debug, Default)]
pub struct Preflight {
    /// Reasons idem would not start (a listener whose name does not resolve).
    pub errors: Vec<String>,
    /// Worth knowing, not fatal (a backend whose name does not resolve yet: idem starts
    /// with it down).
    pub warnings: Vec<String>,
}

/// Resolves the names in `settings` as a start would, without binding anything (the
/// running idem may hold those ports).
pub fn preflight(settings: &Settings) -> Preflight {
    let mut p = Preflight::default();
    let resolves = |a: &Address| match a {
        Address::Tcp { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .map(|mut it| it.next().is_some())
            .unwrap_or(false),
        Address::Unix(_) => true,
    };
    let listeners = settings
        .listen
        .iter()
        .map(|a| ("server.listen", a))
        .chain(
            settings
                .tls
                .iter()
                .flat_map(|t| t.listen.iter())
                .map(|a| ("server.tls.listen", a)),
        )
        .chain([("metrics.listen", &settings.metrics_listen)])
        .chain(settings.admin_listen.iter().map(|a| ("admin.listen", a)));
    for (key, a) in listeners {
        if !resolves(a) {
            p.errors.push(format!("{key}: {a} does not resolve"));
        }
    }
    let groups = std::iter::once(("upstream".to_string(), &settings.upstream)).chain(
        settings
            .groups
            .iter()
            .map(|(name, g)| (format!("upstreams.{name}"), g)),
    );
    for (section, group) in groups {
        for b in &group.backends {
            if !resolves(&b.address) {
                p.warnings.push(format!(
                    "{section}.backends: {b} does not resolve (yet): idem starts with it down and resolves it again every {}",
                    humantime::format_duration(group.resolve_interval)
                ));
            }
        }
    }
    p
}

/// A listener as bound: what the `listening` line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bound {
    /// A TCP socket; port 0 was replaced by the free port found.
    Tcp(SocketAddr),
    /// A Unix-domain socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Tcp(a) => write!(f, "{a}"),
            Bound::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Binds a listener idem serves itself (metrics, admin) and keeps it: the announced address
/// is the socket held (port 0 resolved), with no window for another process to take it.
fn held(addr: &Address) -> Result<(Bound, TcpListener), StartError> {
    let (l, bound) = bind(addr)?;
    match (l, bound) {
        (Some(l), bound) => Ok((bound, l)),
        (None, _) => Err(StartError::Bind {
            addr: addr.to_string(),
            source: std::io::Error::other("not a TCP address"),
        }),
    }
}

/// Resolves `addr` and binds it (a TCP address; a Unix socket is only named). A listen
/// address is bound once before Pingora binds it: a port taken by another process stops the
/// start with its address (as nginx does), rather than Pingora retrying it for ever, and
/// port 0 is replaced by the free port found, so that the announced address is the one
/// Pingora listens on.
fn bind(addr: &Address) -> Result<(Option<TcpListener>, Bound), StartError> {
    let err = |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    };
    let (host, port) = match addr {
        Address::Unix(path) => return Ok((None, Bound::Unix(path.clone()))),
        Address::Tcp { host, port } => (host, *port),
    };
    let a = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| {
            err(std::io::Error::new(
                e.kind(),
                format!("does not resolve: {e}"),
            ))
        })?
        .next()
        .ok_or_else(|| err(std::io::Error::other("does not resolve to any address")))?;
    let l = TcpListener::bind(a).map_err(err)?;
    let bound = l.local_addr().map(Bound::Tcp).map_err(err)?;
    Ok((Some(l), bound))
}

/// Resolves names and checks backends of every group in the background.
struct Maintain {
    groups: Arc<[Arc<Upstream>]>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Maintain {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let all = futures::future::join_all(self.groups.iter().map(|g| g.maintain()));
        tokio::select! {
            _ = all => {}
            _ = shutdown.changed() => {}
        }
    }
}
