//! Validated, resolved configuration: what the proxy runs with.
//!
//! [`Settings::load`] parses proxy.toml ([`crate::config::file`]), fills every route from `[dedup]`
//! and the built-in defaults, and checks cross-field rules. Every error names the file, the
//! line and what to do, so `idem check` and a failed start read alike. After this point no
//! field is optional "to be filled later".

use crate::config::file::{
    HealthCheckKind, LogFormat, Mode, OnConcurrent, OnStoreError, RawConfig, RawPolicy, RawRoute,
    StoreKind,
};
use crate::config::route::{RoutePolicy, StatusSet};
use http::Method;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and, where possible, what to write instead.
    pub message: String,
}

/// Everything idem runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Proxy listeners (h1 and h2c).
    pub listen: Vec<String>,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// One work-stealing runtime over `threads` (true), or one single-threaded runtime per
    /// thread with each connection placed on one at random (false, the default: measured
    /// faster on every path, 8 to 24 %, see BENCHMARKS.md; a connection's requests and the
    /// upstream calls they start stay on one thread, so no cross-thread wake-ups).
    pub work_stealing: bool,
    /// SIGTERM drain budget; covers the upstream total deadline.
    pub grace_period: Duration,
    /// How long an idle keep-alive client connection is kept; also how long a new connection
    /// may take to send its first byte (`first_bytes.rs`).
    pub keepalive_timeout: Duration,
    /// Total deadline for reading a request body that idem buffers.
    pub body_read_timeout: Duration,
    /// Cap on waiters across all keys; past it a new waiter gets 503.
    pub max_waiters: usize,
    /// Access log format.
    pub log_format: LogFormat,
    /// Upstream backends and timeouts.
    pub upstream: UpstreamSettings,
    /// Metrics, health and readiness listener.
    pub metrics_listen: String,
    /// Admin listener (flights, held keys, store summary, purge); `None` means off.
    /// Always a loopback address.
    pub admin_listen: Option<String>,
    /// Store bounds.
    pub store: StoreSettings,
    /// Secret for keyed blake3; `None` means a random per-process secret.
    pub secret: Option<String>,
    /// Policy for paths that match no route.
    pub default_route: RoutePolicy,
    /// Configured routes, in file order.
    pub routes: Vec<RoutePolicy>,
}

/// A configuration re-read by [`Settings::reload`].
#[derive(Debug)]
pub struct Reloaded {
    /// What to run with from now on.
    pub settings: Settings,
    /// Settings fixed at start-up that the file changes: their running values were kept.
    pub restart_needed: Vec<&'static str>,
}

/// `[upstream]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// `host:port` of each backend, tried round robin.
    pub backends: Vec<String>,
    /// TCP connect deadline per attempt.
    pub connect_timeout: Duration,
    /// Per-read deadline on the upstream connection.
    pub read_timeout: Duration,
    /// Deadline for a whole upstream call, from its start; also how long an unknown outcome is held.
    pub total_timeout: Duration,
    /// How long an idle pooled upstream connection is kept; keep it below the backend's own.
    pub pool_idle_timeout: Duration,
    /// How backends are health checked.
    pub health_check: HealthCheckSettings,
    /// How often backends are checked.
    pub health_check_interval: Duration,
}

/// A backend health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckSettings {
    /// Every backend always eligible.
    None,
    /// TCP connect.
    Tcp,
    /// `GET path` expecting 2xx.
    Http {
        /// Request path.
        path: String,
    },
}

/// `[store]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// Which store.
    pub kind: StoreKind,
    /// Bound on keys: stored, held and in flight together.
    pub max_entries: usize,
    /// Bound on stored bytes (status, headers and body of each stored response).
    pub max_bytes: u64,
    /// Per-scope quota of keys (see `store.rs`): in flight plus held never above it, and a
    /// scope at it makes room only from its own records when the store is full.
    pub max_keys_per_scope: usize,
    /// Redis URL of a single node (for `kind = "redis"`).
    pub url: Option<String>,
    /// Redis Cluster seed nodes (for `kind = "redis"`), as URLs; exclusive with `url`.
    pub nodes: Vec<String>,
    /// What a leader does when Redis cannot be used.
    pub on_store_error: OnStoreError,
    /// Deadline of one Redis operation (and of a connection attempt).
    pub timeout: Duration,
    /// A replica counts as alive this long after its last heartbeat (refreshed every third).
    pub liveness_ttl: Duration,
    /// How often a waiter re-reads a key claimed by another replica (pub/sub fallback).
    pub poll_interval: Duration,
}

