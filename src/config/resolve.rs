//! From the file as written ([`RawConfig`]) to what idem runs with ([`Settings`]): every
//! default filled, every route merged over `[dedup]`, every cross-field rule checked.
//!
//! No I/O here: the environment comes in as [`Env`], and addresses are checked for their
//! form only (whether a name resolves is a question for start-up and `idem check`). An
//! error names the key as `section.key` and carries the place of the value that is wrong
//! (or, for a missing key, of the value that requires it).

use crate::config::address::{Address, Port};
use crate::config::defaults;
use crate::config::file::{
    Dur, HealthCheckKind, LogFormat, Mode, OnConcurrent, Opt, PolicyKeys, RawConfig, RawRoute,
    RawStore, Size, StoreKind,
};
use crate::config::route::{RoutePolicy, StatusSet};
use crate::config::settings::{HealthCheckSettings, Settings, StoreSettings, UpstreamSettings};
use crate::config::trusted::TrustedProxies;
use http::Method;
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

/// What idem reads from its environment besides the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Env {
    /// `IDEM_SECRET`: the deployment secret when `[dedup] secret` is not set.
    pub(crate) secret: Option<String>,
}

impl Env {
    /// This process's environment.
    pub(crate) fn from_process() -> Env {
        Env {
            secret: std::env::var("IDEM_SECRET").ok(),
        }
    }
}

/// A value the file cannot have, found after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// `section.key`, e.g. `upstream.total_timeout` or `route[2].ttl`.
    pub(crate) key: String,
    /// Byte range in the file of the value at fault, when it was written.
    pub(crate) span: Option<Range<usize>>,
    /// What is wrong and what to write instead.
    pub(crate) message: String,
}

fn invalid(
    key: impl Into<String>,
    span: Option<Range<usize>>,
    message: impl Into<String>,
) -> Invalid {
    Invalid {
        key: key.into(),
        span,
        message: message.into(),
    }
}

/// The span of an optional value.
fn at<T>(v: &Opt<T>) -> Option<Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// The value of an optional key, or `default`.
fn or<T: Clone>(v: &Opt<T>, default: T) -> T {
    v.as_ref().map_or(default, |s| s.get_ref().clone())
}

fn dur(v: &Opt<Dur>, default: Duration) -> Duration {
    v.as_ref().map_or(default, |s| s.get_ref().0)
}

fn size(v: &Opt<Size>, default: u64) -> u64 {
    v.as_ref().map_or(default, |s| s.get_ref().0)
}

/// Methods that `idem check` refuses as dedup-eligible: safe or tunnel methods.
const REFUSED_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "CONNECT"];

