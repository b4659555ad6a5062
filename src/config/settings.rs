//! Validated, resolved configuration: what the proxy runs with.
//!
//! [`Settings::load`] parses proxy.toml ([`crate::config::file`]), fills every route from `[dedup]`
//! and the built-in defaults, and checks cross-field rules. Every error names the file, the
//! line and what to do, so `idem check` and a failed start read alike. After this point no
//! field is optional "to be filled later".

use crate::config::address::{Address, Backend};
use crate::config::file::{LogFormat, OnStoreError, RawConfig, StoreKind};
use crate::config::resolve::{resolve, Env, Invalid};
use crate::config::route::RoutePolicy;
use crate::config::tls::{ServerTls, UpstreamTls};
use crate::config::trusted::TrustedProxies;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error located in its file: `proxy.toml:14:7: route[1].ttl: ...`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), position(*line, *column))]
pub struct ConfigError {
    /// The file that was read.
    pub(crate) file: PathBuf,
    /// 1-based line, when known.
    pub(crate) line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub(crate) column: Option<usize>,
    /// What is wrong and, where possible, what to write instead.
    pub(crate) message: String,
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    fn unreadable(path: &Path, e: std::io::Error) -> ConfigError {
        ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read the file: {e}"),
        }
    }

    fn at(
        path: &Path,
        text: &str,
        span: Option<std::ops::Range<usize>>,
        message: String,
    ) -> ConfigError {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = line_col(text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

/// Everything idem runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Proxy listeners (h1 and h2c): TCP or Unix-domain sockets.
    pub(crate) listen: Vec<Address>,
    /// Permission bits of the socket files of Unix-domain listeners.
    pub(crate) unix_socket_mode: u32,
    /// Worker threads of the proxy service.
    pub(crate) threads: usize,
    /// One work-stealing runtime over `threads` (true), or one single-threaded runtime per
    /// thread with each connection placed on one at random (false, the default: measured
    /// faster on every path, 8 to 24 %, see BENCHMARKS.md; a connection's requests and the
    /// upstream calls they start stay on one thread, so no cross-thread wake-ups).
    pub(crate) work_stealing: bool,
    /// SIGTERM drain budget; covers the upstream total deadline.
    pub(crate) grace_period: Duration,
    /// How long an idle keep-alive client connection is kept; also how long a new connection
    /// may take to send its first byte (`first_bytes.rs`).
    pub(crate) keepalive_timeout: Duration,
    /// Total deadline for reading a request body that idem buffers.
    pub(crate) body_read_timeout: Duration,
    /// Cap on waiters across all keys; past it a new waiter gets 503.
    pub(crate) max_waiters: usize,
    /// Cap on waiters of one client address; past it that client gets 429.
    pub(crate) max_waiters_per_client: usize,
    /// Bytes of request bodies idem holds at once; past it 503 `body-buffer-full`.
    pub(crate) max_body_buffer: u64,
    /// Bytes of request bodies one client address may have idem hold; past it 429.
    pub(crate) max_body_buffer_per_client: u64,
    /// Access log format.
    pub log_format: LogFormat,
    /// The access log's `path` carries the query string (off: it may carry secrets).
    pub(crate) log_query: bool,
    /// The request id header (`X-Request-Id`): kept from the client when usable, generated
    /// otherwise, sent upstream and back (`crate::observe::request_id`).
    pub(crate) request_id_header: http::HeaderName,
    /// After SIGTERM, how long the listeners keep accepting (with `/readyz` answering 503)
    /// before they close and the drain starts: time for load balancers to stop sending.
    pub(crate) shutdown_delay: Duration,
    /// OpenTelemetry traces over OTLP/HTTP; `None` means off.
    pub(crate) tracing: Option<TracingSettings>,
    /// Peers whose forwarding headers are believed (`crate::http::forward`).
    pub(crate) trusted_proxies: TrustedProxies,
    /// Every proxy listener expects a PROXY protocol (v1 or v2) header first, whose source
    /// address becomes the peer (`crate::http::proxy_protocol`).
    pub(crate) proxy_protocol: bool,
    /// `[server.tls]`: TLS listeners and their certificates (reloaded by SIGHUP).
    pub(crate) tls: Option<ServerTls>,
    /// Upstream backends and timeouts: the default group.
    pub(crate) upstream: UpstreamSettings,
    /// `[upstreams.NAME]`: the named groups, in name order (a route's `upstream` index
    /// `i + 1` is `groups[i]`).
    pub(crate) groups: Vec<(String, UpstreamSettings)>,
    /// Metrics, health and readiness listener (TCP).
    pub(crate) metrics_listen: Address,
    /// Admin listener (flights, held keys, store summary, purge); `None` means off.
    /// Always a loopback address (TCP).
    pub(crate) admin_listen: Option<Address>,
    /// The bearer token every admin request must carry (`[admin] token` or `token_file`);
    /// `None`: loopback Host and no `Origin` are the only checks.
    pub(crate) admin_token: Option<Secret<String>>,
    /// Store bounds.
    pub(crate) store: StoreSettings,
    /// Secret for keyed blake3; `None` means a random per-process secret.
    pub(crate) secret: Option<String>,
    /// Policy for paths that match no route.
    pub(crate) default_route: RoutePolicy,
    /// Configured routes, in file order.
    pub(crate) routes: Vec<RoutePolicy>,
    /// Values that work but should be written otherwise, located like errors
    /// (`proxy.toml:14:7: store.url: ...`): `idem check` prints them, start-up logs them.
    pub(crate) warnings: Vec<String>,
}

/// A configuration re-read by [`Settings::reload`].
#[derive(Debug)]
pub(crate) struct Reloaded {
    /// What to run with from now on.
    pub(crate) settings: Settings,
    /// Settings fixed at start-up that the file changes: their running values were kept.
    pub(crate) restart_needed: Vec<&'static str>,
}

/// `[tracing]`, resolved (only when `otlp_endpoint` is set).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TracingSettings {
    /// Where spans are sent: the full OTLP/HTTP traces URL (`http://host:4318/v1/traces`).
    pub(crate) otlp_endpoint: String,
    /// The `service.name` resource attribute.
    pub(crate) service_name: String,
    /// Share of traces started here that are kept (a parent's decision is followed).
    pub(crate) sample_ratio: f64,
}