/// Built-in defaults, one place, quoted by README's reference.
pub mod defaults {
    use std::time::Duration;
    /// `[server] listen`
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// `[server] grace_period`
    pub const GRACE_PERIOD: Duration = Duration::from_secs(330);
    /// `[server] keepalive_timeout`
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `[server] body_read_timeout`
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// `[server] max_waiters`
    pub const MAX_WAITERS: usize = 100_000;
    /// `[upstream] backends`
    pub const BACKEND: &str = "127.0.0.1:8000";
    /// `[upstream] connect_timeout`
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// `[upstream] read_timeout`
    pub const READ_TIMEOUT: Duration = Duration::from_secs(300);
    /// `[upstream] total_timeout`
    pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(310);
    /// `[upstream] pool_idle_timeout`
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// `[upstream] health_check_interval`
    pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
    /// `[metrics] listen`
    pub const METRICS_LISTEN: &str = "127.0.0.1:9464";
    /// `[store] max_entries`
    pub const MAX_ENTRIES: usize = 100_000;
    /// `[store] max_bytes`
    pub const MAX_BYTES: u64 = 256 * 1024 * 1024;
    /// `[store] on_store_error`
    pub const ON_STORE_ERROR: crate::config::file::OnStoreError =
        crate::config::file::OnStoreError::FailOpen;
    /// `[store] timeout`
    pub const STORE_TIMEOUT: Duration = Duration::from_secs(1);
    /// `[store] liveness_ttl`
    pub const LIVENESS_TTL: Duration = Duration::from_secs(3);
    /// `[store] poll_interval`
    pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
    /// `[store] max_keys_per_scope`: a tenth of `max_entries`, but at least this many, so
    /// that a small store is not split into tiny shares.
    pub const MIN_KEYS_PER_SCOPE: usize = 1000;
    /// `[store] max_keys_per_scope` for a store of `max_entries`.
    pub fn max_keys_per_scope(max_entries: usize) -> usize {
        (max_entries / 10).max(MIN_KEYS_PER_SCOPE)
    }
    /// `[dedup] methods`
    pub const METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];
    /// `[dedup] scope_headers`
    pub const SCOPE_HEADERS: [&str; 2] = ["authorization", "cookie"];
    /// `[dedup] fingerprint_headers`
    pub const FINGERPRINT_HEADERS: [&str; 1] = ["content-type"];
    /// `[dedup] ttl`
    pub const TTL: Duration = Duration::from_secs(24 * 3600);
    /// `[dedup] fingerprint_ttl`
    pub const FINGERPRINT_TTL: Duration = Duration::from_secs(60);
    /// `[dedup] max_waiters_per_key`
    pub const MAX_WAITERS_PER_KEY: usize = 10_000;
    /// `[dedup] max_body`
    pub const MAX_BODY: u64 = 1024 * 1024;
    /// `[dedup] max_response_body`
    pub const MAX_RESPONSE_BODY: u64 = 1024 * 1024;
    /// `[dedup] store_statuses`
    pub const STORE_STATUSES: [&str; 6] = ["2xx", "3xx", "4xx", "!408", "!425", "!429"];
}

/// Methods that `idem check` refuses as dedup-eligible: safe or tunnel methods.
const REFUSED_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "CONNECT"];

