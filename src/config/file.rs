//! proxy.toml as written by the operator: serde structs that reject unknown keys.
//!
//! This module only parses. Durations ("60s", "24h") and sizes ("1MiB") are parsed inside
//! `Deserialize`, so the toml crate reports the line and column of a bad value. Every value
//! is kept with its place in the file (`toml::Spanned`), so that the checks that need the
//! whole file (`crate::config::resolve`) can name the exact line and column too, however
//! the key was written (`[section]`, dotted key, inline table).
//!
//! `flatten` is avoided on purpose: serde's `deny_unknown_fields` does not see through it.
//! The route-policy keys, which `[dedup]` and every `[[route]]` share, are written once, in
//! the [`policy_keys!`] invocation below, which emits both structs and [`PolicyKeys`].

// Field meanings, units and defaults are documented once, in docs/configuration.md (the proxy.toml reference)
// and on the resolved `Settings`; repeating them on these raw mirrors would drift.
#![allow(missing_docs)]

use serde::{Deserialize, Deserializer};
use std::time::Duration;
use toml::Spanned;

/// An optional value and where it was written.
pub(crate) type Opt<T> = Option<Spanned<T>>;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) upstream: RawUpstream,
    /// `[upstreams.NAME]`: named upstream groups, chosen per route.
    #[serde(default)]
    pub(crate) upstreams: std::collections::BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub(crate) metrics: RawMetrics,
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    #[serde(default)]
    pub(crate) store: RawStore,
    #[serde(default)]
    pub(crate) dedup: RawPolicy,
    #[serde(default, rename = "route")]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) tracing: RawTracing,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Opt<OneOrMany>,
    pub(crate) unix_socket_mode: Opt<String>,
    pub(crate) threads: Opt<usize>,
    pub(crate) work_stealing: Opt<bool>,
    pub(crate) grace_period: Opt<Dur>,
    pub(crate) keepalive_timeout: Opt<Dur>,
    pub(crate) body_read_timeout: Opt<Dur>,
    pub(crate) max_waiters: Opt<usize>,
    pub(crate) max_waiters_per_client: Opt<usize>,
    pub(crate) max_body_buffer: Opt<Size>,
    pub(crate) max_body_buffer_per_client: Opt<Size>,
    pub(crate) log_format: Opt<LogFormat>,
    /// Each entry keeps its own place, so an error points at the entry at fault.
    pub(crate) trusted_proxies: Opt<Vec<Spanned<String>>>,
    pub(crate) proxy_protocol: Opt<bool>,
    pub(crate) log_query: Opt<bool>,
    pub(crate) request_id_header: Opt<String>,
    pub(crate) shutdown_delay: Opt<Dur>,
    /// `[server.tls]`: the TLS listeners.
    pub(crate) tls: Opt<RawServerTls>,
}

/// `[server.tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServerTls {
    pub(crate) listen: Opt<OneOrMany>,
    pub(crate) cert: Opt<String>,
    pub(crate) key: Opt<String>,
    /// `[[server.tls.certs]]`: more pairs, chosen by the name the client asks for (SNI).
    pub(crate) certs: Opt<Vec<RawCertPair>>,
}

/// One `[[server.tls.certs]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertPair {
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) backends: Opt<Vec<String>>,
    pub(crate) connect_timeout: Opt<Dur>,
    pub(crate) read_timeout: Opt<Dur>,
    pub(crate) total_timeout: Opt<Dur>,
    pub(crate) pool_idle_timeout: Opt<Dur>,
    pub(crate) health_check: Opt<HealthCheckKind>,
    pub(crate) health_check_path: Opt<String>,
    pub(crate) health_check_host: Opt<String>,
    pub(crate) health_check_interval: Opt<Dur>,
    pub(crate) resolve_interval: Opt<Dur>,
    pub(crate) tls_ca: Opt<String>,
    pub(crate) tls_client_cert: Opt<String>,
    pub(crate) tls_client_key: Opt<String>,
    pub(crate) tls_verify: Opt<bool>,
    pub(crate) tls_server_name: Opt<String>,
    pub(crate) protocol: Opt<Protocol>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub(crate) listen: Opt<String>,
}

/// `[tracing]`: OpenTelemetry traces over OTLP/HTTP, off unless `otlp_endpoint` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTracing {
    pub(crate) otlp_endpoint: Opt<String>,
    pub(crate) service_name: Opt<String>,
    pub(crate) sample_ratio: Opt<f64>,
}

/// `[admin]`: off unless `listen` is set; loopback only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Opt<String>,
    pub(crate) token: Opt<String>,
    pub(crate) token_file: Opt<String>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) kind: Opt<StoreKind>,
    pub(crate) max_entries: Opt<usize>,
    pub(crate) max_bytes: Opt<Size>,
    pub(crate) max_keys_per_scope: Opt<usize>,
    pub(crate) max_keys_per_client: Opt<usize>,
    pub(crate) max_bytes_per_client: Opt<Size>,
    pub(crate) max_pinned: Opt<usize>,
    pub(crate) url: Opt<String>,
    pub(crate) nodes: Opt<Vec<Spanned<String>>>,
    pub(crate) sentinels: Opt<Vec<Spanned<String>>>,
    pub(crate) master_name: Opt<String>,
    pub(crate) username: Opt<String>,
    pub(crate) password_file: Opt<String>,
    pub(crate) tls_ca: Opt<String>,
    pub(crate) tls_client_cert: Opt<String>,
    pub(crate) tls_client_key: Opt<String>,
    pub(crate) key_prefix: Opt<String>,
    pub(crate) on_store_error: Opt<OnStoreError>,
    pub(crate) timeout: Opt<Dur>,
    pub(crate) liveness_ttl: Opt<Dur>,
    pub(crate) poll_interval: Opt<Dur>,
}