/// Resolves `raw`. With `fixed` (a reload), `[upstream]`, `[store]` and the grace period are
/// taken from the running settings before the route policies are resolved against them.
pub(crate) fn resolve(
    raw: RawConfig,
    env: &Env,
    fixed: Option<&Settings>,
) -> Result<Settings, Invalid> {
    let server = &raw.server;
    let listen = match &server.listen {
        Some(l) => l.get_ref().clone().into_vec(),
        None => vec![defaults::LISTEN.to_string()],
    };
    if listen.is_empty() {
        return Err(invalid(
            "server.listen",
            at(&server.listen),
            "needs at least one address",
        ));
    }
    let listen = listen
        .iter()
        .map(|a| Address::parse(a, Port::AnyAllowed))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| invalid("server.listen", at(&server.listen), m))?;
    let unix_socket_mode = match &server.unix_socket_mode {
        Some(m) => u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8)
            .ok()
            .filter(|n| *n <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "server.unix_socket_mode",
                    Some(m.span()),
                    format!(
                        "{:?} is not a file mode; write it in octal, like \"0660\"",
                        m.get_ref()
                    ),
                )
            })?,
        None => defaults::UNIX_SOCKET_MODE,
    };
    let threads = server.threads.as_ref().map_or_else(
        || {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        },
        |t| *t.get_ref(),
    );
    if threads == 0 {
        return Err(invalid(
            "server.threads",
            at(&server.threads),
            "must be at least 1",
        ));
    }

    let trusted_proxies = trusted_proxies(&server.trusted_proxies)?;

    let upstream = upstream(&raw)?;
    // A reload keeps these (restart-only) before anything is derived from them.
    let upstream = fixed.map_or(upstream, |f| f.upstream.clone());
    let grace_period = fixed.map_or(dur(&server.grace_period, defaults::GRACE_PERIOD), |f| {
        f.grace_period
    });
    if grace_period < upstream.total_timeout {
        let span = at(&server.grace_period).or_else(|| at(&raw.upstream.total_timeout));
        return Err(invalid(
            "server.grace_period",
            span,
            format!(
                "{} is shorter than upstream.total_timeout ({}); a SIGTERM would cut calls still running. Raise it to at least the total timeout",
                humantime::format_duration(grace_period),
                humantime::format_duration(upstream.total_timeout)
            ),
        ));
    }

    let metrics_listen = tcp_listener(&or(
        &raw.metrics.listen,
        defaults::METRICS_LISTEN.to_string(),
    ))
    .map_err(|m| invalid("metrics.listen", at(&raw.metrics.listen), m))?;
    let admin_listen = match &raw.admin.listen {
        Some(l) => {
            let a = tcp_listener(l.get_ref())
                .map_err(|m| invalid("admin.listen", Some(l.span()), m))?;
            // Purging a key lets its next request execute again: an operator's decision,
            // never something another host may do.
            if !a.is_local() {
                return Err(invalid(
                    "admin.listen",
                    Some(l.span()),
                    format!("{a} is not a loopback address; the admin listener can purge keys, so it only listens on loopback (e.g. \"127.0.0.1:9465\")"),
                ));
            }
            Some(a)
        }
        None => None,
    };

    let store = store(&raw.store)?;
    let store = fixed.map_or(store, |f| f.store.clone());

    let dedup = &raw.dedup;
    let secret = dedup
        .secret
        .as_ref()
        .map(|s| s.get_ref().clone())
        .or_else(|| env.secret.clone());
    if store.kind == StoreKind::Redis && secret.is_none() {
        return Err(invalid(
            "dedup.secret",
            at(&raw.store.kind),
            "is required with store.kind = \"redis\": every replica must derive the same keys. Set [dedup] secret or IDEM_SECRET to one long random string shared by all replicas",
        ));
    }
    if secret.as_ref().is_some_and(|s| s.len() < 16) {
        return Err(invalid(
            "dedup.secret",
            at(&dedup.secret),
            "is shorter than 16 bytes; use a long random string shared by all replicas",
        ));
    }
    let builtin = builtin_policy(&upstream);
    let base = policy(&builtin, "dedup", dedup.keys(), &store)?;
    let mut routes: Vec<RoutePolicy> = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.iter().enumerate() {
        let section = format!("route[{i}]");
        let p = route(&base, &section, r, &store)?;
        if routes.iter().any(|o| o.path_prefix == p.path_prefix) {
            return Err(invalid(
                format!("{section}.path_prefix"),
                Some(r.path_prefix.span()),
                format!("{:?} is used by an earlier route", p.path_prefix),
            ));
        }
        if p.name == "default" || routes.iter().any(|o| o.name == p.name) {
            return Err(invalid(
                format!("{section}.name"),
                at(&r.name).or_else(|| Some(r.path_prefix.span())),
                format!("{:?} is used by another route (or reserved)", p.name),
            ));
        }
        routes.push(p);
    }

    Ok(Settings {
        listen,
        unix_socket_mode,
        threads,
        work_stealing: or(&server.work_stealing, false),
        grace_period,
        keepalive_timeout: dur(&server.keepalive_timeout, defaults::KEEPALIVE_TIMEOUT),
        body_read_timeout: dur(&server.body_read_timeout, defaults::BODY_READ_TIMEOUT),
        max_waiters: or(&server.max_waiters, defaults::MAX_WAITERS),
        log_format: or(&server.log_format, LogFormat::Text),
        trusted_proxies,
        proxy_protocol: or(&server.proxy_protocol, false),
        upstream,
        metrics_listen,
        admin_listen,
        store,
        secret,
        default_route: base,
        routes,
    })
}