/// `[upstream]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamSettings {
    /// Each backend (`host:port` or a Unix socket), tried round robin; a name may resolve to
    /// several addresses, each a backend of its own.
    pub(crate) backends: Vec<Backend>,
    /// How idem speaks TLS to the `https://` backends; `None` when there are none.
    pub(crate) tls: Option<UpstreamTls>,
    /// HTTP/1.1, h2c (h2 over TLS), or by request (gRPC over HTTP/2).
    pub(crate) protocol: crate::config::file::Protocol,
    /// TCP connect deadline per attempt.
    pub(crate) connect_timeout: Duration,
    /// Per-read deadline on the upstream connection.
    pub(crate) read_timeout: Duration,
    /// Deadline for a whole upstream call, from its start; also how long an unknown outcome is held.
    pub(crate) total_timeout: Duration,
    /// How long an idle pooled upstream connection is kept at most (`upstream::reuse`
    /// shortens it per backend from what the backend shows).
    pub(crate) pool_idle_timeout: Duration,
    /// How backends are health checked.
    pub(crate) health_check: HealthCheckSettings,
    /// How often backends are checked.
    pub(crate) health_check_interval: Duration,
    /// How often backend names are resolved again.
    pub(crate) resolve_interval: Duration,
}

/// A backend health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthCheckSettings {
    /// Every backend always eligible.
    None,
    /// TCP connect.
    Tcp,
    /// `GET path` expecting 2xx.
    Http {
        /// Request path.
        path: String,
        /// `Host` of the check request; `None` sends the backend's own address (as a client
        /// connecting to it would), which apps that check the Host (Django's
        /// `ALLOWED_HOSTS`) may refuse: set `health_check_host` then.
        host: Option<String>,
    },
}