impl Settings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Settings::from_toml_str(&text, path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        Settings::parse(text, path, None)
    }

    /// Re-reads `path` for a configuration reload while `running` is in force.
    ///
    /// The file must be valid on its own (what `idem check` says). Settings fixed at start-up
    /// (see [`Settings::restart_only_changes`]) then keep their running values, and the route
    /// policies are resolved against those: a route's default `wait_timeout` is the running
    /// `upstream.total_timeout`, and `max_response_body` is checked against the running
    /// `store.max_bytes`.
    pub fn reload(path: &Path, running: &Settings) -> Result<Reloaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read the file: {e}"),
        })?;
        let file = Settings::from_toml_str(&text, path)?;
        let restart_needed = file.restart_only_changes(running);
        let mut settings = Settings::parse(&text, path, Some(running))?;
        settings.listen = running.listen.clone();
        settings.threads = running.threads;
        settings.work_stealing = running.work_stealing;
        settings.log_format = running.log_format;
        settings.metrics_listen = running.metrics_listen.clone();
        settings.admin_listen = running.admin_listen.clone();
        settings.secret = running.secret.clone();
        Ok(Reloaded {
            settings,
            restart_needed,
        })
    }

    /// The settings fixed at start-up whose values differ between `self` and `other`, by
    /// their proxy.toml names: listeners, threads, grace period and log format (Pingora's
    /// server and the log subscriber are built once), `[upstream]` (backends, health check
    /// and connection pool are built at start, and `total_timeout` is bound to the grace
    /// period), `[store]`, and `[dedup] secret` (a new secret would orphan every key).
    pub fn restart_only_changes(&self, other: &Settings) -> Vec<&'static str> {
        let (a, b) = (self, other);
        let (u, v) = (&a.upstream, &b.upstream);
        let mut changed = [
            ("server.listen", a.listen == b.listen),
            ("server.threads", a.threads == b.threads),
            ("server.work_stealing", a.work_stealing == b.work_stealing),
            ("server.grace_period", a.grace_period == b.grace_period),
            ("server.log_format", a.log_format == b.log_format),
            ("upstream.backends", u.backends == v.backends),
            (
                "upstream.connect_timeout",
                u.connect_timeout == v.connect_timeout,
            ),
            ("upstream.read_timeout", u.read_timeout == v.read_timeout),
            ("upstream.total_timeout", u.total_timeout == v.total_timeout),
            (
                "upstream.pool_idle_timeout",
                u.pool_idle_timeout == v.pool_idle_timeout,
            ),
            ("upstream.health_check", u.health_check == v.health_check),
            (
                "upstream.health_check_interval",
                u.health_check_interval == v.health_check_interval,
            ),
            ("metrics.listen", a.metrics_listen == b.metrics_listen),
            ("admin.listen", a.admin_listen == b.admin_listen),
            ("store.kind", a.store.kind == b.store.kind),
            (
                "store.max_entries",
                a.store.max_entries == b.store.max_entries,
            ),
            ("store.max_bytes", a.store.max_bytes == b.store.max_bytes),
            (
                "store.max_keys_per_scope",
                a.store.max_keys_per_scope == b.store.max_keys_per_scope,
            ),
            ("store.url", a.store.url == b.store.url),
            ("dedup.secret", a.secret == b.secret),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect::<Vec<_>>();
        // Whatever else `[upstream]` and `[store]` hold is fixed at start-up too.
        for (section, same) in [
            ("upstream", a.upstream == b.upstream),
            ("store", a.store == b.store),
        ] {
            if !same && !changed.iter().any(|c| c.split('.').next() == Some(section)) {
                changed.push(section);
            }
        }
        changed
    }

    /// Parses and validates `text`; with `fixed`, `[upstream]`, `[store]` and the grace
    /// period are taken from it before the route policies are resolved.
    fn parse(text: &str, path: &Path, fixed: Option<&Settings>) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: toml_message(text, &e),
        })?;
        let err = |line: Option<usize>, message: String| ConfigError {
            file: path.to_path_buf(),
            line,
            message,
        };
        let at = |section: &str, key: &str| locate(text, section, key);
        resolve(raw, fixed).map_err(|(section, key, message)| {
            err(at(&section, &key), format!("{section}.{key}: {message}"))
        })
    }

    /// Every route including the default one, for metric label pre-registration.
    pub fn all_routes(&self) -> impl Iterator<Item = &RoutePolicy> {
        std::iter::once(&self.default_route).chain(self.routes.iter())
    }
}

type Problem = (String, String, String);

fn problem(section: &str, key: &str, msg: impl Into<String>) -> Problem {
    (section.to_string(), key.to_string(), msg.into())
}

