//! proxy.toml as written by the operator: serde structs that reject unknown keys.
//!
//! This module only parses. Durations ("60s", "24h") and sizes ("1MiB") are parsed inside
//! `Deserialize`, so the toml crate reports the line and column of a bad value. Checks that
//! need the whole file (route defaults, cross-field limits) live in [`crate::config::settings`].
//!
//! `flatten` is avoided on purpose: serde's `deny_unknown_fields` does not see through it,
//! so the per-route overrides repeat the `[dedup]` fields as `Option`s instead.

// Field meanings, units and defaults are documented once, in README's proxy.toml reference
// and on the resolved `Settings`; repeating them on these raw mirrors would drift.
#![allow(missing_docs)]

use serde::{Deserialize, Deserializer};
use std::time::Duration;

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
    pub listen: Option<OneOrMany>,
    pub threads: Option<usize>,
    pub work_stealing: Option<bool>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub grace_period: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub keepalive_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub body_read_timeout: Option<Duration>,
    pub max_waiters: Option<usize>,
    pub log_format: Option<LogFormat>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub backends: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub total_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub pool_idle_timeout: Option<Duration>,
    pub health_check: Option<HealthCheckKind>,
    pub health_check_path: Option<String>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub health_check_interval: Option<Duration>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

/// `[admin]`: off unless `listen` is set; loopback only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<StoreKind>,
    pub max_entries: Option<usize>,
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_bytes: Option<u64>,
    pub max_keys_per_scope: Option<usize>,
    pub url: Option<String>,
    pub nodes: Option<Vec<String>>,
    pub on_store_error: Option<OnStoreError>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub liveness_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub poll_interval: Option<Duration>,
}

/// `[dedup]`: the defaults every route inherits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub mode: Option<Mode>,
    pub methods: Option<Vec<String>>,
    pub scope_headers: Option<Vec<String>>,
    pub fingerprint_headers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub fingerprint_ttl: Option<Duration>,
    pub on_concurrent: Option<OnConcurrent>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub wait_timeout: Option<Duration>,
    pub max_waiters_per_key: Option<usize>,
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_body: Option<u64>,
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_response_body: Option<u64>,
    pub store_statuses: Option<Vec<String>>,
    /// Only valid in `[dedup]`: the deployment secret for key derivation.
    pub secret: Option<String>,
}

/// One `[[route]]`: a name, a prefix, and overrides of `[dedup]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    pub path_prefix: String,
    pub mode: Option<Mode>,
    pub methods: Option<Vec<String>>,
    pub scope_headers: Option<Vec<String>>,
    pub fingerprint_headers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub fingerprint_ttl: Option<Duration>,
    pub on_concurrent: Option<OnConcurrent>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub wait_timeout: Option<Duration>,
    pub max_waiters_per_key: Option<usize>,
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_body: Option<u64>,
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_response_body: Option<u64>,
    pub store_statuses: Option<Vec<String>>,
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

fn de_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write it like \"500ms\", \"60s\" or \"24h\""
        ))
    })
}

fn de_size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(Some(n)),
        Size::Text(s) => s
            .parse::<bytesize::ByteSize>()
            .map(|b| Some(b.as_u64()))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a size ({e}); write it like \"64KiB\", \"1MiB\" or \"256MiB\""
                ))
            }),
    }
}