/// `[store]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreSettings {
    /// Which store.
    pub(crate) kind: StoreKind,
    /// Bound on keys: stored, held and in flight together.
    pub(crate) max_entries: usize,
    /// Bound on stored bytes (status, headers and body of each stored response).
    pub(crate) max_bytes: u64,
    /// Per-scope quota of keys (`store::memory`): in flight plus held never above it, and
    /// a scope at it makes room only from its own records when the store is full.
    pub(crate) max_keys_per_scope: usize,
    /// Per-client quota of keys: the same rules, per client address.
    pub(crate) max_keys_per_client: usize,
    /// Per-client share of `max_bytes`: a client over it makes room from its own records.
    pub(crate) max_bytes_per_client: u64,
    /// Store-wide cap on keys nobody can evict (in flight plus held).
    pub(crate) max_pinned: usize,
    /// Redis URL of a single node (for `kind = "redis"`).
    pub(crate) url: Option<String>,
    /// Redis Cluster seed nodes (for `kind = "redis"`), as URLs; exclusive with `url`.
    pub(crate) nodes: Vec<String>,
    /// Redis Sentinel addresses, as URLs; exclusive with `url` and `nodes`.
    pub(crate) sentinels: Vec<String>,
    /// The name the sentinels know the primary by (with `sentinels`).
    pub(crate) master_name: Option<String>,
    /// ACL user for every Redis node (not the sentinels); `None`: the URL's, else `default`.
    pub(crate) username: Option<String>,
    /// The password from `password_file` or `IDEM_REDIS_PASSWORD`, which replaces one written
    /// in a URL; `None`: the URL's own, if any.
    pub(crate) password: Option<Password>,
    /// TLS material, when the URLs are `rediss://`.
    pub(crate) tls: Option<TlsMaterial>,
    /// Put before every key, channel and liveness key idem writes in Redis.
    pub(crate) key_prefix: String,
    /// What a leader does when Redis cannot be used.
    pub(crate) on_store_error: OnStoreError,
    /// Deadline of one Redis operation (and of a connection attempt).
    pub(crate) timeout: Duration,
    /// A replica counts as alive this long after its last heartbeat (refreshed every third).
    pub(crate) liveness_ttl: Duration,
    /// How often a waiter re-reads a key claimed by another replica (pub/sub fallback).
    pub(crate) poll_interval: Duration,
}

/// A value never printed: `Debug` shows `<redacted>` (settings are debug-printed in tests).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret<T>(pub(crate) T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The Redis password idem sends, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Password {
    /// The password.
    pub(crate) value: Secret<String>,
    /// Its source, for the start-up log line.
    pub(crate) from: PasswordFrom,
}

/// Where the Redis password came from, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PasswordFrom {
    /// `[store] password_file`.
    File,
    /// The `IDEM_REDIS_PASSWORD` environment variable.
    Env,
}

/// TLS material for `rediss://` connections, read and checked with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsMaterial {
    /// PEM certificates of the CAs to trust (`tls_ca`); `None`: the system's roots.
    pub(crate) ca: Option<Vec<u8>>,
    /// PEM client certificate chain and private key (`tls_client_cert`, `tls_client_key`).
    pub(crate) client: Option<(Vec<u8>, Secret<Vec<u8>>)>,
}

