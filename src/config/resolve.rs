//! From the file as written ([`RawConfig`]) to what idem runs with ([`Settings`]): every
//! default filled, every route merged over `[dedup]`, every cross-field rule checked.
//!
//! No I/O here: the environment comes in as [`Env`], and addresses are checked for their
//! form only (whether a name resolves is a question for start-up and `idem check`). An
//! error names the key as `section.key` and carries the place of the value that is wrong
//! (or, for a missing key, of the value that requires it).

use crate::config::address::{Address, Backend, Port};
use crate::config::defaults;
use crate::config::file::{
    Dur, HealthCheckKind, LogFormat, Mode, OnConcurrent, Opt, PolicyKeys, Protocol, RawAdmin,
    RawConfig, RawRoute, RawUpstream, Size, StoreKind,
};
use crate::config::route::{RoutePolicy, StatusSet};
use crate::config::settings::{
    HealthCheckSettings, Secret, Settings, StoreSettings, TracingSettings, UpstreamSettings,
};
use crate::config::store::store;
use crate::config::tls::{server_tls, upstream_tls, RawUpstreamTls};
use crate::config::trusted::TrustedProxies;
use http::Method;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// What idem reads from its environment besides the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Env {
    /// `IDEM_SECRET`: the deployment secret when `[dedup] secret` is not set.
    pub(crate) secret: Option<String>,
    /// `IDEM_REDIS_PASSWORD`: the Redis password when `[store] password_file` is not set.
    pub(crate) redis_password: Option<Secret<String>>,
    /// The files the configuration names (the Redis password file, TLS material).
    pub(crate) files: Files,
}

impl Env {
    /// This process's environment; relative file names are read from `base`, the
    /// configuration file's directory.
    pub(crate) fn from_process(base: &Path) -> Env {
        Env {
            secret: std::env::var("IDEM_SECRET").ok(),
            redis_password: std::env::var("IDEM_REDIS_PASSWORD").ok().map(Secret),
            files: Files::Disk {
                base: base.to_path_buf(),
            },
        }
    }
}