fn resolve(raw: RawConfig, fixed: Option<&Settings>) -> Result<Settings, Problem> {
    let listen = raw
        .server
        .listen
        .map(|l| l.into_vec())
        .unwrap_or_else(|| vec![defaults::LISTEN.to_string()]);
    if listen.is_empty() {
        return Err(problem("server", "listen", "needs at least one address"));
    }
    for a in &listen {
        check_addr(a).map_err(|m| problem("server", "listen", m))?;
    }
    let threads = raw.server.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        return Err(problem("server", "threads", "must be at least 1"));
    }

    let up = raw.upstream;
    let backends = up
        .backends
        .unwrap_or_else(|| vec![defaults::BACKEND.to_string()]);
    if backends.is_empty() {
        return Err(problem(
            "upstream",
            "backends",
            "needs at least one backend",
        ));
    }
    for b in &backends {
        check_addr(b).map_err(|m| problem("upstream", "backends", m))?;
    }
    let upstream = UpstreamSettings {
        backends,
        connect_timeout: up.connect_timeout.unwrap_or(defaults::CONNECT_TIMEOUT),
        read_timeout: up.read_timeout.unwrap_or(defaults::READ_TIMEOUT),
        total_timeout: up.total_timeout.unwrap_or(defaults::TOTAL_TIMEOUT),
        pool_idle_timeout: up.pool_idle_timeout.unwrap_or(defaults::POOL_IDLE_TIMEOUT),
        health_check: match up.health_check.unwrap_or(HealthCheckKind::Tcp) {
            HealthCheckKind::None => HealthCheckSettings::None,
            HealthCheckKind::Tcp => HealthCheckSettings::Tcp,
            HealthCheckKind::Http => HealthCheckSettings::Http {
                path: up
                    .health_check_path
                    .clone()
                    .unwrap_or_else(|| "/".to_string()),
            },
        },
        health_check_interval: up
            .health_check_interval
            .unwrap_or(defaults::HEALTH_CHECK_INTERVAL),
    };
    for (key, d) in [
        ("connect_timeout", upstream.connect_timeout),
        ("read_timeout", upstream.read_timeout),
        ("total_timeout", upstream.total_timeout),
        ("health_check_interval", upstream.health_check_interval),
    ] {
        if d.is_zero() {
            return Err(problem("upstream", key, "must be above zero"));
        }
    }
    if upstream.total_timeout < upstream.connect_timeout {
        return Err(problem(
            "upstream",
            "total_timeout",
            "must be at least connect_timeout",
        ));
    }
    if up
        .health_check_path
        .as_deref()
        .is_some_and(|p| !p.starts_with('/'))
    {
        return Err(problem(
            "upstream",
            "health_check_path",
            "must start with '/'",
        ));
    }
    // A reload keeps these (restart-only) before anything is derived from them.
    let upstream = fixed.map_or(upstream, |f| f.upstream.clone());
    let grace_period = fixed.map_or(
        raw.server.grace_period.unwrap_or(defaults::GRACE_PERIOD),
        |f| f.grace_period,
    );
    if grace_period < upstream.total_timeout {
        return Err(problem(
            "server",
            "grace_period",
            format!(
                "{} is shorter than upstream.total_timeout ({}); a SIGTERM would cut calls still running. Raise it to at least the total timeout",
                humantime::format_duration(grace_period),
                humantime::format_duration(upstream.total_timeout)
            ),
        ));
    }

    let metrics_listen = raw
        .metrics
        .listen
        .unwrap_or_else(|| defaults::METRICS_LISTEN.to_string());
    check_addr(&metrics_listen).map_err(|m| problem("metrics", "listen", m))?;
    let admin_listen = raw.admin.listen;
    if let Some(a) = &admin_listen {
        check_loopback(a).map_err(|m| problem("admin", "listen", m))?;
    }

    let store = StoreSettings {
        kind: raw.store.kind.unwrap_or(StoreKind::Memory),
        max_entries: raw.store.max_entries.unwrap_or(defaults::MAX_ENTRIES),
        max_bytes: raw.store.max_bytes.unwrap_or(defaults::MAX_BYTES),
        max_keys_per_scope: raw.store.max_keys_per_scope.unwrap_or_else(|| {
            defaults::max_keys_per_scope(raw.store.max_entries.unwrap_or(defaults::MAX_ENTRIES))
        }),
        url: raw.store.url,
        nodes: raw.store.nodes.unwrap_or_default(),
        on_store_error: raw.store.on_store_error.unwrap_or(defaults::ON_STORE_ERROR),
        timeout: raw.store.timeout.unwrap_or(defaults::STORE_TIMEOUT),
        liveness_ttl: raw.store.liveness_ttl.unwrap_or(defaults::LIVENESS_TTL),
        poll_interval: raw.store.poll_interval.unwrap_or(defaults::POLL_INTERVAL),
    };
    check_redis(&store)?;
    if store.max_entries == 0 {
        return Err(problem("store", "max_entries", "must be at least 1"));
    }
    if store.max_keys_per_scope == 0 {
        return Err(problem("store", "max_keys_per_scope", "must be at least 1"));
    }
    let store = fixed.map_or(store, |f| f.store.clone());

    let dedup = raw.dedup;
    let secret = dedup
        .secret
        .clone()
        .or_else(|| std::env::var("IDEM_SECRET").ok());
    if store.kind == StoreKind::Redis && secret.is_none() {
        return Err(problem(
            "dedup",
            "secret",
            "is required with store.kind = \"redis\": every replica must derive the same keys. Set [dedup] secret or IDEM_SECRET to one long random string shared by all replicas",
        ));
    }
    if let Some(s) = &secret {
        if s.len() < 16 {
            return Err(problem(
                "dedup",
                "secret",
                "is shorter than 16 bytes; use a long random string shared by all replicas",
            ));
        }
    }
    let base = base_policy(&dedup, &upstream, &store)?;
    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let section = format!("route[{i}]");
        let policy =
            route_policy(&base, r, &store).map_err(|(_, k, m)| problem(&section, &k, m))?;
        if routes
            .iter()
            .any(|o: &RoutePolicy| o.path_prefix == policy.path_prefix)
        {
            return Err(problem(
                &section,
                "path_prefix",
                format!("{:?} is used by an earlier route", policy.path_prefix),
            ));
        }
        if policy.name == "default" || routes.iter().any(|o: &RoutePolicy| o.name == policy.name) {
            return Err(problem(
                &section,
                "name",
                format!("{:?} is used by another route (or reserved)", policy.name),
            ));
        }
        routes.push(policy);
    }

    Ok(Settings {
        listen,
        threads,
        work_stealing: raw.server.work_stealing.unwrap_or(false),
        grace_period,
        keepalive_timeout: raw
            .server
            .keepalive_timeout
            .unwrap_or(defaults::KEEPALIVE_TIMEOUT),
        body_read_timeout: raw
            .server
            .body_read_timeout
            .unwrap_or(defaults::BODY_READ_TIMEOUT),
        max_waiters: raw.server.max_waiters.unwrap_or(defaults::MAX_WAITERS),
        log_format: raw.server.log_format.unwrap_or(LogFormat::Text),
        upstream,
        metrics_listen,
        admin_listen,
        store,
        secret,
        default_route: base,
        routes,
    })
}