/// Emits [`RawPolicy`] (`[dedup]`), [`RawRoute`] (`[[route]]`) and [`PolicyKeys`] from one
/// list of the route-policy keys, so that a new key is added in one place.
macro_rules! policy_keys {
    ($($key:ident: $ty:ty,)*) => {
        /// The route-policy keys, as written in `[dedup]` or in one `[[route]]`.
        #[derive(Debug, Default, Clone)]
        pub(crate) struct PolicyKeys {
            $(pub(crate) $key: Opt<$ty>,)*
        }

        /// `[dedup]`: the defaults every route inherits, and the deployment secret.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct RawPolicy {
            pub(crate) secret: Opt<String>,
            $(pub(crate) $key: Opt<$ty>,)*
        }

        /// One `[[route]]`: a name, a prefix, and overrides of `[dedup]`.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct RawRoute {
            pub(crate) name: Opt<String>,
            pub(crate) path_prefix: Spanned<String>,
            /// The named upstream group (`[upstreams.NAME]`); route-only: `[dedup]` is the
            /// default route, whose group is `[upstream]` itself.
            pub(crate) upstream: Opt<String>,
            $(pub(crate) $key: Opt<$ty>,)*
        }

        impl RawPolicy {
            /// The policy keys of `[dedup]`.
            pub(crate) fn keys(&self) -> PolicyKeys {
                PolicyKeys { $($key: self.$key.clone(),)* }
            }
        }

        impl RawRoute {
            /// The policy keys this route overrides.
            pub(crate) fn keys(&self) -> PolicyKeys {
                PolicyKeys { $($key: self.$key.clone(),)* }
            }
        }
    };
}

policy_keys! {
    mode: Mode,
    key_header: String,
    methods: Vec<String>,
    scope_headers: Vec<String>,
    scope_cookies: Vec<String>,
    credential_headers: Vec<String>,
    fingerprint_headers: Vec<String>,
    ttl: Dur,
    fingerprint_ttl: Dur,
    on_concurrent: OnConcurrent,
    wait_timeout: Dur,
    max_waiters_per_key: usize,
    max_body: Size,
    max_response_body: Size,
    store_statuses: Vec<String>,
}

/// A string or a list of strings (`listen = "a"` or `listen = ["a", "b"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    /// `listen = "127.0.0.1:8080"`
    One(String),
    /// `listen = ["127.0.0.1:8080", "[::1]:8080"]`
    Many(Vec<String>),
}

impl OneOrMany {
    /// The addresses as a list.
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A duration written like "500ms", "60s" or "24h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dur(pub(crate) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write it like \"500ms\", \"60s\" or \"24h\""
            ))
        })
    }
}

/// A size in bytes, written as a number or like "64KiB", "1MiB" or "256MiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Int(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Int(n) => Ok(Size(n)),
            Written::Text(s) => s
                .parse::<bytesize::ByteSize>()
                .map(|b| Size(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "{s:?} is not a size ({e}); write it like \"64KiB\", \"1MiB\" or \"256MiB\""
                    ))
                }),
        }
    }
}

/// How a route treats eligible requests (DESIGN section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// Everything passes through, streamed.
    Off,
    /// Requests with an `Idempotency-Key` are deduplicated; others pass through.
    Keyed,
    /// Requests without a key are deduplicated by their fingerprint too.
    Fingerprint,
    /// Requests without a key are refused with 400.
    RequireKey,
    /// Everything passes through; keys are computed and would-be duplicates counted.
    Shadow,
}

/// What a request for a key in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnConcurrent {
    /// Wait for the leader's response, up to `wait_timeout`.
    Wait,
    /// Answer 409 in-progress at once (IETF draft behaviour).
    Reject,
}

/// Which store keeps completed keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StoreKind {
    /// Embedded, per process.
    Memory,
    /// Shared by replicas: one Redis node (`url`), a Redis Cluster (`nodes`), or the
    /// primary that Redis Sentinel names (`sentinels`, `master_name`).
    Redis,
}

/// What a leader does when the shared store cannot be used (DESIGN section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnStoreError {
    /// Serve with local dedup only (counted and logged).
    FailOpen,
    /// Answer 503 `store-unavailable`.
    FailClosed,
}

/// What an upstream group speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Protocol {
    /// HTTP/2 for gRPC requests (`content-type: application/grpc*`), HTTP/1.1 otherwise.
    Auto,
    /// HTTP/1.1 for everything.
    Http1,
    /// HTTP/2 for everything: with prior knowledge (h2c) to cleartext backends, by ALPN to
    /// `https://` ones.
    H2c,
}

/// How backends are health checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum HealthCheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET of `health_check_path` expecting 2xx.
    Http,
    /// No health check: every backend is always eligible.
    None,
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable key=value text.
    Text,
    /// One JSON object per line.
    Json,
}