/// Where the files a configuration names are read from.
#[derive(Debug, Clone, Default)]
pub(crate) enum Files {
    /// Nowhere: what the file alone says (fuzzing, and tests that name no file).
    #[default]
    None,
    /// The file system; a relative name is taken from `base` (the configuration file's
    /// directory), so a config and its certificates can move together.
    Disk {
        /// The configuration file's directory.
        base: PathBuf,
    },
    /// Given contents, by name (unit tests).
    #[cfg(test)]
    Given(Vec<(&'static str, Vec<u8>)>),
}

impl Files {
    /// The contents of `name`, or why it cannot be read (naming the path tried).
    pub(crate) fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        match self {
            Files::None => Err(format!("{name:?} cannot be read here")),
            Files::Disk { base } => {
                let path = base.join(name);
                std::fs::read(&path)
                    .map_err(|e| format!("cannot read {name:?} ({}): {e}", path.display()))
            }
            #[cfg(test)]
            Files::Given(files) => files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| b.clone())
                .ok_or_else(|| format!("cannot read {name:?}: No such file or directory")),
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

pub(crate) fn invalid(
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
pub(crate) fn at<T>(v: &Opt<T>) -> Option<Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// The value of an optional key, or `default`.
pub(crate) fn or<T: Clone>(v: &Opt<T>, default: T) -> T {
    v.as_ref().map_or(default, |s| s.get_ref().clone())
}

pub(crate) fn dur(v: &Opt<Dur>, default: Duration) -> Duration {
    v.as_ref().map_or(default, |s| s.get_ref().0)
}

pub(crate) fn size(v: &Opt<Size>, default: u64) -> u64 {
    v.as_ref().map_or(default, |s| s.get_ref().0)
}

/// Methods that `idem check` refuses as dedup-eligible: safe or tunnel methods.
const REFUSED_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "CONNECT"];

/// Resolves `raw`. With `fixed` (a reload), `[upstream]`, `[store]` and the grace period are
/// taken from the running settings before the route policies are resolved against them.
/// Returns the settings and the warnings: values that work but should be written otherwise.
pub(crate) fn resolve(
    raw: RawConfig,
    env: &Env,
    fixed: Option<&Settings>,
) -> Result<(Settings, Vec<Invalid>), Invalid> {
    let mut warnings = Vec::new();
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

    let tls = server_tls(&server.tls, env, &mut warnings)?;
    let upstream = group("upstream", &raw.upstream, None, env, &mut warnings)?;
    let mut groups = Vec::with_capacity(raw.upstreams.len());
    for (name, g) in &raw.upstreams {
        let section = format!("upstreams.{name}");
        if !is_group_name(name) {
            return Err(invalid(
                &section,
                Some(g.span()),
                format!("{name:?} is not a group name: use letters, digits, '-' and '_'"),
            ));
        }
        // A key that is missing is said at the group's table.
        let settings = group(&section, g.get_ref(), Some(&upstream), env, &mut warnings).map_err(
            |mut e| {
                e.span = e.span.or(Some(g.span()));
                e
            },
        )?;
        groups.push((name.clone(), settings));
    }
    // A reload keeps these (restart-only) before anything is derived from them.
    let upstream = fixed.map_or(upstream, |f| f.upstream.clone());
    let groups = fixed.map_or(groups, |f| f.groups.clone());
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

    let store = store(&raw.store, env, &mut warnings)?;
    let store = fixed.map_or(store, |f| f.store.clone());
    let request_id_header = request_id_header(&server.request_id_header)?;
    let tracing = tracing(&raw)?;

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
    let max_waiters = or(&server.max_waiters, defaults::MAX_WAITERS);
    let max_body_buffer = size(&server.max_body_buffer, defaults::MAX_BODY_BUFFER);
    let max_body_buffer_per_client = size(
        &server.max_body_buffer_per_client,
        defaults::max_body_buffer_per_client(max_body_buffer),
    );
    for (key, value, n) in [
        (
            "server.max_body_buffer",
            at(&server.max_body_buffer),
            max_body_buffer,
        ),
        (
            "server.max_body_buffer_per_client",
            at(&server.max_body_buffer_per_client),
            max_body_buffer_per_client,
        ),
        (
            "server.max_waiters_per_client",
            at(&server.max_waiters_per_client),
            or(&server.max_waiters_per_client, 1) as u64,
        ),
    ] {
        if n == 0 {
            return Err(invalid(key, value, "must be at least 1"));
        }
    }
    // A client's share of the store bytes, unless written (or fixed by a reload), is at
    // least the largest response a route stores: computed once the routes are known.
    let client_bytes_fixed = fixed.is_some() || raw.store.max_bytes_per_client.is_some();
    let limits = Bounds {
        store: &store,
        client_bytes: client_bytes_fixed.then_some(store.max_bytes_per_client),
        body_buffer: max_body_buffer_per_client.min(max_body_buffer),
    };
    let builtin = builtin_policy(&upstream);
    let base = policy(&builtin, "dedup", dedup.keys(), &limits)?;
    let mut routes: Vec<RoutePolicy> = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.iter().enumerate() {
        let section = format!("route[{i}]");
        let p = route(&base, &section, r, &limits, &groups)?;
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
    let mut store = store;
    if !client_bytes_fixed {
        let largest = std::iter::once(&base)
            .chain(routes.iter())
            .map(|r| r.max_response_body)
            .max()
            .unwrap_or(0);
        store.max_bytes_per_client = store.max_bytes_per_client.max(largest);
    }

    let settings = Settings {
        listen,
        unix_socket_mode,
        threads,
        work_stealing: or(&server.work_stealing, false),
        grace_period,
        keepalive_timeout: dur(&server.keepalive_timeout, defaults::KEEPALIVE_TIMEOUT),
        body_read_timeout: dur(&server.body_read_timeout, defaults::BODY_READ_TIMEOUT),
        max_waiters,
        max_waiters_per_client: or(
            &server.max_waiters_per_client,
            defaults::max_waiters_per_client(max_waiters),
        ),
        max_body_buffer,
        max_body_buffer_per_client,
        log_format: or(&server.log_format, LogFormat::Text),
        log_query: or(&server.log_query, false),
        request_id_header,
        shutdown_delay: dur(&server.shutdown_delay, Duration::ZERO),
        tracing,
        trusted_proxies,
        proxy_protocol: or(&server.proxy_protocol, false),
        tls,
        upstream,
        groups,
        metrics_listen,
        admin_listen,
        admin_token: admin_token(&raw.admin, env)?,
        store,
        secret,
        default_route: base,
        routes,
        warnings: Vec::new(),
    };
    Ok((settings, warnings))
}

/// `[admin] token` or `token_file` (one of them): the bearer token admin requests carry.
fn admin_token(raw: &RawAdmin, env: &Env) -> Result<Option<Secret<String>>, Invalid> {
    let (token, key, span) = match (&raw.token, &raw.token_file) {
        (Some(_), Some(f)) => {
            return Err(invalid(
                "admin.token_file",
                Some(f.span()),
                "give token or token_file, not both",
            ))
        }
        (Some(t), None) => (t.get_ref().clone(), "admin.token", Some(t.span())),
        (None, Some(f)) => {
            let bytes = env
                .files
                .read(f.get_ref())
                .map_err(|m| invalid("admin.token_file", Some(f.span()), m))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                invalid(
                    "admin.token_file",
                    Some(f.span()),
                    format!("{:?} is not UTF-8 text", f.get_ref()),
                )
            })?;
            // Files written by `echo` or an editor end with a newline that is not the token.
            let token = text.trim_end_matches(['\n', '\r']).to_string();
            (token, "admin.token_file", Some(f.span()))
        }
        (None, None) => return Ok(None),
    };
    // Sent as `Authorization: Bearer <token>`: a header value of visible ASCII.
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            span,
            "must be at least 16 characters of visible ASCII (it is sent as `Authorization: Bearer <token>`)",
        ));
    }
    if raw.listen.is_none() {
        return Err(invalid(
            key,
            span,
            "is only used with [admin] listen; set listen or remove it",
        ));
    }
    Ok(Some(Secret(token)))
}