/// `[store]` rules for the Redis store.
fn check_redis(store: &StoreSettings) -> Result<(), Problem> {
    let redis = store.kind == StoreKind::Redis;
    if !redis {
        for (key, set) in [
            ("url", store.url.is_some()),
            ("nodes", !store.nodes.is_empty()),
        ] {
            if set {
                return Err(problem(
                    "store",
                    key,
                    "is only used with kind = \"redis\"; set kind = \"redis\" or remove it",
                ));
            }
        }
        return Ok(());
    }
    match (&store.url, store.nodes.is_empty()) {
        (None, true) => {
            return Err(problem(
                "store",
                "url",
                "kind = \"redis\" needs url = \"redis://host:6379\" (one node) or nodes = [\"redis://a:6379\", ...] (Redis Cluster)",
            ))
        }
        (Some(_), false) => {
            return Err(problem(
                "store",
                "nodes",
                "give either url (one node) or nodes (Redis Cluster), not both",
            ))
        }
        _ => {}
    }
    let urls: Vec<(&str, &String)> = match &store.url {
        Some(u) => vec![("url", u)],
        None => store.nodes.iter().map(|n| ("nodes", n)).collect(),
    };
    for (key, u) in urls {
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
            return Err(problem(
                "store",
                key,
                format!("{u:?} is not a Redis URL ({e}); write it like \"redis://127.0.0.1:6379\""),
            ));
        }
    }
    for (key, d) in [
        ("timeout", store.timeout),
        ("liveness_ttl", store.liveness_ttl),
        ("poll_interval", store.poll_interval),
    ] {
        if d.is_zero() {
            return Err(problem("store", key, "must be above zero"));
        }
    }
    if store.liveness_ttl < Duration::from_millis(300) {
        return Err(problem(
            "store",
            "liveness_ttl",
            "must be at least 300ms (it is refreshed every third of it)",
        ));
    }
    Ok(())
}

fn base_policy(
    d: &RawPolicy,
    upstream: &UpstreamSettings,
    store: &StoreSettings,
) -> Result<RoutePolicy, Problem> {
    let p = RoutePolicy {
        name: "default".to_string(),
        path_prefix: "/".to_string(),
        mode: d.mode.unwrap_or(Mode::Keyed),
        methods: methods(d.methods.as_deref(), "dedup")?,
        scope_headers: lower(d.scope_headers.as_deref(), &defaults::SCOPE_HEADERS),
        fingerprint_headers: lower(
            d.fingerprint_headers.as_deref(),
            &defaults::FINGERPRINT_HEADERS,
        ),
        ttl: d.ttl.unwrap_or(defaults::TTL),
        fingerprint_ttl: d.fingerprint_ttl.unwrap_or(defaults::FINGERPRINT_TTL),
        on_concurrent: d.on_concurrent.unwrap_or(OnConcurrent::Wait),
        // Waiting longer than the leader's own deadline could never be answered.
        wait_timeout: d.wait_timeout.unwrap_or(upstream.total_timeout),
        max_waiters_per_key: d
            .max_waiters_per_key
            .unwrap_or(defaults::MAX_WAITERS_PER_KEY),
        max_body: d.max_body.unwrap_or(defaults::MAX_BODY),
        max_response_body: d.max_response_body.unwrap_or(defaults::MAX_RESPONSE_BODY),
        store_statuses: statuses(d.store_statuses.as_deref(), "dedup")?,
    };
    check_policy(&p, store).map_err(|(k, m)| problem("dedup", &k, m))?;
    Ok(p)
}

