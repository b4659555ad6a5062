//! proxy.toml as written by the operator: serde structs that reject unknown keys.
//!
//! This module only parses. Durations ("60s", "24h") and sizes ("1MiB") are parsed inside
//! `Deserialize`, so the toml crate reports the line and column of a bad value. Every value
//! is kept with its place in the file (`toml::Spanned`), so that the checks that need the
//! whole file ([`crate::config::resolve`]) can name the exact line and column too, however
//! the key was written (`[section]`, dotted key, inline table).
//!
//! `flatten` is avoided on purpose: serde's `deny_unknown_fields` does not see through it.
//! The route-policy keys, which `[dedup]` and every `[[route]]` share, are written once, in
//! the [`policy_keys!`] invocation below, which emits both structs and [`PolicyKeys`].

// Field meanings, units and defaults are documented once, in README's proxy.toml reference
// and on the resolved `Settings`; repeating them on these raw mirrors would drift.
#![allow(missing_docs)]

use serde::{Deserialize, Deserializer};
use std::time::Duration;
use toml::Spanned;

/// An optional value and where it was written.
pub type Opt<T> = Option<Spanned<T>>;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub dedup: RawPolicy,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Opt<OneOrMany>,
    pub threads: Opt<usize>,
    pub work_stealing: Opt<bool>,
    pub grace_period: Opt<Dur>,
    pub keepalive_timeout: Opt<Dur>,
    pub body_read_timeout: Opt<Dur>,
    pub max_waiters: Opt<usize>,
    pub log_format: Opt<LogFormat>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub backends: Opt<Vec<String>>,
    pub connect_timeout: Opt<Dur>,
    pub read_timeout: Opt<Dur>,
    pub total_timeout: Opt<Dur>,
    pub pool_idle_timeout: Opt<Dur>,
    pub health_check: Opt<HealthCheckKind>,
    pub health_check_path: Opt<String>,
    pub health_check_interval: Opt<Dur>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Opt<String>,
}

/// `[admin]`: off unless `listen` is set; loopback only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Opt<String>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Opt<StoreKind>,
    pub max_entries: Opt<usize>,
    pub max_bytes: Opt<Size>,
    pub max_keys_per_scope: Opt<usize>,
    pub url: Opt<String>,
    pub nodes: Opt<Vec<String>>,
    pub on_store_error: Opt<OnStoreError>,
    pub timeout: Opt<Dur>,
    pub liveness_ttl: Opt<Dur>,
    pub poll_interval: Opt<Dur>,
}

/// Emits [`RawPolicy`] (`[dedup]`), [`RawRoute`] (`[[route]]`) and [`PolicyKeys`] from one
/// list of the route-policy keys, so that a new key is added in one place.
macro_rules! policy_keys {
    ($($key:ident: $ty:ty,)*) => {
        /// The route-policy keys, as written in `[dedup]` or in one `[[route]]`.
        #[derive(Debug, Default, Clone)]
        pub struct PolicyKeys {
            $(pub $key: Opt<$ty>,)*
        }

        /// `[dedup]`: the defaults every route inherits, and the deployment secret.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawPolicy {
            pub secret: Opt<String>,
            $(pub $key: Opt<$ty>,)*
        }

        /// One `[[route]]`: a name, a prefix, and overrides of `[dedup]`.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawRoute {
            pub name: Opt<String>,
            pub path_prefix: Spanned<String>,
            $(pub $key: Opt<$ty>,)*
        }

        impl RawPolicy {
            /// The policy keys of `[dedup]`.
            pub fn keys(&self) -> PolicyKeys {
                PolicyKeys { $($key: self.$key.clone(),)* }
            }
        }

        impl RawRoute {
            /// The policy keys this route overrides.
            pub fn keys(&self) -> PolicyKeys {
                PolicyKeys { $($key: self.$key.clone(),)* }
            }
        }
    };
}

policy_keys! {
    mode: Mode,
    methods: Vec<String>,
    scope_headers: Vec<String>,
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
pub enum OneOrMany {
    /// `listen = "127.0.0.1:8080"`
    One(String),
    /// `listen = ["127.0.0.1:8080", "[::1]:8080"]`
    Many(Vec<String>),
}

impl OneOrMany {
    /// The addresses as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A duration written like "500ms", "60s" or "24h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

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
pub struct Size(pub u64);

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
pub enum Mode {
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

impl Mode {
    /// The value as spelled in proxy.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Keyed => "keyed",
            Mode::Fingerprint => "fingerprint",
            Mode::RequireKey => "require-key",
            Mode::Shadow => "shadow",
        }
    }
}

/// What a request for a key in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnConcurrent {
    /// Wait for the leader's response, up to `wait_timeout`.
    Wait,
    /// Answer 409 in-progress at once (IETF draft behaviour).
    Reject,
}

/// Which store keeps completed keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// Embedded, per process.
    Memory,
    /// Shared by replicas: one Redis node (`url`) or a Redis Cluster (`nodes`).
    Redis,
}

/// What a leader does when the shared store cannot be used (DESIGN section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreError {
    /// Serve with local dedup only (counted and logged).
    FailOpen,
    /// Answer 503 `store-unavailable`.
    FailClosed,
}

/// How backends are health checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthCheckKind {
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