/// `[server] request_id_header`: any valid name but those that frame, route or
/// authenticate a request (idem writes this header into requests, responses and the log).
fn request_id_header(raw: &Opt<String>) -> Result<http::HeaderName, Invalid> {
    let Some(h) = raw else {
        return Ok(http::HeaderName::from_static("x-request-id"));
    };
    let name = http::HeaderName::from_bytes(h.get_ref().as_bytes()).map_err(|_| {
        invalid(
            "server.request_id_header",
            Some(h.span()),
            format!("{:?} is not a valid header name", h.get_ref()),
        )
    })?;
    let reserved = crate::message::is_hop_by_hop(&name)
        || [
            http::header::HOST,
            http::header::AUTHORIZATION,
            http::header::COOKIE,
            http::header::SET_COOKIE,
        ]
        .contains(&name);
    if reserved {
        return Err(invalid(
            "server.request_id_header",
            Some(h.span()),
            format!("{name} carries framing, routing or credentials; name a header of its own, like \"X-Request-Id\""),
        ));
    }
    Ok(name)
}

/// `[tracing]`: on when `otlp_endpoint` is set. Only `http://` endpoints: the exporter is
/// built without TLS, so a collector elsewhere is reached through a local agent (the usual
/// OpenTelemetry Collector deployment) rather than over the network from idem.
fn tracing(raw: &RawConfig) -> Result<Option<TracingSettings>, Invalid> {
    let t = &raw.tracing;
    let Some(endpoint) = &t.otlp_endpoint else {
        if let Some(other) = t
            .service_name
            .as_ref()
            .map(Spanned::span)
            .or(at(&t.sample_ratio))
        {
            return Err(invalid(
                "tracing.otlp_endpoint",
                Some(other),
                "is required by the other [tracing] keys: the full OTLP/HTTP traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\"",
            ));
        }
        return Ok(None);
    };
    let uri = endpoint.get_ref().parse::<http::Uri>().ok();
    let ok = uri
        .as_ref()
        .is_some_and(|u| u.scheme_str() == Some("http") && u.host().is_some_and(|h| !h.is_empty()));
    if !ok {
        return Err(invalid(
            "tracing.otlp_endpoint",
            Some(endpoint.span()),
            format!(
                "{:?} is not an http:// URL; write the full OTLP/HTTP traces URL of a collector, e.g. \"http://127.0.0.1:4318/v1/traces\" (https is not supported: send to a local collector agent)",
                endpoint.get_ref()
            ),
        ));
    }
    let service_name = or(&t.service_name, "idem".to_string());
    if service_name.is_empty() {
        return Err(invalid(
            "tracing.service_name",
            at(&t.service_name),
            "must not be empty",
        ));
    }
    let sample_ratio = or(&t.sample_ratio, 1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(invalid(
            "tracing.sample_ratio",
            at(&t.sample_ratio),
            format!("{sample_ratio} is not between 0 and 1"),
        ));
    }
    Ok(Some(TracingSettings {
        otlp_endpoint: endpoint.get_ref().clone(),
        service_name,
        sample_ratio,
    }))
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

/// One upstream group: `[upstream]` (`base` is `None`: unset keys take the built-in
/// defaults) or `[upstreams.NAME]` (`base` is `[upstream]`: unset timeouts and health-check
/// keys are inherited; backends, protocol and the `tls_*` keys are the group's own, and
/// `total_timeout` is `[upstream]`'s alone, being how long any unknown outcome is held).
fn group(
    section: &str,
    up: &RawUpstream,
    base: Option<&UpstreamSettings>,
    env: &Env,
    warnings: &mut Vec<Invalid>,
) -> Result<UpstreamSettings, Invalid> {
    let key = |k: &str| format!("{section}.{k}");
    let backends = match (base, &up.backends) {
        (_, Some(b)) => b.get_ref().clone(),
        (None, None) => vec![defaults::BACKEND.to_string()],
        (Some(_), None) => Vec::new(),
    };
    if backends.is_empty() {
        return Err(invalid(
            key("backends"),
            at(&up.backends),
            "needs at least one backend",
        ));
    }
    if let (Some(_), Some(t)) = (base, &up.total_timeout) {
        return Err(invalid(
            key("total_timeout"),
            Some(t.span()),
            "is set in [upstream] only: it is how long any unknown outcome is held, and the grace period covers it",
        ));
    }
    let inherit = |v: &Opt<Dur>, pick: fn(&UpstreamSettings) -> Duration, d: Duration| {
        dur(v, base.map_or(d, pick))
    };
    let backends = backends
        .iter()
        .map(|b| Backend::parse(b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| invalid(key("backends"), at(&up.backends), m))?;
    let tls = upstream_tls(
        section,
        RawUpstreamTls {
            ca: &up.tls_ca,
            client_cert: &up.tls_client_cert,
            client_key: &up.tls_client_key,
            verify: &up.tls_verify,
            server_name: &up.tls_server_name,
        },
        backends.iter().any(|b| b.tls),
        env,
        warnings,
    )?;
    if let Some(p) = &up.health_check_path {
        if !p.get_ref().starts_with('/') {
            return Err(invalid(
                key("health_check_path"),
                Some(p.span()),
                "must start with '/'",
            ));
        }
    }
    let health_kind = up.health_check.as_ref().map(|h| *h.get_ref());
    let health_check = match (health_kind, base) {
        (None, Some(b)) if up.health_check_path.is_none() && up.health_check_host.is_none() => {
            b.health_check.clone()
        }
        (kind, _) => match kind.unwrap_or(HealthCheckKind::Tcp) {
            HealthCheckKind::None => HealthCheckSettings::None,
            HealthCheckKind::Tcp => HealthCheckSettings::Tcp,
            HealthCheckKind::Http => HealthCheckSettings::Http {
                path: or(&up.health_check_path, "/".to_string()),
                host: up.health_check_host.as_ref().map(|h| h.get_ref().clone()),
            },
        },
    };
    let settings = UpstreamSettings {
        backends,
        tls,
        protocol: or(&up.protocol, Protocol::Auto),
        connect_timeout: inherit(
            &up.connect_timeout,
            |b| b.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        read_timeout: inherit(&up.read_timeout, |b| b.read_timeout, defaults::READ_TIMEOUT),
        total_timeout: inherit(
            &up.total_timeout,
            |b| b.total_timeout,
            defaults::TOTAL_TIMEOUT,
        ),
        pool_idle_timeout: inherit(
            &up.pool_idle_timeout,
            |b| b.pool_idle_timeout,
            defaults::POOL_IDLE_TIMEOUT,
        ),
        health_check,
        health_check_interval: inherit(
            &up.health_check_interval,
            |b| b.health_check_interval,
            defaults::HEALTH_CHECK_INTERVAL,
        ),
        resolve_interval: inherit(
            &up.resolve_interval,
            |b| b.resolve_interval,
            defaults::RESOLVE_INTERVAL,
        ),
    };
    if let Some(h) = &up.health_check_host {
        if http::HeaderValue::from_str(h.get_ref()).is_err() || h.get_ref().is_empty() {
            return Err(invalid(
                key("health_check_host"),
                Some(h.span()),
                "must be a host name as sent in a Host header, like \"app.internal\"",
            ));
        }
        if or(&up.health_check, HealthCheckKind::Tcp) != HealthCheckKind::Http {
            return Err(invalid(
                key("health_check_host"),
                Some(h.span()),
                "is only used with health_check = \"http\"",
            ));
        }
    }
    for (name, value, d) in [
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
                format!("{section}.{name}"),
                at(value),
                "must be above zero",
            ));
        }
    }
    if settings.total_timeout < settings.connect_timeout {
        return Err(invalid(
            key("total_timeout"),
            at(&up.total_timeout).or_else(|| at(&up.connect_timeout)),
            "must be at least connect_timeout",
        ));
    }
    Ok(settings)
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
        key_header: http::HeaderName::from_static(defaults::KEY_HEADER),
        methods,
        scope_headers: defaults::SCOPE_HEADERS
            .iter()
            .map(|h| http::HeaderName::from_static(h))
            .collect(),
        scope_cookies: Vec::new(),
        credential_headers: credential_headers(&defaults::CREDENTIAL_HEADERS)
            .expect("default credential headers are valid"),
        fingerprint_headers: defaults::FINGERPRINT_HEADERS
            .iter()
            .map(|h| http::HeaderName::from_static(h))
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
        upstream: 0,
    }
}