fn route_policy(
    base: &RoutePolicy,
    r: RawRoute,
    store: &StoreSettings,
) -> Result<RoutePolicy, Problem> {
    if !r.path_prefix.starts_with('/') {
        return Err(problem(
            "",
            "path_prefix",
            format!("{:?} must start with '/'", r.path_prefix),
        ));
    }
    let p = RoutePolicy {
        name: r.name.unwrap_or_else(|| r.path_prefix.clone()),
        path_prefix: r.path_prefix,
        mode: r.mode.unwrap_or(base.mode),
        methods: match r.methods {
            Some(m) => methods(Some(&m), "")?,
            None => base.methods.clone(),
        },
        scope_headers: r
            .scope_headers
            .map(|h| lower(Some(&h), &[]))
            .unwrap_or_else(|| base.scope_headers.clone()),
        fingerprint_headers: r
            .fingerprint_headers
            .map(|h| lower(Some(&h), &[]))
            .unwrap_or_else(|| base.fingerprint_headers.clone()),
        ttl: r.ttl.unwrap_or(base.ttl),
        fingerprint_ttl: r.fingerprint_ttl.unwrap_or(base.fingerprint_ttl),
        on_concurrent: r.on_concurrent.unwrap_or(base.on_concurrent),
        wait_timeout: r.wait_timeout.unwrap_or(base.wait_timeout),
        max_waiters_per_key: r.max_waiters_per_key.unwrap_or(base.max_waiters_per_key),
        max_body: r.max_body.unwrap_or(base.max_body),
        max_response_body: r.max_response_body.unwrap_or(base.max_response_body),
        store_statuses: match r.store_statuses {
            Some(s) => statuses(Some(&s), "")?,
            None => base.store_statuses,
        },
    };
    check_policy(&p, store).map_err(|(k, m)| problem("", &k, m))?;
    Ok(p)
}

fn check_policy(p: &RoutePolicy, store: &StoreSettings) -> Result<(), (String, String)> {
    if p.ttl.is_zero() {
        return Err(("ttl".into(), "must be above zero".into()));
    }
    if p.fingerprint_ttl.is_zero() {
        return Err(("fingerprint_ttl".into(), "must be above zero".into()));
    }
    if p.max_response_body > store.max_bytes {
        return Err((
            "max_response_body".into(),
            format!(
                "is larger than store.max_bytes ({} bytes): such a response could never be stored",
                store.max_bytes
            ),
        ));
    }
    if p.methods.is_empty() {
        return Err(("methods".into(), "needs at least one method".into()));
    }
    Ok(())
}

fn methods(items: Option<&[String]>, section: &str) -> Result<Vec<Method>, Problem> {
    let Some(items) = items else {
        return Ok(defaults::METHODS
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).expect("default methods are valid"))
            .collect());
    };
    items
        .iter()
        .map(|m| {
            let up = m.to_ascii_uppercase();
            if REFUSED_METHODS.contains(&up.as_str()) {
                return Err(problem(
                    section,
                    "methods",
                    format!("{m} is not eligible for dedup: safe and tunnel methods (GET, HEAD, OPTIONS, CONNECT) must pass through"),
                ));
            }
            Method::from_bytes(up.as_bytes())
                .map_err(|_| problem(section, "methods", format!("{m:?} is not an HTTP method")))
        })
        .collect()
}

fn statuses(items: Option<&[String]>, section: &str) -> Result<StatusSet, Problem> {
    match items {
        Some(items) => StatusSet::parse(items).map_err(|m| problem(section, "store_statuses", m)),
        None => {
            let d: Vec<String> = defaults::STORE_STATUSES
                .iter()
                .map(|s| s.to_string())
                .collect();
            Ok(StatusSet::parse(&d).expect("default statuses are valid"))
        }
    }
}

fn lower(items: Option<&[String]>, default: &[&str]) -> Vec<String> {
    match items {
        Some(items) => items.iter().map(|h| h.to_ascii_lowercase()).collect(),
        None => default.iter().map(|h| h.to_string()).collect(),
    }
}

