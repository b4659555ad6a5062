//! Built-in defaults, one place, quoted by README's reference.

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