impl Settings {
    /// Reads and validates `path`, with this process's environment (`IDEM_SECRET`,
    /// `IDEM_REDIS_PASSWORD`, the files the configuration names).
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, e))?;
        Settings::parse(&text, path, &Env::from_process(&base_dir(path)), None)
    }

    /// Warnings about the file, each located like an error (`file:line:column: key: ...`).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Parses and validates `text`, naming `path` in errors, with no environment: what the
    /// file alone says.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn from_toml_str(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        Settings::parse(text, path, &Env::default(), None)
    }

    /// Parses and validates `text` with the environment `env` (unit tests).
    #[cfg(test)]
    pub(crate) fn from_toml_with_env(text: &str, env: &Env) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("proxy.toml"), env, None)
    }

    /// Re-reads `path` for a configuration reload while `running` is in force.
    ///
    /// The file must be valid on its own (what `idem check` says). Settings fixed at start-up
    /// (see [`Settings::restart_only_changes`]) then keep their running values, and the route
    /// policies are resolved against those: a route's default `wait_timeout` is the running
    /// `upstream.total_timeout`, and `max_response_body` is checked against the running
    /// `store.max_bytes`.
    pub(crate) fn reload(path: &Path, running: &Settings) -> Result<Reloaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, e))?;
        let env = Env::from_process(&base_dir(path));
        let file = Settings::parse(&text, path, &env, None)?;
        let restart_needed = file.restart_only_changes(running);
        let mut settings = Settings::parse(&text, path, &env, Some(running))?;
        settings.listen = running.listen.clone();
        settings.unix_socket_mode = running.unix_socket_mode;
        settings.threads = running.threads;
        settings.work_stealing = running.work_stealing;
        settings.log_format = running.log_format;
        settings.tracing = running.tracing.clone();
        settings.proxy_protocol = running.proxy_protocol;
        // The TLS listeners are bound at start; their certificates are what a reload
        // renews (for new connections).
        settings.tls = match (&running.tls, settings.tls.take()) {
            (Some(r), Some(f)) => Some(ServerTls {
                listen: r.listen.clone(),
                certs: f.certs,
            }),
            (r, _) => r.clone(),
        };
        settings.metrics_listen = running.metrics_listen.clone();
        settings.admin_listen = running.admin_listen.clone();
        settings.admin_token = running.admin_token.clone();
        settings.secret = running.secret.clone();
        Ok(Reloaded {
            settings,
            restart_needed,
        })
    }

    /// The settings fixed at start-up whose values differ between `self` and `other`, by
    /// their proxy.toml names: listeners and whether they expect a PROXY protocol header,
    /// threads, grace period and log format (Pingora's server and the log subscriber are
    /// built once), `[upstream]` (backends, health check
    /// and connection pool are built at start, and `total_timeout` is bound to the grace
    /// period), `[store]`, and `[dedup] secret` (a new secret would orphan every key).
    pub(crate) fn restart_only_changes(&self, other: &Settings) -> Vec<&'static str> {
        let (a, b) = (self, other);
        let (u, v) = (&a.upstream, &b.upstream);
        let mut changed = [
            ("server.listen", a.listen == b.listen),
            (
                "server.unix_socket_mode",
                a.unix_socket_mode == b.unix_socket_mode,
            ),
            ("server.threads", a.threads == b.threads),
            ("server.work_stealing", a.work_stealing == b.work_stealing),
            ("server.grace_period", a.grace_period == b.grace_period),
            ("server.log_format", a.log_format == b.log_format),
            ("tracing", a.tracing == b.tracing),
            (
                "server.proxy_protocol",
                a.proxy_protocol == b.proxy_protocol,
            ),
            (
                "server.tls.listen",
                a.tls.as_ref().map(|t| &t.listen) == b.tls.as_ref().map(|t| &t.listen),
            ),
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
            ("admin.token", a.admin_token == b.admin_token),
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
            // Each of these follows another by default: named only when it changed apart
            // from the one it follows (the operator changed what they wrote).
            (
                "store.max_keys_per_client",
                a.store.max_keys_per_client == b.store.max_keys_per_client
                    || a.store.max_keys_per_scope != b.store.max_keys_per_scope,
            ),
            (
                "store.max_bytes_per_client",
                a.store.max_bytes_per_client == b.store.max_bytes_per_client
                    || a.store.max_bytes != b.store.max_bytes,
            ),
            (
                "store.max_pinned",
                a.store.max_pinned == b.store.max_pinned
                    || a.store.max_entries != b.store.max_entries,
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
            ("upstreams", a.groups == b.groups),
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
    fn parse(
        text: &str,
        path: &Path,
        env: &Env,
        fixed: Option<&Settings>,
    ) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::at(path, text, e.span(), toml_message(text, &e)))?;
        let located =
            |e: Invalid| ConfigError::at(path, text, e.span, format!("{}: {}", e.key, e.message));
        let (mut settings, warnings) = resolve(raw, env, fixed).map_err(located)?;
        settings.warnings = warnings
            .into_iter()
            .map(|w| located(w).to_string())
            .collect();
        Ok(settings)
    }

    /// Every route including the default one, for metric label pre-registration.
    pub(crate) fn all_routes(&self) -> impl Iterator<Item = &RoutePolicy> {
        std::iter::once(&self.default_route).chain(self.routes.iter())
    }
}

/// The directory relative file names in `path` are read from.
fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A byte offset's 1-based line and column (in characters).
fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let byte = byte.min(text.len());
    let before = &text[..byte];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The parser's message, or, where it has none (a control character in a comment, found by