fn check_addr(a: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    match a.to_socket_addrs() {
        Ok(it) if it.len() > 0 => Ok(()),
        _ => Err(format!("{a:?} is not a host:port address")),
    }
}

/// The admin listener can purge keys: it must not be reachable from another host.
fn check_loopback(a: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = a
        .to_socket_addrs()
        .map_err(|_| format!("{a:?} is not a host:port address"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{a:?} is not a host:port address"));
    }
    if let Some(public) = addrs.iter().find(|s| !s.ip().is_loopback()) {
        return Err(format!(
            "{a:?} resolves to {}, which is not a loopback address; the admin listener can purge keys, so it only listens on loopback (e.g. \"127.0.0.1:9465\")",
            public.ip()
        ));
    }
    Ok(())
}

/// The parser's message, or, where it has none (a control character in a comment, found by
/// fuzzing), what is at the reported position.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    if !message.is_empty() {
        return message.to_string();
    }
    let at = e.span().map_or(0, |s| s.start.min(text.len()));
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..at].chars().count() + 1;
    match text[at..].chars().next() {
        Some(c) => format!("invalid TOML at column {column}: unexpected character {c:?}"),
        None => format!("invalid TOML at column {column}"),
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of `key` inside `section` (`"server"`, `"route[2]"`), for errors found
/// after parsing. toml keeps no spans on plain values, and a best-effort scan is enough to
/// point an operator at the right line.
fn locate(text: &str, section: &str, key: &str) -> Option<usize> {
    let (name, index) = match section.split_once('[') {
        Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (section, None),
    };
    let mut in_section = false;
    let mut route_seen = 0usize;
    let mut section_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = match index {
                Some(want) if t.starts_with("[[route]]") => {
                    route_seen += 1;
                    route_seen - 1 == want
                }
                Some(_) => false,
                None => t == format!("[{name}]"),
            };
            if in_section {
                section_line = Some(i + 1);
            }
            continue;
        }
        if in_section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    section_line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_str(text, Path::new("proxy.toml"))
    }

    #[test]
    fn empty_file_gets_every_default() {
        let s = load("").unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:8080"]);
        assert_eq!(s.default_route.mode, Mode::Keyed);
        assert_eq!(s.default_route.ttl, Duration::from_secs(86400));
        assert!(s.default_route.store_statuses.contains(404));
        assert!(!s.default_route.store_statuses.contains(429));
        assert!(!s.default_route.store_statuses.contains(500));
        assert_eq!(s.default_route.wait_timeout, s.upstream.total_timeout);
        assert!(!s.work_stealing);
    }

    #[test]
    fn work_stealing_is_a_bool_and_restart_only() {
        let on = load("[server]\nwork_stealing = true\n").unwrap();
        assert!(on.work_stealing);
        let off = load("[server]\nwork_stealing = false\n").unwrap();
        assert_eq!(on.restart_only_changes(&off), vec!["server.work_stealing"]);
        let e = load("[server]\nwork_stealing = \"yes\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn unknown_key_names_line() {
        let e = load("[server]\nthreads = 2\nlisten_addr = \"x\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("listen_addr"), "{e}");
        let e = load("[[route]]\npath_prefix = \"/a\"\nmdoe = \"off\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn bad_duration_and_size_explain_the_format() {
        let e = load("[dedup]\nttl = \"24\"\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("24h"), "{e}");
        let e = load("[dedup]\nmax_body = \"lots\"\n").unwrap_err();
        assert!(e.message.contains("1MiB"), "{e}");
        let s = load("[dedup]\nmax_body = \"1KiB\"\n").unwrap();
        assert_eq!(s.default_route.max_body, 1024);
    }

    #[test]
    fn safe_methods_are_refused() {
        let e = load("[[route]]\npath_prefix = \"/a\"\nmethods = [\"GET\"]\n").unwrap_err();
        assert!(e.message.contains("route[0].methods"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn grace_period_must_cover_total_timeout() {
        let e = load("[server]\ngrace_period = \"10s\"\n[upstream]\ntotal_timeout = \"60s\"\n")
            .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn reload_keeps_restart_only_settings_and_resolves_routes_against_them() {
        let running = load(
            "[server]\ngrace_period = \"60s\"\n[upstream]\ntotal_timeout = \"60s\"\n[store]\nmax_bytes = \"1MiB\"\n",
        )
        .unwrap();
        let file =
            std::env::temp_dir().join(format!("idem-settings-reload-{}.toml", std::process::id()));
        // Valid on its own, but its upstream and store differ from the running ones.
        std::fs::write(
            &file,
            "[server]\ngrace_period = \"10s\"\nmax_waiters = 7\n[upstream]\ntotal_timeout = \"5s\"\n[store]\nmax_bytes = \"2MiB\"\n[[route]]\npath_prefix = \"/a\"\nmode = \"fingerprint\"\nttl = \"1h\"\n",
        )
        .unwrap();
        let r = Settings::reload(&file, &running).unwrap();
        assert_eq!(
            r.restart_needed,
            [
                "server.grace_period",
                "upstream.total_timeout",
                "store.max_bytes"
            ]
        );
        let s = r.settings;
        assert_eq!(s.grace_period, Duration::from_secs(60));
        assert_eq!(s.upstream.total_timeout, Duration::from_secs(60));
        assert_eq!(s.store.max_bytes, 1 << 20);
        assert_eq!(s.max_waiters, 7, "reloadable");
        assert_eq!(s.routes[0].mode, Mode::Fingerprint);
        assert_eq!(s.routes[0].ttl, Duration::from_secs(3600));
        // The default wait_timeout follows the running total timeout, not the file's.
        assert_eq!(s.routes[0].wait_timeout, Duration::from_secs(60));

        // A route policy the running store cannot hold is refused.
        std::fs::write(
            &file,
            "[store]\nmax_bytes = \"4MiB\"\n[dedup]\nmax_response_body = \"2MiB\"\n",
        )
        .unwrap();
        let e = Settings::reload(&file, &running).unwrap_err();
        assert!(e.message.contains("max_response_body"), "{e}");
        // An invalid file is refused with its line.
        std::fs::write(&file, "[dedup]\nttl = \"24\"\n").unwrap();
        let e = Settings::reload(&file, &running).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn admin_listener_is_off_by_default_and_loopback_only() {
        assert_eq!(load("").unwrap().admin_listen, None);
        let s = load("[admin]\nlisten = \"127.0.0.1:9465\"\n").unwrap();
        assert_eq!(s.admin_listen.as_deref(), Some("127.0.0.1:9465"));
        let e = load("[server]\nthreads = 1\n[admin]\nlisten = \"0.0.0.0:9465\"\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("admin.listen"), "{e}");
        assert!(e.message.contains("loopback"), "{e}");
    }

    #[test]
    fn redis_store_needs_one_target_and_a_shared_secret() {
        let secret = "[dedup]\nsecret = \"0123456789abcdef0123\"\n";
        let s = load(&format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n{secret}"
        ))
        .unwrap();
        assert_eq!(s.store.on_store_error, OnStoreError::FailOpen);
        assert_eq!(s.store.timeout, Duration::from_secs(1));
        let s = load(&format!(
            "[store]\nkind = \"redis\"\nnodes = [\"redis://a:7000\", \"redis://b:7001\"]\non_store_error = \"fail-closed\"\n{secret}"
        ))
        .unwrap();
        assert_eq!(s.store.nodes.len(), 2);
        assert_eq!(s.store.on_store_error, OnStoreError::FailClosed);
        if std::env::var_os("IDEM_SECRET").is_none() {
            let e =
                load("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n").unwrap_err();
            assert!(e.message.contains("dedup.secret"), "{e}");
            assert!(e.message.contains("replicas"), "{e}");
        }
        for (body, want) in [
            ("kind = \"redis\"\n", "store.url"),
            (
                "kind = \"redis\"\nurl = \"redis://a:1\"\nnodes = [\"redis://b:2\"]\n",
                "store.nodes",
            ),
            ("kind = \"redis\"\nurl = \"http://a:1\"\n", "store.url"),
            ("url = \"redis://a:1\"\n", "store.url"),
            (
                "kind = \"redis\"\nurl = \"redis://a:1\"\nliveness_ttl = \"100ms\"\n",
                "store.liveness_ttl",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a:1\"\non_store_error = \"ignore\"\n",
                "fail-closed",
            ),
        ] {
            let e = load(&format!("[store]\n{body}{secret}")).unwrap_err();
            assert!(e.message.contains(want), "{body}: {e}");
            assert!(e.line.is_some(), "{body}: {e}");
        }
    }

    #[test]
    fn status_set_parses_classes_and_exclusions() {
        let s = StatusSet::parse(&["2xx".into(), "!204".into(), "404".into()]).unwrap();
        assert!(s.contains(200) && !s.contains(204) && s.contains(404) && !s.contains(403));
        assert!(StatusSet::parse(&["6xx".into()]).is_err());
        assert!(StatusSet::parse(&["99".into()]).is_err());
    }
}