/// What a route's sizes must fit in.
struct Bounds<'a> {
    store: &'a StoreSettings,
    /// `store.max_bytes_per_client` when written or fixed; `None`: it follows the routes.
    client_bytes: Option<u64>,
    /// The most body bytes one request may have idem hold: one client's share.
    body_buffer: u64,
}

fn route(
    base: &RoutePolicy,
    section: &str,
    r: &RawRoute,
    store: &Bounds<'_>,
    groups: &[(String, UpstreamSettings)],
) -> Result<RoutePolicy, Invalid> {
    let prefix = r.path_prefix.get_ref();
    if !prefix.starts_with('/') {
        return Err(invalid(
            format!("{section}.path_prefix"),
            Some(r.path_prefix.span()),
            format!("{prefix:?} must start with '/'"),
        ));
    }
    // Requests are routed on their normal form: a prefix in any other form matches nothing.
    let normal = crate::path::normalize(prefix).path;
    let normal = if prefix.ends_with('/') || normal == "/" {
        normal.into_owned()
    } else {
        normal.trim_end_matches('/').to_string()
    };
    if normal != *prefix {
        return Err(invalid(
            format!("{section}.path_prefix"),
            Some(r.path_prefix.span()),
            format!("{prefix:?} is not in normal form (requests are routed without dot segments, repeated slashes or encoded letters and digits); write {normal:?}"),
        ));
    }
    let mut p = policy(base, section, r.keys(), store)?;
    p.name = or(&r.name, prefix.clone());
    p.path_prefix = prefix.clone();
    if let Some(u) = &r.upstream {
        let name = u.get_ref();
        p.upstream = 1 + groups.iter().position(|(n, _)| n == name).ok_or_else(|| {
            let known: Vec<&str> = groups.iter().map(|(n, _)| n.as_str()).collect();
            invalid(
                format!("{section}.upstream"),
                Some(u.span()),
                if known.is_empty() {
                    format!("{name:?} is not an upstream group: there is no [upstreams.{name}]")
                } else {
                    format!(
                        "{name:?} is not an upstream group; the groups are {}",
                        known.join(", ")
                    )
                },
            )
        })?;
    }
    Ok(p)
}