/// `[server] trusted_proxies`; an error points at the entry at fault.
fn trusted_proxies(raw: &Opt<Vec<Spanned<String>>>) -> Result<TrustedProxies, Invalid> {
    let nets = match raw {
        None => defaults::TRUSTED_PROXIES
            .iter()
            .map(|e| TrustedProxies::parse_entry(e).expect("default networks are valid"))
            .collect(),
        Some(list) => list
            .get_ref()
            .iter()
            .map(|e| {
                TrustedProxies::parse_entry(e.get_ref())
                    .map_err(|m| invalid("server.trusted_proxies", Some(e.span()), m))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(TrustedProxies::new(nets))
}

fn upstream(raw: &RawConfig) -> Result<UpstreamSettings, Invalid> {
    let up = &raw.upstream;
    let backends = or(&up.backends, vec![defaults::BACKEND.to_string()]);
    if backends.is_empty() {
        return Err(invalid(
            "upstream.backends",
            at(&up.backends),
            "needs at least one backend",
        ));
    }
    let backends = backends
        .iter()
        .map(|b| Address::parse(b, Port::Required))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| invalid("upstream.backends", at(&up.backends), m))?;
    if let Some(p) = &up.health_check_path {
        if !p.get_ref().starts_with('/') {
            return Err(invalid(
                "upstream.health_check_path",
                Some(p.span()),
                "must start with '/'",
            ));
        }
    }
    let settings = UpstreamSettings {
        backends,
        connect_timeout: dur(&up.connect_timeout, defaults::CONNECT_TIMEOUT),
        read_timeout: dur(&up.read_timeout, defaults::READ_TIMEOUT),
        total_timeout: dur(&up.total_timeout, defaults::TOTAL_TIMEOUT),
        pool_idle_timeout: dur(&up.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT),
        health_check: match or(&up.health_check, HealthCheckKind::Tcp) {
            HealthCheckKind::None => HealthCheckSettings::None,
            HealthCheckKind::Tcp => HealthCheckSettings::Tcp,
            HealthCheckKind::Http => HealthCheckSettings::Http {
                path: or(&up.health_check_path, "/".to_string()),
                host: up.health_check_host.as_ref().map(|h| h.get_ref().clone()),
            },
        },
        health_check_interval: dur(&up.health_check_interval, defaults::HEALTH_CHECK_INTERVAL),
        resolve_interval: dur(&up.resolve_interval, defaults::RESOLVE_INTERVAL),
    };
    if let Some(h) = &up.health_check_host {
        if http::HeaderValue::from_str(h.get_ref()).is_err() || h.get_ref().is_empty() {
            return Err(invalid(
                "upstream.health_check_host",
                Some(h.span()),
                "must be a host name as sent in a Host header, like \"app.internal\"",
            ));
        }
        if or(&up.health_check, HealthCheckKind::Tcp) != HealthCheckKind::Http {
            return Err(invalid(
                "upstream.health_check_host",
                Some(h.span()),
                "is only used with health_check = \"http\"",
            ));
        }
    }
    for (key, value, d) in [
        (
            "connect_timeout",
            &up.connect_timeout,
            settings.connect_timeout,
        ),
        ("read_timeout", &up.read_timeout, settings.read_timeout),
        ("total_timeout", &up.total_timeout, settings.total_timeout),
        (
            "health_check_interval",
            &up.health_check_interval,
            settings.health_check_interval,
        ),
        (
            "resolve_interval",
            &up.resolve_interval,
            settings.resolve_interval,
        ),
    ] {
        if d.is_zero() {
            return Err(invalid(
                format!("upstream.{key}"),
                at(value),
                "must be above zero",
            ));
        }
    }
    if settings.total_timeout < settings.connect_timeout {
        return Err(invalid(
            "upstream.total_timeout",
            at(&up.total_timeout).or_else(|| at(&up.connect_timeout)),
            "must be at least connect_timeout",
        ));
    }
    Ok(settings)
}

fn store(raw: &RawStore) -> Result<StoreSettings, Invalid> {
    let max_entries = or(&raw.max_entries, defaults::MAX_ENTRIES);
    let store = StoreSettings {
        kind: or(&raw.kind, StoreKind::Memory),
        max_entries,
        max_bytes: size(&raw.max_bytes, defaults::MAX_BYTES),
        max_keys_per_scope: or(
            &raw.max_keys_per_scope,
            defaults::max_keys_per_scope(max_entries),
        ),
        url: raw.url.as_ref().map(|u| u.get_ref().clone()),
        nodes: or(&raw.nodes, Vec::new()),
        on_store_error: or(&raw.on_store_error, defaults::ON_STORE_ERROR),
        timeout: dur(&raw.timeout, defaults::STORE_TIMEOUT),
        liveness_ttl: dur(&raw.liveness_ttl, defaults::LIVENESS_TTL),
        poll_interval: dur(&raw.poll_interval, defaults::POLL_INTERVAL),
    };
    check_redis(raw, &store)?;
    if store.max_entries == 0 {
        return Err(invalid(
            "store.max_entries",
            at(&raw.max_entries),
            "must be at least 1",
        ));
    }
    if store.max_keys_per_scope == 0 {
        return Err(invalid(
            "store.max_keys_per_scope",
            at(&raw.max_keys_per_scope),
            "must be at least 1",
        ));
    }
    Ok(store)
}

/// `[store]` rules for the Redis store.
fn check_redis(raw: &RawStore, store: &StoreSettings) -> Result<(), Invalid> {
    if store.kind != StoreKind::Redis {
        for (key, span) in [("url", at(&raw.url)), ("nodes", at(&raw.nodes))] {
            if span.is_some() {
                return Err(invalid(
                    format!("store.{key}"),
                    span,
                    "is only used with kind = \"redis\"; set kind = \"redis\" or remove it",
                ));
            }
        }
        return Ok(());
    }
    match (&store.url, store.nodes.is_empty()) {
        (None, true) => {
            return Err(invalid(
                "store.url",
                at(&raw.kind),
                "kind = \"redis\" needs url = \"redis://host:6379\" (one node) or nodes = [\"redis://a:6379\", ...] (Redis Cluster)",
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                "store.nodes",
                at(&raw.nodes),
                "give either url (one node) or nodes (Redis Cluster), not both",
            ))
        }
        _ => {}
    }
    let urls: Vec<(&str, &String, Option<Range<usize>>)> = match &store.url {
        Some(u) => vec![("url", u, at(&raw.url))],
        None => store
            .nodes
            .iter()
            .map(|n| ("nodes", n, at(&raw.nodes)))
            .collect(),
    };
    for (key, u, span) in urls {
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
            return Err(invalid(
                format!("store.{key}"),
                span,
                format!("{u:?} is not a Redis URL ({e}); write it like \"redis://127.0.0.1:6379\""),
            ));
        }
    }
    for (key, value, d) in [
        ("timeout", &raw.timeout, store.timeout),
        ("liveness_ttl", &raw.liveness_ttl, store.liveness_ttl),
        ("poll_interval", &raw.poll_interval, store.poll_interval),
    ] {
        if d.is_zero() {
            return Err(invalid(
                format!("store.{key}"),
                at(value),
                "must be above zero",
            ));
        }
    }
    if store.liveness_ttl < Duration::from_millis(300) {
        return Err(invalid(
            "store.liveness_ttl",
            at(&raw.liveness_ttl),
            "must be at least 300ms (it is refreshed every third of it)",
        ));
    }
    Ok(())
}

/// The policy of a file with an empty `[dedup]`: the built-in defaults.
fn builtin_policy(upstream: &UpstreamSettings) -> RoutePolicy {
    let methods = defaults::METHODS
        .iter()
        .map(|m| Method::from_bytes(m.as_bytes()).expect("default methods are valid"))
        .collect();
    let statuses: Vec<String> = defaults::STORE_STATUSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    RoutePolicy {
        name: "default".to_string(),
        path_prefix: "/".to_string(),
        mode: Mode::Keyed,
        methods,
        scope_headers: defaults::SCOPE_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        fingerprint_headers: defaults::FINGERPRINT_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        ttl: defaults::TTL,
        fingerprint_ttl: defaults::FINGERPRINT_TTL,
        on_concurrent: OnConcurrent::Wait,
        // Waiting longer than the leader's own deadline could never be answered.
        wait_timeout: upstream.total_timeout,
        max_waiters_per_key: defaults::MAX_WAITERS_PER_KEY,
        max_body: defaults::MAX_BODY,
        max_response_body: defaults::MAX_RESPONSE_BODY,
        store_statuses: StatusSet::parse(&statuses).expect("default statuses are valid"),
    }
}

fn route(
    base: &RoutePolicy,
    section: &str,
    r: &RawRoute,
    store: &StoreSettings,
) -> Result<RoutePolicy, Invalid> {
    let prefix = r.path_prefix.get_ref();
    if !prefix.starts_with('/') {
        return Err(invalid(
            format!("{section}.path_prefix"),
            Some(r.path_prefix.span()),
            format!("{prefix:?} must start with '/'"),
        ));
    }
    let mut p = policy(base, section, r.keys(), store)?;
    p.name = or(&r.name, prefix.clone());
    p.path_prefix = prefix.clone();
    Ok(p)
}

/// `keys` written in `section` over `base`: the one merge of the route-policy keys.
fn policy(
    base: &RoutePolicy,
    section: &str,
    keys: PolicyKeys,
    store: &StoreSettings,
) -> Result<RoutePolicy, Invalid> {
    let key = |k: &str| format!("{section}.{k}");
    let lower = |v: &Opt<Vec<String>>, base: &[String]| match v {
        Some(list) => list
            .get_ref()
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        None => base.to_vec(),
    };
    let p = RoutePolicy {
        name: base.name.clone(),
        path_prefix: base.path_prefix.clone(),
        mode: or(&keys.mode, base.mode),
        methods: match &keys.methods {
            Some(m) => methods(m).map_err(|(span, msg)| invalid(key("methods"), span, msg))?,
            None => base.methods.clone(),
        },
        scope_headers: lower(&keys.scope_headers, &base.scope_headers),
        fingerprint_headers: lower(&keys.fingerprint_headers, &base.fingerprint_headers),
        ttl: dur(&keys.ttl, base.ttl),
        fingerprint_ttl: dur(&keys.fingerprint_ttl, base.fingerprint_ttl),
        on_concurrent: or(&keys.on_concurrent, base.on_concurrent),
        wait_timeout: dur(&keys.wait_timeout, base.wait_timeout),
        max_waiters_per_key: or(&keys.max_waiters_per_key, base.max_waiters_per_key),
        max_body: size(&keys.max_body, base.max_body),
        max_response_body: size(&keys.max_response_body, base.max_response_body),
        store_statuses: match &keys.store_statuses {
            Some(s) => StatusSet::parse(s.get_ref())
                .map_err(|m| invalid(key("store_statuses"), Some(s.span()), m))?,
            None => base.store_statuses,
        },
    };
    if p.ttl.is_zero() {
        return Err(invalid(key("ttl"), at(&keys.ttl), "must be above zero"));
    }
    if p.fingerprint_ttl.is_zero() {
        return Err(invalid(
            key("fingerprint_ttl"),
            at(&keys.fingerprint_ttl),
            "must be above zero",
        ));
    }
    if p.max_response_body > store.max_bytes {
        return Err(invalid(
            key("max_response_body"),
            at(&keys.max_response_body),
            format!(
                "is larger than store.max_bytes ({} bytes): such a response could never be stored",
                store.max_bytes
            ),
        ));
    }
    if p.methods.is_empty() {
        return Err(invalid(
            key("methods"),
            at(&keys.methods),
            "needs at least one method",
        ));
    }
    Ok(p)
}

fn methods(items: &Spanned<Vec<String>>) -> Result<Vec<Method>, (Option<Range<usize>>, String)> {
    let span = Some(items.span());
    items
        .get_ref()
        .iter()
        .map(|m| {
            let up = m.to_ascii_uppercase();
            if REFUSED_METHODS.contains(&up.as_str()) {
                return Err((span.clone(), format!("{m} is not eligible for dedup: safe and tunnel methods (GET, HEAD, OPTIONS, CONNECT) must pass through")));
            }
            Method::from_bytes(up.as_bytes())
                .map_err(|_| (span.clone(), format!("{m:?} is not an HTTP method")))
        })
        .collect()
}

/// A listener of idem's own besides the proxy's: TCP only.
fn tcp_listener(text: &str) -> Result<Address, String> {
    match Address::parse(text, Port::AnyAllowed)? {
        Address::Unix(_) => Err(format!(
            "{text:?}: this listener takes a host:port address, like \"127.0.0.1:9464\""
        )),
        a => Ok(a),
    }
}