/// fuzzing), what is at the reported position.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    if !message.is_empty() {
        return message.to_string();
    }
    let at = e.span().map_or(0, |s| s.start.min(text.len()));
    match text[at..].chars().next() {
        Some(c) => format!("invalid TOML: unexpected character {c:?}"),
        None => "invalid TOML".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::Mode;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_str(text, Path::new("proxy.toml"))
    }

    #[test]
    fn empty_file_gets_every_default() {
        let s = load("").unwrap();
        assert_eq!(s.listen[0].to_string(), "127.0.0.1:8080");
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
    fn trusted_proxies_default_to_loopback_and_name_a_bad_entry() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let s = load("").unwrap();
        assert!(s.trusted_proxies.contains(ip("127.0.0.2")));
        assert!(s.trusted_proxies.contains(ip("::1")));
        assert!(!s.trusted_proxies.contains(ip("10.0.0.1")));
        let none = load("[server]\ntrusted_proxies = []\n").unwrap();
        assert!(!none.trusted_proxies.contains(ip("127.0.0.1")));
        let s = load("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"2001:db8::7\"]\n").unwrap();
        assert!(s.trusted_proxies.contains(ip("10.1.2.3")));
        assert!(s.trusted_proxies.contains(ip("2001:db8::7")));
        assert!(!s.trusted_proxies.contains(ip("127.0.0.1")));
        // The entry at fault, not the list: line 3, column 5.
        let e =
            load("[server]\ntrusted_proxies = [\n    \"10.0.0.0/8\",\n    \"10.0.0.1/8\",\n]\n")
                .unwrap_err();
        assert_eq!((e.line, e.column), (Some(4), Some(5)), "{e}");
        assert!(e.message.starts_with("server.trusted_proxies: "), "{e}");
        let e = load("[server]\ntrusted_proxies = \"10.0.0.0/8\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn observability_keys_default_off_and_reload_except_tracing() {
        let s = load("").unwrap();
        assert!(!s.log_query);
        assert_eq!(s.request_id_header, "x-request-id");
        assert_eq!(s.shutdown_delay, Duration::ZERO);
        assert_eq!(s.tracing, None);
        let set = load(
            "[server]\nlog_query = true\nrequest_id_header = \"X-Correlation-Id\"\nshutdown_delay = \"10s\"\n",
        )
        .unwrap();
        assert!(set.log_query);
        assert_eq!(set.request_id_header, "x-correlation-id");
        assert_eq!(set.shutdown_delay, Duration::from_secs(10));
        assert!(
            set.restart_only_changes(&s).is_empty(),
            "applied by a reload"
        );
        let traced = load(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample_ratio = 0.25\n",
        )
        .unwrap();
        assert_eq!(
            traced.tracing,
            Some(TracingSettings {
                otlp_endpoint: "http://127.0.0.1:4318/v1/traces".into(),
                service_name: "idem".into(),
                sample_ratio: 0.25,
            })
        );
        assert_eq!(traced.restart_only_changes(&s), vec!["tracing"]);
    }

    #[test]
    fn bad_observability_keys_name_the_value_at_fault() {
        for (text, at, message) in [
            (
                "[server]\nrequest_id_header = \"a b\"\n",
                (2, 21),
                "server.request_id_header: \"a b\" is not a valid header name",
            ),
            (
                "[dedup]\nscope_headers = [\"Authorization\", \"x y\"]\n",
                (2, 17),
                "dedup.scope_headers: \"x y\" is not a valid header name",
            ),
            (
                "[[route]]\npath_prefix = \"/a/\"\nfingerprint_headers = [\"a:b\"]\n",
                (3, 23),
                "route[0].fingerprint_headers: \"a:b\" is not a valid header name",
            ),
            (
                "[server]\nrequest_id_header = \"Cookie\"\n",
                (2, 21),
                "server.request_id_header: cookie carries framing, routing or credentials",
            ),
            (
                "[server]\nrequest_id_header = \"Content-Length\"\n",
                (2, 21),
                "server.request_id_header: content-length carries framing",
            ),
            (
                "[tracing]\notlp_endpoint = \"https://collector:4318/v1/traces\"\n",
                (2, 17),
                "tracing.otlp_endpoint: \"https://collector:4318/v1/traces\" is not an http:// URL",
            ),
            (
                "[tracing]\notlp_endpoint = \"collector:4318\"\n",
                (2, 17),
                "tracing.otlp_endpoint: \"collector:4318\" is not an http:// URL",
            ),
            (
                "[tracing]\nservice_name = \"idem\"\n",
                (2, 16),
                "tracing.otlp_endpoint: is required by the other [tracing] keys",
            ),
            (
                "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nsample_ratio = 1.5\n",
                (3, 16),
                "tracing.sample_ratio: 1.5 is not between 0 and 1",
            ),
            (
                "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nservice_name = \"\"\n",
                (3, 16),
                "tracing.service_name: must not be empty",
            ),
            ("[server]\nshutdown_delay = \"soon\"\n", (2, 18), ""),
        ] {
            let e = load(text).unwrap_err();
            assert_eq!((e.line, e.column), (Some(at.0), Some(at.1)), "{text}: {e}");
            assert!(e.message.starts_with(message), "{text}: {e}");
        }
    }

    #[test]
    fn proxy_protocol_is_off_by_default_and_restart_only() {
        assert!(!load("").unwrap().proxy_protocol);
        let on = load("[server]\nproxy_protocol = true\n").unwrap();
        assert!(on.proxy_protocol);
        assert_eq!(
            on.restart_only_changes(&load("").unwrap()),
            vec!["server.proxy_protocol"]
        );
        // trusted_proxies is applied by a reload: not in the restart-only list.
        let other = load("[server]\ntrusted_proxies = []\n").unwrap();
        assert!(other.restart_only_changes(&load("").unwrap()).is_empty());
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
    fn per_client_limits_default_from_the_store_wide_ones_and_are_checked() {
        let s = load("[store]\nmax_entries = 60\nmax_keys_per_scope = 10\nmax_bytes = \"100MiB\"\n[server]\nmax_waiters = 50\nmax_body_buffer = \"40MiB\"\n").unwrap();
        assert_eq!(s.store.max_keys_per_client, 10, "follows the scope quota");
        assert_eq!(s.store.max_pinned, 30);
        assert_eq!(s.store.max_bytes_per_client, 10 * 1024 * 1024);
        assert_eq!(s.max_waiters_per_client, 5);
        assert_eq!(s.max_body_buffer_per_client, 4 * 1024 * 1024);
        // A client's share of the bytes is at least the largest response a route stores.
        let s = load("[store]\nmax_bytes = \"2MiB\"\n").unwrap();
        assert_eq!(s.store.max_bytes_per_client, 1024 * 1024);
        for (text, key, line) in [
            (
                "[store]\nmax_entries = 4\nmax_pinned = 5\n",
                "store.max_pinned",
                3,
            ),
            (
                "[store]\nmax_keys_per_client = 0\n",
                "store.max_keys_per_client",
                2,
            ),
            (
                "[store]\nmax_bytes_per_client = \"512KiB\"\n",
                "dedup.max_response_body",
                0,
            ),
            (
                "[server]\nmax_body_buffer_per_client = \"512KiB\"\n",
                "dedup.max_body",
                0,
            ),
            (
                "[server]\nmax_waiters_per_client = 0\n",
                "server.max_waiters_per_client",
                2,
            ),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.message.starts_with(&format!("{key}: ")), "{text}: {e}");
            if line > 0 {
                assert_eq!(e.line, Some(line), "{text}: {e}");
            }
        }
    }

    #[test]
    fn admin_token_and_path_prefix_and_scope_cookies_are_checked() {
        let listen = "[admin]\nlisten = \"127.0.0.1:9465\"\n";
        let s = load(&format!("{listen}token = \"0123456789abcdef\"\n")).unwrap();
        assert_eq!(s.admin_token, Some(Secret("0123456789abcdef".to_string())));
        for (text, key) in [
            (format!("{listen}token = \"short\"\n"), "admin.token"),
            (
                format!("{listen}token = \"0123456789 abcdef\"\n"),
                "admin.token",
            ),
            (
                format!("{listen}token = \"0123456789abcdef\"\ntoken_file = \"t\"\n"),
                "admin.token_file",
            ),
            (
                "[admin]\ntoken = \"0123456789abcdef\"\n".to_string(),
                "admin.token",
            ),
            (
                "[[route]]\npath_prefix = \"/a/../b\"\n".to_string(),
                "route[0].path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"/a//b\"\n".to_string(),
                "route[0].path_prefix",
            ),
            (
                "[dedup]\nscope_cookies = [\"a b\"]\n".to_string(),
                "dedup.scope_cookies",
            ),
            (
                "[dedup]\ncredential_headers = [\"bad header\"]\n".to_string(),
                "dedup.credential_headers",
            ),
        ] {
            let e = load(&text).unwrap_err();
            assert!(e.message.starts_with(&format!("{key}: ")), "{text}: {e}");
            assert!(e.line.is_some(), "{text}: {e}");
        }
        // Prefixes in normal form, with or without a trailing slash.
        for ok in ["/", "/api", "/api/", "/a/b.c/"] {
            assert!(
                load(&format!("[[route]]\npath_prefix = \"{ok}\"\n")).is_ok(),
                "{ok}"
            );
        }
        // The credentials withheld always come first, the configured ones after.
        let s = load("[dedup]\ncredential_headers = [\"X-Session\"]\n").unwrap();
        let names: Vec<&str> = s
            .default_route
            .credential_headers
            .iter()
            .map(|h| h.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "set-cookie",
                "set-cookie2",
                "authentication-info",
                "proxy-authentication-info",
                "x-session"
            ]
        );
    }

    #[test]
    fn admin_listener_is_off_by_default_and_loopback_only() {
        assert_eq!(load("").unwrap().admin_listen, None);
        let s = load("[admin]\nlisten = \"127.0.0.1:9465\"\n").unwrap();
        assert_eq!(s.admin_listen.unwrap().to_string(), "127.0.0.1:9465");
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
        let no_secret = "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n";
        let e = load(no_secret).unwrap_err();
        assert!(e.message.contains("dedup.secret"), "{e}");
        assert!(e.message.contains("replicas"), "{e}");
        // IDEM_SECRET stands in for [dedup] secret.
        let env = Env {
            secret: Some("0123456789abcdef0123".to_string()),
            ..Env::default()
        };
        let s = Settings::parse(no_secret, Path::new("proxy.toml"), &env, None).unwrap();
        assert_eq!(s.secret.as_deref(), Some("0123456789abcdef0123"));
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
    fn errors_found_after_parsing_name_line_and_column_however_the_key_is_written() {
        // A section header.
        let e = load("[server]\ngrace_period = \"10s\"\n[upstream]\ntotal_timeout = \"60s\"\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(16)), "{e}");
        assert_eq!(
            e.to_string(),
            "proxy.toml:2:16: server.grace_period: 10s is shorter than upstream.total_timeout (1m); a SIGTERM would cut calls still running. Raise it to at least the total timeout"
        );
        // Dotted keys at the top level.
        let e = load("upstream.total_timeout = \"1s\"\nupstream.connect_timeout = \"2s\"\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (Some(1), Some(26)), "{e}");
        assert!(e.message.starts_with("upstream.total_timeout: "), "{e}");
        // An inline table.
        let e = load("route = [{ path_prefix = \"/a\", methods = [\"POST\", \"GET\"] }]\n[server]\nthreads = 1\n").unwrap_err();
        assert_eq!((e.line, e.column), (Some(1), Some(42)), "{e}");
        assert!(
            e.message
                .starts_with("route[0].methods: GET is not eligible"),
            "{e}"
        );
        let e = load("store = { kind = \"memory\", url = \"redis://a:1\" }\n").unwrap_err();
        assert_eq!((e.line, e.column), (Some(1), Some(34)), "{e}");
        assert!(e.message.starts_with("store.url: "), "{e}");
    }

    #[test]
    fn key_header_must_be_a_header_name_that_can_carry_a_key() {
        let parse = load;
        let s = parse("[dedup]\nkey_header = \"X-Idempotency-Key\"\n[[route]]\npath_prefix = \"/a\"\n[[route]]\npath_prefix = \"/b\"\nkey_header = \"Idem-Key\"\n").unwrap();
        assert_eq!(s.default_route.key_header.as_str(), "x-idempotency-key");
        assert_eq!(s.routes[0].key_header.as_str(), "x-idempotency-key");
        assert_eq!(s.routes[1].key_header.as_str(), "idem-key");
        assert_eq!(
            parse("").unwrap().default_route.key_header.as_str(),
            "idempotency-key"
        );
        for (text, key, line, col, what) in [
            (
                "[dedup]\nkey_header = \"X Key\"\n",
                "dedup.key_header",
                2,
                14,
                "not a valid header name",
            ),
            (
                "[dedup]\nkey_header = \"\"\n",
                "dedup.key_header",
                2,
                14,
                "not a valid header name",
            ),
            (
                "[[route]]\npath_prefix = \"/a\"\nkey_header = \"Content-Length\"\n",
                "route[0].key_header",
                3,
                14,
                "framing",
            ),
            (
                "[dedup]\nkey_header = \"Authorization\"\n",
                "dedup.key_header",
                2,
                14,
                "scope_headers",
            ),
            (
                "[dedup]\nkey_header = \"K\"\nfingerprint_headers = [\"k\"]\n",
                "dedup.key_header",
                2,
                14,
                "fingerprint_headers",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.message.starts_with(&format!("{key}: ")), "{text}: {e}");
            assert!(e.message.contains(what), "{text}: {e}");
            assert_eq!((e.line, e.column), (Some(line), Some(col)), "{text}: {e}");
        }
    }

    #[test]
    fn named_upstream_groups_inherit_timeouts_and_routes_pick_them_by_name() {
        use crate::config::file::Protocol;
        let s = load(
            "[upstream]\nread_timeout = \"20s\"\n[upstreams.grpc]\nbackends = [\"127.0.0.1:9000\"]\nprotocol = \"h2c\"\n[upstreams.other]\nbackends = [\"https://app.internal\"]\nread_timeout = \"5s\"\n[[route]]\npath_prefix = \"/a\"\nupstream = \"other\"\n[[route]]\npath_prefix = \"/b\"\nupstream = \"grpc\"\n[[route]]\npath_prefix = \"/c\"\n",
        )
        .unwrap();
        let names: Vec<&str> = s.groups.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["grpc", "other"]);
        let (grpc, other) = (&s.groups[0].1, &s.groups[1].1);
        assert_eq!(grpc.protocol, Protocol::H2c);
        assert_eq!(s.upstream.protocol, Protocol::Auto);
        assert_eq!(grpc.read_timeout, Duration::from_secs(20), "inherited");
        assert_eq!(other.read_timeout, Duration::from_secs(5), "its own");
        assert_eq!(grpc.total_timeout, s.upstream.total_timeout);
        assert!(
            other.tls.as_ref().is_some_and(|t| t.verify),
            "https:// gets TLS"
        );
        assert!(grpc.tls.is_none());
        let groups: Vec<usize> = s.routes.iter().map(|r| r.upstream).collect();
        assert_eq!(groups, [2, 1, 0]);
        assert_eq!(s.default_route.upstream, 0);
        let without = load("[upstream]\nread_timeout = \"20s\"\n").unwrap();
        assert_eq!(s.restart_only_changes(&without), vec!["upstreams"]);

        for (text, key, line, col, what) in [
            (
                "[upstreams.g]\nbackends = [\"a:1\"]\n[[route]]\npath_prefix = \"/a\"\nupstream = \"h\"\n",
                "route[0].upstream",
                5,
                12,
                "the groups are g",
            ),
            (
                "[[route]]\npath_prefix = \"/a\"\nupstream = \"h\"\n",
                "route[0].upstream",
                3,
                12,
                "there is no [upstreams.h]",
            ),
            (
                "[upstreams.g]\nbackends = [\"a:1\"]\ntotal_timeout = \"5s\"\n",
                "upstreams.g.total_timeout",
                3,
                17,
                "[upstream] only",
            ),
            (
                "[upstreams.g]\nprotocol = \"h2c\"\n",
                "upstreams.g.backends",
                1,
                1,
                "at least one backend",
            ),
            (
                "[upstreams.g]\nbackends = [\"a:1\"]\ntls_ca = \"ca.pem\"\n",
                "upstreams.g.tls_ca",
                3,
                10,
                "https://",
            ),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.message.starts_with(&format!("{key}: ")), "{text}: {e}");
            assert!(e.message.contains(what), "{text}: {e}");
            assert_eq!((e.line, e.column), (Some(line), Some(col)), "{text}: {e}");
        }
        // A group is chosen per route: `[dedup]` (the default route's policy) has none.
        let e = load("[dedup]\nupstream = \"g\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = load("[upstream]\nprotocol = \"h3\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }
}