/// `keys` written in `section` over `base`: the one merge of the route-policy keys.
fn policy(
    base: &RoutePolicy,
    section: &str,
    keys: PolicyKeys,
    bounds: &Bounds<'_>,
) -> Result<RoutePolicy, Invalid> {
    let store = bounds.store;
    let key = |k: &str| format!("{section}.{k}");
    // Parsed once here: a request then looks each name up without parsing it again.
    let names = |k: &str, v: &Opt<Vec<String>>, base: &[http::HeaderName]| match v {
        Some(list) => list
            .get_ref()
            .iter()
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    invalid(
                        key(k),
                        Some(list.span()),
                        format!("{h:?} is not a valid header name"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>(),
        None => Ok(base.to_vec()),
    };
    let p = RoutePolicy {
        name: base.name.clone(),
        path_prefix: base.path_prefix.clone(),
        mode: or(&keys.mode, base.mode),
        key_header: match &keys.key_header {
            Some(h) => key_header(h.get_ref())
                .map_err(|m| invalid(key("key_header"), Some(h.span()), m))?,
            None => base.key_header.clone(),
        },
        methods: match &keys.methods {
            Some(m) => methods(m).map_err(|(span, msg)| invalid(key("methods"), span, msg))?,
            None => base.methods.clone(),
        },
        scope_headers: names("scope_headers", &keys.scope_headers, &base.scope_headers)?,
        scope_cookies: match &keys.scope_cookies {
            Some(c) => cookie_names(c.get_ref())
                .map_err(|m| invalid(key("scope_cookies"), Some(c.span()), m))?,
            None => base.scope_cookies.clone(),
        },
        credential_headers: match &keys.credential_headers {
            Some(h) => credential_headers(h.get_ref())
                .map_err(|m| invalid(key("credential_headers"), Some(h.span()), m))?,
            None => base.credential_headers.clone(),
        },
        fingerprint_headers: names(
            "fingerprint_headers",
            &keys.fingerprint_headers,
            &base.fingerprint_headers,
        )?,
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
        upstream: base.upstream,
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
    if let Some(client_bytes) = bounds.client_bytes.filter(|b| p.max_response_body > *b) {
        return Err(invalid(
            key("max_response_body"),
            at(&keys.max_response_body),
            format!(
                "is larger than store.max_bytes_per_client ({client_bytes} bytes): in a full store such a response would push out every other record of its client and still not be kept"
            ),
        ));
    }
    if p.max_body > bounds.body_buffer {
        return Err(invalid(
            key("max_body"),
            at(&keys.max_body),
            format!(
                "is larger than what idem may hold for one client (server.max_body_buffer_per_client, {} bytes): such a body could never be read",
                bounds.body_buffer
            ),
        ));
    }
    // A key header that is also part of the scope or the fingerprint would make the key
    // derive from itself twice, or every request of a caller share one key.
    for (list, names, written) in [
        ("scope_headers", &p.scope_headers, &keys.scope_headers),
        (
            "fingerprint_headers",
            &p.fingerprint_headers,
            &keys.fingerprint_headers,
        ),
    ] {
        if names.iter().any(|h| h.as_str() == p.key_header.as_str()) {
            return Err(invalid(
                key("key_header"),
                at(&keys.key_header).or_else(|| at(written)),
                format!(
                    "{} is also in {list}: the header that carries the idempotency key cannot be part of the scope or the fingerprint",
                    p.key_header
                ),
            ));
        }
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

/// The headers withheld as credentials: the four always withheld, then `extra`.
fn credential_headers<S: AsRef<str>>(extra: &[S]) -> Result<Vec<http::HeaderName>, String> {
    let mut all: Vec<http::HeaderName> = defaults::CREDENTIAL_HEADERS_ALWAYS
        .iter()
        .map(|h| http::HeaderName::from_static(h))
        .collect();
    for name in extra {
        let name = name.as_ref();
        let h = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        if !all.contains(&h) {
            all.push(h);
        }
    }
    Ok(all)
}

/// `scope_cookies`: cookie names (RFC 6265 tokens), matched exactly.
fn cookie_names(names: &[String]) -> Result<Vec<String>, String> {
    for name in names {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            return Err(format!("{name:?} is not a cookie name"));
        }
    }
    Ok(names.to_vec())
}

/// Headers that cannot carry a key: connection-level ones never reach idem's admission as
/// sent, and the framing and routing ones mean something else to every hop.
const NOT_A_KEY_HEADER: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
    "cache-status",
];

/// `key_header`: a valid header name idem can read a key from; kept lowercase.
fn key_header(name: &str) -> Result<http::HeaderName, String> {
    let h = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!("{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)")
    })?;
    if NOT_A_KEY_HEADER.contains(&h.as_str()) {
        return Err(format!(
            "{name:?} cannot carry an idempotency key: it is a connection, framing or routing header"
        ));
    }
    Ok(h)
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

/// Letters, digits, `-` and `_`: a group name appears in logs and in `route.upstream`.
fn is_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
